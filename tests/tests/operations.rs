//! Operating warden: the HTTP endpoint (`/livez`, `/readyz`, `/status`, `/metrics`) and
//! `warden health`, against a running warden with real Docker containers and
//! redis-server. Values are read from the endpoint after known actions.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use warden_tests::harness::*;
use warden_tests::{plugin_dir, plugin_so, warden_bin};

fn config(redis: &Redis, instance: &str) -> String {
    format!(
        "[host]\ninstance_id = \"{instance}\"\n[registrar]\nlocal_redis = \"{}\"\nresync_secs = 30\n",
        redis.url()
    )
}

/// The registrar on, and a dry-run manager scaling `web` from a template metric of 3
/// (one task per unit): `registrar` and `central` are the lines of their sections.
fn registrar_and_dry_run_manager(instance: &str, registrar: &str, central: &str) -> String {
    format!(
        r#"[host]
instance_id = "{instance}"
availability_zone = "eu-west-1a"
[registrar]
{registrar}
[manager]
{central}
loop_secs = 1
dry_run = true
[metrics.m]
plugin = "template"
config = {{ value = 3.0 }}
[[manager.services]]
name = "web"
task_definition = "web"
metric = "m"
mapping = {{ target_per_task = 1.0 }}
"#
    )
}

fn health(w: &Warden, path: &str) -> (bool, String) {
    let out = Command::new(warden_bin())
        .args([
            "health",
            "--addr",
            &format!("127.0.0.1:{}", w.http_port.unwrap()),
            "--path",
            path,
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

fn wait_metric(w: &Warden, series: &str, want: f64) {
    eventually(
        Duration::from_secs(15),
        &format!("{series} = {want}"),
        || (w.metric(series) == Some(want)).then_some(()),
    );
}

/// Three containers started → the routes and servers gauges say so; Docker's events and
/// the reconciles are counted; a service that goes loses its series.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn metrics_follow_known_actions() {
    let redis = Redis::start();
    let w = Warden::start(&config(&redis, "i-metrics"), &[]);
    let cs = Containers::new("metrics");
    let labels = [
        ("warden.service", "m-web"),
        ("warden.frontend", "m-web.example"),
    ];
    let ids: Vec<String> = (0..3)
        .map(|i| cs.run(&format!("web{i}"), &labels, &[]))
        .collect();
    wait_metric(&w, "warden_servers{service=\"m-web\"}", 3.0);
    assert_eq!(w.metric("warden_routes{service=\"m-web\"}"), Some(1.0));
    let starts = w
        .metric("warden_docker_events_total{type=\"start\"}")
        .unwrap();
    assert!(starts >= 3.0, "starts counted: {starts}");
    assert!(w.metric("warden_reconciles_total").unwrap() >= 1.0);
    assert!(w.metric("warden_redis_writes_total").unwrap() >= 1.0);
    let (status, body) = w.http("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("warden_build_info{version=\""), "{body}");
    assert!(
        body.contains("warden_reconcile_duration_seconds_count"),
        "{body}"
    );
    // Without an Accept header (curl, promtool): the classic format, which promtool's
    // check passes (every family with help text, counters named as their samples).
    assert!(!body.contains("# EOF"), "{body}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/setup.sh installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        // (The harness trims the body; the endpoint ends it with a newline.)
        .write_all(format!("{body}\n").as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // What Prometheus asks for: OpenMetrics.
    let om = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", w.http_port.unwrap())).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        om.contains("content-type: application/openmetrics-text"),
        "{om}"
    );
    assert!(
        om.contains("# TYPE warden_reconciles counter") && om.trim_end().ends_with("# EOF"),
        "{om}"
    );

    // One stopped: drained, 2 servers.
    cs.rm(&ids[0]);
    wait_metric(&w, "warden_servers{service=\"m-web\"}", 2.0);
    // All gone: the service's series are removed, not left at 0.
    cs.rm(&ids[1]);
    cs.rm(&ids[2]);
    eventually(Duration::from_secs(15), "m-web series removed", || {
        let (_, body) = w.http("/metrics").ok()?;
        (!body.contains("service=\"m-web\"")).then_some(())
    });
}

/// `/readyz` turns 503 when the local Redis stops and 200 when it is back, while
/// `/livez` stays 200; `warden health` exits accordingly; `/status` is this host's JSON.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn readiness_follows_the_local_redis_and_liveness_does_not() {
    let mut redis = Redis::start();
    let w = Warden::start(&config(&redis, "i-ready"), &[]);
    eventually(Duration::from_secs(15), "ready", || {
        (w.http("/readyz").ok()?.0 == 200).then_some(())
    });
    let (ok, said) = health(&w, "/readyz");
    assert!(ok, "{said}");
    assert!(said.contains("local_redis"), "{said}");

    let (status, body) = w.http("/status").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["instance_id"], "i-ready");
    assert_eq!(v["ready"], true);
    assert_eq!(v["registrar"], true);
    assert_eq!(v["manager"], false);

    redis.stop();
    let body = eventually(Duration::from_secs(15), "readyz 503", || {
        let (s, b) = w.http("/readyz").ok()?;
        (s == 503).then_some(b)
    });
    assert!(body.contains("local_redis"), "{body}");
    let (ok, said) = health(&w, "/readyz");
    assert!(!ok, "health must fail while redis is down: {said}");
    assert!(said.contains("503"), "{said}");
    assert_eq!(w.http("/livez").unwrap().0, 200);
    assert!(health(&w, "/livez").0);
    assert_eq!(
        w.metric("warden_dependency_up{dependency=\"local_redis\"}"),
        Some(0.0)
    );

    redis.restart();
    eventually(Duration::from_secs(20), "readyz 200 again", || {
        (w.http("/readyz").ok()?.0 == 200).then_some(())
    });
    assert!(health(&w, "/readyz").0);
    assert_eq!(w.http("/nowhere").unwrap().0, 404);
}

/// `warden health` against nothing listening fails with the address in its message.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn health_without_a_warden_fails_and_says_where_it_asked() {
    let port = free_port();
    let out = Command::new(warden_bin())
        .args(["health", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

/// The endpoint's address is checked: a taken port stops `run` with exit 78 and a line
/// naming `http.listen`.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_taken_http_port_is_a_config_error() {
    let redis = Redis::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(&[plugin_so("warden_plugin_docker_labels").as_path()]);
    let cfg = dir.path().join("warden.toml");
    std::fs::write(
        &cfg,
        format!(
            "[plugins]\ndirs = [{:?}]\n{}[http]\nlisten = \"127.0.0.1:{port}\"\n",
            plugins.path(),
            config(&redis, "i-taken")
        ),
    )
    .unwrap();
    let out = Command::new(warden_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("WARDEN_PLUGIN_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("http.listen 127.0.0.1:{port}")),
        "{text}"
    );
}

/// A throwaway CA and a server certificate for `localhost` / 127.0.0.1, made with the
/// openssl command: (ca.pem, server.pem, server.key) in `dir`.
fn throwaway_ca(dir: &std::path::Path) {
    let sh = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=warden-test-ca",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}

/// The local Redis with a password, the central Redis with TLS (a throwaway CA) and a
/// password: routes are written, the election and decisions happen, `warden status`
/// reads the central Redis over TLS, and the password appears in no log line, no
/// `warden status` output and no `/status`.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn auth_and_tls_on_both_redis_connections_and_the_password_is_never_shown() {
    const PASSWORD: &str = "s3cret-Pa55";
    let tls = tempfile::tempdir().unwrap();
    throwaway_ca(tls.path());
    let local_port = free_port();
    let _local = Redis::start_with(
        local_port,
        &["--port", &local_port.to_string(), "--requirepass", PASSWORD],
    );
    let central_port = free_port();
    let p = |f: &str| tls.path().join(f).to_str().unwrap().to_owned();
    let _central = Redis::start_with(
        central_port,
        &[
            "--port",
            "0",
            "--tls-port",
            &central_port.to_string(),
            "--tls-cert-file",
            &p("server.pem"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
        ],
    );
    let local_url = format!("redis://:{PASSWORD}@127.0.0.1:{local_port}");
    let config = registrar_and_dry_run_manager(
        "i-tls",
        &format!("local_redis = \"{local_url}\""),
        &format!(
            "central_redis = \"rediss://:{PASSWORD}@localhost:{central_port}\"\ncentral_redis_ca_file = \"{}\"",
            p("ca.pem")
        ),
    );
    let w = Warden::start(&config, &[]);
    let cs = Containers::new("auth-tls");
    cs.run(
        "web",
        &[
            ("warden.service", "t-web"),
            ("warden.frontend", "t-web.example"),
        ],
        &[],
    );
    let mut local = redis::Client::open(local_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    eventually(Duration::from_secs(15), "route written with AUTH", || {
        let v: Option<String> = redis::cmd("GET")
            .arg("frontend:t-web.example")
            .query(&mut local)
            .ok()?;
        (v.as_deref() == Some("t-web")).then_some(())
    });
    wait_metric(&w, "warden_leader", 1.0);
    wait_metric(&w, "warden_desired_tasks{service=\"web\"}", 3.0);
    wait_metric(
        &w,
        "warden_dependency_up{dependency=\"central_redis\"}",
        1.0,
    );

    let status = Command::new(warden_bin())
        .args(["status", "--json", "--config", w.config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["leader"]["instance_id"], "i-tls");
    assert_eq!(v["services"][0]["service"], "web");
    let (_, http_status) = w.http("/status").unwrap();
    let hv: serde_json::Value = serde_json::from_str(&http_status).unwrap();
    assert_eq!(
        hv["cluster"]["leader"]["instance_id"], "i-tls",
        "{http_status}"
    );

    // No CA file for a server whose certificate a private CA signed: the error says
    // which setting names it.
    let no_ca = w.config.with_extension("no-ca.toml");
    let text_no_ca: String = std::fs::read_to_string(&w.config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("central_redis_ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&no_ca, text_no_ca).unwrap();
    std::fs::set_permissions(&no_ca, std::fs::Permissions::from_mode(0o600)).unwrap();
    let untrusted = Command::new(warden_bin())
        .args(["status", "--config", no_ca.to_str().unwrap()])
        .output()
        .unwrap();
    let untrusted_text = String::from_utf8_lossy(&untrusted.stderr).into_owned();
    assert!(!untrusted.status.success(), "{untrusted_text}");
    assert!(
        untrusted_text.contains("UnknownIssuer")
            && untrusted_text.contains("manager.central_redis_ca_file"),
        "{untrusted_text}"
    );

    // Wrong password: said, with the address and not the password.
    let wrong = Command::new(warden_bin())
        .args(["routes", "--config", w.config.to_str().unwrap()])
        .env(
            "WARDEN_LOCAL_REDIS",
            format!("redis://:not-{PASSWORD}@127.0.0.1:{local_port}"),
        )
        .output()
        .unwrap();
    let wrong_text = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert!(!wrong.status.success());
    assert!(
        wrong_text.contains(&format!("127.0.0.1:{local_port}")),
        "{wrong_text}"
    );

    for (what, text) in [
        ("log", w.log_text()),
        ("status", text),
        ("/status", http_status),
        ("routes", wrong_text),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the password appears in {what}: {text}"
        );
    }
}

/// SIGHUP: a configuration that does not parse is refused with its error and the running
/// one stays; a good one is applied (a metric's config, a new managed service, a
/// registrar setting) while the lease is kept (same epoch, no leader change) and the
/// route of a running container never leaves Redis; a setting that needs a restart is
/// refused by name.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn sighup_applies_a_good_configuration_refuses_a_bad_one_and_keeps_routes_and_lease() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (local, central) = (Redis::start(), Redis::start());
    let config = registrar_and_dry_run_manager(
        "i-reload",
        &format!("local_redis = \"{}\"\nresync_secs = 30", local.url()),
        &format!("central_redis = \"{}\"", central.url()),
    );
    let w = Warden::start(&config, &[]);
    let cs = Containers::new("reload");
    cs.run(
        "web",
        &[
            ("warden.service", "r-web"),
            ("warden.frontend", "r-web.example"),
        ],
        &[],
    );
    let mut conn = local.conn();
    eventually(Duration::from_secs(15), "route written", || {
        let v: Option<String> = redis::cmd("GET")
            .arg("frontend:r-web.example")
            .query(&mut conn)
            .ok()?;
        (v.as_deref() == Some("r-web")).then_some(())
    });
    wait_metric(&w, "warden_leader", 1.0);
    wait_metric(&w, "warden_desired_tasks{service=\"web\"}", 3.0);
    let epoch = w.metric("warden_leader_epoch").unwrap();
    let changes = w.metric("warden_leader_changes_total").unwrap();

    // The route is read every millisecond for the whole test.
    let (stop, misses, reads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let watcher = {
        let (stop, misses, reads, mut conn) =
            (stop.clone(), misses.clone(), reads.clone(), local.conn());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let v: Option<String> = redis::cmd("GET")
                    .arg("frontend:r-web.example")
                    .query(&mut conn)
                    .unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if v.as_deref() != Some("r-web") {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let good = std::fs::read_to_string(&w.config).unwrap();
    let reload_line = |from: usize, what: &str| {
        eventually(Duration::from_secs(20), what, || {
            let log = w.log_text();
            log.get(from..)?
                .lines()
                .find(|l| l.contains("configuration reload"))
                .map(str::to_owned)
        })
    };

    // 1. Not TOML: refused, with the file and the line.
    std::fs::write(&w.config, format!("{good}\n[[[broken\n")).unwrap();
    let from = w.log_text().len();
    w.signal(libc::SIGHUP);
    let line = reload_line(from, "the bad reload refused");
    assert!(line.contains("refused"), "{line}");
    assert!(line.contains(w.config.to_str().unwrap()), "{line}");
    assert!(line.contains("line"), "{line}");
    wait_metric(&w, "warden_config_reloads_total{outcome=\"refused\"}", 1.0);

    // 2. A setting that needs a restart: refused by name, nothing applied.
    std::fs::write(
        &w.config,
        good.replace("loop_secs = 1", "loop_secs = 1\nlease_ms = 3000"),
    )
    .unwrap();
    let from = w.log_text().len();
    w.signal(libc::SIGHUP);
    let line = reload_line(from, "the restart-only change refused");
    assert!(
        line.contains("refused") && line.contains("manager.lease_ms"),
        "{line}"
    );

    // 2b. A registrar setting it cannot start with (a CA file that is not there):
    // refused whole, by the checks that run before anything stops; the running
    // registrar goes on (a new container is routed).
    std::fs::write(
        &w.config,
        good.replace(
            "resync_secs = 30",
            "resync_secs = 30\nlocal_redis_ca_file = \"/nonexistent/ca.pem\"",
        ),
    )
    .unwrap();
    let from = w.log_text().len();
    w.signal(libc::SIGHUP);
    let line = reload_line(from, "the registrar that cannot start refused");
    assert!(
        line.contains("refused") && line.contains("/nonexistent/ca.pem"),
        "{line}"
    );
    cs.run(
        "web2",
        &[
            ("warden.service", "r-web2"),
            ("warden.frontend", "r-web2.example"),
        ],
        &[],
    );
    eventually(
        Duration::from_secs(15),
        "the running registrar routes a new container",
        || {
            let v: Option<String> = redis::cmd("GET")
                .arg("frontend:r-web2.example")
                .query(&mut conn)
                .ok()?;
            (v.as_deref() == Some("r-web2")).then_some(())
        },
    );

    // 3. Good: metric 3 → 5, a second service, a registrar setting.
    let new = good.replace("value = 3.0", "value = 5.0").replace("resync_secs = 30", "resync_secs = 20")
        + "[[manager.services]]\nname = \"api\"\ntask_definition = \"api\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    std::fs::write(&w.config, new).unwrap();
    let from = w.log_text().len();
    w.signal(libc::SIGHUP);
    let line = reload_line(from, "the good reload applied");
    assert!(line.contains("configuration reloaded"), "{line}");
    assert!(
        line.contains("registrar restarted") && line.contains("managed services replaced"),
        "{line}"
    );
    wait_metric(&w, "warden_desired_tasks{service=\"web\"}", 5.0);
    wait_metric(&w, "warden_desired_tasks{service=\"api\"}", 5.0);
    // The registrar came back and re-verified its routes.
    eventually(Duration::from_secs(15), "registrar ready again", || {
        w.log_text()
            .get(from..)?
            .contains("registrar ready")
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();

    assert_eq!(
        w.metric("warden_leader_epoch"),
        Some(epoch),
        "the lease was kept"
    );
    assert_eq!(
        w.metric("warden_leader_changes_total"),
        Some(changes),
        "no leader change"
    );
    assert_eq!(w.metric("warden_leader"), Some(1.0));
    assert!(
        reads.load(Ordering::Relaxed) > 100,
        "the watcher read the route"
    );
    assert_eq!(
        misses.load(Ordering::Relaxed),
        0,
        "the route left Redis during a reload"
    );
    assert_eq!(
        w.metric("warden_config_reloads_total{outcome=\"applied\"}"),
        Some(1.0)
    );

    // 4. The second service removed again: `warden status` (read from the central
    // Redis) lists only the services managed now.
    let status_services = || -> Vec<String> {
        let out = Command::new(warden_bin())
            .args(["status", "--json", "--config", w.config.to_str().unwrap()])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["service"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually(
        Duration::from_secs(15),
        "both services in warden status",
        || {
            let mut names = status_services();
            names.sort();
            (names == ["api", "web"]).then_some(())
        },
    );
    std::fs::write(
        &w.config,
        good.replace("value = 3.0", "value = 5.0")
            .replace("resync_secs = 30", "resync_secs = 20"),
    )
    .unwrap();
    let from = w.log_text().len();
    w.signal(libc::SIGHUP);
    let line = reload_line(from, "the reload without api applied");
    assert!(line.contains("configuration reloaded"), "{line}");
    eventually(Duration::from_secs(15), "only web in warden status", || {
        (status_services() == ["web"]).then_some(())
    });
}

fn lease(central: &Redis) -> Option<(String, u64)> {
    let v: Option<String> = redis::cmd("GET")
        .arg("warden:leader")
        .query(&mut central.conn())
        .unwrap();
    let v = v?;
    let mut it = v.split('\t');
    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
}

/// USR1, USR2, PIPE, ALRM, WINCH (and the other signals whose default would end the
/// process) sent to a leader that also routes: it stays alive, keeps its epoch in the
/// central Redis and its route in the local one, and logs each catchable one as
/// ignored; SIGQUIT then stops it cleanly (exit 0, lease given up), as SIGTERM does.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn stray_signals_cost_neither_the_lease_nor_a_route_and_sigquit_stops_cleanly() {
    let (local, central) = (Redis::start(), Redis::start());
    let config = registrar_and_dry_run_manager(
        "i-signals",
        &format!("local_redis = \"{}\"", local.url()),
        &format!("central_redis = \"{}\"", central.url()),
    );
    let mut w = Warden::start(&config, &[]);
    let cs = Containers::new("signals");
    cs.run(
        "web",
        &[
            ("warden.service", "s-web"),
            ("warden.frontend", "s-web.example"),
        ],
        &[],
    );
    let route = || -> Option<String> {
        redis::cmd("GET")
            .arg("frontend:s-web.example")
            .query(&mut local.conn())
            .unwrap()
    };
    eventually(Duration::from_secs(15), "route written", || {
        (route().as_deref() == Some("s-web")).then_some(())
    });
    let (id, epoch) = eventually(Duration::from_secs(15), "leading", || lease(&central));
    assert_eq!(id, "i-signals");
    wait_metric(&w, "warden_leader", 1.0);

    let logged = [
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGXCPU, "SIGXCPU"),
    ];
    let from = w.log_text().len();
    w.signal(libc::SIGPIPE);
    for (sig, _) in logged {
        w.signal(sig);
    }
    eventually(Duration::from_secs(10), "every signal logged", || {
        let log = w.log_text();
        let log = log.get(from..)?;
        logged
            .iter()
            .all(|(_, name)| log.contains(&format!("{name} received; ignored")))
            .then_some(())
    });
    // Two more renewals after the last signal, heard on the leader's heartbeat channel.
    let mut sub = central.conn();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sub = sub.as_pubsub();
    sub.subscribe("warden:beat").unwrap();
    for _ in 0..2 {
        let beat: String = sub
            .get_message()
            .expect("a renewal within 10 s")
            .get_payload()
            .unwrap();
        assert!(beat.starts_with("i-signals\t"), "{beat}");
    }
    drop(sub);
    assert!(w.child_alive(), "a signal ended warden");
    assert_eq!(lease(&central), Some((id, epoch)), "the lease changed");
    assert_eq!(route().as_deref(), Some("s-web"), "the route changed");
    assert!(!w.log_text().contains("restarting"), "{}", w.log_text());

    w.signal(libc::SIGQUIT);
    let status = w.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", w.log_text());
    assert_eq!(lease(&central), None, "the lease was not given up");
    assert!(w.log_text().contains("SIGQUIT received: stopping"));
}
