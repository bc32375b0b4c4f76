//! Connections to a Redis that notice when it is gone, and follow it when it moves.
//!
//! Why: a primary that fails over behind a VIP or a DNS name, or a path that is
//! black-holed, leaves connections half-open: nothing closes them, and a client that
//! only times a command out keeps the dead connection for as long as TCP does (about
//! 15 minutes, or for ever). Seen here: no leader for 40 s and more after a promotion,
//! while every warden still held its connection to the old primary. So:
//! * every connection has TCP keepalive with short probes and a TCP user timeout, so
//!   the kernel closes one whose peer stopped answering, idle or not;
//! * every command has a response timeout, and a [`Link`] drops its connection on any
//!   error that is not the server's answer (timeout, I/O, refused, dropped) or that says
//!   the server is no longer a primary (READONLY, MASTERDOWN, LOADING): the next command
//!   connects again, which resolves the name again (DNS-based failover);
//! * a `redis+sentinel://` (or `rediss+sentinel://`) URL names Sentinels and a master:
//!   each connection asks them for the primary and checks that it says it is one.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, RedisResult};

/// Connect and response timeouts, and the TCP probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

/// Where a Redis is: one address, or the primary Sentinels name.
#[derive(Debug, Clone)]
enum Target {
    Direct(redis::Client),
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: String,
        /// `redis` or `rediss`, userinfo (`user:pass@` or empty), `/db` (or empty).
        scheme: &'static str,
        userinfo: String,
        db: String,
        ca_file: Option<std::path::PathBuf>,
    },
}

/// A Redis to connect to.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    target: Target,
    timeouts: Timeouts,
    /// For messages: `host:port`, or `sentinel h1:p1,h2:p2 master m`; never a password.
    pub addr: String,
}

/// TCP keepalive after 2 s idle, then a probe a second, 3 probes; and 5 s for sent data
/// to be acknowledged: a dead peer is noticed within about 5 s.
fn tcp() -> redis::io::tcp::TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(5))
}

fn with_tcp(client: redis::Client) -> RedisResult<redis::Client> {
    let info = client.get_connection_info().clone().set_tcp_settings(tcp());
    redis::Client::open(info)
}

/// The parts of a `redis+sentinel://` URL.
#[derive(Debug)]
struct SentinelUrl {
    /// `redis` or `rediss`: how to reach the master.
    scheme: &'static str,
    /// `user:pass@` or empty.
    userinfo: String,
    sentinels: Vec<(String, u16)>,
    master: String,
    /// `/2` or empty.
    db: String,
}

