//! Hostile tenants: a container with labels nobody granted, a hand writer of the local
//! and of the central Redis, a plugin whose process looks for warden's secrets. Every
//! test counts the damage on the far side: the calls moto recorded, the answers of the
//! real router, the keys read back from Redis, what the plugin's own process saw.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

const VICTIM_PORT: u16 = 18_801;

fn get(redis: &Redis, key: &str) -> Option<String> {
    redis.conn().get(key).unwrap()
}

/// Answers of `n` requests to the router: body → count.
fn answers(port: u16, host: &str, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = http_get(port, host, path).unwrap();
        *out.entry(format!("{status} {body}")).or_default() += 1;
    }
    out
}

/// Containers label themselves into a load balancer, a target group, the router's own
/// port, another service's name, `localhost` and a host nobody granted: moto records no
/// enrolment but the granted one, the router sends every request for the victim's host
/// to the victim, no key of theirs is in Redis, and each refusal is logged once, named,
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn labels_get_only_what_the_operator_granted() {
    let redis = Redis::start();
    let moto = Moto::start();
    let router = Router::start_strict(&redis, &[]);
    let instance = moto.fixture(&["ec2-instance"]).trim().to_owned();
    let web_tg = moto.fixture(&["tg-setup", "web-tg", "instance", "1"]);
    let payments_tg = moto.fixture(&["tg-setup", "payments-tg", "instance", "1"]);
    moto.create_elb("web-elb", VICTIM_PORT).await;
    moto.create_elb("payments-elb", VICTIM_PORT).await;
    let config = format!(
        "[host]\ninstance_id = \"{instance}\"\n\
         [registrar]\nlocal_redis = \"{}\"\nreserved_ports = [{}]\n\
         router_ports_file = {:?}\nrouter_pid_file = {:?}\n\
         [grants]\nfrontends = [\"*.app.example\"]\nfrontend_ports = [\"18800-18899\"]\n\
         load_balancers = [\"web-*\"]\ntarget_groups = [\"web-*\"]\n",
        redis.url(),
        router.port,
        router.ports_file(),
        router.pid_file()
    );
    let w = Warden::start(&config, &moto.env());
    let cs = Containers::new("hostile");
    let port = VICTIM_PORT.to_string();
    let victim = cs.run(
        "web",
        &[
            ("warden.service", "hv-web"),
            ("warden.frontend", "web.app.example"),
            ("warden.frontend-port", &port),
            ("warden.elb", "web-elb"),
            ("warden.target-group", "web-tg"),
        ],
        &[],
    );
    let victim_server = format!("{}:80", cs.ip(&victim, "bridge"));
    eventually(Duration::from_secs(30), "the victim routed", || {
        (get(&redis, "frontend:web.app.example").as_deref() == Some("hv-web")).then_some(())
    });
    let router_port = router.port.to_string();
    let hostile: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "evil-elb",
            vec![
                ("warden.service", "evil1"),
                ("warden.frontend", "evil1.app.example"),
                ("warden.elb", "payments-elb"),
            ],
        ),
        (
            "evil-tg",
            vec![
                ("warden.service", "evil2"),
                ("warden.target-group", "payments-tg"),
            ],
        ),
        (
            "evil-port",
            vec![
                ("warden.service", "evil3"),
                ("warden.frontend-port", &router_port),
            ],
        ),
        (
            "evil-local",
            vec![
                ("warden.service", "evil4"),
                ("warden.frontend", "localhost"),
            ],
        ),
        (
            "evil-host",
            vec![
                ("warden.service", "evil5"),
                ("warden.frontend", "payments.other.example"),
            ],
        ),
        // Sorts before the victim by name, claims its service with another port and
        // balancer: the service's first container fixed its definition.
        (
            "aaa-squat",
            vec![
                ("warden.service", "hv-web"),
                ("warden.frontend", "web.app.example"),
                ("warden.frontend-port", "18802"),
                ("warden.elb", "web-elb"),
            ],
        ),
    ];
    for (name, labels) in &hostile {
        cs.run(name, labels, &[]);
    }
    for (name, grant) in [
        ("evil-elb", "grants.load_balancers"),
        ("evil-tg", "grants.target_groups"),
        ("evil-port", "registrar.reserved_ports"),
        ("evil-local", "grants.frontends"),
        ("evil-host", "grants.frontends"),
    ] {
        let line = wait_log(&w, name, &["refused", &cs.full_name(name), grant]);
        assert!(line.contains("\"level\":\"WARN\""), "{line}");
    }
    let squat = wait_log(
        &w,
        "the squatter",
        &[&cs.full_name("aaa-squat"), "first of service"],
    );
    assert!(squat.contains("refused, not routed"), "{squat}");
    eventually(Duration::from_secs(10), "the refusals counted", || {
        (w.metric("warden_grant_refusals{part=\"registrar\"}") == Some(5.0)).then_some(())
    });

    // The router: every request for the victim's host and port reaches the victim.
    wait_for_port(VICTIM_PORT, "the victim's port front-end");
    let victim_page = cs.full_name("web");
    let got = answers(router.port, "web.app.example", "/", 30);
    assert_eq!(got, BTreeMap::from([(format!("200 {victim_page}"), 30)]));
    let got = answers(VICTIM_PORT, "anything", "/", 10);
    assert_eq!(got, BTreeMap::from([(format!("200 {victim_page}"), 10)]));
    for host in ["evil1.app.example", "localhost", "payments.other.example"] {
        let (status, _) = http_get(router.port, host, "/").unwrap();
        assert_eq!(status, 404, "{host}");
    }
    // Redis: only the victim's keys, the victim's one server.
    let servers: Vec<String> = redis.conn().hkeys("backend:hv-web").unwrap();
    assert_eq!(servers, vec![victim_server]);
    assert_eq!(get(&redis, &format!("warden:port:{}", router.port)), None);
    assert_eq!(get(&redis, "warden:port:18802"), None);
    assert_eq!(
        get(&redis, &format!("warden:port:{VICTIM_PORT}")).as_deref(),
        Some("hv-web")
    );
    for key in [
        "frontend:evil1.app.example",
        "frontend:localhost",
        "frontend:payments.other.example",
    ] {
        assert_eq!(get(&redis, key), None, "{key}");
    }
    for b in ["evil1", "evil2", "evil3", "evil4", "evil5"] {
        let n: usize = redis.conn().hlen(format!("backend:{b}")).unwrap();
        assert_eq!(n, 0, "backend:{b}");
    }
    // AWS: the host joined the granted balancer and group only.
    eventually(Duration::from_secs(30), "the victim's enrolments", || {
        (moto.elb_members("web-elb").await_blocking() == vec![instance.clone()]
            && count(&moto, "elasticloadbalancing:RegisterTargets") == 1)
            .then_some(())
    });
    assert_eq!(
        count(
            &moto,
            "elasticloadbalancing:RegisterInstancesWithLoadBalancer"
        ),
        1
    );
    assert!(moto.elb_members("payments-elb").await.is_empty());
    let payments: Vec<serde_json::Value> =
        serde_json::from_str(&moto.fixture(&["tg-targets", payments_tg.trim()])).unwrap();
    assert!(payments.is_empty(), "{payments:?}");
    let web: Vec<serde_json::Value> =
        serde_json::from_str(&moto.fixture(&["tg-targets", web_tg.trim()])).unwrap();
    assert_eq!(web.len(), 1, "{web:?}");
    // `warden routes` lists each refusal with its containers.
    let out = std::process::Command::new(warden_tests::warden_bin())
        .args(["routes", "--config", w.config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused (a claim outside the grants)"),
        "{text}"
    );
    assert!(
        text.contains(&cs.full_name("evil-elb")) && text.contains("payments-elb"),
        "{text}"
    );
    // Each refusal said once, however many reconciles ran.
    let log = w.log_text();
    assert_eq!(
        log.matches(&format!("containers {}", cs.full_name("evil-tg")))
            .count(),
        1,
        "{log}"
    );
}

