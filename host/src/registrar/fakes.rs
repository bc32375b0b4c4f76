//! Fakes of the registrar's edges (Docker, the local Redis, a service source) and the
//! registrar loop's tests in paused time: reconnect and re-list, retry with backoff,
//! ELB membership published only while in sync, routes held until every source has
//! answered, and a container's drain (out of the routes at its stop signal, before it
//! dies).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use warden_plugin_api::{Kind, Op as PluginOp, ServiceDefinition};

use super::containers::{Containers, DockerError, InspectError, Seen};
use super::entry::{model, Actual, Entry, Op};
use super::redx::{RouteError, RouteStore};
use super::store::{Container, Event};
use crate::plugins::client::{decode_answer, BoxFuture, Decode};
use crate::plugins::{CallError, PluginClient};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running container with an address on the bridge, exposing port 80.
pub fn container(id: &str, labels: &[(&str, &str)], ip: &str) -> Container {
    super::store::tests::container(id, &format!("c-{id}"), labels, ip)
}

/// Docker in memory: running containers, open event streams, and an outage switch.
#[derive(Clone, Default)]
pub struct FakeDocker(Arc<Mutex<DockerState>>);

#[derive(Default)]
struct DockerState {
    running: BTreeMap<String, Container>,
    down: bool,
    lists: usize,
    streams: Vec<mpsc::UnboundedSender<Result<Seen, DockerError>>>,
}

impl FakeDocker {
    fn send(&self, action: &str, event: Event) {
        let seen = Seen {
            action: Some(action.into()),
            event: Some(event),
        };
        lock(&self.0)
            .streams
            .retain(|s| s.send(Ok(seen.clone())).is_ok());
    }

    /// A container starts (and its `start` event is sent).
    pub fn start(&self, c: Container) {
        let id = c.id.clone();
        lock(&self.0).running.insert(id.clone(), c);
        self.send("start", Event::Start(id));
    }

    /// A container is sent a signal (`docker stop` sends 15), still running.
    pub fn kill(&self, id: &str, signal: &str) {
        self.send(
            "kill",
            Event::Kill {
                id: id.into(),
                signal: signal.into(),
            },
        );
    }

    /// A container ends.
    pub fn die(&self, id: &str) {
        lock(&self.0).running.remove(id);
        self.send("die", Event::Die(id.into()));
    }

    /// A container starts while nobody listens (its event is lost).
    pub fn start_unheard(&self, c: Container) {
        lock(&self.0).running.insert(c.id.clone(), c);
    }

    /// Docker goes away: open streams fail, calls fail until [`FakeDocker::come_back`].
    pub fn go_down(&self) {
        let mut s = lock(&self.0);
        s.down = true;
        for st in s.streams.drain(..) {
            let _ = st.send(Err(DockerError("connection reset".into())));
        }
    }

    pub fn come_back(&self) {
        lock(&self.0).down = false;
    }

    /// Full lists answered so far.
    pub fn lists(&self) -> usize {
        lock(&self.0).lists
    }
}

impl Containers for FakeDocker {
    async fn list_running(&self) -> Result<Vec<Container>, DockerError> {
        let mut s = lock(&self.0);
        if s.down {
            return Err(DockerError("connection refused".into()));
        }
        s.lists += 1;
        Ok(s.running.values().cloned().collect())
    }

    async fn inspect(&self, id: &str) -> Result<Container, InspectError> {
        let s = lock(&self.0);
        if s.down {
            return Err(DockerError("connection refused".into()).into());
        }
        s.running
            .get(id)
            .cloned()
            .ok_or_else(|| InspectError::Gone(id.into()))
    }

    fn events(&self, _since: i64) -> BoxStream<'static, Result<Seen, DockerError>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = lock(&self.0);
        if s.down {
            let _ = tx.send(Err(DockerError("connection refused".into())));
        } else {
            s.streams.push(tx);
        }
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }
}

/// The local Redis in memory, with the apply script's rules ([`model::Redis`]), and
/// failures on demand.
#[derive(Clone, Default)]
pub struct FakeRoutes(Arc<Mutex<RoutesState>>);

#[derive(Default)]
struct RoutesState {
    redis: model::Redis,
    /// Calls that fail from now on.
    failing: usize,
    writes: usize,
    /// When each call came (paused time).
    calls: Vec<tokio::time::Instant>,
}

impl FakeRoutes {
    /// The next `n` calls fail.
    pub fn fail_next(&self, n: usize) {
        lock(&self.0).failing = n;
    }

    /// The backend each front-end key names.
    pub fn strings(&self) -> BTreeMap<String, String> {
        lock(&self.0).redis.strings.clone()
    }

    /// A backend's servers.
    pub fn servers(&self, backend: &str) -> BTreeSet<String> {
        lock(&self.0)
            .redis
            .hashes
            .get(&format!("backend:{backend}"))
            .cloned()
            .unwrap_or_default()
    }

    pub fn writes(&self) -> usize {
        lock(&self.0).writes
    }

    /// When each call came, in order.
    pub fn calls(&self) -> Vec<tokio::time::Instant> {
        lock(&self.0).calls.clone()
    }

