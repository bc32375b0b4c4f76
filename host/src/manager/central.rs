//! The manager's two edges to the central Redis, each a small trait so that the elector
//! and the worker are unit-tested with fakes in paused time:
//!
//! * [`LeaseStore`]: the election (lease, heartbeat, competition, kill messages, handover);
//! * [`Ledger`]: the fence before every ECS call, which also journals the call, and the
//!   fenced decision records and policy state.
//!
//! [`Central`] implements both on Redis with one Lua script per step, so each step is
//! atomic. Keys: `warden:leader` (`<id>\t<epoch>\t<az>`, TTL = lease), `warden:epoch`,
//! `warden:heartbeat` (hash id/az/epoch/time_ms), `warden:candidates` (sorted set) with
//! `warden:candidate:<id>` liveness keys, `warden:kill:<id>` (the epoch that deposed it),
//! `warden:host:<id>` (hash az/seen_ms) and `warden:hosts` (sorted set by last seen),
//! `warden:successor` (named by a leader giving up the lease), `warden:wake:<id>` (a
//! follower blocks on it between ticks), `warden:decision:<service>` and
//! `warden:decisions:<service>` (records), `warden:policy:<service>` (policy state),
//! `warden:calls:<service>` (journal of every ECS call about to be sent, with its epoch).

use std::future::Future;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Script;

use crate::redis_link::Link;
use serde::{Deserialize, Serialize};

use super::lease::Lease;
use super::policy::PolicyState;
use super::Record;

pub(crate) const LEADER: &str = "warden:leader";
pub(crate) const EPOCH: &str = "warden:epoch";
pub(crate) const HEARTBEAT: &str = "warden:heartbeat";
pub(crate) const CANDIDATES: &str = "warden:candidates";
pub(crate) const HOSTS: &str = "warden:hosts";
pub(crate) const SUCCESSOR: &str = "warden:successor";

pub(crate) fn candidate_key(id: &str) -> String {
    format!("warden:candidate:{id}")
}
pub(crate) fn kill_key(id: &str) -> String {
    format!("warden:kill:{id}")
}
pub(crate) fn host_key(id: &str) -> String {
    format!("warden:host:{id}")
}
pub(crate) fn wake_key(id: &str) -> String {
    format!("warden:wake:{id}")
}
pub(crate) fn decision_key(service: &str) -> String {
    format!("warden:decision:{service}")
}
pub(crate) fn history_key(service: &str) -> String {
    format!("warden:decisions:{service}")
}
pub(crate) fn policy_key(service: &str) -> String {
    format!("warden:policy:{service}")
}
pub(crate) fn calls_key(service: &str) -> String {
    format!("warden:calls:{service}")
}

/// A central Redis operation that failed; the text names the address, never a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StoreError(pub String);

pub(crate) type StoreResult<T> = Result<T, StoreError>;

/// A host taking part in the election, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveHost {
    pub id: String,
    pub az: String,
    pub age: Duration,
}

