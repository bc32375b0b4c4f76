//! The real parts the end-to-end tests run against, each started on a free loopback
//! port and stopped when dropped: redis-server, moto_server, nginx with warden's router,
//! Docker containers of a locally built busybox image, and warden itself.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{plugin_dir, plugin_so, warden_bin, workspace_root};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills a child started in a process group of its own (`process_group(0)`) with all
/// its descendants: killing only nginx's master would leave its workers running, still
/// listening, and holding whatever stdout they inherited.
pub fn kill_group(child: &mut Child) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// A redis-server of its own, without persistence.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) };
    }
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }
    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &["--port", &port.to_string()])
    }
    /// A redis-server with more arguments (`--requirepass`, `--tls-port`, ...); `port`
    /// is the one waited for. `url()` assumes a plain, open `port`.
    pub fn start_with(port: u16, args: &[&str]) -> Redis {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/setup.sh)");
        wait_for_port(port, "redis-server");
        Redis { port, child }
    }
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
    /// Stops it (its data is lost); `restart` brings an empty one back on the port.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
    /// Stops it (its data is lost) and starts an empty one on the same port.
    pub fn restart(&mut self) {
        kill(&mut self.child);
        *self = Redis::start_on(self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// moto_server: the AWS APIs on loopback, started through `tests/fixtures/moto_server.py`
/// (ECS answers the Rust SDK can read) with its request recorder on, so that tests count
/// the calls on the AWS side.
pub struct Moto {
    pub port: u16,
    host: String,
    child: Child,
    _dir: tempfile::TempDir,
    recording: PathBuf,
}

/// One request as moto's recorder saw it, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// `RunTask`, `StopTask`, … (`X-Amz-Target` without its prefix), or the query's
    /// `Action` for query protocols.
    pub op: String,
    /// The access key of the signature: which warden sent it.
    pub key: String,
    /// warden's `x-warden-epoch` header.
    pub epoch: Option<u64>,
}

/// Calls of deposed epochs: for each epoch, the calls of older epochs that moto recorded
/// after that epoch's first call (with their place in the recording).
pub fn late_calls(rec: &[Recorded]) -> Vec<(usize, Recorded)> {
    let mut first: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for (i, r) in rec.iter().enumerate() {
        if let Some(e) = r.epoch {
            first.entry(e).or_insert(i);
        }
    }
    rec.iter()
        .enumerate()
        .filter(|(i, r)| {
            r.epoch.is_some_and(|e| {
                first
                    .range(e + 1..)
                    .any(|(_, &successor_first)| *i > successor_first)
            })
        })
        .map(|(i, r)| (i, r.clone()))
        .collect()
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_on("127.0.0.1")
    }

    /// moto listening on `host` (the bridge's address, for wardens in namespaces).
    pub fn start_on(host: &str) -> Moto {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let recording = dir.path().join("recording.jsonl");
        let child = Command::new("python3")
            .arg(workspace_root().join("tests/fixtures/moto_server.py"))
            .args(["-H", host, "-p", &port.to_string()])
            .env("MOTO_ENABLE_RECORDING", "1")
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] (run scripts/setup.sh)");
        let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
        eventually(Duration::from_secs(20), "moto_server", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        });
        Moto {
            port,
            host: host.to_owned(),
            child,
            _dir: dir,
            recording,
        }
    }
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
    /// Environment for an AWS SDK client (warden's or the test's) pointed at moto.
    pub fn env(&self) -> Vec<(String, String)> {
        Self::env_for(&self.endpoint(), "testing")
    }
    /// Environment for a warden reaching AWS at `endpoint` (moto, or a proxy in front of
    /// it) under its own access key, so that moto's recorder tells wardens apart.
    pub fn env_for(endpoint: &str, key: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), endpoint.to_owned()),
            ("AWS_REGION".into(), "eu-west-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), key.to_owned()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }
    /// Every request moto's recorder has written so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let h = &v["headers"];
                let get = |name: &str| {
                    h.as_object()
                        .and_then(|o| {
                            o.iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                                .and_then(|(_, v)| v.as_str())
                        })
                        .unwrap_or("")
                        .to_owned()
                };
                let target = get("x-amz-target");
                let op = target.rsplit('.').next().unwrap_or("").to_owned();
                let auth = get("authorization");
                let key = auth
                    .split("Credential=")
                    .nth(1)
                    .and_then(|c| c.split('/').next())
                    .unwrap_or("")
                    .to_owned();
                Recorded {
                    op,
                    key,
                    epoch: get("x-warden-epoch").parse().ok(),
                }
            })
            .collect()
    }
    /// Runs `tests/fixtures/aws.py` against this moto (ECS, EC2, S3 fixtures); its stdout.
    pub fn fixture(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(workspace_root().join("tests/fixtures/aws.py"))
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aws.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// RUNNING and PENDING tasks of `family` started by `started_by`, counted in ECS.
    pub async fn ecs_count(&self, cluster: &str, family: &str, started_by: &str) -> usize {
        let ecs = self.ecs().await;
        let mut n = 0;
        let mut next = None;
        loop {
            let page = ecs
                .list_tasks()
                .cluster(cluster)
                .family(family)
                .started_by(started_by)
                .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
                .set_next_token(next)
                .send()
                .await
                .unwrap();
            n += page.task_arns().len();
            match page.next_token() {
                Some(t) => next = Some(t.to_owned()),
                None => return n,
            }
        }
    }

    pub async fn ecs(&self) -> aws_sdk_ecs::Client {
        let creds =
            aws_sdk_ecs::config::Credentials::new("test-observer", "testing", None, None, "test");
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("eu-west-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(creds)
            .load()
            .await;
        aws_sdk_ecs::Client::new(&conf)
    }

    /// Creates classic ELB `name` (HTTP 80 → `instance_port`, eu-west-1a).
    pub async fn create_elb(&self, name: &str, instance_port: u16) {
        self.fixture(&["elb-create", name, &instance_port.to_string()]);
    }

    /// The instance ids registered in classic ELB `name`, as moto describes them (read
    /// with warden's own Query client, which the ELB tests also check against moto).
    pub async fn elb_members(&self, name: &str) -> Vec<String> {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("eu-west-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await;
        let elb = warden_aws_query::elb::Elb::new(&conf, Duration::from_secs(10)).unwrap();
        elb.instances(name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no classic ELB {name}"))
    }
}

impl Moto {
    /// The IAM actions (`ecs:RunTask`, `s3:GetObject`, …) that warden and its plugins
    /// sent, in order, told from the test's own calls by the `app/warden` of their user
    /// agent.
    pub fn warden_action_list(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| iam_action(&v))
            .collect()
    }

    /// The JSON bodies of the requests whose `X-Amz-Target` ends in `.op`, in order (JSON
    /// protocols: ECS, DynamoDB...), as moto recorded them.
    pub fn request_bodies(&self, op: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        let suffix = format!(".{op}");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["headers"].as_object().is_some_and(|h| {
                    h.iter().any(|(k, t)| {
                        k.eq_ignore_ascii_case("x-amz-target")
                            && t.as_str().is_some_and(|t| t.ends_with(&suffix))
                    })
                })
            })
            .filter_map(|v| {
                let body = v["body"].as_str()?;
                let body = if v["body_encoded"].as_bool() == Some(true) {
                    String::from_utf8(base64_decode(body)).ok()?
                } else {
                    body.to_owned()
                };
                serde_json::from_str(&body).ok()
            })
            .collect()
    }

    /// The same actions, each once.
    pub fn warden_actions(&self) -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| iam_action(&v))
            .collect()
    }
}

