//! The router (nginx + warden.lua) against a real redis-server and real backends (busybox
//! httpd): routes served from each worker's memory, Redis off the request path, every
//! change followed. Routes are written with warden's own route store (the same script,
//! version bump and publication as `warden run`), or with plain Redis commands as a
//! writer that knows only Redx's model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Commands;
use warden::registrar::entry::Entry;
use warden::registrar::redx::{RedisStore, Routes};
use warden_tests::harness::*;

/// Writes routes as warden does: `servers` per backend, `keys` → backend.
fn write(redis: &Redis, entries: &[Entry]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut routes = Routes::new(RedisStore::new(&redis.url(), None, "router-test").unwrap());
        let want: BTreeSet<Entry> = entries.iter().cloned().collect();
        routes.apply(&want).await.unwrap();
    });
}

fn status_and_body(router: &Router, port: u16, host: &str, path: &str) -> (u16, String) {
    let _ = router;
    http_get(port, host, path).unwrap_or((0, String::new()))
}

fn wait_body(router: &Router, host: &str, path: &str, want: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{host}{path} answered by {want}"),
        || {
            (status_and_body(router, router.port, host, path) == (200, want.to_owned()))
                .then_some(())
        },
    );
}

/// 10,000 requests through host, path and port front-ends: all answered by the right
/// backend, and nginx's error.log stays empty (no line per request, none at all).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_normal_run_leaves_the_error_log_empty() {
    let redis = Redis::start();
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let router = Router::start(&redis);
    let port = free_port();
    router.listen(port);
    write(
        &redis,
        &[
            Entry::server("host", &a.addr()),
            Entry::server("path", &b.addr()),
            Entry::server("port", &c.addr()),
            Entry::key("frontend:web.test", "host"),
            Entry::key("frontend:web.test/api/v1/", "path"),
            Entry::key(&format!("warden:port:{port}"), "port"),
        ],
    );
    let case = |i: usize| match i % 3 {
        0 => (router.port, "/", "a"),
        1 => (router.port, "/api/v1/", "b"),
        _ => (port, "/", "c"),
    };
    // Each nginx worker loads the table on its own (within ms of the publication): one
    // answer proves only the worker that gave it, so wait until 60 in a row are right.
    eventually(
        Duration::from_secs(10),
        "every worker serving the table",
        || {
            (0..60)
                .all(|i| {
                    let (p, path, want) = case(i);
                    status_and_body(&router, p, "WEB.test", path) == (200, want.to_owned())
                })
                .then_some(())
        },
    );
    let mut answers: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for i in 0..10_000 {
        let (p, path, want) = case(i);
        let got = status_and_body(&router, p, "WEB.test", path);
        assert_eq!(
            got,
            (200, want.to_owned()),
            "request {i} to port {p} {path}"
        );
        *answers.entry(got).or_default() += 1;
    }
    assert_eq!(answers.len(), 3, "{answers:?}");
    let log = router.error_log();
    assert!(log.is_empty(), "error.log after 10,000 requests:\n{log}");
}

/// Redis stopped (SIGSTOP) for 10 s under steady load: every request is answered from
/// memory, none waits on Redis (the router's Redis timeout is 500 ms: any request that
/// touched Redis would take at least that), and the loss and the recovery are each said
/// once. The latency ratio against an unpaused run is a benchmark figure.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_hung_redis_costs_no_request_anything() {
    let redis = Redis::start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let router = Router::start(&redis);
    write(
        &redis,
        &[
            Entry::server("web", &a.addr()),
            Entry::server("web", &b.addr()),
            Entry::key("frontend:web.test", "web"),
        ],
    );
    wait_body(&router, "web.test", "/", "a");
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let paused = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failed, during, paused) =
                (stop.clone(), failed.clone(), during.clone(), paused.clone());
            let port = router.port;
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    let ok = matches!(http_get(port, "web.test", "/"), Ok((200, _)));
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    if paused.load(Ordering::SeqCst) {
                        during.lock().unwrap().push(t.elapsed());
                    }
                }
            })
        })
        .collect();
    redis.signal(libc::SIGSTOP);
    paused.store(true, Ordering::SeqCst);
    let started = Instant::now();
    // Ten seconds of load against the stopped Redis, ended by the router's own sign that
    // it noticed (and it must have noticed well within them).
    eventually(Duration::from_secs(10), "the router noticing", || {
        router.error_log().contains(" lost (").then_some(())
    });
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    paused.store(false, Ordering::SeqCst);
    redis.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(10),
        "the router seeing redis back",
        || router.error_log().contains("answering again").then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.join().unwrap();
    }
    let during = during.lock().unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests");
    assert!(
        during.len() > 100,
        "too few requests while paused: {}",
        during.len()
    );
    let slowest = during.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(400),
        "a request waited {slowest:?} while redis was stopped"
    );
    let log = router.error_log();
    assert_eq!(log.matches(" lost (").count(), 1, "{log}");
    assert_eq!(log.matches("answering again").count(), 1, "{log}");
    assert_eq!(log.lines().count(), 2, "{log}");
}

