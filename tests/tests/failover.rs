//! The central store fails over, with hosts as network namespaces (`tests/cluster.rs`):
//! each warden, each Redis node and each Sentinel has its own address, and partitions
//! are cut with iptables between chosen pairs (packets dropped, connections left
//! half-open). Every scenario is counted at moto, by the epoch every ECS call carries:
//! no call of an older epoch after a newer epoch's first call, tasks never above max,
//! and a leader acting again within the stated bound.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden_tests::cluster::{Host, Net};
use warden_tests::harness::*;

const MAX: u32 = 6;
const LEASE: Duration = Duration::from_millis(2000);
const GUARD: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(250);

fn conn(ip: &str, port: u16) -> Option<redis::Connection> {
    let c = redis::Client::open(format!("redis://{ip}:{port}")).ok()?;
    let c = c
        .get_connection_with_timeout(Duration::from_millis(300))
        .ok()?;
    c.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    Some(c)
}

/// The lease on the Redis at `ip`: (holder, epoch).
fn lease(ip: &str) -> Option<(String, u64)> {
    let v: Option<String> = redis::cmd("GET")
        .arg("warden:leader")
        .query(&mut conn(ip, 6379)?)
        .ok()?;
    let v = v?;
    let mut it = v.split('\t');
    Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
}

/// The heartbeat's time on the Redis at `ip` (ms), and that Redis's clock.
fn heartbeat_and_now(ip: &str) -> Option<(u64, u64)> {
    let mut c = conn(ip, 6379)?;
    let hb: Option<u64> = redis::cmd("HGET")
        .arg("warden:heartbeat")
        .arg("time_ms")
        .query(&mut c)
        .ok()?;
    let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut c).ok()?;
    Some((hb.unwrap_or(0), s * 1000 + us / 1000))
}

fn redis_cmd(ip: &str, port: u16, args: &[&str]) -> String {
    let mut c = conn(ip, port).unwrap_or_else(|| panic!("{ip}:{port}"));
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let v: redis::Value = cmd.query(&mut c).unwrap();
    format!("{v:?}")
}

fn replication_up(ip: &str) -> bool {
    let Some(mut c) = conn(ip, 6379) else {
        return false;
    };
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut c)
        .unwrap_or_default();
    info.contains("master_link_status:up")
}

