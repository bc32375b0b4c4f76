//! `redis-services`: service definitions kept cluster-wide in a Redis hash, picked up
//! live: the original warden's wish for "a clean way to define a Service so that Warden
//! could pick up its configuration dynamically".
//!
//! The hash (`key`, default `warden:services`) has one field per service, its name, and
//! as value the service in warden's model as JSON (the same keys as a `[[services]]`
//! entry of `file-services`; `name` may be left out):
//!
//! ```sh
//! redis-cli HSET warden:services web \
//!   '{"match": {"image": "web"}, "port": 80, "frontends": ["example.com"]}'
//! ```
//!
//! Why these rules:
//! * The hash is re-read at most every `refresh_ms` (HGETALL, one round trip), when the
//!   host asks for the generation; the generation changes only when the hash's content
//!   does, so the host lists again only then.
//! * A read that fails keeps the last good set: a Redis restart or a network cut must
//!   never take routes away. The failure is logged once, and the recovery once.
//! * An entry that does not parse (bad JSON, an unknown key, no `match`, a bad
//!   front-end) is skipped with one warning naming its field and what is wrong; the
//!   other services are still served. The warning is repeated only when what is wrong
//!   with it changes, or after it was fixed (the rules shared with `dynamodb-services`
//!   are in `snapshot.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use warden_plugin_api::prelude::*;
use warden_plugin_api::serde_json::{self, Value};
use warden_plugin_api::tokio::sync::Mutex;
use warden_plugin_api::tracing;

/// `[[registrar.sources]] plugin = "redis-services"` (or `[[manager.sources]]`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The Redis: `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// PEM CA that signs a `rediss://` server's certificate (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The hash of services.
    #[serde(default = "default_key")]
    pub key: String,
    /// How often the hash is re-read, at most, in ms.
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u64,
    /// Longest one read may take, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_key() -> String {
    "warden:services".into()
}
fn default_refresh_ms() -> u64 {
    2000
}
fn default_timeout_ms() -> u64 {
    2000
}

use client::addr_of;
pub use entry::parse_value;
use snapshot::Snapshot;
use warden_plugin_common::redis_client as client;
use warden_plugin_common::{entry, snapshot};

/// Parses one entry of the hash: the field is the service's name. The error says what
/// is wrong, without the field (the caller names it).
pub fn parse_entry(field: &str, text: &str) -> Result<ServiceDefinition, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    parse_value(field, value)
}

/// The services of a whole hash, and the entries skipped with why. Two services may not
/// share a front-end port: the one whose name sorts later is skipped.
pub fn parse_hash(
    hash: &BTreeMap<String, String>,
) -> (Vec<ServiceDefinition>, Vec<(String, String)>) {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    let mut ports = BTreeMap::new();
    for (field, text) in hash {
        match parse_entry(field, text) {
            Ok(s) => match s.frontend_port.and_then(|p| ports.get(&p).map(|o| (p, o))) {
                Some((p, other)) => bad.push((
                    field.clone(),
                    format!("frontend_port {p} is already service {other:?}'s"),
                )),
                None => {
                    if let Some(p) = s.frontend_port {
                        ports.insert(p, field.clone());
                    }
                    good.push(s);
                }
            },
            Err(why) => bad.push((field.clone(), why)),
        }
    }
    (good, bad)
}

#[derive(Default)]
struct State {
    conn: Option<redis::aio::MultiplexedConnection>,
    snapshot: Snapshot<BTreeMap<String, String>>,
}

/// A provider of the services in one Redis hash.
pub struct RedisServices {
    config: Config,
    client: redis::Client,
    addr: String,
    state: Mutex<State>,
}

