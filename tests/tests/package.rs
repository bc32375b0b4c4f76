//! The Debian package: built with `cargo deb` from the build the suite already has (no
//! second, release build), installed with `dpkg -i`, then its own `warden check` and
//! `warden plugins list` run against the files it installed; purged at the end.
//! Needs root and cargo-deb (scripts/setup.sh installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use warden_tests::workspace_root;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "warden"]).output();
    }
}

fn profile_dir() -> (&'static str, PathBuf) {
    let profile = if std::env::var("WARDEN_TEST_PROFILE").as_deref() == Ok("release") {
        "release"
    } else {
        "dev"
    };
    let dir = if profile == "dev" { "debug" } else { "release" };
    (profile, workspace_root().join("target").join(dir))
}

#[test]
fn the_deb_installs_checks_its_config_lists_its_plugins_and_purges() {
    let (installed_before, _) = run(Command::new("dpkg").args(["-s", "warden"]));
    assert!(
        !installed_before,
        "a warden package is already installed on this machine; this test installs and purges its own, so it will not run here"
    );
    // The binaries and plugins of this build (the harness builds them once).
    let _ = warden_tests::plugin_so("warden_plugin_docker_labels");
    let (profile, dir) = profile_dir();
    assert!(dir.join("warden").exists(), "{} not built", dir.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let deb = tempfile::tempdir().unwrap();
    let out_file = deb.path().join("warden.deb");
    let (ok, text) = run(Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "deb",
            "-p",
            "warden",
            "--no-build",
            "--no-strip",
            "--profile",
            profile,
            "-o",
        ])
        .arg(&out_file));
    assert!(
        ok,
        "cargo deb (cargo install cargo-deb, or scripts/setup.sh): {text}"
    );

    let (ok, contents) = run(Command::new("dpkg-deb").arg("--contents").arg(&out_file));
    assert!(ok, "{contents}");
    for path in [
        "./usr/bin/warden",
        "./usr/lib/warden/plugins/libwarden_plugin_docker_labels.so",
        "./etc/warden/warden.toml",
        "./usr/share/warden/router/warden.lua",
        "./usr/share/doc/warden/iam-policy.json",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        contents.contains("warden.service"),
        "the systemd unit is not in the package:\n{contents}"
    );

    let _purge = Installed;
    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&out_file));
    assert!(ok, "dpkg -i: {text}");
    let (ok, text) = run(Command::new("getent").args(["passwd", "warden"]));
    assert!(
        ok && text.contains("nologin"),
        "the warden system user: {text}"
    );

    let bin = Path::new("/usr/bin/warden");
    let (ok, text) = run(Command::new(bin)
        .args(["check", "--config", "/etc/warden/warden.toml"])
        .env_remove("WARDEN_PLUGIN_DIR"));
    assert!(ok, "warden check of the installed config: {text}");
    assert!(text.contains("ok (4 plugins loaded"), "{text}");
    let (ok, text) = run(Command::new(bin)
        .args(["plugins", "list", "--config", "/etc/warden/warden.toml"])
        .env_remove("WARDEN_PLUGIN_DIR"));
    assert!(ok, "{text}");
    for name in [
        "docker-labels",
        "file-services",
        "beanstalk-instances",
        "s3-table",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}\t"))),
            "{name} not listed:\n{text}"
        );
    }
    assert!(!text.contains("not loaded"), "{text}");

    drop(_purge);
    assert!(!bin.exists(), "purged: /usr/bin/warden is gone");
}