/// Flips the metric between 2 and 5 every 700 ms, so that whoever leads keeps calling
/// ECS (up, then down), until dropped.
struct Flipper(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Flipper {
    fn start(path: std::path::PathBuf) -> Flipper {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut up = false;
            while !s.load(Ordering::SeqCst) {
                up = !up;
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, if up { "5" } else { "2" }).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        Flipper(stop, Some(t))
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

fn config(id: &str, central: &str, metric: &std::path::Path, min_replicas: u32) -> String {
    format!(
        "[host]\ninstance_id = \"{id}\"\navailability_zone = \"eu-west-1a\"\n\
         [registrar]\nenabled = false\n\
         [manager]\ncentral_redis = \"{central}\"\ncentral_min_replicas = {min_replicas}\nloop_secs = 1\n\
         [metrics.m]\nplugin = \"test-chaos\"\nconfig = {{ sequence = [\"file:{}\"] }}\n\
         [[manager.services]]\nname = \"web\"\ncluster = \"c1\"\ntask_definition = \"web\"\nmetric = \"m\"\n\
         mapping = {{ target_per_task = 1.0 }}\npolicy = {{ max = {MAX}, scale_down_window_secs = 0 }}\n",
        metric.display()
    )
}

/// Three wardens, each in a host of its own, reaching AWS at moto on the bridge.
/// moto on the bridge's address with a cluster `c1` of room for 6 `web` tasks, and the
/// metric file the wardens read (3: three tasks).
fn moto_and_metric(net: &Net, dir: &std::path::Path) -> (Moto, std::path::PathBuf) {
    let moto = Moto::start_on(&net.gateway);
    moto.fixture(&["ecs-setup", "c1", "web", "6"]);
    let metric = dir.join("metric");
    std::fs::write(&metric, "3").unwrap();
    (moto, metric)
}

fn wardens(
    net: &mut Net,
    moto: &Moto,
    central: &str,
    metric: &std::path::Path,
    min_replicas: u32,
    names: &[(&str, &str)],
) -> (Vec<Host>, Vec<Warden>) {
    let mut hosts = Vec::new();
    let mut ws = Vec::new();
    for i in 0..3 {
        let h = net.host(&format!("w{i}"));
        h.set_hosts(names);
        let id = format!("i-w{i}");
        let env = Moto::env_for(&moto.endpoint(), &format!("key-w{i}"));
        ws.push(Warden::start_in(
            Some(&h.ns),
            &config(&id, central, metric, min_replicas),
            &env,
        ));
        hosts.push(h);
    }
    (hosts, ws)
}

/// Calls of the recording made after index `from`, and the epochs among them.
fn epochs_after(moto: &Moto, from: usize) -> Vec<u64> {
    let mut e: Vec<u64> = moto.recorded()[from..]
        .iter()
        .filter_map(|r| r.epoch)
        .collect();
    e.sort();
    e.dedup();
    e
}

fn assert_single_leader_at_moto(moto: &Moto) {
    let rec = moto.recorded();
    let late = late_calls(&rec);
    assert!(
        late.is_empty(),
        "calls of a deposed epoch after its successor's first call: {late:?}"
    );
}

fn tasks(moto: &Moto) -> u32 {
    moto.fixture(&["ecs-count", "c1", "web", "warden-web"])
        .parse()
        .unwrap()
}

/// Waits for the first leader's three tasks.
fn leader_tasks(net: &Net, moto: &Moto, ws: &[Warden]) {
    watched(
        net,
        ws,
        Duration::from_secs(30),
        "the leader's tasks",
        || (tasks(moto) == 3).then_some(()),
    );
}

/// [`eventually`], but a timeout's panic carries what the network and each warden
/// looked like (the last lines of each log).
fn watched<T>(
    net: &Net,
    ws: &[Warden],
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = ws
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let text = w.log_text();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    format!("===== warden {i}\n{}", tail.join("\n"))
                })
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for: {what}\n{}\n{}",
                net.diagnose(),
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The primary is black-holed (its connections left half-open, nothing answers, nothing
/// is closed), its replica promoted and the name re-pointed to it: a leader renews on
/// the new primary within lease + guard + one tick, and no deposed epoch acts.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_black_holed_primary_and_a_re_pointed_name_give_a_leader_again_in_bound() {
    let mut net = Net::new();
    let p = net.host("p");
    let r = net.host("r");
    net.redis(&p, &[]);
    net.redis(&r, &["--replicaof", &p.ip, "6379"]);
    eventually(Duration::from_secs(20), "replication", || {
        replication_up(&r.ip).then_some(())
    });
    let dir = tempfile::tempdir().unwrap();
    let (moto, metric) = moto_and_metric(&net, dir.path());
    let (hosts, ws) = wardens(
        &mut net,
        &moto,
        "redis://central.test:6379",
        &metric,
        0,
        &[("central.test", &p.ip)],
    );
    let (lead, epoch) = watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "a leader on the primary",
        || lease(&p.ip),
    );
    leader_tasks(&net, &moto, &ws);
    let _flip = Flipper::start(metric.clone());
    std::thread::sleep(Duration::from_secs(2));

    p.black_hole();
    redis_cmd(&r.ip, 6379, &["REPLICAOF", "NO", "ONE"]);
    for h in &hosts {
        h.set_hosts(&[("central.test", &r.ip)]);
    }
    let repointed = Instant::now();
    let (_, r_now) = heartbeat_and_now(&r.ip).unwrap();
    let from = moto.recorded().len();
    watched(
        &net,
        &ws,
        Duration::from_secs(20),
        "a leader renewing on the new primary",
        || {
            let (hb, _) = heartbeat_and_now(&r.ip)?;
            (hb > r_now && lease(&r.ip).is_some()).then_some(())
        },
    );
    let took = repointed.elapsed();
    eprintln!("leader {lead} (epoch {epoch}) black-holed; a leader renews on the new primary {took:?} after the re-point");
    assert!(
        took <= LEASE + GUARD + TICK,
        "a leader again after {took:?}"
    );
    // It acts: ECS calls after the re-point, none of a deposed epoch after its successor.
    watched(
        &net,
        &ws,
        Duration::from_secs(20),
        "ECS calls after the failover",
        || (!epochs_after(&moto, from).is_empty()).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_single_leader_at_moto(&moto);
    assert!(tasks(&moto) <= MAX);
}

/// Split brain: the old leader still reaches the old primary, which is cut off from its
/// replicas; the other hosts reach only the promoted replica. With central_min_replicas
/// = 1 the old primary cannot acknowledge the old leader's renewals or fences, so it
/// stops before its lease could have run out on the promoted replica, and the new
/// leader's calls are never interleaved with the old one's (counted at moto).
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn split_brain_is_fenced_by_replica_acknowledgements() {
    let mut net = Net::new();
    let p = net.host("p");
    let r1 = net.host("r1");
    let r2 = net.host("r2");
    net.redis(&p, &[]);
    net.redis(&r1, &["--replicaof", &p.ip, "6379"]);
    net.redis(&r2, &["--replicaof", &p.ip, "6379"]);
    for r in [&r1, &r2] {
        eventually(Duration::from_secs(20), "replication", || {
            replication_up(&r.ip).then_some(())
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let (moto, metric) = moto_and_metric(&net, dir.path());
    let (hosts, ws) = wardens(
        &mut net,
        &moto,
        "redis://central.test:6379",
        &metric,
        1,
        &[("central.test", &p.ip)],
    );
    let (lead, old_epoch) = watched(&net, &ws, Duration::from_secs(30), "a leader", || {
        lease(&p.ip)
    });
    leader_tasks(&net, &moto, &ws);
    let _flip = Flipper::start(metric.clone());
    std::thread::sleep(Duration::from_secs(2));

    let li: usize = lead.trim_start_matches("i-w").parse().unwrap();
    // The old primary and its old leader on one side, everything else on the other.
    for ip in [&r1.ip, &r2.ip] {
        p.cut(ip);
        hosts[li].cut(ip);
    }
    for (i, h) in hosts.iter().enumerate() {
        if i != li {
            h.cut(&p.ip);
            h.set_hosts(&[("central.test", &r1.ip)]);
        }
    }
    redis_cmd(&r1.ip, 6379, &["REPLICAOF", "NO", "ONE"]);
    redis_cmd(&r2.ip, 6379, &["REPLICAOF", &r1.ip, "6379"]);
    let cut = Instant::now();
    let (new_lead, new_epoch) = watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "a new leader on the promoted replica",
        || lease(&r1.ip).filter(|(id, e)| *e > old_epoch && *id != lead),
    );
    eprintln!("old leader {lead} (epoch {old_epoch}); {new_lead} leads with epoch {new_epoch} {:?} after the cut", cut.elapsed());
    watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "the new epoch's first ECS call",
        || {
            moto.recorded()
                .iter()
                .any(|r| r.epoch == Some(new_epoch))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(8));
    assert_single_leader_at_moto(&moto);
    assert!(tasks(&moto) <= MAX);
    let old = ws[li].log_text();
    assert!(
        old.contains("stepping down") && old.contains("acknowledged by 0 of the 1 replicas"),
        "the old leader says why it stopped: {}",
        old.lines()
            .filter(|l| l.contains("stepping down"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn sentinel(net: &mut Net, host: &Host, primary: &str, dir: &std::path::Path) {
    let conf = dir.join(format!("{}.conf", host.ns));
    std::fs::write(
        &conf,
        format!(
            "port 26379\nbind 0.0.0.0\nprotected-mode no\n\
             sentinel monitor central {primary} 6379 2\n\
             sentinel down-after-milliseconds central 1000\n\
             sentinel failover-timeout central 3000\n\
             sentinel parallel-syncs central 1\n"
        ),
    )
    .unwrap();
    net.spawn(host, "redis-sentinel", &[conf.to_str().unwrap()]);
    net.wait_port(host, 26379);
}

fn sentinel_primary(s: &Host) -> Option<String> {
    let mut c = conn(&s.ip, 26379)?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("central")
        .query(&mut c)
        .ok()?;
    addr.map(|(h, _)| h)
}

/// Three Sentinels watch a primary and two replicas; wardens find the primary through
/// them (`redis+sentinel://`) and need one replica's acknowledgement. The primary is
/// SIGKILLed (and comes back as a replica), then the new primary is SIGSTOPped: after
/// each failover a leader acts again, counted at moto, with no deposed epoch acting
/// after its successor.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn sentinel_failovers_on_kill_and_stop_keep_one_leader() {
    let mut net = Net::new();
    let nodes: Vec<Host> = ["p", "r1", "r2"].iter().map(|n| net.host(n)).collect();
    let mut pids = Vec::new();
    pids.push(net.redis(&nodes[0], &[]));
    for r in &nodes[1..] {
        pids.push(net.redis(r, &["--replicaof", &nodes[0].ip, "6379"]));
    }
    for r in &nodes[1..] {
        eventually(Duration::from_secs(20), "replication", || {
            replication_up(&r.ip).then_some(())
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let sentinels: Vec<Host> = ["s1", "s2", "s3"].iter().map(|n| net.host(n)).collect();
    for s in &sentinels {
        sentinel(&mut net, s, &nodes[0].ip, dir.path());
    }
    let url = format!(
        "redis+sentinel://{}/central",
        sentinels
            .iter()
            .map(|s| format!("{}:26379", s.ip))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (moto, metric) = moto_and_metric(&net, dir.path());
    let (_hosts, ws) = wardens(&mut net, &moto, &url, &metric, 1, &[]);
    watched(&net, &ws, Duration::from_secs(30), "a leader", || {
        lease(&nodes[0].ip)
    });
    leader_tasks(&net, &moto, &ws);
    let _flip = Flipper::start(metric.clone());
    std::thread::sleep(Duration::from_secs(2));

    // 1. The primary dies.
    let before = moto.recorded().len();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let second = watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "Sentinel names a new primary",
        || sentinel_primary(&sentinels[0]).filter(|ip| *ip != nodes[0].ip),
    );
    watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "a leader acting on the new primary",
        || (!epochs_after(&moto, before).is_empty() && lease(&second).is_some()).then_some(()),
    );
    eprintln!(
        "primary SIGKILLed: a leader acts again after {:?}",
        killed.elapsed()
    );
    // It comes back, as a replica of the new primary (Sentinel reconfigures it).
    pids[0] = net.redis(&nodes[0], &[]);
    watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "the old primary back as a replica",
        || replication_up(&nodes[0].ip).then_some(()),
    );

    // 2. The new primary stops (SIGSTOP): half-open for everyone.
    let si = nodes.iter().position(|n| n.ip == second).unwrap();
    let before = moto.recorded().len();
    // SAFETY: as above.
    unsafe { libc::kill(pids[si] as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let third = watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "Sentinel names a third primary",
        || sentinel_primary(&sentinels[0]).filter(|ip| *ip != second),
    );
    watched(
        &net,
        &ws,
        Duration::from_secs(30),
        "a leader acting on it",
        || (!epochs_after(&moto, before).is_empty() && lease(&third).is_some()).then_some(()),
    );
    eprintln!(
        "primary SIGSTOPped: a leader acts again after {:?}",
        stopped.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: as above.
    unsafe { libc::kill(pids[si] as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(5));
    assert_single_leader_at_moto(&moto);
    assert!(tasks(&moto) <= MAX);
}