/// A block_on for a future from synchronous code inside the polling closure.
trait AwaitBlocking: std::future::Future + Sized {
    fn await_blocking(self) -> Self::Output {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(self))
    }
}
impl<F: std::future::Future> AwaitBlocking for F {}

fn ecs_count(moto: &Moto, family: &str, started_by: &str) -> u32 {
    moto.fixture(&["ecs-count", "c1", family, started_by])
        .parse()
        .unwrap()
}

/// A writer of the central Redis adds services whose `manage` parts name another
/// account's task definition, a size above the grant and an ECS service nobody granted:
/// the leader runs the granted service only. Counted in moto's recorder (RunTask bodies,
/// UpdateService calls) and in ECS itself; each refusal is logged and listed by
/// `warden status`.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_central_redis_writer_makes_the_leader_run_only_what_is_granted() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    std::fs::write(&metric, "3").unwrap();
    let config = format!(
        "[host]\ninstance_id = \"i-hostile\"\n[registrar]\nenabled = false\n\
         [manager]\ncentral_redis = \"{url}\"\nloop_secs = 1\n\
         [[manager.sources]]\nplugin = \"redis-services\"\n\
         config = {{ url = \"{url}\", refresh_ms = 200 }}\n\
         [metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"file:{}\"] }}\n\
         [grants]\nclusters = [\"c1\"]\ntask_definitions = [\"web\"]\nmax_tasks = 5\n",
        metric.display(),
        url = central.url(),
    );
    let w = Warden::start(&config, &moto.env());
    let manage = |td: serde_json::Value, max: u32| {
        serde_json::json!({"match": {"image": "x"}, "manage": {
            "cluster": "c1", "metric": "m", "mapping": {"target_per_task": 1.0},
            "policy": {"max": max, "scale_down_window_secs": 0}}})
        .as_object()
        .cloned()
        .map(|mut o| {
            let m = o["manage"].as_object_mut().unwrap();
            for (k, v) in td.as_object().unwrap() {
                m.insert(k.clone(), v.clone());
            }
            serde_json::Value::Object(o).to_string()
        })
        .unwrap()
    };
    let entries = [
        (
            "web",
            manage(serde_json::json!({"task_definition": "web"}), 5),
        ),
        (
            "miner",
            manage(
                serde_json::json!({"task_definition": "arn:aws:ecs:eu-west-1:999999999999:task-definition/miner:1"}),
                5,
            ),
        ),
        (
            "huge",
            manage(serde_json::json!({"task_definition": "web:1"}), 10_000),
        ),
        (
            "payments",
            manage(serde_json::json!({"ecs_service": "payments"}), 5),
        ),
    ];
    for (name, body) in &entries {
        let _: () = central.conn().hset("warden:services", *name, body).unwrap();
    }
    eventually(
        Duration::from_secs(30),
        "3 tasks of the granted service",
        || (ecs_count(&moto, "web", "warden-web") == 3).then_some(()),
    );
    for (name, grant) in [
        ("miner", "grants.task_definitions"),
        ("huge", "grants.max_tasks"),
        ("payments", "grants.ecs_services"),
    ] {
        let line = wait_log(
            &w,
            name,
            &[&format!("service \\\"{name}\\\": not managed"), grant],
        );
        assert!(line.contains("\"level\":\"WARN\""), "{line}");
    }
    // Three more loops of the leader: still only what was granted.
    let lists = count(&moto, "ecs:ListTasks");
    eventually(Duration::from_secs(20), "three more loops", || {
        (count(&moto, "ecs:ListTasks") >= lists + 3).then_some(())
    });
    for body in moto.request_bodies("RunTask") {
        assert_eq!(body["taskDefinition"], "web", "{body}");
    }
    assert_eq!(count(&moto, "ecs:UpdateService"), 0);
    assert_eq!(count(&moto, "ecs:DescribeServices"), 0);
    assert_eq!(ecs_count(&moto, "web", "warden-huge"), 0);
    assert_eq!(
        w.metric("warden_grant_refusals{part=\"manager\"}"),
        Some(3.0)
    );
    let out = std::process::Command::new(warden_tests::warden_bin())
        .args(["status", "--config", w.config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("refused by their grants (3)"), "{text}");
    assert!(
        text.contains("miner") && text.contains("grants.task_definitions"),
        "{text}"
    );
}

