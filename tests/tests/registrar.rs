//! The registrar end to end: real Docker containers, redis-server, nginx with warden's
//! router, moto_server for the ELB, and the `warden` binary.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

const INSTANCE: &str = "i-0123456789abcdef0";

fn servers(redis: &Redis, backend: &str) -> BTreeSet<String> {
    let mut c = redis.conn();
    let all: Vec<String> = c.hkeys(format!("backend:{backend}")).unwrap();
    all.into_iter().filter(|f| !f.starts_with('_')).collect()
}

fn get(redis: &Redis, key: &str) -> Option<String> {
    redis.conn().get(key).unwrap()
}

fn config(redis: &Redis, router: Option<&Router>, resync: u64) -> String {
    let mut c = format!(
        "[host]\ninstance_id = \"{INSTANCE}\"\n\n[registrar]\nlocal_redis = \"{}\"\nresync_secs = {resync}\n",
        redis.url()
    );
    if let Some(r) = router {
        c.push_str(&format!(
            "router_ports_file = {:?}\nrouter_pid_file = {:?}\n",
            r.ports_file(),
            r.pid_file()
        ));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn containers_are_routed_through_the_router_drained_before_exit_and_the_elb_follows() {
    let redis = Redis::start();
    let router = Router::start(&redis);
    let moto = Moto::start();
    moto.create_elb("web-elb", 8001).await;
    // Keys written by someone else must survive everything warden does.
    {
        let mut c = redis.conn();
        let _: () = c.set("frontend:other.test", "other").unwrap();
        let _: () = c.hset("backend:other", "10.99.0.1:80", "0").unwrap();
    }
    let fport = warden_tests::harness::free_port();
    let warden = Warden::start(&config(&redis, Some(&router), 30), &moto.env());
    let cs = Containers::new("route");
    let labels = [
        ("warden.service", "web"),
        ("warden.frontend", "web.test"),
        ("warden.elb", "web-elb"),
        ("warden.drain", "1"),
    ];
    let fport_s = fport.to_string();
    let mut all_labels = labels.to_vec();
    all_labels.push(("warden.frontend-port", &fport_s));
    let ids: Vec<String> = (1..=3)
        .map(|i| cs.run(&format!("web{i}"), &all_labels, &[]))
        .collect();
    let ips: Vec<String> = ids.iter().map(|id| cs.ip(id, "bridge")).collect();
    let want: BTreeSet<String> = ips.iter().map(|ip| format!("{ip}:80")).collect();
    eventually(
        Duration::from_secs(15),
        "three servers in backend:web",
        || (servers(&redis, "web") == want).then_some(()),
    );
    assert_eq!(get(&redis, "frontend:web.test").as_deref(), Some("web"));
    assert_eq!(
        get(&redis, &format!("warden:port:{fport}")).as_deref(),
        Some("web")
    );

    // The router serves the port front-end once warden has written its listen line.
    eventually(
        Duration::from_secs(10),
        "router listening on the service port",
        || std::net::TcpStream::connect(("127.0.0.1", fport)).ok(),
    );
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let (status, body) = http_get(fport, "anything", "/").unwrap();
        assert_eq!(status, 200, "{body}");
        seen.insert(body);
    }
    let names: BTreeSet<String> = (1..=3).map(|i| cs.full_name(&format!("web{i}"))).collect();
    assert_eq!(seen, names, "requests spread over every container");
    // And the host front-end on the router's main port.
    let (status, body) = http_get(router.port, "WEB.test", "/").unwrap();
    assert_eq!(status, 200);
    assert!(names.contains(&body), "{body}");
    let (status, _) = http_get(router.port, "nobody.test", "/").unwrap();
    assert_eq!(status, 404, "a miss goes to the fallback");

    eventually(
        Duration::from_secs(15),
        "instance registered in web-elb",
        || {
            let members = futures_block(moto.elb_members("web-elb"));
            (members == vec![INSTANCE.to_string()]).then_some(())
        },
    );

    // docker stop: the container leaves its backend at once, while it still runs (its
    // PID 1 ignores SIGTERM, so docker waits the full 5 s before SIGKILL).
    let mut stopping = cs.stop_async(&ids[0], 5);
    eventually(Duration::from_secs(2), "stopped container removed", || {
        (!servers(&redis, "web").contains(&format!("{}:80", ips[0]))).then_some(())
    });
    assert!(cs.running(&ids[0]), "removed before it exited");
    for _ in 0..20 {
        let (status, body) = http_get(fport, "x", "/").unwrap();
        assert_eq!(status, 200);
        assert_ne!(
            body,
            cs.full_name("web1"),
            "no request reaches a stopping container"
        );
    }
    stopping.wait().unwrap();

    // The rest go: every key of the service goes, the ELB is left after the drain.
    let mut rest: Vec<_> = ids[1..].iter().map(|id| cs.stop_async(id, 1)).collect();
    eventually(Duration::from_secs(5), "backend:web gone", || {
        servers(&redis, "web").is_empty().then_some(())
    });
    assert_eq!(get(&redis, "frontend:web.test"), None);
    assert_eq!(get(&redis, &format!("warden:port:{fport}")), None);
    for p in rest.iter_mut() {
        p.wait().unwrap();
    }
    eventually(
        Duration::from_secs(15),
        "instance deregistered from web-elb",
        || {
            futures_block(moto.elb_members("web-elb"))
                .is_empty()
                .then_some(())
        },
    );
    assert_eq!(get(&redis, "frontend:other.test").as_deref(), Some("other"));
    assert_eq!(
        servers(&redis, "other"),
        BTreeSet::from(["10.99.0.1:80".to_string()])
    );
    assert!(
        !warden.log_text().contains("\"level\":\"ERROR\""),
        "{}",
        warden.log_text()
    );
}

/// Runs a future to completion from a synchronous polling closure.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