/// `redis+sentinel://[user:pass@]h1:p1,h2:p2/master[/db]`: its parts, or why not.
fn parse_sentinel(url: &str) -> Result<SentinelUrl, String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+sentinel://") {
        ("redis", r)
    } else if let Some(r) = url.strip_prefix("rediss+sentinel://") {
        ("rediss", r)
    } else {
        return Err("not a redis+sentinel:// URL".into());
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((u, r)) => (format!("{u}@"), r),
        None => (String::new(), rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or("expected redis+sentinel://host:port,host:port/master-name")?;
    let mut parts = path.splitn(2, '/');
    let master = parts.next().unwrap_or("").to_owned();
    if master.is_empty() {
        return Err("no master name after the Sentinels (…/master-name)".into());
    }
    let db = parts.next().map(|d| format!("/{d}")).unwrap_or_default();
    let mut sentinels = Vec::new();
    for h in hosts.split(',').filter(|h| !h.is_empty()) {
        let (host, port) = h.rsplit_once(':').unwrap_or((h, "26379"));
        let port = port
            .parse()
            .map_err(|_| format!("{h}: expected host:port"))?;
        sentinels.push((host.trim_matches(['[', ']']).to_owned(), port));
    }
    if sentinels.is_empty() {
        return Err("no Sentinel address".into());
    }
    Ok(SentinelUrl {
        scheme,
        userinfo,
        sentinels,
        master,
        db,
    })
}

/// Whether a URL names Sentinels.
pub(crate) fn is_sentinel(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

impl Endpoint {
    /// `url` as [`crate::redis_util::open`] takes it, or a `redis+sentinel://` URL.
    pub(crate) fn new(
        url: &str,
        ca_file: Option<&std::path::Path>,
        timeouts: Timeouts,
    ) -> Result<Endpoint, String> {
        if is_sentinel(url) {
            let SentinelUrl {
                scheme,
                userinfo,
                sentinels,
                master,
                db,
            } = parse_sentinel(url)?;
            let addr = format!(
                "sentinel {} master {master}",
                sentinels
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            return Ok(Endpoint {
                target: Target::Sentinel {
                    sentinels,
                    master,
                    scheme,
                    userinfo,
                    db,
                    ca_file: ca_file.map(ToOwned::to_owned),
                },
                timeouts,
                addr,
            });
        }
        let client = crate::redis_util::open(url, ca_file)?;
        let client = with_tcp(client).map_err(|e| crate::redis_util::describe(&e))?;
        Ok(Endpoint {
            target: Target::Direct(client),
            timeouts,
            addr: crate::redis_util::addr(url),
        })
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.response))
    }

    /// The client of the primary, as of now (for a Sentinel target: asked now).
    async fn client(&self) -> RedisResult<redis::Client> {
        match &self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel {
                sentinels,
                master,
                scheme,
                userinfo,
                db,
                ca_file,
            } => {
                let mut last = None;
                for (host, port) in sentinels {
                    match self.ask_sentinel(host, *port, master).await {
                        Ok((h, p)) => {
                            let url = format!("{scheme}://{userinfo}{h}:{p}{db}");
                            let client = crate::redis_util::open(&url, ca_file.as_deref())
                                .map_err(|m| {
                                    RedisError::from((
                                        redis::ErrorKind::InvalidClientConfig,
                                        "primary",
                                        m,
                                    ))
                                })?;
                            return with_tcp(client);
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Sentinel"))
                }))
            }
        }
    }

    async fn ask_sentinel(
        &self,
        host: &str,
        port: u16,
        master: &str,
    ) -> RedisResult<(String, u16)> {
        use redis::IntoConnectionInfo as _;
        let info = redis::ConnectionAddr::Tcp(host.to_owned(), port)
            .into_connection_info()?
            .set_tcp_settings(tcp());
        let client = redis::Client::open(info)?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(&self.config())
            .await?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(&mut c)
            .await?;
        addr.ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "Sentinel knows no such master",
                master.to_owned(),
            ))
        })
    }

    /// A new connection to the primary. For a Sentinel target, the server must say it is
    /// the primary (ROLE), or the connection is refused as READONLY.
    pub(crate) async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let client = self.client().await?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(&self.config())
            .await?;
        if matches!(self.target, Target::Sentinel { .. }) {
            let role: redis::Value = redis::cmd("ROLE").query_async(&mut c).await?;
            let is_primary = matches!(&role, redis::Value::Array(v) if matches!(v.first(),
                Some(redis::Value::BulkString(b)) if b == b"master"));
            if !is_primary {
                return Err(RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                    "the server Sentinel named is not a primary (yet)",
                )));
            }
        }
        Ok(c)
    }

    /// A subscription connection to the primary.
    pub(crate) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let client = self.client().await?;
        tokio::time::timeout(self.timeouts.connect, client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
    }
}

/// Whether an error means the connection (or the server's role) is no good any more.
pub(crate) fn drops_connection(e: &RedisError) -> bool {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return true;
    }
    matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// One kept connection to an [`Endpoint`], dropped on an error that says it is no good
/// and made again by the next caller.
pub(crate) struct Link {
    pub endpoint: Endpoint,
    current: Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    pub(crate) fn new(endpoint: Endpoint) -> Link {
        Link {
            endpoint,
            current: Mutex::new(None),
        }
    }

    /// The connection, made if there is none.
    pub(crate) async fn get(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.lock().clone() {
            return Ok(c);
        }
        let c = self.endpoint.connect().await?;
        *self.lock() = Some(c.clone());
        Ok(c)
    }

    /// Looks at a command's outcome: an error that says the connection is no good drops it.
    pub(crate) fn outcome<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r {
            if drops_connection(e) {
                self.reset();
            }
        }
    }

    /// Drops the connection; the next caller connects again.
    pub(crate) fn reset(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_with_their_parts() {
        let SentinelUrl {
            scheme,
            userinfo,
            sentinels: s,
            master,
            db,
        } = parse_sentinel("rediss+sentinel://:pw@10.0.0.1:26379,10.0.0.2,s3:26380/mymaster/2")
            .unwrap();
        assert_eq!((scheme, userinfo.as_str()), ("rediss", ":pw@"));
        assert_eq!(
            s,
            vec![
                ("10.0.0.1".to_owned(), 26379),
                ("10.0.0.2".to_owned(), 26379),
                ("s3".to_owned(), 26380)
            ]
        );
        assert_eq!((master.as_str(), db.as_str()), ("mymaster", "/2"));
        assert!(parse_sentinel("redis+sentinel://h:1").is_err());
        assert!(parse_sentinel("redis+sentinel://h:x/m").is_err());
        assert!(parse_sentinel("redis+sentinel:///m").is_err());
    }

    #[test]
    fn what_drops_a_connection() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(drops_connection(&io));
        let wrong = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "x",
        ));
        assert!(!drops_connection(&wrong));
    }
}