/// The IAM action of one recorded request, when warden sent it.
fn iam_action(v: &serde_json::Value) -> Option<String> {
    let headers = v["headers"].as_object()?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let agent = format!("{} {}", get("user-agent"), get("x-amz-user-agent"));
    if !agent.contains("app/warden") {
        return None;
    }
    // Credential=KEY/DATE/REGION/SERVICE/aws4_request
    let service = get("authorization")
        .split("Credential=")
        .nth(1)?
        .split('/')
        .nth(3)?;
    // The signing name, where IAM's prefix differs from it.
    let service = match service {
        "monitoring" => "cloudwatch",
        s => s,
    };
    let target = get("x-amz-target");
    let action = if !target.is_empty() {
        target.rsplit('.').next()?.to_owned()
    } else if service == "s3" {
        match v["method"].as_str()? {
            "GET" | "HEAD" => "GetObject".to_owned(),
            m => format!("{m}Object"),
        }
    } else {
        let body = v["body"].as_str().unwrap_or("");
        let body = if v["body_encoded"].as_bool() == Some(true) {
            String::from_utf8(base64_decode(body)).unwrap_or_default()
        } else {
            body.to_owned()
        };
        let url = v["url"].as_str().unwrap_or("");
        let query = url.split_once('?').map_or("", |(_, q)| q);
        [body.as_str(), query]
            .iter()
            .flat_map(|s| s.split('&'))
            .find_map(|kv| kv.strip_prefix("Action="))?
            .to_owned()
    };
    Some(format!("{service}:{action}"))
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Where every Moto of a test run leaves the actions warden sent it, for the IAM policy
/// check (`tests/tests/iam_policy.rs`, run by `scripts/test.sh` after the others).
pub fn aws_actions_dir() -> PathBuf {
    workspace_root().join("target/aws-actions")
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill(&mut self.child);
        let actions = self.warden_actions();
        if !actions.is_empty() {
            let dir = aws_actions_dir();
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{}-{}.txt", std::process::id(), self.port));
            let mut text = actions.into_iter().collect::<Vec<_>>().join("\n");
            text.push('\n');
            let _ = std::fs::write(file, text);
        }
    }
}

