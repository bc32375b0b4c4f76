//! The daemon against bad files, bad settings and signals at awkward moments: the real
//! `warden` binary, real plugin files (whole, truncated, with a constructor that aborts),
//! a real central Redis.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;
use warden_tests::{plugin_dir, plugin_so, warden, warden_bin};

/// A shared library whose constructor aborts (built here with gcc).
fn aborting_ctor(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("ctor.c");
    std::fs::write(
        &src,
        "#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n",
    )
    .unwrap();
    let so = dir.join("ctor.so");
    let ok = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc failed");
    so
}

fn truncated(from: &Path, to: &Path, n: usize) {
    let data = std::fs::read(from).unwrap();
    std::fs::write(to, &data[..n]).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Truncated copies and a library whose constructor aborts sit beside a good plugin:
/// `plugins list` and `warden run` name each bad file with its reason and go on.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn bad_plugin_files_are_named_and_never_crash_warden() {
    let template = plugin_so("warden_plugin_template");
    let dir = plugin_dir(&[template.as_path()]);
    truncated(&template, &dir.path().join("cut1k.so"), 1000);
    truncated(&template, &dir.path().join("cut200k.so"), 200_000);
    let scratch = tempfile::tempdir().unwrap();
    let ctor = aborting_ctor(scratch.path());
    std::fs::copy(&ctor, dir.path().join("ctor.so")).unwrap();
    std::fs::set_permissions(
        dir.path().join("ctor.so"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let (code, out, err) = warden(&["plugins", "list", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("template\t"), "{out}");
    for (file, reason) in [
        ("cut1k.so", "truncated"),
        ("cut200k.so", "truncated"),
        ("ctor.so", "crashed while loading (SIGABRT)"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with("not loaded:") && l.contains(file) && l.contains(reason)),
            "{file}: {err}"
        );
    }

    // The daemon with the same directory runs and says the same.
    let central = Redis::start();
    let cfg = scratch.path().join("warden.toml");
    std::fs::write(
        &cfg,
        format!(
            "[plugins]\ndirs = [{:?}]\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\ndry_run = true\n",
            dir.path(),
            central.url()
        ),
    )
    .unwrap();
    let log = scratch.path().join("log");
    let mut child = Command::new(warden_bin())
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("WARDEN_HTTP_LISTEN", "off")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "warden running", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("warden running")
            .then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("crashed while loading (SIGABRT)"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "warden died");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A symlink into a world-writable directory, and a plugin under a group-writable parent
/// directory, are refused with the directory named.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn plugins_reachable_through_writable_directories_are_refused() {
    let template = plugin_so("warden_plugin_template");
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::copy(&template, open.join("t.so")).unwrap();
    std::fs::set_permissions(open.join("t.so"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let plugins = base.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(open.join("t.so"), plugins.join("t.so")).unwrap();
    let (_, out, err) = warden(&["plugins", "list", "--dir", plugins.to_str().unwrap()]);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("not loaded") && err.contains("open") && err.contains("symlink"),
        "{err}"
    );

    let loose = base.path().join("loose");
    let nested = loose.join("plugins");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o775)).unwrap();
    std::fs::copy(&template, nested.join("t.so")).unwrap();
    std::fs::set_permissions(nested.join("t.so"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, out, err) = warden(&["plugins", "list", "--dir", nested.to_str().unwrap()]);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("loose") && err.contains("its group"), "{err}");
}

/// Runs `warden run` with `config` (plugins: template, test-chaos and docker-labels
/// unless the config names its own directory) until it exits; returns (code, stderr).
fn run_until_exit(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let plugins = plugin_dir(&[
        plugin_so("warden_plugin_template").as_path(),
        plugin_so("warden_plugin_test_chaos").as_path(),
        plugin_so("warden_plugin_docker_labels").as_path(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("warden.toml");
    let text = if config.contains("dirs =") {
        config.to_owned()
    } else {
        format!("[plugins]\ndirs = [{:?}]\n{config}", plugins.path())
    };
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = Command::new(warden_bin());
    cmd.args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("WARDEN_PLUGIN_DIR")
        .env("WARDEN_HTTP_LISTEN", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each configuration that cannot work makes `warden run` exit 78 with a line naming it.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn fatal_configuration_errors_exit_78_with_their_line() {
    let central = Redis::start();
    let manager = format!(
        "[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\ndry_run = true\n",
        central.url()
    );
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{manager}[metrics.m]\nplugin = \"templat\"\n"),
            "metrics.m: no plugin named \"templat\" is loaded",
        ),
        (
            format!("{manager}[metrics.m]\nplugin = \"template\"\nconfig = {{ value = \"five\" }}\n"),
            "metrics.m: config does not match plugin \"template\"'s schema",
        ),
        (
            format!("{manager}[metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [] }}\n"),
            "metrics.m: plugin \"test-chaos\" refused the config: config: sequence: must not be empty",
        ),
        (
            "[plugins]\ndirs = [\"/nonexistent/warden-plugins\"]\n[registrar]\nenabled = false\n"
                .to_owned(),
            "plugins.dirs: /nonexistent/warden-plugins does not exist",
        ),
        (
            "[registrar]\nresync_secs = 9223372036854775807\n".to_owned(),
            "registrar.resync_secs: 9223372036854775807 is outside 1..=86400",
        ),
        (
            format!("[manager]\ncentral_redis = \"{}\"\nguard_ms = 999999999\n", central.url()),
            "manager.guard_ms: 999999999 must be between 50 ms",
        ),
    ];
    for (config, line) in cases {
        let (code, err) = run_until_exit(&config, &[]);
        assert_eq!(code, Some(78), "{config}\n{err}");
        assert!(err.contains(line), "{config}\nexpected {line:?} in:\n{err}");
    }
    // The registrar on, but no docker-labels plugin to give it services.
    let only_template = plugin_dir(&[plugin_so("warden_plugin_template").as_path()]);
    let (code, err) = run_until_exit(
        &format!("[plugins]\ndirs = [{:?}]\n", only_template.path()),
        &[],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("registrar: enabled with no [[registrar.sources]]")
            && err.contains("registrar.enabled = false"),
        "{err}"
    );
}

fn manager_warden(central: &Redis, id: &str, extra: &str, env: &[(String, String)]) -> Warden {
    Warden::start(
        &format!(
            "[host]\ninstance_id = \"{id}\"\navailability_zone = \"eu-west-1a\"\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\nloop_secs = 1\ndry_run = true\n{extra}",
            central.url()
        ),
        env,
    )
}

const SLOW_METRIC: &str = "[plugins]\ncall_timeout_ms = 20000\n[metrics.m]\nplugin = \"test-chaos\"\nconfig = { sequence = [\"sleep:15000\"] }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";

/// SIGHUP and SIGUSR1 are logged and survived; SIGTERM while a metric call is in flight
/// ends warden within 2 s, exit 0, with the lease given up (gone from Redis at once).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn signals_are_survived_and_sigterm_during_slow_work_exits_in_time() {
    let central = Redis::start();
    let mut w = manager_warden(&central, "i-sig", SLOW_METRIC, &[]);
    eventually(Duration::from_secs(15), "leading", || {
        w.log_text()
            .contains("leading: scaling work started")
            .then_some(())
    });
    w.signal(libc::SIGHUP);
    w.signal(libc::SIGUSR1);
    eventually(Duration::from_secs(5), "both signals logged", || {
        let log = w.log_text();
        (log.contains("SIGHUP received") && log.contains("SIGUSR1 received")).then_some(())
    });
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "a signal ended warden"
    );
    let lease: Option<String> = central.conn().get("warden:leader").unwrap();
    assert!(lease.is_some_and(|l| l.starts_with("i-sig\t")));
    // The metric call (15 s) is in flight now.
    let t = Instant::now();
    w.signal(libc::SIGTERM);
    let status = w.child.wait().unwrap();
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    let lease: Option<String> = central.conn().get("warden:leader").unwrap();
    assert_eq!(lease, None, "the lease was not given up");
    assert!(w.log_text().contains("leadership given up"));
}

/// A loop that panics is logged at ERROR with its name and restarted; one that keeps
/// panicking makes warden exit 70 (so that systemd restarts it whole).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_panicking_loop_is_restarted_and_one_that_keeps_panicking_ends_warden() {
    let central = Redis::start();
    let dry = "[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    let w = manager_warden(
        &central,
        "i-panic",
        dry,
        &[("WARDEN_TEST_PANIC".into(), "manager:2".into())],
    );
    eventually(
        Duration::from_secs(20),
        "leading after two restarts",
        || {
            let v: Option<String> = central.conn().get("warden:leader").ok()?;
            v.filter(|v| v.starts_with("i-panic\t"))
        },
    );
    let log = w.log_text();
    let restarts: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("\"ERROR\"")
                && l.contains("loop manager panicked")
                && l.contains("restarting")
        })
        .collect();
    assert_eq!(restarts.len(), 2, "{log}");
    drop(w);

    let (code, err) = run_until_exit(
        &format!(
            "[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\ndry_run = true\n",
            central.url()
        ),
        &[("WARDEN_TEST_PANIC", "manager:99")],
    );
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains("loop manager keeps failing"), "{err}");
}

