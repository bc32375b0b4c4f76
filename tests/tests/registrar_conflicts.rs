//! Routes that stay right when Redis is changed by someone else or two services want the
//! same thing: real Docker containers, redis-server, nginx with warden's router, and the
//! `warden` binary. What is asserted is read back from Redis or through the router.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

fn servers(redis: &Redis, backend: &str) -> BTreeSet<String> {
    let all: Vec<String> = redis.conn().hkeys(format!("backend:{backend}")).unwrap();
    all.into_iter().filter(|f| !f.starts_with('_')).collect()
}

fn get(redis: &Redis, key: &str) -> Option<String> {
    redis.conn().get(key).unwrap()
}

fn config(redis: &Redis, instance: &str) -> String {
    format!(
        "[host]\ninstance_id = \"{instance}\"\n[registrar]\nlocal_redis = \"{}\"\nresync_secs = 30\n",
        redis.url()
    )
}

fn addr(cs: &Containers, id: &str) -> String {
    format!("{}:80", cs.ip(id, "bridge"))
}

fn wait_key(redis: &Redis, key: &str, want: Option<&str>) {
    eventually(
        Duration::from_secs(15),
        &format!("{key} = {want:?}"),
        || (get(redis, key).as_deref() == want).then_some(()),
    );
}

/// A later service claiming a held front-end and front-end port is refused, said once
/// with both services and containers, and shown in warden's account; after a restart the
/// holder still holds them; when the holder goes, the claimant gets them at once.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_takeover_is_refused_survives_a_restart_and_the_claimant_follows_the_holder() {
    let redis = Redis::start();
    let mut w = Warden::start(&config(&redis, "i-conf"), &[]);
    let cs = Containers::new("takeover");
    let web = cs.run(
        "web",
        &[
            ("warden.service", "p-web"),
            ("warden.frontend", "p-web.example"),
            ("warden.frontend-port", "18601"),
        ],
        &[],
    );
    wait_key(&redis, "frontend:p-web.example", Some("p-web"));
    wait_key(&redis, "warden:port:18601", Some("p-web"));
    let evil = cs.run(
        "evil",
        &[
            ("warden.service", "zz-evil"),
            ("warden.frontend", "p-web.example"),
            ("warden.frontend-port", "18601"),
        ],
        &[],
    );
    let line = wait_log(
        &w,
        "the refusal logged",
        &[
            "WARN",
            "front-end p-web.example belongs to service",
            "zz-evil",
        ],
    );
    assert!(
        line.contains(&cs.full_name("web")) && line.contains(&cs.full_name("evil")),
        "{line}"
    );
    wait_log(
        &w,
        "the port refusal logged",
        &["WARN", "front-end port 18601 belongs to service", "zz-evil"],
    );
    // zz-evil's own servers are routed; the keys stay p-web's.
    eventually(Duration::from_secs(10), "zz-evil's server", || {
        servers(&redis, "zz-evil")
            .contains(&addr(&cs, &evil))
            .then_some(())
    });
    assert_eq!(
        get(&redis, "frontend:p-web.example").as_deref(),
        Some("p-web")
    );
    assert_eq!(get(&redis, "warden:port:18601").as_deref(), Some("p-web"));
    let conflicts = account(&redis, "i-conf")["conflicts"].clone();
    assert_eq!(conflicts.as_array().map(Vec::len), Some(2), "{conflicts}");
    assert_eq!(conflicts[0]["holder"], "p-web");
    assert_eq!(conflicts[0]["refused"], "zz-evil");
    // `warden routes` shows the table and the refusal.
    let out = std::process::Command::new(warden_tests::warden_bin())
        .args(["routes"])
        .env("WARDEN_LOCAL_REDIS", redis.url())
        .env_remove("WARDEN_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("p-web.example ")
            && l.contains("p-web")
            && l.contains(&format!("({})", cs.full_name("web")))),
        "{text}"
    );
    assert!(
        text.contains("p-web.example: held by p-web") && text.contains("refused to zz-evil"),
        "{text}"
    );

    // A restart reads back who holds what: still p-web.
    w.sigkill();
    w.restart();
    let n = w.log_text().matches("registrar ready").count();
    assert_eq!(n, 2);
    assert_eq!(
        get(&redis, "frontend:p-web.example").as_deref(),
        Some("p-web")
    );
    assert_eq!(get(&redis, "warden:port:18601").as_deref(), Some("p-web"));

    // The holder goes: the claimant gets both in the same reconcile.
    cs.rm(&web);
    wait_key(&redis, "frontend:p-web.example", Some("zz-evil"));
    wait_key(&redis, "warden:port:18601", Some("zz-evil"));
    assert_eq!(
        account(&redis, "i-conf")["conflicts"],
        serde_json::json!([])
    );
}

