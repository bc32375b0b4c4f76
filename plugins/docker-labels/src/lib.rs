//! Service definitions derived from container labels, for hosts whose containers say
//! themselves which service they belong to. The default service source of `warden run`.
//!
//! | label | meaning | value |
//! |---|---|---|
//! | `warden.service` | service name (required) | `[A-Za-z0-9_.-]+` |
//! | `warden.port` | container port that serves traffic; required when the image exposes several | 1–65535 |
//! | `warden.frontend` | host or host/path front-ends, comma-separated | `example.com`, `example.com/api/` |
//! | `warden.frontend-port` | the router's port for this service | 1–65535 |
//! | `warden.elb` | classic ELB the host joins while it runs the service | name |
//! | `warden.network` | Docker network whose IP is routed to | name |
//! | `warden.drain` | seconds between the last container leaving and ELB deregistration | whole seconds |
//!
//! Values are parsed strictly and bounded (a value of at most 1024 bytes, at most 16
//! front-ends and 5 target groups a container). A container with an invalid label is
//! skipped with one warning naming the container and the label; other containers are
//! not affected. A service's definition is fixed by its first container (the earliest
//! started; first come, first served, as for front-ends): a later container whose labels
//! disagree is refused with one warning and not routed, never merged, so a container
//! that names another's service cannot change where that service's traffic goes.

use std::collections::BTreeMap;
use std::sync::Mutex;

use warden_plugin_api::model::{elide, normalise_frontend, start_order};
use warden_plugin_api::prelude::*;
use warden_plugin_api::sdk::SaidOnce;
use warden_plugin_api::tracing;

/// The longest label value read, in bytes.
pub const MAX_VALUE: usize = 1024;
/// The most front-ends one container may name.
pub const MAX_FRONTENDS: usize = 16;
/// The most target groups one container may name.
pub const MAX_TARGET_GROUPS: usize = 5;

#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// Label prefix (default `warden`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "warden".into()
}

/// A label that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    pub label: String,
    pub why: String,
}

fn port(label: &str, v: &str) -> Result<u16, LabelError> {
    let bad = || LabelError {
        label: label.into(),
        why: format!("{} is not a port (a whole number 1-65535)", elide(v, 40)),
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match v.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(bad()),
    }
}

fn name(label: &str, v: &str) -> Result<String, LabelError> {
    if v.len() > 128 {
        return Err(LabelError {
            label: label.into(),
            why: format!(
                "{} is {} bytes long (a name is at most 128)",
                elide(v, 40),
                v.len()
            ),
        });
    }
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        Ok(v.to_owned())
    } else {
        Err(LabelError {
            label: label.into(),
            why: format!(
                "{} is not a name (letters, digits, `_`, `.`, `-`)",
                elide(v, 60)
            ),
        })
    }
}

/// A target group's name (1-32 letters, digits, `-`, not at an end) or ARN.
fn target_group(label: &str, v: &str) -> Result<String, LabelError> {
    let arn = v.starts_with("arn:") && v.contains(":targetgroup/");
    let name = (1..=32).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if arn || name {
        Ok(v.to_owned())
    } else {
        Err(LabelError {
            label: label.into(),
            why: format!(
                "{} is not a target group name (1-32 letters, digits, `-`) or ARN (arn:...:targetgroup/...)",
                elide(v, 60)
            ),
        })
    }
}

/// Reads one container's labels into a service definition (`None`: not a service).
pub fn parse_labels(
    prefix: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<ServiceDefinition>, LabelError> {
    let key = |k: &str| format!("{prefix}.{k}");
    if let Some((k, v)) = labels
        .iter()
        .find(|(k, v)| k.starts_with(&format!("{prefix}.")) && v.len() > MAX_VALUE)
    {
        return Err(LabelError {
            label: k.clone(),
            why: format!(
                "its value is {} bytes long (at most {MAX_VALUE}): {}",
                v.len(),
                elide(v, 40)
            ),
        });
    }
    let get = |k: &str| labels.get(&key(k)).map(|v| v.trim());
    let Some(service) = get("service") else {
        return Ok(None);
    };
    let service = name(&key("service"), service)?;
    let mut def = ServiceDefinition {
        name: service,
        matches: ContainerMatch::default(),
        port: get("port").map(|v| port(&key("port"), v)).transpose()?,
        backend: None,
        frontends: Vec::new(),
        frontend_port: get("frontend-port")
            .map(|v| port(&key("frontend-port"), v))
            .transpose()?,
        elb: get("elb").map(|v| name(&key("elb"), v)).transpose()?,
        network: get("network")
            .map(|v| name(&key("network"), v))
            .transpose()?,
        drain_seconds: None,
        manage: None,
        target_groups: Vec::new(),
    };
    let many = |k: &str, n: usize, max: usize| LabelError {
        label: key(k),
        why: format!("names {n} values (at most {max})"),
    };
    if let Some(v) = get("frontend") {
        let n = v.split(',').filter(|f| !f.trim().is_empty()).count();
        if n > MAX_FRONTENDS {
            return Err(many("frontend", n, MAX_FRONTENDS));
        }
        for f in v.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            def.frontends
                .push(normalise_frontend(f).map_err(|why| LabelError {
                    label: key("frontend"),
                    why,
                })?);
        }
    }
    if let Some(v) = get("target-group") {
        let n = v.split(',').filter(|g| !g.trim().is_empty()).count();
        if n > MAX_TARGET_GROUPS {
            return Err(many("target-group", n, MAX_TARGET_GROUPS));
        }
        for g in v.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            def.target_groups
                .push(target_group(&key("target-group"), g)?);
        }
    }
    if let Some(v) = get("drain") {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LabelError {
                label: key("drain"),
                why: format!("{} is not a whole number of seconds", elide(v, 40)),
            });
        }
        def.drain_seconds = Some(v.parse().map_err(|_| LabelError {
            label: key("drain"),
            why: format!("{} is too large", elide(v, 40)),
        })?);
    }
    // Any other label under the prefix is a typo of one of the above.
    let known = [
        "service",
        "port",
        "frontend",
        "frontend-port",
        "elb",
        "target-group",
        "network",
        "drain",
    ];
    if let Some(unknown) = labels
        .keys()
        .filter_map(|k| k.strip_prefix(&format!("{prefix}.")))
        .find(|k| !known.contains(k))
    {
        return Err(LabelError {
            label: if unknown.len() > 40 {
                key(&elide(unknown, 40))
            } else {
                key(unknown)
            },
            why: format!("unknown label (known: {})", known.join(", ")),
        });
    }
    Ok(Some(def))
}