/// The manager's worker panics while its host leads: the supervisor restarts the manager
/// loop, and the last run's elector ends with it (no zombie renewing the lease under
/// this host's id), so the lease lapses and the host leads again with a new epoch and
/// scales (a decision recorded under that epoch in the central Redis).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_worker_panic_leaves_no_zombie_elector_and_leadership_comes_back() {
    let central = Redis::start();
    let dry = "[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    let w = manager_warden(
        &central,
        "i-zombie",
        dry,
        &[("WARDEN_TEST_PANIC".into(), "worker:1".into())],
    );
    let epoch_of = |v: &str| v.split('\t').nth(1).and_then(|e| e.parse::<u64>().ok());
    let first = eventually(Duration::from_secs(20), "the worker's panic", || {
        w.log_text()
            .contains("loop manager panicked")
            .then_some(())?;
        let v: Option<String> = central.conn().get("warden:leader").ok()?;
        v.as_deref().and_then(epoch_of)
    });
    let decision = eventually(
        Duration::from_secs(20),
        "a decision under a new epoch",
        || {
            let items: Vec<String> = central.conn().lrange("warden:decisions:web", 0, -1).ok()?;
            items
                .iter()
                .filter_map(|i| serde_json::from_str::<serde_json::Value>(i).ok())
                .find(|d| d["epoch"].as_u64().is_some_and(|e| e != first))
        },
    );
    let v: String = central.conn().get("warden:leader").unwrap();
    assert!(v.starts_with("i-zombie\t"), "{v}");
    assert_eq!(epoch_of(&v), decision["epoch"].as_u64(), "{v} {decision}");
    let log = w.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("loop manager panicked"))
            .count(),
        1,
        "{log}"
    );
}