/// Front-end keys and server fields deleted or changed in Redis behind warden's back are
/// back within one verification period (2 s), without any container changing.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn drift_is_repaired_key_by_key() {
    let redis = Redis::start();
    let w = Warden::start(&config(&redis, "i-drift"), &[]);
    let cs = Containers::new("drift");
    let id = cs.run(
        "web",
        &[
            ("warden.service", "d-web"),
            ("warden.frontend", "d-web.example,d-web.example/api"),
        ],
        &[],
    );
    let member = addr(&cs, &id);
    wait_key(&redis, "frontend:d-web.example/api/", Some("d-web"));
    let mut c = redis.conn();
    let _: () = c.del("frontend:d-web.example").unwrap();
    let _: () = c.hdel("backend:d-web", &member).unwrap();
    let _: () = c
        .set("frontend:d-web.example/api/", "someone-else")
        .unwrap();
    wait_key(&redis, "frontend:d-web.example", Some("d-web"));
    wait_key(&redis, "frontend:d-web.example/api/", Some("d-web"));
    eventually(Duration::from_secs(5), "the server field back", || {
        servers(&redis, "d-web").contains(&member).then_some(())
    });
    wait_log(&w, "the repair logged", &["WARN", "drifted", "rewritten"]);
    // And after a Redis restart (empty), everything is rewritten too.
    drop(c);
}

/// A front-end written by hand before warden wanted it is never touched: not replaced
/// while warden's container claims it, not deleted when the container leaves.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_hand_written_frontend_is_left_alone() {
    let redis = Redis::start();
    let _: () = redis
        .conn()
        .set("frontend:hand.example", "handmade")
        .unwrap();
    let w = Warden::start(&config(&redis, "i-hand"), &[]);
    let cs = Containers::new("hand");
    let id = cs.run(
        "web",
        &[
            ("warden.service", "h-web"),
            ("warden.frontend", "hand.example"),
        ],
        &[],
    );
    eventually(Duration::from_secs(10), "the server routed", || {
        servers(&redis, "h-web")
            .contains(&addr(&cs, &id))
            .then_some(())
    });
    wait_log(
        &w,
        "the blocked key logged",
        &[
            "WARN",
            "frontend:hand.example holds",
            "handmade",
            "leaves it alone",
        ],
    );
    assert_eq!(
        get(&redis, "frontend:hand.example").as_deref(),
        Some("handmade")
    );
    let blocked = account(&redis, "i-hand")["blocked"].clone();
    assert_eq!(blocked[0]["key"], "frontend:hand.example", "{blocked}");
    cs.rm(&id);
    eventually(Duration::from_secs(10), "the server gone", || {
        servers(&redis, "h-web").is_empty().then_some(())
    });
    assert_eq!(
        get(&redis, "frontend:hand.example").as_deref(),
        Some("handmade")
    );
}

