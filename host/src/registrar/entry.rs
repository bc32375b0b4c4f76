//! What warden owns in the local Redis, and the pure planning of what to write.
//!
//! An [`Entry`] is a server field (`backend:<name>` hash, field `ip:port`) or a string key
//! (`frontend:…`, `warden:port:…`) whose value is a backend name. warden records what it
//! wrote in the set `warden:owned:<instance>`, one member per entry, encoded as a JSON
//! array (`["s","web","10.0.0.2:80"]`, `["k","frontend:example.com","web"]`): no byte of a
//! name can be mistaken for a separator. Members in the earlier tab-separated form
//! (`server\t…`, `string\t…`) are still read, and re-encoded on the next write.
//!
//! [`plan`] turns what warden owns into what it should own; [`repairs`] compares what it
//! should own with what Redis actually holds (keys deleted or changed by someone else,
//! fields removed) and says what to write back, and what to leave alone because another
//! writer's value is there.

use std::collections::{BTreeMap, BTreeSet};

/// One thing warden owns in the local Redis.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry {
    /// Field `addr` of the hash `backend:<backend>`.
    Server { backend: String, addr: String },
    /// String `key` whose value is `backend`.
    Key { key: String, backend: String },
}

impl Entry {
    pub fn server(backend: &str, addr: &str) -> Entry {
        Entry::Server {
            backend: backend.to_owned(),
            addr: addr.to_owned(),
        }
    }

    pub fn key(key: &str, backend: &str) -> Entry {
        Entry::Key {
            key: key.to_owned(),
            backend: backend.to_owned(),
        }
    }

    /// The owned-set member.
    pub fn encode(&self) -> String {
        let v = match self {
            Entry::Server { backend, addr } => ["s", backend, addr],
            Entry::Key { key, backend } => ["k", key, backend],
        };
        serde_json::to_string(&v).expect("strings serialize")
    }

    /// Reads a member in either form; `None` for something warden never wrote.
    pub fn decode(member: &str) -> Option<Entry> {
        if member.starts_with('[') {
            let v: Vec<String> = serde_json::from_str(member).ok()?;
            return match v.as_slice() {
                [t, a, b] if t == "s" => Some(Entry::server(a, b)),
                [t, a, b] if t == "k" => Some(Entry::key(a, b)),
                _ => None,
            };
        }
        // The earlier form: `server\t<backend>\t<addr>`, `string\t<key>\t<backend>`.
        let mut it = member.splitn(3, '\t');
        match (it.next()?, it.next()?, it.next()?) {
            ("server", a, b) => Some(Entry::server(a, b)),
            ("string", a, b) => Some(Entry::key(a, b)),
            _ => None,
        }
    }
}

/// One write in the apply script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// HSET the field; own it.
    AddServer(Entry),
    /// HDEL the field; disown it.
    RemoveServer(Entry),
    /// SET the key unless another writer's value is there (then it is left alone and
    /// reported); `replaces` is warden's earlier value of the key, which it may overwrite.
    SetKey {
        entry: Entry,
        replaces: Option<Entry>,
    },
    /// Disown the key; DEL it only if it still holds this value and no other writer has
    /// a server behind it (another warden sharing the backend keeps its front-end).
    RemoveKey(Entry),
    /// Re-encode a member written in the earlier form.
    Reencode { member: String, entry: Entry },
    /// Disown an entry that Redis shows is no longer warden's (another writer's value).
    Forget(Entry),
}

