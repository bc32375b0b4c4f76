//! The catalog's metric plugins, each called through its real `.so` with
//! `warden plugins call` (loading, schema check, panic guard and timeout as in the
//! daemon) against a real server.

use redis::Commands;
use warden_tests::harness::*;
use warden_tests::{plugin_so, warden};

fn call(plugin: &str, config: serde_json::Value) -> (i32, serde_json::Value) {
    let so = plugin_so(plugin);
    let (code, out, err) = warden(&[
        "plugins",
        "call",
        so.to_str().unwrap(),
        "--config",
        &config.to_string(),
        "--timeout-ms",
        "3000",
    ]);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, v)
}

/// LLEN, ZCARD, XLEN, SCARD and GET against redis-server with a password; a wrong
/// password is a config error, a missing server transient, a key of another type or a
/// value that is not a number a config error naming the key; the password is never shown.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn redis_metric_reads_lengths_and_numbers_with_auth() {
    const PASSWORD: &str = "pl-s3cret";
    let port = free_port();
    let _redis = Redis::start_with(
        port,
        &["--port", &port.to_string(), "--requirepass", PASSWORD],
    );
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = c.rpush("jobs", &["a", "b", "c"]).unwrap();
    let _: () = c.zadd_multiple("ranked", &[(1, "x"), (2, "y")]).unwrap();
    let _: () = redis::cmd("XADD")
        .arg("events")
        .arg("*")
        .arg("f")
        .arg("v")
        .query(&mut c)
        .unwrap();
    let _: () = c.sadd("members", &["m1", "m2", "m3", "m4"]).unwrap();
    let _: () = c.set("backlog", "17.5").unwrap();
    let _: () = c.set("word", "seventeen").unwrap();

    for (read, key, want, unit) in [
        ("llen", "jobs", 3.0, Some("items")),
        ("zcard", "ranked", 2.0, Some("members")),
        ("xlen", "events", 1.0, Some("entries")),
        ("scard", "members", 4.0, Some("members")),
        ("get", "backlog", 17.5, None),
        ("llen", "no-such-list", 0.0, Some("items")),
    ] {
        let (code, v) = call(
            "warden_plugin_redis_metric",
            serde_json::json!({"url": url, "key": key, "read": read}),
        );
        assert_eq!(code, 0, "{read} {key}: {v}");
        assert_eq!(v["answer"]["value"], want, "{read} {key}: {v}");
        assert_eq!(v["answer"]["unit"].as_str(), unit, "{v}");
        assert_eq!(v["answer"]["labels"]["key"], key, "{v}");
    }
    let bad = |config: serde_json::Value, kind: &str, says: &str| {
        let (code, v) = call("warden_plugin_redis_metric", config);
        assert_eq!(code, 1, "{v}");
        assert_eq!(v["error"]["kind"], kind, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert!(
            !message.contains(PASSWORD),
            "the password is shown: {message}"
        );
    };
    bad(
        serde_json::json!({"url": format!("redis://:wrong@127.0.0.1:{port}"), "key": "jobs"}),
        "config",
        &format!("127.0.0.1:{port}"),
    );
    bad(
        serde_json::json!({"url": url, "key": "jobs", "read": "get"}),
        "config",
        "jobs",
    );
    bad(
        serde_json::json!({"url": url, "key": "word", "read": "get"}),
        "config",
        "not a number",
    );
    let closed = free_port();
    bad(
        serde_json::json!({"url": format!("redis://127.0.0.1:{closed}"), "key": "jobs", "timeout_ms": 500}),
        "transient",
        &format!("127.0.0.1:{closed}"),
    );
}

/// A number at a JSON pointer from a real HTTP server (busybox httpd); a 404 is
/// permanent, a server that never answers is transient after the timeout, a pointer to a
/// string that is not a number is a config error saying what it found.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn http_json_reads_a_number_at_a_pointer() {
    let server =
        Backend::start(r#"{"queues": {"jobs": {"depth": 12, "name": "jobs"}}, "backlog": "4.5"}"#);
    let base = format!("http://{}", server.addr());
    let ok = |pointer: &str, want: f64| {
        let (code, v) = call(
            "warden_plugin_http_json",
            serde_json::json!({"url": format!("{base}/"), "pointer": pointer, "unit": "jobs",
                               "headers": {"Authorization": "Bearer t0ken"}}),
        );
        assert_eq!(code, 0, "{v}");
        assert_eq!(v["answer"]["value"], want, "{v}");
        assert_eq!(v["answer"]["unit"], "jobs", "{v}");
    };
    ok("/queues/jobs/depth", 12.0);
    ok("/backlog", 4.5);
    let bad = |config: serde_json::Value, kind: &str, says: &str| {
        let (code, v) = call("warden_plugin_http_json", config);
        assert_eq!(code, 1, "{v}");
        assert_eq!(v["error"]["kind"], kind, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    };
    bad(
        serde_json::json!({"url": format!("{base}/"), "pointer": "/queues/jobs/name"}),
        "config",
        "\"jobs\"",
    );
    bad(
        serde_json::json!({"url": format!("{base}/missing.json"), "pointer": "/x"}),
        "permanent",
        "404",
    );
    // Accepts, never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    bad(
        serde_json::json!({"url": format!("http://127.0.0.1:{port}/"), "pointer": "/x", "timeout_ms": 300}),
        "transient",
        "no answer within",
    );
    drop(silent);
}

