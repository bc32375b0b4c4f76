//! `warden run`: wires the parts together and runs them until shutdown.
//!
//! Each loop gets its clients and a shutdown receiver; nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use warden_plugin_api::Kind;

use crate::config::{Config, ManagedServiceConfig, PluginRef, PluginsConfig};
use crate::identity;
use crate::manager::ecs::AwsEcs;
use crate::manager::election::Timing;
use crate::manager::policy::Mapping;
use crate::manager::sources::{self as managed_sources, Definitions};
use crate::manager::worker::Plan;
use crate::manager::{ManagedService, Manager, Target};
use crate::metrics::Dependency;
use crate::plugins::slot::Slot;
use crate::plugins::{CallOptions, CreateError, PluginHost};
use crate::registrar::{self, redx, Registrar};
use crate::supervisor::{Fatal, Supervisor};

/// The plugin that gives service definitions when none is configured.
pub const DEFAULT_SOURCE: &str = "docker-labels";

fn hostname() -> String {
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
) -> anyhow::Result<Vec<ManagedService>> {
    let mut out = Vec::new();
    for s in services {
        let target = match (&s.task_definition, &s.ecs_service) {
            (Some(t), _) => Target::Tasks {
                task_definition: t.clone(),
                family: crate::manager::ecs::family_of(t)
                    .map_err(anyhow::Error::msg)?
                    .to_owned(),
            },
            (None, Some(svc)) => Target::Service {
                service: svc.clone(),
            },
            (None, None) => anyhow::bail!(
                "manager.services {}: no target (checked by the config)",
                s.name
            ),
        };
        let slot = |name: &str| {
            slots
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no [metrics.{name}] (checked by the config)"))
        };
        out.push(ManagedService {
            name: s.name.clone(),
            cluster: s.cluster.clone(),
            target,
            metric: slot(&s.metric)?,
            mapper: match &s.mapping {
                Mapping::Plugin(name) => Some(slot(name)?),
                _ => None,
            },
            mapping: s.mapping.clone(),
            policy: s.policy.clone(),
        });
    }
    Ok(out)
}

/// The plugins of the plugin directories, as a configuration loads them: pins checked,
/// isolated children started as `[plugins]` says (an unknown `isolation_user` is a
/// problem [`problems`] reports; the children then run as warden's own user).
pub fn load_plugins(config: &Config, insecure: bool) -> PluginHost {
    let p = &config.plugins;
    let mut host = PluginHost::load_dirs_pinned(&p.dirs, insecure || p.allow_insecure, &p.sha256);
    host.set_child_policy(crate::plugins::isolated::ChildPolicy {
        user: p
            .isolation_user
            .as_deref()
            .and_then(|u| crate::plugins::isolated::ChildUser::lookup(u).ok()),
        memory_mb: p.isolation_memory_mb,
    });
    host.set_in_process_dirs(&p.in_process_dirs);
    host
}