/// The election's operations.
pub(crate) trait LeaseStore: Send + Sync + 'static {
    fn leader(&self) -> impl Future<Output = StoreResult<Option<Lease>>> + Send;
    fn heartbeat_age(&self) -> impl Future<Output = StoreResult<Option<Duration>>> + Send;
    /// Extends the lease by `ttl` if it is still ours and no kill message deposed it,
    /// and publishes the heartbeat.
    fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> impl Future<Output = StoreResult<Renewal>> + Send;
    /// Takes the lease if it is free (or exactly `depose`), with a new epoch.
    fn acquire(
        &self,
        id: &str,
        az: &str,
        ttl: Duration,
        depose: Option<&Lease>,
    ) -> impl Future<Output = StoreResult<Option<Lease>>> + Send;
    /// Gives the lease up if it is still ours, naming `successor` (woken at once).
    fn release(
        &self,
        lease: &Lease,
        successor: Option<&str>,
        successor_ttl: Duration,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Enters the competition with a random number that lives `ttl`.
    fn enter(&self, id: &str, ttl: Duration) -> impl Future<Output = StoreResult<()>> + Send;
    /// The highest live entry of the competition.
    fn winner(&self) -> impl Future<Output = StoreResult<Option<String>>> + Send;
    /// The host a departing leader named, if it is still named.
    fn successor(&self) -> impl Future<Output = StoreResult<Option<String>>> + Send;
    /// Records that this host takes part (for `warden status` and handover).
    fn seen(
        &self,
        id: &str,
        az: &str,
        ttl: Duration,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Hosts seen within `max_age`, most recent first.
    fn live_hosts(
        &self,
        max_age: Duration,
    ) -> impl Future<Output = StoreResult<Vec<LiveHost>>> + Send;
    /// Waits up to `max` for a wake-up addressed to `id` (a follower's pause between ticks).
    fn wait_wake(&self, id: &str, max: Duration) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Waits up to `max` for the leader's heartbeat (published with every renewal) or a
    /// wake-up addressed to `id`: a follower that hears the leader sends nothing. Without
    /// a subscription (a fake), a wake-up or nothing.
    /// Drops the heartbeat subscription, to be made again on the next wait: it may be on
    /// a path that died without a word (a failed-over primary).
    fn reset_beats(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    fn wait_beat(&self, id: &str, max: Duration) -> impl Future<Output = StoreResult<Beat>> + Send {
        async move {
            Ok(if self.wait_wake(id, max).await? {
                Beat::Woken
            } else {
                Beat::Quiet
            })
        }
    }
}

// (A subscription that may be on a dead path is dropped with `reset_beats`.)

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    Renewed,
    /// The lease is someone else's, or gone.
    NotOurs,
    /// A kill message from this (newer) epoch deposed us.
    Killed(u64),
}

/// What a follower heard while it waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The leader's heartbeat: it renewed just now.
    Leader(Lease),
    /// A departing leader named this host.
    Woken,
    /// Nothing within the wait.
    Quiet,
}

/// The channel every renewal publishes the lease on.
pub(crate) const BEAT_CHANNEL: &str = "warden:beat";

/// One ECS call as journalled before it is sent (and, with `result`, after).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CallEntry {
    pub epoch: u64,
    pub leader: String,
    /// `RunTask`, `StopTask`, `UpdateService`.
    pub op: String,
    /// What the call asks for: `count 10 token …`, a task ARN, `desired 4`.
    pub detail: String,
    /// `None` in the entry written by the fence (the call is about to be sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// The worker's operations on the central Redis.
