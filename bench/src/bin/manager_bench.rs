//! Manager figures: failover time over leader SIGKILLs, overlapping leader actions over
//! chaos rounds (SIGKILL, SIGSTOP/SIGCONT of leaders and followers), and ECS calls per
//! decision against moto_server. Prints a Markdown table.
//!
//! Run: `cargo run --release -p warden-bench --bin manager_bench -- [kills] [chaos_rounds]`

use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;

fn config(central: &Redis, id: &str) -> String {
    format!(
        "[host]\ninstance_id = \"{id}\"\navailability_zone = \"eu-west-1a\"\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\nloop_secs = 1\ndry_run = true\n[metrics.m]\nplugin = \"template\"\nconfig = {{ value = 3.0 }}\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\n",
        central.url()
    )
}

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

/// Decisions recorded per epoch: (epoch, first ms, last ms), in record order.
fn overlaps(central: &Redis) -> (usize, usize) {
    let items: Vec<String> = central
        .conn()
        .lrange("warden:decisions:web", 0, -1)
        .unwrap();
    let recs: Vec<(u64, u64)> = items
        .iter()
        .map(|t| {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            (v["epoch"].as_u64().unwrap(), v["time_ms"].as_u64().unwrap())
        })
        .collect();
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    for (e, t) in &recs {
        match spans.iter_mut().find(|s| s.0 == *e) {
            Some(s) => s.2 = *t,
            None => spans.push((*e, *t, *t)),
        }
    }
    let mut overlapping = 0;
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            // An older epoch acting after a newer one started.
            let (older, newer) = if a.0 < b.0 { (a, b) } else { (b, a) };
            if older.2 > newer.1 {
                overlapping += 1;
            }
        }
    }
    (recs.len(), overlapping)
}

fn main() {
    std::env::set_var("WARDEN_TEST_PROFILE", "release");
    let args: Vec<String> = std::env::args().collect();
    let kills: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let central = Redis::start();
    let ids = ["i-aaa", "i-bbb", "i-ccc"];
    let mut wardens: Vec<Warden> = ids
        .iter()
        .map(|id| Warden::start(&config(&central, id), &[]))
        .collect();
    eventually(Duration::from_secs(20), "a first leader", || {
        leader(&central)
    });

    eprintln!("failover over {kills} leader kills...");
    let mut failover = Vec::new();
    for _ in 0..kills {
        let (lead, _) = eventually(Duration::from_secs(20), "a leader", || leader(&central));
        std::thread::sleep(Duration::from_millis(1200));
        let i = ids.iter().position(|id| *id == lead).unwrap();
        let t = Instant::now();
        wardens[i].sigkill();
        eventually(Duration::from_secs(20), "a new leader", || {
            leader(&central).filter(|(id, _)| *id != lead)
        });
        failover.push(t.elapsed().as_secs_f64());
        wardens[i].restart();
    }

    eprintln!("{rounds} chaos rounds...");
    let mut actions = [0usize; 4];
    for r in 0..rounds {
        let Some((lead, _)) = leader(&central) else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        let li = ids.iter().position(|id| *id == lead).unwrap();
        let fi = (li + 1 + fastrand::usize(0..2)) % 3;
        match r % 4 {
            0 => {
                wardens[li].sigkill();
                std::thread::sleep(Duration::from_millis(fastrand::u64(500..3000)));
                wardens[li].restart();
            }
            1 => {
                // Paused past its lease, then resumed.
                wardens[li].signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(fastrand::u64(1500..4000)));
                wardens[li].signal(libc::SIGCONT);
            }
            2 => {
                // Paused for less than its lease.
                wardens[li].signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(fastrand::u64(100..1200)));
                wardens[li].signal(libc::SIGCONT);
            }
            _ => {
                wardens[fi].signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(fastrand::u64(200..2500)));
                wardens[fi].signal(libc::SIGCONT);
            }
        }
        actions[r % 4] += 1;
        std::thread::sleep(Duration::from_millis(fastrand::u64(200..1500)));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (records, overlapping) = overlaps(&central);
    drop(wardens);

    eprintln!("ECS calls per decision...");
    let moto = Moto::start();
    let aws = |args: &[&str]| moto.fixture(args);
    aws(&["ecs-setup", "c1", "web", "3"]);
    let central2 = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    std::fs::write(&metric, "25").unwrap();
    let cfg = format!(
        "[host]\ninstance_id = \"i-ecs\"\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\nloop_secs = 1\n[metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"file:{}\"] }}\n[[manager.services]]\nname = \"web\"\ncluster = \"c1\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\npolicy = {{ scale_down_window_secs = 0 }}\n",
        central2.url(),
        metric.display()
    );
    let w = Warden::start(&cfg, &moto.env());
    std::thread::sleep(Duration::from_secs(8));
    std::fs::write(&metric, "3").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    drop(w);
    let items: Vec<String> = central2
        .conn()
        .lrange("warden:decisions:web", 0, -1)
        .unwrap();
    let recs: Vec<serde_json::Value> = items
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();

    println!("| measure | value |\n|---|---|");
    println!(
        "| failover after SIGKILL of the leader (n={}) | p50 {:.2} s, p99 {:.2} s, max {:.2} s |",
        failover.len(),
        pct(&mut failover, 50.0),
        pct(&mut failover, 99.0),
        pct(&mut failover, 100.0)
    );
    println!(
        "| chaos: {rounds} rounds ({} leader SIGKILL+restart, {} leader SIGSTOP past its lease, {} leader SIGSTOP within it, {} follower SIGSTOP) | {records} decisions recorded, {overlapping} overlapping leader actions |",
        actions[0], actions[1], actions[2], actions[3]
    );
    for r in recs.iter().filter(|r| r["action"] != "hold").take(4) {
        println!(
            "| decision {} → {} ({}) | {} ListTasks, {} RunTask, {} StopTask |",
            r["current"],
            r["desired"],
            r["outcome"].as_str().unwrap_or(""),
            r["list_tasks"],
            r["run_task"],
            r["stop_task"]
        );
    }
    if let Some(r) = recs.iter().rev().find(|r| r["action"] == "hold") {
        println!(
            "| steady state (hold at {}) | {} ListTasks, {} RunTask, {} StopTask |",
            r["current"], r["list_tasks"], r["run_task"], r["stop_task"]
        );
    }
}
