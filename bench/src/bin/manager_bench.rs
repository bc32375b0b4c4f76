//! Manager figures, each counted on the far side (Redis for leadership, moto's request
//! recorder for ECS calls, ListTasks for tasks). Prints a Markdown table.
//!
//! 1. failover: the leader SIGKILLed → another host holds the lease;
//! 2. handover: the leader SIGTERMed → another host holds the lease;
//! 3. chaos: real leaders scaling in moto behind a 150 ms proxy while leaders are killed,
//!    paused past their lease and resumed, and the metric changes: ECS calls of deposed
//!    epochs after their successor's first call, and the most tasks ever seen vs max;
//! 4. slow-world soak: 1.5 s per AWS call and a 6 s metric: leader changes;
//! 5. ECS calls per decision.
//!
//! Run: `cargo run --release -p warden-bench --bin manager_bench -- [kills] [handovers] [chaos_rounds] [soak_secs]`

use std::path::Path;
use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;
use warden_tests::proxy::HttpFaultProxy;

fn leader(central: &Redis) -> Option<(String, u64)> {
    let v: Option<String> = central.conn().get("warden:leader").ok()?;
    let v = v?;
    let mut it = v.split('\t');
    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize]
}

fn config(central: &Redis, id: &str, body: &str) -> String {
    format!(
        "[host]\ninstance_id = \"{id}\"\navailability_zone = \"eu-west-1a\"\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\nloop_secs = 1\n{body}",
        central.url()
    )
}

fn service(metric: &str, policy: &str) -> String {
    format!(
        "[metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"{metric}\"] }}\n[[manager.services]]\nname = \"web\"\ncluster = \"c1\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\npolicy = {{ {policy} }}\n"
    )
}

fn set_metric(path: &Path, v: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const IDS: [&str; 3] = ["i-aaa", "i-bbb", "i-ccc"];

/// Time from `signal` to another host holding the lease, polled every 2 ms.
fn time_to_new_leader(central: &Redis, wardens: &mut [Warden], signal: i32, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (lead, _) = eventually(Duration::from_secs(20), "a leader", || leader(central));
        // Let every host settle as a follower first.
        std::thread::sleep(Duration::from_millis(1200));
        let i = IDS.iter().position(|id| *id == lead).unwrap();
        let t = Instant::now();
        if signal == libc::SIGKILL {
            wardens[i].sigkill();
        } else {
            wardens[i].signal(signal);
        }
        loop {
            if leader(central).is_some_and(|(id, _)| id != lead) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no new leader");
            std::thread::sleep(Duration::from_millis(2));
        }
        out.push(t.elapsed().as_secs_f64());
        let _ = wardens[i].child.wait();
        wardens[i].restart();
    }
    out
}

struct Chaos {
    rounds: usize,
    late: usize,
    ecs_calls: usize,
    highest: usize,
    max: usize,
    kills: usize,
    pauses: usize,
    decisions: usize,
}

