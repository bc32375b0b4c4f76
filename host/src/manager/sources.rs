//! Managed services from service-definition plugins (`[[manager.sources]]`).
//!
//! Why: operators who keep service definitions cluster-wide (`redis-services`,
//! `file-services` on shared storage, ...) want the manager to scale the services that
//! say how (their `manage` part) without editing every host's configuration. Every host
//! follows the sources, so that a new leader has the list at once; only the leader acts.
//!
//! Rules, each in a pure function below: a source is asked for its generation every
//! `every` and listed only when it changes; a source that fails keeps its last good
//! list (a central Redis restart must not stop scaling); a service whose `manage` part
//! is wrong is skipped with the reason naming the source, the service and the key, and
//! the others are kept; a `[[manager.services]]` entry of the same name wins. A source's
//! `manage` part is checked against that source's grants (cluster, task definition or
//! ECS service, `policy.max`): whoever can write a services hash must not make the
//! leader run any task definition of the account, so one outside them is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::watch;
use warden_plugin_api::ServiceDefinition;

use crate::logs::Repeated;
use crate::manager::settings::ManagedServiceConfig;
use crate::plugins::settings::PluginRef;

/// The last good list of each source that has answered, by its config key
/// (`manager.sources[0]`).
pub(crate) type Definitions = BTreeMap<String, Vec<ServiceDefinition>>;

/// What the loop needs of a source: a plugin slot (adapted in `daemon::adapters`), or
/// a fake in tests.
pub(crate) trait DefinitionSource: Send + Sync {
    fn generation(&self) -> impl std::future::Future<Output = Result<u64, String>> + Send;
    fn list(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<ServiceDefinition>, String>> + Send;
}

/// Follows the sources until `stop`, publishing their lists whenever one changes.
pub(crate) async fn run<S: DefinitionSource>(
    sources: Vec<(String, S)>,
    tx: std::sync::Arc<watch::Sender<Definitions>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen: Vec<Option<u64>> = vec![None; sources.len()];
    let mut errors: Vec<Repeated> = sources
        .iter()
        .map(|_| Repeated::new("manager: service source"))
        .collect();
    loop {
        for (i, (key, source)) in sources.iter().enumerate() {
            let outcome = async {
                let g = source.generation().await?;
                if seen[i] == Some(g) {
                    return Ok(None);
                }
                Ok::<_, String>(Some((g, source.list().await?)))
            }
            .await;
            match outcome {
                Ok(None) => errors[i].cleared(),
                Ok(Some((g, list))) => {
                    errors[i].cleared();
                    seen[i] = Some(g);
                    tracing::info!(source = %key, services = list.len(), managed = list.iter().filter(|s| s.manage.is_some()).count(), "service source read");
                    tx.send_modify(|d| {
                        d.insert(key.clone(), list);
                    });
                }
                Err(e) => errors[i].failed(&format!("{key}: {e}; keeping its last good list")),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One service's `manage` part as a managed service, checked as a `[[manager.services]]`
/// entry is; the error names the key.
pub(crate) fn managed_of(
    def: &ServiceDefinition,
    metrics: &BTreeMap<String, PluginRef>,
) -> Option<Result<ManagedServiceConfig, String>> {
    let manage = def.manage.as_ref()?;
    let parsed = (|| {
        let mut v = manage.clone();
        let object = v
            .as_object_mut()
            .ok_or("manage: expected an object with the keys of a [[manager.services]] entry")?;
        if object.contains_key("name") {
            return Err("manage.name: the service's own name is used; leave it out".to_owned());
        }
        object.insert("name".into(), def.name.clone().into());
        let s: ManagedServiceConfig =
            serde_json::from_value(v).map_err(|e| format!("manage: {e}"))?;
        s.check(metrics)
            .map_err(|(k, m)| format!("manage.{k}: {m}"))?;
        Ok(s)
    })();
    Some(parsed)
}

/// A managed service from a source refused because a claim is outside its grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ManagedRefusal {
    pub source: String,
    pub service: String,
    #[serde(flatten)]
    pub refusal: crate::grants::Refusal,
}

impl std::fmt::Display for ManagedRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} service {:?}: not managed: {}",
            self.source, self.service, self.refusal
        )
    }
}

/// What [`merge`] gives: the services to manage, the ones skipped (one line each, why),
/// and the ones refused by their source's grants.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub services: Vec<ManagedServiceConfig>,
    pub skipped: Vec<String>,
    pub refused: Vec<ManagedRefusal>,
}