/// The writes that turn `owned` into `desired`: servers added first, then removed, then
/// keys removed (a key goes only once its backend is empty), then keys set. One atomic
/// script applies them all.
pub fn plan(owned: &BTreeSet<Entry>, desired: &BTreeSet<Entry>) -> Vec<Op> {
    let mut adds = Vec::new();
    let mut removes = Vec::new();
    let mut key_removes = Vec::new();
    let mut sets = Vec::new();
    let owned_keys: BTreeMap<&str, &Entry> = owned
        .iter()
        .filter_map(|e| match e {
            Entry::Key { key, .. } => Some((key.as_str(), e)),
            Entry::Server { .. } => None,
        })
        .collect();
    let desired_keys: BTreeSet<&str> = desired
        .iter()
        .filter_map(|e| match e {
            Entry::Key { key, .. } => Some(key.as_str()),
            Entry::Server { .. } => None,
        })
        .collect();
    for e in desired.difference(owned) {
        match e {
            Entry::Server { .. } => adds.push(Op::AddServer(e.clone())),
            Entry::Key { key, .. } => sets.push(Op::SetKey {
                entry: e.clone(),
                replaces: owned_keys.get(key.as_str()).map(|o| (*o).clone()),
            }),
        }
    }
    for e in owned.difference(desired) {
        match e {
            Entry::Server { .. } => removes.push(Op::RemoveServer(e.clone())),
            // A key whose backend merely changes is overwritten by its SET.
            Entry::Key { key, .. } if !desired_keys.contains(key.as_str()) => {
                key_removes.push(Op::RemoveKey(e.clone()))
            }
            Entry::Key { .. } => {}
        }
    }
    let mut ops = adds;
    ops.extend(removes);
    ops.extend(key_removes);
    ops.extend(sets);
    ops
}

/// What Redis holds for the entries warden wants: each key's value, each field's presence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub keys: BTreeMap<String, Option<String>>,
    pub servers: BTreeSet<(String, String)>,
}

/// A key warden wants that holds another writer's value: left alone, reported.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Blocked {
    pub key: String,
    pub wanted: String,
    pub found: String,
}

/// Drift repair (pure): the writes that bring Redis back to `desired` where it drifted,
/// and the keys left alone. Ownership goes by who wrote the key first: a key warden wrote
/// (it is in the owned set) that was deleted or changed is restored; a key warden never
/// wrote that holds another value is another writer's and is left alone.
pub fn repairs(
    owned: &BTreeSet<Entry>,
    desired: &BTreeSet<Entry>,
    actual: &Actual,
) -> (Vec<Op>, Vec<Blocked>) {
    let mut ops = Vec::new();
    let mut blocked = Vec::new();
    for e in desired {
        match e {
            Entry::Server { backend, addr } => {
                let present = actual.servers.contains(&(backend.clone(), addr.clone()));
                if !present || !owned.contains(e) {
                    ops.push(Op::AddServer(e.clone()));
                }
            }
            Entry::Key { key, backend } => match actual.keys.get(key).cloned().flatten() {
                None => ops.push(Op::SetKey {
                    entry: e.clone(),
                    replaces: None,
                }),
                Some(v) if v == *backend => {
                    if !owned.contains(e) {
                        // Another writer set the same value: warden shares it.
                        ops.push(Op::SetKey {
                            entry: e.clone(),
                            replaces: None,
                        });
                    }
                }
                Some(v) if owned.contains(e) => ops.push(Op::SetKey {
                    entry: e.clone(),
                    replaces: Some(Entry::key(key, &v)),
                }),
                Some(v) => blocked.push(Blocked {
                    key: key.clone(),
                    wanted: backend.clone(),
                    found: v,
                }),
            },
        }
    }
    (ops, blocked)
}

/// What changed between two routing tables, as an operator reads it:
/// `+web 10.0.0.2:80, -web 10.0.0.3:80, +frontend:example.com → web`.
pub fn describe_change(before: Option<&BTreeSet<Entry>>, after: &BTreeSet<Entry>) -> String {
    let empty = BTreeSet::new();
    let before = before.unwrap_or(&empty);
    let show = |sign: char, e: &Entry| match e {
        Entry::Server { backend, addr } => format!("{sign}{backend} {addr}"),
        Entry::Key { key, backend } => format!("{sign}{key} → {backend}"),
    };
    let mut parts: Vec<String> = after.difference(before).map(|e| show('+', e)).collect();
    parts.extend(before.difference(after).map(|e| show('-', e)));
    const MAX: usize = 12;
    if parts.len() > MAX {
        let more = parts.len() - MAX;
        parts.truncate(MAX);
        parts.push(format!("and {more} more"));
    }
    if parts.is_empty() {
        "rewritten as before".into()
    } else {
        parts.join(", ")
    }
}

