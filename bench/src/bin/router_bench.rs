//! Router figures, all from one run on this machine, printed as a Markdown table:
//!
//! * throughput and p99 (wrk, 16 connections, 2 threads) of warden's router (host and
//!   port front-ends) against plain nginx with a static upstream of the same 3 backends,
//!   with and without upstream keepalive, rounds interleaved, medians reported;
//! * warden's Redis write (its own route store: script, version bump, publication) →
//!   the first request through the router that sees it;
//! * the router with its Redis stopped (SIGSTOP) for a whole wrk run: p99 and errors;
//! * error.log lines after the throughput runs.
//!
//! Backends: one nginx answering a static body on three ports. Needs `wrk`
//! (`apt-get install wrk`).
//!
//! Run: `cargo run --release -p warden-bench --bin router_bench -- [seconds] [rounds] [workers] [samples]`

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warden::registrar::entry::Entry;
use warden::registrar::redx::{RedisStore, Routes};
use warden_tests::harness::*;

struct Nginx {
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn nginx(workers: &str, http: &str, ports: &[u16]) -> Nginx {
    nginx_with("", workers, http, ports)
}

fn nginx_with(main: &str, workers: &str, http: &str, ports: &[u16]) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "{main}worker_processes {workers};\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n{http}\n}}\n",
        p = dir.path().display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .process_group(0)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for p in ports {
        wait_for_port(*p, "nginx");
    }
    Nginx { child, _dir: dir }
}

/// Pins every process of a process group to one CPU (`taskset`).
fn pin_group(pgid: u32, cpu: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for p in $(pgrep -g {pgid}); do taskset -a -p -c {cpu} $p >/dev/null; done"
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "taskset");
}

/// (requests/s, p99 ms, errors) from one wrk run; pinned: one wrk thread on CPU 0.
fn wrk_on(port: u16, host: &str, secs: u64, pinned: bool) -> (f64, f64, u64) {
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", "wrk", "-t1"]);
        c
    } else {
        let mut c = Command::new("wrk");
        c.arg("-t2");
        c
    };
    let out = cmd
        .args(["-c16", &format!("-d{secs}s"), "--latency", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk said:\n{text}"));
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| ms(v.trim()))
        .unwrap_or(f64::NAN);
    let non2xx: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let socket: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|v| {
            v.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (rps, p99, non2xx + socket)
}

fn wrk(port: u16, host: &str, secs: u64) -> (f64, f64, u64) {
    wrk_on(port, host, secs, false)
}

/// wrk's `1.23ms`, `456.00us`, `1.02s` in ms.
fn ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize]
}

