//! `warden plugins call`: one plugin file, one instance, calls made as the daemon makes
//! them (schema check, the same client with its panic guard, timeout and breaker), and
//! the answers printed as JSON, for plugin authors and operators who want to see what a
//! plugin measures without running the daemon.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden_plugin_api::{Kind, Op};

use super::{CallError, CallOptions, MetricClient, PluginClient, ServicesClient};

/// What to call.
pub struct Request {
    pub config: String,
    pub kind: Option<String>,
    pub op: Option<String>,
    pub value: Option<f64>,
    pub repeat: u32,
    pub timeout: Duration,
}

/// The operation called when none is named.
pub fn default_op(kind: Kind) -> Op {
    Op::of(kind)[0]
}

/// The error's kind as `warden status` and the metrics name it.
pub fn kind_of(e: &CallError) -> String {
    match e {
        CallError::Failed { error, .. } => error.kind.as_str().to_owned(),
        CallError::Resting { .. } => "resting".to_owned(),
    }
}

/// One call of `op` (the kind's default when `None`); the answer as JSON.
pub async fn once(
    client: &Arc<dyn PluginClient>,
    kind: Kind,
    op: Option<Op>,
    value: Option<f64>,
) -> Result<serde_json::Value, CallError> {
    // An op of another kind is the kind's default (`checked` refuses it before).
    let op = op.filter(|o| o.kind() == kind).unwrap_or(default_op(kind));
    match op {
        Op::Map => {
            let v = value.unwrap_or(0.0);
            MetricClient(client.clone()).map(v).await.map(|m| json(&m))
        }
        Op::Measure => MetricClient(client.clone())
            .measure()
            .await
            .map(|m| json(&m)),
        Op::Generation => ServicesClient(client.clone())
            .generation()
            .await
            .map(|g| json(&g)),
        Op::List => ServicesClient(client.clone())
            .list()
            .await
            .map(|s| json(&s)),
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn fail(stage: &str, kind: &str, message: String) -> ExitCode {
    println!(
        "{}",
        serde_json::json!({ "ok": false, "stage": stage, "error": { "kind": kind, "message": message } })
    );
    ExitCode::FAILURE
}

/// How long `new` may take here (as the daemon's default `plugins.create_timeout_ms`).
const CREATE_LIMIT: Duration = Duration::from_secs(10);

/// Ends the process when the stage in hand outlives its limit. A call's own timeout is
/// a future's: plugin code that blocks its thread (a blocking read, a busy loop) never
/// lets it fire, and in-process code cannot be interrupted, so the watchdog, on a thread
/// of its own, says `timeout` and exits 1 instead.
struct Watchdog(Arc<std::sync::Mutex<Option<Due>>>);

/// When the stage in hand is due, its name and its limit.
type Due = (Instant, &'static str, Duration);

impl Watchdog {
    fn start() -> Watchdog {
        let due: Arc<std::sync::Mutex<Option<Due>>> = Arc::default();
        let d = due.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(10));
            let now = *d.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, stage, limit)) = now {
                if Instant::now() >= at {
                    let _ = fail(
                        stage,
                        "timeout",
                        format!("no answer within {} ms, and the plugin's code does not yield (blocking code cannot be interrupted in-process; isolation = \"process\" kills and restarts it)", limit.as_millis()),
                    );
                    std::process::exit(1);
                }
            }
        });
        Watchdog(due)
    }

    /// Watches `stage` for `limit` plus a grace for the call's own timeout to answer.
    fn watch(&self, stage: &'static str, limit: Duration) {
        let grace = Duration::from_millis(200);
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + limit + grace, stage, limit));
    }

    fn done(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Loads `file`, creates an instance and makes the calls; prints one JSON document.
pub fn run(file: &Path, req: Request, insecure: bool) -> anyhow::Result<ExitCode> {
    let plugin = match super::load_file(file, insecure) {
        Ok(p) => Arc::new(p),
        Err(reason) => return Ok(fail("load", "load", reason.to_string())),
    };
    let (kind, op, config) = match checked(&plugin, &req) {
        Ok(c) => c,
        Err(why) => return Ok(fail("config", "config", why)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let options = CallOptions {
        timeout: req.timeout,
        // Every call is made: the breaker would hide the answers of a repeated run.
        breaker_failures: u32::MAX,
        ..CallOptions::default()
    };
    let started = Instant::now();
    let watchdog = Watchdog::start();
    watchdog.watch("create", CREATE_LIMIT);
    let created = rt.block_on(super::create_instance(
        plugin.clone(),
        kind,
        &config,
        options,
    ));
    let client: Arc<dyn PluginClient> = match created {
        Ok(c) => c,
        Err(e) => return Ok(fail("create", "create", e.to_string())),
    };
    watchdog.done();
    let created_ms = ms(started.elapsed());
    let calls = repeat(&rt, &watchdog, &client, kind, op, &req);
    client.shutdown();
    report(plugin.manifest(), kind, op, created_ms, &calls)
}

/// The request checked against the plugin: the kind, the operation and the config.
fn checked(plugin: &super::Plugin, req: &Request) -> Result<(Kind, Op, serde_json::Value), String> {
    let kind = match req.kind.as_deref() {
        Some(k) => Kind::parse(k).ok_or_else(|| {
            format!("--kind: expected metric-source or service-definitions, got {k:?}")
        })?,
        None => plugin.manifest().kinds[0].kind,
    };
    let ops = Op::of(kind);
    let op = match req.op.as_deref() {
        None => default_op(kind),
        Some(name) => Op::parse(name).filter(|o| ops.contains(o)).ok_or_else(|| {
            let names: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
            format!("--op: a {kind} offers {}, not {name:?}", names.join(", "))
        })?,
    };
    if op == Op::Map && req.value.is_none() {
        return Err("--op map needs --value".into());
    }
    let config: serde_json::Value =
        serde_json::from_str(&req.config).map_err(|e| format!("--config: not JSON: {e}"))?;
    super::check_plugin_config(plugin, kind, &config).map_err(|e| e.to_string())?;
    Ok((kind, op, config))
}

/// What the repeated calls gave: each one's time, the last answer and the last error.
struct Calls {
    times: Vec<f64>,
    last_ok: Option<serde_json::Value>,
    last_err: Option<serde_json::Value>,
    failures: u32,
}

/// Makes `req.repeat` calls, each watched for its timeout.
fn repeat(
    rt: &tokio::runtime::Runtime,
    watchdog: &Watchdog,
    client: &Arc<dyn PluginClient>,
    kind: Kind,
    op: Op,
    req: &Request,
) -> Calls {
    let mut c = Calls {
        times: Vec::new(),
        last_ok: None,
        last_err: None,
        failures: 0,
    };
    for _ in 0..req.repeat.max(1) {
        let t = Instant::now();
        watchdog.watch("call", req.timeout);
        let r = rt.block_on(once(client, kind, Some(op), req.value));
        watchdog.done();
        c.times.push(ms(t.elapsed()));
        match r {
            Ok(v) => c.last_ok = Some(v),
            Err(e) => {
                c.failures += 1;
                c.last_err =
                    Some(serde_json::json!({ "kind": kind_of(&e), "message": e.to_string() }));
            }
        }
    }
    c
}

/// The one JSON document `plugins call` prints; exit 1 if any call failed.
fn report(
    m: &warden_plugin_api::Manifest,
    kind: Kind,
    op: Op,
    created_ms: f64,
    c: &Calls,
) -> anyhow::Result<ExitCode> {
    let mut sorted = c.times.clone();
    sorted.sort_by(f64::total_cmp);
    let mut out = serde_json::json!({
        "ok": c.failures == 0,
        "plugin": m.name,
        "version": m.version,
        "kind": kind.as_str(),
        "op": op.as_str(),
        "created_ms": created_ms,
        "calls": c.times.len(),
        "failures": c.failures,
        "answer": c.last_ok,
        "error": c.last_err,
    });
    if c.failures > 0 {
        // Where it failed, apart from how (the error's kind).
        out["stage"] = "call".into();
    }
    if sorted.len() == 1 {
        out["took_ms"] = sorted[0].into();
    } else {
        out["took_ms"] = serde_json::json!({
            "min": sorted[0],
            "median": sorted[sorted.len() / 2],
            "max": sorted[sorted.len() - 1],
        });
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if c.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
