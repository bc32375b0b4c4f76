//! Shared helpers for the integration tests: building the workspace once, finding the
//! real `.so` files and the `warden` binary, and laying plugins out in directories with
//! the permissions warden demands.

pub mod cluster;
pub mod harness;
pub mod proxy;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The cargo profile of the warden and plugins under test: `debug`, or `release` when
/// `WARDEN_TEST_PROFILE=release` (the benchmarks).
fn profile() -> String {
    std::env::var("WARDEN_TEST_PROFILE").unwrap_or_else(|_| "debug".into())
}

/// Where the build puts binaries and cdylibs.
pub fn build_dir() -> PathBuf {
    target_dir().join(profile())
}

/// Builds the workspace's binaries and plugins once per test process. With the shared
/// target directory this is a no-op after `.ci/run`'s build.
pub fn build_workspace() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Exactly .ci/run's build (same packages, same targets, so the same features):
        // anything else would build the dependency tree a second time.
        let mut args = vec!["build", "--workspace", "--exclude", "warden-bench"];
        if profile() == "release" {
            args.push("--release");
        } else {
            args.push("--all-targets");
        }
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
    });
}

/// The `.so` of a plugin crate, e.g. `plugin_so("warden_plugin_test_chaos")`.
pub fn plugin_so(lib_name: &str) -> PathBuf {
    build_workspace();
    let p = build_dir().join(format!("lib{lib_name}.so"));
    assert!(p.exists(), "{} missing after the build", p.display());
    p
}

pub fn warden_bin() -> PathBuf {
    build_workspace();
    build_dir().join("warden")
}

/// A fresh directory (mode 0755) holding copies (mode 0644) of the given files.
pub fn plugin_dir(files: &[&Path]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in files {
        let dest = dir.path().join(f.file_name().unwrap());
        std::fs::copy(f, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

/// Runs warden with arguments; returns (exit code, stdout, stderr).
pub fn warden(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(warden_bin())
        .args(args)
        .env_remove("WARDEN_CONFIG")
        .env_remove("WARDEN_PLUGIN_DIR")
        .output()
        .expect("run warden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A system shared library that is not a warden plugin.
pub fn foreign_so() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/libz.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libz.so.1 is on every Debian machine")
}
