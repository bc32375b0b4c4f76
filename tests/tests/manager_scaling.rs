//! The leader scaling ECS tasks in moto_server from a metric read through a real plugin
//! (test-chaos's `file:` step: the test writes the metric into a file).

use std::path::Path;
use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

fn aws(moto: &Moto, args: &[&str]) -> String {
    moto.fixture(args)
}

fn running(moto: &Moto) -> u32 {
    aws(moto, &["ecs-count", "c1", "web", "warden-web"])
        .parse()
        .unwrap()
}

fn manager_config(
    central: &Redis,
    metric_file: &Path,
    extra_service: &str,
    dry_run: bool,
) -> String {
    format!(
        r#"[host]
instance_id = "i-scale"
[plugins]
breaker_open_ms = 500
[registrar]
enabled = false
[manager]
central_redis = "{}"
loop_secs = 1
dry_run = {dry_run}
[metrics.m]
plugin = "test-chaos"
config = {{ sequence = ["file:{}"] }}
[[manager.services]]
name = "web"
cluster = "c1"
metric = "m"
mapping = {{ target_per_task = 1.0 }}
{extra_service}
"#,
        central.url(),
        metric_file.display()
    )
}

fn start(central: &Redis, moto: &Moto, metric: &Path, service: &str, dry_run: bool) -> Warden {
    Warden::start(
        &manager_config(central, metric, service, dry_run),
        &moto.env(),
    )
}

