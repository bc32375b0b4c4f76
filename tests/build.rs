//! The end-to-end tier needs root, a Docker engine, redis-server, nginx and moto_server
//! (scripts/setup.sh installs them). Where one is missing and `WARDEN_E2E` is not `1`,
//! this crate's tests are compiled as ignored, each saying so in one line, and cargo
//! warns once with what is missing: plain `cargo test` on a laptop runs every unit and
//! loop test of the other crates and skips this tier. scripts/test.sh sets
//! `WARDEN_E2E=1`: there a missing tool fails the tests, never skips them.

use std::path::Path;

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(warden_e2e_off)");
    println!("cargo::rerun-if-env-changed=WARDEN_E2E");
    println!("cargo::rerun-if-env-changed=PATH");
    if std::env::var("WARDEN_E2E").as_deref() == Ok("1") {
        return;
    }
    let mut missing: Vec<&str> = ["redis-server", "nginx", "moto_server"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !Path::new("/var/run/docker.sock").exists() {
        missing.push("a Docker engine");
    }
    if !is_root() {
        missing.push("root");
    }
    if missing.is_empty() {
        return;
    }
    println!("cargo::rustc-cfg=warden_e2e_off");
    println!(
        "cargo::warning=end-to-end tests ignored (missing: {}); scripts/test.sh installs what is missing and runs every test",
        missing.join(", ")
    );
    // A path that does not exist makes cargo run this again at every build, so the tier
    // comes back once its tools are there.
    println!("cargo::rerun-if-changed=/nonexistent/warden-e2e-tools");
}
