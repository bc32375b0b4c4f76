//! The manager's safety in a slow and faulty world: real warden processes, one redis-server
//! as the central Redis, moto_server as AWS behind a fault proxy (latency, throttling,
//! 5xx). What warden promises is counted on the far side: leader changes in Redis, ECS
//! calls and their epochs in moto's request recorder, tasks with ListTasks.

use std::path::Path;
use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;
use warden_tests::proxy::{Fault, HttpFaultProxy, Imds};

fn leader(central: &Redis) -> Option<(String, u64)> {
    let v: Option<String> = central.conn().get("warden:leader").ok()?;
    let v = v?;
    let mut it = v.split('\t');
    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
}

fn records(central: &Redis, service: &str) -> Vec<serde_json::Value> {
    let items: Vec<String> = central
        .conn()
        .lrange(format!("warden:decisions:{service}"), 0, -1)
        .unwrap();
    items
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

fn set_metric(path: &Path, v: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A warden taking part in the manager only.
fn manager_config(central: &Redis, id: &str, body: &str) -> String {
    format!(
        r#"[host]
instance_id = "{id}"
availability_zone = "eu-west-1a"
[registrar]
enabled = false
[manager]
central_redis = "{}"
loop_secs = 1
{body}"#,
        central.url()
    )
}

fn web_service(metric: &str, policy: &str) -> String {
    format!(
        r#"[metrics.m]
plugin = "test-chaos"
config = {{ sequence = ["{metric}"] }}
[[manager.services]]
name = "web"
cluster = "c1"
task_definition = "web"
metric = "m"
mapping = {{ target_per_task = 1.0 }}
policy = {{ {policy} }}
"#
    )
}

/// With 1.5 s per AWS call and a metric plugin that takes 6 s, three hosts keep one
/// leader for 40 s (20 leases of 2 s, six slow metric reads at least), and that leader
/// gets the work done.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_slow_aws_and_a_slow_metric_never_change_the_leader() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.set_delay(Duration::from_millis(1500));
    let body = format!(
        "[plugins]\ncall_timeout_ms = 8000\n{}",
        web_service("sleep:6000", "max = 10")
    );
    let wardens: Vec<Warden> = ["i-slow-a", "i-slow-b", "i-slow-c"]
        .iter()
        .map(|id| {
            Warden::start(
                &manager_config(&central, id, &body),
                &Moto::env_for(&proxy.endpoint(), id),
            )
        })
        .collect();
    let first = eventually(Duration::from_secs(20), "a leader", || leader(&central));
    let mut seen = vec![first.clone()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(40) {
        if let Some(l) = leader(&central) {
            if *seen.last().unwrap() != l {
                seen.push(l);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, vec![first.clone()], "leadership changed hands");
    for w in &wardens {
        assert!(
            !w.log_text().contains("stepping down"),
            "a host stepped down:\n{}",
            w.log_text()
        );
    }
    // The work was done meanwhile: the metric (1) became one task, started by the leader.
    let n = rt().block_on(moto.ecs_count("c1", "web", "warden-web"));
    assert_eq!(n, 1);
    let runs: Vec<Recorded> = moto
        .recorded()
        .into_iter()
        .filter(|r| r.op == "RunTask")
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].key, first.0);
}

/// Two real leaders contested: the leader is SIGSTOPped right after it sent its first
/// RunTask batch and resumed after its successor acted. moto's recorder shows no call of
/// the old epoch after the new epoch's first call, and the task count ends at the
/// decided 30, never above.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_paused_leader_sends_nothing_after_its_successor_acts() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.set_delay(Duration::from_millis(700));
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "30");
    let body = web_service(
        &format!("file:{}", metric.display()),
        "max = 30, scale_down_window_secs = 0",
    );
    let ids = ["i-pause-a", "i-pause-b"];
    let wardens: Vec<Warden> = ids
        .iter()
        .map(|id| {
            Warden::start(
                &manager_config(&central, id, &body),
                &Moto::env_for(&proxy.endpoint(), id),
            )
        })
        .collect();
    let (old, old_epoch) = eventually(Duration::from_secs(20), "a leader", || leader(&central));
    let paused = &wardens[ids.iter().position(|i| *i == old).unwrap()];
    eventually(
        Duration::from_secs(20),
        "the leader's first RunTask",
        || {
            proxy
                .passed()
                .iter()
                .any(|p| p.op == "RunTask" && p.key == old)
                .then_some(())
        },
    );
    paused.signal(libc::SIGSTOP);
    let (new, new_epoch) = eventually(Duration::from_secs(10), "a new leader", || {
        leader(&central).filter(|(id, _)| *id != old)
    });
    assert!(new_epoch > old_epoch);
    eventually(
        Duration::from_secs(20),
        "the new leader's RunTask at moto",
        || {
            moto.recorded()
                .iter()
                .any(|r| r.op == "RunTask" && r.key == new)
                .then_some(())
        },
    );
    paused.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(10),
        "the old leader stepping down",
        || {
            let log = paused.log_text();
            (log.contains("stepping down") || log.contains("scaling work stopped")).then_some(())
        },
    );
    // One more decision by the new leader after the old one woke up.
    let after = records(&central, "web").len();
    eventually(Duration::from_secs(10), "another decision", || {
        (records(&central, "web").len() > after + 1).then_some(())
    });
    let rec = moto.recorded();
    let first_new = rec
        .iter()
        .position(|r| r.epoch == Some(new_epoch))
        .expect("the new epoch's calls are recorded");
    let late: Vec<&Recorded> = rec[first_new..]
        .iter()
        .filter(|r| r.key == old && r.epoch.is_some_and(|e| e < new_epoch))
        .collect();
    assert!(
        late.is_empty(),
        "the old epoch's calls after the new epoch's first: {late:?}"
    );
    assert!(
        rec.iter()
            .any(|r| r.key == old && r.op == "RunTask" && r.epoch == Some(old_epoch)),
        "the old leader's first batch is not in the recorder: the test did not pause it mid-work"
    );
    assert!(late_calls(&rec).is_empty());
    let n = rt().block_on(moto.ecs_count("c1", "web", "warden-web"));
    assert_eq!(n, 30);
}