impl RedisServices {
    async fn read(&self, state: &mut State) -> Result<BTreeMap<String, String>, redis::RedisError> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        if state.conn.is_none() {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            state.conn = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            );
        }
        let conn = state.conn.as_mut().expect("connected above");
        let answer = redis::cmd("HGETALL")
            .arg(&self.config.key)
            .query_async(conn)
            .await;
        if answer.is_err() {
            // Made again on the next read.
            state.conn = None;
        }
        answer
    }

    /// Re-reads the hash when the last read is older than `refresh_ms`.
    async fn refresh(&self, state: &mut State) {
        let every = Duration::from_millis(self.config.refresh_ms);
        if !state.snapshot.due(every, Instant::now()) {
            return;
        }
        let (redis, key) = (&self.addr, &self.config.key);
        let hash = match self.read(state).await {
            Ok(h) => h,
            Err(e) => {
                if let Some(held) = state.snapshot.failed() {
                    tracing::warn!(redis = %redis, key = %key, error = %e, held,
                        "cannot read the services hash; keeping the last good set");
                }
                return;
            }
        };
        let read = state.snapshot.read(hash, parse_hash);
        if read.recovered {
            tracing::info!(redis = %redis, key = %key, "services hash readable again");
        }
        for (field, why) in read.newly_skipped {
            tracing::warn!(redis = %redis, key = %key, service = %field, error = %why,
                "service entry skipped");
        }
    }

    fn never_read(&self) -> PluginError {
        PluginError::transient(format!(
            "redis {}: the services hash {:?} has not been read yet",
            self.addr, self.config.key
        ))
    }
}

impl ServiceDefinitions for RedisServices {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if !(100..=600_000).contains(&config.refresh_ms) {
            return Err(PluginError::config(format!(
                "refresh_ms: {} is outside 100..=600000",
                config.refresh_ms
            )));
        }
        if !(100..=60_000).contains(&config.timeout_ms) {
            return Err(PluginError::config(format!(
                "timeout_ms: {} is outside 100..=60000",
                config.timeout_ms
            )));
        }
        let addr = addr_of(&config.url);
        let client = client::open(&config.url, config.ca_file.as_deref())?;
        Ok(RedisServices {
            config,
            client,
            addr,
            state: Mutex::new(State::default()),
        })
    }

    async fn list(&self) -> Result<Vec<ServiceDefinition>, PluginError> {
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await;
        let services = state.snapshot.services().map(<[_]>::to_vec);
        services.ok_or_else(|| self.never_read())
    }

    async fn generation(&self) -> Result<u64, PluginError> {
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await;
        state.snapshot.generation().ok_or_else(|| self.never_read())
    }
}

export_plugin! { name: "redis-services", service_definitions: RedisServices }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_takes_its_name_from_the_field() {
        let s = parse_entry(
            "web",
            r#"{"match": {"image": "web"}, "port": 80, "frontends": ["Example.com/API"]}"#,
        )
        .unwrap();
        assert_eq!(s.name, "web");
        // Hosts are lower-cased; paths are case-sensitive, as in Redx.
        assert_eq!(s.frontends, vec!["example.com/API/".to_owned()]);
    }

    #[test]
    fn a_bad_entry_says_what_is_wrong() {
        for (text, why) in [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"name": "other", "match": {"image": "x"}}"#, "differs"),
            (
                r#"{"match": {"image": "x"}, "prot": 80}"#,
                "unknown key `prot`",
            ),
            (
                r#"{"match": {"imagee": "x"}}"#,
                "unknown key `match.imagee`",
            ),
            (r#"{"port": 80}"#, "match"),
            (
                r#"{"match": {"image": "x"}, "frontends": ["a b"]}"#,
                "frontends",
            ),
            (r#"{"match": {"image": "x"}, "port": 0}"#, "1-65535"),
        ] {
            let e = parse_entry("web", text).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_bad_entry_is_skipped_and_the_others_kept() {
        let hash: BTreeMap<String, String> = [
            ("a", r#"{"match": {"image": "a"}, "frontend_port": 8001}"#),
            ("b", r#"{"match": {"image": "b"}, "frontend_port": 8001}"#),
            ("c", r#"{"match": {"image": "c"}, "nope": 1}"#),
            ("d", r#"{"match": {"image": "d"}}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (good, bad) = parse_hash(&hash);
        let names: Vec<_> = good.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        let skipped: Vec<_> = bad.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(skipped, ["b", "c"]);
        assert!(bad[0].1.contains("\"a\""), "{:?}", bad[0]);
    }
}
