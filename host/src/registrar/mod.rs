//! The registrar: keeps the host's router in step with its containers.
//!
//! watch → store → decide → apply. Docker events and periodic re-lists feed the
//! [`store::Store`]; [`desired::desired`] computes the routing table from the store and
//! the service definitions; [`redx::Routes`] writes only the difference, atomically, and
//! every 2 s (and at every resync and reconnect) verifies key by key that Redis still
//! holds what warden wrote, rewriting what drifted and leaving other writers' values
//! alone. ELB membership and router listen ports are handed to their own loops through
//! watch channels, so a slow AWS call never delays a route. The Docker stream reconnects
//! with jittered backoff and re-lists after every reconnect; the loop never exits on its
//! own.

pub mod containers;
pub mod desired;
pub mod docker;
pub mod elb;
pub mod entry;
#[cfg(test)]
pub mod fakes;
pub mod redx;
pub mod router;
pub mod settings;
pub mod store;
pub mod target_group;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use warden_plugin_api::ServiceDefinition;

use crate::backoff::Backoff;
use crate::metrics::{self, Dependency};
use crate::plugins::slot::Slot;
use crate::plugins::ServicesClient;
use containers::{Containers, InspectError, Seen};
use desired::ElbWant;
use redx::{RedisStore, RouteStore};
use store::{Need, Store};

/// A service source: its instance's slot, its config key for logs, and what its
/// definitions may claim.
#[derive(Clone)]
pub struct Source {
    /// `registrar.sources[0] (docker-labels)`.
    pub key: String,
    /// The instance, once created (until then its services' routes are held).
    pub slot: Slot,
    pub grants: crate::grants::Grants,
}

/// What the registrar loop is given; `main` wires it. Docker and the local Redis are
/// ports ([`Containers`], [`RouteStore`]): bollard and Redis in the daemon, fakes in
/// the loop's tests ([`fakes`]).
pub struct Registrar<C: Containers = bollard::Docker, S: RouteStore = RedisStore> {
    pub docker: C,
    pub sources: Vec<Source>,
    /// The router's ports and this host's own names, for the grant checks.
    pub facts: crate::grants::HostFacts,
    pub routes: redx::Routes<S>,
    pub resync: Duration,
    /// See `RegistrarConfig::drain_on_stop`.
    pub drain_on_stop: bool,
    /// ELB membership wanted, published only while the store is in sync with Docker.
    pub elbs: std::sync::Arc<watch::Sender<BTreeMap<String, ElbWant>>>,
    /// Target group membership wanted, published as `elbs` is.
    pub target_groups: std::sync::Arc<watch::Sender<BTreeMap<desired::TargetGroupKey, ElbWant>>>,
    /// The router's port front-ends.
    pub ports: std::sync::Arc<watch::Sender<BTreeSet<u16>>>,
    /// Only containers with this label are considered.
    pub selector: Option<store::Selector>,
}

/// State kept between reconciles.
struct Loop<C: Containers, S: RouteStore> {
    r: Registrar<C, S>,
    store: Store,
    /// Each source's last good answer (`None` until it first answers).
    last_services: Vec<Option<Vec<ServiceDefinition>>>,
    generations: Vec<Option<u64>>,
    /// Warnings already given (bounded: their text holds other people's names).
    warned: warden_plugin_api::sdk::SaidOnce,
    redis_backoff: Backoff,
    retry_at: Option<Instant>,
    /// Who holds each front-end and port (key → backend) as last written; `None` until
    /// read back from Redis.
    held: Option<BTreeMap<String, String>>,
    /// The entries of the last decision, for the verification.
    last_desired: Option<BTreeSet<entry::Entry>>,
    /// The account last published for `warden routes`, and the decision it was made from.
    published: String,
    last_routing: Option<desired::Routing>,
    /// Local Redis errors, said once then once a minute.
    redis_errors: crate::logs::Repeated,
    ready: bool,
}

