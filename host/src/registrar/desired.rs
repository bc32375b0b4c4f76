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
//!
//! Conflicts are first come, first served: a front-end (host or host/path) or a front-end
//! port belongs to the service that holds it (`held`: what warden last wrote, read back
//! from Redis after a restart); a later claimant is refused and reported. With no holder
//! (a first start, or the holder gone) the service with the oldest routable container
//! takes it; names never decide. Front-ends from any source are checked again here
//! ([`normalise_frontend`]), so a plugin cannot put a malformed key into Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use warden_plugin_api::model::normalise_frontend;
use warden_plugin_api::{ContainerMatch, ServiceDefinition};

use super::entry::Entry;
use super::store::{Container, Health};

/// The ECS agent's label naming a container's task-definition family.
pub const ECS_FAMILY_LABEL: &str = "com.amazonaws.ecs.task-definition-family";
/// Default time between a service's last container leaving and ELB deregistration.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// The longest drain (a classic ELB's connection draining goes up to 3600 s).
pub const MAX_DRAIN_SECS: u64 = 3600;

/// Marks a balancer wanted while `live`; its drain is the longest explicit drain of the
/// services that share it (the default when none says).
fn want_in<K: Ord + Clone>(
    wants: &mut BTreeMap<K, ElbWant>,
    drains: &mut BTreeMap<K, Duration>,
    key: K,
    live: bool,
    drain: Option<Duration>,
) {
    let want = wants.entry(key.clone()).or_insert(ElbWant {
        wanted: false,
        drain: DEFAULT_DRAIN,
    });
    want.wanted |= live;
    if let Some(d) = drain {
        let longest = drains.entry(key).or_insert(d);
        *longest = (*longest).max(d);
        want.drain = *longest;
    }
}

/// One ELBv2 target group membership: the group (name or ARN) and the port the host is
/// registered with (the service's router port; the group's own port when `None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetGroupKey {
    pub group: String,
    pub port: Option<u16>,
}

impl std::fmt::Display for TargetGroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{} port {p}", self.group),
            None => write!(f, "{} (its own port)", self.group),
        }
    }
}

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
    /// ELBv2 target group (and port) → membership wanted.
    pub target_groups: BTreeMap<TargetGroupKey, ElbWant>,
    /// The router's port front-ends (from service definitions, whether or not they
    /// have containers, so that listen ports change only with the definitions).
    pub ports: BTreeSet<u16>,
    /// Claims refused because another service holds the front-end or port.
    pub conflicts: Vec<Conflict>,
    /// Every container a service matched, and what became of it.
    pub containers: Vec<ContainerRoute>,
    /// Definitions refused for a claim outside their grants, with their containers.
    pub refused: Vec<RefusedService>,
}

/// A definition from a plugin refused whole because one of its claims is not granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The source's config key and plugin (`registrar.sources[0] (docker-labels)`).
    pub source: String,
    pub definition: ServiceDefinition,
    pub refusal: crate::grants::Refusal,
}

/// A refused definition as `warden routes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedService {
    pub source: String,
    pub service: String,
    pub containers: Vec<String>,
    #[serde(flatten)]
    pub refusal: crate::grants::Refusal,
}

impl std::fmt::Display for RefusedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let containers = if self.containers.is_empty() {
            "no container now".to_owned()
        } else {
            format!("containers {}", self.containers.join(", "))
        };
        write!(
            f,
            "service {:?} from {} ({containers}) refused: {}; its containers are not routed",
            self.service, self.source, self.refusal
        )
    }
}

/// A claim on a front-end or front-end port that another service holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    /// The Redis key claimed (`frontend:…` or `warden:port:…`).
    pub key: String,
    pub holder: String,
    pub holder_containers: Vec<String>,
    pub refused: String,
    pub refused_containers: Vec<String>,
}