/// Redis, in memory, with the apply script's rules: for the property tests, and as the
/// reference the Lua script is checked against in the integration tests.
#[cfg(test)]
pub mod model {
    use super::*;

    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Redis {
        pub strings: BTreeMap<String, String>,
        pub hashes: BTreeMap<String, BTreeSet<String>>,
        pub owned: BTreeSet<String>,
    }

    impl Redis {
        /// A server field in the backend that warden does not own.
        fn others_have_servers(&self, backend: &str) -> bool {
            self.hashes
                .get(&format!("backend:{backend}"))
                .is_some_and(|f| {
                    f.iter().any(|f| {
                        !f.starts_with('_')
                            && !self.owned.contains(&Entry::server(backend, f).encode())
                    })
                })
        }

        pub fn apply(&mut self, ops: &[Op]) -> Vec<(String, String)> {
            let mut blocked = Vec::new();
            for op in ops {
                match op {
                    Op::AddServer(e @ Entry::Server { backend, addr }) => {
                        self.hashes
                            .entry(format!("backend:{backend}"))
                            .or_default()
                            .insert(addr.clone());
                        self.owned.insert(e.encode());
                    }
                    Op::RemoveServer(e @ Entry::Server { backend, addr }) => {
                        let k = format!("backend:{backend}");
                        if let Some(h) = self.hashes.get_mut(&k) {
                            h.remove(addr);
                            if h.is_empty() {
                                self.hashes.remove(&k);
                            }
                        }
                        self.owned.remove(&e.encode());
                    }
                    Op::SetKey {
                        entry: e @ Entry::Key { key, backend },
                        replaces,
                    } => {
                        let old = replaces.as_ref().and_then(|r| match r {
                            Entry::Key { backend, .. } => Some(backend.clone()),
                            _ => None,
                        });
                        let cur = self.strings.get(key).cloned();
                        if let Some(r) = replaces {
                            self.owned.remove(&r.encode());
                        }
                        if cur.is_none() || cur.as_ref() == Some(backend) || cur == old {
                            self.strings.insert(key.clone(), backend.clone());
                            self.owned.insert(e.encode());
                        } else {
                            blocked.push((key.clone(), cur.unwrap_or_default()));
                        }
                    }
                    Op::RemoveKey(e @ Entry::Key { key, backend }) => {
                        if self.strings.get(key) == Some(backend)
                            && !self.others_have_servers(backend)
                        {
                            self.strings.remove(key);
                        }
                        self.owned.remove(&e.encode());
                    }
                    Op::Reencode { member, entry } => {
                        self.owned.remove(member);
                        self.owned.insert(entry.encode());
                    }
                    Op::Forget(e) => {
                        self.owned.remove(&e.encode());
                    }
                    other => panic!("malformed op {other:?}"),
                }
            }
            blocked
        }

        /// What the entries say Redis should hold.
        pub fn holds_exactly(&self, entries: &BTreeSet<Entry>) -> bool {
            let mut want = Redis::default();
            for e in entries {
                match e {
                    Entry::Server { backend, addr } => {
                        want.hashes
                            .entry(format!("backend:{backend}"))
                            .or_default()
                            .insert(addr.clone());
                    }
                    Entry::Key { key, backend } => {
                        want.strings.insert(key.clone(), backend.clone());
                    }
                }
                want.owned.insert(e.encode());
            }
            *self == want
        }

        pub fn actual(&self, desired: &BTreeSet<Entry>) -> Actual {
            let mut a = Actual::default();
            for e in desired {
                match e {
                    Entry::Server { backend, addr } => {
                        if self
                            .hashes
                            .get(&format!("backend:{backend}"))
                            .is_some_and(|h| h.contains(addr))
                        {
                            a.servers.insert((backend.clone(), addr.clone()));
                        }
                    }
                    Entry::Key { key, .. } => {
                        a.keys.insert(key.clone(), self.strings.get(key).cloned());
                    }
                }
            }
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::model::Redis;
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[Entry]) -> BTreeSet<Entry> {
        v.iter().cloned().collect()
    }

