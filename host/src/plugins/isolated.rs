//! Process isolation (`isolation = "process"`): a plugin instance lives in a supervised
//! child, `warden plugin-host`, which loads the `.so` through the same frozen ABI and
//! answers the same JSON calls over a Unix socket. A segfault, an abort or an endless
//! loop costs that child: it is restarted with backoff (and its instance created again
//! with the same config), and meanwhile its calls fail as transient errors.
//!
//! Wire: one JSON object a line each way. Requests: `create` (kind, config), `call` (id,
//! op, args), `cancel` (id: the caller dropped the call), `shutdown`. Answers: `{id, ok}`
//! with the plugin's JSON text, or `{id, err: {kind, message}}`. The child dies with its
//! parent (`PR_SET_PDEATHSIG`) and when the socket closes.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use warden_plugin_api::{ErrorKind, Kind, PluginError};

use super::client::{decode_answer, BoxFuture, CallError, Decode, Health};
use super::{CallOptions, CreateError, PluginClient};
use crate::backoff::Backoff;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Create {
        id: u64,
        kind: String,
        config: String,
    },
    Call {
        id: u64,
        name: String,
        args: String,
    },
    Cancel {
        id: u64,
    },
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ok: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    err: Option<WireError>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    kind: u32,
    message: String,
}

impl From<PluginError> for WireError {
    fn from(e: PluginError) -> Self {
        WireError {
            kind: e.kind.code(),
            message: e.message,
        }
    }
}

impl From<WireError> for PluginError {
    fn from(e: WireError) -> Self {
        PluginError::new(ErrorKind::from_code(e.kind), e.message)
    }
}

fn line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).expect("wire messages serialize");
    s.push('\n');
    s
}