/// Counts the connections made to a loopback port.
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nloopback service\n");
        }
    });
    (port, n)
}

/// A hand writer of the local Redis (redis-cli, stock Redx's API) points a front-end at
/// instance metadata and at a loopback service, and leaves a key of the wrong type: the
/// router never connects to either, keeps following other writes, refuses a path whose
/// routing would differ from what it forwards, and tells the container who asked.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_router_routes_only_to_container_networks_and_only_unambiguous_paths() {
    let port = free_port();
    let redis = Redis::start_with(
        port,
        &["--port", &port.to_string(), "--requirepass", "r0uter"],
    );
    let url = format!("redis://:r0uter@127.0.0.1:{port}");
    let router = Router::start_strict(&redis, &[("WARDEN_ROUTER_REDIS_PASSWORD", "r0uter")]);
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let (loop_port, loop_hits) = counting_listener();
    let cs = Containers::new("router-trust");
    let script = "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho \"xff=$HTTP_X_FORWARDED_FOR proto=$HTTP_X_FORWARDED_PROTO\"\\n' > /www/cgi-bin/h && busybox chmod +x /www/cgi-bin/h && echo \"$NAME\" > /www/index.html && exec httpd -f -p 80 -h /www";
    let id = cs.run_cmd("app", &[], &[], &["/bin/sh", "-c", script]);
    let app = format!("{}:80", cs.ip(&id, "bridge"));
    let set = |conn: &mut redis::Connection, f: &str, b: &str, servers: &[&str]| {
        for s in servers {
            let _: () = conn.hset(format!("backend:{b}"), s, 0).unwrap();
        }
        let _: () = conn.set(format!("frontend:{f}"), b).unwrap();
        let _: () = conn.incr("warden:routes:version", 1).unwrap();
    };
    // A key of the wrong type first: the table must still load.
    let _: () = conn.hset("frontend:broken.example", "x", "1").unwrap();
    set(&mut conn, "app.example", "app", &[&app]);
    let loopback = format!("127.0.0.1:{loop_port}");
    set(
        &mut conn,
        "steal.example",
        "steal",
        &[
            "169.254.169.254:80",
            &loopback,
            "10.99.0.1:80",
            "not-an-ip:80",
        ],
    );
    eventually(
        Duration::from_secs(15),
        "the app routed through AUTH",
        || {
            let (s, b) = http_get(router.port, "app.example", "/").ok()?;
            (s == 200 && b == cs.full_name("app")).then_some(())
        },
    );
    for _ in 0..10 {
        let (s, _) = http_get(router.port, "steal.example", "/").unwrap();
        assert_eq!(s, 404, "a backend with no server it may use is a miss");
    }
    assert_eq!(
        loop_hits.load(Ordering::SeqCst),
        0,
        "the loopback service was reached"
    );
    let log = router.error_log();
    for (server, why) in [
        ("169.254.169.254:80", "link-local"),
        (loopback.as_str(), "loopback"),
        ("10.99.0.1:80", "outside the router's networks"),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(server)).collect();
        assert_eq!(lines.len(), 1, "{server}: said once per worker: {log}");
        assert!(lines[0].contains(why), "{}", lines[0]);
    }
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("frontend:broken.example"))
            .count(),
        1,
        "{log}"
    );
    // Later writes are still followed (the table is not frozen by the bad key).
    set(&mut conn, "later.example", "app", &[]);
    eventually(Duration::from_secs(10), "a later route", || {
        let (s, _) = http_get(router.port, "later.example", "/").ok()?;
        (s == 200).then_some(())
    });
    // The path routed is the path forwarded: ambiguous ones are refused.
    for path in [
        "/admin/..%2Fapi/",
        "/a/%2e%2e/b",
        "/a//b",
        "/a/./b",
        "/x%5cy",
    ] {
        let (s, body) = http_get(router.port, "app.example", path).unwrap();
        assert_eq!(s, 400, "{path}: {body}");
    }
    let (s, _) = http_get(router.port, "app.example", "/index.html?next=//x/../y").unwrap();
    assert_eq!(s, 200, "a query may hold anything");
    // The container is told who asked and how.
    let (s, body) = http_get(router.port, "app.example", "/cgi-bin/h").unwrap();
    assert_eq!(s, 200);
    assert_eq!(body, "xff=127.0.0.1 proto=http");
}