    #[test]
    fn members_round_trip_whatever_the_bytes_and_the_old_form_is_read() {
        let tricky = Entry::key("frontend:p-web.example/x\tzz-evil", "zz\"evil/\n");
        assert_eq!(Entry::decode(&tricky.encode()), Some(tricky));
        assert_eq!(
            Entry::decode("server\tweb\t10.0.0.2:80"),
            Some(Entry::server("web", "10.0.0.2:80"))
        );
        assert_eq!(
            Entry::decode("string\tfrontend:a\tweb"),
            Some(Entry::key("frontend:a", "web"))
        );
        assert_eq!(Entry::decode("garbage"), None);
        assert_eq!(Entry::decode("[\"x\",\"a\",\"b\"]"), None);
    }

    #[test]
    fn nothing_changed_plans_nothing() {
        let s = set(&[
            Entry::server("web", "1.1.1.1:80"),
            Entry::key("frontend:a", "web"),
        ]);
        assert!(plan(&s, &s).is_empty());
    }

    #[test]
    fn a_frontend_moving_backend_is_overwritten_not_deleted() {
        let ops = plan(
            &set(&[Entry::key("frontend:a", "web")]),
            &set(&[Entry::key("frontend:a", "web2")]),
        );
        assert_eq!(
            ops,
            vec![Op::SetKey {
                entry: Entry::key("frontend:a", "web2"),
                replaces: Some(Entry::key("frontend:a", "web"))
            }]
        );
    }

    #[test]
    fn the_last_server_goes_before_its_frontend_is_checked() {
        let ops = plan(
            &set(&[
                Entry::server("web", "1.1.1.1:80"),
                Entry::key("frontend:a", "web"),
            ]),
            &BTreeSet::new(),
        );
        assert!(matches!(ops[0], Op::RemoveServer(_)), "{ops:?}");
        assert!(matches!(ops[1], Op::RemoveKey(_)), "{ops:?}");
    }

    #[test]
    fn another_writers_frontend_is_never_overwritten_nor_deleted() {
        let mut r = Redis::default();
        r.strings.insert("frontend:a".into(), "theirs".into());
        let desired = set(&[
            Entry::server("web", "1.1.1.1:80"),
            Entry::key("frontend:a", "web"),
        ]);
        let blocked = r.apply(&plan(&BTreeSet::new(), &desired));
        assert_eq!(blocked, vec![("frontend:a".into(), "theirs".into())]);
        assert_eq!(r.strings["frontend:a"], "theirs");
        // warden's containers go: the hand-set key stays.
        let owned: BTreeSet<Entry> = r.owned.iter().filter_map(|m| Entry::decode(m)).collect();
        r.apply(&plan(&owned, &BTreeSet::new()));
        assert_eq!(r.strings["frontend:a"], "theirs");
    }

    #[test]
    fn a_shared_backend_keeps_its_frontend_while_another_writer_has_a_server() {
        // Two wardens, same service and host, one Redis.
        let mut r = Redis::default();
        let a = set(&[
            Entry::server("web", "10.0.0.2:80"),
            Entry::key("frontend:a", "web"),
        ]);
        let b = set(&[
            Entry::server("web", "10.0.0.3:80"),
            Entry::key("frontend:a", "web"),
        ]);
        r.apply(&plan(&BTreeSet::new(), &a));
        let owned_a = std::mem::take(&mut r.owned);
        r.apply(&plan(&BTreeSet::new(), &b));
        let owned_b = std::mem::replace(&mut r.owned, owned_a);
        // A's containers stop: A removes its server only; the front-end stays for B.
        r.apply(&plan(&a, &BTreeSet::new()));
        assert_eq!(r.strings.get("frontend:a").map(String::as_str), Some("web"));
        assert_eq!(
            r.hashes["backend:web"],
            BTreeSet::from(["10.0.0.3:80".into()])
        );
        // Then B's go too: now the front-end goes with the last server.
        r.owned = owned_b;
        r.apply(&plan(&b, &BTreeSet::new()));
        assert!(r.strings.is_empty() && r.hashes.is_empty(), "{r:?}");
    }