/// The central Redis down for 30 s: a handful of log lines, not one per tick.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_central_redis_down_for_30s_is_said_a_handful_of_times() {
    let mut central = Redis::start();
    let dry = "[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    let w = manager_warden(&central, "i-quiet", dry, &[]);
    eventually(Duration::from_secs(15), "a decision", || {
        let n: usize = central.conn().llen("warden:decisions:web").ok()?;
        (n > 0).then_some(())
    });
    let before = w.log_text().lines().count();
    let port = central.port;
    drop(central);
    std::thread::sleep(Duration::from_secs(30));
    let during: Vec<String> = w
        .log_text()
        .lines()
        .skip(before)
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
        .map(str::to_owned)
        .collect();
    assert!(
        !during.is_empty() && during.len() <= 6,
        "{} lines while the central redis was down:\n{}",
        during.len(),
        during.join("\n")
    );
    central = Redis::start_on(port);
    eventually(Duration::from_secs(15), "the recovery said", || {
        w.log_text().contains("answering again").then_some(())
    });
    drop(central);
}

/// With `isolation = "process"`, a plugin that segfaults in `measure`, or spins in an
/// endless loop, costs only its child: warden stays up, the call fails as transient (or
/// timeout), the child is restarted, and the next calls are served.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn an_isolated_plugin_that_crashes_or_spins_costs_only_its_child() {
    let central = Redis::start();
    let body = r#"[plugins]