fn chaos(rounds: usize) -> Chaos {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.set_delay(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "8");
    let max = 12;
    let body = service(
        &format!("file:{}", metric.display()),
        &format!("max = {max}, scale_down_window_secs = 0, tolerance = 0.0"),
    );
    let mut wardens: Vec<Warden> = IDS
        .iter()
        .map(|id| {
            Warden::start(
                &config(&central, id, &body),
                &Moto::env_for(&proxy.endpoint(), id),
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut highest = 0;
    let mut snapshot = || {
        let n = rt.block_on(moto.ecs_count("c1", "web", "warden-web"));
        highest = highest.max(n);
    };
    eventually(Duration::from_secs(20), "a leader", || leader(&central));
    let values = ["0", "4", "8", "12", "20", "3"];
    let (mut kills, mut pauses) = (0, 0);
    for round in 0..rounds {
        set_metric(&metric, values[fastrand::usize(0..values.len())]);
        // Each round acts on the leader of the moment (after a kill, the next one).
        let (lead, _) = eventually(Duration::from_secs(15), "a leader", || leader(&central));
        {
            let w = IDS.iter().position(|i| *i == lead).unwrap();
            match round % 3 {
                0 => {
                    wardens[w].sigkill();
                    wardens[w].restart();
                    kills += 1;
                }
                1 => {
                    wardens[w].signal(libc::SIGSTOP);
                    for _ in 0..(5 + fastrand::u32(0..4)) {
                        snapshot();
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    wardens[w].signal(libc::SIGCONT);
                    pauses += 1;
                }
                _ => {}
            }
        }
        for _ in 0..4 {
            snapshot();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let rec = moto.recorded();
    let decisions: usize = central.conn().llen("warden:decisions:web").unwrap();
    Chaos {
        rounds,
        late: late_calls(&rec).len(),
        ecs_calls: rec.iter().filter(|r| r.epoch.is_some()).count(),
        highest,
        max,
        kills,
        pauses,
        decisions,
    }
}

/// Leader changes over `secs` with 1.5 s per AWS call and a metric taking 6 s.
fn soak(secs: u64) -> (usize, usize) {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.set_delay(Duration::from_millis(1500));
    let body = format!(
        "[plugins]\ncall_timeout_ms = 8000\n{}",
        service("sleep:6000", "max = 10")
    );
    let _wardens: Vec<Warden> = IDS
        .iter()
        .map(|id| {
            Warden::start(
                &config(&central, id, &body),
                &Moto::env_for(&proxy.endpoint(), id),
            )
        })
        .collect();
    let first = eventually(Duration::from_secs(20), "a leader", || leader(&central));
    let mut changes = 0;
    let mut last = first;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if let Some(l) = leader(&central) {
            if l != last {
                changes += 1;
                last = l;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let decisions: usize = central.conn().llen("warden:decisions:web").unwrap();
    (changes, decisions)
}

fn main() {
    std::env::set_var("WARDEN_TEST_PROFILE", "release");
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (kills, handovers, rounds, soak_secs) = (arg(1, 20), arg(2, 20), arg(3, 100), arg(4, 180));

    let central = Redis::start();
    let dry = "dry_run = true\n[metrics.m]\nplugin = \"template\"\nconfig = { value = 3.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    let mut wardens: Vec<Warden> = IDS
        .iter()
        .map(|id| Warden::start(&config(&central, id, dry), &[]))
        .collect();
    eprintln!("failover over {kills} leader kills...");
    let mut failover = time_to_new_leader(&central, &mut wardens, libc::SIGKILL, kills);
    eprintln!("handover over {handovers} leader SIGTERMs...");
    let mut handover = time_to_new_leader(&central, &mut wardens, libc::SIGTERM, handovers);
    drop(wardens);

    eprintln!("{rounds} chaos rounds against moto...");
    let c = chaos(rounds);
    eprintln!("slow-world soak for {soak_secs} s...");
    let (changes, soak_decisions) = soak(soak_secs as u64);

    eprintln!("ECS calls per decision...");
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let central2 = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "25");
    let body = service(
        &format!("file:{}", metric.display()),
        "scale_down_window_secs = 0",
    );
    let w = Warden::start(&config(&central2, "i-ecs", &body), &moto.env());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    eventually(Duration::from_secs(30), "25 tasks", || {
        (rt.block_on(moto.ecs_count("c1", "web", "warden-web")) == 25).then_some(())
    });
    set_metric(&metric, "3");
    eventually(Duration::from_secs(30), "3 tasks", || {
        (rt.block_on(moto.ecs_count("c1", "web", "warden-web")) == 3).then_some(())
    });
    let n = central2
        .conn()
        .llen::<_, usize>("warden:decisions:web")
        .unwrap();
    eventually(Duration::from_secs(10), "two holds", || {
        (central2
            .conn()
            .llen::<_, usize>("warden:decisions:web")
            .unwrap()
            >= n + 2)
            .then_some(())
    });
    drop(w);
    let items: Vec<String> = central2
        .conn()
        .lrange("warden:decisions:web", 0, -1)
        .unwrap();
    let recs: Vec<serde_json::Value> = items
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();

    println!("| measure | value | goal |\n|---|---|---|");
    println!(
        "| failover: leader SIGKILLed → another host holds the lease (n={}) | p50 {:.2} s, p99 {:.2} s, max {:.2} s | p99 ≤ 3 s |",
        failover.len(),
        pct(&mut failover, 50.0),
        pct(&mut failover, 99.0),
        pct(&mut failover, 100.0)
    );
    println!(
        "| handover: leader SIGTERMed → another host holds the lease (n={}) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | p99 ≤ 300 ms |",
        handover.len(),
        pct(&mut handover, 50.0) * 1000.0,
        pct(&mut handover, 99.0) * 1000.0,
        pct(&mut handover, 100.0) * 1000.0
    );
    println!(
        "| chaos: {} rounds, real leaders in moto behind a 150 ms proxy ({} leader SIGKILL+restart, {} leader SIGSTOP 2.5-4.5 s then SIGCONT, metric changed every round); {} ECS calls, {} decisions | {} ECS calls by a deposed epoch after its successor's first (moto's recorder); most tasks seen {} (max {}) | 0; ≤ max |",
        c.rounds, c.kills, c.pauses, c.ecs_calls, c.decisions, c.late, c.highest, c.max
    );
    println!(
        "| slow-world soak: 3 hosts, 1.5 s per AWS call, 6 s metric, {soak_secs} s ({soak_decisions} decisions) | {changes} leader changes | 0 |"
    );
    for r in recs.iter().filter(|r| r["action"] != "hold").take(4) {
        println!(
            "| decision {} → {} ({}) | {} ListTasks, {} DescribeTasks, {} RunTask, {} StopTask | — |",
            r["current"], r["desired"], r["outcome"], r["list_tasks"], r["describe_tasks"], r["run_task"], r["stop_task"]
        );
    }
    if let Some(r) = recs.iter().rev().find(|r| r["action"] == "hold") {
        println!(
            "| steady state (hold at {}) | {} ListTasks, {} RunTask, {} StopTask | one ListTasks a loop |",
            r["current"], r["list_tasks"], r["run_task"], r["stop_task"]
        );
    }
}
