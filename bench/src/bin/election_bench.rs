//! What the election costs the central Redis, counted by the Redis itself: N idle
//! wardens (manager on, no services, registrar off) share one central Redis; once a
//! leader holds the lease, every command the Redis receives for `secs` seconds is read
//! from `MONITOR` and counted, split into commands clients sent and commands scripts ran
//! inside (which `INFO commandstats` counts as well). Run at two sizes, the leader's and
//! a follower's rates follow: total(N) = leader + (N − 1) × follower.
//!
//! Run: `cargo run --release -p warden-bench --bin election_bench -- [small] [large] [secs]`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::Commands;
use warden_tests::harness::*;

/// (sent by clients, run inside scripts) over `secs`.
fn monitor(redis: &Redis, secs: u64) -> (u64, u64) {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.write_all(b"MONITOR\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut r = BufReader::new(s);
    let (mut sent, mut inside) = (0, 0);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.contains(" [0 lua] ") {
                    inside += 1;
                } else if line.contains(" [0 127.0.0.1:") || line.contains(" [0 unix:") {
                    sent += 1;
                }
            }
            Err(_) => {}
        }
    }
    (sent, inside)
}

fn run(n: usize, secs: u64) -> (f64, f64) {
    let central = Redis::start();
    let wardens: Vec<Warden> = (0..n)
        .map(|i| {
            Warden::start(
                &format!(
                    "[host]\ninstance_id = \"i-{i:03}\"\navailability_zone = \"eu-west-1a\"\n[registrar]\nenabled = false\n[manager]\ncentral_redis = \"{}\"\n",
                    central.url()
                ),
                &[],
            )
        })
        .collect();
    eventually(Duration::from_secs(30), "a leader", || {
        let v: Option<String> = central.conn().get("warden:leader").ok()?;
        v
    });
    // Every host past its start (first registrations, first competition).
    std::thread::sleep(Duration::from_secs(5));
    let (sent, inside) = monitor(&central, secs);
    drop(wardens);
    (sent as f64 / secs as f64, inside as f64 / secs as f64)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let small = *args.first().unwrap_or(&5) as usize;
    let large = *args.get(1).unwrap_or(&20) as usize;
    let secs = *args.get(2).unwrap_or(&30);
    let (s_sent, s_inside) = run(small, secs);
    let (l_sent, l_inside) = run(large, secs);
    let follower = (l_sent - s_sent) / (large - small) as f64;
    let leader = s_sent - (small - 1) as f64 * follower;
    println!("| hosts | commands/s sent (all hosts) | run inside scripts/s |");
    println!("|---|---|---|");
    println!("| {small} | {s_sent:.1} | {s_inside:.1} |");
    println!("| {large} | {l_sent:.1} | {l_inside:.1} |");
    println!();
    println!("leader: {leader:.2} commands/s sent; a follower: {follower:.2} commands/s sent");
    println!(
        "projected for 1000 hosts: {:.0} commands/s sent",
        leader + 999.0 * follower
    );
}
