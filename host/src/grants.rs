//! What service definitions from plugins may claim: the operator's grants.
//!
//! Why: a container's labels are written by whoever can start a container, a services
//! hash by whoever can write the central Redis, a table by whoever can write the table.
//! Without a boundary, any of them steers the host's AWS rights (any load balancer,
//! any task definition) and the router (any host name, the router's own port): warden
//! would be a confused deputy. So every claim of a definition that came from a plugin is
//! checked against `[grants]` (or the source's own `grants`), default deny, and a
//! definition with one claim outside them is refused whole (fail closed, as Traefik
//! drops a router whose definition is wrong), with one WARN naming it, the claim and the
//! grant it lacks. warden.toml's own `[[manager.services]]` are the operator's and need
//! no grant.
//!
//! Patterns are globs (`*` any run, `?` one character), matched in linear time
//! ([`glob`]). Host names that reach more than a name — `localhost`, IP literals, this
//! host's own names and addresses — are granted only by a pattern that is exactly that
//! host, never by a wildcard. The router's own ports (`registrar.reserved_ports`) can
//! never be claimed.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use warden_plugin_api::model::elide;
use warden_plugin_api::ServiceDefinition;

/// `*` matches any run of characters, `?` one byte. Greedy with one back-track point,
/// so the cost is at most `pattern × text` steps, never exponential.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A port or an inclusive range of ports: `8080` or `"8000-8099"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let port = |s: &str| match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!(
                "{}: expected a port (1-65535) or a range such as \"8000-8099\"",
                elide(text, 40)
            )),
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(text)?, port(text)?),
        };
        if first > last {
            return Err(format!("{text:?}: the range runs backwards"));
        }
        Ok(PortRange { first, last })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        PortRange::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What definitions from plugins may claim. Empty lists grant nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Front-end host patterns (`*.example.com`, `api.example.com`); the path part of a
    /// front-end is not matched.
    pub frontends: Vec<String>,
    /// Router ports a service may have as its front-end port.
    pub frontend_ports: Vec<PortRange>,
    /// Classic ELB names.
    pub load_balancers: Vec<String>,
    /// Target groups: name patterns match names, `arn:` patterns match ARNs.
    pub target_groups: Vec<String>,
    /// ECS clusters a `manage` part may name.
    pub clusters: Vec<String>,
    /// Task definitions a `manage` part may run: a pattern without `:` matches the
    /// family of `family` and `family:rev`; `family:rev` patterns match them whole;
    /// `arn:` patterns match ARNs (an ARN is granted only by an ARN pattern).
    pub task_definitions: Vec<String>,
    /// ECS services whose desired count a `manage` part may set.
    pub ecs_services: Vec<String>,
    /// The highest `policy.max` a `manage` part may ask for.
    pub max_tasks: u32,
}

/// The most front-ends one definition may claim (each is a key every router worker
/// reloads on every change).
pub(crate) const MAX_FRONTENDS: usize = 64;
/// The most target groups one definition may claim.
pub(crate) const MAX_TARGET_GROUPS: usize = 16;

/// What the checks know of this host: the router's own ports, and the names and
/// addresses that are this host's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub reserved_ports: BTreeSet<u16>,
    pub own_names: BTreeSet<String>,
}

/// A claim refused: what was claimed, and the grant (config key) it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// `front-end evil.example`, `load balancer prod-payments`, …
    pub claim: String,
    /// The setting that would grant it: `grants.frontends`, `registrar.reserved_ports`, …
    pub grant: String,
    /// Why, in a few words (`not granted`, `the router's own port`, …).
    pub why: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is refused: {} ({})",
            self.claim, self.why, self.grant
        )
    }
}

fn refuse(claim: String, grant: &str, why: &str) -> Refusal {
    Refusal {
        claim,
        grant: grant.to_owned(),
        why: why.to_owned(),
    }
}

/// Whether a host name reaches more than a name: it is granted only by an exact pattern.
pub(crate) fn is_special_host(host: &str, facts: &HostFacts) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok()
        // RFC 1123 names never end in an all-digit label; inet_aton reads "10.1" as an IP.
        || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        // Instances' own DNS names (`ip-10-0-0-5.eu-west-1.compute.internal`).
        || host == "internal"
        || host.ends_with(".internal")
        || facts.own_names.contains(host)
}

