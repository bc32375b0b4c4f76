//! Helpers for the benchmarks: a release build of the template plugin.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Builds the template plugin in release mode and returns its `.so`.
pub fn release_template_so() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        // The same packages as the harness's release build: one dependency build for all.
        .args([
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "warden-bench",
        ])
        .current_dir(workspace_root())
        .status()
        .unwrap();
    assert!(status.success());
    target.join("release/libwarden_plugin_template.so")
}

/// Builds the stabby prototype plugin (bench/stabby-proto, a workspace of its own) in
/// release mode and returns its `.so`.
pub fn release_stabby_proto_so() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("stabby-proto");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(workspace_root().join("bench/stabby-proto/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    target.join("release/libwarden_stabby_proto.so")
}

/// Builds the `warden` binary in release mode and returns its path (it probes plugin
/// files and hosts isolated plugins).
pub fn release_warden_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "warden-bench",
        ])
        .current_dir(workspace_root())
        .status()
        .unwrap();
    assert!(status.success());
    target.join("release/warden")
}