/// Redis killed and restarted empty: traffic keeps flowing from the last table, and once
/// warden has rewritten the routes the router follows the rewrite.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn redis_restarted_empty_keeps_traffic_then_follows_the_rewrite() {
    let mut redis = Redis::start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let router = Router::start(&redis);
    write(
        &redis,
        &[
            Entry::server("web", &a.addr()),
            Entry::key("frontend:web.test", "web"),
        ],
    );
    wait_body(&router, "web.test", "/", "a");
    redis.restart();
    eventually(
        Duration::from_secs(10),
        "the router seeing the empty redis",
        || {
            router
                .error_log()
                .contains("holds no routes version")
                .then_some(())
        },
    );
    for _ in 0..200 {
        assert_eq!(
            status_and_body(&router, router.port, "web.test", "/"),
            (200, "a".to_owned()),
            "served from memory while redis is empty"
        );
    }
    // warden's rewrite (after its verification finds Redis empty), with a new server.
    write(
        &redis,
        &[
            Entry::server("web", &b.addr()),
            Entry::key("frontend:web.test", "web"),
        ],
    );
    wait_body(&router, "web.test", "/", "b");
}

/// A server warden removes gets no request once the router has the new table, and a
/// route written only with plain Redis commands (no version, no publication: stock
/// Redx's API or redis-cli) is served within the safety-net period (5 s).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn removals_are_followed_and_plain_redx_writes_are_picked_up() {
    let redis = Redis::start();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let router = Router::start(&redis);
    let both = [
        Entry::server("web", &a.addr()),
        Entry::server("web", &b.addr()),
        Entry::key("frontend:web.test", "web"),
    ];
    write(&redis, &both);
    eventually(Duration::from_secs(10), "both backends answering", || {
        let seen: BTreeSet<String> = (0..40)
            .map(|_| status_and_body(&router, router.port, "web.test", "/").1)
            .collect();
        (seen.len() == 2).then_some(())
    });
    write(&redis, &both[1..]);
    wait_body(&router, "web.test", "/", "b");
    for _ in 0..500 {
        assert_eq!(
            status_and_body(&router, router.port, "web.test", "/").1,
            "b",
            "a removed server was still given a request"
        );
    }
    let mut c = redis.conn();
    let _: () = c.hset("backend:plain", a.addr(), "0").unwrap();
    let _: () = c.set("frontend:plain.test", "plain").unwrap();
    let t = Instant::now();
    wait_body(&router, "plain.test", "/", "a");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
}

/// Another writer's changes (plain Redis commands, as stock Redx's API or redis-cli
/// make them: no version, no publication) reach the router through the keyspace
/// notifications warden enables on its local Redis — with the router's full reload
/// pushed out to 10 minutes, so that nothing else can deliver them: a new front-end and
/// backend, a server added, a front-end deleted.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn other_writers_changes_are_heard_through_keyspace_notifications() {
    let redis = Redis::start();
    let before: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(before[1], "", "redis-server starts with notifications off");
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let router = Router::start_env(&redis, &[("WARDEN_ROUTER_FULL_RELOAD_MS", "600000")]);
    // warden's first write enables them.
    write(
        &redis,
        &[
            Entry::server("web", &a.addr()),
            Entry::key("frontend:web.test", "web"),
        ],
    );
    wait_body(&router, "web.test", "/", "a");
    let after: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        warden::registrar::redx::notifications_needed(&after[1]).is_none(),
        "{after:?}"
    );

    let mut c = redis.conn();
    let _: () = c.hset("backend:plain", b.addr(), "0").unwrap();
    let _: () = c.set("frontend:plain.test", "plain").unwrap();
    wait_body(&router, "plain.test", "/", "b");
    // A server added by hand to warden's backend is served too.
    let _: () = c.hdel("backend:web", a.addr()).unwrap();
    let _: () = c.hset("backend:web", b.addr(), "0").unwrap();
    wait_body(&router, "web.test", "/", "b");
    let _: () = c.del("frontend:plain.test").unwrap();
    eventually(Duration::from_secs(10), "plain.test removed", || {
        (status_and_body(&router, router.port, "plain.test", "/").0 == 404).then_some(())
    });
    let log = router.error_log();
    assert!(!log.contains("[error]"), "{log}");
}

/// Servers that refuse connections are skipped: every request reaches the live one (the
/// retry takes the next server not yet tried), and a miss gets the fallback's 404.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_request_is_retried_on_the_next_server_and_a_miss_gets_the_fallback() {
    let redis = Redis::start();
    let live = Backend::start("live");
    let router = Router::start(&redis);
    let dead = [free_port(), free_port()];
    write(
        &redis,
        &[
            Entry::server("web", &format!("127.0.0.1:{}", dead[0])),
            Entry::server("web", &format!("127.0.0.1:{}", dead[1])),
            Entry::server("web", &live.addr()),
            Entry::key("frontend:web.test", "web"),
        ],
    );
    wait_body(&router, "web.test", "/", "live");
    for i in 0..300 {
        assert_eq!(
            status_and_body(&router, router.port, "web.test", "/"),
            (200, "live".to_owned()),
            "request {i}"
        );
    }
    let (status, body) = status_and_body(&router, router.port, "nowhere.test", "/x");
    assert_eq!(status, 404);
    assert_eq!(body, "warden: no route for nowhere.test/x");
}