/// nginx running warden's router.
pub struct Router {
    pub port: u16,
    pub prefix: tempfile::TempDir,
    child: Child,
}

impl Router {
    pub fn start(redis: &Redis) -> Router {
        Self::start_with(redis, "random")
    }

    /// Loopback backends (the harness's `Backend`s) and Docker's networks are servers.
    pub const TEST_NETWORKS: &'static str = "127.0.0.0/8,172.16.0.0/12,192.168.0.0/16";

    /// `balance`: `random` or `round-robin`.
    pub fn start_with(redis: &Redis, balance: &str) -> Router {
        Self::start_full(redis, balance, Self::TEST_NETWORKS, &[])
    }

    /// With more environment for start.sh (the test networks).
    pub fn start_env(redis: &Redis, env: &[(&str, &str)]) -> Router {
        Self::start_full(redis, "random", Self::TEST_NETWORKS, env)
    }

    /// As shipped: servers only in Docker's networks (no loopback), with more
    /// environment for start.sh (a Redis password...).
    pub fn start_strict(redis: &Redis, env: &[(&str, &str)]) -> Router {
        Self::start_full(redis, "random", "172.16.0.0/12,192.168.0.0/16", env)
    }

    fn start_full(redis: &Redis, balance: &str, networks: &str, env: &[(&str, &str)]) -> Router {
        let port = free_port();
        let prefix = tempfile::tempdir().unwrap();
        let child = Command::new(workspace_root().join("router/start.sh"))
            .process_group(0)
            .env("WARDEN_ROUTER_NETWORKS", networks)
            .envs(env.iter().copied())
            .args([
                prefix.path().to_str().unwrap(),
                &port.to_string(),
                "127.0.0.1",
                &redis.port.to_string(),
                balance,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "nginx router");
        Router {
            port,
            prefix,
            child,
        }
    }
    pub fn ports_file(&self) -> PathBuf {
        self.prefix.path().join("ports.conf")
    }
    /// Adds a `listen` line, as warden does for a port front-end, and reloads nginx.
    pub fn listen(&self, port: u16) {
        let mut text = std::fs::read_to_string(self.ports_file()).unwrap_or_default();
        text.push_str(&format!("listen {port};\n"));
        std::fs::write(self.ports_file(), text).unwrap();
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        wait_for_port(port, "nginx router's port front-end");
    }
    pub fn pid_file(&self) -> PathBuf {
        self.prefix.path().join("nginx.pid")
    }
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("error.log")).unwrap_or_default()
    }
    /// The process group of nginx's master and workers.
    pub fn pgid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// What warden `instance`'s registrar says of its containers, conflicts and blocked keys
