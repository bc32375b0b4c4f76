//! Faults between warden and the services it calls, injected in user space (this kernel
//! has no `netem`): an HTTP proxy that delays requests, answers throttling or 5xx errors
//! on demand, and notes what passed (for a test that must react to a call as it happens;
//! the counts a test asserts are read on the far side, in moto's request recorder).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An error the proxy answers instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 400 ThrottlingException, as AWS JSON protocols send it.
    Throttle,
    /// 503 ServiceUnavailable.
    Unavailable,
}

/// A request that went through (or was answered by a fault).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub at: Instant,
    /// `X-Amz-Target` without the service prefix (`RunTask`), or the path.
    pub op: String,
    /// The access key id from the signature, which tells wardens apart.
    pub key: String,
    /// warden's `x-warden-epoch` header, if any.
    pub epoch: Option<u64>,
    pub faulted: bool,
}

#[derive(Default)]
struct Control {
    delay_ms: AtomicU64,
    faults_left: AtomicU32,
    fault: Mutex<Option<(Fault, String)>>,
    passed: Mutex<Vec<Passed>>,
}

pub struct HttpFaultProxy {
    pub port: u16,
    ctl: Arc<Control>,
    _rt: tokio::runtime::Runtime,
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// `AWS4-HMAC-SHA256 Credential=KEY/20260101/...` → `KEY`.
fn access_key(auth: &str) -> String {
    auth.split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .unwrap_or("")
        .to_owned()
}

impl HttpFaultProxy {
    /// Forwards to `http://127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> HttpFaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ctl = Arc::new(Control::default());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = ctl.clone();
        rt.spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (c, client) = (c.clone(), client.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        forward(req, upstream, c.clone(), client.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpFaultProxy { port, ctl, _rt: rt }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request waits this long before it is forwarded.
    pub fn set_delay(&self, d: Duration) {
        self.ctl
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next `n` requests whose op contains `op` are answered with `fault`.
    pub fn fail_next(&self, n: u32, op: &str, fault: Fault) {
        *self.ctl.fault.lock().unwrap() = Some((fault, op.to_owned()));
        self.ctl.faults_left.store(n, Ordering::SeqCst);
    }

    pub fn passed(&self) -> Vec<Passed> {
        self.ctl.passed.lock().unwrap().clone()
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: u16,
    ctl: Arc<Control>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = header(&req, "x-amz-target");
    let op = target
        .rsplit('.')
        .next()
        .filter(|s| !s.is_empty())
        .map_or_else(|| req.uri().path().to_owned(), str::to_owned);
    let key = access_key(&header(&req, "authorization"));
    let epoch = header(&req, "x-warden-epoch").parse().ok();
    let delay = Duration::from_millis(ctl.delay_ms.load(Ordering::SeqCst));
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    tokio::time::sleep(delay).await;
    let fault = {
        let f = ctl.fault.lock().unwrap();
        match &*f {
            Some((fault, want)) if op.contains(want.as_str()) => {
                let left = ctl.faults_left.load(Ordering::SeqCst);
                if left > 0 {
                    ctl.faults_left.store(left - 1, Ordering::SeqCst);
                    Some(*fault)
                } else {
                    None
                }
            }
            _ => None,
        }
    };
    ctl.passed.lock().unwrap().push(Passed {
        at: Instant::now(),
        op,
        key,
        epoch,
        faulted: fault.is_some(),
    });
    if let Some(f) = fault {
        let (status, code) = match f {
            Fault::Throttle => (400, "ThrottlingException"),
            Fault::Unavailable => (503, "ServiceUnavailableException"),
        };
        let body =
            format!("{{\"__type\":\"{code}\",\"message\":\"injected by the test's fault proxy\"}}");
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amzn-errortype", code)
            .body(Full::new(Bytes::from(body)))
            .unwrap());
    }
    let mut up = Request::builder().method(parts.method).uri(format!(
        "http://127.0.0.1:{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for (k, v) in parts.headers.iter() {
        up = up.header(k, v);
    }
    let answer = match client.request(up.body(Full::new(body)).unwrap()).await {
        Ok(r) => {
            let (p, b) = r.into_parts();
            let b = b.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Response::from_parts(p, Full::new(b))
        }
        Err(e) => Response::builder()
            .status(502)
            .body(Full::new(Bytes::from(format!("proxy: {e}"))))
            .unwrap(),
    };
    Ok(answer)
}

/// EC2 instance metadata (IMDSv2) for one instance, counting the requests it answers.
pub struct Imds {
    pub port: u16,
    requests: Arc<AtomicU32>,
    _rt: tokio::runtime::Runtime,
}

impl Imds {
    pub fn start(instance_id: &str, az: &str) -> Imds {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicU32::new(0));
        let (count, id, az) = (requests.clone(), instance_id.to_owned(), az.to_owned());
        rt.spawn({
            async move {
                {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let (count, id, az) = (count.clone(), id.clone(), az.clone());
                        tokio::spawn(async move {
                            let service =
                                hyper::service::service_fn(move |req: Request<Incoming>| {
                                    count.fetch_add(1, Ordering::SeqCst);
                                    let path = req.uri().path().to_owned();
                                    let (status, body) =
                                        match (req.method().as_str(), path.as_str()) {
                                            ("PUT", "/latest/api/token") => {
                                                (200, "token-1".to_owned())
                                            }
                                            ("GET", "/latest/meta-data/instance-id") => {
                                                (200, id.clone())
                                            }
                                            (
                                                "GET",
                                                "/latest/meta-data/placement/availability-zone",
                                            ) => (200, az.clone()),
                                            _ => (404, String::new()),
                                        };
                                    async move {
                                        Ok::<_, Infallible>(
                                            Response::builder()
                                                .status(status)
                                                .header(
                                                    "x-aws-ec2-metadata-token-ttl-seconds",
                                                    "21600",
                                                )
                                                .body(Full::new(Bytes::from(body)))
                                                .unwrap(),
                                        )
                                    }
                                });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
        });
        Imds {
            port,
            requests,
            _rt: rt,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }
}
