//! What runs for the configuration in force: the metric sources (one [`Slot`] each), the
//! manager and the registrar, each loop given its clients and a stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use warden_plugin_api::Kind;

use super::{Part, DEFAULT_SOURCE, SHUTDOWN_LIMIT};
use crate::config::{Config, ManagedServiceConfig, PluginRef};
use crate::identity;
use crate::manager::ecs::AwsEcs;
use crate::manager::election::Timing;
use crate::manager::policy::Mapping;
use crate::manager::sources::{self as managed_sources, Definitions};
use crate::manager::worker::Plan;
use crate::manager::{ManagedService, Manager, Target};
use crate::plugins::slot::Slot;
use crate::plugins::{CallOptions, PluginHost};
use crate::registrar::{self, redx, Registrar};
use crate::supervisor::{Fatal, Supervisor};

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A service source's slot: created in the background like every plugin instance
/// ([`Slot`]: timeout, backoff by the error's kind, said while it hangs, re-created in a
/// process if it wedges); a source not yet created holds its services' routes.
fn source_slot(
    host: &Arc<PluginHost>,
    key: &str,
    r: &PluginRef,
    options: CallOptions,
    create_timeout: Duration,
    stop: watch::Receiver<bool>,
    fatal: mpsc::UnboundedSender<Fatal>,
) -> Slot {
    let options = CallOptions {
        isolation: r.isolation.unwrap_or(options.isolation),
        ..options
    };
    Slot::spawn(
        host.clone(),
        key,
        r,
        Kind::ServiceDefinitions,
        options,
        create_timeout,
        stop,
        fatal,
    )
}

/// Managed services, each with its metric (and mapping) plugin slot.
fn managed_services(
    services: &[ManagedServiceConfig],
    slots: &BTreeMap<String, Slot>,
) -> Result<Vec<ManagedService>, Fatal> {
    let checked = |what: String| Fatal::Config(format!("{what} (checked by the config)"));
    let mut out = Vec::new();
    for s in services {
        let target = match (&s.task_definition, &s.ecs_service) {
            (Some(t), _) => Target::Tasks {
                task_definition: t.clone(),
                family: crate::manager::ecs::family_of(t)
                    .map_err(|e| checked(format!("manager.services {}: {e}", s.name)))?
                    .to_owned(),
            },
            (None, Some(svc)) => Target::Service {
                service: svc.clone(),
            },
            (None, None) => return Err(checked(format!("manager.services {}: no target", s.name))),
        };
        let slot = |name: &str| {
            slots
                .get(name)
                .cloned()
                .ok_or_else(|| checked(format!("no [metrics.{name}]")))
        };
        out.push(ManagedService {
            name: s.name.clone(),
            cluster: s.cluster.clone(),
            target,
            metric: Arc::new(slot(&s.metric)?),
            mapper: match &s.mapping {
                Mapping::Plugin(name) => Some(Arc::new(slot(name)?)),
                _ => None,
            },
            mapping: s.mapping.clone(),
            policy: s.policy.clone(),
        });
    }
    Ok(out)
}

/// What starting the registrar needs that can fail, made before it is started.
pub(super) struct RegistrarInputs {
    docker: bollard::Docker,
    owner: String,
    selector: Option<registrar::store::Selector>,
}

/// A metric source's slot, with the stop of its creation loop.
pub(super) struct MetricSlot {
    pub(super) slot: Slot,
    stop: watch::Sender<bool>,
}

impl MetricSlot {
    pub(super) fn drop_now(self) {
        let _ = self.stop.send(true);
        if let Ok(c) = self.slot.get() {
            c.shutdown();
        }
    }
}

/// Everything running for the configuration in force.
pub(super) struct Running {
    pub(super) config: Config,
    pub(super) host: Arc<PluginHost>,
    pub(super) options: CallOptions,
    pub(super) me: identity::Identity,
    pub(super) sdk: Option<aws_config::SdkConfig>,
    pub(super) slots: BTreeMap<String, MetricSlot>,
    pub(super) plan: Option<watch::Sender<Plan>>,
    pub(super) registrar: Option<Part>,
    pub(super) fatal: mpsc::UnboundedSender<Fatal>,
    /// What `[[manager.sources]]` define, as last read.
    pub(super) defs: watch::Receiver<Definitions>,
    pub(super) defs_tx: Arc<watch::Sender<Definitions>>,
    /// Managed services from sources skipped, as last said (each said once).
    pub(super) skipped: BTreeSet<String>,
    /// Managed services from sources refused by their grants, as last said.
    pub(super) refused: BTreeSet<String>,
}

