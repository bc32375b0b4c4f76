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
//!
//! What the child is given, because isolation must isolate and not only contain crashes:
//! * the same checks as an in-process load before every start and restart (permissions,
//!   ELF, the SHA-256 pin, which the child checks again on the very file descriptor it
//!   then loads), and the manifest it loaded compared with the one warden checked;
//! * an empty environment but PATH, RUST_LOG, NO_COLOR and the variables its instance's
//!   `env` names (warden's AWS and Redis secrets stay in warden);
//! * `plugins.isolation_user`'s uid and gid when set (no supplementary groups),
//!   `no_new_privs`, no core dumps, 1024 open files, `plugins.isolation_memory_mb` of data;
//! * bounded output: an answer longer than [`MAX_ANSWER`] ends the child, a log line
//!   longer than [`MAX_LOG_LINE`] is cut.
//!
//! It still shares warden's network (instance metadata included: deny it with a firewall
//! rule on the uid, see docs/operations.md) and file system (read-only to another uid).

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
use warden_plugin_api::{ErrorKind, Kind, Op, PluginError};

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
#[allow(unsafe_code)] // system calls
pub fn serve(file: &Path, socket: &Path, sha256: Option<&str>) -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory-safety preconditions.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let (_opened, load_path) = open_pinned(file, sha256)?;
    let library = warden_plugin_api::host::Library::load(&load_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let manifest = serde_json::to_string(library.manifest()).expect("a manifest serializes");
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
                    let answer = match create_here(&library, &kind, &config) {
                        Ok(i) => {
                            instance = Some(Arc::new(i));
                            Answer {
                                id,
                                ok: Some(manifest.clone()),
                                err: None,
                            }
                        }
                        Err(e) => Answer {
                            id,
                            ok: None,
                            err: Some(e.into()),
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

/// The file to load, opened. With a pin, the bytes hashed are the bytes loaded: the
/// open descriptor is loaded (`/proc/self/fd/N`), not the path, which could be renamed
/// over in between. Keep the file open until the library is loaded.
fn open_pinned(file: &Path, sha256: Option<&str>) -> anyhow::Result<(std::fs::File, PathBuf)> {
    let opened =
        std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let load_path = match sha256 {
        Some(pin) => {
            super::pin::verify_reader(&opened, "this plugin", pin)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&opened)
            ))
        }
        None => file.to_owned(),
    };
    Ok((opened, load_path))
}

/// The instance of `kind` the parent asked for.
fn create_here(
    library: &warden_plugin_api::host::Library,
    kind: &str,
    config: &str,
) -> Result<warden_plugin_api::host::RawInstance, PluginError> {
    match Kind::parse(kind) {
        Some(k) => library.create(k, config),
        None => Err(PluginError::new(
            ErrorKind::Unsupported,
            format!("kind {kind}"),
        )),
    }
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

/// The longest answer line read from a child (a service list can be large).
pub const MAX_ANSWER: usize = 16 << 20;
/// The longest log line of a child passed on whole.
pub const MAX_LOG_LINE: usize = 4096;

/// The user an isolated child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl ChildUser {
    /// Looks a user up by name (the system's user database).
    #[allow(unsafe_code)] // system calls
    pub fn lookup(name: &str) -> Result<ChildUser, String> {
        let c = std::ffi::CString::new(name).map_err(|_| format!("{name:?}: not a user name"))?;
        // SAFETY: getpwnam takes a valid C string; the fields read are copied at once, on
        // the thread that called it, before any other getpw* call.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if pw.is_null() {
            return Err(format!("no user named {name:?} on this host"));
        }
        // SAFETY: pw is non-null and points to getpwnam's static record.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(ChildUser {
            name: name.to_owned(),
            uid,
            gid,
        })
    }
}

/// How isolated children are started, for every instance (`[plugins]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildPolicy {
    pub user: Option<ChildUser>,
    /// RLIMIT_DATA, MiB.
    pub memory_mb: u64,
}

impl Default for ChildPolicy {
    fn default() -> Self {
        Self {
            user: None,
            memory_mb: 1024,
        }
    }
}

/// What one isolated instance's child gets.
#[derive(Debug, Clone)]
pub struct ChildSettings {
    pub policy: ChildPolicy,
    /// The environment it gets (name, value).
    pub env: Vec<(String, String)>,
    pub create_timeout: Duration,
}

