//! How soon a route written to the local Redis is served by the router (nginx +
//! warden.lua, default settings: full reload every 5 s): written by warden's own route
//! store (version, publication) and by another writer with plain commands (as stock
//! Redx's API or redis-cli do; heard through keyspace notifications). Each sample is a
//! new front-end, timed from the write's reply to the first answer of its backend
//! (polled every 2 ms). Run: `cargo run -q -p warden-bench --bin route_latency -- 20`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use warden::registrar::entry::Entry;
use warden::registrar::redx::{RedisStore, Routes};
use warden_tests::harness::*;

fn served(router: &Router, host: &str, want: &str) -> Duration {
    let t = Instant::now();
    loop {
        if http_get(router.port, host, "/").is_ok_and(|r| r == (200, want.to_owned())) {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{host} never served");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "| {name} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
        v.len(),
        ms(p(0.5)),
        ms(p(0.99)),
        ms(*v.last().unwrap())
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let redis = Redis::start();
    let backend = Backend::start("b");
    let router = Router::start(&redis);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut routes = Routes::new(RedisStore::new(&redis.url(), None, "bench").unwrap());
    let mut want: BTreeSet<Entry> = BTreeSet::from([Entry::server("own", &backend.addr())]);
    let mut own = Vec::new();
    for i in 0..n {
        want.insert(Entry::key(&format!("frontend:own{i}.test"), "own"));
        rt.block_on(routes.apply(&want)).unwrap();
        own.push(served(&router, &format!("own{i}.test"), "b"));
    }
    let mut c = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("backend:plain")
        .arg(backend.addr())
        .arg("0")
        .query(&mut c)
        .unwrap();
    let mut outside = Vec::new();
    for i in 0..n {
        let _: () = redis::cmd("SET")
            .arg(format!("frontend:plain{i}.test"))
            .arg("plain")
            .query(&mut c)
            .unwrap();
        outside.push(served(&router, &format!("plain{i}.test"), "b"));
        // Not in step with the 5 s safety net: spread over it.
        std::thread::sleep(Duration::from_millis(137));
    }
    // The same with notifications off (a Redis where CONFIG is not allowed): only the
    // router's 5 s full reload picks the write up, as before.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query(&mut c)
        .unwrap();
    let mut off = Vec::new();
    for i in 0..n.min(10) {
        let _: () = redis::cmd("SET")
            .arg(format!("frontend:off{i}.test"))
            .arg("plain")
            .query(&mut c)
            .unwrap();
        off.push(served(&router, &format!("off{i}.test"), "b"));
        std::thread::sleep(Duration::from_millis(137));
    }
    println!("| written by | n | median | p99 | max |\n|---|---|---|---|---|");
    summary("warden (route store)", own);
    summary("another writer (plain SET)", outside);
    summary("another writer, notifications off", off);
}