/// (`warden:registrar:<instance>` in its local Redis; `warden routes` reads the same).
pub fn account(redis: &Redis, instance: &str) -> serde_json::Value {
    let text: Option<String> =
        redis::Commands::get(&mut redis.conn(), format!("warden:registrar:{instance}")).unwrap();
    text.map_or(serde_json::Value::Null, |t| {
        serde_json::from_str(&t).unwrap()
    })
}

/// Waits until warden's account lists the container `name`; returns its entry.
pub fn wait_account_container(redis: &Redis, instance: &str, name: &str) -> serde_json::Value {
    eventually(
        Duration::from_secs(15),
        &format!("warden's account listing container {name}"),
        || {
            account(redis, instance)["containers"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
        },
    )
}

/// A static HTTP backend on loopback (busybox httpd) answering `body` at `/` and at
/// `/api/v1/`.
pub struct Backend {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Backend {
    pub fn start(body: &str) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), body).unwrap();
        std::fs::create_dir_all(dir.path().join("api/v1")).unwrap();
        std::fs::write(dir.path().join("api/v1/index.html"), body).unwrap();
        let port = free_port();
        let child = Command::new("/bin/busybox")
            .process_group(0)
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(dir.path())
            .spawn()
            .expect("busybox httpd (run scripts/setup.sh)");
        wait_for_port(port, "busybox httpd");
        Backend {
            port,
            child,
            _dir: dir,
        }
    }
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// How many calls of `action` warden sent moto (its recorder).
pub fn count(moto: &Moto, action: &str) -> usize {
    moto.warden_action_list()
        .iter()
        .filter(|a| *a == action)
        .count()
}

/// Waits (30 s at most) for a line of warden's log holding every one of `all`.
/// `warden status` (text) against `central`, with no config file.
pub fn status_text(central: &Redis) -> String {
    let out = Command::new(warden_bin())
        .args(["status"])
        .env("WARDEN_CENTRAL_REDIS", central.url())
        .env_remove("WARDEN_CONFIG")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_log(w: &Warden, what: &str, all: &[&str]) -> String {
    eventually(Duration::from_secs(30), what, || {
        w.log_text()
            .lines()
            .find(|l| all.iter().all(|s| l.contains(s)))
            .map(str::to_owned)
    })
}

/// One HTTP/1.0 GET; returns (status, body).
pub fn http_get(port: u16, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub const IMAGE: &str = "warden-test/busybox";

/// Builds the test image (a busybox rootfs, `docker import`ed) once.
pub fn test_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .unwrap()
            .status
            .success();
        if present {
            return;
        }
        let status = Command::new(workspace_root().join("tests/image/build.sh"))
            .status()
            .unwrap();
        assert!(status.success(), "building the test image failed");
    });
    IMAGE
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The label every container of this test process carries; every warden the harness
/// starts considers only containers with it (`registrar.require_label`), so the suite
/// passes beside containers it did not start.
pub fn run_label() -> String {
    format!("warden-test-run={}", std::process::id())
}