/// Derives the services of a set of containers; returns them and the warnings. The
/// earliest-started container of a service fixes its definition; a later one whose
/// labels disagree is refused (left out of the service's containers).
pub fn derive(prefix: &str, containers: &[ContainerView]) -> (Vec<ServiceDefinition>, Vec<String>) {
    let mut sorted: Vec<&ContainerView> = containers.iter().collect();
    sorted.sort_by(|a, b| {
        (start_order(&a.started_at), &a.id).cmp(&(start_order(&b.started_at), &b.id))
    });
    // Each service's definition and the container that fixed it.
    let mut services: BTreeMap<String, (ServiceDefinition, &ContainerView)> = BTreeMap::new();
    let mut warnings = Vec::new();
    for c in sorted {
        match parse_labels(prefix, &c.labels) {
            Ok(None) => {}
            Ok(Some(def)) => {
                let (entry, first) = services
                    .entry(def.name.clone())
                    .or_insert_with(|| (def.clone(), c));
                let mut mine = def;
                mine.matches.ids = entry.matches.ids.clone();
                if mine != *entry {
                    warnings.push(format!(
                        "container {} ({}): its warden labels differ from those of container {} ({}), the first of service {:?}; refused, not routed (a service's definition is fixed by its first container)",
                        c.name,
                        short(&c.id),
                        first.name,
                        short(&first.id),
                        entry.name
                    ));
                    continue;
                }
                entry.matches.ids.insert(c.id.clone());
            }
            Err(e) => warnings.push(format!(
                "container {} ({}): label {}: {}; container skipped",
                c.name,
                short(&c.id),
                e.label,
                e.why
            )),
        }
    }
    (services.into_values().map(|(d, _)| d).collect(), warnings)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

pub struct DockerLabels {
    prefix: String,
    /// Warnings already given, so that each is logged once, not on every reconcile
    /// (bounded: the names in them are anyone's who can start a container).
    warned: Mutex<SaidOnce>,
}

impl ServiceDefinitions for DockerLabels {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if config.prefix.is_empty() {
            return Err(PluginError::config("prefix: must not be empty"));
        }
        Ok(DockerLabels {
            prefix: config.prefix,
            warned: Mutex::new(SaidOnce::default()),
        })
    }

    async fn list(&self) -> Result<Vec<ServiceDefinition>, PluginError> {
        Ok(Vec::new())
    }

    async fn list_for(
        &self,
        containers: Vec<ContainerView>,
    ) -> Result<Vec<ServiceDefinition>, PluginError> {
        let (services, warnings) = derive(&self.prefix, &containers);
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        for w in warnings {
            if warned.first(&w) {
                tracing::warn!("{w}");
            }
        }
        Ok(services)
    }

    async fn generation(&self) -> Result<u64, PluginError> {
        // Derived from containers on every list: nothing of its own changes.
        Ok(0)
    }
}

