//! The apply step for routes: Redx's keys in the local Redis, written so that nothing
//! anyone else wrote is ever changed.
//!
//! [`RouteStore`] is the I/O edge (a trait, so the registrar loop is tested with a fake):
//! read what warden owns, read what Redis holds for a set of entries (one round trip),
//! and run a batch of writes in one atomic Lua script. [`Routes`] keeps what was last
//! applied, so a reconcile that changes nothing sends nothing, and runs the full
//! verification (every few seconds, at every resync and after every reconnect): what
//! warden should own is compared key by key with what Redis holds, and whatever drifted
//! is rewritten — unless another writer's value is there, which is left alone and
//! reported.
//!
//! The script's rules: a front-end key is set only if it is absent, already holds the
//! value, or holds warden's own earlier value; it is deleted only if it still holds
//! warden's value and no other writer has a server behind it. Server fields are warden's
//! own (`ip:port` of its containers); it adds and removes only those. Every batch that
//! changes a route bumps `warden:routes:version` and publishes it on `warden:routes`, for
//! the router.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use redis::Script;

use super::entry::{self, Actual, Blocked, Entry, Op};

pub const VERSION_KEY: &str = "warden:routes:version";
pub const CHANNEL: &str = "warden:routes";

pub fn owned_key(instance: &str) -> String {
    format!("warden:owned:{instance}")
}

/// `warden routes` reads what each warden says of its containers here.
pub fn state_key(instance: &str) -> String {
    format!("warden:registrar:{instance}")
}

/// Applies a batch of writes atomically. ARGV: (op, a, b, c, d, e) six at a time.
const APPLY: &str = r#"
local owned = KEYS[1]
local blocked = {}
local changed = 0
local function others_have_servers(backend, ours)
  local mine = {}
  for a in string.gmatch(ours, '%S+') do mine[a] = true end
  for _, f in ipairs(redis.call('HKEYS', 'backend:' .. backend)) do
    if string.sub(f, 1, 1) ~= '_' and not mine[f] then return true end
  end
  return false