/// Leaders killed, paused and resumed while the desired count changes: ECS never holds
/// more tasks than the policy's max, and no epoch sends a call after its successor's
/// first. Rounds: `WARDEN_CHAOS_ROUNDS` (default 20; the benchmark runs 100).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn tasks_never_exceed_max_under_leader_chaos() {
    let rounds: usize = std::env::var("WARDEN_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.set_delay(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "8");
    let max = 12;
    let body = web_service(
        &format!("file:{}", metric.display()),
        &format!("max = {max}, scale_down_window_secs = 0, tolerance = 0.0"),
    );
    let ids = ["i-chaos-a", "i-chaos-b", "i-chaos-c"];
    let mut wardens: Vec<Warden> = ids
        .iter()
        .map(|id| {
            Warden::start(
                &manager_config(&central, id, &body),
                &Moto::env_for(&proxy.endpoint(), id),
            )
        })
        .collect();
    let rt = rt();
    let mut highest = 0;
    let snapshot = |highest: &mut usize| {
        let n = rt.block_on(moto.ecs_count("c1", "web", "warden-web"));
        *highest = (*highest).max(n);
        assert!(n <= max, "{n} tasks, above max {max}");
    };
    eventually(Duration::from_secs(20), "a leader", || leader(&central));
    let values = ["0", "4", "8", "12", "20", "3"];
    let mut paused = 0;
    for round in 0..rounds {
        // Each round acts on the leader of the moment (after a kill, the next one).
        let (lead, _) = eventually(Duration::from_secs(15), "a leader", || leader(&central));
        let w = ids.iter().position(|i| *i == lead).unwrap();
        set_metric(&metric, values[fastrand::usize(0..values.len())]);
        match round % 3 {
            0 => {
                wardens[w].sigkill();
                wardens[w].restart();
            }
            1 => {
                wardens[w].signal(libc::SIGSTOP);
                for _ in 0..(5 + fastrand::u32(0..4)) {
                    snapshot(&mut highest);
                    std::thread::sleep(Duration::from_millis(500));
                }
                wardens[w].signal(libc::SIGCONT);
                paused += 1;
            }
            _ => {}
        }
        for _ in 0..4 {
            snapshot(&mut highest);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert_eq!(paused, rounds / 3 + usize::from(rounds % 3 == 2));
    let late = late_calls(&moto.recorded());
    assert!(late.is_empty(), "calls of deposed epochs: {late:?}");
    assert!(highest > 0, "nothing was ever started");
}

/// `task_definition` as family, family:revision or a full ARN: each service counts its
/// own tasks right, so none starts more once it has its two.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn task_definitions_as_family_revision_or_arn_are_each_counted() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let mut body = String::from("[metrics.m]\nplugin = \"template\"\nconfig = { value = 2.0 }\n");
    for (name, td) in [
        ("s-fam", "web"),
        ("s-rev", "web:1"),
        (
            "s-arn",
            "arn:aws:ecs:eu-west-1:123456789012:task-definition/web:1",
        ),
    ] {
        body.push_str(&format!(
            "[[manager.services]]\nname = \"{name}\"\ncluster = \"c1\"\ntask_definition = \"{td}\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\n"
        ));
    }
    let _w = Warden::start(&manager_config(&central, "i-td", &body), &moto.env());
    let rt = rt();
    for s in ["s-fam", "s-rev", "s-arn"] {
        eventually(Duration::from_secs(20), &format!("2 tasks of {s}"), || {
            (rt.block_on(moto.ecs_count("c1", "web", &format!("warden-{s}"))) == 2).then_some(())
        });
    }
    // Three more decisions each: the counts hold and no further RunTask goes out.
    let seen: Vec<usize> = ["s-fam", "s-rev", "s-arn"]
        .iter()
        .map(|s| records(&central, s).len())
        .collect();
    for (s, n) in ["s-fam", "s-rev", "s-arn"].iter().zip(seen) {
        eventually(Duration::from_secs(10), "three more decisions", || {
            (records(&central, s).len() >= n + 3).then_some(())
        });
        let last = records(&central, s).pop().unwrap();
        assert_eq!(
            (last["running"].as_u64(), last["desired"].as_u64()),
            (Some(2), Some(2)),
            "{last}"
        );
    }
    let runs = moto.recorded().iter().filter(|r| r.op == "RunTask").count();
    assert_eq!(runs, 3, "one RunTask per service");
}

/// Without instance id and AZ in the config, both come from instance metadata (IMDSv2);
/// with both configured (and the region set), instance metadata is never asked.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn instance_id_and_az_come_from_instance_metadata_only_when_not_configured() {
    let central = Redis::start();
    let moto = Moto::start();
    let imds = Imds::start("i-0imds1234", "eu-west-1b");
    let body = "dry_run = true\n[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n[[manager.services]]\nname = \"web\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\n";
    let config = format!(
        "[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\nloop_secs = 1\n{body}",
        central.url()
    );
    let mut env: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_EC2_METADATA_DISABLED")
        .collect();
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), imds.endpoint()));
    let _a = Warden::start(&config, &env);
    eventually(Duration::from_secs(20), "the IMDS host as leader", || {
        let v: Option<String> = central.conn().get("warden:leader").ok()?;
        v.filter(|v| v.starts_with("i-0imds1234\t") && v.ends_with("\teu-west-1b"))
    });
    let asked = imds.requests();
    assert!(asked >= 2, "{asked}");
    let configured = config.replacen(
        "[registrar]",
        "[host]\ninstance_id = \"i-configured\"\navailability_zone = \"eu-west-1c\"\n[registrar]",
        1,
    );
    let _b = Warden::start(&configured, &env);
    eventually(
        Duration::from_secs(20),
        "the configured host taking part",
        || {
            let az: Option<String> = central.conn().hget("warden:host:i-configured", "az").ok()?;
            (az.as_deref() == Some("eu-west-1c")).then_some(())
        },
    );
    assert_eq!(
        imds.requests(),
        asked,
        "instance metadata asked by a configured host"
    );
}

