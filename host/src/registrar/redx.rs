//! The apply step for routes: writes the difference between what warden owns in the
//! local Redis and what it should own, in one atomic Lua script.
//!
//! Ownership is recorded per host in the set `warden:owned:<instance>`, updated by the
//! same script, so after a restart warden removes exactly its stale entries and never
//! touches keys or servers written by anyone else: a server is removed with HDEL of its
//! own field only, a front-end is deleted only if it still names warden's backend.
//! A reconcile with nothing to change sends no write.

use std::collections::BTreeSet;

use redis::aio::ConnectionManager;
use redis::Script;

/// Applies a batch of changes atomically. ARGV is a list of (op, a, b) triples:
/// `HSET backend addr`, `HDEL backend addr`, `SET key backend`, `DEL key backend`.
const APPLY: &str = r#"
local owned = KEYS[1]
for i = 1, #ARGV, 3 do
  local op, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'HSET' then
    redis.call('HSET', 'backend:' .. a, b, '0')
    redis.call('SADD', owned, 'server\t' .. a .. '\t' .. b)
  elseif op == 'HDEL' then
    redis.call('HDEL', 'backend:' .. a, b)
    redis.call('SREM', owned, 'server\t' .. a .. '\t' .. b)
  elseif op == 'SET' then
    local old = redis.call('GET', a)
    if old then
      redis.call('SREM', owned, 'string\t' .. a .. '\t' .. old)
    end
    redis.call('SET', a, b)
    redis.call('SADD', owned, 'string\t' .. a .. '\t' .. b)
  elseif op == 'DEL' then
    if redis.call('GET', a) == b then
      redis.call('DEL', a)
    end
    redis.call('SREM', owned, 'string\t' .. a .. '\t' .. b)
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
return #ARGV / 3
"#;

/// The ordered operations that turn `current` into `desired`. Order does not matter for
/// atomicity (one script), but adds come before removals so that a read of the script's
/// effect in a debugger never shows an empty backend.
pub fn plan(current: &BTreeSet<String>, desired: &BTreeSet<String>) -> Vec<[String; 3]> {
    let mut adds_servers = Vec::new();
    let mut adds_strings = Vec::new();
    let mut dels_strings = Vec::new();
    let mut dels_servers = Vec::new();
    for e in desired.difference(current) {
        match split(e) {
            Some(("server", a, b)) => adds_servers.push(["HSET".into(), a.into(), b.into()]),
            Some(("string", a, b)) => adds_strings.push(["SET".into(), a.into(), b.into()]),
            _ => {}
        }
    }
    for e in current.difference(desired) {
        match split(e) {
            Some(("server", a, b)) => dels_servers.push(["HDEL".into(), a.into(), b.into()]),
            // A key whose backend merely changes is overwritten by its SET, not deleted.
            Some(("string", a, b)) if !adds_strings.iter().any(|op| op[1] == a) => {
                dels_strings.push(["DEL".into(), a.into(), b.into()])
            }
            _ => {}
        }
    }
    let mut ops = adds_servers;
    ops.extend(dels_strings);
    ops.extend(adds_strings);
    ops.extend(dels_servers);
    ops
}

fn split(entry: &str) -> Option<(&str, &str, &str)> {
    let mut it = entry.splitn(3, '\t');
    Some((it.next()?, it.next()?, it.next()?))
}

/// What one apply did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Redis commands sent (reads and the script call).
    pub commands: usize,
    /// Operations written (0: nothing changed, no write sent).
    pub writes: usize,
}

pub struct RedisRoutes {
    client: redis::Client,
    conn: Option<ConnectionManager>,
    owned_key: String,
    /// What warden believes it owns in Redis; `None` until read (after start, a resync
    /// or an error), so the next apply reads it back first.
    applied: Option<BTreeSet<String>>,
    script: Script,
}

impl RedisRoutes {
    pub fn new(url: &str, instance: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: None,
            owned_key: format!("warden:owned:{instance}"),
            applied: None,
            script: Script::new(APPLY),
        })
    }

    pub fn owned_key(&self) -> &str {
        &self.owned_key
    }

    /// Forget what was applied: the next apply reads the owned set back from Redis.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    async fn conn(&mut self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Cheap drift check (one read): false if the owned set in Redis no longer has the
    /// size warden applied (Redis restarted empty, or someone removed it); the next
    /// apply then reads it back and rewrites what is missing.
    pub async fn verify(&mut self) -> Result<bool, redis::RedisError> {
        let Some(applied) = &self.applied else {
            return Ok(true);
        };
        let expected = applied.len();
        let mut conn = self.conn().await?;
        let n: usize = redis::cmd("SCARD")
            .arg(&self.owned_key)
            .query_async(&mut conn)
            .await?;
        if n != expected {
            self.applied = None;
            return Ok(false);
        }
        Ok(true)
    }

    /// Makes Redis hold exactly `desired` of warden's entries.
    pub async fn apply(
        &mut self,
        desired: &BTreeSet<String>,
    ) -> Result<Applied, redis::RedisError> {
        let mut stats = Applied::default();
        let result = self.apply_inner(desired, &mut stats).await;
        if result.is_err() {
            self.applied = None;
        }
        result.map(|()| stats)
    }

    async fn apply_inner(
        &mut self,
        desired: &BTreeSet<String>,
        stats: &mut Applied,
    ) -> Result<(), redis::RedisError> {
        if self.applied.as_ref() == Some(desired) {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let current = match self.applied.take() {
            Some(c) => c,
            None => {
                stats.commands += 1;
                redis::cmd("SMEMBERS")
                    .arg(&self.owned_key)
                    .query_async(&mut conn)
                    .await?
            }
        };
        let ops = plan(&current, desired);
        if !ops.is_empty() {
            let mut invocation = self.script.key(&self.owned_key);
            for op in &ops {
                invocation.arg(&op[0]).arg(&op[1]).arg(&op[2]);
            }
            stats.commands += 1;
            stats.writes = ops.len();
            let _: i64 = invocation.invoke_async(&mut conn).await?;
        }
        self.applied = Some(desired.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nothing_changed_plans_nothing() {
        let s = set(&["server\tweb\t1.1.1.1:80", "string\tfrontend:a\tweb"]);
        assert!(plan(&s, &s).is_empty());
    }

    #[test]
    fn adds_and_removes_exactly_the_difference() {
        let current = set(&[
            "server\tweb\t1.1.1.1:80",
            "server\tweb\t1.1.1.2:80",
            "string\tfrontend:a\tweb",
        ]);
        let desired = set(&[
            "server\tweb\t1.1.1.2:80",
            "server\tweb\t1.1.1.3:80",
            "string\tfrontend:a\tweb",
        ]);
        assert_eq!(
            plan(&current, &desired),
            vec![
                ["HSET".to_string(), "web".into(), "1.1.1.3:80".into()],
                ["HDEL".to_string(), "web".into(), "1.1.1.1:80".into()],
            ]
        );
    }

    #[test]
    fn a_frontend_moving_backend_is_overwritten_not_deleted() {
        let current = set(&["string\tfrontend:a\tweb"]);
        let desired = set(&["string\tfrontend:a\tweb2"]);
        assert_eq!(
            plan(&current, &desired),
            vec![["SET".to_string(), "frontend:a".into(), "web2".into()]]
        );
    }

    #[test]
    fn the_last_server_and_its_frontend_go_together() {
        let current = set(&["server\tweb\t1.1.1.1:80", "string\tfrontend:a\tweb"]);
        let ops = plan(&current, &BTreeSet::new());
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0][0], "DEL");
        assert_eq!(ops[1][0], "HDEL");
    }
}
