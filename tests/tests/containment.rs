//! A plugin that panics, hangs, errors or answers garbage loses only its own value; the
//! process goes on and the next call is served. Real `.so` files, loaded in-process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use warden::plugins::{
    CallError, CallOptions, CreateError, MetricClient, PluginHost, ServicesClient,
};
use warden_plugin_api::{ErrorKind, Kind};
use warden_tests::*;

fn host() -> (PluginHost, tempfile::TempDir) {
    let files = [
        plugin_so("warden_plugin_test_chaos"),
        plugin_so("warden_plugin_file_services"),
    ];
    let dir = plugin_dir(&files.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    let host = PluginHost::load_dirs(&[dir.path().to_owned()], false);
    assert!(host.failures().is_empty(), "{:?}", host.failures());
    (host, dir)
}

fn options(timeout_ms: u64, breaker_failures: u32) -> CallOptions {
    CallOptions {
        timeout: Duration::from_millis(timeout_ms),
        breaker_failures,
        breaker_rest: Duration::from_secs(60),
        ..CallOptions::default()
    }
}

async fn chaos(host: &PluginHost, config: serde_json::Value, opts: CallOptions) -> MetricClient {
    MetricClient(
        host.create("test-chaos", Kind::MetricSource, &config, opts)
            .await
            .unwrap(),
    )
}

/// Waits up to 0.5 s for a file the plugin writes (the caller asserts it exists).
async fn wait_for_file(path: &std::path::Path) {
    for _ in 0..50 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kind_of(r: Result<warden_plugin_api::Measurement, CallError>) -> ErrorKind {
    r.expect_err("expected a failure").kind()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn panic_hang_garbage_and_error_are_contained_and_the_next_call_is_served() {
    let (host, _dir) = host();
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("cancelled");
    let m = chaos(
        &host,
        json!({
            "sequence": ["panic", "ok:7", "hang", "ok:8", "garbage", "error:transient", "sleep:50", "ok:9", "error:permanent", "ok:10"],
            "cancel_marker": marker.to_str().unwrap()
        }),
        options(300, 100),
    )
    .await;

    let e = m.measure().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Panicked, "{e}");
    assert!(
        e.to_string().contains("chaos step 0 asked for a panic"),
        "{e}"
    );
    assert_eq!(m.measure().await.unwrap().value, 7.0);

    let started = std::time::Instant::now();
    assert_eq!(kind_of(m.measure().await), ErrorKind::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timeout took {:?}",
        started.elapsed()
    );
    // The hanging call was cancelled inside the plugin, not left running.
    wait_for_file(&marker).await;
    assert!(
        marker.exists(),
        "the plugin's hanging future was not dropped"
    );
    assert_eq!(m.measure().await.unwrap().value, 8.0);

    let e = m.measure().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidResponse, "{e}");
    assert!(e.to_string().contains("wrong shape"), "{e}");
    assert_eq!(kind_of(m.measure().await), ErrorKind::Transient);
    // tokio::time::sleep inside the plugin runs on the plugin's own runtime.
    assert_eq!(m.measure().await.unwrap().value, 1.0);
    assert_eq!(m.measure().await.unwrap().value, 9.0);
    // A permanent error rests the plugin at once (it would be the same next time), and
    // the refusal names it.
    assert_eq!(kind_of(m.measure().await), ErrorKind::Permanent);
    let e = m.measure().await.unwrap_err();
    assert!(
        matches!(e, CallError::Resting { failures: 1, .. })
            && e.kind() == ErrorKind::Permanent
            && e.to_string()
                .contains("last error: permanent: chaos asked for a permanent error"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn dropping_a_call_cancels_the_plugin_work() {
    let (host, _dir) = host();
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("cancelled");
    let m = chaos(
        &host,
        json!({ "sequence": ["hang"], "cancel_marker": marker.to_str().unwrap() }),
        options(60_000, 3),
    )
    .await;
    let call = m.measure();
    assert!(tokio::time::timeout(Duration::from_millis(100), call)
        .await
        .is_err());
    wait_for_file(&marker).await;
    assert!(
        marker.exists(),
        "dropping the call did not cancel the plugin's future"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn a_plugin_that_keeps_failing_is_rested_and_others_go_on() {
    let (host, _dir) = host();
    let bad = chaos(
        &host,
        json!({ "sequence": ["error:transient"] }),
        options(1000, 2),
    )
    .await;
    let good = chaos(&host, json!({ "sequence": ["ok:3"] }), options(1000, 2)).await;
    assert_eq!(kind_of(bad.measure().await), ErrorKind::Transient);
    assert_eq!(kind_of(bad.measure().await), ErrorKind::Transient);
    let rested = bad.measure().await.unwrap_err();
    assert!(
        matches!(rested, CallError::Resting { failures: 2, .. }),
        "{rested}"
    );
    assert_eq!(good.measure().await.unwrap().value, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn a_panic_in_create_and_a_bad_config_are_errors_not_crashes() {
    let (host, _dir) = host();
    let e = host
        .create(
            "test-chaos",
            Kind::MetricSource,
            &json!({ "sequence": ["ok:1"], "panic_on_create": true }),
            options(1000, 3),
        )
        .await
        .err()
        .unwrap();
    match e {
        CreateError::Plugin { error, .. } => {
            assert_eq!(error.kind, ErrorKind::Panicked);
            assert!(
                error.message.contains("asked to panic on create"),
                "{error}"
            );
        }
        other => panic!("unexpected {other}"),
    }
    let e = host
        .create(
            "test-chaos",
            Kind::MetricSource,
            &json!({ "sequence": "ok:1" }),
            options(1000, 3),
        )
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("sequence: the value given is not of type \"array\""),
        "{e}"
    );
    let e = host
        .create(
            "file-services",
            Kind::MetricSource,
            &json!({}),
            options(1000, 3),
        )
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("offers no metric-source"), "{e}");
    // The plugin's own check, after the schema.
    let e = host
        .create(
            "test-chaos",
            Kind::MetricSource,
            &json!({ "sequence": [] }),
            options(1000, 3),
        )
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("sequence: must not be empty"), "{e}");
    // Still alive and serving.
    let m = chaos(&host, json!({ "sequence": ["ok:5"] }), options(1000, 3)).await;
    assert_eq!(m.measure().await.unwrap().value, 5.0);
}

/// Captures the host's log output.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn plugin_tracing_reaches_the_host_log_under_the_plugin_name() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // Global: the plugin's event is re-emitted on whichever thread polls the call.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let (host, _dir) = host();
    let m = chaos(&host, json!({ "sequence": ["log"] }), options(1000, 3)).await;
    assert_eq!(m.measure().await.unwrap().value, 2.0);
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("chaos plugin says hello"))
        .unwrap_or_else(|| panic!("{text}"));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(event["level"], "WARN");
    assert_eq!(event["fields"]["plugin"], "test-chaos");
    assert_eq!(event["fields"]["fields"], "step=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn file_services_follow_the_file_and_keep_the_last_good_set() {
    let (host, _dir) = host();
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("services.toml");
    std::fs::write(
        &path,
        "[[services]]\nname = \"web\"\nport = 80\nmatch = { image = \"web\" }\n",
    )
    .unwrap();
    let s = ServicesClient(
        host.create(
            "file-services",
            Kind::ServiceDefinitions,
            &json!({ "path": path }),
            options(1000, 3),
        )
        .await
        .unwrap(),
    );
    assert_eq!(s.generation().await.unwrap(), 1);
    assert_eq!(s.list().await.unwrap()[0].name, "web");
    let tmp = work.path().join("tmp");
    std::fs::write(&tmp, "[[services]]\nname = \"web\"\nport = \"eighty\"\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(
        s.generation().await.unwrap(),
        1,
        "a bad edit must not change the set"
    );
    assert_eq!(s.list().await.unwrap()[0].port, Some(80));
    std::fs::write(
        &tmp,
        "[[services]]\nname = \"api\"\nport = 8080\nmatch = { image = \"api\" }\n",
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(s.generation().await.unwrap(), 2);
    assert_eq!(s.list().await.unwrap()[0].name, "api");
}
