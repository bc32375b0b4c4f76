//! A plugin author's path, from outside warden's repository: the template copied to a
//! temporary directory builds with only the path of its `warden-plugin-api` lines
//! changed, its own tests (through `warden_plugin_api::testing`) pass there, and warden
//! loads, checks and calls the result; `warden plugins call` prints what it measures.

use std::process::Command;

use warden_tests::{plugin_so, target_dir, warden, workspace_root};

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_template_copied_out_builds_tests_and_loads() {
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("queue-depth");
    std::fs::create_dir_all(copy.join("src")).unwrap();
    let template = root.join("examples/plugin-template");
    for f in ["src/lib.rs", "README.md"] {
        std::fs::copy(template.join(f), copy.join(f)).unwrap();
    }
    // The one change the README asks for: where warden-plugin-api is (and a new name).
    let manifest = std::fs::read_to_string(template.join("Cargo.toml")).unwrap();
    let api = root.join("plugin-api");
    let changed = manifest
        .replace("../../plugin-api", api.to_str().unwrap())
        .replace(
            "name = \"warden-plugin-template\"",
            "name = \"queue-depth\"",
        );
    assert_ne!(manifest, changed);
    assert!(
        !changed.contains(".workspace"),
        "the template must not inherit from a workspace:\n{changed}"
    );
    std::fs::write(copy.join("Cargo.toml"), changed).unwrap();
    // Same dependency versions as warden's own build, and its target directory and dev
    // profile (the root's `[profile.dev]`), so that the dependencies the suite built
    // are reused, not compiled again (89 s cold in a directory of its own, 16 s here).
    std::fs::copy(root.join("Cargo.lock"), copy.join("Cargo.lock")).unwrap();
    let target = target_dir();
    let profile = [
        "--config",
        "profile.dev.debug=\"line-tables-only\"",
        "--config",
        "profile.dev.package.\"*\".debug=false",
    ];
    for args in [&["build"][..], &["test"][..]] {
        let out = Command::new(cargo())
            .args(args)
            .args(profile)
            .current_dir(&copy)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?} in the copied template:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let so = target.join("debug/libqueue_depth.so");
    let (code, out, err) = warden(&[
        "plugins",
        "check",
        so.to_str().unwrap(),
        "--config",
        r#"{"value": 4}"#,
        "--call",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("instance created") && out.contains("measure answered"),
        "{out}"
    );
    assert!(out.contains("\"value\":4.0"), "{out}");
}

/// `plugins call` prints the answer with its unit and the time taken; a failing call
/// exits 1 with the error's kind; `--repeat` gives min/median/max.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn plugins_call_prints_the_answer_the_error_kind_and_the_time() {
    let template = plugin_so("warden_plugin_template");
    let (code, out, err) = warden(&[
        "plugins",
        "call",
        template.to_str().unwrap(),
        "--config",
        r#"{"value": 7.5}"#,
        "--repeat",
        "3",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["answer"]["value"], 7.5);
    assert_eq!(v["answer"]["unit"], "tasks");
    assert_eq!(v["calls"], 3);
    assert!(v["took_ms"]["median"].as_f64().unwrap() >= 0.0, "{out}");

    // map is not offered by the template: an error with its kind, exit 1.
    let (code, out, _) = warden(&[
        "plugins",
        "call",
        template.to_str().unwrap(),
        "--config",
        r#"{"value": 1}"#,
        "--op",
        "map",
        "--value",
        "3",
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "unsupported", "{out}");

    // A config off the schema is refused before any plugin code runs.
    let (code, out, _) = warden(&[
        "plugins",
        "call",
        template.to_str().unwrap(),
        "--config",
        r#"{"value": "x"}"#,
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stage"], "config", "{out}");

    // A plugin that panics: contained, reported as `panicked`.
    let chaos = plugin_so("warden_plugin_test_chaos");
    let (code, out, _) = warden(&[
        "plugins",
        "call",
        chaos.to_str().unwrap(),
        "--config",
        r#"{"sequence": ["panic"]}"#,
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "panicked", "{out}");
}
