//! The decision: from service definitions and the container store to the routing table
//! the router should serve. Pure, so every rule is a unit test.
//!
//! Redis keys (Redx's data model, plus one key of warden's own):
//! * `frontend:<host>` or `frontend:<host>/<seg>/…/` → backend name (Redx reads these);
//! * `backend:<name>` hash, field `ip:port` → score `0` (Redx reads these);
//! * `warden:port:<port>` → backend name: the service's port front-end. Stock Redx never
//!   reads `warden:*` keys; warden's router looks this key up first, by the port the
//!   request arrived on, so ELB health checks (no useful Host header) reach the service.
//!
//! A front-end is only emitted for a backend with at least one server, so the router
//! never sees a front-end pointing at a missing or empty backend.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use warden_plugin_api::{ContainerMatch, ServiceDefinition};

use super::store::Container;

/// The ECS agent's label naming a container's task-definition family.
pub const ECS_FAMILY_LABEL: &str = "com.amazonaws.ecs.task-definition-family";
/// Default time between a service's last container leaving and ELB deregistration.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Whether the host should be in an ELB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElbWant {
    pub wanted: bool,
    pub drain: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Backend name → `ip:port` servers.
    pub servers: BTreeMap<String, BTreeSet<String>>,
    /// Redis string key (`frontend:…` or `warden:port:…`) → backend name.
    pub strings: BTreeMap<String, String>,
    /// ELB name → membership wanted.
    pub elbs: BTreeMap<String, ElbWant>,
    /// The router's port front-ends (from service definitions, whether or not they
    /// have containers, so that listen ports change only with the definitions).
    pub ports: BTreeSet<u16>,
}

pub fn frontend_key(frontend: &str) -> String {
    format!("frontend:{frontend}")
}

pub fn port_key(port: u16) -> String {
    format!("warden:port:{port}")
}

/// Image name without tag or digest: `repo/app:1.2` → `repo/app`.
fn image_base(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        // A colon after the last slash is a tag; before it, a registry port.
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// `*` matches any run of characters, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

/// Whether a container belongs to a service: every rule that is set must hold; a match
/// with no rule matches nothing.
pub fn matches(m: &ContainerMatch, c: &Container) -> bool {
    if m.is_empty() {
        return false;
    }
    m.image
        .as_ref()
        .is_none_or(|i| c.image == *i || image_base(&c.image) == i)
        && m.image_prefix
            .as_ref()
            .is_none_or(|p| c.image.starts_with(p.as_str()))
        && m.name.as_ref().is_none_or(|p| glob(p, &c.name))
        && m.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v))
        && m.ecs_family
            .as_ref()
            .is_none_or(|f| c.labels.get(ECS_FAMILY_LABEL) == Some(f))
        && (m.ids.is_empty() || m.ids.contains(&c.id))
}

/// Picks the container's IP: the service's network, else the first network by name.
fn pick_ip<'a>(service: &ServiceDefinition, c: &'a Container) -> Result<&'a str, String> {
    match &service.network {
        Some(n) => c.networks.get(n).map(String::as_str).ok_or_else(|| {
            format!(
                "has no address on network {n:?} (it is on: {})",
                names(&c.networks)
            )
        }),
        None => c
            .networks
            .values()
            .next()
            .map(String::as_str)
            .ok_or_else(|| "has no network address (host network?)".to_owned()),
    }
}