fn set_metric(path: &Path, v: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn last_decision(central: &Redis) -> serde_json::Value {
    let t: Option<String> = central.conn().get("warden:decision:web").unwrap();
    serde_json::from_str(&t.unwrap_or_else(|| "null".into())).unwrap()
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn tasks_follow_the_metric_within_min_max_and_step_and_a_metric_failure_holds() {
    let central = Redis::start();
    let moto = Moto::start();
    aws(&moto, &["ecs-setup", "c1", "web", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "5");
    let _w = start(
        &central,
        &moto,
        &metric,
        "task_definition = \"web\"\npolicy = { min = 1, max = 12, max_step = 4, scale_down_window_secs = 0, tolerance = 0.0 }",
        false,
    );
    eventually(Duration::from_secs(20), "5 tasks", || {
        (running(&moto) == 5).then_some(())
    });
    // Up to 30: clamped to 12, reached in steps of at most 4: every RunTask moto
    // recorded asks for at most 4 tasks (sampling the count could miss a step).
    let before = moto.request_bodies("RunTask").len();
    set_metric(&metric, "30");
    eventually(Duration::from_secs(20), "12 tasks", || {
        (running(&moto) == 12).then_some(())
    });
    let counts: Vec<u64> = moto
        .request_bodies("RunTask")
        .iter()
        .skip(before)
        .map(|b| b["count"].as_u64().unwrap_or(1))
        .collect();
    assert!(counts.len() >= 2, "12 - 5 = 7 needs two steps: {counts:?}");
    assert!(
        counts.iter().all(|c| *c <= 4),
        "a step larger than 4: {counts:?}"
    );
    // A metric failure holds the count (never read as zero).
    set_metric(&metric, "not a number");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(running(&moto), 12);
    let d = last_decision(&central);
    assert_eq!(d["action"], "hold", "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("metric failed"),
        "{d}"
    );
    // Down to 0: clamped to min 1.
    set_metric(&metric, "0");
    eventually(Duration::from_secs(20), "1 task", || {
        (running(&moto) == 1).then_some(())
    });
    // The way down was StopTask calls, recorded with the decisions that made them.
    let history: Vec<String> = central
        .conn()
        .lrange("warden:decisions:web", 0, -1)
        .unwrap();
    let stops: u64 = history
        .iter()
        .map(|t| {
            serde_json::from_str::<serde_json::Value>(t).unwrap()["stop_task"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(stops, 11, "12 -> 1 takes 11 StopTask calls");
}

/// A RunTask refused outright (no such task definition yet) is logged with its reason and
/// retried on the next loop; once it succeeds warden re-counts and never starts more than
/// the decision asked for.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_failed_run_task_is_retried_and_an_unknown_outcome_never_doubles() {
    let central = Redis::start();
    let moto = Moto::start();
    aws(&moto, &["ecs-cluster", "c1", "3"]);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "6");
    let w = start(&central, &moto, &metric, "task_definition = \"web\"", false);
    eventually(
        Duration::from_secs(20),
        "the refused RunTask logged",
        || {
            w.log_text()
                .lines()
                .any(|l| l.contains("RunTask placed fewer tasks") && l.contains("ClientException"))
                .then_some(())
        },
    );
    assert_eq!(running(&moto), 0);
    aws(&moto, &["ecs-register", "web"]);
    eventually(
        Duration::from_secs(20),
        "6 tasks once the task definition exists",
        || (running(&moto) == 6).then_some(()),
    );
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(running(&moto), 6, "more tasks than decided");
    }
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn service_mode_sets_desired_count_and_dry_run_calls_nothing() {
    let central = Redis::start();
    let moto = Moto::start();
    aws(&moto, &["ecs-setup", "c1", "web", "3"]);
    aws(&moto, &["ecs-service", "c1", "websvc", "web", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "4");
    let w = start(&central, &moto, &metric, "ecs_service = \"websvc\"", false);
    eventually(Duration::from_secs(20), "desiredCount 4", || {
        (aws(&moto, &["ecs-service-desired", "c1", "websvc"]) == "4").then_some(())
    });
    drop(w);

    // Dry run: the decision says 4 tasks, ECS sees none.
    let central = Redis::start();
    let _w = start(&central, &moto, &metric, "task_definition = \"web\"", true);
    eventually(Duration::from_secs(20), "a dry-run decision", || {
        let d = last_decision(&central);
        (d["outcome"] == "dry-run" && d["desired"] == 4).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running(&moto), 0, "dry-run started tasks");
}

/// The seed's pipeline: Beanstalk instances (tagged in moto) → a table in S3 → ECS tasks.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn beanstalk_instances_mapped_through_an_s3_table_drive_the_tasks() {
    let central = Redis::start();
    let moto = Moto::start();
    aws(&moto, &["ecs-setup", "c1", "web", "3"]);
    aws(&moto, &["eb-instances", "upstream-prod", "2"]);
    aws(
        &moto,
        &["s3-put", "tables", "web.csv", "min,tasks\n0,1\n2,4\n5,8\n"],
    );
    let config = format!(
        r#"[host]
instance_id = "i-eb"
[plugins]
breaker_open_ms = 500
[registrar]
enabled = false
[manager]
central_redis = "{}"
loop_secs = 1
[metrics.upstream]
plugin = "beanstalk-instances"
config = {{ environment = "upstream-prod" }}
[metrics.table]
plugin = "s3-table"
config = {{ bucket = "tables", key = "web.csv", refresh_secs = 1 }}
[[manager.services]]
name = "web"
cluster = "c1"
task_definition = "web"
metric = "upstream"
mapping = {{ plugin = "table" }}
policy = {{ scale_down_window_secs = 0 }}
"#,
        central.url()
    );
    let w = Warden::start(&config, &moto.env());
    eventually(Duration::from_secs(30), "4 tasks for 2 instances", || {
        (running(&moto) == 4).then_some(())
    });
    aws(&moto, &["eb-instances", "upstream-prod", "6"]);
    eventually(Duration::from_secs(20), "8 tasks for 6 instances", || {
        (running(&moto) == 8).then_some(())
    });
    // A new table is picked up by its ETag.
    aws(
        &moto,
        &["s3-put", "tables", "web.csv", "min,tasks\n0,1\n2,4\n5,6\n"],
    );
    eventually(
        Duration::from_secs(20),
        "6 tasks with the new table",
        || (running(&moto) == 6).then_some(()),
    );
    // A corrupt table keeps the last good one and names the wrong row.
    aws(
        &moto,
        &["s3-put", "tables", "web.csv", "min,tasks\n0,1\n2,four\n"],
    );
    eventually(Duration::from_secs(10), "the corrupt row reported", || {
        w.log_text()
            .lines()
            .any(|l| l.contains("table is corrupt") && l.contains("line 3"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running(&moto), 6, "the last good table still applies");
}