    /// Routes warden wrote before (an earlier run): owned, and in Redis.
    pub fn seed(&self, entries: &[Entry]) {
        let ops: Vec<Op> = entries
            .iter()
            .map(|e| match e {
                Entry::Server { .. } => Op::AddServer(e.clone()),
                Entry::Key { .. } => Op::SetKey {
                    entry: e.clone(),
                    replaces: None,
                },
            })
            .collect();
        lock(&self.0).redis.apply(&ops);
    }

    /// Another writer deletes a key.
    pub fn delete(&self, key: &str) {
        lock(&self.0).redis.strings.remove(key);
    }

    fn check(&self) -> Result<MutexGuard<'_, RoutesState>, RouteError> {
        let mut s = lock(&self.0);
        s.calls.push(tokio::time::Instant::now());
        if s.failing > 0 {
            s.failing -= 1;
            return Err(RouteError {
                addr: "fake".into(),
                message: "connection refused".into(),
            });
        }
        Ok(s)
    }
}

impl RouteStore for FakeRoutes {
    async fn owned(&mut self) -> Result<Vec<(String, Option<Entry>)>, RouteError> {
        let s = self.check()?;
        Ok(s.redis
            .owned
            .iter()
            .map(|m| (m.clone(), Entry::decode(m)))
            .collect())
    }

    async fn read(&mut self, entries: &BTreeSet<Entry>) -> Result<Actual, RouteError> {
        Ok(self.check()?.redis.actual(entries))
    }

    async fn write(
        &mut self,
        ops: &[Op],
        _after: &BTreeSet<Entry>,
    ) -> Result<Vec<(String, String)>, RouteError> {
        let mut s = self.check()?;
        s.writes += 1;
        Ok(s.redis.apply(ops))
    }

    async fn publish_state(&mut self, _json: &str) -> Result<(), RouteError> {
        self.check().map(drop)
    }
}

/// A service-definition source answering `services`.
pub struct FakeServices {
    pub services: Arc<Mutex<Vec<ServiceDefinition>>>,
    pub generation: Arc<Mutex<u64>>,
}

impl PluginClient for FakeServices {
    fn plugin_name(&self) -> &str {
        "fake-services"
    }
    fn kind(&self) -> Kind {
        Kind::ServiceDefinitions
    }
    fn call(
        &self,
        op: PluginOp,
        _args: &str,
        decode: Decode,
    ) -> BoxFuture<Result<Box<dyn Any + Send>, CallError>> {
        let text = match op {
            PluginOp::Generation => lock(&self.generation).to_string(),
            _ => serde_json::to_string(&*lock(&self.services)).expect("serialisable"),
        };
        let op = op.as_str().to_owned();
        Box::pin(async move {
            decode_answer(&text, decode).map_err(|error| CallError::Failed {
                plugin: "fake-services".into(),
                op,
                error,
            })
        })
    }
    fn isolation(&self) -> crate::plugins::Isolation {
        crate::plugins::Isolation::InProcess
    }
    fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use warden_plugin_api::ContainerMatch;

    use super::*;
    use crate::plugins::slot::Slot;
    use crate::registrar::{Registrar, Source};

    /// `web` at `web.example`, its containers labelled `app=web`, in `web-elb`.
    fn web() -> ServiceDefinition {
        ServiceDefinition {
            name: "web".into(),
            matches: ContainerMatch {
                labels: BTreeMap::from([("app".into(), "web".into())]),
                ..Default::default()
            },
            frontends: vec!["web.example".into()],
            elb: Some("web-elb".into()),
            ..Default::default()
        }
    }

    struct World {
        docker: FakeDocker,
        routes: FakeRoutes,
        elbs: watch::Receiver<BTreeMap<String, crate::registrar::desired::ElbWant>>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    /// The registrar on fakes, with one source (`None`: a source not created yet).
    fn start(
        docker: FakeDocker,
        routes: FakeRoutes,
        services: Option<Vec<ServiceDefinition>>,
    ) -> World {
        let slot = match services {
            Some(list) => Slot::ready(
                "fake-services",
                Arc::new(FakeServices {
                    services: Arc::new(Mutex::new(list)),
                    generation: Arc::new(Mutex::new(1)),
                }),
            ),
            None => Slot::pending("fake-services"),
        };
        let (elbs_tx, elbs) = watch::channel(BTreeMap::new());
        let registrar = Registrar {
            docker: docker.clone(),
            sources: vec![Source {
                key: "registrar.sources[0] (fake)".into(),
                slot,
                grants: crate::grants::Grants::all(),
            }],
            facts: crate::grants::HostFacts::default(),
            routes: crate::registrar::redx::Routes::new(routes.clone()),
            resync: Duration::from_secs(30),
            drain_on_stop: true,
            elbs: Arc::new(elbs_tx),
            target_groups: Arc::new(watch::channel(BTreeMap::new()).0),
            ports: Arc::new(watch::channel(BTreeSet::new()).0),
            selector: None,
        };
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(registrar.run(shutdown));
        World {
            docker,
            routes,
            elbs,
            stop,
            task,
        }
    }