impl Running {
    pub(super) fn new(
        config: Config,
        host: Arc<PluginHost>,
        me: identity::Identity,
        fatal: mpsc::UnboundedSender<Fatal>,
        defs_tx: watch::Sender<Definitions>,
    ) -> Running {
        Running {
            options: CallOptions::from_config(&config.plugins),
            config,
            host,
            me,
            sdk: None,
            slots: BTreeMap::new(),
            plan: None,
            registrar: None,
            fatal,
            defs: defs_tx.subscribe(),
            defs_tx: Arc::new(defs_tx),
            skipped: BTreeSet::new(),
            refused: BTreeSet::new(),
        }
    }

    /// Starts every part of the configuration: metric sources (created in the
    /// background, with a timeout and retries: a plugin whose `new` hangs or fails holds
    /// up nothing else), the manager and the registrar.
    pub(super) async fn start(
        &mut self,
        global: &mut Supervisor,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Fatal> {
        // One AWS configuration for every client, loaded only when something needs AWS.
        self.ensure_sdk().await;
        for name in self.config.metrics.keys().cloned().collect::<Vec<_>>() {
            let slot = self.spawn_slot(&name, self.fatal.clone());
            self.slots.insert(name, slot);
        }
        self.start_manager(global, stop)?;
        self.start_registrar()?;
        tracing::info!(
            plugins = self.host.plugins().len(),
            failed = self.host.failures().len(),
            metrics = self.slots.len(),
            registrar = self.config.registrar.enabled,
            "warden running; waiting for SIGTERM or SIGINT (SIGHUP reloads the configuration)"
        );
        Ok(())
    }

    /// Stops everything within [`SHUTDOWN_LIMIT`] (said if some work did not end) and
    /// drops the metric sources.
    pub(super) async fn stop(&mut self, global: Supervisor) {
        let registrar = self.registrar.take();
        let registrar_stopped = async {
            match registrar {
                Some(part) => part.stop().await,
                None => true,
            }
        };
        let (a, b) = tokio::join!(global.join(SHUTDOWN_LIMIT), registrar_stopped);
        if !(a && b) {
            tracing::warn!(
                limit = %crate::logs::humantime(SHUTDOWN_LIMIT),
                "some work did not end in time; exiting anyway"
            );
        }
        for (_, s) in std::mem::take(&mut self.slots) {
            s.drop_now();
        }
    }

    pub(super) fn slot_map(&self) -> BTreeMap<String, Slot> {
        self.slots
            .iter()
            .map(|(n, s)| (n.clone(), s.slot.clone()))
            .collect()
    }

    pub(super) fn spawn_slot(&self, name: &str, fatal: mpsc::UnboundedSender<Fatal>) -> MetricSlot {
        let r = &self.config.metrics[name];
        let options = CallOptions {
            isolation: r.isolation.unwrap_or(self.options.isolation),
            ..self.options
        };
        let (stop, stop_rx) = watch::channel(false);
        let slot = Slot::spawn(
            self.host.clone(),
            &format!("metrics.{name}"),
            r,
            Kind::MetricSource,
            options,
            Duration::from_millis(self.config.plugins.create_timeout_ms),
            stop_rx,
            fatal,
        );
        MetricSlot { slot, stop }
    }

    fn plan_now(&mut self) -> Result<Plan, Fatal> {
        let slots = self.slot_map();
        self.plan_with(&slots)
    }

    /// The plan for the managed services of the configuration in `self`, with `slots`
    /// as their metric sources; says newly skipped or refused services once.
    pub(super) fn plan_with(&mut self, slots: &BTreeMap<String, Slot>) -> Result<Plan, Fatal> {
        let m = &self.config.manager;
        let grants = |key: &str| {
            key.strip_prefix("manager.sources[")
                .and_then(|k| k.strip_suffix(']'))
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| m.sources.get(i))
                .and_then(|r| r.grants.clone())
                .unwrap_or_else(|| self.config.grants.clone())
        };
        let merged = managed_sources::merge(
            &m.services,
            &self.defs.borrow(),
            &self.config.metrics,
            &grants,
        );
        let services = merged.services;
        let skipped: BTreeSet<String> = merged.skipped.into_iter().collect();
        for line in skipped.difference(&self.skipped) {
            tracing::error!("managed service skipped: {line}");
        }
        self.skipped = skipped;
        let refused: BTreeSet<String> = merged.refused.iter().map(ToString::to_string).collect();
        for line in refused.difference(&self.refused) {
            tracing::warn!("{line}");
        }
        self.refused = refused;
        let metrics = crate::metrics::get();
        metrics
            .grant_refusals
            .get_or_create(&crate::metrics::PartLabel {
                part: "manager".into(),
            })
            .set(merged.refused.len() as i64);
        metrics.set_refused("manager", self.refused.iter().cloned().collect());
        crate::metrics::get().retain_managed(&services.iter().map(|s| s.name.clone()).collect());
        Ok(Plan {
            services: managed_services(&services, slots)?,
            loop_interval: Duration::from_secs(m.loop_secs),
            dry_run: m.dry_run,
            refused: merged.refused,
        })
    }