/// A metric plugin whose `new` takes 6 s: the leader records holds naming the hang, the
/// rest of warden is not held up, and once `new` returns the tasks follow the metric.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_metric_plugin_slow_in_new_holds_then_scales() {
    let central = Redis::start();
    let moto = Moto::start();
    moto.fixture(&["ecs-setup", "c1", "web", "3"]);
    let body = r#"[plugins]
create_timeout_ms = 1000
[metrics.m]
plugin = "test-chaos"
config = { sequence = ["ok:3"], create_delay_ms = 6000 }
[[manager.services]]
name = "web"
cluster = "c1"
task_definition = "web"
metric = "m"
mapping = { target_per_task = 1.0 }
"#;
    let w = Warden::start(&manager_config(&central, "i-new", body), &moto.env());
    let held = eventually(Duration::from_secs(15), "a hold naming the hang", || {
        records(&central, "web")
            .into_iter()
            .find(|r| r["metric_error"]["kind"] == "timeout" && r["action"] == "hold")
    });
    assert!(
        held["metric_error"]["message"]
            .as_str()
            .unwrap()
            .contains("has not returned from new"),
        "{held}"
    );
    let rt = rt();
    eventually(Duration::from_secs(20), "3 tasks once new returned", || {
        (rt.block_on(moto.ecs_count("c1", "web", "warden-web")) == 3).then_some(())
    });
    assert!(w.log_text().contains("plugin instance created"));
}

