//! Registrar figures, measured side by side in one run against real Docker, Redis and
//! nginx (the test harness's parts), printed as a Markdown table:
//!
//! * `docker start` → server in Redis, and stop (first `kill` event) → server gone:
//!   p50/p99 over N starts, timed from Docker's own event timestamps;
//! * failed requests through the router during a rolling replacement of every container
//!   of a service under steady load, warden's drain-on-stop against removal on `die`;
//! * Redis commands and time for a reconcile of 200 containers: from an empty Redis,
//!   with nothing changed, and with nothing changed after a resync;
//! * warden's RSS and CPU while idle.
//!
//! Run: `cargo run --release -p warden-bench --bin registrar_bench -- [starts] [idle_secs]`

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use redis::Commands;
use warden::registrar::desired::{desired, owned_entries};
use warden::registrar::redx::{RedisStore, Routes};
use warden::registrar::store::{Container, Health};
use warden_plugin_api::{ContainerMatch, ServiceDefinition};
use warden_tests::harness::*;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i]
}

/// Watches one backend hash and reports every server appearing or disappearing.
fn poll_backend(
    url: String,
    backend: String,
    stop: Arc<AtomicBool>,
) -> mpsc::Receiver<(i64, String, bool)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut present: BTreeSet<String> = BTreeSet::new();
        while !stop.load(Ordering::Relaxed) {
            let now: BTreeSet<String> = c
                .hkeys::<_, Vec<String>>(format!("backend:{backend}"))
                .unwrap()
                .into_iter()
                .collect();
            let t = now_ns();
            for m in now.difference(&present) {
                let _ = tx.send((t, m.clone(), true));
            }
            for m in present.difference(&now) {
                let _ = tx.send((t, m.clone(), false));
            }
            present = now;
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    rx
}

fn wait_member(rx: &mpsc::Receiver<(i64, String, bool)>, member: &str, appeared: bool) -> i64 {
    loop {
        let (t, m, a) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("registrar too slow");
        if m == member && a == appeared {
            return t;
        }
    }
}