    /// What the grant checks know of this host: the router's ports (and warden's own),
    /// and the names and addresses that are this host's.
    fn host_facts(&self) -> crate::grants::HostFacts {
        let mut reserved: BTreeSet<u16> = self
            .config
            .registrar
            .reserved_ports
            .iter()
            .copied()
            .collect();
        if let Ok(Some(addr)) = self.config.http.addr() {
            reserved.insert(addr.port());
        }
        let mut names = BTreeSet::from([hostname().to_ascii_lowercase()]);
        names.extend(self.config.host.private_ip.clone());
        crate::grants::HostFacts {
            reserved_ports: reserved,
            own_names: names,
        }
    }

    pub(super) async fn ensure_sdk(&mut self) {
        let needs_aws = self.config.manager.central_redis.is_some()
            || (self.config.registrar.enabled && self.me.instance_id.is_some());
        if needs_aws && self.sdk.is_none() {
            self.sdk = Some(crate::aws::load(self.me.availability_zone.as_deref()).await);
        }
    }

    fn start_manager(
        &mut self,
        global: &mut Supervisor,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Fatal> {
        let (Some(url), Some(sdk)) = (self.config.manager.central_redis.clone(), self.sdk.clone())
        else {
            return Ok(());
        };
        let plan = self.plan_now()?;
        let m = &self.config.manager;
        // A quarter lease: a renewal that times out is tried again on a new connection
        // and still lands before the leader's deadline (lease − 25 %).
        let quarter = Duration::from_millis(m.lease_ms / 4);
        let central = crate::redis_link::Endpoint::new(
            &url,
            m.central_redis_ca_file.as_deref(),
            crate::redis_link::Timeouts {
                connect: quarter,
                response: quarter,
            },
        )
        .map_err(|e| {
            Fatal::Config(format!(
                "manager.central_redis {}: {e}",
                crate::redis_util::addr(&url)
            ))
        })?;
        let id = self.me.instance_id.clone().unwrap_or_else(hostname);
        let (plan_tx, plan_rx) = watch::channel(plan);
        let manager = Manager {
            id: id.clone(),
            az: self
                .me
                .availability_zone
                .clone()
                .unwrap_or_else(|| "unknown".into()),
            central: Arc::new(central),
            min_replicas: m.central_min_replicas,
            timing: Timing {
                lease: Duration::from_millis(m.lease_ms),
                tick: Duration::from_millis(m.tick_ms),
                guard: Duration::from_millis(m.guard_ms),
            },
            plan: plan_rx,
            ecs: Some(AwsEcs::new(&sdk)),
            ec2: ec2_client(&sdk),
        };
        tracing::info!(instance = %id, services = m.services.len(), dry_run = m.dry_run, "manager started");
        if !m.sources.is_empty() {
            self.follow_sources(global, stop.clone());
        }
        global.spawn("manager", move || manager.clone().run(stop.clone()));
        self.plan = Some(plan_tx);
        Ok(())
    }

    /// Follows `[[manager.sources]]`: each a slot (created in the background), polled.
    fn follow_sources(&self, global: &mut Supervisor, stop: watch::Receiver<bool>) {
        let keyed: Vec<(String, Slot)> = self
            .source_slots(&self.config.manager.sources, &stop, |i, _| {
                format!("manager.sources[{i}]")
            })
            .into_iter()
            .map(|(key, _, slot)| (key, slot))
            .collect();
        let tx = self.defs_tx.clone();
        global.spawn("manager sources", move || {
            managed_sources::run(keyed.clone(), tx.clone(), SOURCES_EVERY, stop.clone())
        });
    }

    /// Publishes the plan again after a source's list changed.
    pub(super) fn sources_changed(&mut self) {
        if self.plan.is_none() {
            return;
        }
        match self.plan_now() {
            Ok(plan) => {
                if let Some(tx) = &self.plan {
                    tx.send_replace(plan);
                }
            }
            Err(e) => tracing::error!("managed services not updated: {e}"),
        }
    }

    fn start_registrar(&mut self) -> Result<(), Fatal> {
        if !self.config.registrar.enabled {
            return Ok(());
        }
        let inputs = self.registrar_inputs(&self.config)?;
        self.launch_registrar(inputs);
        Ok(())
    }

    /// What starting the registrar with `config` needs and can fail at: checked before
    /// a reload stops anything, so that a reload that cannot start it refuses whole.
    pub(super) fn registrar_inputs(&self, config: &Config) -> Result<RegistrarInputs, Fatal> {
        let r = &config.registrar;
        let docker = bollard::Docker::connect_with_defaults().map_err(|e| {
            Fatal::Config(format!(
                "cannot set up the Docker client (DOCKER_HOST?): {e}"
            ))
        })?;
        let owner = self.me.instance_id.clone().unwrap_or_else(hostname);
        redx::RedisStore::new(&r.local_redis, r.local_redis_ca_file.as_deref(), &owner)
            .map_err(|e| Fatal::Config(format!("registrar.local_redis: {e}")))?;
        let selector = r
            .require_label
            .as_deref()
            .map(registrar::store::Selector::parse)
            .transpose()
            .map_err(|e| Fatal::Config(format!("registrar.require_label: {e}")))?;
        Ok(RegistrarInputs {
            docker,
            owner,
            selector,
        })
    }

    /// Starts the registrar's loops with the current configuration; nothing here fails.
    pub(super) fn launch_registrar(&mut self, inputs: RegistrarInputs) {
        let RegistrarInputs {
            docker,
            owner,
            selector,
        } = inputs;
        let part = Part::new(self.fatal.clone());
        let r = &self.config.registrar;
        let (local_redis, local_ca) = (r.local_redis.clone(), r.local_redis_ca_file.clone());
        let (elb_tx, elb_rx) = watch::channel(BTreeMap::new());
        let (tg_tx, tg_rx) = watch::channel(BTreeMap::new());
        let (ports_tx, ports_rx) = watch::channel(BTreeSet::new());
        let (elb_tx, tg_tx, ports_tx) = (Arc::new(elb_tx), Arc::new(tg_tx), Arc::new(ports_tx));
        let mut sup = part.sup;
        let stop_rx = part.stop.subscribe();
        if let Some(file) = r.router_ports_file.clone() {
            let (pid, stop) = (r.router_pid_file.clone(), stop_rx.clone());
            sup.spawn("router ports", move || {
                registrar::router::run(file.clone(), pid.clone(), ports_rx.clone(), stop.clone())
            });
        }
        self.spawn_membership(&mut sup, &stop_rx, elb_rx, tg_rx);
        let sources = self.registrar_sources(&stop_rx);
        let facts = self.host_facts();
        let resync = Duration::from_secs(r.resync_secs);
        let drain_on_stop = r.drain_on_stop;
        tracing::info!(owner = %owner, sources = sources.len(), "registrar started");
        sup.spawn("registrar", move || {
            let (sources, facts, stop) = (sources.clone(), facts.clone(), stop_rx.clone());
            let (docker, owner, local_redis, local_ca, selector) = (
                docker.clone(),
                owner.clone(),
                local_redis.clone(),
                local_ca.clone(),
                selector.clone(),
            );
            let (elbs, target_groups, ports) = (elb_tx.clone(), tg_tx.clone(), ports_tx.clone());
            async move {
                let Ok(store) = redx::RedisStore::new(&local_redis, local_ca.as_deref(), &owner)
                else {
                    return;
                };
                Registrar {
                    docker,
                    sources,
                    facts,
                    routes: redx::Routes::new(store),
                    resync,
                    drain_on_stop,
                    elbs,
                    target_groups,
                    ports,
                    selector,
                }
                .run(stop)
                .await
            }
        });
        self.registrar = Some(Part {
            stop: part.stop,
            sup,
        });
    }

    /// The classic ELB and target group membership loops, on a host that knows its
    /// instance id and has AWS.
    fn spawn_membership(
        &self,
        sup: &mut Supervisor,
        stop: &watch::Receiver<bool>,
        elbs: watch::Receiver<BTreeMap<String, registrar::desired::ElbWant>>,
        groups: watch::Receiver<
            BTreeMap<registrar::desired::TargetGroupKey, registrar::desired::ElbWant>,
        >,
    ) {
        let (Some(instance), Some(sdk)) = (self.me.instance_id.clone(), &self.sdk) else {
            return;
        };
        let clients = warden_aws_query::elb::Elb::new(sdk, AWS_CALL_TIMEOUT).and_then(|elb| {
            Ok((
                elb,
                warden_aws_query::elbv2::Elbv2::new(sdk, AWS_CALL_TIMEOUT)?,
            ))
        });
        let (elb, elbv2) = match clients {
            Ok((a, b)) => (Arc::new(a), Arc::new(b)),
            Err(e) => {
                tracing::error!(error = %e, "no load balancer membership: the ELB clients cannot be set up");
                return;
            }
        };
        let (client, stop_elb, id) = (elb, stop.clone(), instance.clone());
        sup.spawn("elb membership", move || {
            let classic = registrar::elb::Classic {
                client: client.clone(),
                instance: id.clone(),
            };
            registrar::elb::run(classic, elbs.clone(), stop_elb.clone())
        });
        let client = elbv2;
        let (stop, ip) = (stop.clone(), self.config.host.private_ip.clone());
        sup.spawn("target group membership", move || {
            let lbs = registrar::target_group::TargetGroups::new(
                client.clone(),
                instance.clone(),
                ip.clone(),
            );
            registrar::elb::run(lbs, groups.clone(), stop.clone())
        });
    }

    /// The registrar's service sources (the default one when none is configured), each
    /// created once in the background; a restarted loop reuses them.
    fn registrar_sources(&self, stop: &watch::Receiver<bool>) -> Vec<registrar::Source> {
        let r = &self.config.registrar;
        let refs = if r.sources.is_empty() {
            vec![PluginRef::new(DEFAULT_SOURCE)]
        } else {
            r.sources.clone()
        };
        self.source_slots(&refs, stop, |i, s| {
            format!("registrar.sources[{i}] ({})", s.plugin)
        })
        .into_iter()
        .map(|(key, s, slot)| registrar::Source {
            key,
            slot,
            grants: s
                .grants
                .clone()
                .unwrap_or_else(|| self.config.grants.clone()),
        })
        .collect()
    }

    /// A slot for each service source of `refs`, keyed by `key`.
    fn source_slots<'r>(
        &self,
        refs: &'r [PluginRef],
        stop: &watch::Receiver<bool>,
        key: impl Fn(usize, &PluginRef) -> String,
    ) -> Vec<(String, &'r PluginRef, Slot)> {
        let create_timeout = Duration::from_millis(self.config.plugins.create_timeout_ms);
        refs.iter()
            .enumerate()
            .map(|(i, r)| {
                let key = key(i, r);
                let slot = source_slot(
                    &self.host,
                    &key,
                    r,
                    self.options,
                    create_timeout,
                    stop.clone(),
                    self.fatal.clone(),
                );
                (key, r, slot)
            })
            .collect()
    }
}

/// The longest one ELB or ELBv2 call may take (the loop tries again after it).
const AWS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `[[manager.sources]]` are asked whether their services changed.
const SOURCES_EVERY: Duration = Duration::from_secs(2);

/// The AZ check's EC2 client; without one (no region) every AZ counts as available,
/// said once.
fn ec2_client(sdk: &aws_config::SdkConfig) -> Option<Arc<warden_aws_query::Ec2>> {
    match warden_aws_query::Ec2::new(sdk, Duration::from_secs(5)) {
        Ok(ec2) => Some(Arc::new(ec2)),
        Err(e) => {
            tracing::warn!(error = %e, "AZ check off: every availability zone counts as available");
            None
        }
    }
}