impl Grants {
    /// Everything, for tests and the demo (`*` patterns, every port but the reserved,
    /// 10000 tasks). Special hosts stay refused.
    pub fn all() -> Grants {
        let any = vec!["*".to_owned()];
        Grants {
            frontends: any.clone(),
            frontend_ports: vec![PortRange {
                first: 1,
                last: 65535,
            }],
            load_balancers: any.clone(),
            target_groups: vec!["*".into(), "arn:*".into()],
            clusters: any.clone(),
            task_definitions: vec!["*".into(), "*:*".into(), "arn:*".into()],
            ecs_services: any,
            max_tasks: 10_000,
        }
    }

    fn any(patterns: &[String], text: &str) -> bool {
        patterns.iter().any(|p| glob(p, text))
    }

    /// A front-end (normalised: `host` or `host/path/`).
    pub fn frontend(&self, frontend: &str, facts: &HostFacts) -> Result<(), Refusal> {
        let host = frontend.split('/').next().unwrap_or(frontend);
        let claim = || format!("front-end {}", elide(frontend, 80));
        if is_special_host(host, facts) {
            return if self.frontends.iter().any(|p| p == host) {
                Ok(())
            } else {
                Err(refuse(
                    claim(),
                    "grants.frontends",
                    "localhost, an IP address or this host's own name is granted only by a pattern that is exactly it",
                ))
            };
        }
        if Self::any(&self.frontends, host) {
            Ok(())
        } else {
            Err(refuse(claim(), "grants.frontends", "not granted"))
        }
    }

    /// A front-end port on the router.
    pub fn frontend_port(&self, port: u16, facts: &HostFacts) -> Result<(), Refusal> {
        let claim = format!("front-end port {port}");
        if facts.reserved_ports.contains(&port) {
            return Err(refuse(
                claim,
                "registrar.reserved_ports",
                "it is the router's own port (or warden's), never a service's",
            ));
        }
        if self.frontend_ports.iter().any(|r| r.contains(port)) {
            Ok(())
        } else {
            Err(refuse(claim, "grants.frontend_ports", "not granted"))
        }
    }

    pub fn load_balancer(&self, name: &str) -> Result<(), Refusal> {
        if Self::any(&self.load_balancers, name) {
            Ok(())
        } else {
            Err(refuse(
                format!("load balancer {}", elide(name, 80)),
                "grants.load_balancers",
                "not granted",
            ))
        }
    }

    pub fn target_group(&self, group: &str) -> Result<(), Refusal> {
        let is_arn = group.starts_with("arn:");
        let granted = self
            .target_groups
            .iter()
            .filter(|p| p.starts_with("arn:") == is_arn)
            .any(|p| glob(p, group));
        if granted {
            Ok(())
        } else {
            Err(refuse(
                format!("target group {}", elide(group, 120)),
                "grants.target_groups",
                if is_arn {
                    "not granted (an ARN is granted only by an arn: pattern)"
                } else {
                    "not granted"
                },
            ))
        }
    }

    /// Every claim of a definition from a plugin: the first claim refused, if any.
    pub fn service(&self, def: &ServiceDefinition, facts: &HostFacts) -> Result<(), Refusal> {
        if def.frontends.len() > MAX_FRONTENDS || def.target_groups.len() > MAX_TARGET_GROUPS {
            return Err(refuse(
                format!(
                    "{} front-ends and {} target groups",
                    def.frontends.len(),
                    def.target_groups.len()
                ),
                "warden's bounds",
                &format!(
                    "a service names at most {MAX_FRONTENDS} front-ends and {MAX_TARGET_GROUPS} target groups"
                ),
            ));
        }
        for f in &def.frontends {
            // A front-end that does not parse is refused later with its own reason.
            if let Ok(f) = warden_plugin_api::model::normalise_frontend(f) {
                self.frontend(&f, facts)?;
            }
        }
        if let Some(p) = def.frontend_port {
            self.frontend_port(p, facts)?;
        }
        if let Some(elb) = &def.elb {
            self.load_balancer(elb)?;
        }
        for g in &def.target_groups {
            self.target_group(g)?;
        }
        Ok(())
    }

