//! Several hosts on one machine: network namespaces on a bridge of their own, each with
//! its own address, so that a test can cut chosen pairs apart (iptables DROP, which
//! leaves connections half-open, as a failed-over VIP or a black-holed path does) and
//! re-point a name (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over
//! `/etc/hosts`). Everything a [`Net`] made is removed when it is dropped, and anything
//! left by a test process that is gone is removed by the next one.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn must(args: &[&str]) {
    let (ok, text) = sh(args);
    assert!(ok, "{args:?}: {text}");
}

/// A bridge with namespaces on it, `10.A.B.0/24`, A and B from this process's id.
pub struct Net {
    tag: String,
    bridge: String,
    prefix: String,
    pub gateway: String,
    hosts: Vec<String>,
    processes: Vec<Child>,
    /// Working directory of the processes started (a replica writes the RDB it syncs).
    dir: tempfile::TempDir,
}

/// One namespace: a host with its own address.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: String,
}

/// Removes namespaces and bridges of test processes that are gone.
fn clean_stale() {
    let (_, list) = sh(&["ip", "netns", "list"]);
    for ns in list.split_whitespace().filter(|n| n.starts_with("wn")) {
        let pid: Option<i32> = ns[2..].split('-').next().and_then(|p| p.parse().ok());
        // SAFETY: kill with signal 0 only asks whether the process exists.
        if pid.is_some_and(|p| unsafe { libc::kill(p, 0) } != 0) {
            let _ = sh(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
    let (_, links) = sh(&["ip", "-o", "link", "show", "type", "bridge"]);
    for name in links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| n.starts_with("wb"))
    {
        let pid: Option<i32> = name[2..].parse().ok();
        // SAFETY: as above.
        if pid.is_some_and(|p| unsafe { libc::kill(p, 0) } != 0) {
            let _ = sh(&["ip", "link", "del", name]);
            let _ = sh(&[
                "iptables", "-D", "FORWARD", "-i", name, "-o", name, "-j", "ACCEPT",
            ]);
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Net {
    pub fn new() -> Net {
        clean_stale();
        let pid = std::process::id();
        let prefix = format!("10.{}.{}", 100 + pid % 100, (pid / 100) % 250);
        let bridge = format!("wb{pid}");
        let gateway = format!("{prefix}.1");
        // A bridge with no address set takes the lowest of its ports' addresses, and so
        // changes it when a port with a lower one is added: hosts that had already
        // resolved the gateway keep sending to the old address, a port's, which the
        // bridge passes up as not for this host, and the kernel drops (no gratuitous ARP
        // tells them: arp_notify is off). Connections to the gateway (moto) then hung for
        // as long as the stale neighbour entry lived, while host-to-host traffic worked.
        // An address set once never changes.
        let mac = format!(
            "02:77:{:02x}:{:02x}:{:02x}:{:02x}",
            (pid >> 24) & 0xff,
            (pid >> 16) & 0xff,
            (pid >> 8) & 0xff,
            pid & 0xff
        );
        must(&[
            "ip", "link", "add", &bridge, "address", &mac, "type", "bridge",
        ]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            &bridge,
        ]);
        // Docker loads br_netfilter, which sends bridged frames through iptables'
        // FORWARD chain, whose rules Docker rewrites whenever it makes a network: our
        // bridge's frames skip iptables altogether (and the ACCEPT rule below stays for
        // kernels without the per-bridge switch).
        let _ = sh(&[
            "ip",
            "link",
            "set",
            &bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ]);
        must(&["ip", "link", "set", &bridge, "up"]);
        // Docker's FORWARD policy drops bridged traffic (br_netfilter): let ours pass.
        must(&[
            "iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
        ]);
        Net {
            tag: format!("wn{pid}"),
            bridge,
            prefix,
            gateway,
            hosts: Vec::new(),
            processes: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A new host on the bridge.
    pub fn host(&mut self, name: &str) -> Host {
        let n = self.hosts.len() + 10;
        let ns = format!("{}-{name}", self.tag);
        let ip = format!("{}.{n}", self.prefix);
        let veth = format!("wv{}x{n}", std::process::id());
        must(&["ip", "netns", "add", &ns]);
        self.hosts.push(ns.clone());
        must(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        must(&["ip", "link", "set", &veth, "master", &self.bridge, "up"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway,
        ]);
        let h = Host { ns, ip };
        h.set_hosts(&[]);
        h
    }

    /// Starts `program args` in `host`; it is killed when the net is dropped.
    pub fn spawn(&mut self, host: &Host, program: &str, args: &[&str]) -> u32 {
        let child = host
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.processes.push(child);
        pid
    }

    /// A redis-server on `host`:6379 (all addresses, no protected mode), with more args.
    pub fn redis(&mut self, host: &Host, args: &[&str]) -> u32 {
        let mut all = vec![
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        let dir = self.dir.path().join(&host.ns);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.to_str().unwrap().to_string();
        all.extend_from_slice(&["--dir", &dir]);
        all.extend_from_slice(args);
        let pid = self.spawn(host, "redis-server", &all);
        self.wait_port(host, 6379);
        pid
    }

    /// Waits until `host:port` accepts connections (from the root namespace).
    pub fn wait_port(&self, host: &Host, port: u16) {
        crate::harness::eventually(
            Duration::from_secs(20),
            &format!("{}:{port}", host.ip),
            || {
                std::net::TcpStream::connect_timeout(
                    &format!("{}:{port}", host.ip).parse().unwrap(),
                    Duration::from_millis(200),
                )
                .ok()
            },
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.processes {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.hosts {
            // Anything else started in it (a warden of the harness).
            let (_, pids) = sh(&["ip", "netns", "pids", ns]);
            for p in pids.split_whitespace() {
                let _ = sh(&["kill", "-9", p]);
            }
            let _ = sh(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
        let _ = sh(&[
            "iptables",
            "-D",
            "FORWARD",
            "-i",
            &self.bridge,
            "-o",
            &self.bridge,
            "-j",
            "ACCEPT",
        ]);
    }
}

impl Net {
    /// What an operator would look at when hosts cannot reach each other or the
    /// gateway: the bridge's address and forwarding table, each host's neighbours,
    /// routes and TCP sockets, the listening sockets of the root namespace.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        let mut run = |title: &str, args: &[&str]| {
            let (_, text) = sh(args);
            out.push_str(&format!("--- {title}\n{text}"));
        };
        run("bridge", &["ip", "-d", "link", "show", &self.bridge]);
        run("fdb", &["bridge", "fdb", "show", "br", &self.bridge]);
        run("root routes", &["ip", "route"]);
        run("root listening", &["ss", "-tln"]);
        for ns in &self.hosts {
            run(&format!("{ns} neighbours"), &["ip", "-n", ns, "neigh"]);
            run(
                &format!("{ns} link"),
                &["ip", "-n", ns, "link", "show", "eth0"],
            );
            run(
                &format!("{ns} tcp"),
                &["ip", "netns", "exec", ns, "ss", "-tan"],
            );
        }
        out
    }
}

impl Host {
    /// `program` to run inside this host's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Drops every packet between this host and `ip`, both ways, without a reset: the
    /// connections stay half-open.
    pub fn cut(&self, ip: &str) {
        for (chain, flag) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            let (ok, text) = sh(&[
                "ip", "netns", "exec", &self.ns, "iptables", "-I", chain, flag, ip, "-j", "DROP",
            ]);
            assert!(ok, "{text}");
        }
    }

    /// Drops every packet to and from anything but loopback.
    pub fn black_hole(&self) {
        for (chain, flag) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let (ok, text) = sh(&[
                "ip", "netns", "exec", &self.ns, "iptables", "-I", chain, flag, "eth0", "-j",
                "DROP",
            ]);
            assert!(ok, "{text}");
        }
    }

    /// This host's `/etc/hosts` (seen by programs started with `ip netns exec`).
    pub fn set_hosts(&self, entries: &[(&str, &str)]) {
        let dir = format!("/etc/netns/{}", self.ns);
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = "127.0.0.1 localhost\n".to_owned();
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        // Written in place: the file is bind-mounted into processes already running.
        std::fs::write(format!("{dir}/hosts"), text).unwrap();
    }
}