impl Conflict {
    pub fn what(&self) -> String {
        match self.key.strip_prefix("warden:port:") {
            Some(p) => format!("front-end port {p}"),
            None => format!(
                "front-end {}",
                self.key.strip_prefix("frontend:").unwrap_or(&self.key)
            ),
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} belongs to service {:?} (containers {}); service {:?} (containers {}) claims it too and is refused",
            self.what(),
            self.holder,
            self.holder_containers.join(", "),
            self.refused,
            self.refused_containers.join(", ")
        )
    }
}

/// A container matched by a service: routed to `address`, or why not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerRoute {
    pub id: String,
    pub name: String,
    pub service: String,
    pub backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Why it is not routed (stopping, health, no address…); `None` when routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_routed: Option<String>,
}

pub use warden_plugin_api::model::start_order;

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

pub use crate::grants::glob;

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

/// Why a matched container is not routed now (`None`: routable).
fn not_routable(c: &Container) -> Option<String> {
    if c.stopping {
        Some("being stopped".into())
    } else if c.paused {
        Some("paused".into())
    } else {
        match c.health {
            Health::Starting => Some("health: starting".into()),
            Health::Unhealthy => Some("health: unhealthy".into()),
            Health::None | Health::Healthy => None,
        }
    }
}

/// One service's claim on a key, with what decides it.
struct Claim<'a> {
    service: &'a str,
    backend: &'a str,
    oldest: (String, u64),
    containers: Vec<String>,
}

/// Decides who holds each claimed key (pure): the holder, if it still claims it; else
/// the claimant with the oldest routable container (then the name, for a stable order).
fn resolve<'a>(
    claims: BTreeMap<String, Vec<Claim<'a>>>,
    held: &BTreeMap<String, String>,
) -> (BTreeMap<String, &'a str>, Vec<Conflict>) {
    let mut winners = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (key, mut cs) in claims {
        cs.sort_by(|a, b| (&a.oldest, a.service).cmp(&(&b.oldest, b.service)));
        let holder = held
            .get(&key)
            .and_then(|b| cs.iter().position(|c| c.backend == b.as_str()))
            .unwrap_or(0);
        let win = &cs[holder];
        for c in cs.iter().filter(|c| c.backend != win.backend) {
            conflicts.push(Conflict {
                key: key.clone(),
                holder: win.service.to_owned(),
                holder_containers: win.containers.clone(),
                refused: c.service.to_owned(),
                refused_containers: c.containers.clone(),
            });
        }
        winners.insert(key, win.backend);
    }
    (winners, conflicts)
}

/// Computes the routing table. Services earlier in `services` win a name clash and a
/// container matched by several services; front-ends and ports go by [`resolve`]
/// (`held`: key → backend as warden last wrote it). Warnings name the container or
/// service.
pub fn desired<'a>(
    services: &[ServiceDefinition],
    containers: impl IntoIterator<Item = &'a Container>,
    held: &BTreeMap<String, String>,
) -> (Routing, Vec<String>) {
    desired_screened(services, &[], containers, held)
}

/// [`desired`], with the definitions refused by their grants: their containers are
/// listed as not routed, and each refusal with the containers it concerns.
pub fn desired_screened<'a>(
    services: &[ServiceDefinition],
    refused: &[Refused],
    containers: impl IntoIterator<Item = &'a Container>,
    held: &BTreeMap<String, String>,
) -> (Routing, Vec<String>) {
    let mut warnings = Vec::new();
    let unique = first_of_each_name(services, &mut warnings);
    let mut routing = Routing::default();
    for s in &unique {
        routing.ports.extend(s.frontend_port);
    }
    routing.refused = refused
        .iter()
        .map(|r| RefusedService {
            source: r.source.clone(),
            service: r.definition.name.clone(),
            containers: Vec::new(),
            refusal: r.refusal.clone(),
        })
        .collect();
    let by_ip = place(&unique, refused, containers, &mut routing, &mut warnings);
    let routed = record_routed(&by_ip, &mut routing);
    routing
        .containers
        .sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name)));
    let claims = claims_of(&unique, &routed, &mut warnings);
    let (winners, conflicts) = resolve(claims, held);
    routing.strings = winners
        .into_iter()
        .map(|(k, b)| (k, b.to_owned()))
        .collect();
    routing.conflicts = conflicts;
    memberships(&unique, &mut routing, &mut warnings);
    (routing, warnings)
}