pub(crate) trait Ledger: Send + Sync + 'static {
    /// Redis time in ms (one clock for every host's policy timing).
    fn now_ms(&self) -> impl Future<Output = StoreResult<u64>> + Send;
    fn policy_state(&self, service: &str) -> impl Future<Output = StoreResult<PolicyState>> + Send;
    fn last_record(
        &self,
        service: &str,
    ) -> impl Future<Output = StoreResult<Option<Record>>> + Send;
    /// The fence before one ECS call: true only if `lease` is still the lease in Redis with
    /// at least `min_left` to run; the call is journalled in the same atomic step.
    fn fence(
        &self,
        lease: &Lease,
        min_left: Duration,
        service: &str,
        call: &CallEntry,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Journals the result of a call (not fenced: a deposed leader's results count too).
    fn journal(
        &self,
        service: &str,
        call: &CallEntry,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Writes a decision and the policy state only if `lease` is still the lease.
    fn record(
        &self,
        lease: &Lease,
        record: &Record,
        state: &PolicyState,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Publishes the managed services refused by their grants (`warden status` lists
    /// them), only if `lease` is still the lease.
    fn note_refused(
        &self,
        lease: &Lease,
        json: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send {
        let _ = (lease, json);
        std::future::ready(Ok(true))
    }
    /// Publishes the names of the managed services (JSON array), only if `lease` is
    /// still the lease.
    fn note_managed(
        &self,
        lease: &Lease,
        json: &str,
    ) -> impl Future<Output = StoreResult<bool>> + Send {
        let _ = (lease, json);
        std::future::ready(Ok(true))
    }
}

/// Managed services refused by their grants, as the leader last published them (JSON).
pub(crate) const REFUSED: &str = "warden:refused";

/// The names of the services the leader manages now (JSON array): `warden status` shows
/// the decisions of these only, not of services no longer configured.
pub(crate) const MANAGED: &str = "warden:managed";

const NOW: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

/// Renews the lease if it is still ours and no newer epoch left a kill message (then
/// minus that epoch), writes the heartbeat in Redis time and publishes it to followers.
const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] then return 0 end
local kill = tonumber(redis.call('GET', KEYS[3]) or '0')
if kill > tonumber(ARGV[5]) then return -kill end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
@NOW@
redis.call('HSET', KEYS[2], 'id', ARGV[3], 'az', ARGV[4], 'epoch', ARGV[5], 'time_ms', now)
redis.call('PUBLISH', KEYS[4], ARGV[1])
return 1
"#;

/// The competition's winner in one step: the live entries, dead ones dropped.
const WINNER: &str = r#"
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #entries, 2 do
  if redis.call('EXISTS', 'warden:candidate:' .. entries[i]) == 1 then
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
  else
    redis.call('ZREM', KEYS[1], entries[i])
  end
end
return out
"#;

/// Takes the lease if it is free, or if it is exactly the holder we saw and chose to
/// depose. Leaves a kill message for the previous leader. The epoch is the counter's next
/// value, or Redis time in ms if that is larger, so fencing tokens keep growing across a
/// restart of the central Redis.
const ACQUIRE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and not (ARGV[4] ~= '' and cur == ARGV[4]) then return 0 end
@NOW@
local e = redis.call('INCR', KEYS[2])
if e < now then
  e = now
  redis.call('SET', KEYS[2], e)
end
redis.call('SET', KEYS[1], ARGV[1] .. '\t' .. e .. '\t' .. ARGV[2], 'PX', ARGV[3])
local old = nil
if cur then
  old = string.match(cur, '^([^\t]+)')
else
  old = redis.call('HGET', KEYS[3], 'id')
end
if old and old ~= ARGV[1] then
  redis.call('SET', 'warden:kill:' .. old, e, 'PX', 3600000)
end
redis.call('DEL', 'warden:kill:' .. ARGV[1])
redis.call('DEL', KEYS[4])
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'az', ARGV[2], 'epoch', e, 'time_ms', now)
return e
"#;

/// The fence before one call: the lease is ours with ARGV[2] ms left; journal the call.
const FENCE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
@NOW@
redis.call('RPUSH', KEYS[2], '{"time_ms":' .. now .. ',' .. string.sub(ARGV[3], 2))
redis.call('LTRIM', KEYS[2], -1000, -1)
return 1
"#;

/// Appends to a call journal with Redis time.
const JOURNAL: &str = r#"
@NOW@
redis.call('RPUSH', KEYS[1], '{"time_ms":' .. now .. ',' .. string.sub(ARGV[1], 2))
redis.call('LTRIM', KEYS[1], -1000, -1)
return 1
"#;

/// Gives the lease up if it is still ours; names a successor and wakes it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('RPUSH', 'warden:wake:' .. ARGV[2], '1')
  redis.call('PEXPIRE', 'warden:wake:' .. ARGV[2], ARGV[3])
  redis.call('PUBLISH', 'warden:wake:' .. ARGV[2], '1')
end
return 1
"#;

/// Age of the heartbeat in Redis time (ms), or -1 without one.
const HEARTBEAT_AGE: &str = r#"
@NOW@
local hb = redis.call('HGET', KEYS[1], 'time_ms')
if not hb then return -1 end
return now - tonumber(hb)
"#;

/// A host takes part: its hash (for status) and its place in the sorted set by time.
const SEEN: &str = r#"
@NOW@
redis.call('HSET', KEYS[1], 'az', ARGV[2], 'seen_ms', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
return 1
"#;

/// Hosts seen within ARGV[1] ms: id, az, age, … most recent first.
const LIVE_HOSTS: &str = r#"
@NOW@
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', now - tonumber(ARGV[1]), 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  local az = redis.call('HGET', 'warden:host:' .. ids[i], 'az') or ''
  out[#out + 1] = ids[i]
  out[#out + 1] = az
  out[#out + 1] = tostring(now - tonumber(ids[i + 1]))
end
return out
"#;

/// Writes a decision and the policy state only if the lease is still ours.
const RECORD: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], -1000, -1)
redis.call('SET', KEYS[4], ARGV[3])
return 1
"#;

const NOTE_REFUSED: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"#;

fn script(body: &str) -> Script {
    Script::new(&body.replace("@NOW@", NOW))
}

/// The central Redis, for one loop (the elector and the worker each have their own):
/// one [`Link`] (a connection dropped on timeouts and failovers, made again on the next
/// call), a subscription for the heartbeat, and, with `min_replicas`, every write that
/// leadership rests on (acquire, renew, fence) acknowledged by that many replicas
/// (`WAIT`) or counted as failed: a primary cut off from its replicas cannot keep a
/// leader, and a promoted replica holds every lease and epoch that was acted on.
#[derive(Clone)]
pub(crate) struct Central {
    link: std::sync::Arc<Link>,
    pubsub: std::sync::Arc<tokio::sync::Mutex<Option<redis::aio::PubSub>>>,
    /// `host:port` for messages (never the URL: it may hold a password).
    addr: String,
    scripts: std::sync::Arc<Scripts>,
    min_replicas: u32,
    ack_timeout: Duration,
}

struct Scripts {
    renew: Script,
    acquire: Script,
    fence: Script,
    journal: Script,
    release: Script,
    age: Script,
    seen: Script,
    live: Script,
    record: Script,
    note_refused: Script,
    winner: Script,
}

impl Central {
    pub(crate) fn new(
        link: std::sync::Arc<Link>,
        min_replicas: u32,
        ack_timeout: Duration,
    ) -> Self {
        Self {
            addr: link.endpoint.addr.clone(),
            link,
            pubsub: Default::default(),
            min_replicas,
            ack_timeout,
            scripts: std::sync::Arc::new(Scripts {
                renew: script(RENEW),
                acquire: script(ACQUIRE),
                fence: script(FENCE),
                journal: script(JOURNAL),
                release: script(RELEASE),
                age: script(HEARTBEAT_AGE),
                seen: script(SEEN),
                live: script(LIVE_HOSTS),
                record: script(RECORD),
                note_refused: script(NOTE_REFUSED),
                winner: script(WINNER),
            }),
        }
    }

    /// Writes `json` at `key` only if `lease` is still the lease.
    async fn note(&self, key: &'static str, lease: &Lease, json: &str) -> StoreResult<bool> {
        let ok: i64 = self
            .with(|mut c| async move {
                self.scripts
                    .note_refused
                    .key(LEADER)
                    .key(key)
                    .arg(lease.value())
                    .arg(json)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(ok == 1)
    }

    fn err(&self, e: redis::RedisError) -> StoreError {
        StoreError(format!(
            "central redis {}: {}",
            self.addr,
            crate::redis_util::describe(&e)
        ))
    }

    /// Runs `f` on the connection; an error that says it is no good drops it.
    async fn with<T, F, Fut>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let c = self.link.get().await.map_err(|e| {
            self.link.reset();
            self.err(e)
        })?;
        let r = f(c).await;
        self.link.outcome(&r);
        r.map_err(|e| self.err(e))
    }

    /// With `min_replicas`, waits for that many replicas to have this connection's writes;
    /// fewer is an error (the write may be lost in a failover).
    /// After a write (`wrote`), waits for `min_replicas` replicas to acknowledge it; no
    /// write, or no replicas asked for, needs none.
    async fn acked(
        &self,
        c: &mut MultiplexedConnection,
        wrote: bool,
    ) -> redis::RedisResult<Result<(), String>> {
        if !wrote || self.min_replicas == 0 {
            return Ok(Ok(()));
        }
        let n: i64 = redis::cmd("WAIT")
            .arg(self.min_replicas)
            .arg(self.ack_timeout.as_millis().max(1) as u64)
            .query_async(c)
            .await?;
        Ok(if n >= i64::from(self.min_replicas) {
            Ok(())
        } else {
            Err(format!(
                "acknowledged by {n} of the {} replicas asked for (manager.central_min_replicas) within {} ms",
                self.min_replicas,
                self.ack_timeout.as_millis()
            ))
        })
    }

    async fn get<T: redis::FromRedisValue + Send>(&self, key: &str) -> StoreResult<T> {
        self.with(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }
}

impl LeaseStore for Central {
    async fn leader(&self) -> StoreResult<Option<Lease>> {
        let v: Option<String> = self.get(LEADER).await?;
        Ok(v.as_deref().and_then(Lease::parse))
    }

    async fn heartbeat_age(&self) -> StoreResult<Option<Duration>> {
        let ms: i64 = self
            .with(|mut c| async move { self.scripts.age.key(HEARTBEAT).invoke_async(&mut c).await })
            .await?;
        Ok((ms >= 0).then(|| Duration::from_millis(ms as u64)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Renewal> {
        let (n, acked) = self
            .with(|mut c| async move {
                let n: i64 = self
                    .scripts
                    .renew
                    .key(LEADER)
                    .key(HEARTBEAT)
                    .key(kill_key(&lease.id))
                    .key(BEAT_CHANNEL)
                    .arg(lease.value())
                    .arg(ttl.as_millis() as u64)
                    .arg(&lease.id)
                    .arg(&lease.az)
                    .arg(lease.epoch)
                    .invoke_async(&mut c)
                    .await?;
                let acked = self.acked(&mut c, n == 1).await?;
                Ok((n, acked))
            })
            .await?;
        match n {
            1 => acked
                .map(|()| Renewal::Renewed)
                .map_err(|why| StoreError(format!("central redis {}: renewal {why}", self.addr))),
            0 => Ok(Renewal::NotOurs),
            k => Ok(Renewal::Killed(k.unsigned_abs())),
        }
    }

    async fn acquire(
        &self,
        id: &str,
        az: &str,
        ttl: Duration,
        depose: Option<&Lease>,
    ) -> StoreResult<Option<Lease>> {
        let (e, acked) = self
            .with(|mut c| async move {
                let e: i64 = self
                    .scripts
                    .acquire
                    .key(LEADER)
                    .key(EPOCH)
                    .key(HEARTBEAT)
                    .key(CANDIDATES)
                    .key(SUCCESSOR)
                    .arg(id)
                    .arg(az)
                    .arg(ttl.as_millis() as u64)
                    .arg(depose.map(Lease::value).unwrap_or_default())
                    .invoke_async(&mut c)
                    .await?;
                let acked = self.acked(&mut c, e > 0).await?;
                Ok((e, acked))
            })
            .await?;
        // A lease the replicas do not have is not leadership: it expires by itself.
        acked
            .map_err(|why| StoreError(format!("central redis {}: acquisition {why}", self.addr)))?;
        Ok((e > 0).then(|| Lease {
            id: id.to_owned(),
            epoch: e as u64,
            az: az.to_owned(),
        }))
    }

    async fn release(
        &self,
        lease: &Lease,
        successor: Option<&str>,
        successor_ttl: Duration,
    ) -> StoreResult<bool> {
        let n: i64 = self
            .with(|mut c| async move {
                self.scripts
                    .release
                    .key(LEADER)
                    .key(SUCCESSOR)
                    .arg(lease.value())
                    .arg(successor.unwrap_or(""))
                    .arg(successor_ttl.as_millis().max(1) as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(n == 1)
    }

    async fn enter(&self, id: &str, ttl: Duration) -> StoreResult<()> {
        let score = fastrand::u32(0..1_000_000);
        self.with(|mut c| async move {
            redis::pipe()
                .atomic()
                .zadd(CANDIDATES, id, score)
                .ignore()
                .cmd("SET")
                .arg(candidate_key(id))
                .arg(1)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn winner(&self) -> StoreResult<Option<String>> {
        let alive: Vec<(String, f64)> = self
            .with(|mut c| async move {
                self.scripts
                    .winner
                    .key(CANDIDATES)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(super::lease::pick_winner(&alive))
    }

    async fn successor(&self) -> StoreResult<Option<String>> {
        self.get(SUCCESSOR).await
    }

    async fn seen(&self, id: &str, az: &str, ttl: Duration) -> StoreResult<()> {
        let _: i64 = self
            .with(|mut c| async move {
                self.scripts
                    .seen
                    .key(host_key(id))
                    .key(HOSTS)
                    .arg(id)
                    .arg(az)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn live_hosts(&self, max_age: Duration) -> StoreResult<Vec<LiveHost>> {
        let flat: Vec<String> = self
            .with(|mut c| async move {
                self.scripts
                    .live
                    .key(HOSTS)
                    .arg(max_age.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(flat
            .chunks_exact(3)
            .map(|c| LiveHost {
                id: c[0].clone(),
                az: c[1].clone(),
                age: Duration::from_millis(c[2].parse().unwrap_or(u64::MAX)),
            })
            .collect())
    }

    async fn wait_wake(&self, id: &str, max: Duration) -> StoreResult<bool> {
        // BLPOP's timeout is in seconds, with decimals since Redis 6.
        let secs = (max.as_secs_f64()).max(0.01);
        let v: Option<(String, String)> = self
            .with(|mut c| async move {
                redis::cmd("BLPOP")
                    .arg(wake_key(id))
                    .arg(format!("{secs:.3}"))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(v.is_some())
    }

    async fn reset_beats(&self) {
        *self.pubsub.lock().await = None;
    }

    async fn wait_beat(&self, id: &str, max: Duration) -> StoreResult<Beat> {
        use futures_util::StreamExt as _;
        let mut guard = self.pubsub.lock().await;
        if guard.is_none() {
            let subscribed = async {
                let mut ps = self.link.endpoint.pubsub().await?;
                ps.subscribe(BEAT_CHANNEL).await?;
                ps.subscribe(wake_key(id)).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match tokio::time::timeout(max.max(Duration::from_millis(100)) * 4, subscribed).await {
                Ok(Ok(ps)) => *guard = Some(ps),
                Ok(Err(e)) => return Err(self.err(e)),
                Err(_) => {
                    return Err(StoreError(format!(
                        "central redis {}: no subscription within {:?}",
                        self.addr,
                        max * 4
                    )))
                }
            }
        }
        let Some(ps) = guard.as_mut() else {
            return Ok(Beat::Quiet);
        };
        let next = tokio::time::timeout(max, ps.on_message().next()).await;
        match next {
            Err(_) => Ok(Beat::Quiet),
            Ok(None) => {
                *guard = None;
                Err(StoreError(format!(
                    "central redis {}: the heartbeat subscription closed",
                    self.addr
                )))
            }
            Ok(Some(msg)) if msg.get_channel_name() == BEAT_CHANNEL => Ok(msg
                .get_payload::<String>()
                .ok()
                .as_deref()
                .and_then(Lease::parse)
                .map_or(Beat::Quiet, Beat::Leader)),
            Ok(Some(_)) => Ok(Beat::Woken),
        }
    }
}

impl Ledger for Central {
    async fn now_ms(&self) -> StoreResult<u64> {
        let (s, us): (u64, u64) = self
            .with(|mut c| async move { redis::cmd("TIME").query_async(&mut c).await })
            .await?;
        Ok(s * 1000 + us / 1000)
    }

    async fn policy_state(&self, service: &str) -> StoreResult<PolicyState> {
        let text: Option<String> = self.get(&policy_key(service)).await?;
        // A state that does not parse (an older warden's, or damaged) starts afresh.
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default())
    }

    async fn last_record(&self, service: &str) -> StoreResult<Option<Record>> {
        let text: Option<String> = self.get(&decision_key(service)).await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    async fn fence(
        &self,
        lease: &Lease,
        min_left: Duration,
        service: &str,
        call: &CallEntry,
    ) -> StoreResult<bool> {
        let entry = serde_json::to_string(call).expect("a call entry serializes");
        let (ok, acked) = self
            .with(|mut c| async move {
                let ok: i64 = self
                    .scripts
                    .fence
                    .key(LEADER)
                    .key(calls_key(service))
                    .arg(lease.value())
                    .arg(min_left.as_millis() as u64)
                    .arg(&entry)
                    .invoke_async(&mut c)
                    .await?;
                let acked = self.acked(&mut c, ok == 1).await?;
                Ok((ok, acked))
            })
            .await?;
        if let Err(why) = acked {
            tracing::warn!(service, op = %call.op, "fence refused: the lease check was {why}; the call is not sent");
            return Ok(false);
        }
        Ok(ok == 1)
    }

    async fn journal(&self, service: &str, call: &CallEntry) -> StoreResult<()> {
        let entry = serde_json::to_string(call).expect("a call entry serializes");
        let _: i64 = self
            .with(|mut c| async move {
                self.scripts
                    .journal
                    .key(calls_key(service))
                    .arg(&entry)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn record(
        &self,
        lease: &Lease,
        record: &Record,
        state: &PolicyState,
    ) -> StoreResult<bool> {
        let (rec, st) = (
            serde_json::to_string(record).expect("a record serializes"),
            serde_json::to_string(state).expect("a policy state serializes"),
        );
        let ok: i64 = self
            .with(|mut c| async move {
                self.scripts
                    .record
                    .key(LEADER)
                    .key(decision_key(&record.service))
                    .key(history_key(&record.service))
                    .key(policy_key(&record.service))
                    .arg(lease.value())
                    .arg(&rec)
                    .arg(&st)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(ok == 1)
    }

    async fn note_refused(&self, lease: &Lease, json: &str) -> StoreResult<bool> {
        self.note(REFUSED, lease, json).await
    }

    async fn note_managed(&self, lease: &Lease, json: &str) -> StoreResult<bool> {
        self.note(MANAGED, lease, json).await
    }
}