    #[test]
    fn drift_of_warden_keys_is_repaired_and_another_writers_key_left_alone() {
        let desired = set(&[
            Entry::server("web", "1.1.1.1:80"),
            Entry::key("frontend:a", "web"),
            Entry::key("frontend:b", "web"),
        ]);
        let mut r = Redis::default();
        r.apply(&plan(&BTreeSet::new(), &desired));
        // Someone deletes one of warden's keys and its field, and changes the other key.
        r.strings.remove("frontend:a");
        r.hashes.clear();
        r.strings.insert("frontend:b".into(), "theirs".into());
        // A key warden wants but never wrote holds someone's value from the start.
        r.strings.insert("frontend:c".into(), "hand".into());
        let mut want = desired.clone();
        want.insert(Entry::key("frontend:c", "web"));
        let owned: BTreeSet<Entry> = r.owned.iter().filter_map(|m| Entry::decode(m)).collect();
        let (ops, blocked) = repairs(&owned, &want, &r.actual(&want));
        r.apply(&ops);
        assert_eq!(r.strings["frontend:a"], "web");
        assert_eq!(
            r.strings["frontend:b"], "web",
            "warden's own key is restored"
        );
        assert!(r.hashes["backend:web"].contains("1.1.1.1:80"));
        assert_eq!(r.strings["frontend:c"], "hand");
        assert_eq!(
            blocked,
            vec![Blocked {
                key: "frontend:c".into(),
                wanted: "web".into(),
                found: "hand".into()
            }]
        );
    }

    fn entry() -> impl Strategy<Value = Entry> {
        let name = prop::sample::select(vec!["web", "api", "a\tb", "x\"y", "db"]);
        let addr = prop::sample::select(vec!["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:8080"]);
        let key = prop::sample::select(vec!["frontend:a", "frontend:b/x/", "warden:port:8001"]);
        prop_oneof![
            (name.clone(), addr).prop_map(|(b, a)| Entry::server(b, a)),
            (key, name).prop_map(|(k, b)| Entry::key(k, b)),
        ]
    }

    /// A routing table as the registrar makes it: one backend per key, and a key only
    /// for a backend with a server.
    fn routing() -> impl Strategy<Value = BTreeSet<Entry>> {
        prop::collection::btree_set(entry(), 0..8).prop_map(|mut s| {
            let mut keys = BTreeSet::new();
            let backends: BTreeSet<String> = s
                .iter()
                .filter_map(|e| match e {
                    Entry::Server { backend, .. } => Some(backend.clone()),
                    _ => None,
                })
                .collect();
            s.retain(|e| match e {
                Entry::Key { key, backend } => {
                    backends.contains(backend) && keys.insert(key.clone())
                }
                _ => true,
            });
            s
        })
    }

    proptest! {
        #[test]
        fn any_member_round_trips(a in ".*", b in ".*", server in any::<bool>()) {
            let e = if server { Entry::server(&a, &b) } else { Entry::key(&a, &b) };
            prop_assert_eq!(Entry::decode(&e.encode()), Some(e));
        }

        /// With no other writer, the plan applied to what warden owned yields exactly the
        /// desired state: keys, fields and the owned set.
        #[test]
        fn the_plan_applied_to_any_owned_state_yields_the_desired_state(
            before in routing(),
            after in routing(),
        ) {
            let mut r = Redis::default();
            r.apply(&plan(&BTreeSet::new(), &before));
            prop_assert!(r.holds_exactly(&before));
            let blocked = r.apply(&plan(&before, &after));
            prop_assert!(blocked.is_empty());
            prop_assert!(r.holds_exactly(&after), "{r:?}");
        }

        /// Whatever someone deleted or changed of warden's, the repair brings it back.
        #[test]
        fn repairs_restore_any_deletion_or_change(
            state in routing(),
            drop_keys in any::<bool>(),
            change_keys in any::<bool>(),
            drop_fields in any::<bool>(),
        ) {
            let mut r = Redis::default();
            r.apply(&plan(&BTreeSet::new(), &state));
            if drop_keys { r.strings.clear(); }
            if change_keys {
                for v in r.strings.values_mut() { *v = "theirs".into(); }
            }
            if drop_fields { r.hashes.clear(); }
            let (ops, blocked) = repairs(&state, &state, &r.actual(&state));
            prop_assert!(blocked.is_empty());
            r.apply(&ops);
            prop_assert!(r.holds_exactly(&state), "{r:?}");
        }
    }
}