/// The first definition of each service name (a second is warned about and ignored).
fn first_of_each_name<'s>(
    services: &'s [ServiceDefinition],
    warnings: &mut Vec<String>,
) -> Vec<&'s ServiceDefinition> {
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
    unique
}

/// A routable container: its service and `ip:port`, by IP.
type Placed<'c, 's> = BTreeMap<&'c str, (&'c Container, &'s ServiceDefinition, String)>;

/// Each container's service and address. A container not routed (refused service, not
/// running, no address, an IP clash) goes to `routing.containers` with why; on an IP
/// clash (a stale entry and a new container given the same address) only the newest
/// start counts.
fn place<'c, 's>(
    unique: &[&'s ServiceDefinition],
    refused: &[Refused],
    containers: impl IntoIterator<Item = &'c Container>,
    routing: &mut Routing,
    warnings: &mut Vec<String>,
) -> Placed<'c, 's> {
    let mut by_ip: Placed<'c, 's> = BTreeMap::new();
    for c in containers {
        let mut matched = unique.iter().filter(|s| matches(&s.matches, c));
        let Some(&s) = matched.next() else {
            not_served(refused, c, routing);
            continue;
        };
        if let Some(other) = matched.next() {
            warnings.push(format!(
                "container {} matches services {:?} and {:?}; routed to {:?}",
                c.name, s.name, other.name, s.name
            ));
        }
        let mut route = ContainerRoute {
            id: c.id.clone(),
            name: c.name.clone(),
            service: s.name.clone(),
            backend: s.backend_name().to_owned(),
            address: None,
            not_routed: not_routable(c),
        };
        if route.not_routed.is_some() {
            routing.containers.push(route);
            continue;
        }
        let addr =
            match pick_ip(s, c).and_then(|ip| pick_port(s, c).map(|p| (ip, format!("{ip}:{p}")))) {
                Ok(a) => a,
                Err(why) => {
                    warnings.push(format!(
                        "container {} of service {:?} {why}; not routed",
                        c.name, s.name
                    ));
                    route.not_routed = Some(why);
                    routing.containers.push(route);
                    continue;
                }
            };
        match by_ip.get(addr.0) {
            Some((old, _, _)) if start_order(&old.started_at) >= start_order(&c.started_at) => {
                route.not_routed = Some(format!(
                    "address {} is also that of the newer container {}",
                    addr.0, old.name
                ));
                routing.containers.push(route);
            }
            _ => {
                by_ip.insert(addr.0, (c, s, addr.1));
            }
        }
    }
    by_ip
}

/// A container no granted service matches: listed as not routed if a refused service
/// matches it (with the refusal), else not at all.
fn not_served(refused: &[Refused], c: &Container, routing: &mut Routing) {
    let Some(i) = refused
        .iter()
        .position(|r| matches(&r.definition.matches, c))
    else {
        return;
    };
    let r = &refused[i];
    routing.refused[i].containers.push(c.name.clone());
    routing.containers.push(ContainerRoute {
        id: c.id.clone(),
        name: c.name.clone(),
        service: r.definition.name.clone(),
        backend: r.definition.backend_name().to_owned(),
        address: None,
        not_routed: Some(format!("its service is refused: {}", r.refusal)),
    });
}

/// Per service with routed containers: their names and the oldest start among them.
type Routed<'s> = BTreeMap<&'s str, (Vec<String>, (String, u64))>;

/// The routed containers into the backends' servers and `routing.containers`.
fn record_routed<'s>(by_ip: &Placed<'_, 's>, routing: &mut Routing) -> Routed<'s> {
    let mut routed: Routed<'s> = BTreeMap::new();
    for (c, s, addr) in by_ip.values() {
        routing
            .servers
            .entry(s.backend_name().to_owned())
            .or_default()
            .insert(addr.clone());
        let e = routed
            .entry(s.name.as_str())
            .or_insert_with(|| (Vec::new(), start_order(&c.started_at)));
        e.0.push(c.name.clone());
        e.1 = e.1.clone().min(start_order(&c.started_at));
        routing.containers.push(ContainerRoute {
            id: c.id.clone(),
            name: c.name.clone(),
            service: s.name.clone(),
            backend: s.backend_name().to_owned(),
            address: Some(addr.clone()),
            not_routed: None,
        });
    }
    routed
}

/// The keys (front-ends, front-end ports) claimed by each service with a live backend.
fn claims_of<'s>(
    unique: &[&'s ServiceDefinition],
    routed: &Routed<'_>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Vec<Claim<'s>>> {
    let mut claims: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for s in unique {
        let Some((names, oldest)) = routed.get(s.name.as_str()) else {
            continue;
        };
        let mut keys: Vec<String> = Vec::new();
        for f in &s.frontends {
            match normalise_frontend(f) {
                Ok(f) => keys.push(frontend_key(&f)),
                Err(why) => {
                    warnings.push(format!("service {:?}: front-end refused: {why}", s.name))
                }
            }
        }
        keys.extend(s.frontend_port.map(port_key));
        keys.sort();
        keys.dedup();
        for key in keys {
            claims.entry(key).or_default().push(Claim {
                service: &s.name,
                backend: s.backend_name(),
                oldest: oldest.clone(),
                containers: names.clone(),
            });
        }
    }
    claims
}

/// The load balancers and target groups this host should be in (a live backend) or
/// leave after a drain.
fn memberships(unique: &[&ServiceDefinition], routing: &mut Routing, warnings: &mut Vec<String>) {
    let mut elb_drains = BTreeMap::new();
    let mut group_drains = BTreeMap::new();
    for s in unique {
        let backend = s.backend_name();
        let live = routing.servers.get(backend).is_some_and(|v| !v.is_empty());
        let drain = s.drain_seconds.map(|secs| {
            if secs > MAX_DRAIN_SECS {
                warnings.push(format!(
                    "service {:?}: drain of {secs} s is above {MAX_DRAIN_SECS} s; {MAX_DRAIN_SECS} s is used",
                    s.name
                ));
            }
            Duration::from_secs(secs.min(MAX_DRAIN_SECS))
        });
        if let Some(elb) = &s.elb {
            want_in(&mut routing.elbs, &mut elb_drains, elb.clone(), live, drain);
        }
        for group in &s.target_groups {
            let key = TargetGroupKey {
                group: group.clone(),
                port: s.frontend_port,
            };
            want_in(
                &mut routing.target_groups,
                &mut group_drains,
                key,
                live,
                drain,
            );
        }
    }
}

/// The routing table as the entries warden should own in Redis.
pub fn owned_entries(r: &Routing) -> BTreeSet<Entry> {
    let servers = r
        .servers
        .iter()
        .flat_map(|(b, addrs)| addrs.iter().map(move |a| Entry::server(b, a)));
    let strings = r.strings.iter().map(|(k, b)| Entry::key(k, b));
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
            manage: None,
            target_groups: Vec::new(),
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
        let (r, w) = desired(&[web], [&a, &b, &c, &other], &BTreeMap::new());
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
    fn a_refused_definition_routes_nothing_and_names_its_containers() {
        let mut evil = service("evil", &[("svc", "evil")]);
        evil.frontends = vec!["web.example".into()];
        evil.elb = Some("payments".into());
        evil.frontend_port = Some(80);
        let refusal = crate::grants::Grants::default()
            .load_balancer("payments")
            .unwrap_err();
        let refused = [Refused {
            source: "registrar.sources[0] (docker-labels)".into(),
            definition: evil,
            refusal,
        }];
        let a = container("a", "evil-1", &[("svc", "evil")], "172.17.0.9");
        let (r, _) = desired_screened(&[], &refused, [&a], &BTreeMap::new());
        assert!(r.servers.is_empty() && r.strings.is_empty() && r.elbs.is_empty());
        assert!(
            r.ports.is_empty(),
            "a refused service's port is not listened on"
        );
        assert_eq!(r.refused.len(), 1);
        assert_eq!(r.refused[0].containers, vec!["evil-1".to_owned()]);
        assert!(
            r.refused[0]
                .to_string()
                .contains("load balancer \"payments\""),
            "{}",
            r.refused[0]
        );
        assert!(r.containers[0]
            .not_routed
            .as_deref()
            .is_some_and(|w| w.contains("refused")));
    }

    #[test]
    fn target_groups_are_wanted_with_the_router_port_and_the_longest_drain() {
        let mut web = service("web", &[("svc", "web")]);
        web.frontend_port = Some(8001);
        web.elb = Some("web-elb".into());
        web.target_groups = vec!["web-tg".into(), "ip-tg".into()];
        web.drain_seconds = Some(5);
        let mut api = service("api", &[("svc", "api")]);
        api.target_groups = vec!["web-tg".into()];
        api.drain_seconds = Some(20);
        let a = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        let (r, _) = desired(&[web, api], [&a], &BTreeMap::new());
        let key = |g: &str, port| TargetGroupKey {
            group: g.into(),
            port,
        };
        assert_eq!(
            r.target_groups[&key("web-tg", Some(8001))],
            ElbWant {
                wanted: true,
                drain: Duration::from_secs(5)
            }
        );
        assert!(r.target_groups[&key("ip-tg", Some(8001))].wanted);
        // api has no router port and no container: its own membership, not wanted.
        assert_eq!(
            r.target_groups[&key("web-tg", None)],
            ElbWant {
                wanted: false,
                drain: Duration::from_secs(20)
            }
        );
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
        let (r, _) = desired(&[web], [&a], &BTreeMap::new());
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
        let (r, _) = desired(&[service("web", &[("svc", "web")])], [&c], &BTreeMap::new());
        assert_eq!(r.servers["web"], BTreeSet::from(["10.1.0.2:80".into()]));
        let mut s = service("web", &[("svc", "web")]);
        s.network = Some("zeta".into());
        let (r, _) = desired(&[s.clone()], [&c], &BTreeMap::new());
        assert_eq!(r.servers["web"], BTreeSet::from(["10.9.0.2:80".into()]));
        s.network = Some("nope".into());
        let (r, w) = desired(&[s], [&c], &BTreeMap::new());
        assert!(r.servers.is_empty());
        assert!(w[0].contains("web-1") && w[0].contains("nope"), "{w:?}");
    }

    #[test]
    fn port_comes_from_the_service_or_the_single_exposed_port() {
        let mut c = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        c.exposed_tcp = BTreeSet::from([80, 443]);
        let (r, w) = desired(&[service("web", &[("svc", "web")])], [&c], &BTreeMap::new());
        assert!(r.servers.is_empty());
        assert!(w[0].contains("several ports (80, 443)"), "{w:?}");
        let mut s = service("web", &[("svc", "web")]);
        s.port = Some(443);
        let (r, _) = desired(&[s], [&c], &BTreeMap::new());
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
        let (r, _) = desired(&services, [&old, &new], &BTreeMap::new());
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
    fn owned_entries_are_servers_and_keys() {
        let mut r = Routing::default();
        r.servers
            .insert("web".into(), BTreeSet::from(["1.2.3.4:80".into()]));
        r.strings
            .insert("frontend:example.com".into(), "web".into());
        assert_eq!(
            owned_entries(&r),
            BTreeSet::from([
                Entry::server("web", "1.2.3.4:80"),
                Entry::key("frontend:example.com", "web")
            ])
        );
    }

    fn claimant(name: &str, frontend: &str, port: Option<u16>) -> ServiceDefinition {
        let mut s = service(name, &[("svc", name)]);
        s.frontends = vec![frontend.into()];
        s.frontend_port = port;
        s
    }

    #[test]
    fn the_holder_keeps_its_frontend_and_port_whatever_the_names() {
        let mut web = container("a", "p-web-1", &[("svc", "p-web")], "172.17.0.2");
        web.started_at = "2026-11-27T02:00:00Z".into();
        let mut evil = container("b", "zz-evil-1", &[("svc", "zz-evil")], "172.17.0.3");
        evil.started_at = "2026-11-27T01:00:00Z".into();
        let services = [
            claimant("p-web", "p-web.example", Some(8001)),
            claimant("zz-evil", "p-web.example", Some(8001)),
        ];
        let held = BTreeMap::from([
            ("frontend:p-web.example".to_owned(), "p-web".to_owned()),
            ("warden:port:8001".to_owned(), "p-web".to_owned()),
        ]);
        // zz-evil's container is even older: the holder still keeps both.
        let (r, _) = desired(&services, [&web, &evil], &held);
        assert_eq!(r.strings["frontend:p-web.example"], "p-web");
        assert_eq!(r.strings["warden:port:8001"], "p-web");
        assert_eq!(r.conflicts.len(), 2, "{:?}", r.conflicts);
        let c = &r.conflicts[0];
        assert_eq!(
            (c.holder.as_str(), c.refused.as_str()),
            ("p-web", "zz-evil")
        );
        assert_eq!(c.refused_containers, vec!["zz-evil-1".to_owned()]);
        assert!(
            c.to_string()
                .contains("front-end p-web.example belongs to service \"p-web\""),
            "{c}"
        );
        assert!(
            r.servers.contains_key("zz-evil"),
            "its servers are still routed"
        );
    }

    #[test]
    fn without_a_holder_the_oldest_container_wins_never_the_name() {
        let mut a = container("a", "aa-1", &[("svc", "aa")], "172.17.0.2");
        a.started_at = "2026-11-27T01:00:00.5Z".into();
        let mut z = container("z", "zz-1", &[("svc", "zz")], "172.17.0.3");
        z.started_at = "2026-11-27T01:00:00.123Z".into();
        let services = [
            claimant("aa", "x.example", None),
            claimant("zz", "x.example", None),
        ];
        let (r, _) = desired(&services, [&a, &z], &BTreeMap::new());
        assert_eq!(
            r.strings["frontend:x.example"], "zz",
            "0.123 s is earlier than 0.5 s"
        );
    }

    #[test]
    fn when_the_holder_goes_the_claimant_takes_it_in_the_same_decision() {
        let mut web = container("a", "p-web-1", &[("svc", "p-web")], "172.17.0.2");
        web.stopping = true;
        let evil = container("b", "zz-evil-1", &[("svc", "zz-evil")], "172.17.0.3");
        let services = [
            claimant("p-web", "p-web.example", None),
            claimant("zz-evil", "p-web.example", None),
        ];
        let held = BTreeMap::from([("frontend:p-web.example".to_owned(), "p-web".to_owned())]);
        let (r, _) = desired(&services, [&web, &evil], &held);
        assert_eq!(r.strings["frontend:p-web.example"], "zz-evil");
        assert!(r.conflicts.is_empty());
        let stopped = r.containers.iter().find(|c| c.name == "p-web-1").unwrap();
        assert_eq!(stopped.not_routed.as_deref(), Some("being stopped"));
    }

    #[test]
    fn a_bad_frontend_from_any_source_is_refused_here_too() {
        let mut s = service("web", &[("svc", "web")]);
        s.frontends = vec!["ok.example".into(), "bad.example/x\tevil".into()];
        let c = container("a", "web-1", &[("svc", "web")], "172.17.0.2");
        let (r, w) = desired(&[s], [&c], &BTreeMap::new());
        assert_eq!(r.strings.len(), 1);
        assert!(
            w[0].contains("front-end refused") && w[0].contains("web"),
            "{w:?}"
        );
    }

    #[test]
    fn start_times_order_by_value() {
        assert!(start_order("2026-11-27T01:00:00.123Z") < start_order("2026-11-27T01:00:00.5Z"));
        assert!(
            start_order("2026-11-27T01:00:00Z") < start_order("2026-11-27T01:00:00.000000001Z")
        );
        assert!(start_order("2026-11-27T01:00:01Z") > start_order("2026-11-27T01:00:00.999Z"));
    }
}