/// A plugin in a process of its own does not see warden's secrets: its environment holds
/// only what its instance names; it runs as the configured user, with the limits set.
/// Read by the plugin's own process (`env:`, `uid`, `nofile` steps of test-chaos).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn an_isolated_plugin_gets_no_secret_and_not_root() {
    use warden::plugins::isolated::{ChildPolicy, ChildUser};
    use warden::plugins::{CallOptions, MetricClient, PluginHost};
    warden::plugins::probe::set_command(warden_tests::warden_bin());
    // SAFETY: set before any thread of this test reads the environment.
    unsafe {
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "do-not-leak");
        std::env::set_var("WARDEN_TEST_PASSED", "yes");
    }
    let dir =
        warden_tests::plugin_dir(&[warden_tests::plugin_so("warden_plugin_test_chaos").as_path()]);
    let mut host = PluginHost::load_dirs(&[dir.path().to_owned()], false);
    assert!(host.failures().is_empty(), "{:?}", host.failures());
    let nobody = ChildUser::lookup("nobody").unwrap();
    host.set_child_policy(ChildPolicy {
        user: Some(nobody.clone()),
        memory_mb: 512,
    });
    let options = CallOptions {
        isolation: warden::config::Isolation::Process,
        ..CallOptions::default()
    };
    let config = serde_json::json!({"sequence": [
        "env:AWS_SECRET_ACCESS_KEY", "env:WARDEN_TEST_PASSED", "uid", "nofile"]});
    let m = MetricClient(
        host.create_with_env(
            "test-chaos",
            warden_plugin_api::Kind::MetricSource,
            &config,
            options,
            &["WARDEN_TEST_PASSED".to_owned()],
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        m.measure().await.unwrap().value,
        0.0,
        "the secret reached the plugin"
    );
    assert_eq!(
        m.measure().await.unwrap().value,
        1.0,
        "the named variable did not"
    );
    assert_eq!(m.measure().await.unwrap().value, f64::from(nobody.uid));
    assert_eq!(m.measure().await.unwrap().value, 1024.0);
    m.0.shutdown();
}