/// The child's environment: PATH, RUST_LOG and NO_COLOR, and the variables `names`
/// names, as warden has them now.
pub fn pass_env(names: &[String]) -> Vec<(String, String)> {
    ["PATH", "RUST_LOG", "NO_COLOR"]
        .iter()
        .map(|s| s.to_string())
        .chain(names.iter().cloned())
        .filter_map(|k| std::env::var(&k).ok().map(|v| (k, v)))
        .collect()
}

/// How to start a child for one instance.
#[derive(Clone)]
struct Spec {
    exe: PathBuf,
    plugin: Arc<super::Plugin>,
    kind: Kind,
    config: String,
    settings: ChildSettings,
}

impl Spec {
    fn name(&self) -> &str {
        &self.plugin.manifest().name
    }
}

/// Reads one line of at most `max` bytes (without its newline) into `buf`; `Ok(false)`
/// at the end. A longer line is consumed whole and cut: `Err` with how long it was when
/// `fail_long`, else the first `max` bytes are kept.
async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    use tokio::io::AsyncBufReadExt as _;
    buf.clear();
    let mut total = 0usize;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok((total > 0).then_some(total));
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&part[..part.len().min(room)]);
        total += part.len();
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            return Ok(Some(total));
        }
    }
}

/// Passes a child's log lines on to warden's stderr, each cut at [`MAX_LOG_LINE`].
async fn relay_logs(stderr: tokio::process::ChildStderr, plugin: String) {
    use std::io::Write as _;
    let mut r = BufReader::new(stderr);
    let mut buf = Vec::new();
    while let Ok(Some(len)) = read_line_bounded(&mut r, &mut buf, MAX_LOG_LINE).await {
        let mut line = String::from_utf8_lossy(&buf).into_owned();
        if len > MAX_LOG_LINE {
            line.push_str(&format!(
                " … (plugin {plugin}: {} more bytes of this line cut)",
                len - MAX_LOG_LINE
            ));
        }
        let _ = writeln!(std::io::stderr(), "{line}");
    }
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
    recheck(spec).await?;
    let dir = socket_dir(&spec.settings.policy)?;
    let socket = dir.path().join("s");
    let mut process = command(spec, &socket)
        .spawn()
        .map_err(|e| transient(format!("cannot start {}: {e}", spec.exe.display())))?;
    if let Some(stderr) = process.stderr.take() {
        tokio::spawn(relay_logs(stderr, spec.name().to_owned()));
    }
    let deadline = tokio::time::Instant::now() + spec.settings.create_timeout;
    let stream = connect(&mut process, &socket, deadline).await?;
    let (rd, wr) = stream.into_split();
    let pending: Pending = Arc::default();
    let reader = tokio::spawn(read_answers(rd, pending.clone(), spec.name().to_owned()));
    let conn = Conn {
        wr: Arc::new(tokio::sync::Mutex::new(wr)),
        pending,
    };
    create(&conn, spec, deadline).await?;
    Ok(Child {
        conn,
        process,
        reader,
        _dir: dir,
    })
}

fn transient(m: String) -> PluginError {
    PluginError::new(ErrorKind::Transient, m)
}

/// The same checks as an in-process load, at every start: the file may have changed.
async fn recheck(spec: &Spec) -> Result<(), PluginError> {
    let plugin = spec.plugin.clone();
    tokio::task::spawn_blocking(move || plugin.recheck())
        .await
        .map_err(|e| transient(format!("the file check did not finish: {e}")))?
        .map_err(|e| {
            PluginError::new(
                ErrorKind::Config,
                format!("{}: {e}", spec.plugin.path().display()),
            )
        })
}

