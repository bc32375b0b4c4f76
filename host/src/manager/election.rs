//! Leader election among all hosts through the central Redis, fenced.
//!
//! It keeps the seed's shape (a heartbeat naming the leader and its Availability Zone; a
//! competition of random numbers in a sorted set, won after a guard time by the highest
//! live entry; a kill message left for a deposed leader) and makes it safe:
//! leadership is a lease with a TTL in Redis, renewed by an atomic script; every new
//! leader takes a new epoch from a counter (the fencing token), and the epoch is checked
//! in Redis right before every batch of actions; ages are measured in Redis time. A
//! leader that cannot renew before its deadline, finds a kill message, or sees its own
//! AZ unavailable stops acting at once.
//!
//! Keys: `warden:leader` (`<id>\t<epoch>\t<az>`, with the lease as TTL), `warden:epoch`,
//! `warden:heartbeat` (hash id/az/epoch/time_ms), `warden:candidates` (sorted set) with
//! `warden:candidate:<id>` liveness keys, `warden:kill:<id>` (the epoch that deposed it),
//! `warden:host:<id>` (hash az/seen_ms, for `warden status`).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

pub const LEADER: &str = "warden:leader";
pub const EPOCH: &str = "warden:epoch";
pub const HEARTBEAT: &str = "warden:heartbeat";
pub const CANDIDATES: &str = "warden:candidates";

pub fn candidate_key(id: &str) -> String {
    format!("warden:candidate:{id}")
}
pub fn kill_key(id: &str) -> String {
    format!("warden:kill:{id}")
}
pub fn host_key(id: &str) -> String {
    format!("warden:host:{id}")
}

/// Timing of the election. Defaults replace a dead leader within about 3 s:
/// lease expiry (2 s) + one tick (0.25 s) + guard (0.5 s) + acquisition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub lease: Duration,
    pub tick: Duration,
    pub guard: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_millis(2000),
            tick: Duration::from_millis(250),
            guard: Duration::from_millis(500),
        }
    }
}

impl Timing {
    /// A leader stops acting this long before its lease would expire in Redis, to allow
    /// for the time a renewal takes to travel.
    pub fn margin(&self) -> Duration {
        self.lease / 4
    }
}

/// Renews the lease if it is still ours, and publishes the heartbeat in Redis time.
const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'id', ARGV[3], 'az', ARGV[4], 'epoch', ARGV[5], 'time_ms', now)
return 1
"#;

/// Takes the lease if it is free, or if it is exactly the holder we saw and chose to
/// depose (its AZ is unavailable). Leaves a kill message for the previous leader. The
/// epoch is the counter's next value, or Redis time in ms if that is larger, so fencing
/// tokens keep growing across a restart of the central Redis.
const ACQUIRE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and not (ARGV[4] ~= '' and cur == ARGV[4]) then return 0 end
local t0 = redis.call('TIME')
local now0 = tonumber(t0[1]) * 1000 + math.floor(tonumber(t0[2]) / 1000)
-- The epoch never goes back, even when Redis restarts empty: at least Redis time in ms.
local e = redis.call('INCR', KEYS[2])
if e < now0 then
  e = now0
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
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'az', ARGV[2], 'epoch', e, 'time_ms', now)
return e
"#;

/// The fence: true only if the lease is ours and has at least ARGV[2] ms left.
const FENCE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
return 1
"#;

/// Gives the lease up (SIGTERM), if it is still ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Age of the heartbeat in Redis time (ms), or None without one.
const HEARTBEAT_AGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hb = redis.call('HGET', KEYS[1], 'time_ms')
if not hb then return -1 end
return now - tonumber(hb)
"#;

/// Who holds the lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub epoch: u64,
    pub az: String,
}

impl Lease {
    pub fn parse(v: &str) -> Option<Lease> {
        let mut it = v.split('\t');
        Some(Lease {
            id: it.next()?.to_owned(),
            epoch: it.next()?.parse().ok()?,
            az: it.next()?.to_owned(),
        })
    }
    pub fn value(&self) -> String {
        format!("{}\t{}\t{}", self.id, self.epoch, self.az)
    }
}

/// The election's Redis operations.
pub struct ElectionStore {
    pub conn: ConnectionManager,
    renew: Script,
    acquire: Script,
    fence: Script,
    release: Script,
    age: Script,
}