/// Puts `require_label` for this run into a config's `[registrar]` table.
fn with_run_label(config: &str) -> String {
    if config.contains("require_label") {
        return config.to_owned();
    }
    let line = format!("require_label = \"{}\"\n", run_label());
    if config.contains("[registrar]\n") {
        config.replacen("[registrar]\n", &format!("[registrar]\n{line}"), 1)
    } else {
        format!("{config}\n[registrar]\n{line}")
    }
}

/// Grants everything (but special hosts and reserved ports) unless the test says what
/// it grants: most tests are about something else than the trust boundary.
pub const GRANT_ALL: &str = "\n[grants]\nfrontends = [\"*\"]\nfrontend_ports = [\"1-65535\"]\nload_balancers = [\"*\"]\ntarget_groups = [\"*\", \"arn:*\"]\nclusters = [\"*\"]\ntask_definitions = [\"*\", \"*:*\", \"arn:*\"]\necs_services = [\"*\"]\nmax_tasks = 10000\n";

fn with_grants(config: &str) -> String {
    if config.contains("[grants]") {
        config.to_owned()
    } else {
        format!("{config}{GRANT_ALL}")
    }
}

/// Containers (and networks) made by one test, removed when dropped.
pub struct Containers {
    pub tag: String,
    networks: Vec<String>,
}

impl Containers {
    pub fn new(test: &str) -> Containers {
        test_image();
        let tag = format!("{test}-{}", std::process::id());
        Containers {
            tag,
            networks: Vec::new(),
        }
    }

    /// Starts a container serving a page with its name; returns its id.
    pub fn run(&self, name: &str, labels: &[(&str, &str)], extra: &[&str]) -> String {
        self.run_cmd(name, labels, extra, &[])
    }

    /// As [`Containers::run`], with the image's command replaced by `cmd` (empty: the
    /// image's own).
    pub fn run_cmd(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
        cmd: &[&str],
    ) -> String {
        let full = format!("{}-{name}", self.tag);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            full.clone(),
            "-l".into(),
            format!("warden-test={}", self.tag),
            "-l".into(),
            run_label(),
            "-e".into(),
            format!("NAME={full}"),
        ];
        for (k, v) in labels {
            args.push("-l".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(IMAGE.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs)
    }

    pub fn full_name(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    pub fn network(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.tag);
        docker(&["network", "create", &full]);
        self.networks.push(full.clone());
        full
    }

    pub fn ip(&self, id: &str, network: &str) -> String {
        docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            id,
        ])
    }

    pub fn running(&self, id: &str) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", id]) == "true"
    }

    /// `docker stop -t SECS` in the background (returns at once).
    pub fn stop_async(&self, id: &str, secs: u32) -> Child {
        Command::new("docker")
            .args(["stop", "-t", &secs.to_string(), id])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn rm(&self, id: &str) {
        docker(&["rm", "-f", id]);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=warden-test={}", self.tag),
        ]);
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

/// A `warden run` process with its log in a file.
pub struct Warden {
    pub child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    registrar: bool,
    /// The port of warden's HTTP endpoint (one per warden, so tests run side by side).
    pub http_port: Option<u16>,
    /// The network namespace it runs in (`tests/cluster.rs`), if any.
    netns: Option<String>,
    _plugins: [tempfile::TempDir; 2],
    _dir: tempfile::TempDir,
}

impl Warden {
    /// `config` is the TOML body; the plugin directory (with docker-labels and
    /// file-services) is prepended.
    pub fn start(config: &str, env: &[(String, String)]) -> Warden {
        Self::start_in(None, config, env)
    }