/// ECS answers are read: a RunTask that places all its tasks reports them, one that
/// places fewer (a container instance without room) reports the shortfall, and a
/// throttled RunTask is retried by the SDK without starting anything twice.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn run_task_answers_are_read_partial_placement_is_reported_and_throttling_retried() {
    let central = Redis::start();
    let moto = Moto::start();
    // One container instance (4096 CPU units in moto) with room for 4 tasks of 1024.
    moto.fixture(&["ecs-setup", "c1", "web", "1", "1024"]);
    let proxy = HttpFaultProxy::start(moto.port);
    proxy.fail_next(2, "RunTask", Fault::Throttle);
    let dir = tempfile::tempdir().unwrap();
    let metric = dir.path().join("metric");
    set_metric(&metric, "3");
    let body = web_service(&format!("file:{}", metric.display()), "max = 20");
    let _w = Warden::start(
        &manager_config(&central, "i-ans", &body),
        &Moto::env_for(&proxy.endpoint(), "i-ans"),
    );
    let ran = eventually(Duration::from_secs(20), "a RunTask outcome", || {
        records(&central, "web")
            .into_iter()
            .find(|r| r["outcome"].get("ran").is_some())
    });
    assert_eq!(
        (
            ran["outcome"]["ran"]["asked"].as_u64(),
            ran["outcome"]["ran"]["started"].as_u64()
        ),
        (Some(3), Some(3)),
        "{ran}"
    );
    let throttled = proxy
        .passed()
        .iter()
        .filter(|p| p.op == "RunTask" && p.faulted)
        .count();
    assert_eq!(throttled, 2);
    let at_moto = moto.recorded().iter().filter(|r| r.op == "RunTask").count();
    assert_eq!(at_moto, 1, "the SDK's retries reached moto once");
    // 6 asked, room for 1 more: the shortfall is reported, not hidden.
    set_metric(&metric, "6");
    let short = eventually(Duration::from_secs(20), "a partial placement", || {
        records(&central, "web").into_iter().find(|r| {
            r["outcome"]["ran"]["asked"].as_u64() == Some(3)
                && r["outcome"]["ran"]["started"].as_u64() == Some(1)
        })
    });
    let failures = short["outcome"]["ran"]["failures"].to_string();
    assert!(failures.contains("2 of 3 tasks not placed"), "{short}");
    let rt = rt();
    assert_eq!(rt.block_on(moto.ecs_count("c1", "web", "warden-web")), 4);
}

/// A service name that collides with another, or whose `startedBy` would, is refused by
/// `warden check` naming both.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn warden_check_refuses_duplicate_and_colliding_service_names() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[manager]\ncentral_redis = \"redis://127.0.0.1:1\"\n[metrics.m]\nplugin = \"template\"\nconfig = { value = 1.0 }\n";
    let svc = |name: &str| {
        format!("[[manager.services]]\nname = \"{name}\"\ntask_definition = \"web\"\nmetric = \"m\"\nmapping = {{ target_per_task = 1.0 }}\n")
    };
    let long = "a".repeat(29);
    for (text, expect) in [
        (
            format!("{base}{}{}", svc("web"), svc("web")),
            "\"web\" is also the name of manager.services[0]".to_owned(),
        ),
        (
            format!(
                "{base}{}{}",
                svc(&format!("{long}-one")),
                svc(&format!("{long}-two"))
            ),
            format!("manager.services[0] (\"{long}-one\") would both tag their tasks"),
        ),
    ] {
        let file = dir.path().join("w.toml");
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = warden_tests::warden(&["check", "--config", file.to_str().unwrap()]);
        assert_eq!(code, 78, "{out}{err}");
        assert!(
            out.contains(&expect) && out.contains("manager.services[1].name"),
            "{out}"
        );
    }
}

/// A metric plugin's error kind reaches the record and `warden status`; a permanent error
/// rests the plugin at once (the next loop does not call it) and the rest names it.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn metric_error_kinds_are_shown_and_a_permanent_error_rests_the_plugin() {
    let central = Redis::start();
    let body = r#"dry_run = true
[plugins]
breaker_open_ms = 60000
[metrics.m]
plugin = "test-chaos"
config = { sequence = ["error:permanent", "ok:5"] }
[[manager.services]]
name = "web"
task_definition = "web"
metric = "m"
mapping = { target_per_task = 1.0 }
"#;
    let _w = Warden::start(&manager_config(&central, "i-kinds", body), &[]);
    let recs = eventually(Duration::from_secs(20), "two records", || {
        let r = records(&central, "web");
        (r.len() >= 2).then_some(r)
    });
    assert_eq!(recs[0]["metric_error"]["kind"], "permanent", "{}", recs[0]);
    assert_eq!(
        recs[1]["metric_error"]["kind"], "resting after permanent",
        "the plugin was called again instead of resting: {}",
        recs[1]
    );
    assert!(
        recs[1]["metric_error"]["message"]
            .as_str()
            .unwrap()
            .contains("last error: permanent: chaos asked for a permanent error"),
        "{}",
        recs[1]
    );
    let text = status_text(&central);
    assert!(
        text.contains("metric error (resting after permanent)"),
        "{text}"
    );
}