/// The child's side (`warden plugin-host --file F --socket S`): load the file, serve one
/// connection, end when it closes.
pub fn serve(file: &Path, socket: &Path) -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let library = warden_plugin_api::host::Library::load(file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = UnixListener::bind(socket)?;
        let (stream, _) = listener.accept().await?;
        let (rd, wr) = stream.into_split();
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let mut instance = None;
        let mut calls: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let Ok(req) = serde_json::from_str::<Request>(&l) else {
                continue;
            };
            match req {
                Request::Create { id, kind, config } => {
                    let answer = match Kind::parse(&kind) {
                        Some(k) => match library.create(k, &config) {
                            Ok(i) => {
                                instance = Some(Arc::new(i));
                                Answer {
                                    id,
                                    ok: Some(String::new()),
                                    err: None,
                                }
                            }
                            Err(e) => Answer {
                                id,
                                ok: None,
                                err: Some(e.into()),
                            },
                        },
                        None => Answer {
                            id,
                            ok: None,
                            err: Some(
                                PluginError::new(ErrorKind::Unsupported, format!("kind {kind}"))
                                    .into(),
                            ),
                        },
                    };
                    send(&wr, &answer).await;
                }
                Request::Call { id, name, args } => {
                    let Some(inst) = instance.clone() else {
                        continue;
                    };
                    let mut call = Box::pin(inst.call(&name, &args));
                    // Most calls are ready at once: answer them here, without a task.
                    if let Some(r) = futures_util::FutureExt::now_or_never(&mut call) {
                        send(&wr, &answer_of(id, r)).await;
                        continue;
                    }
                    let wr = wr.clone();
                    let task = tokio::spawn(async move {
                        let r = call.await;
                        send(&wr, &answer_of(id, r)).await;
                    });
                    calls.retain(|_, h| !h.is_finished());
                    calls.insert(id, task.abort_handle());
                }
                Request::Cancel { id } => {
                    if let Some(h) = calls.remove(&id) {
                        h.abort();
                    }
                }
                Request::Shutdown => {
                    if let Some(i) = &instance {
                        i.shutdown();
                    }
                    break;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

fn answer_of(id: u64, r: Result<String, PluginError>) -> Answer {
    match r {
        Ok(text) => Answer {
            id,
            ok: Some(text),
            err: None,
        },
        Err(e) => Answer {
            id,
            ok: None,
            err: Some(e.into()),
        },
    }
}

type Writer = Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>;

async fn send<T: Serialize>(wr: &Writer, v: &T) {
    let l = line(v);
    let _ = wr.lock().await.write_all(l.as_bytes()).await;
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<String, PluginError>>>>>;

/// A live connection to a child: callers write their request themselves.
#[derive(Clone)]
struct Conn {
    wr: Writer,
    pending: Pending,
}

impl Conn {
    /// Sends from a place that cannot wait (a `Drop`).
    fn send_later(&self, req: Request) {
        let wr = self.wr.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { send(&wr, &req).await });
        }
    }
}

/// How to start a child for one instance.
#[derive(Clone)]
struct Spec {
    exe: PathBuf,
    file: PathBuf,
    plugin: String,
    kind: Kind,
    config: String,
    create_timeout: Duration,
}

struct Child {
    conn: Conn,
    process: tokio::process::Child,
    reader: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

static IDS: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a child, connects, and creates the instance in it.
async fn start_child(spec: &Spec) -> Result<Child, PluginError> {
    let transient = |m: String| PluginError::new(ErrorKind::Transient, m);
    let dir = tempfile::Builder::new()
        .prefix("warden-plugin-")
        .tempdir()
        .map_err(|e| transient(format!("cannot make a socket directory: {e}")))?;
    let socket = dir.path().join("s");
    let mut process = tokio::process::Command::new(&spec.exe)
        .args([
            "--log-format",
            crate::logging::current_format().as_str(),
            "plugin-host",
            "--file",
        ])
        .arg(&spec.file)
        .arg("--socket")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| transient(format!("cannot start {}: {e}", spec.exe.display())))?;
    let deadline = tokio::time::Instant::now() + spec.create_timeout;
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(_) if tokio::time::Instant::now() < deadline => {
                if let Ok(Some(status)) = process.try_wait() {
                    return Err(transient(format!(
                        "the plugin process ended while loading ({status})"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                return Err(PluginError::new(
                    ErrorKind::Timeout,
                    format!("the plugin process did not listen in time: {e}"),
                ))
            }
        }
    };
    let (rd, wr) = stream.into_split();
    let wr: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    let pending: Pending = Arc::default();
    let p = pending.clone();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(a) = serde_json::from_str::<Answer>(&l) {
                if let Some(waiter) = lock(&p).remove(&a.id) {
                    let r = match (a.ok, a.err) {
                        (_, Some(e)) => Err(e.into()),
                        (Some(text), None) => Ok(text),
                        (None, None) => Err(PluginError::new(
                            ErrorKind::InvalidResponse,
                            "an empty answer",
                        )),
                    };
                    let _ = waiter.send(r);
                }
            }
        }
        // The child is gone: every call waiting on it ends now.
        lock(&p).clear();
    });
    let conn = Conn { wr, pending };
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let (otx, orx) = oneshot::channel();
    lock(&conn.pending).insert(id, otx);
    send(
        &conn.wr,
        &Request::Create {
            id,
            kind: spec.kind.as_str().to_owned(),
            config: spec.config.clone(),
        },
    )
    .await;
    match tokio::time::timeout_at(deadline, orx).await {
        Ok(Ok(Ok(_))) => Ok(Child {
            conn,
            process,
            reader,
            _dir: dir,
        }),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(transient(
            "the plugin process ended while creating the instance".into(),
        )),
        Err(_) => Err(PluginError::new(
            ErrorKind::Timeout,
            "the plugin process did not create the instance in time",
        )),
    }
}

/// A plugin instance in a child process of its own.
pub struct ProcessClient {
    plugin: String,
    kind: Kind,
    timeout: Duration,
    health: Health,
    conn: Arc<Mutex<Option<Conn>>>,
    stop: watch::Sender<bool>,
    /// A call that timed out: the child is not answering; the keeper kills it.
    restart: Arc<tokio::sync::Notify>,
}

impl ProcessClient {
    /// Starts the child and creates the instance; a refusal is the caller's `CreateError`.
    /// Afterwards a keeper restarts the child whenever it ends.
    pub async fn start(
        exe: PathBuf,
        file: PathBuf,
        plugin: &str,
        kind: Kind,
        config: &serde_json::Value,
        options: CallOptions,
        create_timeout: Duration,
    ) -> Result<Arc<ProcessClient>, CreateError> {
        let spec = Spec {
            exe,
            file,
            plugin: plugin.to_owned(),
            kind,
            config: config.to_string(),
            create_timeout,
        };
        let child = start_child(&spec)
            .await
            .map_err(|error| CreateError::Plugin {
                plugin: plugin.to_owned(),
                error,
            })?;
        let (stop, stopped) = watch::channel(false);
        let client = Arc::new(ProcessClient {
            plugin: plugin.to_owned(),
            kind,
            timeout: options.timeout,
            health: Health::new(&options),
            conn: Arc::new(Mutex::new(Some(child.conn.clone()))),
            stop,
            restart: Arc::default(),
        });
        tokio::spawn(keep(
            spec,
            child,
            client.conn.clone(),
            stopped,
            client.restart.clone(),
        ));
        Ok(client)
    }
}

/// Restarts the child whenever it ends, with backoff, until the client shuts down.
async fn keep(
    spec: Spec,
    mut child: Child,
    slot: Arc<Mutex<Option<Conn>>>,
    mut stop: watch::Receiver<bool>,
    restart: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(60));
    loop {
        let status = tokio::select! {
            _ = stop.changed() => {
                send(&child.conn.wr, &Request::Shutdown).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), child.process.wait()).await;
                return;
            }
            _ = restart.notified() => {
                tracing::warn!(plugin = %spec.plugin, "plugin process not answering a call in time; killing it");
                let _ = child.process.kill().await;
                child.process.wait().await
            }
            s = child.process.wait() => s,
        };
        *lock(&slot) = None;
        let _ = (&mut child.reader).await;
        let how = match &status {
            Ok(s) => match std::os::unix::process::ExitStatusExt::signal(s) {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited ({s})"),
            },
            Err(e) => format!("lost: {e}"),
        };
        loop {
            let delay = backoff.next_delay();
            tracing::warn!(plugin = %spec.plugin, restart_in = %crate::logs::humantime(delay), "plugin process {how}; its calls fail until it is restarted");
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match start_child(&spec).await {
                Ok(c) => {
                    tracing::info!(plugin = %spec.plugin, "plugin process restarted; instance created again");
                    *lock(&slot) = Some(c.conn.clone());
                    child = c;
                    break;
                }
                Err(e) => {
                    tracing::warn!(plugin = %spec.plugin, "plugin process not restarted: {e}")
                }
            }
        }
    }
}