fn router(redis: &Redis, workers: &str) -> Router {
    std::env::set_var("WARDEN_ROUTER_WORKERS", workers);
    std::env::set_var("WARDEN_ROUTER_ACCESS_LOG", "off");
    Router::start(redis)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_owned());
    let secs: u64 = arg(1, "8").parse().unwrap();
    let rounds: usize = arg(2, "3").parse().unwrap();
    let workers = arg(3, "1");
    let samples: usize = arg(4, "200").parse().unwrap();

    let b = [free_port(), free_port(), free_port()];
    let servers: String = b
        .iter()
        .map(|p| {
            format!("  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"ok\\n\"; }} }}\n")
        })
        .collect();
    let _backends = nginx("1", &servers, &b);
    let upstream = |keepalive: bool| {
        let list: String = b
            .iter()
            .map(|p| format!("    server 127.0.0.1:{p};\n"))
            .collect();
        let ka = if keepalive { "    keepalive 32;\n" } else { "" };
        let port = free_port();
        let http = format!(
            "  upstream u {{\n{list}{ka}  }}\n  server {{ listen {port}; location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n"
        );
        (port, http)
    };
    let (ka_port, ka_http) = upstream(true);
    let _plain_ka = nginx(&workers, &ka_http, &[ka_port]);
    let (nk_port, nk_http) = upstream(false);
    let _plain = nginx(&workers, &nk_http, &[nk_port]);
    // The mechanism's floor: a one-line Lua balancer that always picks the first backend.
    let floor_port = free_port();
    let floor_http = format!(
        "  upstream f {{ server 0.0.0.1; balancer_by_lua_block {{ require(\"ngx.balancer\").set_current_peer(\"127.0.0.1\", {}) }} keepalive 32; }}\n  server {{ listen {floor_port}; location / {{ proxy_pass http://f; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n",
        b[0]
    );
    let floor = nginx_with(
        "load_module /usr/lib/nginx/modules/ndk_http_module.so;\nload_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n",
        &workers,
        &floor_http,
        &[floor_port],
    );

    let redis = Redis::start();
    let r = router(&redis, &workers);
    let svc_port = free_port();
    r.listen(svc_port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut routes = Routes::new(RedisStore::new(&redis.url(), None, "bench").unwrap());
    let mut table: BTreeSet<Entry> = b
        .iter()
        .map(|p| Entry::server("web", &format!("127.0.0.1:{p}")))
        .collect();
    table.insert(Entry::key("frontend:web.test", "web"));
    table.insert(Entry::key(&format!("warden:port:{svc_port}"), "web"));
    rt.block_on(routes.apply(&table)).unwrap();
    eventually(Duration::from_secs(10), "the router serving", || {
        (http_get(r.port, "web.test", "/").ok()?.0 == 200).then_some(())
    });

    eprintln!("throughput: {rounds} rounds of {secs} s each...");
    let cases: [(&str, u16, &str); 4] = [
        (
            "plain nginx, static upstream, keepalive 32",
            ka_port,
            "web.test",
        ),
        (
            "plain nginx, static upstream, no keepalive",
            nk_port,
            "web.test",
        ),
        ("warden's router, host front-end", r.port, "web.test"),
        ("warden's router, port front-end", svc_port, "anything.test"),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>, u64)> = vec![(vec![], vec![], 0); cases.len()];
    // The no-keepalive runs go last: each leaves ~100k sockets in TIME_WAIT for a minute,
    // which would burden whichever run came next.
    let order = [0, 2, 3];
    for _ in 0..rounds {
        for i in order {
            let (_, port, host) = cases[i];
            let (rps, p99, errors) = wrk(port, host, secs);
            results[i].0.push(rps);
            results[i].1.push(p99);
            results[i].2 += errors;
        }
    }
    for _ in 0..rounds {
        let (_, port, host) = cases[1];
        let (rps, p99, errors) = wrk(port, host, secs);
        results[1].0.push(rps);
        results[1].1.push(p99);
        results[1].2 += errors;
    }
    let error_log_lines = r.error_log().lines().count();

    eprintln!("propagation: {samples} writes...");
    let mut took = Vec::new();
    for i in 0..samples {
        let host = format!("new{i}.test");
        let mut next = table.clone();
        next.insert(Entry::key(&format!("frontend:{host}"), "web"));
        rt.block_on(routes.apply(&next)).unwrap();
        let t = Instant::now();
        loop {
            if matches!(http_get(r.port, &host, "/"), Ok((200, _))) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{host} never served");
        }
        took.push(t.elapsed().as_secs_f64() * 1000.0);
        table = next;
    }

    // Let the no-keepalive runs' TIME_WAIT sockets go before the next comparison.
    std::thread::sleep(Duration::from_secs(60));

    // Pinned: wrk (one thread) on CPU 0, every nginx on CPU 1 with the backends. The
    // proxies' CPU cost per request then shows as throughput, and p99 is not the
    // scheduler's on a machine whose two cores four busy processes share.
    eprintln!("pinned: {rounds} rounds...");
    for g in [
        _backends.child.id(),
        _plain_ka.child.id(),
        floor.child.id(),
        r.pgid(),
    ] {
        pin_group(g, "1");
    }
    let pinned_cases: [(&str, u16, &str); 4] = [
        (
            "plain nginx, static upstream, keepalive 32",
            ka_port,
            "web.test",
        ),
        (
            "nginx with a one-line Lua balancer (the mechanism's floor)",
            floor_port,
            "web.test",
        ),
        ("warden's router, host front-end", r.port, "web.test"),
        ("warden's router, port front-end", svc_port, "anything.test"),
    ];
    let mut pinned: Vec<(Vec<f64>, Vec<f64>, u64)> = vec![(vec![], vec![], 0); pinned_cases.len()];
    for _ in 0..rounds {
        for (i, (_, port, host)) in pinned_cases.iter().enumerate() {
            let (rps, p99, errors) = wrk_on(*port, host, secs, true);
            pinned[i].0.push(rps);
            pinned[i].1.push(p99);
            pinned[i].2 += errors;
        }
    }
    eprintln!("redis stopped for a whole run...");
    let hung_redis = Redis::start();
    let hr = router(&hung_redis, &workers);
    let mut hroutes = Routes::new(RedisStore::new(&hung_redis.url(), None, "bench").unwrap());
    rt.block_on(hroutes.apply(&table)).unwrap();
    eventually(Duration::from_secs(10), "the second router serving", || {
        (http_get(hr.port, "web.test", "/").ok()?.0 == 200).then_some(())
    });
    let (base_rps, base_p99, base_err) = wrk(hr.port, "web.test", secs);
    hung_redis.signal(libc::SIGSTOP);
    let (hung_rps, hung_p99, hung_err) = wrk(hr.port, "web.test", secs);
    hung_redis.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(10),
        "the router seeing redis back",
        || hr.error_log().contains("answering again").then_some(()),
    );
    let hung_log = hr.error_log();

    let (ka_rps, ka_p99) = (median(results[0].0.clone()), median(results[0].1.clone()));
    println!("Workers: {workers}; wrk -t2 -c16 -d{secs}s; {rounds} rounds interleaved (the no-keepalive runs after the others), medians.\n");
    println!("| path | req/s | p99 | vs plain nginx + keepalive | errors |\n|---|---|---|---|---|");
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let rps = median(results[i].0.clone());
        let p99 = median(results[i].1.clone());
        println!(
            "| {name} | {rps:.0} | {p99:.2} ms | {:.2}× throughput, {:.2}× p99 | {} |",
            rps / ka_rps,
            p99 / ka_p99,
            results[i].2
        );
    }
    let (pk_rps, pk_p99) = (median(pinned[0].0.clone()), median(pinned[0].1.clone()));
    println!("\nPinned (wrk -t1 on CPU 0; every nginx and the backends on CPU 1):\n");
    println!("| path | req/s | p99 | vs plain nginx + keepalive | errors |\n|---|---|---|---|---|");
    for (i, (name, _, _)) in pinned_cases.iter().enumerate() {
        let rps = median(pinned[i].0.clone());
        let p99 = median(pinned[i].1.clone());
        println!(
            "| {name} | {rps:.0} | {p99:.2} ms | {:.2}× throughput, {:.2}× p99 | {} |",
            rps / pk_rps,
            p99 / pk_p99,
            pinned[i].2
        );
    }
    println!(
        "\n| measure | value | goal |\n|---|---|---|\n| warden's Redis write → first request through the router that sees it (n={samples}) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | p99 ≤ 5 ms |",
        pct(&mut took, 50.0),
        pct(&mut took, 99.0),
        pct(&mut took, 100.0)
    );
    println!(
        "| router with its Redis answering / stopped (SIGSTOP) for the whole {secs} s run | {base_rps:.0} / {hung_rps:.0} req/s; p99 {base_p99:.2} / {hung_p99:.2} ms ({:.2}×); errors {base_err} / {hung_err} | p99 within 2×, 0 errors |",
        hung_p99 / base_p99
    );
    println!("| error.log lines after the throughput runs | {error_log_lines} | 0 |");
    println!(
        "| error.log lines of the router whose Redis was stopped | {} (\"lost\", then \"answering again\") | one each |",
        hung_log.lines().count()
    );
}
