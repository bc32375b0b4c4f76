//! The container store: what warden knows of the host's containers.
//!
//! Docker events and re-lists only update this store; the reconcile reads it. An event
//! never acts on its own: `kill` with SIGTERM/SIGKILL (or `stop`) marks a container as
//! stopping, so the next reconcile drops it from its backend before it exits.

use std::collections::{BTreeMap, BTreeSet};

use warden_plugin_api::ContainerView;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No HEALTHCHECK: routed while running.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn parse(s: &str) -> Health {
        match s.trim() {
            "starting" => Health::Starting,
            "healthy" => Health::Healthy,
            "unhealthy" => Health::Unhealthy,
            _ => Health::None,
        }
    }
}

/// A running container as the registrar needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Network name → IPv4 address (networks without an address are left out).
    pub networks: BTreeMap<String, String>,
    /// TCP ports the image exposes.
    pub exposed_tcp: BTreeSet<u16>,
    pub health: Health,
    /// Docker's `State.StartedAt` (RFC 3339): the newest start wins an IP conflict.
    pub started_at: String,
    pub stopping: bool,
    pub paused: bool,
}

impl Container {
    /// Whether traffic may go to it now.
    pub fn routable(&self) -> bool {
        !self.stopping && !self.paused && matches!(self.health, Health::None | Health::Healthy)
    }

    pub fn view(&self) -> ContainerView {
        ContainerView {
            id: self.id.clone(),
            name: self.name.clone(),
            image: self.image.clone(),
            labels: self.labels.clone(),
            started_at: self.started_at.clone(),
        }
    }
}

/// A container event, reduced to what the store needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start(String),
    Kill {
        id: String,
        signal: String,
    },
    Stop(String),
    Die(String),
    Destroy(String),
    Health {
        id: String,
        status: Health,
    },
    Pause(String),
    Unpause(String),
    /// Network connect/disconnect, rename: the container must be inspected again.
    Changed(String),
}

/// What the caller must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Inspect the container and [`Store::upsert`] it (`started`: it just started).
    Inspect {
        id: String,
        started: bool,
    },
}

/// Signals that end a container: the ones `docker stop` and ECS's StopTask send.
pub fn is_stop_signal(signal: &str) -> bool {
    matches!(
        signal.trim(),
        "15" | "9" | "SIGTERM" | "SIGKILL" | "TERM" | "KILL"
    )
}

/// Only containers carrying this label are considered (`key`, or `key=value`), like
/// Traefik's `exposedByDefault = false`: others on the engine are none of warden's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub key: String,
    pub value: Option<String>,
}

impl Selector {
    /// `key` or `key=value`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_owned())),
            None => (s.trim(), None),
        };
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{s:?}: expected a label name, or name=value (no spaces)"
            ));
        }
        Ok(Selector {
            key: key.to_owned(),
            value,
        })
    }

    pub fn admits(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(v), Some(want)) => v == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Store {
    /// Containers without the label are left out entirely.
    pub selector: Option<Selector>,
    containers: BTreeMap<String, Container>,
    /// True once a full list has been read since the last (re)connection to Docker:
    /// only then is "no container of this service" positive knowledge.
    pub synced: bool,
    /// Ignore stop signals and wait for `die` (comparison mode, see the config).
    pub die_only: bool,
}