call_timeout_ms = 1000
breaker_failures = 10
[metrics.m]
plugin = "test-chaos"
isolation = "process"
config = { sequence = ["ok:3", "segfault", "ok:4"] }
[metrics.s]
plugin = "test-chaos"
isolation = "process"
config = { sequence = ["ok:5", "spin"] }
[[manager.services]]
name = "web"
task_definition = "web"
metric = "m"
mapping = { target_per_task = 1.0 }
[[manager.services]]
name = "spin"
task_definition = "spin"
metric = "s"
mapping = { target_per_task = 1.0 }
"#;
    let mut w = manager_warden(&central, "i-iso", body, &[]);
    let history = |svc: &str| -> Vec<serde_json::Value> {
        let items: Vec<String> = central
            .conn()
            .lrange(format!("warden:decisions:{svc}"), 0, -1)
            .unwrap();
        items
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    };
    // The crash: one failed reading, then readings again from the restarted child.
    let crashed = eventually(Duration::from_secs(30), "a reading after the crash", || {
        let h = history("web");
        let at = h.iter().position(|r| {
            r["metric_error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("plugin process ended during the call"))
        })?;
        h[at + 1..].iter().any(|r| r["metric"] == 3.0).then_some(h)
    });
    assert_eq!(crashed[0]["metric"], 3.0, "{:?}", crashed[0]);
    // The endless loop: a timeout, the child killed, readings again.
    eventually(Duration::from_secs(30), "a reading after the spin", || {
        let h = history("spin");
        let at = h.iter().position(|r| {
            r["metric_error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("plugin process restarted"))
        })?;
        h[at + 1..].iter().any(|r| r["metric"] == 5.0).then_some(())
    });
    assert!(w.child_alive(), "warden died");
    let log = w.log_text();
    assert!(log.contains("plugin process killed by signal 11"), "{log}");
    assert!(log.contains("plugin instance created (process)"), "{log}");
    assert!(
        log.contains("not answering a call in time; killing it"),
        "{log}"
    );
}
/// Polls `/livez` every 20 ms on a thread of its own until stopped; the slowest answer.
struct LivezWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Duration, usize, Vec<String>)>,
}