/// What makes a configuration unable to work, one line each: the same checks for
/// `warden check` and before `warden run` starts anything.
pub fn problems(config: &Config, host: &PluginHost) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(u) = &config.plugins.isolation_user {
        if let Err(e) = crate::plugins::isolated::ChildUser::lookup(u) {
            out.push(format!("plugins.isolation_user: {e}"));
        }
    }
    for name in config.plugins.sha256.keys() {
        if host.find(name).is_none() {
            let why = host
                .failures()
                .iter()
                .find(|f| f.reason.contains(&format!("{name:?}")))
                .map_or(String::new(), |f| format!(" ({f})"));
            out.push(format!(
                "plugins.sha256.{name}: no plugin of that name is loaded{why}"
            ));
        }
    }
    if config.plugins.dirs != PluginsConfig::default().dirs {
        for d in &config.plugins.dirs {
            if !d.is_dir() {
                out.push(format!(
                    "plugins.dirs: {} does not exist or is not a directory",
                    d.display()
                ));
            }
        }
    }
    let failed_loads = || {
        host.failures()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    for (key, kind, r) in config.plugin_refs() {
        if let Err(e) = host.check_config(&r.plugin, kind, &r.config) {
            let mut line = format!("{key}: {e}");
            if matches!(e, CreateError::UnknownPlugin { .. }) && !host.failures().is_empty() {
                line.push_str(&format!(" (files not loaded: {})", failed_loads()));
            }
            out.push(line);
        }
    }
    let tls = [
        (
            "registrar.local_redis_ca_file",
            Some(&config.registrar.local_redis),
            &config.registrar.local_redis_ca_file,
        ),
        (
            "manager.central_redis_ca_file",
            config.manager.central_redis.as_ref(),
            &config.manager.central_redis_ca_file,
        ),
    ];
    for (key, url, ca) in tls {
        if let (Some(url), Some(ca)) = (url, ca) {
            let t = crate::redis_link::Timeouts {
                connect: Duration::from_secs(1),
                response: Duration::from_secs(1),
            };
            if let Err(e) = crate::redis_link::Endpoint::new(url, Some(ca), t) {
                out.push(format!("{key}: {e}"));
            }
        }
    }
    if config.registrar.enabled && config.registrar.sources.is_empty() {
        if let Err(e) = host.check_config(
            DEFAULT_SOURCE,
            Kind::ServiceDefinitions,
            &serde_json::json!({}),
        ) {
            out.push(format!(
                "registrar: enabled with no [[registrar.sources]], and the default source cannot be used: {e}; on a host that runs only the manager, set registrar.enabled = false"
            ));
        }
    }
    out
}

/// What a reload does, decided from the running and the new configuration (pure).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadPlan {
    /// Restart the registrar's loops (routes stay in Redis and are verified again).
    pub registrar: RegistrarChange,
    /// Metric sources to create (new or changed) and to drop.
    pub metrics_new: Vec<String>,
    pub metrics_gone: Vec<String>,
    /// The managed services, loop interval or dry-run changed.
    pub services: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistrarChange {
    #[default]
    Same,
    Start,
    Restart,
    Stop,
}