/// A directory for the child's socket, given to the child's user if it has one.
#[allow(unsafe_code)] // chown
fn socket_dir(policy: &ChildPolicy) -> Result<tempfile::TempDir, PluginError> {
    let dir = tempfile::Builder::new()
        .prefix("warden-plugin-")
        .tempdir()
        .map_err(|e| transient(format!("cannot make a socket directory: {e}")))?;
    if let Some(u) = &policy.user {
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .map_err(|_| transient("the socket directory's path has a NUL".into()))?;
        // SAFETY: chown takes a valid C string and plain numbers.
        if unsafe { libc::chown(path.as_ptr(), u.uid, u.gid) } != 0 {
            return Err(transient(format!(
                "cannot give the socket directory to user {}: {}",
                u.name,
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(dir)
}

/// `warden plugin-host` for this instance: only the granted environment, the child's
/// user, no new privileges, no core dumps, at most 1024 files and its data limit.
#[allow(unsafe_code)] // pre_exec
fn command(spec: &Spec, socket: &Path) -> tokio::process::Command {
    let policy = &spec.settings.policy;
    let mut cmd = tokio::process::Command::new(&spec.exe);
    cmd.args([
        "--log-format",
        crate::logging::current_format().as_str(),
        "plugin-host",
        "--file",
    ])
    .arg(spec.plugin.path())
    .arg("--socket")
    .arg(socket);
    if let Some(pin) = spec.plugin.pin() {
        cmd.arg("--sha256").arg(pin);
    }
    cmd.env_clear()
        .envs(spec.settings.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(u) = &policy.user {
        cmd.uid(u.uid).gid(u.gid);
    }
    let data = policy.memory_mb.saturating_mul(1 << 20);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, setrlimit), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (res, limit) in [
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, 1024),
                (libc::RLIMIT_DATA, data),
            ] {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(res, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Connects to the child's socket once it listens; fails early if the child ends.
async fn connect(
    process: &mut tokio::process::Child,
    socket: &Path,
    deadline: tokio::time::Instant,
) -> Result<UnixStream, PluginError> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
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
    }
}

/// Hands each answer to the call waiting for its id; when the child is gone, every call
/// still waiting ends.
async fn read_answers(rd: tokio::net::unix::OwnedReadHalf, pending: Pending, name: String) {
    let mut r = BufReader::new(rd);
    let mut buf = Vec::new();
    while let Ok(Some(len)) = read_line_bounded(&mut r, &mut buf, MAX_ANSWER).await {
        if len > MAX_ANSWER {
            tracing::error!(plugin = %name, bytes = len, "plugin process answered more than {MAX_ANSWER} bytes in one line; its connection is dropped (it is restarted)");
            break;
        }
        if let Ok(a) = serde_json::from_slice::<Answer>(&buf) {
            if let Some(waiter) = lock(&pending).remove(&a.id) {
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
    lock(&pending).clear();
}

/// Creates the instance in the child, which answers with the manifest it loaded: it
/// must be the one warden checked.
async fn create(
    conn: &Conn,
    spec: &Spec,
    deadline: tokio::time::Instant,
) -> Result<(), PluginError> {
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
    let loaded = match tokio::time::timeout_at(deadline, orx).await {
        Ok(Ok(answer)) => answer?,
        Ok(Err(_)) => {
            return Err(transient(
                "the plugin process ended while creating the instance".into(),
            ))
        }
        Err(_) => {
            return Err(PluginError::new(
                ErrorKind::Timeout,
                "the plugin process did not create the instance in time",
            ))
        }
    };
    let want = spec.plugin.manifest();
    match serde_json::from_str::<warden_plugin_api::Manifest>(&loaded) {
        Ok(m) if m == *want => Ok(()),
        Ok(m) => Err(PluginError::new(
            ErrorKind::Config,
            format!(
                "the plugin process loaded {} {}, not the {} {} warden checked; restart warden to use a new file",
                m.name, m.version, want.name, want.version
            ),
        )),
        Err(e) => Err(PluginError::new(
            ErrorKind::InvalidResponse,
            format!("the plugin process's manifest is unreadable: {e}"),
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
        plugin: Arc<super::Plugin>,
        kind: Kind,
        config: &serde_json::Value,
        options: CallOptions,
        settings: ChildSettings,
    ) -> Result<Arc<ProcessClient>, CreateError> {
        let name = plugin.manifest().name.clone();
        let spec = Spec {
            exe,
            plugin,
            kind,
            config: config.to_string(),
            settings,
        };
        let child = start_child(&spec)
            .await
            .map_err(|error| CreateError::Plugin {
                plugin: name.clone(),
                error,
            })?;
        let plugin = name.as_str();
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
                tracing::warn!(plugin = %spec.name(), "plugin process not answering a call in time; killing it");
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
            tracing::warn!(plugin = %spec.name(), restart_in = %crate::logs::humantime(delay), "plugin process {how}; its calls fail until it is restarted");
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match start_child(&spec).await {
                Ok(c) => {
                    tracing::info!(plugin = %spec.name(), "plugin process restarted; instance created again");
                    *lock(&slot) = Some(c.conn.clone());
                    child = c;
                    break;
                }
                Err(e) => {
                    tracing::warn!(plugin = %spec.name(), "plugin process not restarted: {e}")
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
        op: Op,
        args: &str,
        decode: Decode,
    ) -> BoxFuture<Result<Box<dyn Any + Send>, CallError>> {
        let (plugin, op) = (self.plugin.clone(), op.as_str().to_owned());
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

    fn isolation(&self) -> crate::plugins::Isolation {
        crate::plugins::Isolation::Process
    }

    fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}