fn names(m: &BTreeMap<String, String>) -> String {
    if m.is_empty() {
        "none".into()
    } else {
        m.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn pick_port(service: &ServiceDefinition, c: &Container) -> Result<u16, String> {
    if let Some(p) = service.port {
        return Ok(p);
    }
    let mut exposed = c.exposed_tcp.iter();
    match (exposed.next(), exposed.next()) {
        (Some(p), None) => Ok(*p),
        (None, _) => {
            Err("exposes no TCP port and its service names none (set warden.port or port)".into())
        }
        (Some(_), Some(_)) => Err(format!(
            "exposes several ports ({}) and its service names none (set warden.port or port)",
            c.exposed_tcp
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Computes the routing table. Services earlier in `services` win a name clash and a
/// container matched by several services. Warnings name the container or service.
pub fn desired<'a>(
    services: &[ServiceDefinition],
    containers: impl IntoIterator<Item = &'a Container>,
) -> (Routing, Vec<String>) {
    let mut warnings = Vec::new();
    let mut unique: Vec<&ServiceDefinition> = Vec::new();
    for s in services {
        if unique.iter().any(|u| u.name == s.name) {
            warnings.push(format!(
                "service {:?} is defined twice; the first definition is used",
                s.name
            ));
        } else {
            unique.push(s);
        }
    }
    let mut routing = Routing::default();
    let mut port_owner: BTreeMap<u16, &str> = BTreeMap::new();
    for s in &unique {
        if let Some(p) = s.frontend_port {
            match port_owner.get(&p) {
                Some(other) => warnings.push(format!(
                    "service {:?}: front-end port {p} is already service {other:?}'s; ignored",
                    s.name
                )),
                None => {
                    port_owner.insert(p, &s.name);
                    routing.ports.insert(p);
                }
            }
        }
    }

    // Each routable container: its service and address. On an IP clash (a stale entry
    // and a new container given the same address) only the newest start counts.
    let mut by_ip: BTreeMap<&str, (&Container, &ServiceDefinition, String)> = BTreeMap::new();
    for c in containers {
        if !c.routable() {
            continue;
        }
        let mut matched = unique.iter().filter(|s| matches(&s.matches, c));
        let Some(s) = matched.next() else { continue };
        if let Some(other) = matched.next() {
            warnings.push(format!(
                "container {} matches services {:?} and {:?}; routed to {:?}",
                c.name, s.name, other.name, s.name
            ));
        }
        let addr =
            match pick_ip(s, c).and_then(|ip| pick_port(s, c).map(|p| (ip, format!("{ip}:{p}")))) {
                Ok(a) => a,
                Err(why) => {
                    warnings.push(format!(
                        "container {} of service {:?} {why}; not routed",
                        c.name, s.name
                    ));
                    continue;
                }
            };
        match by_ip.get(addr.0) {
            Some((old, _, _)) if old.started_at >= c.started_at => continue,
            _ => {
                by_ip.insert(addr.0, (c, s, addr.1));
            }
        }
    }
    for (_, s, addr) in by_ip.values() {
        routing
            .servers
            .entry(s.backend_name().to_owned())
            .or_default()
            .insert(addr.clone());
    }

    let mut explicit_drain: BTreeMap<String, Duration> = BTreeMap::new();
    for s in &unique {
        let backend = s.backend_name();
        let live = routing.servers.get(backend).is_some_and(|v| !v.is_empty());
        if live {
            for f in &s.frontends {
                routing.strings.insert(frontend_key(f), backend.to_owned());
            }
            if let Some(p) = s
                .frontend_port
                .filter(|p| port_owner.get(p) == Some(&s.name.as_str()))
            {
                routing.strings.insert(port_key(p), backend.to_owned());
            }
        }
        if let Some(elb) = &s.elb {
            let want = routing.elbs.entry(elb.clone()).or_insert(ElbWant {
                wanted: false,
                drain: DEFAULT_DRAIN,
            });
            want.wanted |= live;
            if let Some(d) = s.drain_seconds.map(Duration::from_secs) {
                // The longest drain of the services sharing the ELB.
                let longest = explicit_drain.entry(elb.clone()).or_insert(d);
                *longest = (*longest).max(d);
                want.drain = *longest;
            }
        }
    }
    (routing, warnings)
}

/// The routing table as the set of entries warden owns in Redis: `server\t<backend>\t<ip:port>`
/// and `string\t<key>\t<backend>`.
pub fn owned_entries(r: &Routing) -> BTreeSet<String> {
    let servers = r
        .servers
        .iter()
        .flat_map(|(b, addrs)| addrs.iter().map(move |a| format!("server\t{b}\t{a}")));
    let strings = r.strings.iter().map(|(k, b)| format!("string\t{k}\t{b}"));
    servers.chain(strings).collect()
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::container;
    use super::*;

    fn service(name: &str, labels: &[(&str, &str)]) -> ServiceDefinition {
        ServiceDefinition {
            name: name.into(),
            matches: ContainerMatch {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            port: None,
            backend: None,
            frontends: vec![],
            frontend_port: None,
            elb: None,
            network: None,
            drain_seconds: None,
        }
    }

    #[test]
    fn routes_every_routable_container_of_a_service() {
        let mut web = service("web", &[("svc", "web")]);
        web.frontends = vec!["example.com".into(), "example.com/api/".into()];
        web.frontend_port = Some(8001);
        web.elb = Some("web-elb".into());
        let a = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        let b = container("b", "web-2", &[("svc", "web")], "172.17.0.3");
        let mut c = container("c", "web-3", &[("svc", "web")], "172.17.0.4");
        c.stopping = true;
        let other = container("d", "db", &[("svc", "db")], "172.17.0.5");
        let (r, w) = desired(&[web], [&a, &b, &c, &other]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            r.servers["web"],
            BTreeSet::from(["172.17.0.2:80".into(), "172.17.0.3:80".into()])
        );
        assert_eq!(r.strings["frontend:example.com"], "web");
        assert_eq!(r.strings["frontend:example.com/api/"], "web");
        assert_eq!(r.strings["warden:port:8001"], "web");
        assert_eq!(r.ports, BTreeSet::from([8001]));
        assert!(r.elbs["web-elb"].wanted);
    }

    #[test]
    fn no_frontend_for_an_empty_backend_and_the_elb_is_not_wanted() {
        let mut web = service("web", &[("svc", "web")]);
        web.frontends = vec!["example.com".into()];
        web.frontend_port = Some(8001);
        web.elb = Some("web-elb".into());
        web.drain_seconds = Some(5);
        let mut a = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        a.stopping = true;
        let (r, _) = desired(&[web], [&a]);
        assert!(r.servers.is_empty() && r.strings.is_empty());
        assert_eq!(
            r.ports,
            BTreeSet::from([8001]),
            "listen ports follow definitions, not containers"
        );
        assert_eq!(
            r.elbs["web-elb"],
            ElbWant {
                wanted: false,
                drain: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn several_networks_take_the_named_one_or_the_first_by_name() {
        let mut c = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        c.networks.insert("alpha".into(), "10.1.0.2".into());
        c.networks.insert("zeta".into(), "10.9.0.2".into());
        let (r, _) = desired(&[service("web", &[("svc", "web")])], [&c]);
        assert_eq!(r.servers["web"], BTreeSet::from(["10.1.0.2:80".into()]));
        let mut s = service("web", &[("svc", "web")]);
        s.network = Some("zeta".into());
        let (r, _) = desired(&[s.clone()], [&c]);
        assert_eq!(r.servers["web"], BTreeSet::from(["10.9.0.2:80".into()]));
        s.network = Some("nope".into());
        let (r, w) = desired(&[s], [&c]);
        assert!(r.servers.is_empty());
        assert!(w[0].contains("web-1") && w[0].contains("nope"), "{w:?}");
    }

    #[test]
    fn port_comes_from_the_service_or_the_single_exposed_port() {
        let mut c = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        c.exposed_tcp = BTreeSet::from([80, 443]);
        let (r, w) = desired(&[service("web", &[("svc", "web")])], [&c]);
        assert!(r.servers.is_empty());
        assert!(w[0].contains("several ports (80, 443)"), "{w:?}");
        let mut s = service("web", &[("svc", "web")]);
        s.port = Some(443);
        let (r, _) = desired(&[s], [&c]);
        assert_eq!(r.servers["web"], BTreeSet::from(["172.17.0.2:443".into()]));
    }

    #[test]
    fn a_reused_ip_goes_only_to_the_newest_container() {
        let mut old = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        old.started_at = "2026-11-27T01:00:00Z".into();
        let mut new = container("b", "api-1", &[("svc", "api")], "172.17.0.2");
        new.started_at = "2026-11-27T02:00:00Z".into();
        let services = [
            service("web", &[("svc", "web")]),
            service("api", &[("svc", "api")]),
        ];
        let (r, _) = desired(&services, [&old, &new]);
        assert_eq!(r.servers.get("web"), None);
        assert_eq!(r.servers["api"], BTreeSet::from(["172.17.0.2:80".into()]));
    }

    #[test]
    fn every_kind_of_match_rule() {
        let mut c = container(
            "abc",
            "shop-web-1",
            &[(ECS_FAMILY_LABEL, "shop")],
            "172.17.0.2",
        );
        c.image = "registry.example:5000/team/shop:1.2".into();
        let m = |f: fn(&mut ContainerMatch)| {
            let mut m = ContainerMatch::default();
            f(&mut m);
            matches(&m, &c)
        };
        assert!(m(
            |m| m.image = Some("registry.example:5000/team/shop".into())
        ));
        assert!(m(
            |m| m.image = Some("registry.example:5000/team/shop:1.2".into())
        ));
        assert!(!m(|m| m.image = Some("registry.example".into())));
        assert!(m(
            |m| m.image_prefix = Some("registry.example:5000/team/".into())
        ));
        assert!(m(|m| m.name = Some("shop-*-?".into())));
        assert!(!m(|m| m.name = Some("shop-?".into())));
        assert!(m(|m| m.ecs_family = Some("shop".into())));
        assert!(!m(|m| m.ecs_family = Some("shopx".into())));
        assert!(m(|m| {
            m.ids.insert("abc".into());
        }));
        assert!(!m(|_| {}), "an empty match matches nothing");
        assert!(!m(|m| {
            m.ecs_family = Some("shop".into());
            m.name = Some("other".into());
        }));
    }

    #[test]
    fn owned_entries_encode_servers_and_strings() {
        let mut r = Routing::default();
        r.servers
            .insert("web".into(), BTreeSet::from(["1.2.3.4:80".into()]));
        r.strings
            .insert("frontend:example.com".into(), "web".into());
        let e = owned_entries(&r);
        assert_eq!(
            e,
            BTreeSet::from([
                "server\tweb\t1.2.3.4:80".into(),
                "string\tfrontend:example.com\tweb".into()
            ])
        );
    }
}
