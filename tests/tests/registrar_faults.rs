//! The registrar under faults: warden killed mid-change, Redis restarted, the Docker
//! socket going away, several networks, bad labels, a reused IP.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use redis::Commands;
use warden_tests::harness::*;

fn servers(redis: &Redis, backend: &str) -> BTreeSet<String> {
    let mut c = redis.conn();
    let all: Vec<String> = c.hkeys(format!("backend:{backend}")).unwrap();
    all.into_iter().filter(|f| !f.starts_with('_')).collect()
}

fn config(redis: &Redis) -> String {
    format!(
        "[host]\ninstance_id = \"i-test\"\n\n[registrar]\nlocal_redis = \"{}\"\nresync_secs = 30\n",
        redis.url()
    )
}

fn addr(cs: &Containers, id: &str) -> String {
    format!("{}:80", cs.ip(id, "bridge"))
}

fn wait_servers(redis: &Redis, backend: &str, want: &BTreeSet<String>) {
    eventually(
        Duration::from_secs(15),
        &format!("backend:{backend} = {want:?}"),
        || (servers(redis, backend) == *want).then_some(()),
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn after_a_sigkill_and_restart_redis_holds_exactly_the_current_containers() {
    let redis = Redis::start();
    let mut warden = Warden::start(&config(&redis), &[]);
    let cs = Containers::new("sigkill");
    let l = [("warden.service", "sk"), ("warden.frontend", "sk.test")];
    let c1 = cs.run("c1", &l, &[]);
    let c2 = cs.run("c2", &l, &[]);
    wait_servers(
        &redis,
        "sk",
        &BTreeSet::from([addr(&cs, &c1), addr(&cs, &c2)]),
    );
    {
        let mut c = redis.conn();
        let _: () = c.hset("backend:sk", "10.98.0.1:80", "0").unwrap(); // another writer's server
    }

    warden.sigkill();
    // Start the new one first, so it cannot be given c1's freed address.
    let c3 = cs.run("c3", &l, &[]);
    let gone = addr(&cs, &c1);
    cs.rm(&c1);
    warden.restart();

    let want = BTreeSet::from([addr(&cs, &c2), addr(&cs, &c3), "10.98.0.1:80".to_string()]);
    wait_servers(&redis, "sk", &want);
    assert!(!servers(&redis, "sk").contains(&gone));
    let mut c = redis.conn();
    let owned: BTreeSet<String> = c.smembers("warden:owned:i-test").unwrap();
    let expect: BTreeSet<String> = [
        format!("[\"s\",\"sk\",\"{}\"]", addr(&cs, &c2)),
        format!("[\"s\",\"sk\",\"{}\"]", addr(&cs, &c3)),
        "[\"k\",\"frontend:sk.test\",\"sk\"]".to_string(),
    ]
    .into();
    assert_eq!(
        owned, expect,
        "warden owns exactly its current entries, not the other writer's"
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_restarted_empty_redis_is_rewritten() {
    let mut redis = Redis::start();
    let _warden = Warden::start(&config(&redis), &[]);
    let cs = Containers::new("redisrestart");
    let c1 = cs.run(
        "c1",
        &[("warden.service", "rr"), ("warden.frontend", "rr.test")],
        &[],
    );
    let want = BTreeSet::from([addr(&cs, &c1)]);
    wait_servers(&redis, "rr", &want);
    redis.restart();
    assert!(servers(&redis, "rr").is_empty());
    wait_servers(&redis, "rr", &want);
    let fe: Option<String> = redis.conn().get("frontend:rr.test").unwrap();
    assert_eq!(fe.as_deref(), Some("rr"));
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn several_networks_route_the_named_one_or_the_first_by_name() {
    let redis = Redis::start();
    let _warden = Warden::start(&config(&redis), &[]);
    let mut cs = Containers::new("nets");
    let alpha = cs.network("alpha");
    let zeta = cs.network("zeta");
    let a = cs.run("a", &[("warden.service", "first")], &["--network", &zeta]);
    let zeta_net = zeta.clone();
    let b = cs.run(
        "b",
        &[("warden.service", "named"), ("warden.network", &zeta_net)],
        &["--network", &zeta],
    );
    for id in [&a, &b] {
        assert!(docker_ok(&["network", "connect", &alpha, id]));
    }
    // A network connect is an event: the container is inspected again.
    wait_servers(
        &redis,
        "first",
        &BTreeSet::from([format!("{}:80", cs.ip(&a, &alpha))]),
    );
    wait_servers(
        &redis,
        "named",
        &BTreeSet::from([format!("{}:80", cs.ip(&b, &zeta))]),
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_container_with_bad_labels_is_skipped_with_a_warning_and_others_are_routed() {
    let redis = Redis::start();
    let warden = Warden::start(&config(&redis), &[]);
    let cs = Containers::new("labels");
    let bad = cs.run(
        "bad",
        &[("warden.service", "lb"), ("warden.port", "eighty")],
        &[],
    );
    let good = cs.run("good", &[("warden.service", "lb")], &[]);
    wait_servers(&redis, "lb", &BTreeSet::from([addr(&cs, &good)]));
    let bad_name = cs.full_name("bad");
    let line = eventually(
        Duration::from_secs(5),
        "a warning naming the container and label",
        || {
            warden
                .log_text()
                .lines()
                .find(|l| {
                    l.contains(&bad_name) && l.contains("warden.port") && l.contains("\"WARN\"")
                })
                .map(str::to_owned)
        },
    );
    assert!(line.contains("eighty"), "{line}");
    assert!(!servers(&redis, "lb").contains(&addr(&cs, &bad)));
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_reused_ip_never_receives_the_old_services_traffic() {
    let redis = Redis::start();
    let router = Router::start(&redis);
    let _warden = Warden::start(
        &format!(
            "{}router_ports_file = {:?}\nrouter_pid_file = {:?}\n",
            config(&redis),
            router.ports_file(),
            router.pid_file()
        ),
        &[],
    );
    let mut cs = Containers::new("ipreuse");
    let net = cs.network("net");
    let a1 = cs.run(
        "a1",
        &[("warden.service", "old"), ("warden.frontend", "old.test")],
        &["--network", &net],
    );
    let ip = cs.ip(&a1, &net);
    wait_servers(&redis, "old", &BTreeSet::from([format!("{ip}:80")]));
    cs.rm(&a1);
    let b1 = cs.run(
        "b1",
        &[("warden.service", "new"), ("warden.frontend", "new.test")],
        &["--network", &net],
    );
    assert_eq!(
        cs.ip(&b1, &net),
        ip,
        "docker gave the freed address to the new container"
    );
    wait_servers(&redis, "new", &BTreeSet::from([format!("{ip}:80")]));
    assert!(servers(&redis, "old").is_empty());
    let (status, body) = http_get(router.port, "old.test", "/").unwrap();
    assert_eq!(
        status, 404,
        "the old service's front-end is gone, not pointing at {body}"
    );
    let (status, body) = http_get(router.port, "new.test", "/").unwrap();
    assert_eq!((status, body), (200, cs.full_name("b1")));
}

/// A stand-in for the Docker daemon's socket that can be cut and restored: cutting it
/// breaks warden's event stream exactly as a daemon restart does.
struct SocketProxy {
    path: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SocketProxy {
    fn start(path: PathBuf) -> SocketProxy {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(async move {
                    if let Ok(mut daemon) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                });
            }
        });
        SocketProxy {
            path,
            task: Some(task),
        }
    }

    /// Drops every connection and the listener.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn the_docker_stream_breaking_reconnects_and_resyncs() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let mut proxy = SocketProxy::start(sock.clone());
    let warden = Warden::start(
        &config(&redis),
        &[("DOCKER_HOST".into(), format!("unix://{}", sock.display()))],
    );
    let cs = Containers::new("reconnect");
    let c1 = cs.run("c1", &[("warden.service", "rc")], &[]);
    let want1 = BTreeSet::from([addr(&cs, &c1)]);
    tokio::task::block_in_place(|| wait_servers(&redis, "rc", &want1));

    proxy.cut();
    // While Docker is away: routes are kept, containers change unseen. The check follows
    // warden's own sign that it lost Docker and failed to reach it again.
    let c2 = cs.run("c2", &[("warden.service", "rc")], &[]);
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(10),
            "warden failing to reach docker",
            || {
                warden
                    .log_text()
                    .contains("docker not answering")
                    .then_some(())
            },
        )
    });
    assert_eq!(
        servers(&redis, "rc"),
        want1,
        "routes are kept while docker is unreachable"
    );
    let _proxy = SocketProxy::start(sock.clone());
    let want2 = BTreeSet::from([addr(&cs, &c1), addr(&cs, &c2)]);
    tokio::task::block_in_place(|| wait_servers(&redis, "rc", &want2));
    let log = warden.log_text();
    assert!(log.contains("docker event stream"), "{log}");
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_container_with_a_healthcheck_is_routed_only_while_healthy() {
    let redis = Redis::start();
    let _warden = Warden::start(&config(&redis), &[]);
    let cs = Containers::new("health");
    // Healthy once /www/ok exists; the test creates and removes it.
    let id = cs.run(
        "h",
        &[("warden.service", "hc")],
        &[
            "--health-cmd",
            "test -f /www/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
    let member = addr(&cs, &id);
    // warden's account shows it saw the container and why it is not routed.
    let seen = wait_account_container(&redis, "i-test", &cs.full_name("h"));
    assert_eq!(seen["not_routed"], "health: starting", "{seen}");
    assert!(
        servers(&redis, "hc").is_empty(),
        "not routed while its health is starting"
    );
    assert!(docker_ok(&["exec", &id, "sh", "-c", "echo > /www/ok"]));
    wait_servers(&redis, "hc", &BTreeSet::from([member.clone()]));
    assert!(docker_ok(&["exec", &id, "sh", "-c", "rm /www/ok"]));
    wait_servers(&redis, "hc", &BTreeSet::new());
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn file_defined_services_match_by_image_and_name_and_follow_the_file() {
    let redis = Redis::start();
    let cs = Containers::new("filesvc");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.toml");
    let pattern = format!("{}-*", cs.tag);
    std::fs::write(
        &file,
        format!("[[services]]\nname = \"fs\"\nfrontends = [\"fs.test\"]\nmatch = {{ image = \"warden-test/busybox\", name = {pattern:?} }}\n"),
    )
    .unwrap();
    let _warden = Warden::start(
        &format!(
            "{}\n[[registrar.sources]]\nplugin = \"file-services\"\nconfig = {{ path = {:?} }}\n",
            config(&redis),
            file
        ),
        &[],
    );
    let id = cs.run("one", &[], &[]);
    wait_servers(&redis, "fs", &BTreeSet::from([addr(&cs, &id)]));
    let fe: Option<String> = redis.conn().get("frontend:fs.test").unwrap();
    assert_eq!(fe.as_deref(), Some("fs"));
    // A bad edit keeps the routes; a good one moves the front-end.
    let tmp = dir.path().join("tmp");
    std::fs::write(&tmp, "[[services]\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(servers(&redis, "fs"), BTreeSet::from([addr(&cs, &id)]));
    std::fs::write(
        &tmp,
        format!("[[services]]\nname = \"fs\"\nfrontends = [\"fs2.test\"]\nmatch = {{ image = \"warden-test/busybox\", name = {pattern:?} }}\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(
        Duration::from_secs(10),
        "front-end moved to fs2.test",
        || {
            let a: Option<String> = redis.conn().get("frontend:fs2.test").unwrap();
            let b: Option<String> = redis.conn().get("frontend:fs.test").unwrap();
            (a.as_deref() == Some("fs") && b.is_none()).then_some(())
        },
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_router_can_balance_round_robin() {
    let redis = Redis::start();
    let router = Router::start_with(&redis, "round-robin");
    let _warden = Warden::start(&config(&redis), &[]);
    let cs = Containers::new("rr");
    let l = [("warden.service", "rrsvc"), ("warden.frontend", "rr.test")];
    let a = cs.run("a", &l, &[]);
    let b = cs.run("b", &l, &[]);
    wait_servers(
        &redis,
        "rrsvc",
        &BTreeSet::from([addr(&cs, &a), addr(&cs, &b)]),
    );
    let bodies: Vec<String> = (0..10)
        .map(|_| http_get(router.port, "rr.test", "/").unwrap().1)
        .collect();
    for w in bodies.windows(2) {
        assert_ne!(w[0], w[1], "round-robin alternates: {bodies:?}");
    }
    assert_eq!(
        bodies.iter().filter(|b| **b == cs.full_name("a")).count(),
        5,
        "{bodies:?}"
    );
}