impl LivezWatch {
    fn start(port: u16) -> LivezWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut worst, mut n, mut bad) = (Duration::ZERO, 0, Vec::new());
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                match http_get(port, "127.0.0.1", "/livez") {
                    Ok((200, _)) => {}
                    other => bad.push(format!("{other:?}")),
                }
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (worst, n, bad)
        });
        LivezWatch { stop, handle }
    }

    /// (slowest answer, answers, failures)
    fn finish(self) -> (Duration, usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// `n` in-process metric plugins whose calls never return (`step`: `spin` burns a
/// core, `block:<ms>` holds its thread) on this 2-core machine: each wedges once, is
/// said at ERROR and created again in a process; meanwhile `/livez` answers every
/// 20 ms poll within 100 ms, the lease keeps its epoch (renewals heard on the central
/// Redis), and SIGTERM ends warden within 2 s with the lease given up.
fn never_returning_plugins_cost_only_their_own_values(id: &str, step: &str, n: usize) {
    let central = Redis::start();
    let mut extra = String::from("[plugins]\ncall_timeout_ms = 300\nisolation = \"in-process\"\n");
    for i in 0..n {
        extra.push_str(&format!(
            "[metrics.m{i}]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"{step}\"] }}\n[[manager.services]]\nname = \"s{i}\"\ntask_definition = \"s{i}\"\nmetric = \"m{i}\"\nmapping = {{ target_per_task = 1.0 }}\n"
        ));
    }
    let mut w = manager_warden(&central, id, &extra, &[]);
    let livez = LivezWatch::start(w.http_port.unwrap());
    eventually(
        Duration::from_secs(30),
        "every instance wedged once and created again in a process",
        || {
            let log = w.log_text();
            (log.matches("plugin instance created (process)").count() == n).then_some(())
        },
    );
    let log = w.log_text();
    assert_eq!(
        log.matches("plugin instance created (in-process)").count(),
        n,
        "{log}"
    );
    let wedged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"ERROR\"") && l.contains("wedged"))
        .collect();
    assert_eq!(wedged.len(), n, "one ERROR per instance: {log}");
    assert!(wedged.iter().all(|l| l.contains("test-chaos")), "{log}");
    let (lead, epoch) = {
        let v: String = central.conn().get("warden:leader").unwrap();
        let mut it = v.split('\t');
        (it.next().unwrap().to_owned(), it.next().unwrap().to_owned())
    };
    assert_eq!(lead, id);
    let mut sub = central.conn();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sub = sub.as_pubsub();
    sub.subscribe("warden:beat").unwrap();
    for _ in 0..3 {
        let beat: String = sub.get_message().expect("a renewal").get_payload().unwrap();
        assert!(beat.starts_with(&format!("{id}\t{epoch}\t")), "{beat}");
    }
    drop(sub);
    let (worst, polls, failures) = livez.finish();
    eprintln!("/livez: {polls} polls, slowest {worst:?}");
    assert!(failures.is_empty(), "/livez failed: {failures:?}");
    assert!(polls > 10, "only {polls} polls");
    assert!(worst < Duration::from_millis(100), "/livez took {worst:?}");
    // The epoch the leader started with is still the only one.
    let e: u64 = central.conn().get("warden:epoch").unwrap();
    assert_eq!(e.to_string(), epoch);
    let t = Instant::now();
    w.signal(libc::SIGTERM);
    let status = w.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", w.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    let lease: Option<String> = central.conn().get("warden:leader").unwrap();
    assert_eq!(lease, None, "the lease was not given up");
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn four_plugins_that_never_yield_cost_only_their_own_values() {
    never_returning_plugins_cost_only_their_own_values("i-spin4", "spin", 4);
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn two_plugins_that_block_their_thread_cost_only_their_own_values() {
    never_returning_plugins_cost_only_their_own_values("i-block2", "block:600000", 2);
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn two_plugins_that_never_yield_cost_only_their_own_values() {
    never_returning_plugins_cost_only_their_own_values("i-spin2", "spin", 2);
}

/// A read that hangs once, in process: the instance is reported wedged and created
/// again in a process, and the service's value comes back from it: the leader's
/// record in the central Redis holds it, with where the source now runs, and `warden
/// status` says so; `/readyz` is ready again and names no wedged instance.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_wedged_instance_is_created_again_in_a_process_and_its_value_comes_back() {
    let central = Redis::start();
    let marker = tempfile::tempdir().unwrap();
    let marker = marker.path().join("spun");
    let extra = format!(
        "[plugins]\ncall_timeout_ms = 300\n[metrics.m]\nplugin = \"test-chaos\"\nisolation = \"in-process\"\nconfig = {{ sequence = [\"spin_once:{}\"] }}\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\n",
        marker.display()
    );
    let w = manager_warden(&central, "i-once", &extra, &[]);
    let record = eventually(
        Duration::from_secs(30),
        "the value from the process",
        || {
            let text: Option<String> = central.conn().get("warden:decision:web").unwrap();
            let r: serde_json::Value = serde_json::from_str(&text?).ok()?;
            (r["metric"] == 7.0).then_some(r)
        },
    );
    assert_eq!(record["metric_isolation"], "process", "{record}");
    let log = w.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"ERROR\"") && l.contains("wedged") && l.contains("test-chaos")),
        "{log}"
    );
    assert!(
        log.contains("plugin instance created (in-process)"),
        "{log}"
    );
    assert!(log.contains("plugin instance created (process)"), "{log}");
    assert!(w.metric("warden_plugin_wedged_total").unwrap() >= 1.0);
    let (code, body) = eventually(Duration::from_secs(10), "ready again", || {
        let (code, body) = w.http("/readyz").ok()?;
        (code == 200).then_some((code, body))
    });
    assert!(!body.contains("wedged"), "{code} {body}");
    let (_, status) = w.http("/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["wedged_plugins"], serde_json::json!([]), "{status}");
    let text = status_text(&central);
    assert!(
        text.contains("web: metric 7")
            && text.contains("metric source runs in a process of its own"),
        "{text}"
    );
}