/// A local client that opens connections without end gets at most 64 of them; and
/// `/status` asked 100 times in a burst costs the central Redis one connection, not 100
/// (counted by the central Redis itself: `total_connections_received`).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_http_endpoint_is_bounded_and_status_reuses_one_connection() {
    let central = Redis::start();
    let w = Warden::start(
        &format!(
            "[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\n",
            central.url()
        ),
        &[],
    );
    let port = w.http_port.unwrap();
    let connections = |r: &Redis| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut r.conn())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (s, _) = w.http("/status").unwrap();
    assert_eq!(s, 200);
    let before = connections(&central);
    for _ in 0..100 {
        let (s, body) = w.http("/status").unwrap();
        assert_eq!(s, 200);
        assert!(body.contains("\"cluster\""), "{body}");
    }
    // One for each INFO of this test, at most one of warden's (a reconnect).
    let after = connections(&central);
    assert!(
        after - before <= 2,
        "{} connections for 100 /status",
        after - before
    );

    let held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    eventually(
        Duration::from_secs(10),
        "the 65th connection closed at once",
        || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let _ = s.write_all(b"GET /livez HTTP/1.0\r\n\r\n");
            let mut buf = [0u8; 64];
            matches!(s.read(&mut buf), Ok(0) | Err(_)).then_some(())
        },
    );
    drop(held);
    eventually(
        Duration::from_secs(10),
        "served again once they close",
        || {
            let (s, _) = w.http("/livez").ok()?;
            (s == 200).then_some(())
        },
    );
    wait_log(&w, "the refusal said", &["64 connections open"]);
}
