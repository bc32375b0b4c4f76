//! warden's HTTP endpoint: `/livez`, `/readyz`, `/status` and `/metrics`.
//!
//! Bound to loopback by default (`[http] listen`), HTTP/1.1 with hyper, one task per
//! connection. `/livez` answers from the runtime that runs warden's loops and checks no
//! dependency, so a Redis blip never turns into a restart storm; `/readyz` reads the
//! dependency gauges the loops set (see [`crate::metrics`]); `/status` is this host's
//! part of `warden status` plus, on a manager host, the cluster's; `/metrics` is
//! `prometheus-client`'s OpenMetrics text.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once),
//! each dropped after 30 s; `/status` reads the central Redis over one connection kept
//! for the purpose, at most once a second (a cached answer meanwhile), so that a client
//! hammering `/status` costs the central Redis nothing more.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use serde::{Deserialize, Serialize};

use crate::metrics;

/// The most connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// The HTTP endpoint (`/livez`, `/readyz`, `/status`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `address:port` to listen on, or `off`. Loopback by default: `/status` tells the
    /// cluster's state, so expose it wider only on purpose.
    pub listen: String,
}

/// The endpoint's default address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9798";

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP_LISTEN.into(),
        }
    }
}

impl HttpConfig {
    /// The address to listen on; `None` when the endpoint is off.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.listen.trim() == "off" {
            return Ok(None);
        }
        self.listen.trim().parse().map(Some).map_err(|_| {
            format!(
                "{:?}: expected address:port (such as 127.0.0.1:9798 or [::1]:9798) or \"off\"",
                self.listen
            )
        })
    }
}

/// How long `/status` answers from its last read of the central Redis.
const STATUS_CACHE: Duration = Duration::from_secs(1);

/// What `/status` reports of this host, beside the readiness.
#[derive(Debug, Default)]
pub(crate) struct HostInfo {
    pub instance_id: String,
    pub availability_zone: Option<String>,
    pub registrar: bool,
    /// The central Redis URL when this host takes part in the manager's election.
    pub central_redis: Option<String>,
    pub central_redis_ca_file: Option<std::path::PathBuf>,
    /// Plugins are loaded without their permission checks.
    pub insecure_plugins: bool,
    /// The connection `/status` reads the central Redis over, and its last answer.
    pub cluster: tokio::sync::Mutex<ClusterCache>,
}

/// `/status`'s view of the cluster: one connection, the last answer and its time.
#[derive(Default)]
pub(crate) struct ClusterCache {
    conn: Option<redis::aio::MultiplexedConnection>,
    last: Option<(tokio::time::Instant, serde_json::Value)>,
}

impl std::fmt::Debug for ClusterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCache")
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

/// Binds the endpoint; an address in use or not allowed is an error naming it.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("http.listen {addr}: cannot listen: {e}"))
}

/// Serves until shutdown.
pub(crate) async fn serve(
    listener: Arc<TcpListener>,
    info: Arc<HostInfo>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused = crate::logs::Repeated::new("http endpoint");
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused.failed(&format!(
                "{MAX_CONNECTIONS} connections open; a new one was closed"
            ));
            drop(stream);
            continue;
        };
        let info = info.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let info = info.clone();
                async move { Ok::<_, Infallible>(route(req, &info).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A slow or idle client is dropped after 30 s.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

const PLAIN: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

fn accepts_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn route(req: Request<Incoming>, info: &HostInfo) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n");
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            let m = metrics::get();
            // A wedged plugin instance needs an operator (isolate it, restart warden).
            let wedged = m.wedged();
            let wedged_text = (!wedged.is_empty())
                .then(|| format!("plugin instances wedged: {}", wedged.join(", ")));
            match (m.readiness(), wedged_text) {
                (Ok(up), None) => {
                    text(StatusCode::OK, PLAIN, format!("ready: {}\n", up.join(", ")))
                }
                (r, wedged) => {
                    let mut why: Vec<String> = r
                        .err()
                        .unwrap_or_default()
                        .iter()
                        .map(|d| d.to_string())
                        .collect();
                    why.extend(wedged);
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        PLAIN,
                        format!("not ready: {}\n", why.join(", ")),
                    )
                }
            }
        }
        // OpenMetrics to whoever asks for it (Prometheus does), the classic format else.
        "/metrics" if accepts_openmetrics(&req) => {
            text(StatusCode::OK, OPENMETRICS, metrics::get().encode())
        }
        "/metrics" => text(StatusCode::OK, CLASSIC, metrics::get().encode_classic()),
        "/status" => {
            let body = status(info).await;
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&body).expect("json") + "\n",
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /livez, /readyz, /status or /metrics\n",
        ),
    }
}

async fn status(info: &HostInfo) -> serde_json::Value {
    let m = metrics::get();
    let (ready, dependencies) = match m.readiness() {
        Ok(up) => (true, serde_json::json!({"up": up, "down": []})),
        Err(down) => (false, serde_json::json!({"down": down})),
    };
    let wedged = m.wedged();
    let ready = ready && wedged.is_empty();
    let mut out = serde_json::json!({
        "wedged_plugins": wedged,
        "instance_id": info.instance_id,
        "availability_zone": info.availability_zone,
        "version": env!("CARGO_PKG_VERSION"),
        "registrar": info.registrar,
        "manager": info.central_redis.is_some(),
        "ready": ready,
        "dependencies": dependencies,
        "leader": m.leader.get() == 1,
        "epoch": m.epoch.get(),
        "insecure_plugins": info.insecure_plugins,
        "refused": m.refused(),
    });
    if let Some(url) = &info.central_redis {
        out["cluster"] = cluster(info, url).await;
    }
    out
}

/// The cluster's status, read at most once a second over one kept connection.
async fn cluster(info: &HostInfo, url: &str) -> serde_json::Value {
    let mut cache = info.cluster.lock().await;
    if let Some((at, v)) = &cache.last {
        if at.elapsed() < STATUS_CACHE {
            return v.clone();
        }
    }
    let conn = match cache.conn.clone() {
        Some(c) => Ok(c),
        None => crate::status::connect(url, info.central_redis_ca_file.as_deref()).await,
    };
    let v = match conn {
        Ok(mut c) => match crate::status::read_from(&mut c).await {
            Ok(s) => {
                cache.conn = Some(c);
                serde_json::to_value(s).expect("json")
            }
            Err(e) => {
                // Reconnect next time: the connection may be the problem.
                cache.conn = None;
                serde_json::json!({"error": e.to_string()})
            }
        },
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    cache.last = Some((tokio::time::Instant::now(), v.clone()));
    v
}

/// `warden health`: GETs `/readyz` (or another path) from the configured address, with
/// a plain HTTP/1.0 request, and says whether it answered 200.
pub(crate) async fn probe(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let reply = String::from_utf8_lossy(&buf);
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status = head.split_whitespace().nth(1).unwrap_or("?");
        if status == "200" {
            Ok(body.trim().to_owned())
        } else {
            Err(format!("{path} answered {status}: {}", body.trim()))
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        format!(
            "{addr}: no answer within {}",
            crate::logs::humantime(timeout)
        )
    })?
}