impl<C: Containers, S: RouteStore> Registrar<C, S> {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let n = self.sources.len();
        let die_only = !self.drain_on_stop;
        let mut store = Store::new(die_only);
        store.selector = self.selector.clone();
        let mut l = Loop {
            r: self,
            store,
            last_services: vec![None; n],
            generations: vec![None; n],
            warned: warden_plugin_api::sdk::SaidOnce::default(),
            redis_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retry_at: None,
            held: None,
            last_desired: None,
            published: String::new(),
            last_routing: None,
            redis_errors: crate::logs::Repeated::new("local redis"),
            ready: false,
        };
        let mut docker_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
        let mut docker_errors = crate::logs::Repeated::new("docker");
        loop {
            // Replay events from just before the list, so none is missed in between.
            let since = unix_now() - 1;
            match l.r.docker.list_running().await {
                Ok(list) => {
                    if docker_backoff.attempts() > 0 {
                        tracing::info!(
                            containers = list.len(),
                            "docker answering again; containers re-listed"
                        );
                    }
                    docker_errors.cleared();
                    docker_backoff.reset();
                    metrics::get().set_up(Dependency::Docker, true);
                    l.store.replace_all(list);
                    // After a reconnect, verify Redis key by key too.
                    l.r.routes.invalidate();
                }
                Err(e) => {
                    metrics::get().set_up(Dependency::Docker, false);
                    let delay = docker_backoff.next_delay();
                    docker_errors.failed(&format!(
                        "docker not answering ({e}); keeping the last routes"
                    ));
                    if sleep_or_shutdown(delay, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            }
            l.reconcile().await;
            l.verify().await;
            let mut events = l.r.docker.events(since);
            let mut resync = tokio::time::interval_at(Instant::now() + l.r.resync, l.r.resync);
            let mut poll_sources = tokio::time::interval(Duration::from_secs(2));
            let mut check_redis = tokio::time::interval(Duration::from_secs(2));
            loop {
                let retry = l.retry_at;
                tokio::select! {
                    _ = shutdown.changed() => return,
                    ev = events.next() => match ev {
                        Some(Ok(msg)) => {
                            l.on_event(&msg).await;
                            // Take whatever else is already queued, then decide once.
                            while let Some(Some(Ok(msg))) = events.next().now_or_never() {
                                l.on_event(&msg).await;
                            }
                            l.reconcile().await;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "docker event stream broke; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!("docker event stream ended; reconnecting");
                            break;
                        }
                    },
                    _ = resync.tick() => {
                        match l.r.docker.list_running().await {
                            Ok(list) => l.store.replace_all(list),
                            Err(e) => {
                                tracing::warn!(error = %e, "docker re-list failed; reconnecting");
                                break;
                            }
                        }
                        l.reconcile().await;
                        l.verify().await;
                    }
                    _ = poll_sources.tick() => {
                        if l.sources_changed().await {
                            l.reconcile().await;
                        }
                    }
                    _ = check_redis.tick() => {
                        if l.retry_at.is_none() {
                            l.verify().await;
                        }
                    }
                    _ = async { tokio::time::sleep_until(retry.unwrap()).await }, if retry.is_some() => {
                        l.reconcile().await;
                    }
                }
            }
            // Routes stay as they are while Docker is away; ELB decisions wait for a list.
            l.store.synced = false;
            metrics::get().set_up(Dependency::Docker, false);
            let delay = docker_backoff.next_delay();
            if sleep_or_shutdown(delay, &mut shutdown).await {
                return;
            }
        }
    }
}

impl<C: Containers, S: RouteStore> Loop<C, S> {
    async fn on_event(&mut self, msg: &Seen) {
        if let Some(action) = msg.action.as_deref() {
            // `health_status: healthy` and the like count under their type.
            let kind = action.split(':').next().unwrap_or(action);
            metrics::get()
                .docker_events
                .get_or_create(&metrics::TypeLabel {
                    r#type: kind.to_owned(),
                })
                .inc();
        }
        let Some(event) = msg.event.clone() else {
            return;
        };
        tracing::debug!(?event, "docker event");
        if let Need::Inspect { id, started } = self.store.apply(event) {
            match self.r.docker.inspect(&id).await {
                Ok(c) => self.store.upsert(c, started),
                Err(InspectError::Gone(_)) => {}
                Err(InspectError::Docker(e)) => {
                    tracing::warn!(container = %id, error = %e, "cannot inspect container; the next re-list will pick it up");
                }
            }
        }
    }

