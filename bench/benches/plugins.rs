//! Plugin call and load costs: a metric call through the ABI and the plugin's runtime,
//! the same plugin called directly as an rlib, the same in a child process
//! (`isolation = "process"`), and loading 10 plugin files with and without the probe of
//! each file in a child process.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use warden::plugins::{CallOptions, MetricClient, PluginHost};
use warden_plugin_api::host::Library;
use warden_plugin_api::{Kind, MetricSource};
use warden_plugin_template::{Config, Constant};

/// Times `iters` calls made one after another inside a task on the runtime, as warden's
/// own loops make them.
fn in_task<F, Fut, T>(rt: &tokio::runtime::Runtime, iters: u64, call: F) -> Duration
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    rt.block_on(rt.spawn(async move {
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(call().await);
        }
        start.elapsed()
    }))
    .unwrap()
}

fn calls(c: &mut Criterion) {
    let so = warden_bench::release_template_so();
    warden::plugins::probe::set_command(warden_bench::release_warden_bin());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let library = Arc::new(Library::load(&so).unwrap());
    let raw = library
        .create(Kind::MetricSource, r#"{"value": 3}"#)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(&so, dir.path().join("t.so")).unwrap();
    let host = PluginHost::load_dirs(&[dir.path().to_owned()], false);
    let client = rt.block_on(async {
        MetricClient(
            host.create(
                "template",
                Kind::MetricSource,
                &json!({"value": 3}),
                CallOptions::default(),
            )
            .await
            .unwrap(),
        )
    });
    let isolated = rt.block_on(async {
        MetricClient(
            host.create(
                "template",
                Kind::MetricSource,
                &json!({"value": 3}),
                CallOptions {
                    isolation: warden::config::Isolation::Process,
                    ..CallOptions::default()
                },
            )
            .await
            .unwrap(),
        )
    });
    let direct = rt.block_on(Constant::new(Config { value: 3.0 })).unwrap();

    // Each loop runs inside a task on the runtime, as warden's own loops do.
    let direct = Arc::new(direct);
    let raw = Arc::new(raw);
    let mut g = c.benchmark_group("metric_call");
    g.bench_function("rlib_direct", |b| {
        b.iter_custom(|iters| {
            let direct = direct.clone();
            in_task(&rt, iters, move || {
                let direct = direct.clone();
                async move { std::hint::black_box(direct.measure().await.unwrap()) }
            })
        })
    });
    g.bench_function("abi_raw_instance", |b| {
        b.iter_custom(|iters| {
            let raw = raw.clone();
            in_task(&rt, iters, move || {
                let call = raw.call("measure", "null");
                async move { call.await.unwrap() }
            })
        })
    });
    // The same constant through stabby (bench/stabby-proto): a synchronous call that
    // returns the JSON text, beside `abi_raw_instance` (abi_stable, an FFI future).
    let proto = warden_bench::release_stabby_proto_so();
    // SAFETY: the prototype's own library, built just now; stabby checks each symbol's
    // type layout against the one asked for.
    let proto = unsafe { libloading::Library::new(&proto) }.unwrap();
    let (stabby_new, stabby_measure) = unsafe {
        use stabby::libloading::StabbyLibrary;
        (
            *proto
                .get_stabbied::<extern "C" fn(f64) -> usize>(b"warden_stabby_new")
                .unwrap(),
            *proto
                .get_stabbied::<extern "C" fn(usize) -> stabby::string::String>(
                    b"warden_stabby_measure",
                )
                .unwrap(),
        )
    };
    let instance = stabby_new(3.0);
    assert_eq!(stabby_measure(instance).as_str(), r#"{"value":3.0}"#);
    g.bench_function("stabby_sync_json", |b| {
        b.iter(|| std::hint::black_box(stabby_measure(std::hint::black_box(instance))))
    });
    g.bench_function("abi_host_client", |b| {
        b.iter_custom(|iters| {
            let client = client.clone();
            in_task(&rt, iters, move || {
                let client = client.clone();
                async move { std::hint::black_box(client.measure().await.unwrap()) }
            })
        })
    });
    // Calls made one after another find the instance's call thread still looking for
    // work (executor::IDLE_SPIN); a metric read once a loop finds it parked. This figure
    // is that case: 2000 calls 200 µs apart (past the spin), each call timed alone.
    {
        let client = client.clone();
        let mut took: Vec<Duration> = rt
            .block_on(rt.spawn(async move {
                let mut took = Vec::with_capacity(2000);
                for _ in 0..2000 {
                    std::thread::sleep(Duration::from_micros(200));
                    let start = Instant::now();
                    std::hint::black_box(client.measure().await.unwrap());
                    took.push(start.elapsed());
                }
                took
            }))
            .unwrap();
        took.sort();
        println!(
            "metric_call/abi_host_client_spaced (2000 calls 200 µs apart): median {:.2} µs, p90 {:.2} µs, p99 {:.2} µs",
            took[1000].as_secs_f64() * 1e6,
            took[1800].as_secs_f64() * 1e6,
            took[1980].as_secs_f64() * 1e6
        );
    }
    g.bench_function("isolated_process_client", |b| {
        b.iter_custom(|iters| {
            let client = isolated.clone();
            in_task(&rt, iters, move || {
                let client = client.clone();
                async move { std::hint::black_box(client.measure().await.unwrap()) }
            })
        })
    });
    g.finish();
}

fn loading(c: &mut Criterion) {
    let so = warden_bench::release_template_so();
    let mut g = c.benchmark_group("load");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    // Every iteration loads 10 fresh copies: a library is never unloaded, and loading the
    // same path twice would only bump a reference count.
    for (name, probed) in [("10_plugins", false), ("10_plugins_probed", true)] {
        g.bench_function(name, |b| {
            warden::plugins::probe::set_enabled(probed);
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir().unwrap();
                    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                    for i in 0..10 {
                        std::fs::copy(&so, dir.path().join(format!("p{i}.so"))).unwrap();
                    }
                    let start = Instant::now();
                    let host = PluginHost::load_dirs(&[dir.path().to_owned()], true);
                    total += start.elapsed();
                    // Same manifest name ten times: the first loads, the rest are named duplicates,
                    // but each file is still opened and checked in full.
                    assert_eq!(host.plugins().len() + host.failures().len(), 10);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, calls, loading);
criterion_main!(benches);