impl Store {
    pub fn new(die_only: bool) -> Store {
        Store {
            die_only,
            ..Store::default()
        }
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Container> {
        self.containers.get(id)
    }

    pub fn containers(&self) -> impl Iterator<Item = &Container> {
        self.containers.values()
    }

    pub fn views(&self) -> Vec<ContainerView> {
        self.containers
            .values()
            .filter(|c| !c.stopping)
            .map(Container::view)
            .collect()
    }

    /// Applies an event; says whether the container must be inspected.
    pub fn apply(&mut self, event: Event) -> Need {
        match event {
            Event::Start(id) => Need::Inspect { id, started: true },
            Event::Changed(id) => {
                if self.containers.contains_key(&id) {
                    Need::Inspect { id, started: false }
                } else {
                    Need::Nothing
                }
            }
            Event::Kill { id, signal } => {
                if is_stop_signal(&signal) {
                    self.mark_stopping(&id);
                }
                Need::Nothing
            }
            Event::Stop(id) => {
                self.mark_stopping(&id);
                Need::Nothing
            }
            Event::Die(id) | Event::Destroy(id) => {
                self.containers.remove(&id);
                Need::Nothing
            }
            Event::Health { id, status } => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.health = status;
                }
                Need::Nothing
            }
            Event::Pause(id) => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.paused = true;
                }
                Need::Nothing
            }
            Event::Unpause(id) => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.paused = false;
                }
                Need::Nothing
            }
        }
    }

    fn mark_stopping(&mut self, id: &str) {
        if self.die_only {
            return;
        }
        if let Some(c) = self.containers.get_mut(id) {
            if !c.stopping {
                crate::metrics::get().drains.inc();
            }
            c.stopping = true;
        }
    }

    /// Stores a freshly inspected running container. A container that just started is no
    /// longer stopping; otherwise a stopping mark is kept.
    pub fn upsert(&mut self, mut c: Container, started: bool) {
        if !self.admits(&c) {
            return;
        }
        if let Some(old) = self.containers.get(&c.id) {
            if !started {
                c.stopping |= old.stopping;
            }
        }
        self.containers.insert(c.id.clone(), c);
    }

    fn admits(&self, c: &Container) -> bool {
        self.selector.as_ref().is_none_or(|s| s.admits(&c.labels))
    }

    /// Replaces everything with a full list of running containers, keeping the stopping
    /// marks of those still listed (a container being stopped still runs for a while).
    pub fn replace_all(&mut self, list: Vec<Container>) {
        let old = std::mem::take(&mut self.containers);
        let list: Vec<Container> = list.into_iter().filter(|c| self.admits(c)).collect();
        for mut c in list {
            if let Some(prev) = old.get(&c.id) {
                c.stopping |= prev.stopping;
            }
            self.containers.insert(c.id.clone(), c);
        }
        self.synced = true;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_selector_leaves_other_containers_out() {
        let sel = Selector::parse("warden.enable=true").unwrap();
        let mut s = Store {
            selector: Some(sel),
            ..Store::default()
        };
        let yes = container("a", "a", &[("warden.enable", "true")], "172.17.0.2");
        let no = container("b", "b", &[("warden.enable", "false")], "172.17.0.3");
        let bare = container("c", "c", &[], "172.17.0.4");
        s.replace_all(vec![yes, no.clone(), bare]);
        s.upsert(no, true);
        assert_eq!(s.len(), 1);
        assert!(Selector::parse("").is_err());
        assert!(Selector::parse("a b").is_err());
        assert!(Selector::parse("warden")
            .unwrap()
            .admits(&BTreeMap::from([("warden".to_owned(), String::new())])));
    }

    pub(crate) fn container(id: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> Container {
        Container {
            id: id.into(),
            name: name.into(),
            image: "warden-test/busybox:latest".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: BTreeMap::from([("bridge".to_string(), ip.to_string())]),
            exposed_tcp: BTreeSet::from([80]),
            health: Health::None,
            started_at: "2026-11-27T00:00:00Z".into(),
            stopping: false,
            paused: false,
        }
    }

    #[test]
    fn docker_stop_marks_stopping_at_kill_and_removes_at_die() {
        let mut s = Store::default();
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), true);
        assert_eq!(
            s.apply(Event::Kill {
                id: "a".into(),
                signal: "15".into()
            }),
            Need::Nothing
        );
        assert!(s.get("a").unwrap().stopping && !s.get("a").unwrap().routable());
        s.apply(Event::Die("a".into()));
        assert!(s.get("a").is_none());
        // A late `stop` for a container already gone changes nothing.
        s.apply(Event::Stop("a".into()));
        assert!(s.is_empty());
    }

    #[test]
    fn other_signals_do_not_stop() {
        let mut s = Store::default();
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), true);
        s.apply(Event::Kill {
            id: "a".into(),
            signal: "1".into(),
        });
        assert!(
            s.get("a").unwrap().routable(),
            "SIGHUP is a reload, not a stop"
        );
        s.apply(Event::Kill {
            id: "a".into(),
            signal: "SIGKILL".into(),
        });
        assert!(!s.get("a").unwrap().routable());
    }

    #[test]
    fn a_restart_clears_the_stopping_mark_but_a_reinspect_does_not() {
        let mut s = Store::default();
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), true);
        s.apply(Event::Stop("a".into()));
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), false);
        assert!(s.get("a").unwrap().stopping);
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), true);
        assert!(!s.get("a").unwrap().stopping);
    }

    #[test]
    fn health_gates_routing() {
        let mut s = Store::default();
        let mut c = container("a", "web-1", &[], "172.17.0.2");
        c.health = Health::Starting;
        s.upsert(c, true);
        assert!(!s.get("a").unwrap().routable());
        s.apply(Event::Health {
            id: "a".into(),
            status: Health::Healthy,
        });
        assert!(s.get("a").unwrap().routable());
        s.apply(Event::Health {
            id: "a".into(),
            status: Health::Unhealthy,
        });
        assert!(!s.get("a").unwrap().routable());
    }

    #[test]
    fn relist_keeps_stopping_marks_and_drops_the_vanished() {
        let mut s = Store::default();
        s.upsert(container("a", "web-1", &[], "172.17.0.2"), true);
        s.upsert(container("b", "web-2", &[], "172.17.0.3"), true);
        s.apply(Event::Stop("a".into()));
        s.replace_all(vec![
            container("a", "web-1", &[], "172.17.0.2"),
            container("c", "web-3", &[], "172.17.0.4"),
        ]);
        assert!(s.get("a").unwrap().stopping);
        assert!(s.get("b").is_none());
        assert!(s.synced);
    }
}