impl ElectionStore {
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            renew: Script::new(RENEW),
            acquire: Script::new(ACQUIRE),
            fence: Script::new(FENCE),
            release: Script::new(RELEASE),
            age: Script::new(HEARTBEAT_AGE),
        }
    }

    pub async fn leader(&mut self) -> redis::RedisResult<Option<Lease>> {
        let v: Option<String> = redis::cmd("GET")
            .arg(LEADER)
            .query_async(&mut self.conn)
            .await?;
        Ok(v.as_deref().and_then(Lease::parse))
    }

    pub async fn heartbeat_age(&mut self) -> redis::RedisResult<Option<Duration>> {
        let ms: i64 = self.age.key(HEARTBEAT).invoke_async(&mut self.conn).await?;
        Ok((ms >= 0).then(|| Duration::from_millis(ms as u64)))
    }

    pub async fn renew(&mut self, lease: &Lease, timing: &Timing) -> redis::RedisResult<bool> {
        let ok: i64 = self
            .renew
            .key(LEADER)
            .key(HEARTBEAT)
            .arg(lease.value())
            .arg(timing.lease.as_millis() as u64)
            .arg(&lease.id)
            .arg(&lease.az)
            .arg(lease.epoch)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(ok == 1)
    }

    /// Tries to take the lease; `depose` is the holder we saw and may replace.
    pub async fn acquire(
        &mut self,
        id: &str,
        az: &str,
        timing: &Timing,
        depose: Option<&Lease>,
    ) -> redis::RedisResult<Option<Lease>> {
        let e: i64 = self
            .acquire
            .key(LEADER)
            .key(EPOCH)
            .key(HEARTBEAT)
            .key(CANDIDATES)
            .arg(id)
            .arg(az)
            .arg(timing.lease.as_millis() as u64)
            .arg(depose.map(Lease::value).unwrap_or_default())
            .invoke_async(&mut self.conn)
            .await?;
        Ok((e > 0).then(|| Lease {
            id: id.to_owned(),
            epoch: e as u64,
            az: az.to_owned(),
        }))
    }

    pub async fn fence(&mut self, lease: &Lease, min_left: Duration) -> redis::RedisResult<bool> {
        let ok: i64 = self
            .fence
            .key(LEADER)
            .arg(lease.value())
            .arg(min_left.as_millis() as u64)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(ok == 1)
    }

    pub async fn release(&mut self, lease: &Lease) -> redis::RedisResult<bool> {
        let n: i64 = self
            .release
            .key(LEADER)
            .arg(lease.value())
            .invoke_async(&mut self.conn)
            .await?;
        Ok(n == 1)
    }

    /// The epoch that deposed `id`, if a kill message waits for it.
    pub async fn kill_message(&mut self, id: &str) -> redis::RedisResult<Option<u64>> {
        redis::cmd("GET")
            .arg(kill_key(id))
            .query_async(&mut self.conn)
            .await
    }

    /// Enters the competition with a random number; the entry lives `ttl`.
    pub async fn enter(&mut self, id: &str, ttl: Duration) -> redis::RedisResult<()> {
        let score = fastrand::u32(0..1_000_000);
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
            .query_async::<()>(&mut self.conn)
            .await
    }

    /// The highest-scoring candidate whose entry is still alive (ties: lowest id).
    pub async fn winner(&mut self) -> redis::RedisResult<Option<String>> {
        let entries: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(CANDIDATES)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut self.conn)
            .await?;
        let mut alive = Vec::new();
        for (id, score) in entries {
            let live: bool = redis::cmd("EXISTS")
                .arg(candidate_key(&id))
                .query_async(&mut self.conn)
                .await?;
            if live {
                alive.push((id, score));
            }
        }
        Ok(pick_winner(&alive))
    }

    /// Records that this host takes part (for `warden status`).
    pub async fn seen(&mut self, id: &str, az: &str, ttl: Duration) -> redis::RedisResult<()> {
        let key = host_key(id);
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("az")
            .arg(az)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis() as u64)
            .ignore()
            .query_async::<()>(&mut self.conn)
            .await
    }
}

/// The competition's rule: highest score wins, ties go to the lowest id.
pub fn pick_winner(alive: &[(String, f64)]) -> Option<String> {
    alive
        .iter()
        .max_by(|a, b| {
            a.1.partial_cmp(&b.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| b.0.cmp(&a.0))
        })
        .map(|(id, _)| id.clone())
}

/// Why a follower holds a competition (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A live leader in an available AZ: nothing to do.
    Healthy,
    /// No lease (expired or released): compete for a free lease.
    Vacant,
    /// The leader's AZ is not available: compete to depose exactly this lease.
    Depose(Lease),
}

pub fn judge(
    lease: Option<Lease>,
    heartbeat_age: Option<Duration>,
    leader_az_available: bool,
    timing: &Timing,
) -> Verdict {
    match lease {
        None => Verdict::Vacant,
        Some(l) if !leader_az_available => Verdict::Depose(l),
        // A lease whose heartbeat stopped (the holder renews both together) is treated
        // as vacant only once it expires; a heartbeat older than the lease means a
        // holder that is not renewing, and is deposed.
        Some(l) if heartbeat_age.is_some_and(|a| a > timing.lease * 2) => Verdict::Depose(l),
        Some(_) => Verdict::Healthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trips() {
        let l = Lease {
            id: "i-1".into(),
            epoch: 7,
            az: "eu-west-1a".into(),
        };
        assert_eq!(Lease::parse(&l.value()), Some(l));
        assert_eq!(Lease::parse("garbage"), None);
    }

    #[test]
    fn highest_live_score_wins_and_ties_go_to_the_lowest_id() {
        assert_eq!(pick_winner(&[]), None);
        assert_eq!(
            pick_winner(&[("b".into(), 5.0), ("a".into(), 9.0)]),
            Some("a".into())
        );
        assert_eq!(
            pick_winner(&[("b".into(), 9.0), ("a".into(), 9.0)]),
            Some("a".into())
        );
    }

    #[test]
    fn judging_the_leader() {
        let t = Timing::default();
        let l = Lease {
            id: "i-1".into(),
            epoch: 1,
            az: "a".into(),
        };
        assert_eq!(judge(None, None, true, &t), Verdict::Vacant);
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_millis(100)), true, &t),
            Verdict::Healthy
        );
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_millis(100)), false, &t),
            Verdict::Depose(l.clone())
        );
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_secs(60)), true, &t),
            Verdict::Depose(l)
        );
    }
}
