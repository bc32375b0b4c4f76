//! warden's Prometheus metrics, and the readiness they imply.
//!
//! One process-wide [`Metrics`] (like the `metrics` crate's recorder): the loops record
//! where things happen, the HTTP endpoint encodes the registry with `prometheus-client`
//! (OpenMetrics text). Names follow Prometheus conventions: `warden_` prefix, base units
//! (seconds), counters end in `_total`. Series of services that are gone are removed by
//! [`Metrics::retain_services`] and [`Metrics::retain_managed`].
//!
//! Readiness is read from the same gauges (`warden_dependency_up`), so what `/readyz`
//! says and what Prometheus scrapes can never disagree.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TypeLabel {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpOutcome {
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Decision {
    pub service: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PluginCall {
    pub plugin: String,
    pub op: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PluginOp {
    pub plugin: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LoopLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PartLabel {
    pub part: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DependencyLabel {
    pub dependency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfo {
    version: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 0.1 ms .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 4.0, 9))
}

/// A dependency `/readyz` may wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Dependency {
    /// The Docker event stream is connected and containers were listed.
    Docker,
    /// The local Redis (the router's) answered the last write or verification.
    LocalRedis,
    /// Every service source answered at least once.
    ServiceSources,
    /// The central Redis answered the election's last call.
    CentralRedis,
}

impl Dependency {
    pub(crate) const ALL: [Dependency; 4] = [
        Dependency::Docker,
        Dependency::LocalRedis,
        Dependency::ServiceSources,
        Dependency::CentralRedis,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Dependency::Docker => "docker",
            Dependency::LocalRedis => "local_redis",
            Dependency::ServiceSources => "service_sources",
            Dependency::CentralRedis => "central_redis",
        }
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    pub docker_events: Family<TypeLabel, Counter>,
    pub reconciles: Counter,
    pub reconcile_seconds: Histogram,
    pub redis_writes: Counter,
    pub routes_repaired: Counter,
    pub routes: Family<ServiceLabel, Gauge>,
    pub servers: Family<ServiceLabel, Gauge>,
    pub route_conflicts: Gauge,
    /// Definitions from plugins refused for a claim outside their grants, by part
    /// (`registrar`, `manager`).
    pub grant_refusals: Family<PartLabel, Gauge>,
    /// 1 when plugin files are loaded without their permission checks.
    pub plugins_insecure: Gauge,
    pub drains: Counter,
    pub elb_calls: Family<OpOutcome, Counter>,
    pub leader: Gauge,
    pub epoch: Gauge,
    pub leader_changes: Counter,
    /// Call threads abandoned to in-process plugin code that never returned.
    pub plugin_wedged: Counter,
    pub decisions: Family<Decision, Counter>,
    pub ecs_calls: Family<OpOutcome, Counter>,
    pub metric_value: Family<ServiceLabel, F64Gauge>,
    pub desired_tasks: Family<ServiceLabel, Gauge>,
    pub running_tasks: Family<ServiceLabel, Gauge>,
    pub plugin_calls: Family<PluginCall, Counter>,
    pub plugin_call_seconds: HistogramFamily<PluginOp>,
    pub breaker_open: Family<PluginLabel, Gauge>,
    pub dependency_up: Family<DependencyLabel, Gauge>,
    pub loop_restarts: Family<LoopLabel, Counter>,
    pub reloads: Family<OutcomeLabel, Counter>,
    /// Which dependencies `/readyz` waits for (set once by `run`).
    required: Mutex<BTreeSet<Dependency>>,
    /// In-process plugin instances whose call thread is stuck in their code.
    wedged: Mutex<BTreeSet<String>>,
    /// The refusals of each part (`registrar`, `manager`), one line each, for `/status`.
    refused: Mutex<std::collections::BTreeMap<&'static str, Vec<String>>>,
    started: AtomicU64,
    seen: Seen,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Sets the refusals `/status` lists for a part.
    pub(crate) fn set_refused(&self, part: &'static str, lines: Vec<String>) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(part, lines);
    }

    /// The refusals of every part, for `/status`.
    pub(crate) fn refused(&self) -> std::collections::BTreeMap<&'static str, Vec<String>> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn new() -> Self {
        let mut r = Registry::with_prefix("warden");
        let m = Metrics {
            docker_events: Family::default(),
            reconciles: Counter::default(),
            reconcile_seconds: seconds_histogram(),
            redis_writes: Counter::default(),
            routes_repaired: Counter::default(),
            routes: Family::default(),
            servers: Family::default(),
            route_conflicts: Gauge::default(),
            grant_refusals: Family::default(),
            plugins_insecure: Gauge::default(),
            drains: Counter::default(),
            elb_calls: Family::default(),
            leader: Gauge::default(),
            epoch: Gauge::default(),
            leader_changes: Counter::default(),
            plugin_wedged: Counter::default(),
            decisions: Family::default(),
            ecs_calls: Family::default(),
            metric_value: Family::default(),
            desired_tasks: Family::default(),
            running_tasks: Family::default(),
            plugin_calls: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(seconds_histogram),
            breaker_open: Family::default(),
            dependency_up: Family::default(),
            loop_restarts: Family::default(),
            reloads: Family::default(),
            required: Mutex::new(BTreeSet::new()),
            wedged: Mutex::new(BTreeSet::new()),
            refused: Mutex::new(std::collections::BTreeMap::new()),
            started: AtomicU64::new(0),
            seen: Seen::default(),
            registry: Registry::default(),
        };
        let info = Family::<BuildInfo, Gauge>::default();
        info.get_or_create(&BuildInfo {
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
        r.register("build_info", "warden's version (value 1)", info);
        r.register(
            "docker_events",
            "Docker container events received, by type",
            m.docker_events.clone(),
        );
        r.register(
            "reconciles",
            "Routing decisions made and applied",
            m.reconciles.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Time to decide and write the routes",
            Unit::Seconds,
            m.reconcile_seconds.clone(),
        );
        r.register(
            "redis_writes",
            "Route writes sent to the local Redis (one atomic script each)",
            m.redis_writes.clone(),
        );
        r.register(
            "routes_repaired",
            "Route keys found drifted in the local Redis and rewritten",
            m.routes_repaired.clone(),
        );
        r.register(
            "routes",
            "Front-ends routed to each service's backend on this host",
            m.routes.clone(),
        );
        r.register(
            "servers",
            "Servers (ip:port) in each service's backend on this host",
            m.servers.clone(),
        );
        r.register(
            "route_conflicts",
            "Front-end claims refused because another service holds them",
            m.route_conflicts.clone(),
        );
        r.register(
            "grant_refusals",
            "Service definitions from plugins refused because a claim is outside their grants, by part",
            m.grant_refusals.clone(),
        );
        r.register(
            "plugins_insecure",
            "1 when plugin files are loaded without their permission checks (allow_insecure)",
            m.plugins_insecure.clone(),
        );
        r.register(
            "drains",
            "Containers taken out of their backend because Docker is stopping them",
            m.drains.clone(),
        );
        r.register(
            "elb_calls",
            "Classic ELB API calls, by operation and outcome",
            m.elb_calls.clone(),
        );
        r.register(
            "leader",
            "1 while this host holds the manager's lease",
            m.leader.clone(),
        );
        r.register(
            "leader_epoch",
            "The fencing epoch of the lease this host last held",
            m.epoch.clone(),
        );
        r.register(
            "leader_changes",
            "Times this host gained or lost the lease",
            m.leader_changes.clone(),
        );
        r.register(
            "decisions",
            "Scaling decisions taken by this host as leader, by service and action",
            m.decisions.clone(),
        );
        r.register(
            "ecs_calls",
            "ECS API calls, by operation and outcome",
            m.ecs_calls.clone(),
        );
        r.register(
            "metric_value",
            "The last value read from each managed service's metric",
            m.metric_value.clone(),
        );
        r.register(
            "desired_tasks",
            "Tasks the last decision wants for each managed service",
            m.desired_tasks.clone(),
        );
        r.register(
            "running_tasks",
            "Tasks counted running for each managed service",
            m.running_tasks.clone(),
        );
        r.register(
            "plugin_calls",
            "Plugin calls, by plugin, operation and outcome",
            m.plugin_calls.clone(),
        );
        r.register_with_unit(
            "plugin_call_duration",
            "Plugin call time, by plugin and operation",
            Unit::Seconds,
            m.plugin_call_seconds.clone(),
        );
        r.register(
            "plugin_wedged",
            "Call threads abandoned to in-process plugin code that never returned (see the ERROR naming the plugin; run it with isolation = \"process\")",
            m.plugin_wedged.clone(),
        );
        r.register(
            "plugin_breaker_open",
            "Instances of each plugin resting after failures (until a call succeeds)",
            m.breaker_open.clone(),
        );
        r.register(
            "dependency_up",
            "1 while a dependency answers (what /readyz reads)",
            m.dependency_up.clone(),
        );
        r.register(
            "loop_restarts",
            "Supervised loops restarted after a panic or an exit",
            m.loop_restarts.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by outcome: applied, unchanged, refused",
            m.reloads.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Every series in Prometheus' classic text format (0.0.4), for clients that do not
    /// ask for OpenMetrics (curl, `promtool check metrics`, older scrapers).
    pub(crate) fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }

    /// The OpenMetrics text of every series.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub(crate) fn set_required(&self, deps: impl IntoIterator<Item = Dependency>) {
        let deps: BTreeSet<Dependency> = deps.into_iter().collect();
        // A part a reload stopped leaves no series behind.
        for d in Dependency::ALL.iter().filter(|d| !deps.contains(d)) {
            self.dependency_up.remove(&dep_label(*d));
        }
        for d in &deps {
            let _ = self.dependency_up.get_or_create(&dep_label(*d));
        }
        *self.required.lock().expect("not poisoned") = deps;
        self.started.store(1, Ordering::Relaxed);
    }

    /// Marks an in-process plugin instance wedged (its call thread stuck in its code) or
    /// answering again; `/readyz` and `/status` name the wedged ones.
    pub(crate) fn set_wedged(&self, instance: &str, wedged: bool) {
        let mut set = self.wedged.lock().unwrap_or_else(|p| p.into_inner());
        if wedged {
            set.insert(instance.to_owned());
        } else {
            set.remove(instance);
        }
    }

    pub(crate) fn wedged(&self) -> Vec<String> {
        self.wedged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub(crate) fn set_up(&self, d: Dependency, up: bool) {
        self.dependency_up
            .get_or_create(&dep_label(d))
            .set(i64::from(up));
    }

    /// Ready when every required dependency is up; the ones that are not, otherwise.
    pub(crate) fn readiness(&self) -> Result<Vec<&'static str>, Vec<&'static str>> {
        let required = self.required.lock().expect("not poisoned").clone();
        let (up, down): (Vec<_>, Vec<_>) = required
            .iter()
            .partition(|d| self.dependency_up.get_or_create(&dep_label(**d)).get() == 1);
        let names = |v: Vec<&Dependency>| v.into_iter().map(|d| d.name()).collect::<Vec<_>>();
        if self.started.load(Ordering::Relaxed) == 0 {
            return Err(vec!["starting"]);
        }
        if down.is_empty() {
            Ok(names(up))
        } else {
            Err(names(down))
        }
    }

    pub(crate) fn count_reload(&self, outcome: &str) {
        self.reloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub(crate) fn observe_plugin_call(
        &self,
        plugin: &str,
        op: &str,
        outcome: &str,
        took: Duration,
    ) {
        self.plugin_calls
            .get_or_create(&PluginCall {
                plugin: plugin.into(),
                op: op.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.plugin_call_seconds
            .get_or_create(&PluginOp {
                plugin: plugin.into(),
                op: op.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn count(family: &Family<OpOutcome, Counter>, operation: &str, outcome: &str) {
        family
            .get_or_create(&OpOutcome {
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Sets the routes and servers of each routed service, and removes the series of
    /// services no longer routed here.
    pub(crate) fn set_routing(
        &self,
        per_service: &std::collections::BTreeMap<String, (usize, usize)>,
    ) {
        self.seen.retain("routes", &self.routes, per_service);
        self.seen.retain("servers", &self.servers, per_service);
        for (service, (routes, servers)) in per_service {
            let l = ServiceLabel {
                service: service.clone(),
            };
            self.routes.get_or_create(&l).set(*routes as i64);
            self.servers.get_or_create(&l).set(*servers as i64);
        }
    }

    /// Removes managed-service series of services no longer configured.
    pub(crate) fn retain_managed(&self, services: &BTreeSet<String>) {
        let keep: std::collections::BTreeMap<String, ()> =
            services.iter().map(|s| (s.clone(), ())).collect();
        self.seen.retain("metric_value", &self.metric_value, &keep);
        self.seen
            .retain("desired_tasks", &self.desired_tasks, &keep);
        self.seen
            .retain("running_tasks", &self.running_tasks, &keep);
    }
}

fn dep_label(d: Dependency) -> DependencyLabel {
    DependencyLabel {
        dependency: d.name().into(),
    }
}

/// Services seen in one family, so that the gone ones can be removed
/// (prometheus-client cannot list a family's label sets).
#[derive(Default)]
struct Seen(Mutex<std::collections::BTreeMap<&'static str, BTreeSet<String>>>);

impl Seen {
    fn retain<M, C, V>(
        &self,
        name: &'static str,
        family: &Family<ServiceLabel, M, C>,
        keep: &std::collections::BTreeMap<String, V>,
    ) where
        C: prometheus_client::metrics::family::MetricConstructor<M>,
    {
        let mut seen = self.0.lock().expect("not poisoned");
        let seen = seen.entry(name).or_default();
        for s in seen.iter().filter(|s| !keep.contains_key(*s)) {
            family.remove(&ServiceLabel { service: s.clone() });
        }
        *seen = keep.keys().cloned().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.docker_events
            .get_or_create(&TypeLabel {
                r#type: "start".into(),
            })
            .inc();
        m.reconcile_seconds.observe(0.002);
        let text = m.encode();
        assert!(
            text.contains("warden_docker_events_total{type=\"start\"} 1"),
            "{text}"
        );
        assert!(text.contains("warden_build_info{version=\""), "{text}");
        assert!(
            text.contains("warden_reconcile_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn series_of_gone_services_are_removed() {
        let m = Metrics::new();
        let mut per = std::collections::BTreeMap::new();
        per.insert("a".to_owned(), (1, 2));
        per.insert("b".to_owned(), (1, 3));
        m.set_routing(&per);
        assert!(m.encode().contains("warden_servers{service=\"b\"} 3"));
        per.remove("b");
        m.set_routing(&per);
        let text = m.encode();
        assert!(!text.contains("service=\"b\""), "{text}");
        assert!(text.contains("warden_servers{service=\"a\"} 2"), "{text}");
    }

    #[test]
    fn readiness_names_what_is_down() {
        let m = Metrics::new();
        assert_eq!(m.readiness(), Err(vec!["starting"]));
        m.set_required([Dependency::Docker, Dependency::LocalRedis]);
        assert_eq!(m.readiness(), Err(vec!["docker", "local_redis"]));
        m.set_up(Dependency::Docker, true);
        m.set_up(Dependency::LocalRedis, true);
        assert_eq!(m.readiness(), Ok(vec!["docker", "local_redis"]));
        m.set_up(Dependency::LocalRedis, false);
        assert_eq!(m.readiness(), Err(vec!["local_redis"]));
        // The registrar turned off by a reload: its dependencies leave /readyz and /metrics.
        m.set_required([Dependency::Docker]);
        assert_eq!(m.readiness(), Ok(vec!["docker"]));
        assert!(!m.encode().contains("local_redis"));
    }
}

/// OpenMetrics text → the classic text format: a counter's metadata is named as its
/// samples are (`x_total`), `# UNIT` and `# EOF` lines go (the classic format has
/// neither). Everything else reads the same in both.
pub(crate) fn to_classic(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                out.push_str(&format!("{prefix}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod classic_tests {
    use super::to_classic;

    #[test]
    fn counters_are_named_as_their_samples_and_units_and_eof_go() {
        let om = "# HELP a_b Things done.\n# TYPE a_b counter\na_b_total 3\n# HELP t Time.\n# TYPE t histogram\n# UNIT t seconds\nt_count 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_b_total Things done.\n# TYPE a_b_total counter\na_b_total 3\n# HELP t Time.\n# TYPE t histogram\nt_count 1\n"
        );
    }
}