export_plugin! { name: "docker-labels", service_definitions: DockerLabels }

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn container(id: &str, name: &str, pairs: &[(&str, &str)]) -> ContainerView {
        ContainerView {
            id: id.into(),
            name: name.into(),
            image: "img".into(),
            labels: labels(pairs),
            started_at: String::new(),
        }
    }

    #[test]
    fn reads_every_label() {
        let d = parse_labels(
            "warden",
            &labels(&[
                ("warden.service", "web"),
                ("warden.port", "8080"),
                ("warden.frontend", "Example.com, example.com/api"),
                ("warden.frontend-port", "8001"),
                ("warden.elb", "web-elb"),
                ("warden.network", "front"),
                ("warden.drain", "30"),
                (
                    "warden.target-group",
                    "web-tg, arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/ip-tg/abc",
                ),
                ("other", "x"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.port, Some(8080));
        assert_eq!(d.frontends, vec!["example.com", "example.com/api/"]);
        assert_eq!(d.frontend_port, Some(8001));
        assert_eq!(d.elb.as_deref(), Some("web-elb"));
        assert_eq!(d.network.as_deref(), Some("front"));
        assert_eq!(d.drain_seconds, Some(30));
        assert_eq!(
            d.target_groups,
            vec![
                "web-tg",
                "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/ip-tg/abc"
            ]
        );
    }

    #[test]
    fn no_service_label_is_not_a_service() {
        assert_eq!(
            parse_labels("warden", &labels(&[("warden.port", "80")])).unwrap(),
            None
        );
    }

    #[test]
    fn values_are_strict() {
        for (label, value) in [
            ("warden.port", "0"),
            ("warden.port", "65536"),
            ("warden.port", "+80"),
            ("warden.port", "80 "),
            ("warden.frontend-port", "eighty"),
            ("warden.drain", "-1"),
            ("warden.drain", "1.5"),
            ("warden.service", "a b"),
            ("warden.frontend", "http://x"),
            ("warden.prot", "80"),
            ("warden.target-group", "web_tg"),
            ("warden.target-group", "-web"),
            ("warden.target-group", "a-name-of-thirty-three-characters"),
        ] {
            let mut l = labels(&[("warden.service", "web")]);
            l.insert(label.into(), value.into());
            let e = parse_labels("warden", &l);
            // "80 " is trimmed and valid; everything else is refused naming its label.
            if value == "80 " {
                assert_eq!(e.unwrap().unwrap().port, Some(80));
                continue;
            }
            let e = e.unwrap_err();
            assert_eq!(e.label, label, "{value}: {e:?}");
        }
    }

    #[test]
    fn an_invalid_container_is_skipped_and_others_are_not_affected() {
        let cs = vec![
            container(
                "aaa",
                "web-1",
                &[("warden.service", "web"), ("warden.port", "80")],
            ),
            container(
                "bbb",
                "web-2",
                &[("warden.service", "web"), ("warden.port", "80x")],
            ),
            container("ccc", "api-1", &[("warden.service", "api")]),
        ];
        let (services, warnings) = derive("warden", &cs);
        assert_eq!(services.len(), 2);
        let web = services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.matches.ids, BTreeSet::from(["aaa".to_string()]));
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("web-2") && warnings[0].contains("warden.port"),
            "{warnings:?}"
        );
    }

    #[test]
    fn the_first_started_container_fixes_the_service_and_a_disagreeing_one_is_refused() {
        let mut victim = container(
            "bbb",
            "web-1",
            &[
                ("warden.service", "web"),
                ("warden.frontend", "web.example"),
            ],
        );
        victim.started_at = "2026-12-01T10:00:00.1Z".into();
        // Sorts first by name and id, but started later: it cannot take the service.
        let mut squatter = container(
            "aaa",
            "aaa-squatter",
            &[
                ("warden.service", "web"),
                ("warden.frontend", "web.example"),
                ("warden.elb", "victim-elb"),
            ],
        );
        squatter.started_at = "2026-12-01T10:00:00.123Z".into();
        let mut twin = container(
            "ccc",
            "web-2",
            &[
                ("warden.service", "web"),
                ("warden.frontend", "web.example"),
            ],
        );
        twin.started_at = "2026-12-01T11:00:00Z".into();
        let (services, warnings) = derive("warden", &[squatter, victim, twin]);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].elb, None, "the first container's definition");
        assert_eq!(
            services[0].matches.ids,
            BTreeSet::from(["bbb".to_string(), "ccc".to_string()]),
            "the squatter is not one of the service's containers"
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("aaa-squatter")
                && warnings[0].contains("web-1")
                && warnings[0].contains("refused"),
            "{warnings:?}"
        );
    }

    #[test]
    fn values_and_counts_are_bounded_and_long_values_are_elided() {
        let big = "x".repeat(10_000);
        let e = parse_labels(
            "warden",
            &labels(&[("warden.service", "web"), ("warden.frontend", big.as_str())]),
        )
        .unwrap_err();
        assert!(e.why.contains("10000 bytes") && e.why.len() < 200, "{e:?}");
        let many = (0..17)
            .map(|i| format!("h{i}.example"))
            .collect::<Vec<_>>()
            .join(",");
        let e = parse_labels(
            "warden",
            &labels(&[
                ("warden.service", "web"),
                ("warden.frontend", many.as_str()),
            ]),
        )
        .unwrap_err();
        assert!(e.why.contains("17 values"), "{e:?}");
        let e =
            parse_labels("warden", &labels(&[("warden.service", &"s".repeat(900))])).unwrap_err();
        assert!(e.why.len() < 200, "{e:?}");
    }
}