/// A real Prometheus (Debian's package) scraping a small exporter (busybox httpd serving
/// a metrics file) every second: an instant query gives the exported value; a query of
/// several series, a query Prometheus refuses and an empty result are each said.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn prometheus_answers_an_instant_query() {
    let exporter = tempfile::tempdir().unwrap();
    std::fs::write(
        exporter.path().join("metrics"),
        "# TYPE jobs_waiting gauge\njobs_waiting{queue=\"a\"} 7\njobs_waiting{queue=\"b\"} 5\n",
    )
    .unwrap();
    let port = free_port();
    let _httpd = KillOnDrop(
        std::process::Command::new("/bin/busybox")
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(exporter.path())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, "exporter");
    let prom_dir = tempfile::tempdir().unwrap();
    let config = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let _prometheus = KillOnDrop(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (run scripts/setup.sh)"),
    );
    wait_for_port(prom_port, "prometheus");
    let url = format!("http://127.0.0.1:{prom_port}");
    let query = |q: &str, extra: serde_json::Value| {
        let mut config = serde_json::json!({"url": url, "query": q, "unit": "jobs"});
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call("warden_plugin_prometheus", config)
    };
    // Waits for the first scrape: until then the sum is an empty vector.
    let v = eventually(
        std::time::Duration::from_secs(30),
        "the first scrape",
        || {
            let (code, v) = query("sum(jobs_waiting)", serde_json::json!({}));
            (code == 0).then_some(v)
        },
    );
    assert_eq!(v["answer"]["value"], 12.0, "{v}");
    assert_eq!(v["answer"]["unit"], "jobs", "{v}");
    let (code, v) = query("scalar(jobs_waiting{queue=\"a\"})", serde_json::json!({}));
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(7.0)),
        "{v}"
    );

    let (code, v) = query("jobs_waiting", serde_json::json!({}));
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "config", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("2 series"),
        "{v}"
    );
    let (code, v) = query("sum(", serde_json::json!({}));
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "config", "{v}");
    let (code, v) = query("absent_metric_xyz", serde_json::json!({}));
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (1, Some("transient")),
        "{v}"
    );
    let (code, v) = query("absent_metric_xyz", serde_json::json!({"empty_as": 0}));
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(0.0)),
        "{v}"
    );
}

/// A server process of a test, ended however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn call_aws(moto: &Moto, plugin: &str, config: serde_json::Value) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(warden_tests::warden_bin())
        .args(["plugins", "call"])
        .arg(plugin_so(plugin))
        .args(["--config", &config.to_string()])
        .envs(moto.env())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// Messages waiting in an SQS queue (moto), by name and by URL, with the in-flight ones
/// when asked; a queue that does not exist is a config error naming it.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn sqs_queue_counts_waiting_and_in_flight_messages() {
    let moto = Moto::start();
    let url = moto.fixture(&["sqs-setup", "jobs", "3"]).trim().to_owned();
    moto.fixture(&["sqs-receive", "jobs"]);
    let plugin = "warden_plugin_sqs_queue";
    let (code, v) = call_aws(&moto, plugin, serde_json::json!({"queue": "jobs"}));
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(2.0)),
        "{v}"
    );
    assert_eq!(v["answer"]["unit"], "messages", "{v}");
    let (code, v) = call_aws(
        &moto,
        plugin,
        serde_json::json!({"queue": url, "include_in_flight": true}),
    );
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(3.0)),
        "{v}"
    );
    let (code, v) = call_aws(&moto, plugin, serde_json::json!({"queue": "no-such-queue"}));
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["error"]["kind"], "config", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-queue"),
        "{v}"
    );
}

/// One CloudWatch metric (moto) by GetMetricData over the JSON protocol, signed with
/// SigV4: the newest datapoint within `max_age_secs`, an older one refused (or standing
/// for `when_missing`), other dimensions not mixed in, and a bad statistic a config
/// error naming the field.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn cloudwatch_reads_the_newest_datapoint_within_its_age() {
    let moto = Moto::start();
    moto.fixture(&["cw-put", "App", "Depth", "Queue=jobs", "7", "30"]);
    moto.fixture(&["cw-put", "App", "Depth", "Queue=other", "100", "30"]);
    moto.fixture(&["cw-put", "App", "Old", "Queue=jobs", "5", "1200"]);
    let plugin = "warden_plugin_cloudwatch";
    let depth = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"namespace": "App", "metric_name": "Depth",
            "dimensions": {"Queue": "jobs"}, "statistic": "Maximum"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let (code, v) = call_aws(&moto, plugin, depth(serde_json::json!({})));
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(7.0)),
        "{v}"
    );
    assert_eq!(v["answer"]["labels"]["Queue"], "jobs", "{v}");
    assert!(
        v["answer"]["detail"]["age_secs"].as_u64().unwrap() < 300,
        "{v}"
    );

    let old = serde_json::json!({"namespace": "App", "metric_name": "Old",
        "dimensions": {"Queue": "jobs"}, "max_age_secs": 600});
    let (code, v) = call_aws(&moto, plugin, old.clone());
    assert_eq!(
        (code, &v["error"]["kind"]),
        (1, &serde_json::json!("transient")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no datapoint in the last 600 s"),
        "{v}"
    );
    let mut zero = old;
    zero["when_missing"] = serde_json::json!(0.0);
    let (code, v) = call_aws(&moto, plugin, zero);
    assert_eq!(
        (code, &v["answer"]["value"]),
        (0, &serde_json::json!(0.0)),
        "{v}"
    );

    let (code, v) = call_aws(
        &moto,
        plugin,
        depth(serde_json::json!({"statistic": "Median"})),
    );
    assert_eq!(
        (code, &v["stage"]),
        (1, &serde_json::json!("create")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("config: statistic: \"Median\""),
        "{v}"
    );
}
