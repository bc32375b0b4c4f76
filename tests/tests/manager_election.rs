//! The election with three real warden processes against one redis-server: one leader at
//! a time, failover after SIGKILL, a SIGSTOPped leader that comes back steps down without
//! acting, SIGTERM hands over at once, a restarted central Redis causes no double action.
//! The leaders run in dry-run mode; every decision they record is fenced, so the history
//! in Redis shows whether two leaders ever acted in overlap.

use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;

fn config(central: &Redis, id: &str) -> String {
    format!(
        r#"[host]
instance_id = "{id}"
availability_zone = "eu-west-1a"
[registrar]
enabled = false
[manager]
central_redis = "{}"
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
"#,
        central.url()
    )
}

fn leader(central: &Redis) -> Option<(String, u64)> {
    let v: Option<String> = central.conn().get("warden:leader").unwrap();
    let v = v?;
    let mut it = v.split('\t');
    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
}

/// (leader, epoch, time_ms) of every recorded decision, in order.
fn history(central: &Redis) -> Vec<(String, u64, u64)> {
    let items: Vec<String> = central
        .conn()
        .lrange("warden:decisions:web", 0, -1)
        .unwrap();
    items
        .iter()
        .map(|t| {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            (
                v["leader"].as_str().unwrap().to_owned(),
                v["epoch"].as_u64().unwrap(),
                v["time_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// No decision of an older epoch after one of a newer epoch: leaders never overlapped.
fn assert_no_overlap(central: &Redis) {
    let h = history(central);
    for w in h.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "decision of epoch {} recorded after one of epoch {}: {h:?}",
            w[1].1,
            w[0].1
        );
    }
}

fn start_three(central: &Redis) -> Vec<(String, Warden)> {
    ["i-aaa", "i-bbb", "i-ccc"]
        .iter()
        .map(|id| (id.to_string(), Warden::start(&config(central, id), &[])))
        .collect()
}

fn wait_leader(central: &Redis, not: Option<&str>, within: Duration) -> (String, u64) {
    eventually(within, "a leader", || {
        leader(central).filter(|(id, _)| Some(id.as_str()) != not)
    })
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn sigkill_fails_over_within_the_bound_and_sigterm_hands_over_at_once() {
    let central = Redis::start();
    let mut wardens = start_three(&central);
    let (first, e1) = wait_leader(&central, None, Duration::from_secs(15));
    eventually(Duration::from_secs(5), "a recorded decision", || {
        (!history(&central).is_empty()).then_some(())
    });

    let w = &mut wardens.iter_mut().find(|(id, _)| *id == first).unwrap().1;
    let killed = Instant::now();
    w.sigkill();
    let (second, e2) = wait_leader(&central, Some(&first), Duration::from_secs(5));
    let failover = killed.elapsed();
    assert!(e2 > e1, "a new epoch");
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );

    let w = &wardens.iter().find(|(id, _)| *id == second).unwrap().1;
    let termed = Instant::now();
    w.signal(libc::SIGTERM);
    let (third, _) = wait_leader(&central, Some(&second), Duration::from_secs(5));
    let handover = termed.elapsed();
    assert!(third != first);
    assert!(
        handover < Duration::from_millis(1500),
        "SIGTERM handover took {handover:?}"
    );
    assert_no_overlap(&central);
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_paused_leader_steps_down_when_it_resumes_and_records_nothing() {
    let central = Redis::start();
    let wardens = start_three(&central);
    let (first, e1) = wait_leader(&central, None, Duration::from_secs(15));
    eventually(Duration::from_secs(5), "a recorded decision", || {
        (!history(&central).is_empty()).then_some(())
    });
    let w = &wardens.iter().find(|(id, _)| *id == first).unwrap().1;
    w.signal(libc::SIGSTOP);
    let (_, e2) = wait_leader(&central, Some(&first), Duration::from_secs(8));
    assert!(e2 > e1);
    // The new leader records, then the old one wakes up.
    eventually(Duration::from_secs(5), "a record of the new epoch", || {
        history(&central)
            .iter()
            .any(|(_, e, _)| *e == e2)
            .then_some(())
    });
    w.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(5),
        "the old leader stepping down",
        || w.log_text().contains("stepping down").then_some(()),
    );
    // Two more records of the new epoch after the old leader woke.
    let n = history(&central).len();
    eventually(Duration::from_secs(5), "two more records", || {
        (history(&central).len() >= n + 2).then_some(())
    });
    assert_no_overlap(&central);
    // What matters: no record of the old epoch after the new epoch's first.
    let h = history(&central);
    let first_new = h.iter().position(|(_, e, _)| *e == e2).unwrap();
    let late = h[first_new..].iter().filter(|(_, e, _)| *e == e1).count();
    assert_eq!(
        late, 0,
        "records of epoch {e1} after epoch {e2}'s first: {h:?}"
    );
    assert!(
        h[..first_new]
            .iter()
            .any(|(id, e, _)| *id == first && *e == e1),
        "the old leader recorded before the pause: {h:?}"
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_restarted_central_redis_brings_a_new_epoch_and_no_overlap() {
    let mut central = Redis::start();
    let _wardens = start_three(&central);
    let (_, e1) = wait_leader(&central, None, Duration::from_secs(15));
    central.restart();
    let (_, e2) = wait_leader(&central, None, Duration::from_secs(10));
    assert!(
        e2 > e1,
        "epochs keep growing across a restart: {e1} then {e2}"
    );
    eventually(Duration::from_secs(5), "decisions recorded again", || {
        (history(&central).len() >= 2).then_some(())
    });
    assert_no_overlap(&central);
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn warden_status_shows_the_leader_the_hosts_and_the_last_decision() {
    let central = Redis::start();
    let _wardens = start_three(&central);
    let (lead, epoch) = wait_leader(&central, None, Duration::from_secs(15));
    eventually(Duration::from_secs(5), "a recorded decision", || {
        (!history(&central).is_empty()).then_some(())
    });
    // The leader may decide before the last host's first heartbeat lands (seen in CI
    // under load): wait until every host has been seen, then read the status.
    eventually(Duration::from_secs(10), "all three hosts seen", || {
        let n: usize = central.conn().zcard("warden:hosts").unwrap();
        (n == 3).then_some(())
    });
    let out = std::process::Command::new(warden_tests::warden_bin())
        .args(["status", "--json"])
        .env("WARDEN_CENTRAL_REDIS", central.url())
        .env_remove("WARDEN_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["leader"]["instance_id"], lead.as_str());
    assert_eq!(s["leader"]["epoch"], epoch);
    assert!(
        s["leader"]["heartbeat_age_ms"].as_u64().unwrap() < 2000,
        "{s}"
    );
    let hosts: Vec<&str> = s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["i-aaa", "i-bbb", "i-ccc"]);
    let svc = &s["services"][0];
    assert_eq!(
        (
            svc["service"].as_str(),
            svc["desired"].as_u64(),
            svc["outcome"].as_str()
        ),
        (Some("web"), Some(3), Some("dry-run")),
        "{s}"
    );
    let text = std::process::Command::new(warden_tests::warden_bin())
        .args(["status"])
        .env("WARDEN_CENTRAL_REDIS", central.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("leader: {lead} in eu-west-1a (epoch {epoch}")),
        "{text}"
    );
    assert!(
        text.contains("web: metric 3 tasks mapped 3 desired 3 running - action")
            && text.contains("(dry-run) by"),
        "{text}"
    );
}
