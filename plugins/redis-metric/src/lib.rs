//! `redis-metric`: one number from any Redis: the length of a list (`LLEN`, a job queue),
//! a sorted set (`ZCARD`), a stream (`XLEN`) or a set (`SCARD`), or the number stored
//! at a key (`GET`). The URL takes AUTH and TLS as warden's own Redis settings do
//! (`redis://user:password@host:port/db`, `rediss://`, with `ca_file` for a private CA).
//!
//! Errors are sorted where they happen: a server not answering is `transient`; a wrong
//! password, a key of the wrong type or a value that is not a number is `config` (the
//! operator must act); a missing key counts 0 for the lengths and is `transient` for
//! `GET` (a counter not yet written).

use std::path::PathBuf;
use std::time::Duration;

use warden_plugin_api::prelude::*;
use warden_plugin_api::tokio::sync::Mutex;

use client::addr_of;
use warden_plugin_common::redis_client as client;

/// What to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", rename_all = "lowercase")]
#[schemars(crate = "warden_plugin_api::schemars")]
pub enum Read {
    /// Length of a list.
    Llen,
    /// Members of a sorted set.
    Zcard,
    /// Entries of a stream.
    Xlen,
    /// Members of a set.
    Scard,
    /// The number stored at the key.
    Get,
}

impl Read {
    fn command(self) -> &'static str {
        match self {
            Read::Llen => "LLEN",
            Read::Zcard => "ZCARD",
            Read::Xlen => "XLEN",
            Read::Scard => "SCARD",
            Read::Get => "GET",
        }
    }
    fn default_unit(self) -> Option<&'static str> {
        match self {
            Read::Llen => Some("items"),
            Read::Zcard | Read::Scard => Some("members"),
            Read::Xlen => Some("entries"),
            Read::Get => None,
        }
    }
}

/// `[metrics.<name>] plugin = "redis-metric"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS.
    pub url: String,
    /// PEM CA that signs a `rediss://` server's certificate (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The key to read.
    pub key: String,
    /// `llen` (default), `zcard`, `xlen`, `scard` or `get`.
    #[serde(default = "default_read")]
    pub read: Read,
    /// Unit shown in status and metrics (default: by `read`).
    #[serde(default)]
    pub unit: Option<String>,
    /// Longest a connection or a command may take, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_read() -> Read {
    Read::Llen
}
fn default_timeout_ms() -> u64 {
    2000
}

/// A metric source reading one key.
pub struct RedisMetric {
    config: Config,
    client: redis::Client,
    addr: String,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

fn classify(addr: &str, e: redis::RedisError) -> PluginError {
    let text = e.to_string();
    let code = e.code().unwrap_or("");
    let message = format!("redis {addr}: {text}");
    let auth = matches!(e.kind(), redis::ErrorKind::AuthenticationFailed);
    if auth || matches!(code, "NOAUTH" | "WRONGPASS" | "WRONGTYPE" | "NOPERM") {
        PluginError::config(message)
    } else {
        PluginError::transient(message)
    }
}

impl MetricSource for RedisMetric {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        let addr = addr_of(&config.url);
        let client = client::open(&config.url, config.ca_file.as_deref())?;
        Ok(RedisMetric {
            config,
            client,
            addr,
            conn: Mutex::new(None),
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut slot = self.conn.lock().await;
        if slot.is_none() {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            let c = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(|e| classify(&self.addr, e))?;
            *slot = Some(c);
        }
        let conn = slot.as_mut().expect("connected above");
        let read = self.config.read;
        let answer: Result<Option<String>, _> = redis::cmd(read.command())
            .arg(&self.config.key)
            .query_async(conn)
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // A broken connection is made again on the next call.
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    *slot = None;
                }
                let at = format!("{} ({} {:?})", self.addr, read.command(), self.config.key);
                return Err(classify(&at, e));
            }
        };
        let key = &self.config.key;
        let value = match (read, answer) {
            (Read::Get, None) => {
                return Err(PluginError::transient(format!(
                    "redis {}: key {key:?} does not exist (yet)",
                    self.addr
                )))
            }
            (_, None) => 0.0,
            (_, Some(text)) => match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => v,
                _ => {
                    return Err(PluginError::config(format!(
                        "redis {}: key {key:?} holds {text:?}, not a number",
                        self.addr
                    )))
                }
            },
        };
        let mut m = Measurement::new(value)
            .label("key", key.clone())
            .label("read", read.command().to_lowercase());
        if let Some(u) = self.config.unit.as_deref().or(read.default_unit()) {
            m = m.unit(u);
        }
        Ok(m)
    }
}

export_plugin! { name: "redis-metric", metric_source: RedisMetric }

#[cfg(test)]
mod tests {
    use super::*;
    use warden_plugin_api::serde_json::json;
    use warden_plugin_api::testing;

    #[test]
    fn addresses_never_carry_the_password() {
        assert_eq!(addr_of("redis://:pw@10.0.0.1:6379/2"), "10.0.0.1:6379");
        assert_eq!(addr_of("rediss://u:p@h:6380"), "h:6380");
    }

    #[test]
    fn the_schema_refuses_an_unknown_read_and_a_missing_key() {
        let e = testing::metric_source::<RedisMetric>(
            json!({"url": "redis://h:1", "key": "k", "read": "hlen"}),
        )
        .err()
        .unwrap();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("read"), "{}", e.message);
        let e = testing::metric_source::<RedisMetric>(json!({"url": "redis://h:1"}))
            .err()
            .unwrap();
        assert!(e.message.contains("key"), "{}", e.message);
    }

    #[warden_plugin_api::tokio::test(crate = "warden_plugin_api::tokio")]
    async fn a_server_not_answering_is_transient() {
        let s = testing::metric_source::<RedisMetric>(
            json!({"url": "redis://127.0.0.1:1", "key": "k", "timeout_ms": 300}),
        )
        .unwrap();
        let e = s.measure().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(e.message.contains("127.0.0.1:1"), "{e}");
    }
}