    /// Lets paused time run until `cond` holds, for at most `within` of it.
    async fn until_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {within:?} of paused time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Within 20 s: sooner than the 30 s resync, which would hide a missing re-list.
    async fn until(what: &str, cond: impl FnMut() -> bool) {
        until_within(what, Duration::from_secs(20), cond).await
    }

    impl World {
        fn routed(&self) -> BTreeSet<String> {
            self.routes.servers("web")
        }
        async fn stop(self) {
            self.stop.send_replace(true);
            self.task.await.unwrap();
        }
    }

    /// A registrar with the `web` service and one of its containers routed.
    async fn web_routed() -> World {
        let w = start(
            FakeDocker::default(),
            FakeRoutes::default(),
            Some(vec![web()]),
        );
        w.docker
            .start(container("a", &[("app", "web")], "172.17.0.2"));
        until("a routed", || w.routed().contains("172.17.0.2:80")).await;
        w
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_is_routed_and_a_lost_event_is_caught_by_the_relist_after_a_reconnect() {
        let w = web_routed().await;
        assert_eq!(
            w.routes
                .strings()
                .get("frontend:web.example")
                .map(String::as_str),
            Some("web")
        );

        // Docker goes away; while it is away a container starts, its event unheard.
        w.docker.go_down();
        w.docker
            .start_unheard(container("b", &[("app", "web")], "172.17.0.3"));
        let lists = w.docker.lists();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            w.docker.lists(),
            lists,
            "no list answered while Docker is down"
        );
        assert!(
            w.routed().contains("172.17.0.2:80"),
            "routes kept while Docker is away"
        );
        w.docker.come_back();
        until("b routed after the re-list", || {
            w.routed().contains("172.17.0.3:80")
        })
        .await;
        assert!(w.docker.lists() > lists);
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_with_backoff_until_it_lands() {
        let routes = FakeRoutes::default();
        let w = start(FakeDocker::default(), routes.clone(), Some(vec![web()]));
        until("the first reconcile at the route store", || {
            !routes.calls().is_empty()
        })
        .await;
        let from = routes.calls().len();
        routes.fail_next(4);
        w.docker
            .start(container("a", &[("app", "web")], "172.17.0.2"));
        // Sooner than the 2 s verification could repair it: the retries did.
        until_within(
            "a routed after the retries",
            Duration::from_millis(1900),
            || w.routed().contains("172.17.0.2:80"),
        )
        .await;
        let calls = routes.calls()[from..].to_vec();
        let gaps: Vec<Duration> = calls.windows(2).map(|p| p[1] - p[0]).collect();
        let retries: Vec<Duration> = gaps.into_iter().filter(|g| !g.is_zero()).collect();
        assert!(retries.len() >= 3, "retried: {retries:?}");
        assert!(
            retries.windows(2).take(3).all(|p| p[1] > p[0]),
            "each retry waits longer than the one before: {retries:?}"
        );
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_drifted_key_is_rewritten_by_the_verification() {
        let w = web_routed().await;
        w.routes.delete("frontend:web.example");
        until("front-end rewritten", || {
            w.routes.strings().contains_key("frontend:web.example")
        })
        .await;
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn routes_of_an_earlier_run_are_held_until_the_source_is_created() {
        let routes = FakeRoutes::default();
        routes.seed(&[
            Entry::server("web", "172.17.0.2:80"),
            Entry::key("frontend:web.example", "web"),
        ]);
        let w = start(FakeDocker::default(), routes, None);
        until("listed", || w.docker.lists() > 0).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            w.routes.writes(),
            0,
            "nothing written while a source has never answered"
        );
        assert!(w.routed().contains("172.17.0.2:80"));
        assert!(w.routes.strings().contains_key("frontend:web.example"));
        w.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_signal_drains_the_route_before_the_container_dies_and_a_lost_die_is_found_by_the_relist(
    ) {
        let mut w = start(
            FakeDocker::default(),
            FakeRoutes::default(),
            Some(vec![web()]),
        );
        until("first list", || w.docker.lists() > 0).await;
        w.docker
            .start(container("a", &[("app", "web")], "172.17.0.2"));
        w.docker
            .start(container("b", &[("app", "web")], "172.17.0.3"));
        until("both routed", || w.routed().len() == 2).await;
        let wanted = |elbs: &BTreeMap<String, crate::registrar::desired::ElbWant>| {
            elbs.get("web-elb").is_some_and(|e| e.wanted)
        };
        until("elb wanted", || wanted(&w.elbs.borrow_and_update())).await;

        w.docker.kill("a", "15");
        until("a drained", || {
            w.routed() == BTreeSet::from(["172.17.0.3:80".to_owned()])
        })
        .await;
        w.docker.die("a");

        // Docker away, and the last container dies unheard: the ELB membership stays
        // until the re-list after the reconnect shows it gone.
        w.docker.go_down();
        tokio::time::sleep(Duration::from_secs(3)).await;
        w.docker.die("b");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(wanted(&w.elbs.borrow()), "ELB kept while out of sync");
        w.docker.come_back();
        until("elb withdrawn after the re-list", || {
            !wanted(&w.elbs.borrow())
        })
        .await;
        w.stop().await;
    }
}