impl ReloadPlan {
    pub fn is_empty(&self) -> bool {
        *self == ReloadPlan::default()
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.registrar {
            RegistrarChange::Same => {}
            RegistrarChange::Start => parts.push("registrar started".to_owned()),
            RegistrarChange::Restart => parts.push("registrar restarted".to_owned()),
            RegistrarChange::Stop => parts.push("registrar stopped".to_owned()),
        }
        if !self.metrics_new.is_empty() {
            parts.push(format!(
                "metric sources created: {}",
                self.metrics_new.join(", ")
            ));
        }
        if !self.metrics_gone.is_empty() {
            parts.push(format!(
                "metric sources dropped: {}",
                self.metrics_gone.join(", ")
            ));
        }
        if self.services {
            parts.push("managed services replaced".to_owned());
        }
        if parts.is_empty() {
            "nothing changed".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

/// The dotted keys under `at` whose values differ between `old` and `new` (a key
/// present in one only counts as changed; arrays are compared whole).
fn changed_keys<T: serde::Serialize>(at: &str, old: &T, new: &T, out: &mut Vec<String>) {
    fn walk(at: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (old, new) {
            (Object(a), Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                let null = serde_json::Value::Null;
                for k in keys {
                    let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
                    walk(&format!("{at}.{k}"), x, y, out);
                }
            }
            (a, b) if a != b => out.push(at.to_owned()),
            _ => {}
        }
    }
    let value = |t: &T| serde_json::to_value(t).unwrap_or(serde_json::Value::Null);
    walk(at, &value(old), &value(new), out);
}

/// What starting the registrar needs that can fail, made before it is started.
struct RegistrarInputs {
    docker: bollard::Docker,
    owner: String,
    selector: Option<registrar::store::Selector>,
}

/// Decides a reload, or says which changed settings need a restart (then nothing is
/// applied: a reload is all or nothing). `dirs_loaded_new` is true when the plugin
/// directories hold files that were not loaded before.
pub fn plan_reload(
    old: &Config,
    new: &Config,
    new_plugin_files: bool,
) -> Result<ReloadPlan, String> {
    let mut restart = Vec::new();
    changed_keys("host", &old.host, &new.host, &mut restart);
    changed_keys("http", &old.http, &new.http, &mut restart);
    let without_dirs = |c: &Config| PluginsConfig {
        dirs: Vec::new(),
        ..c.plugins.clone()
    };
    changed_keys(
        "plugins",
        &without_dirs(old),
        &without_dirs(new),
        &mut restart,
    );
    let (o, n) = (&old.manager, &new.manager);
    for (key, changed) in [
        ("manager.central_redis", o.central_redis != n.central_redis),
        (
            "manager.central_redis_ca_file",
            o.central_redis_ca_file != n.central_redis_ca_file,
        ),
        (
            "manager.central_min_replicas",
            o.central_min_replicas != n.central_min_replicas,
        ),
        ("manager.lease_ms", o.lease_ms != n.lease_ms),
        ("manager.tick_ms", o.tick_ms != n.tick_ms),
        ("manager.guard_ms", o.guard_ms != n.guard_ms),
        ("manager.sources", o.sources != n.sources),
    ] {
        if changed {
            restart.push(key.to_owned());
        }
    }
    if !restart.is_empty() {
        return Err(format!(
            "these settings take effect only at a restart: {}",
            restart.join(", ")
        ));
    }
    let registrar = match (old.registrar.enabled, new.registrar.enabled) {
        (false, true) => RegistrarChange::Start,
        (true, false) => RegistrarChange::Stop,
        (true, true)
            if old.registrar != new.registrar
                || old.plugins.dirs != new.plugins.dirs
                || new_plugin_files =>
        {
            RegistrarChange::Restart
        }
        _ => RegistrarChange::Same,
    };
    let metrics_new = new
        .metrics
        .iter()
        .filter(|(n, r)| old.metrics.get(*n) != Some(r))
        .map(|(n, _)| n.clone())
        .collect();
    let metrics_gone = old
        .metrics
        .keys()
        .filter(|n| !new.metrics.contains_key(*n) || old.metrics.get(*n) != new.metrics.get(*n))
        .cloned()
        .collect();
    let (a, b) = (&old.manager, &new.manager);
    let services = a.services != b.services || a.loop_secs != b.loop_secs || a.dry_run != b.dry_run;
    Ok(ReloadPlan {
        registrar,
        metrics_new,
        metrics_gone,
        services,
    })
}

/// The dependencies `/readyz` waits for, by the parts a configuration runs.
fn required_for(config: &Config) -> Vec<Dependency> {
    let mut required = Vec::new();
    if config.registrar.enabled {
        required.extend([
            Dependency::Docker,
            Dependency::LocalRedis,
            Dependency::ServiceSources,
        ]);
    }
    if config.manager.central_redis.is_some() {
        required.push(Dependency::CentralRedis);
    }
    required
}

/// A group of loops under one supervisor with a stop of its own, so that a reload can
/// replace it while the others run on.
struct Part {
    stop: watch::Sender<bool>,
    sup: Supervisor,
}

impl Part {
    fn new(fatal: mpsc::UnboundedSender<Fatal>) -> Part {
        let (stop, rx) = watch::channel(false);
        Part {
            sup: Supervisor::new(fatal, rx),
            stop,
        }
    }
    /// Stops the loops; false if some did not end within the limit.
    async fn stop(self) -> bool {
        let _ = self.stop.send(true);
        self.sup.join(SHUTDOWN_LIMIT).await
    }
}

/// A metric source's slot, with the stop of its creation loop.
struct MetricSlot {
    slot: Slot,
    stop: watch::Sender<bool>,
}

impl MetricSlot {
    fn drop_now(self) {
        let _ = self.stop.send(true);
        if let Ok(c) = self.slot.get() {
            c.shutdown();
        }
    }
}

/// Everything running for the configuration in force.
struct Running {
    config: Config,
    host: Arc<PluginHost>,
    options: CallOptions,
    me: identity::Identity,
    sdk: Option<aws_config::SdkConfig>,
    slots: BTreeMap<String, MetricSlot>,
    plan: Option<watch::Sender<Plan>>,
    registrar: Option<Part>,
    fatal: mpsc::UnboundedSender<Fatal>,
    /// What `[[manager.sources]]` define, as last read.
    defs: watch::Receiver<Definitions>,
    defs_tx: Arc<watch::Sender<Definitions>>,
    /// Managed services from sources skipped, as last said (each said once).
    skipped: BTreeSet<String>,
    /// Managed services from sources refused by their grants, as last said.
    refused: BTreeSet<String>,
}

impl Running {
    fn slot_map(&self) -> BTreeMap<String, Slot> {
        self.slots
            .iter()
            .map(|(n, s)| (n.clone(), s.slot.clone()))
            .collect()
    }

    fn spawn_slot(&self, name: &str, fatal: mpsc::UnboundedSender<Fatal>) -> MetricSlot {
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
            services: managed_services(&services, &self.slot_map())
                .map_err(|e| Fatal::Config(e.to_string()))?,
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

    async fn ensure_sdk(&mut self) {
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
        let create_timeout = Duration::from_millis(self.config.plugins.create_timeout_ms);
        let keyed: Vec<(String, Slot)> = self
            .config
            .manager
            .sources
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = format!("manager.sources[{i}]");
                let slot = source_slot(
                    &self.host,
                    &key,
                    r,
                    self.options,
                    create_timeout,
                    stop.clone(),
                    self.fatal.clone(),
                );
                (key, slot)
            })
            .collect();
        let tx = self.defs_tx.clone();
        global.spawn("manager sources", move || {
            managed_sources::run(keyed.clone(), tx.clone(), SOURCES_EVERY, stop.clone())
        });
    }

    /// Publishes the plan again after a source's list changed.
    fn sources_changed(&mut self) {
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
    fn registrar_inputs(&self, config: &Config) -> Result<RegistrarInputs, Fatal> {
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
    fn launch_registrar(&mut self, inputs: RegistrarInputs) {
        let RegistrarInputs {
            docker,
            owner,
            selector,
        } = inputs;
        let part = Part::new(self.fatal.clone());
        let r = &self.config.registrar;
        let local_redis = r.local_redis.clone();
        let local_ca = r.local_redis_ca_file.clone();
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
        if let (Some(instance), Some(sdk)) = (self.me.instance_id.clone(), &self.sdk) {
            let client = aws_sdk_elasticloadbalancing::Client::new(sdk);
            let (stop, id) = (stop_rx.clone(), instance.clone());
            sup.spawn("elb membership", move || {
                let classic = registrar::elb::Classic {
                    client: client.clone(),
                    instance: id.clone(),
                };
                registrar::elb::run(classic, elb_rx.clone(), stop.clone())
            });
            let client = aws_sdk_elasticloadbalancingv2::Client::new(sdk);
            let (stop, ip) = (stop_rx.clone(), self.config.host.private_ip.clone());
            sup.spawn("target group membership", move || {
                let groups = registrar::target_group::TargetGroups::new(
                    client.clone(),
                    instance.clone(),
                    ip.clone(),
                );
                registrar::elb::run(groups, tg_rx.clone(), stop.clone())
            });
        }
        let refs = if r.sources.is_empty() {
            vec![PluginRef::new(DEFAULT_SOURCE)]
        } else {
            r.sources.clone()
        };
        let create_timeout = Duration::from_millis(self.config.plugins.create_timeout_ms);
        // Each source is created once, in the background; a restarted loop reuses it.
        let sources: Vec<registrar::Source> = refs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = format!("registrar.sources[{i}] ({})", s.plugin);
                let slot = source_slot(
                    &self.host,
                    &key,
                    s,
                    self.options,
                    create_timeout,
                    stop_rx.clone(),
                    self.fatal.clone(),
                );
                registrar::Source {
                    key,
                    slot,
                    grants: s
                        .grants
                        .clone()
                        .unwrap_or_else(|| self.config.grants.clone()),
                }
            })
            .collect();
        let facts = self.host_facts();
        let resync = Duration::from_secs(r.resync_secs);
        let drain_on_stop = r.drain_on_stop;
        let stop = stop_rx.clone();
        tracing::info!(owner = %owner, sources = sources.len(), "registrar started");
        sup.spawn("registrar", move || {
            let (sources, facts, stop) = (sources.clone(), facts.clone(), stop.clone());
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

    /// Re-reads the configuration and applies what changed, or refuses the whole of it.
    async fn reload(&mut self, path: Option<&Path>, insecure: bool) -> Result<ReloadPlan, String> {
        // Every problem, on the one line of the refusal.
        let new = Config::load(path, |k| std::env::var(k).ok())
            .map_err(|e| e.to_string().replace('\n', "; "))?;
        let host = Arc::new(load_plugins(&new, insecure));
        let found = problems(&new, &host);
        if !found.is_empty() {
            return Err(found.join("; "));
        }
        let loaded = |h: &PluginHost| -> BTreeSet<PathBuf> {
            h.plugins().iter().map(|p| p.path().to_path_buf()).collect()
        };
        let new_files = !loaded(&host).is_subset(&loaded(&self.host));
        let plan = plan_reload(&self.config, &new, new_files)?;
        // Whatever can fail in starting the new registrar, before anything is stopped.
        let registrar_inputs = match plan.registrar {
            RegistrarChange::Restart | RegistrarChange::Start if new.registrar.enabled => Some(
                self.registrar_inputs(&new)
                    .map_err(|e| format!("the registrar could not start: {e}"))?,
            ),
            _ => None,
        };
        let old = std::mem::replace(&mut self.config, new);
        let old_host = std::mem::replace(&mut self.host, host);
        // New metric sources first: one whose plugin refuses its configuration at once
        // refuses the reload, and the running sources stay.
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
        let mut created = BTreeMap::new();
        for name in &plan.metrics_new {
            created.insert(name.clone(), self.spawn_slot(name, probe_tx.clone()));
        }
        let limit = Duration::from_millis(self.config.plugins.create_timeout_ms.min(10_000));
        for s in created.values() {
            s.slot.first_attempt(limit).await;
        }
        if let Ok(refused) = probe_rx.try_recv() {
            for (_, s) in created {
                s.drop_now();
            }
            self.config = old;
            self.host = old_host;
            return Err(refused.to_string());
        }
        let gone: Vec<MetricSlot> = plan
            .metrics_gone
            .iter()
            .filter_map(|n| self.slots.remove(n))
            .collect();
        self.slots.extend(created);
        self.ensure_sdk().await;
        let replan = plan.services || !plan.metrics_new.is_empty() || !plan.metrics_gone.is_empty();
        if replan && self.plan.is_some() {
            let now = self.plan_now().map_err(|e| e.to_string())?;
            if let Some(tx) = &self.plan {
                tx.send_replace(now);
            }
        }
        // Dropped only once the loops use the new sources.
        for s in gone {
            s.drop_now();
        }
        if matches!(
            plan.registrar,
            RegistrarChange::Restart | RegistrarChange::Stop
        ) {
            if let Some(part) = self.registrar.take() {
                if !part.stop().await {
                    tracing::warn!(
                        "the registrar's loops did not end in time; starting the new ones anyway"
                    );
                }
            }
        }
        if let Some(inputs) = registrar_inputs {
            self.launch_registrar(inputs);
        }
        crate::metrics::get().set_required(required_for(&self.config));
        Ok(plan)
    }
}

/// Runs warden until `shutdown` resolves, or a fatal condition ends it. Each message on
/// `reload` (SIGHUP) re-reads `path` and applies it, or refuses it whole.
pub async fn run(
    config: Config,
    path: Option<PathBuf>,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<()>,
) -> Result<(), Fatal> {
    let host = Arc::new(load_plugins(&config, insecure));
    let found = problems(&config, &host);
    if !found.is_empty() {
        return Err(Fatal::Config(found.join("\n")));
    }
    if insecure || config.plugins.allow_insecure {
        tracing::warn!(
            "plugins are loaded WITHOUT their permission checks (--allow-insecure-plugins or plugins.allow_insecure): anyone who can write a plugin file or directory can run code as warden; for development only"
        );
        crate::metrics::get().plugins_insecure.set(1);
    }
    let options = CallOptions::from_config(&config.plugins);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor::new(fatal_tx.clone(), stop_rx.clone());
    let me = identity::resolve(&config.host).await;
    let listener = match config
        .http
        .addr()
        .map_err(|m| Fatal::Config(format!("http.listen: {m}")))?
    {
        Some(addr) => Some(Arc::new(
            crate::http::bind(addr).await.map_err(Fatal::Config)?,
        )),
        None => None,
    };
    crate::metrics::get().set_required(required_for(&config));
    if let Some(listener) = listener {
        let info = Arc::new(crate::http::HostInfo {
            instance_id: me.instance_id.clone().unwrap_or_else(hostname),
            availability_zone: me.availability_zone.clone(),
            registrar: config.registrar.enabled,
            central_redis: config.manager.central_redis.clone(),
            central_redis_ca_file: config.manager.central_redis_ca_file.clone(),
            insecure_plugins: insecure || config.plugins.allow_insecure,
            ..Default::default()
        });
        tracing::info!(addr = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "http endpoint listening: /livez /readyz /status /metrics");
        let stop = stop_rx.clone();
        sup.spawn("http", move || {
            crate::http::serve(listener.clone(), info.clone(), stop.clone())
        });
    }
    let (defs_tx, mut defs_rx) = watch::channel(Definitions::new());
    let mut running = Running {
        config,
        host,
        options,
        me,
        sdk: None,
        slots: BTreeMap::new(),
        plan: None,
        registrar: None,
        fatal: fatal_tx.clone(),
        defs: defs_rx.clone(),
        defs_tx: Arc::new(defs_tx),
        skipped: BTreeSet::new(),
        refused: BTreeSet::new(),
    };
    // One AWS configuration for every client, loaded only when something needs AWS.
    running.ensure_sdk().await;
    // Metric sources are created in the background, with a timeout and retries: a plugin
    // whose `new` hangs or fails holds up nothing else.
    for name in running.config.metrics.keys().cloned().collect::<Vec<_>>() {
        let slot = running.spawn_slot(&name, fatal_tx.clone());
        running.slots.insert(name, slot);
    }
    running.start_manager(&mut sup, stop_rx.clone())?;
    running.start_registrar()?;

    tracing::info!(
        plugins = running.host.plugins().len(),
        failed = running.host.failures().len(),
        metrics = running.slots.len(),
        registrar = running.config.registrar.enabled,
        "warden running; waiting for SIGTERM or SIGINT (SIGHUP reloads the configuration)"
    );
    tokio::pin!(shutdown);
    let fatal = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break None,
            f = fatal_rx.recv() => break f,
            Ok(()) = defs_rx.changed() => running.sources_changed(),
            Some(()) = reload.recv() => {
                let outcome = running.reload(path.as_deref(), insecure).await;
                crate::metrics::get().count_reload(match &outcome {
                    Ok(p) if p.is_empty() => "unchanged",
                    Ok(_) => "applied",
                    Err(_) => "refused",
                });
                match outcome {
                    Ok(plan) => tracing::info!("configuration reloaded: {}", plan.describe()),
                    Err(e) => tracing::error!("configuration reload refused; the running configuration stays: {e}"),
                }
            }
        }
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(f) => tracing::error!(exit_code = f.exit_code(), "shutting down: {f}"),
    }
    let _ = stop_tx.send(true);
    let registrar_stopped = async {
        match running.registrar.take() {
            Some(part) => part.stop().await,
            None => true,
        }
    };
    let (a, b) = tokio::join!(sup.join(SHUTDOWN_LIMIT), registrar_stopped);
    if !(a && b) {
        tracing::warn!(
            limit = %crate::logs::humantime(SHUTDOWN_LIMIT),
            "some work did not end in time; exiting anyway"
        );
    }
    for (_, s) in std::mem::take(&mut running.slots) {
        s.drop_now();
    }
    fatal.map_or(Ok(()), Err)
}

/// How often `[[manager.sources]]` are asked whether their services changed.
const SOURCES_EVERY: Duration = Duration::from_secs(2);

/// The longest shutdown takes: work in flight is cancelled, not waited for.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);

/// The AZ check's EC2 client; without one (no region) every AZ counts as available,
/// said once.
fn ec2_client(sdk: &aws_config::SdkConfig) -> Option<Arc<warden_ec2::Ec2>> {
    match warden_ec2::Ec2::new(sdk, Duration::from_secs(5)) {
        Ok(ec2) => Some(Arc::new(ec2)),
        Err(e) => {
            tracing::warn!(error = %e, "AZ check off: every availability zone counts as available");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "test.toml").unwrap()
    }

    const BASE: &str = "[manager]\ncentral_redis = \"redis://c:6379\"\nloop_secs = 5\n[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";

    #[test]
    fn the_same_configuration_changes_nothing() {
        let plan = plan_reload(&parse(BASE), &parse(BASE), false).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.describe(), "nothing changed");
        // New plugin files alone restart the registrar (its sources may now load).
        let plan = plan_reload(&parse(BASE), &parse(BASE), true).unwrap();
        assert_eq!(plan.registrar, RegistrarChange::Restart);
    }

    #[test]
    fn metric_and_service_changes_keep_the_lease() {
        let new = BASE
            .replace("value = 1.0", "value = 5.0")
            .replace("loop_secs = 5", "loop_secs = 2");
        let plan = plan_reload(&parse(BASE), &parse(&new), false).unwrap();
        assert_eq!(plan.metrics_new, vec!["m".to_owned()]);
        assert_eq!(plan.metrics_gone, vec!["m".to_owned()]);
        assert!(plan.services);
        assert_eq!(plan.registrar, RegistrarChange::Same);
    }

    #[test]
    fn registrar_settings_restart_only_the_registrar() {
        let new = format!("{BASE}[registrar]\nresync_secs = 10\n");
        let plan = plan_reload(&parse(BASE), &parse(&new), false).unwrap();
        assert_eq!(plan.registrar, RegistrarChange::Restart);
        assert!(!plan.services);
        let off = format!("{BASE}[registrar]\nenabled = false\n");
        assert_eq!(
            plan_reload(&parse(BASE), &parse(&off), false)
                .unwrap()
                .registrar,
            RegistrarChange::Stop
        );
        assert_eq!(
            plan_reload(&parse(&off), &parse(BASE), false)
                .unwrap()
                .registrar,
            RegistrarChange::Start
        );
    }

    #[test]
    fn election_host_http_and_plugin_options_need_a_restart() {
        for (what, new) in [
            (
                "manager.central_redis",
                BASE.replace("redis://c:6379", "redis://d:6379"),
            ),
            (
                "host.instance_id",
                format!("{BASE}[host]\ninstance_id = \"i-1\"\n"),
            ),
            ("http.listen", format!("{BASE}[http]\nlisten = \"off\"\n")),
            (
                "plugins.call_timeout_ms",
                format!("{BASE}[plugins]\ncall_timeout_ms = 100\n"),
            ),
        ] {
            let e = plan_reload(&parse(BASE), &parse(&new), false).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
        let dirs = format!("{BASE}[plugins]\ndirs = [\"/opt/p\"]\n");
        assert_eq!(
            plan_reload(&parse(BASE), &parse(&dirs), false)
                .unwrap()
                .registrar,
            RegistrarChange::Restart
        );
    }
}