    /// A managed service from a source's `manage` part.
    pub fn managed(&self, s: &ManagedClaim<'_>) -> Result<(), Refusal> {
        if !Self::any(&self.clusters, s.cluster) {
            return Err(refuse(
                format!("cluster {}", elide(s.cluster, 80)),
                "grants.clusters",
                "not granted",
            ));
        }
        if let Some(td) = s.task_definition {
            if !self.task_definition_granted(td) {
                return Err(refuse(
                    format!("task definition {}", elide(td, 120)),
                    "grants.task_definitions",
                    if td.starts_with("arn:") {
                        "not granted (an ARN is granted only by an arn: pattern)"
                    } else {
                        "not granted"
                    },
                ));
            }
        }
        if let Some(svc) = s.ecs_service {
            if !Self::any(&self.ecs_services, svc) {
                return Err(refuse(
                    format!("ECS service {}", elide(svc, 80)),
                    "grants.ecs_services",
                    "not granted",
                ));
            }
        }
        if s.max_tasks > self.max_tasks {
            return Err(refuse(
                format!("policy.max {}", s.max_tasks),
                "grants.max_tasks",
                &format!("above the {} tasks granted", self.max_tasks),
            ));
        }
        Ok(())
    }

    fn task_definition_granted(&self, td: &str) -> bool {
        let is_arn = td.starts_with("arn:");
        let family = td.split(':').next().unwrap_or(td);
        self.task_definitions.iter().any(|p| {
            if is_arn || p.starts_with("arn:") {
                is_arn && p.starts_with("arn:") && glob(p, td)
            } else if p.contains(':') {
                glob(p, td)
            } else {
                glob(p, family)
            }
        })
    }

    /// Checks the patterns themselves (bounded lengths): the error names the key.
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let lists = [
            ("frontends", &self.frontends),
            ("load_balancers", &self.load_balancers),
            ("target_groups", &self.target_groups),
            ("clusters", &self.clusters),
            ("task_definitions", &self.task_definitions),
            ("ecs_services", &self.ecs_services),
        ];
        for (name, list) in lists {
            if list.len() > 256 {
                return Err((
                    format!("{key}.{name}"),
                    format!("{} patterns (at most 256)", list.len()),
                ));
            }
            if let Some(p) = list.iter().find(|p| p.is_empty() || p.len() > 256) {
                return Err((
                    format!("{key}.{name}"),
                    format!("{}: a pattern must be 1-256 characters", elide(p, 40)),
                ));
            }
        }
        if self.max_tasks > 10_000 {
            return Err((
                format!("{key}.max_tasks"),
                format!("{} is above 10000", self.max_tasks),
            ));
        }
        Ok(())
    }
}