/// The managed services: the config's own, then each source's in key order, each
/// source's checked against its grants (`grants` gives them by source key).
pub(crate) fn merge(
    configured: &[ManagedServiceConfig],
    defs: &Definitions,
    metrics: &BTreeMap<String, PluginRef>,
    grants: &dyn Fn(&str) -> crate::grants::Grants,
) -> Merged {
    let mut out = configured.to_vec();
    let mut names: BTreeMap<String, String> = configured
        .iter()
        .map(|s| (s.name.clone(), "[[manager.services]]".to_owned()))
        .collect();
    let mut tags: BTreeSet<String> = configured
        .iter()
        .map(|s| super::started_by(&s.name))
        .collect();
    let mut skipped = Vec::new();
    let mut refused = Vec::new();
    for (key, list) in defs {
        let granted = grants(key);
        for def in list {
            let at = format!("{key} service {:?}", def.name);
            let s = match managed_of(def, metrics) {
                None => continue,
                Some(Err(why)) => {
                    skipped.push(format!("{at}: {why}"));
                    continue;
                }
                Some(Ok(s)) => s,
            };
            if let Err(refusal) = granted.managed(&s.claim()) {
                refused.push(ManagedRefusal {
                    source: key.clone(),
                    service: s.name.clone(),
                    refusal,
                });
                continue;
            }
            if let Some(other) = names.get(&s.name) {
                skipped.push(format!("{at}: also defined by {other}, which is used"));
                continue;
            }
            let tag = super::started_by(&s.name);
            if !tags.insert(tag.clone()) {
                skipped.push(format!(
                    "{at}: another managed service tags its tasks startedBy {tag:?} too (ECS keeps 36 characters)"
                ));
                continue;
            }
            names.insert(s.name.clone(), key.clone());
            out.push(s);
        }
    }
    Merged {
        services: out,
        skipped,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::*;

    fn metrics() -> BTreeMap<String, PluginRef> {
        let r: PluginRef = serde_json::from_value(json!({"plugin": "p"})).unwrap();
        BTreeMap::from([("m".to_owned(), r)])
    }

    fn def(name: &str, manage: serde_json::Value) -> ServiceDefinition {
        ServiceDefinition {
            name: name.into(),
            manage: Some(manage),
            ..Default::default()
        }
    }

    fn ok_manage() -> serde_json::Value {
        json!({"cluster": "c1", "task_definition": "web", "metric": "m",
               "mapping": {"target_per_task": 10.0}, "policy": {"max": 5}})
    }

    #[test]
    fn a_manage_part_becomes_a_checked_managed_service() {
        let s = managed_of(&def("web", ok_manage()), &metrics())
            .unwrap()
            .unwrap();
        assert_eq!((s.name.as_str(), s.cluster.as_str()), ("web", "c1"));
        assert_eq!(s.policy.max, 5);
        assert!(managed_of(&ServiceDefinition::default(), &metrics()).is_none());
    }

    #[test]
    fn a_bad_manage_part_names_the_key() {
        for (manage, why) in [
            (
                json!({"metric": "nope", "task_definition": "w", "mapping": {"target_per_task": 1.0}}),
                "manage.metric: no [metrics.nope]",
            ),
            (
                json!({"metric": "m", "mapping": {"target_per_task": 1.0}}),
                "manage.task_definition",
            ),
            (
                json!({"metric": "m", "task_definition": "w", "mapping": {"target_per_task": 1.0}, "polcy": {}}),
                "unknown field `polcy`",
            ),
            (json!({"name": "x"}), "manage.name"),
            (json!(3), "expected an object"),
        ] {
            let e = managed_of(&def("web", manage.clone()), &metrics())
                .unwrap()
                .expect_err(&manage.to_string());
            assert!(e.contains(why), "{manage}: {e}");
        }
    }

    #[test]
    fn the_config_wins_a_name_and_bad_services_are_skipped_not_the_rest() {
        let configured: ManagedServiceConfig = serde_json::from_value(json!({
            "name": "web", "task_definition": "web", "metric": "m",
            "mapping": {"target_per_task": 1.0}}))
        .unwrap();
        let defs = Definitions::from([
            (
                "manager.sources[0]".to_owned(),
                vec![
                    def("web", ok_manage()),
                    def("api", ok_manage()),
                    def("bad", json!({"metric": "nope"})),
                    ServiceDefinition {
                        name: "routed-only".into(),
                        ..Default::default()
                    },
                ],
            ),
            (
                "manager.sources[1]".to_owned(),
                vec![def("api", ok_manage())],
            ),
        ]);
        let all = |_: &str| crate::grants::Grants::all();
        let Merged {
            services, skipped, ..
        } = merge(&[configured], &defs, &metrics(), &all);
        let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "api"]);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped[0].contains(
                "manager.sources[0] service \"web\": also defined by [[manager.services]]"
            ),
            "{skipped:?}"
        );
        assert!(skipped[1].contains("\"bad\": manage"), "{skipped:?}");
        assert!(
            skipped[2]
                .contains("manager.sources[1] service \"api\": also defined by manager.sources[0]"),
            "{skipped:?}"
        );
    }

    #[test]
    fn a_source_gets_only_what_its_grants_allow_and_the_config_needs_none() {
        let configured: ManagedServiceConfig = serde_json::from_value(json!({
            "name": "ops", "task_definition": "anything", "metric": "m",
            "mapping": {"target_per_task": 1.0}}))
        .unwrap();
        let evil = json!({"cluster": "c1", "task_definition": "arn:aws:ecs:eu-west-1:999:task-definition/miner:1",
            "metric": "m", "mapping": {"target_per_task": 1.0}, "policy": {"max": 5}});
        let big = json!({"cluster": "c1", "task_definition": "web", "metric": "m",
            "mapping": {"target_per_task": 1.0}, "policy": {"max": 10000}});
        let defs = Definitions::from([(
            "manager.sources[0]".to_owned(),
            vec![
                def("web", ok_manage()),
                def("miner", evil),
                def("huge", big),
            ],
        )]);
        let grants = |key: &str| {
            assert_eq!(key, "manager.sources[0]");
            crate::grants::Grants {
                clusters: vec!["c1".into()],
                task_definitions: vec!["web".into()],
                max_tasks: 20,
                ..Default::default()
            }
        };
        let m = merge(&[configured], &defs, &metrics(), &grants);
        let names: Vec<_> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["ops", "web"]);
        assert_eq!(m.refused.len(), 2, "{:?}", m.refused);
        assert_eq!(m.refused[0].service, "miner");
        assert_eq!(m.refused[0].refusal.grant, "grants.task_definitions");
        assert_eq!(m.refused[1].refusal.grant, "grants.max_tasks");
        assert!(
            m.refused[0].to_string().contains("not managed"),
            "{}",
            m.refused[0]
        );
    }

    /// A scripted source: its generation and list can be changed, or made to fail.
    #[derive(Clone)]
    struct Fake {
        generation: Arc<AtomicU64>,
        list: Arc<Mutex<Result<Vec<ServiceDefinition>, String>>>,
        lists: Arc<AtomicU64>,
    }

    impl DefinitionSource for Fake {
        async fn generation(&self) -> Result<u64, String> {
            match &*self.list.lock().unwrap() {
                Ok(_) => Ok(self.generation.load(Ordering::SeqCst)),
                Err(e) => Err(e.clone()),
            }
        }
        async fn list(&self) -> Result<Vec<ServiceDefinition>, String> {
            self.lists.fetch_add(1, Ordering::SeqCst);
            self.list.lock().unwrap().clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lists_on_a_new_generation_only_and_keeps_the_last_good_list() {
        let fake = Fake {
            generation: Arc::default(),
            list: Arc::new(Mutex::new(Ok(vec![def("web", ok_manage())]))),
            lists: Arc::default(),
        };
        let (tx, mut rx) = watch::channel(Definitions::new());
        let (stop_tx, stop) = watch::channel(false);
        let every = Duration::from_secs(2);
        let task = tokio::spawn(run(
            vec![("s".to_owned(), fake.clone())],
            Arc::new(tx),
            every,
            stop,
        ));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update()["s"][0].name, "web");
        // Same generation: not listed again.
        tokio::time::sleep(every * 5).await;
        assert_eq!(fake.lists.load(Ordering::SeqCst), 1);
        // The source fails: nothing is published, the last good list stays.
        *fake.list.lock().unwrap() = Err("redis down".into());
        tokio::time::sleep(every * 3).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow()["s"].len(), 1);
        // Back with a new generation: listed and published.
        *fake.list.lock().unwrap() = Ok(vec![def("web", ok_manage()), def("api", ok_manage())]);
        fake.generation.store(1, Ordering::SeqCst);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update()["s"].len(), 2);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