async fn start_stop_latency(starts: usize, redis: &Redis) -> (Vec<f64>, Vec<f64>) {
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let (ev_tx, ev_rx) = mpsc::channel::<(String, String, i64)>();
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(std::collections::HashMap::from([(
            "type".to_string(),
            vec!["container".to_string()],
        )])),
        ..Default::default()
    }));
    tokio::spawn(async move {
        while let Some(Ok(e)) = events.next().await {
            let id = e.actor.and_then(|a| a.id).unwrap_or_default();
            let _ = ev_tx.send((
                id,
                e.action.unwrap_or_default(),
                e.time_nano.unwrap_or_default(),
            ));
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let rx = poll_backend(redis.url(), "lat".into(), stop.clone());
    let cs = Containers::new("bench-latency");
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let wait_event = |id: &str, action: &str| loop {
        let (eid, a, t) = ev_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("docker event");
        if eid == id && a == action {
            return t;
        }
    };
    for i in 0..starts {
        let id = cs.run(&format!("l{i}"), &[("warden.service", "lat")], &[]);
        let member = format!("{}:80", cs.ip(&id, "bridge"));
        let started = wait_event(&id, "start");
        let seen = wait_member(&rx, &member, true);
        up.push((seen - started) as f64 / 1e6);
        let _ = std::process::Command::new("docker")
            .args(["stop", "-t", "0", &id])
            .output();
        let killed = wait_event(&id, "kill");
        let gone = wait_member(&rx, &member, false);
        down.push((gone - killed) as f64 / 1e6);
        cs.rm(&id);
    }
    stop.store(true, Ordering::Relaxed);
    (up, down)
}

struct LoadResult {
    total: u64,
    failed: u64,
    from_stopping: u64,
}

/// Replaces every container of a service one at a time under steady load.
fn rolling_replacement(router_port: u16, redis: &Redis, service: &str, port: u16) -> LoadResult {
    let cs = Containers::new(&format!("bench-roll-{service}"));
    let port_s = port.to_string();
    let labels = [
        ("warden.service", service),
        ("warden.frontend-port", port_s.as_str()),
    ];
    let mut ids: Vec<(String, String)> = (0..4)
        .map(|i| {
            let n = format!("old{i}");
            (cs.run(&n, &labels, &[]), cs.full_name(&n))
        })
        .collect();
    eventually(Duration::from_secs(20), "4 servers", || {
        let n: usize = redis.conn().hlen(format!("backend:{service}")).unwrap();
        (n == 4).then_some(())
    });
    eventually(Duration::from_secs(10), "router listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let _ = router_port;
    let stopping: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let (total, failed, from_stopping) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stopping, done, total, failed, from_stopping) = (
                stopping.clone(),
                done.clone(),
                total.clone(),
                failed.clone(),
                from_stopping.clone(),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    total.fetch_add(1, Ordering::Relaxed);
                    match http_get(port, "bench", "/") {
                        Ok((200, body)) => {
                            if stopping.lock().unwrap().contains(&body) {
                                from_stopping.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..4 {
        let n = format!("new{i}");
        let new_id = cs.run(&n, &labels, &[]);
        let member = format!("{}:80", cs.ip(&new_id, "bridge"));
        eventually(Duration::from_secs(20), "replacement routed", || {
            let m: bool = redis
                .conn()
                .hexists(format!("backend:{service}"), &member)
                .unwrap();
            m.then_some(())
        });
        let (old_id, old_name) = ids.remove(0);
        stopping.lock().unwrap().insert(old_name);
        // PID 1 (busybox httpd) ignores SIGTERM: docker waits 2 s, then SIGKILLs it
        // mid-traffic, as it would an application slow to shut down.
        let _ = std::process::Command::new("docker")
            .args(["stop", "-t", "2", &old_id])
            .output();
        cs.rm(&old_id);
    }
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    LoadResult {
        total: total.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        from_stopping: from_stopping.load(Ordering::Relaxed),
    }
}

fn redis_commands(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn reconcile_200() -> Vec<(String, f64, usize, u64, usize)> {
    let redis = Redis::start();
    let services: Vec<ServiceDefinition> = (0..20)
        .map(|s| ServiceDefinition {
            name: format!("svc{s}"),
            matches: ContainerMatch {
                labels: BTreeMap::from([("warden.service".to_string(), format!("svc{s}"))]),
                ..Default::default()
            },
            port: Some(80),
            backend: None,
            frontends: vec![format!("svc{s}.example.com")],
            frontend_port: Some(9000 + s),
            elb: None,
            network: None,
            drain_seconds: None,
            manage: None,
            target_groups: Vec::new(),
        })
        .collect();
    let containers: Vec<Container> = (0..200)
        .map(|i| Container {
            id: format!("{i:064}"),
            name: format!("c{i}"),
            image: "app".into(),
            labels: BTreeMap::from([("warden.service".to_string(), format!("svc{}", i % 20))]),
            networks: BTreeMap::from([(
                "bridge".to_string(),
                format!("172.18.{}.{}", i / 250, i % 250 + 2),
            )]),
            exposed_tcp: BTreeSet::from([80]),
            health: Health::None,
            started_at: "2026-11-27T00:00:00Z".into(),
            stopping: false,
            paused: false,
        })
        .collect();
    let mut routes = Routes::new(RedisStore::new(&redis.url(), None, "bench").unwrap());
    let mut c = redis.conn();
    let mut out = Vec::new();
    for case in [
        "from an empty Redis",
        "nothing changed",
        "nothing changed, after a resync (owned set read back)",
    ] {
        if case.starts_with("nothing changed, after") {
            routes.invalidate();
        }
        let before = redis_commands(&mut c);
        let t = Instant::now();
        let (routing, _) = desired(&services, &containers, &BTreeMap::new());
        let applied = routes.apply(&owned_entries(&routing)).await.unwrap();
        let took = t.elapsed().as_secs_f64() * 1e3;
        // The INFO that took `before` is counted in the second reading.
        let counted = redis_commands(&mut c) - before - 1;
        out.push((
            case.to_string(),
            took,
            applied.commands,
            counted,
            applied.writes,
        ));
    }
    // The full verification (every 2 s, at every resync and reconnect): median of 50.
    let (routing, _) = desired(&services, &containers, &BTreeMap::new());
    let entries = owned_entries(&routing);
    for case in [
        "full verification (read back every key and field), nothing drifted",
        "full verification after the 20 front-end keys were deleted by hand (all rewritten)",
    ] {
        let mut times = Vec::new();
        let mut last = None;
        let before = redis_commands(&mut c);
        for _ in 0..50 {
            if case.contains("deleted") {
                for s in 0..20 {
                    let _: () = c.del(format!("frontend:svc{s}.example.com")).unwrap();
                }
            }
            let t = Instant::now();
            last = Some(routes.verify(&entries).await.unwrap());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let deletes = if case.contains("deleted") { 20 * 50 } else { 0 };
        let counted = (redis_commands(&mut c) - before - 1 - deletes) / 50;
        let v = last.unwrap();
        assert!(case.contains("nothing") || v.repaired == 20, "{v:?}");
        out.push((
            format!(
                "{case} (median of 50; max {:.2} ms)",
                pct(&mut times.clone(), 100.0)
            ),
            pct(&mut times, 50.0),
            v.commands,
            counted,
            v.writes,
        ));
    }
    out
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    (ticks, rss_kb)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)] // a system call
async fn main() {
    // Measure the release build of warden and its plugins.
    std::env::set_var("WARDEN_TEST_PROFILE", "release");
    let args: Vec<String> = std::env::args().collect();
    let starts: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let idle_secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(60);
    let redis = Redis::start();
    let router = Router::start(&redis);
    let warden_cfg = |drain: bool| {
        format!(
            "[host]\ninstance_id = \"i-bench\"\n[registrar]\nlocal_redis = \"{}\"\ndrain_on_stop = {drain}\nrouter_ports_file = {:?}\nrouter_pid_file = {:?}\n",
            redis.url(),
            router.ports_file(),
            router.pid_file()
        )
    };

    let mut warden = Warden::start(&warden_cfg(true), &[]);
    eprintln!("measuring start/stop latency over {starts} containers...");
    let (mut up, mut down) =
        tokio::task::block_in_place(|| futures_block(start_stop_latency(starts, &redis)));

    eprintln!("rolling replacement with drain-on-stop...");
    let drain = tokio::task::block_in_place(|| {
        rolling_replacement(router.port, &redis, "rolla", free_port())
    });
    warden.sigkill();
    drop(warden);
    let mut die_only = Warden::start(&warden_cfg(false), &[]);
    eprintln!("rolling replacement with removal on die only...");
    let die = tokio::task::block_in_place(|| {
        rolling_replacement(router.port, &redis, "rollb", free_port())
    });
    die_only.sigkill();
    drop(die_only);

    eprintln!("reconcile of 200 containers...");
    let rec = reconcile_200().await;

    eprintln!("idle for {idle_secs} s with 10 routed containers...");
    let warden = Warden::start(&warden_cfg(true), &[]);
    let cs = Containers::new("bench-idle");
    for i in 0..10 {
        cs.run(&format!("i{i}"), &[("warden.service", "idle")], &[]);
    }
    eventually(Duration::from_secs(20), "10 servers", || {
        let n: usize = redis.conn().hlen("backend:idle").unwrap();
        (n == 10).then_some(())
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = warden.child.id();
    let (t0, _) = proc_stat(pid);
    let mut rss_max = 0;
    for _ in 0..idle_secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_max = rss_max.max(proc_stat(pid).1);
    }
    let (t1, rss_end) = proc_stat(pid);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_pct = (t1 - t0) as f64 / hz / idle_secs as f64 * 100.0;

    println!("| measure | value |\n|---|---|");
    println!(
        "| `docker start` → server in Redis (n={}) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        up.len(),
        pct(&mut up, 50.0),
        pct(&mut up, 99.0),
        pct(&mut up, 100.0)
    );
    println!("| `docker stop` (first `kill` event) → server gone (n={}) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |", down.len(), pct(&mut down, 50.0), pct(&mut down, 99.0), pct(&mut down, 100.0));
    for (name, r) in [
        ("warden (drain on stop)", &drain),
        ("removal on `die` only", &die),
    ] {
        println!(
            "| rolling replacement of 4 containers, {name} | {} requests, {} failed, {} answered by a container already being stopped |",
            r.total, r.failed, r.from_stopping
        );
    }
    for (case, ms, sent, counted, writes) in rec {
        println!("| reconcile of 200 containers (20 services), {case} | {ms:.2} ms, {sent} commands sent ({counted} counted by Redis), {writes} write ops |");
    }
    println!("| warden idle {idle_secs} s, 10 routed containers | RSS max {:.1} MB (end {:.1} MB), CPU {cpu_pct:.2}% |", rss_max as f64 / 1024.0, rss_end as f64 / 1024.0);
    drop(cs);
    drop(warden);
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}