/// What a managed service claims, as [`Grants::managed`] screens it: its cluster, what it
/// runs (a task definition or an ECS service) and how many tasks at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagedClaim<'a> {
    pub cluster: &'a str,
    pub task_definition: Option<&'a str>,
    pub ecs_service: Option<&'a str>,
    pub max_tasks: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            reserved_ports: BTreeSet::from([80, 443]),
            own_names: BTreeSet::from(["ip-10-0-0-5.internal".to_owned()]),
        }
    }

    #[test]
    fn glob_matches_and_stays_linear_on_hostile_patterns() {
        assert!(glob("*.example.com", "api.example.com"));
        assert!(!glob("*.example.com", "example.com"));
        assert!(glob("web-?", "web-1"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("*", ""));
        assert!(glob("**", "x"));
        // The shape that made the recursive glob exponential: answered at once.
        let text = "a".repeat(5000);
        let pattern = format!("{}b", "*a".repeat(50));
        let started = std::time::Instant::now();
        assert!(!glob(&pattern, &text));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn port_ranges_parse_from_numbers_and_text() {
        let g: Grants = toml::from_str("frontend_ports = [8080, \"9000-9099\"]").unwrap();
        assert_eq!(
            g.frontend_ports[0],
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        assert!(g.frontend_ports[1].contains(9050));
        assert!(toml::from_str::<Grants>("frontend_ports = [\"9-1\"]").is_err());
        assert!(toml::from_str::<Grants>("frontend_ports = [0]").is_err());
        assert!(toml::from_str::<Grants>("frontend_ports = [\"x\"]").is_err());
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let g = Grants::default();
        let def = ServiceDefinition {
            name: "web".into(),
            frontends: vec!["web.example".into()],
            ..Default::default()
        };
        let r = g.service(&def, &facts()).unwrap_err();
        assert_eq!(r.grant, "grants.frontends");
        assert!(r.to_string().contains("front-end \"web.example\""), "{r}");
        // A service that claims nothing but its backend needs no grant.
        g.service(&ServiceDefinition::default(), &facts()).unwrap();
        let many = ServiceDefinition {
            frontends: (0..65).map(|i| format!("h{i}.example")).collect(),
            ..Default::default()
        };
        let r = Grants::all().service(&many, &facts()).unwrap_err();
        assert_eq!(r.grant, "warden's bounds", "{r}");
    }

    #[test]
    fn hosts_that_reach_more_than_a_name_need_an_exact_grant() {
        let mut g = Grants::all();
        for host in [
            "localhost",
            "app.localhost",
            "127.0.0.1",
            "169.254.169.254",
            "10.1",
            "ip-10-0-0-5.internal",
            "ip-10-0-0-9.eu-west-1.compute.internal",
        ] {
            let r = g.frontend(host, &facts()).unwrap_err();
            assert!(r.why.contains("exactly"), "{host}: {r}");
        }
        g.frontends.push("localhost".into());
        g.frontend("localhost", &facts()).unwrap();
        g.frontend("localhost/admin/", &facts()).unwrap();
        g.frontend("web.example/api/", &facts()).unwrap();
    }

    #[test]
    fn reserved_ports_are_never_granted() {
        let g = Grants::all();
        let r = g.frontend_port(80, &facts()).unwrap_err();
        assert_eq!(r.grant, "registrar.reserved_ports");
        g.frontend_port(8080, &facts()).unwrap();
        let narrow = Grants {
            frontend_ports: vec![PortRange::parse("8000-8099").unwrap()],
            ..Default::default()
        };
        assert_eq!(
            narrow.frontend_port(9000, &facts()).unwrap_err().grant,
            "grants.frontend_ports"
        );
    }

    #[test]
    fn balancers_by_name_and_target_groups_by_name_or_arn() {
        let g = Grants {
            load_balancers: vec!["web-*".into()],
            target_groups: vec![
                "web-*".into(),
                "arn:aws:elasticloadbalancing:eu-west-1:111:targetgroup/api-*".into(),
            ],
            ..Default::default()
        };
        g.load_balancer("web-elb").unwrap();
        assert!(g.load_balancer("payments").is_err());
        g.target_group("web-tg").unwrap();
        g.target_group("arn:aws:elasticloadbalancing:eu-west-1:111:targetgroup/api-tg/abc")
            .unwrap();
        // A name pattern does not grant an ARN that holds the name (another account's).
        let r = g
            .target_group("arn:aws:elasticloadbalancing:eu-west-1:999:targetgroup/web-tg/x")
            .unwrap_err();
        assert!(r.why.contains("arn:"), "{r}");
    }

    fn managed<'a>(td: Option<&'a str>, svc: Option<&'a str>, max: u32) -> ManagedClaim<'a> {
        ManagedClaim {
            cluster: "prod",
            task_definition: td,
            ecs_service: svc,
            max_tasks: max,
        }
    }

    #[test]
    fn managed_services_need_their_cluster_task_definition_and_size_granted() {
        let g = Grants {
            clusters: vec!["prod".into()],
            task_definitions: vec!["worker".into(), "batch:3".into()],
            ecs_services: vec!["web".into()],
            max_tasks: 20,
            ..Default::default()
        };
        g.managed(&managed(Some("worker"), None, 10)).unwrap();
        g.managed(&managed(Some("worker:7"), None, 10)).unwrap();
        g.managed(&managed(Some("batch:3"), None, 10)).unwrap();
        assert!(g.managed(&managed(Some("batch:4"), None, 10)).is_err());
        let r = g
            .managed(&managed(
                Some("arn:aws:ecs:eu-west-1:999:task-definition/worker:1"),
                None,
                10,
            ))
            .unwrap_err();
        assert_eq!(r.grant, "grants.task_definitions");
        g.managed(&managed(None, Some("web"), 10)).unwrap();
        assert!(g.managed(&managed(None, Some("payments"), 10)).is_err());
        let r = g
            .managed(&managed(Some("worker"), None, 10_000))
            .unwrap_err();
        assert_eq!(r.grant, "grants.max_tasks");
        let mut other = managed(Some("worker"), None, 10);
        other.cluster = "staging";
        assert_eq!(g.managed(&other).unwrap_err().grant, "grants.clusters");
    }
}