    async fn sources_changed(&mut self) -> bool {
        let mut changed = false;
        for (i, s) in self.r.sources.iter().enumerate() {
            let Ok(client) = s.slot.get() else { continue };
            if let Ok(g) = ServicesClient(client).generation().await {
                // A first generation counts as a change too: the source may have been
                // created (in the background) after the last list, or changed since.
                if self.generations[i] != Some(g) {
                    changed = true;
                    self.generations[i] = Some(g);
                }
            }
        }
        changed
    }

    /// Decide and apply, from the current store.
    async fn reconcile(&mut self) {
        let started = Instant::now();
        let views = self.store.views();
        for (i, s) in self.r.sources.iter().enumerate() {
            let listed = match s.slot.get() {
                Ok(client) => ServicesClient(client)
                    .list_for(&views)
                    .await
                    .map_err(|e| e.to_string()),
                Err(not_created) => Err(not_created.to_string()),
            };
            match listed {
                Ok(list) => self.last_services[i] = Some(list),
                Err(e) => {
                    tracing::warn!(source = %s.key, error = %e, "service source failed; using its last good services")
                }
            }
        }
        let answered = self.last_services.iter().all(Option::is_some);
        metrics::get().set_up(Dependency::ServiceSources, answered);
        if !answered {
            tracing::warn!("a service source has never answered; routes are held until it does");
            self.schedule_retry();
            return;
        }
        if self.held.is_none() {
            match self.r.routes.held().await {
                Ok(h) => self.held = Some(h),
                Err(e) => {
                    metrics::get().set_up(Dependency::LocalRedis, false);
                    self.redis_errors
                        .failed(&format!("cannot read what warden holds: {e}"));
                    self.schedule_retry();
                    return;
                }
            }
        }
        let (services, refused) = self.screen();
        let held = self.held.clone().unwrap_or_default();
        let (routing, warnings) =
            desired::desired_screened(&services, &refused, self.store.containers(), &held);
        for w in warnings {
            self.warn_once(w);
        }
        for c in &routing.conflicts {
            self.warn_once(c.to_string());
        }
        for r in &routing.refused {
            self.warn_once(r.to_string());
        }
        metrics::get()
            .grant_refusals
            .get_or_create(&metrics::PartLabel {
                part: "registrar".into(),
            })
            .set(routing.refused.len() as i64);
        metrics::get().set_refused(
            "registrar",
            routing.refused.iter().map(ToString::to_string).collect(),
        );
        self.r
            .ports
            .send_if_modified(|p| replace_if_changed(p, &routing.ports));
        if self.store.synced {
            self.r
                .elbs
                .send_if_modified(|e| replace_if_changed(e, &routing.elbs));
            self.r
                .target_groups
                .send_if_modified(|e| replace_if_changed(e, &routing.target_groups));
        }
        let entries = desired::owned_entries(&routing);
        let before = self.last_desired.replace(entries.clone());
        match self.r.routes.apply(&entries).await {
            Ok(applied) => {
                record(&routing, applied.writes, started.elapsed());
                self.redis_errors.cleared();
                self.redis_backoff.reset();
                self.retry_at = None;
                self.note_blocked(&applied.blocked);
                self.held = Some(
                    routing
                        .strings
                        .iter()
                        .filter(|(k, _)| !applied.blocked.iter().any(|b| &b.key == *k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                );
                if applied.writes > 0 {
                    tracing::info!(
                        backends = routing.servers.len(),
                        servers = routing.servers.values().map(BTreeSet::len).sum::<usize>(),
                        took = %crate::logs::humantime(started.elapsed()),
                        "routes updated: {}",
                        entry::describe_change(before.as_ref(), &entries)
                    );
                }
                self.last_routing = Some(routing.clone());
                self.publish().await;
                if !self.ready {
                    self.ready = true;
                    tracing::info!(
                        containers = routing.containers.len(),
                        "registrar ready: routes written for the containers running now"
                    );
                }
            }
            Err(e) => {
                metrics::get().set_up(Dependency::LocalRedis, false);
                self.redis_errors
                    .failed(&format!("cannot write routes: {e}"));
                self.schedule_retry();
            }
        }
    }

    /// Verifies key by key that Redis holds what warden wants, and repairs drift.
    async fn verify(&mut self) {
        let Some(desired) = self.last_desired.clone() else {
            return;
        };
        match self.r.routes.verify(&desired).await {
            Ok(v) => {
                metrics::get().set_up(Dependency::LocalRedis, true);
                metrics::get().routes_repaired.inc_by(v.repaired as u64);
                self.redis_errors.cleared();
                self.redis_backoff.reset();
                if v.repaired > 0 {
                    tracing::warn!(
                        repaired = v.repaired,
                        "routes in the local redis had drifted from what warden wrote (deleted or changed by someone, or redis restarted); rewritten"
                    );
                }
                self.note_blocked(&v.blocked);
                self.publish().await;
            }
            Err(e) => {
                metrics::get().set_up(Dependency::LocalRedis, false);
                self.redis_errors.failed(&format!(
                    "{e}; routes will be verified and rewritten when it is back"
                ));
                self.r.routes.invalidate();
                self.schedule_retry();
            }
        }
    }

    fn note_blocked(&mut self, blocked: &[entry::Blocked]) {
        for b in blocked {
            self.warn_once(format!(
                "{} holds {:?}, which warden did not write; warden wants {:?} there and leaves it alone",
                b.key, b.found, b.wanted
            ));
        }
    }

    fn warn_once(&mut self, w: String) {
        if self.warned.first(&w) {
            tracing::warn!("{w}");
        }
    }

    /// Each source's last good definitions, checked against that source's grants:
    /// (accepted, refused).
    fn screen(&self) -> (Vec<ServiceDefinition>, Vec<desired::Refused>) {
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for (source, list) in self.r.sources.iter().zip(&self.last_services) {
            for def in list.iter().flatten() {
                match source.grants.service(def, &self.r.facts) {
                    Ok(()) => accepted.push(def.clone()),
                    Err(refusal) => refused.push(desired::Refused {
                        source: source.key.clone(),
                        definition: def.clone(),
                        refusal,
                    }),
                }
            }
        }
        (accepted, refused)
    }

    /// Publishes the account of containers, conflicts and blocked keys when it changed.
    async fn publish(&mut self) {
        let Some(routing) = &self.last_routing else {
            return;
        };
        let blocked = self.r.routes.blocked();
        let state = serde_json::json!({
            "containers": routing.containers,
            "conflicts": routing.conflicts,
            "refused": routing.refused,
            "blocked": blocked.iter().map(|b| serde_json::json!({"key": b.key, "wanted": b.wanted, "found": b.found})).collect::<Vec<_>>(),
        })
        .to_string();
        if state == self.published {
            return;
        }
        match self.r.routes.store.publish_state(&state).await {
            Ok(()) => self.published = state,
            Err(e) => tracing::debug!(error = %e, "registrar account not published"),
        }
    }

    fn schedule_retry(&mut self) {
        self.retry_at = Some(Instant::now() + self.redis_backoff.next_delay());
    }
}

/// Records a decision applied to the local Redis.
fn record(routing: &desired::Routing, writes: usize, took: Duration) {
    let m = metrics::get();
    m.set_up(Dependency::LocalRedis, true);
    m.reconciles.inc();
    m.reconcile_seconds.observe(took.as_secs_f64());
    if writes > 0 {
        m.redis_writes.inc();
    }
    m.route_conflicts.set(routing.conflicts.len() as i64);
    let mut per: BTreeMap<String, (usize, usize)> = routing
        .servers
        .iter()
        .map(|(b, s)| (b.clone(), (0, s.len())))
        .collect();
    for backend in routing.strings.values() {
        per.entry(backend.clone()).or_default().0 += 1;
    }
    m.set_routing(&per);
}

fn replace_if_changed<T: PartialEq + Clone>(slot: &mut T, new: &T) -> bool {
    if slot != new {
        *slot = new.clone();
        true
    } else {
        false
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sleeps; true if shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}