/// Two wardens on one Redis with the same service and front-end (each routing its own
/// containers): while either has a server, the host never answers 404 through the router.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn two_wardens_sharing_a_service_never_leave_it_without_its_frontend() {
    let redis = Redis::start();
    let router = Router::start(&redis);
    let cs = Containers::new("shared");
    let group = |g: &str| format!("{}-{g}", cs.tag);
    let cfg = |inst: &str, g: &str| {
        format!(
            "{}require_label = \"warden-share={}\"\n",
            config(&redis, inst),
            group(g)
        )
    };
    let _a = Warden::start(&cfg("i-share-a", "a"), &[]);
    let _b = Warden::start(&cfg("i-share-b", "b"), &[]);
    let labels = |g: &str| {
        vec![
            ("warden.service".to_owned(), "s-web".to_owned()),
            ("warden.frontend".to_owned(), "s-web.example".to_owned()),
            ("warden-share".to_owned(), group(g)),
        ]
    };
    let la = labels("a");
    let lb = labels("b");
    let ca = cs.run("a1", &as_refs(&la), &[]);
    let cb = cs.run("b1", &as_refs(&lb), &[]);
    fn as_refs(l: &[(String, String)]) -> Vec<(&str, &str)> {
        l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
    let both = BTreeSet::from([addr(&cs, &ca), addr(&cs, &cb)]);
    eventually(Duration::from_secs(15), "both servers", || {
        (servers(&redis, "s-web") == both).then_some(())
    });
    wait_key(&redis, "frontend:s-web.example", Some("s-web"));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, not_found) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, not_found) = (stop.clone(), ok.clone(), not_found.clone());
        let port = router.port;
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match http_get(port, "s-web.example", "/") {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::SeqCst),
                    Ok((404, _)) => not_found.fetch_add(1, Ordering::SeqCst),
                    _ => 0,
                };
            }
        })
    };
    // A's container goes: A removes its server, and the front-end stays for B's.
    cs.rm(&ca);
    let only_b = BTreeSet::from([addr(&cs, &cb)]);
    eventually(Duration::from_secs(15), "only B's server", || {
        (servers(&redis, "s-web") == only_b).then_some(())
    });
    // Three verification periods of A and B after that.
    let before = ok.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(20),
        "requests after A's container left",
        || (ok.load(Ordering::SeqCst) > before + 200).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert_eq!(
        get(&redis, "frontend:s-web.example").as_deref(),
        Some("s-web")
    );
    assert_eq!(
        not_found.load(Ordering::SeqCst),
        0,
        "404s while B still had a server ({} answered 200)",
        ok.load(Ordering::SeqCst)
    );
    // B's goes too: now the front-end goes with the last server.
    cs.rm(&cb);
    wait_key(&redis, "frontend:s-web.example", None);
}

/// Front-end labels with a tab, a newline, `*`, `..`, a 300-character host or a 10 kB
/// value are refused: one warning naming the container, the label and the value (a long
/// one elided); nothing of them in Redis.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn malformed_frontends_are_refused_by_name() {
    let redis = Redis::start();
    let w = Warden::start(&config(&redis, "i-bad"), &[]);
    let cs = Containers::new("badfe");
    let long = format!("{}.example", "a".repeat(300));
    let huge = format!("{}.example", "h".repeat(10_000));
    let cases = [
        ("huge", huge.as_str()),
        ("tab", "p-web.example/x\tzz-evil"),
        ("nl", "p-web.example/x\nzz"),
        ("star", "*.example.com"),
        ("dots", "bad.example/../admin"),
        ("long", long.as_str()),
    ];
    for (name, value) in cases {
        cs.run(
            name,
            &[("warden.service", "b-web"), ("warden.frontend", value)],
            &[],
        );
    }
    let good = cs.run(
        "good",
        &[
            ("warden.service", "b-ok"),
            ("warden.frontend", "ok.example"),
        ],
        &[],
    );
    wait_key(&redis, "frontend:ok.example", Some("b-ok"));
    for (name, _) in cases {
        wait_log(
            &w,
            &format!("the refusal of {name}"),
            &[
                "WARN",
                &cs.full_name(name),
                "label warden.frontend",
                "container skipped",
            ],
        );
    }
    let keys: Vec<String> = redis.conn().keys("frontend:*").unwrap();
    assert_eq!(keys, vec!["frontend:ok.example".to_owned()]);
    // The 10 kB value is named by its size and a prefix, never written whole.
    let log = w.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&cs.full_name("huge")))
        .unwrap();
    assert!(
        line.len() < 1000 && line.contains("10008 bytes"),
        "{} bytes: {line:.300}",
        line.len()
    );
    assert!(
        log.lines().all(|l| l.len() < 4096),
        "a log line of more than 4 kB"
    );
    let _ = good;
}