    /// [`Warden::start`], inside a network namespace.
    pub fn start_in(netns: Option<&str>, config: &str, env: &[(String, String)]) -> Warden {
        // As the package lays them out: the plugins shipped with warden in a directory
        // of their own, run in process under `isolation = "auto"`; the others (a test
        // plugin, the template, optional sources) in another, run in a child each.
        let shipped = plugin_dir(&[
            plugin_so("warden_plugin_docker_labels").as_path(),
            plugin_so("warden_plugin_file_services").as_path(),
            plugin_so("warden_plugin_beanstalk_instances").as_path(),
            plugin_so("warden_plugin_s3_table").as_path(),
        ]);
        let others = plugin_dir(&[
            plugin_so("warden_plugin_template").as_path(),
            plugin_so("warden_plugin_test_chaos").as_path(),
            plugin_so("warden_plugin_redis_services").as_path(),
            plugin_so("warden_plugin_dynamodb_services").as_path(),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("warden.toml");
        let dirs = format!(
            "dirs = [{:?}, {:?}]\nin_process_dirs = [{:?}]\n",
            shipped.path(),
            others.path(),
            shipped.path()
        );
        let text = if config.contains("[plugins]\n") {
            config.replacen("[plugins]\n", &format!("[plugins]\n{dirs}"), 1)
        } else {
            format!("[plugins]\n{dirs}\n{config}")
        };
        let registrar = !text.contains("enabled = false");
        let (text, http_port) = if text.contains("[http]") {
            (text, None)
        } else {
            let port = free_port();
            (
                format!("{text}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
                Some(port),
            )
        };
        std::fs::write(&cfg, with_run_label(&with_grants(&text))).unwrap();
        // A config may hold passwords: warden refuses one others can read.
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let log = dir.path().join("warden.log");
        let mut w = Warden {
            child: Command::new("true").spawn().unwrap(),
            log,
            config: cfg,
            env: env.to_vec(),
            registrar,
            http_port,
            netns: netns.map(str::to_owned),
            _plugins: [shipped, others],
            _dir: dir,
        };
        w.spawn();
        w.wait_ready(0);
        w
    }

    /// Waits for warden's own signs of readiness in the log written after byte `from`:
    /// its signal handlers are in place ("warden running"), and, with the registrar on,
    /// the routes of the containers running now are written ("registrar ready").
    fn wait_ready(&self, from: usize) {
        let want: &[&str] = if self.registrar {
            &["warden running", "registrar ready"]
        } else {
            &["warden running"]
        };
        eventually(Duration::from_secs(30), "warden ready", || {
            let log = self.log_text();
            let new = log.get(from..).unwrap_or("");
            want.iter().all(|w| new.contains(w)).then_some(())
        });
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(warden_bin());
                c
            }
            None => Command::new(warden_bin()),
        };
        cmd.args([
            "--log-format",
            "json",
            "run",
            "--config",
            self.config.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info,warden=debug")
        .env_remove("WARDEN_PLUGIN_DIR")
        .stdout(Stdio::null())
        .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = cmd.spawn().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on warden's HTTP endpoint: (status, body).
    pub fn http(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(
            self.http_port
                .expect("this warden has the harness's endpoint"),
            "127.0.0.1",
            path,
        )
    }

    /// One sample of `/metrics`: the value of the series whose line starts with `series`
    /// (name and labels exactly as printed).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http("/metrics").ok()?;
        body.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
    }

    /// Whether the process is still running.
    pub fn child_alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub fn sigkill(&mut self) {
        kill(&mut self.child);
    }

    /// SIGTERM, then waits for the exit; its status code.
    pub fn sigterm_and_wait(&mut self) -> Option<i32> {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Starts it again and waits until it is ready.
    pub fn restart(&mut self) {
        let from = self.log_text().len();
        self.spawn();
        self.wait_ready(from);
    }

    /// Starts it again without waiting (a test that measures the start itself).
    pub fn restart_no_wait(&mut self) {
        self.spawn();
    }

    pub fn path(&self) -> &Path {
        &self.log
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Warden {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!("--- last lines of warden's log ({}):", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{}", &l[..l.len().min(600)]);
            }
        }
    }
}