end
for i = 1, #ARGV, 6 do
  local op, a, b, c, d, e = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if op == 'HSET' then
    changed = changed + redis.call('HSET', 'backend:' .. a, b, '0')
    redis.call('SADD', owned, c)
  elseif op == 'HDEL' then
    changed = changed + redis.call('HDEL', 'backend:' .. a, b)
    redis.call('SREM', owned, c)
  elseif op == 'SET' then
    local cur = redis.call('GET', a)
    if e ~= '' then redis.call('SREM', owned, e) end
    if cur == false or cur == b or (d ~= '' and cur == d) then
      if cur ~= b then
        redis.call('SET', a, b)
        changed = changed + 1
      end
      redis.call('SADD', owned, c)
    else
      blocked[#blocked + 1] = a
      blocked[#blocked + 1] = cur
    end
  elseif op == 'DEL' then
    if redis.call('GET', a) == b and not others_have_servers(b, d) then
      changed = changed + redis.call('DEL', a)
    end
    redis.call('SREM', owned, c)
  elseif op == 'MIG' then
    redis.call('SREM', owned, a)
    redis.call('SADD', owned, c)
  elseif op == 'FORGET' then
    redis.call('SREM', owned, c)
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
if changed > 0 then
  local v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', KEYS[3], v)
end
return blocked
"#;

/// A local Redis operation that failed; the text names the address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("local redis {addr}: {message}")]
pub struct RouteError {
    pub addr: String,
    pub message: String,
}

/// The registrar's edge to the local Redis.
pub trait RouteStore: Send + 'static {
    /// The owned set's members, decoded (`None` for a member warden cannot read).
    fn owned(
        &mut self,
    ) -> impl Future<Output = Result<Vec<(String, Option<Entry>)>, RouteError>> + Send;
    /// What Redis holds for these entries, in one round trip.
    fn read(
        &mut self,
        entries: &BTreeSet<Entry>,
    ) -> impl Future<Output = Result<Actual, RouteError>> + Send;
    /// Runs the writes atomically; `after` is what warden owns once they ran (its
    /// remaining servers decide whether a key may go). Returns the keys left alone (key,
    /// value found).
    fn write(
        &mut self,
        ops: &[Op],
        after: &BTreeSet<Entry>,
    ) -> impl Future<Output = Result<Vec<(String, String)>, RouteError>> + Send;
    /// Publishes the registrar's account of its containers for `warden routes`.
    fn publish_state(&mut self, json: &str) -> impl Future<Output = Result<(), RouteError>> + Send;
}

/// The local Redis.
pub struct RedisStore {
    /// One connection, dropped on a timeout or I/O error (TCP keepalive and a user
    /// timeout notice a peer that stopped answering) and made again on the next call.
    link: crate::redis_link::Link,
    addr: String,
    owned_key: String,
    state_key: String,
    script: Script,
    /// Keyspace notifications were checked on the current connection.
    notifications_checked: bool,
    /// Said that they cannot be enabled (said once).
    said_notifications: bool,
}

/// The keyspace notification classes the router listens to: keyspace events (K) for
/// string (`$`), hash (`h`) and generic (`g`: DEL, RENAME, EXPIRE) commands and expiry
/// (`x`). `A` stands for all classes but K and E.
const NOTIFY_CLASSES: [char; 4] = ['$', 'h', 'g', 'x'];

/// The `notify-keyspace-events` value that adds what the router needs to `current`, or
/// `None` if it has it already.
pub fn notifications_needed(current: &str) -> Option<String> {
    let has = |c: char| current.contains(c) || (c != 'K' && current.contains('A'));
    let missing: String = std::iter::once('K')
        .chain(NOTIFY_CLASSES)
        .filter(|c| !has(*c))
        .collect();
    (!missing.is_empty()).then(|| format!("{current}{missing}"))
}

impl RedisStore {
    pub fn new(
        url: &str,
        ca_file: Option<&std::path::Path>,
        instance: &str,
    ) -> Result<Self, RouteError> {
        let addr = crate::redis_util::addr(url);
        let two = std::time::Duration::from_secs(2);
        let endpoint = crate::redis_link::Endpoint::new(
            url,
            ca_file,
            crate::redis_link::Timeouts {
                connect: two,
                response: two,
            },
        )
        .map_err(|message| RouteError {
            addr: addr.clone(),
            message,
        })?;
        Ok(Self {
            link: crate::redis_link::Link::new(endpoint),
            addr,
            owned_key: owned_key(instance),
            state_key: state_key(instance),
            script: Script::new(APPLY),
            notifications_checked: false,
            said_notifications: false,
        })
    }

    /// Other writers' route changes reach the router at once only through keyspace
    /// notifications: enable the classes it needs on the local Redis (warden's own) if
    /// they are off, once per connection (a restarted Redis forgets a CONFIG SET).
    async fn ensure_notifications(&mut self, conn: &mut redis::aio::MultiplexedConnection) {
        let got: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(conn)
            .await;
        let result = match got {
            Ok(v) => {
                let current = v.get(1).cloned().unwrap_or_default();
                match notifications_needed(&current) {
                    None => Ok(()),
                    Some(wanted) => redis::cmd("CONFIG")
                        .arg("SET")
                        .arg("notify-keyspace-events")
                        .arg(&wanted)
                        .query_async::<()>(conn)
                        .await
                        .map(|()| {
                            tracing::info!(redis = %self.addr, was = %current, now = %wanted, "local Redis: keyspace notifications enabled, so that the router serves other writers' route changes at once");
                        }),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.notifications_checked = true,
            Err(e) if crate::redis_link::drops_connection(&e) => {}
            Err(e) => {
                // CONFIG renamed or not allowed: the router's full reload still follows.
                self.notifications_checked = true;
                if !self.said_notifications {
                    self.said_notifications = true;
                    tracing::warn!(redis = %self.addr, error = %crate::redis_util::describe(&e), "local Redis: cannot enable keyspace notifications (notify-keyspace-events K$hgx); route changes by other writers reach the router at its full reload (5 s) instead of at once");
                }
            }
        }
    }

    /// The error as an operator reads it; one that says the connection is no good
    /// drops it, so the next call connects again.
    fn err(&mut self, e: redis::RedisError) -> RouteError {
        if crate::redis_link::drops_connection(&e) {
            self.link.reset();
            self.notifications_checked = false;
        }
        RouteError {
            addr: self.addr.clone(),
            message: crate::redis_util::describe(&e),
        }
    }

    async fn conn(&mut self) -> Result<redis::aio::MultiplexedConnection, RouteError> {
        match self.link.get().await {
            Ok(mut c) => {
                if !self.notifications_checked {
                    self.ensure_notifications(&mut c).await;
                }
                Ok(c)
            }
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Our servers of `backend` among `entries`, space-separated (for the DEL rule).
fn ours_in(backend: &str, entries: &BTreeSet<Entry>) -> String {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Server { backend: b, addr } if b == backend => Some(addr.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The script's arguments for `ops`; `after` is what warden owns once they ran.
fn args(ops: &[Op], after: &BTreeSet<Entry>) -> Vec<String> {
    let mut out = Vec::with_capacity(ops.len() * 6);
    for op in ops {
        let six: [String; 6] = match op {
            Op::AddServer(e @ Entry::Server { backend, addr }) => [
                "HSET".into(),
                backend.clone(),
                addr.clone(),
                e.encode(),
                String::new(),
                String::new(),
            ],
            Op::RemoveServer(e @ Entry::Server { backend, addr }) => [
                "HDEL".into(),
                backend.clone(),
                addr.clone(),
                e.encode(),
                String::new(),
                String::new(),
            ],
            Op::SetKey {
                entry: e @ Entry::Key { key, backend },
                replaces,
            } => {
                let (old, old_member) = match replaces {
                    Some(r @ Entry::Key { backend, .. }) => (backend.clone(), r.encode()),
                    _ => (String::new(), String::new()),
                };
                [
                    "SET".into(),
                    key.clone(),
                    backend.clone(),
                    e.encode(),
                    old,
                    old_member,
                ]
            }
            Op::RemoveKey(e @ Entry::Key { key, backend }) => [
                "DEL".into(),
                key.clone(),
                backend.clone(),
                e.encode(),
                ours_in(backend, after),
                String::new(),
            ],
            Op::Reencode { member, entry } => [
                "MIG".into(),
                member.clone(),
                String::new(),
                entry.encode(),
                String::new(),
                String::new(),
            ],
            Op::Forget(e) => [
                "FORGET".into(),
                String::new(),
                String::new(),
                e.encode(),
                String::new(),
                String::new(),
            ],
            other => unreachable!("malformed op {other:?}"),
        };
        out.extend(six);
    }
    out
}

impl RouteStore for RedisStore {
    async fn owned(&mut self) -> Result<Vec<(String, Option<Entry>)>, RouteError> {
        let mut conn = self.conn().await?;
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.owned_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(members
            .into_iter()
            .map(|m| {
                let e = Entry::decode(&m);
                (m, e)
            })
            .collect())
    }

    async fn read(&mut self, entries: &BTreeSet<Entry>) -> Result<Actual, RouteError> {
        let mut keys: Vec<&str> = Vec::new();
        let mut backends: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in entries {
            match e {
                Entry::Key { key, .. } => keys.push(key),
                Entry::Server { backend, addr } => backends.entry(backend).or_default().push(addr),
            }
        }
        let mut pipe = redis::pipe();
        if !keys.is_empty() {
            pipe.cmd("MGET").arg(&keys);
        }
        for (b, addrs) in &backends {
            pipe.cmd("HMGET").arg(format!("backend:{b}")).arg(addrs);
        }
        let mut actual = Actual::default();
        if keys.is_empty() && backends.is_empty() {
            return Ok(actual);
        }
        let mut conn = self.conn().await?;
        let mut replies: Vec<Vec<Option<String>>> =
            pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        if !keys.is_empty() {
            let values = replies.remove(0);
            actual.keys = keys.iter().map(|k| k.to_string()).zip(values).collect();
        }
        for ((b, addrs), values) in backends.iter().zip(replies) {
            for (a, v) in addrs.iter().zip(values) {
                if v.is_some() {
                    actual.servers.insert((b.to_string(), a.to_string()));
                }
            }
        }
        Ok(actual)
    }

    async fn write(
        &mut self,
        ops: &[Op],
        after: &BTreeSet<Entry>,
    ) -> Result<Vec<(String, String)>, RouteError> {
        let mut conn = self.conn().await?;
        let mut invocation = self.script.key(&self.owned_key);
        invocation.key(VERSION_KEY).key(CHANNEL);
        for a in args(ops, after) {
            invocation.arg(a);
        }
        let flat: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(flat
            .chunks_exact(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect())
    }

    async fn publish_state(&mut self, json: &str) -> Result<(), RouteError> {
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(&self.state_key)
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }
}

/// What one apply or verification did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Redis commands sent (reads and the script call).
    pub commands: usize,
    /// Writes in the script (0: nothing changed, no write sent).
    pub writes: usize,
    /// Keys warden wants that hold another writer's value (left alone).
    pub blocked: Vec<Blocked>,
    /// Entries that were missing or changed in Redis and were written back.
    pub repaired: usize,
}

/// What warden last applied, over a [`RouteStore`].
pub struct Routes<S: RouteStore> {
    pub store: S,
    /// What warden believes it owns; `None` until read (start, error, resync).
    applied: Option<BTreeSet<Entry>>,
    /// Desired keys left alone (another writer's value), as last seen.
    blocked: BTreeMap<Entry, Blocked>,
}

impl<S: RouteStore> Routes<S> {
    pub fn new(store: S) -> Self {
        Self {
            store,
            applied: None,
            blocked: BTreeMap::new(),
        }
    }

    /// The keys warden wants that hold another writer's value, as last seen.
    pub fn blocked(&self) -> Vec<Blocked> {
        self.blocked.values().cloned().collect()
    }

    /// Forget what was applied: the next apply reads the owned set back first.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// The string keys warden owns now (key → backend), reading them back if unknown:
    /// who holds a front-end, for the conflict rule.
    pub async fn held(&mut self) -> Result<BTreeMap<String, String>, RouteError> {
        let owned = match &self.applied {
            Some(a) => a.clone(),
            None => self.read_owned().await?.0,
        };
        Ok(owned
            .into_iter()
            .filter_map(|e| match e {
                Entry::Key { key, backend } => Some((key, backend)),
                Entry::Server { .. } => None,
            })
            .collect())
    }

    /// The owned set decoded, and the writes that re-encode members in the older form.
    async fn read_owned(&mut self) -> Result<(BTreeSet<Entry>, Vec<Op>), RouteError> {
        let mut owned = BTreeSet::new();
        let mut reencode = Vec::new();
        for (member, entry) in self.store.owned().await? {
            match entry {
                Some(e) => {
                    if member != e.encode() {
                        reencode.push(Op::Reencode {
                            member,
                            entry: e.clone(),
                        });
                    }
                    owned.insert(e);
                }
                None => {
                    tracing::warn!(member = %member, "an owned-set member warden cannot read; left as it is")
                }
            }
        }
        Ok((owned, reencode))
    }

    /// Makes Redis hold `desired` of warden's entries. Sends nothing when nothing changed
    /// since the last apply.
    pub async fn apply(&mut self, desired: &BTreeSet<Entry>) -> Result<Applied, RouteError> {
        let mut stats = Applied::default();
        if self.applied.as_ref() == Some(desired) {
            return Ok(stats);
        }
        let result = self.apply_inner(desired, &mut stats).await;
        if result.is_err() {
            self.applied = None;
        }
        result.map(|()| stats)
    }

    async fn apply_inner(
        &mut self,
        desired: &BTreeSet<Entry>,
        stats: &mut Applied,
    ) -> Result<(), RouteError> {
        let (owned, mut ops) = match self.applied.take() {
            // Keys left alone earlier are not owned; they are retried by the verification.
            Some(a) => (
                a.iter()
                    .filter(|e| !self.blocked.contains_key(e))
                    .cloned()
                    .collect(),
                Vec::new(),
            ),
            None => {
                stats.commands += 1;
                self.read_owned().await?
            }
        };
        ops.extend(entry::plan(&owned, desired).into_iter().filter(
            |op| !matches!(op, Op::SetKey { entry, .. } if self.blocked.contains_key(entry)),
        ));
        self.run(ops, desired, stats).await?;
        self.blocked.retain(|e, _| desired.contains(e));
        for b in &stats.blocked {
            self.blocked
                .insert(Entry::key(&b.key, &b.wanted), b.clone());
        }
        self.applied = Some(desired.clone());
        Ok(())
    }

    /// The full verification: reads back what warden owns and what Redis holds for every
    /// desired entry (two round trips), and writes whatever drifted.
    pub async fn verify(&mut self, desired: &BTreeSet<Entry>) -> Result<Applied, RouteError> {
        let mut stats = Applied::default();
        let result = self.verify_inner(desired, &mut stats).await;
        if result.is_err() {
            self.applied = None;
        }
        result.map(|()| stats)
    }

    async fn verify_inner(
        &mut self,
        desired: &BTreeSet<Entry>,
        stats: &mut Applied,
    ) -> Result<(), RouteError> {
        let (owned, mut ops) = self.read_owned().await?;
        let actual = self.store.read(desired).await?;
        stats.commands += 2;
        // Leftovers warden owns but no longer wants go as in any apply.
        ops.extend(
            entry::plan(&owned, desired)
                .into_iter()
                .filter(|op| matches!(op, Op::RemoveServer(_) | Op::RemoveKey(_))),
        );
        let (repairs, blocked) = entry::repairs(&owned, desired, &actual);
        stats.repaired = repairs
            .iter()
            .filter(|op| match op {
                Op::AddServer(e) | Op::SetKey { entry: e, .. } => owned.contains(e),
                _ => false,
            })
            .count();
        ops.extend(repairs);
        stats.blocked = blocked;
        self.run(ops, desired, stats).await?;
        self.blocked = stats
            .blocked
            .iter()
            .map(|b| (Entry::key(&b.key, &b.wanted), b.clone()))
            .collect();
        self.applied = Some(desired.clone());
        Ok(())
    }

    /// Runs `ops` (if any); adds the keys the script left alone to `stats.blocked`.
    async fn run(
        &mut self,
        ops: Vec<Op>,
        desired: &BTreeSet<Entry>,
        stats: &mut Applied,
    ) -> Result<(), RouteError> {
        if ops.is_empty() {
            return Ok(());
        }
        stats.commands += 1;
        stats.writes = ops.len();
        let wanted: BTreeMap<String, String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::SetKey {
                    entry: Entry::Key { key, backend },
                    ..
                } => Some((key.clone(), backend.clone())),
                _ => None,
            })
            .collect();
        for (key, found) in self.store.write(&ops, desired).await? {
            let wanted = wanted.get(&key).cloned().unwrap_or_default();
            stats.blocked.push(Blocked { key, wanted, found });
        }
        stats.blocked.sort();
        stats.blocked.dedup();
        Ok(())
    }
}

#[cfg(test)]
mod notify_tests {
    use super::notifications_needed;

    #[test]
    fn only_what_is_missing_is_added() {
        assert_eq!(notifications_needed("").as_deref(), Some("K$hgx"));
        assert_eq!(notifications_needed("Ex").as_deref(), Some("ExK$hg"));
        assert_eq!(notifications_needed("KA"), None);
        assert_eq!(notifications_needed("AK"), None);
        assert_eq!(notifications_needed("A").as_deref(), Some("AK"));
        assert_eq!(notifications_needed("$hgxK"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_arguments_come_six_at_a_time_and_name_our_remaining_servers() {
        let after = BTreeSet::from([Entry::server("web", "10.0.0.3:80")]);
        let a = args(
            &[
                Op::RemoveServer(Entry::server("web", "10.0.0.2:80")),
                Op::RemoveKey(Entry::key("frontend:a", "web")),
            ],
            &after,
        );
        assert_eq!(a.len(), 12);
        assert_eq!(a[6..9], ["DEL", "frontend:a", "web"]);
        assert_eq!(a[10], "10.0.0.3:80");
    }
}
