//! `[manager]` and `[[manager.services]]`: the central Redis, the lease's timing, the
//! services the leader scales. The manager owns these; `config` reads them with the rest
//! of the file, and checks a service from a source with the same [`ManagedServiceConfig::check`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::grants::ManagedClaim;
use crate::plugins::settings::PluginRef;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerConfig {
    /// Central Redis shared by all hosts; the manager is off without it.
    pub central_redis: Option<String>,
    /// PEM CA that signs a `rediss://` central Redis's certificate (default: the system's).
    pub central_redis_ca_file: Option<PathBuf>,
    /// Replicas of the central Redis that must acknowledge every lease and fence write
    /// (`WAIT`) before it counts: with 1 or more, a failover never gives two leaders.
    pub central_min_replicas: u32,
    /// Leadership lease; a dead leader is replaced within about lease + tick + guard.
    pub lease_ms: u64,
    /// How often hosts renew or check the lease.
    pub tick_ms: u64,
    /// How long a competition lasts before the winner is read.
    pub guard_ms: u64,
    /// The leader's loop over the managed services.
    pub loop_secs: u64,
    /// Decide and log, call nothing.
    pub dry_run: bool,
    pub services: Vec<ManagedServiceConfig>,
    /// Service-definition plugins whose services carry a `manage` part: more managed
    /// services, picked up while warden runs (the config's own entries win a name).
    pub sources: Vec<PluginRef>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            central_redis: None,
            central_redis_ca_file: None,
            central_min_replicas: 0,
            lease_ms: 2000,
            tick_ms: 250,
            guard_ms: 500,
            loop_secs: 15,
            dry_run: false,
            services: Vec::new(),
            sources: Vec::new(),
        }
    }
}

/// A service whose ECS tasks the leader scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedServiceConfig {
    pub name: String,
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Task mode: standalone tasks of this task definition (`family` or `family:rev`).
    pub task_definition: Option<String>,
    /// Service mode: this ECS service's desiredCount.
    pub ecs_service: Option<String>,
    /// The `[metrics.<name>]` that drives it.
    pub metric: String,
    pub mapping: super::policy::Mapping,
    #[serde(default)]
    pub policy: super::policy::Policy,
}

impl ManagedServiceConfig {
    /// Checks one service on its own, against the configured metric sources:
    /// `Err((field, why))`. The same checks for `[[manager.services]]` and for services
    /// from `[[manager.sources]]`.
    pub fn check(&self, metrics: &BTreeMap<String, PluginRef>) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_owned(), m));
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(
                "name",
                format!("{:?}: expected letters, digits, '-', '_' or '.'", self.name),
            );
        }
        if let Some(td) = &self.task_definition {
            if let Err(e) = crate::manager::ecs::family_of(td) {
                return bad("task_definition", e);
            }
        }
        if self.task_definition.is_some() == self.ecs_service.is_some() {
            return bad(
                "task_definition",
                "give exactly one of task_definition and ecs_service".into(),
            );
        }
        if !metrics.contains_key(&self.metric) {
            return bad(
                "metric",
                format!("no [metrics.{}] is configured", self.metric),
            );
        }
        if let Err(e) = self.mapping.validate() {
            return bad("mapping", e);
        }
        if let super::policy::Mapping::Plugin(name) = &self.mapping {
            if !metrics.contains_key(name) {
                return bad(
                    "mapping.plugin",
                    format!("no [metrics.{name}] is configured"),
                );
            }
        }
        if self.policy.min > self.policy.max {
            return bad(
                "policy",
                format!("min {} is above max {}", self.policy.min, self.policy.max),
            );
        }
        check_policy(&self.policy).map_err(|(k, m)| (format!("policy.{k}"), m))
    }

    /// What this service claims, for [`crate::grants::Grants::managed`].
    pub fn claim(&self) -> ManagedClaim<'_> {
        ManagedClaim {
            cluster: &self.cluster,
            task_definition: self.task_definition.as_deref(),
            ecs_service: self.ecs_service.as_deref(),
            max_tasks: self.policy.max,
        }
    }
}

fn default_cluster() -> String {
    "default".into()
}

/// A policy's numbers within bounds that keep the arithmetic and the behaviour sane.
fn check_policy(p: &super::policy::Policy) -> Result<(), (&'static str, String)> {
    if p.max > 10_000 {
        return Err(("max", format!("{} tasks is above 10000", p.max)));
    }
    if !(p.tolerance.is_finite() && (0.0..1.0).contains(&p.tolerance)) {
        return Err((
            "tolerance",
            format!("{} is not a fraction in [0, 1)", p.tolerance),
        ));
    }
    for (k, v) in [
        ("scale_down_window_secs", p.scale_down_window_secs),
        ("cooldown_secs", p.cooldown_secs),
    ] {
        if v > 86_400 {
            return Err((k, format!("{v} seconds is more than a day (86400)")));
        }
    }
    if p.failure_threshold == 0 || p.failure_threshold > 1000 {
        return Err((
            "failure_threshold",
            format!("{} is outside 1..=1000", p.failure_threshold),
        ));
    }
    Ok(())
}
