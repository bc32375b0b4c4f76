//! SIGHUP: the configuration read again and applied, or refused whole.
//!
//! A reload is prepare, then commit. Prepare reads and checks the file, loads its
//! plugins, decides what changes ([`plan_reload`], pure), makes whatever starting the new
//! registrar can fail at, creates the new metric sources and computes the new plan; a
//! failure there puts the old configuration back and nothing running was touched.
//! Commit then swaps the sources, publishes the plan and restarts the registrar, none of
//! which can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::checks::{load_plugins_off_runtime, problems, required_for};
use super::parts::{MetricSlot, RegistrarInputs, Running};
use crate::config::{Config, PluginsConfig};
use crate::manager::worker::Plan;
use crate::plugins::PluginHost;
use crate::supervisor::Fatal;

/// Why a reload was refused; the running configuration then stays, whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The file does not parse, or does not pass the checks (every problem, one line).
    #[error("{0}")]
    Invalid(String),
    /// Settings that take effect only at a restart changed.
    #[error("these settings take effect only at a restart: {}", .0.join(", "))]
    NeedsRestart(Vec<String>),
    /// What starting the new registrar needs could not be made.
    #[error("the registrar could not start: {0}")]
    RegistrarCannotStart(Fatal),
    /// A new metric source's plugin refused its configuration.
    #[error("{0}")]
    MetricRefused(Fatal),
    /// The managed services could not be planned with the new configuration.
    #[error("managed services: {0}")]
    Plan(Fatal),
}

/// What a reload does, decided from the running and the new configuration (pure).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ReloadPlan {
    /// Restart the registrar's loops (routes stay in Redis and are verified again).
    pub registrar: RegistrarChange,
    /// Metric sources to create (new or changed) and to drop.
    pub metrics_new: Vec<String>,
    pub metrics_gone: Vec<String>,
    /// The managed services, loop interval or dry-run changed.
    pub services: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum RegistrarChange {
    #[default]
    Same,
    Start,
    Restart,
    Stop,
}

impl ReloadPlan {
    pub(crate) fn is_empty(&self) -> bool {
        *self == ReloadPlan::default()
    }

    /// One line for the log.
    pub(crate) fn describe(&self) -> String {
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

/// Decides a reload, or says which changed settings need a restart (then nothing is
/// applied: a reload is all or nothing). `dirs_loaded_new` is true when the plugin
/// directories hold files that were not loaded before.
pub(crate) fn plan_reload(
    old: &Config,
    new: &Config,
    new_plugin_files: bool,
) -> Result<ReloadPlan, Refusal> {
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
        return Err(Refusal::NeedsRestart(restart));
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

/// What prepare made, for commit (or for the rollback).
struct Prepared {
    plan: ReloadPlan,
    created: BTreeMap<String, MetricSlot>,
    next: Option<Plan>,
    registrar: Option<RegistrarInputs>,
}

impl Running {
    /// Handles one SIGHUP: reloads, counts the outcome and says it.
    pub(super) async fn on_reload(&mut self, path: Option<&Path>, insecure: bool) {
        let outcome = self.reload(path, insecure).await;
        crate::metrics::get().count_reload(match &outcome {
            Ok(p) if p.is_empty() => "unchanged",
            Ok(_) => "applied",
            Err(_) => "refused",
        });
        match outcome {
            Ok(plan) => tracing::info!("configuration reloaded: {}", plan.describe()),
            Err(e) => tracing::error!(
                "configuration reload refused; the running configuration stays: {e}"
            ),
        }
    }

    /// Re-reads the configuration and applies what changed, or refuses the whole of it.
    async fn reload(&mut self, path: Option<&Path>, insecure: bool) -> Result<ReloadPlan, Refusal> {
        let (new, host) = read(path, insecure).await?;
        let plan = plan_reload(&self.config, &new, new_files(&host, &self.host))?;
        let registrar = match plan.registrar {
            RegistrarChange::Restart | RegistrarChange::Start if new.registrar.enabled => Some(
                self.registrar_inputs(&new)
                    .map_err(Refusal::RegistrarCannotStart)?,
            ),
            _ => None,
        };
        let old_config = std::mem::replace(&mut self.config, new);
        let old_host = std::mem::replace(&mut self.host, host);
        match self.prepare(plan, registrar).await {
            Ok(prepared) => Ok(self.commit(prepared).await),
            Err((e, created)) => {
                for (_, s) in created {
                    s.drop_now();
                }
                self.config = old_config;
                self.host = old_host;
                Err(e)
            }
        }
    }

    /// With the new configuration in `self` (the old one kept by the caller): the new
    /// metric sources, each given its first attempt, and the plan they make. On failure,
    /// what was created, for the caller to drop.
    async fn prepare(
        &mut self,
        plan: ReloadPlan,
        registrar: Option<RegistrarInputs>,
    ) -> Result<Prepared, (Refusal, BTreeMap<String, MetricSlot>)> {
        // One whose plugin refuses its configuration at once refuses the reload.
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
            return Err((Refusal::MetricRefused(refused), created));
        }
        let replan = plan.services || !plan.metrics_new.is_empty() || !plan.metrics_gone.is_empty();
        let next = if replan && self.plan.is_some() {
            let mut slots = self.slot_map();
            slots.retain(|n, _| !plan.metrics_gone.contains(n));
            slots.extend(created.iter().map(|(n, s)| (n.clone(), s.slot.clone())));
            match self.plan_with(&slots) {
                Ok(p) => Some(p),
                Err(e) => return Err((Refusal::Plan(e), created)),
            }
        } else {
            None
        };
        Ok(Prepared {
            plan,
            created,
            next,
            registrar,
        })
    }

    /// Applies what prepare made; nothing here fails.
    async fn commit(&mut self, p: Prepared) -> ReloadPlan {
        let gone: Vec<MetricSlot> = p
            .plan
            .metrics_gone
            .iter()
            .filter_map(|n| self.slots.remove(n))
            .collect();
        self.slots.extend(p.created);
        self.ensure_sdk().await;
        if let (Some(next), Some(tx)) = (p.next, &self.plan) {
            tx.send_replace(next);
        }
        // Dropped only once the loops use the new sources.
        for s in gone {
            s.drop_now();
        }
        if matches!(
            p.plan.registrar,
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
        if let Some(inputs) = p.registrar {
            self.launch_registrar(inputs);
        }
        crate::metrics::get().set_required(required_for(&self.config));
        p.plan
    }
}

/// The file read and checked, with its plugins loaded (off the runtime).
async fn read(path: Option<&Path>, insecure: bool) -> Result<(Config, Arc<PluginHost>), Refusal> {
    // Every problem, on the one line of the refusal.
    let new = Config::load(path, |k| std::env::var(k).ok())
        .map_err(|e| Refusal::Invalid(e.to_string().replace('\n', "; ")))?;
    let host = Arc::new(load_plugins_off_runtime(&new, insecure).await);
    let found = problems(&new, &host);
    if !found.is_empty() {
        return Err(Refusal::Invalid(found.join("; ")));
    }
    Ok((new, host))
}

/// Whether `new` loaded files that `old` did not.
fn new_files(new: &PluginHost, old: &PluginHost) -> bool {
    let loaded = |h: &PluginHost| -> BTreeSet<PathBuf> {
        h.plugins().iter().map(|p| p.path().to_path_buf()).collect()
    };
    !loaded(new).is_subset(&loaded(old))
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
            assert!(
                matches!(&e, Refusal::NeedsRestart(keys) if keys.iter().any(|k| k == what)),
                "{what}: {e}"
            );
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
