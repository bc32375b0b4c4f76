//! A host of warden-plugin-api 1.x loads a plugin built against another 1.x of the
//! interface, and refuses one built against 2.0 with a short reason.
//!
//! The plugins are really built against other versions: the test copies plugin-api with
//! its version changed into a scratch workspace, builds the template plugin against it
//! (sharing the main target directory, so dependencies are compiled once), and loads it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use warden::plugins::{CallOptions, MetricClient};
use warden_plugin_api::Kind;
use warden_tests::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// Builds the template plugin against plugin-api `version`; returns the `.so`.
fn build_plugin_against(version: &str) -> PathBuf {
    let root = workspace_root();
    let tag = version.replace('.', "_");
    let ws = target_dir().join("abi-compat").join(&tag);
    let _ = std::fs::remove_dir_all(&ws);
    // The interface crate, version changed.
    copy_dir(&root.join("plugin-api/src"), &ws.join("plugin-api/src"));
    let api_manifest = std::fs::read_to_string(root.join("plugin-api/Cargo.toml")).unwrap();
    let api_manifest = api_manifest.replacen(
        &format!("version = \"{}\"", warden_plugin_api::API_VERSION),
        &format!("version = \"{version}\""),
        1,
    );
    assert!(api_manifest.contains(version));
    std::fs::write(ws.join("plugin-api/Cargo.toml"), api_manifest).unwrap();
    // The template plugin, renamed so its .so does not overwrite another.
    let name = format!("warden-plugin-compat-{tag}");
    std::fs::create_dir_all(ws.join("plugin/src")).unwrap();
    let lib = std::fs::read_to_string(root.join("examples/plugin-template/src/lib.rs")).unwrap();
    std::fs::write(
        ws.join("plugin/src/lib.rs"),
        lib.replace("name: \"template\"", &format!("name: \"compat-{version}\"")),
    )
    .unwrap();
    let plugin_manifest =
        std::fs::read_to_string(root.join("examples/plugin-template/Cargo.toml")).unwrap();
    std::fs::write(
        ws.join("plugin/Cargo.toml"),
        plugin_manifest
            .replacen(
                "name = \"warden-plugin-template\"",
                &format!("name = \"{name}\""),
                1,
            )
            .replace(
                "path = \"../../plugin-api\", version = \"1\"",
                &format!("path = \"../plugin-api\", version = \"{version}\""),
            ),
    )
    .unwrap();
    // The workspace: the root's shared settings, these two members.
    let root_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let shared = &root_manifest[root_manifest.find("[workspace.package]").unwrap()..];
    let shared = shared.replace(
        "warden-plugin-api = { path = \"plugin-api\", version = \"1\" }",
        &format!("warden-plugin-api = {{ path = \"plugin-api\", version = \"{version}\" }}"),
    );
    std::fs::write(
        ws.join("Cargo.toml"),
        format!(
            "[workspace]\nresolver = \"2\"\nmembers = [\"plugin-api\", \"plugin\"]\n\n{shared}"
        ),
    )
    .unwrap();
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "-p", &name])
        .current_dir(&ws)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    build_dir().join(format!("lib{}.so", name.replace('-', "_")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn another_1x_loads_and_2x_is_refused_with_a_short_reason() {
    build_workspace();
    let v1_1 = build_plugin_against("1.7.0");
    let v2 = build_plugin_against("2.0.0");

    let dir = plugin_dir(&[v1_1.as_path(), v2.as_path()]);
    let host = warden::plugins::PluginHost::load_dirs(&[dir.path().to_owned()], false);

    assert_eq!(host.plugins().len(), 1, "{:?}", host.failures());
    let m = host.plugins()[0].manifest();
    assert_eq!(
        (m.name.as_str(), m.api_version.as_str()),
        ("compat-1.7.0", "1.7.0")
    );
    let client = MetricClient(
        host.create(
            "compat-1.7.0",
            Kind::MetricSource,
            &json!({ "value": 42.5 }),
            CallOptions::default(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(client.measure().await.unwrap().value, 42.5);

    assert_eq!(host.failures().len(), 1);
    let reason = host.failures()[0].reason.to_string();
    assert_eq!(
        reason,
        format!("built against warden-plugin-api 2.0.0, but this warden takes 1.x (it has {}): rebuild the plugin against warden-plugin-api 1.x", warden_plugin_api::API_VERSION)
    );

    // The CLI says the same in one line and fails.
    let so = dir.path().join(v2.file_name().unwrap());
    let (code, out, _) = warden(&["plugins", "check", so.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("2.0.0") && out.contains("1.x"), "{out}");
}