/// Tells the child to drop a call the caller gave up on.
struct CancelOnDrop {
    conn: Conn,
    id: u64,
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.conn.pending).remove(&self.id);
            self.conn.send_later(Request::Cancel { id: self.id });
        }
    }
}

impl PluginClient for ProcessClient {
    fn plugin_name(&self) -> &str {
        &self.plugin
    }

    fn kind(&self) -> Kind {
        self.kind
    }

    fn call(
        &self,
        op: &str,
        args: &str,
        decode: Decode,
    ) -> BoxFuture<Result<Box<dyn Any + Send>, CallError>> {
        let (plugin, op) = (self.plugin.clone(), op.to_owned());
        if let Err(resting) = self.health.admit(&plugin, &op) {
            return Box::pin(std::future::ready(Err(resting)));
        }
        let health = self.health.clone();
        let started = std::time::Instant::now();
        let Some(conn) = lock(&self.conn).clone() else {
            let e = PluginError::new(
                ErrorKind::Transient,
                "the plugin process is being restarted",
            );
            return Box::pin(std::future::ready(health.settle(
                plugin,
                op,
                Err(e),
                started,
            )));
        };
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let (otx, orx) = oneshot::channel();
        lock(&conn.pending).insert(id, otx);
        let request = Request::Call {
            id,
            name: op.clone(),
            args: args.to_owned(),
        };
        let mut guard = CancelOnDrop {
            conn,
            id,
            done: false,
        };
        let timeout = self.timeout;
        let restart = self.restart.clone();
        Box::pin(async move {
            send(&guard.conn.wr, &request).await;
            let outcome = match tokio::time::timeout(timeout, orx).await {
                Ok(Ok(Ok(text))) => {
                    guard.done = true;
                    decode_answer(&text, decode)
                }
                Ok(Ok(Err(e))) => {
                    guard.done = true;
                    Err(e)
                }
                Ok(Err(_)) => {
                    guard.done = true;
                    Err(PluginError::new(
                        ErrorKind::Transient,
                        "the plugin process ended during the call",
                    ))
                }
                Err(_) => {
                    // A child that does not answer in time may be stuck for good (an
                    // endless loop cancellation cannot reach): it is restarted.
                    restart.notify_one();
                    Err(PluginError::new(
                        ErrorKind::Timeout,
                        format!("no answer within {timeout:?}; the call was cancelled and the plugin process restarted"),
                    ))
                }
            };
            drop(guard);
            health.settle(plugin, op, outcome, started)
        })
    }

    fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}
