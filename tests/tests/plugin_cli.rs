//! The `warden` binary against real plugin files: listing, checking, refusing.
#![allow(unsafe_code)] // system calls (signals, namespaces, processes) in test code

use std::os::unix::fs::PermissionsExt;

use warden_tests::*;

fn all_plugins() -> Vec<std::path::PathBuf> {
    [
        "warden_plugin_file_services",
        "warden_plugin_template",
        "warden_plugin_test_chaos",
    ]
    .iter()
    .map(|n| plugin_so(n))
    .collect()
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn every_plugin_is_listed_with_name_version_kinds_api_and_path() {
    let files = all_plugins();
    let dir = plugin_dir(&files.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    let (code, out, err) = warden(&["plugins", "list", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let expect = [
        (
            "file-services",
            "service-definitions",
            "libwarden_plugin_file_services.so",
        ),
        ("template", "metric-source", "libwarden_plugin_template.so"),
        (
            "test-chaos",
            "metric-source,service-definitions",
            "libwarden_plugin_test_chaos.so",
        ),
    ];
    for (line, (name, kind, file)) in lines.iter().zip(expect) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols[0], name, "{line}");
        assert_eq!(cols[1], "0.1.0", "{line}");
        assert_eq!(cols[2], kind, "{line}");
        assert_eq!(
            cols[3],
            format!("api {}", warden_plugin_api::API_VERSION),
            "{line}"
        );
        assert!(cols[4].ends_with(file), "{line}");
    }
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_foreign_shared_library_is_refused_in_one_line() {
    let (code, out, _) = warden(&["plugins", "check", foreign_so().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("not a warden plugin"), "{out}");
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_file_that_is_no_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("notes.so");
    std::fs::write(&f, "just text").unwrap();
    let (code, out, _) = warden(&["plugins", "check", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("not an ELF file (not a shared library)"),
        "{out}"
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_bad_plugin_file_does_not_stop_the_others() {
    let template = plugin_so("warden_plugin_template");
    let foreign = foreign_so();
    let dir = plugin_dir(&[template.as_path()]);
    let bad = dir.path().join("libz.so");
    std::fs::copy(&foreign, &bad).unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = warden(&["plugins", "list", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.starts_with("template\t"), "{out}");
    assert!(
        err.contains("not loaded: ") && err.contains("libz.so: not a warden plugin"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn writable_or_foreign_owned_plugins_are_refused_unless_allowed() {
    let template = plugin_so("warden_plugin_template");
    let dir = plugin_dir(&[template.as_path()]);
    let file = dir.path().join("libwarden_plugin_template.so");
    let d = dir.path().to_str().unwrap();

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, out, err) = warden(&["plugins", "list", "--dir", d]);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("is writable by its group and others (mode 0666)"),
        "{err}"
    );
    let (_, out, _) = warden(&["--allow-insecure-plugins", "plugins", "list", "--dir", d]);
    assert!(out.starts_with("template\t"), "{out}");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (_, out, err) = warden(&["plugins", "list", "--dir", d]);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("directory") && err.contains("mode 0777"),
        "{err}"
    );

    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&file, Some(4242), None).unwrap();
    let (code, out, _) = warden(&["plugins", "check", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("owned by uid 4242"), "{out}");
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn plugins_check_validates_a_config_against_the_schema() {
    let template = plugin_so("warden_plugin_template");
    let dir = plugin_dir(&[template.as_path()]);
    let f = dir.path().join("libwarden_plugin_template.so");
    let f = f.to_str().unwrap();
    let (code, out, _) = warden(&["plugins", "check", f, "--config", r#"{"value": 4}"#]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("instance created"), "{out}");
    let (code, out, _) = warden(&["plugins", "check", f, "--config", r#"{"valeu": 4}"#]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"value\" is a required property") && out.contains("valeu"),
        "{out}"
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn check_names_file_key_and_expectation() {
    let template = plugin_so("warden_plugin_template");
    let dir = plugin_dir(&[template.as_path()]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("warden.toml");
    std::fs::write(
        &cfg,
        format!(
            "[plugins]\ndirs = [{:?}]\n\n[metrics.upstream]\nplugin = \"template\"\nconfig = {{ value = \"five\" }}\n\n[metrics.missing]\nplugin = \"nope\"\n",
            dir.path()
        ),
    )
    .unwrap();
    let (code, out, _) = warden(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 78, "{out}");
    let cfg_name = cfg.display().to_string();
    assert!(
        out.contains(&format!("{cfg_name}: registrar: enabled with no [[registrar.sources]], and the default source cannot be used: no plugin named \"docker-labels\" is loaded")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{cfg_name}: metrics.upstream: config does not match plugin \"template\"'s schema: value: the value given is not of type \"number\"")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{cfg_name}: metrics.missing: no plugin named \"nope\" is loaded (loaded: template)"
        )),
        "{out}"
    );

    std::fs::write(&cfg, format!("[plugins]\ndirs = [{:?}]\n[registrar]\nenabled = false\n[metrics.upstream]\nplugin = \"template\"\nconfig = {{ value = 5 }}\n", dir.path())).unwrap();
    let (code, out, _) = warden(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 plugins loaded, 1 plugin configs checked"),
        "{out}"
    );

    // A type error, an unknown key, a bound, and all at once: each is a configuration
    // error like any other (78, as `run` gives), printed with file, line, column and key.
    let type_error = "line 2, column 1: registrar.local_redis: invalid type: integer `6379`";
    let unknown = "line 3, column 1: registrar.bogus: unknown field `bogus`";
    let bound = "line 5, column 1: manager.loop_secs: 0 is outside 1..=86400";
    for (text, want) in [
        ("[registrar]\nlocal_redis = 6379\n", vec![type_error]),
        ("[registrar]\n\nbogus = 1\n", vec![unknown]),
        (
            "[registrar]\nlocal_redis = 6379\nbogus = 1\n[manager]\nloop_secs = 0\n",
            vec![type_error, unknown, bound],
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (code, out, _) = warden(&["check", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 78, "{text}\n{out}");
        assert_eq!(out.lines().count(), want.len(), "{text}\n{out}");
        for w in &want {
            assert!(
                out.contains(&format!("{cfg_name}: {w}")),
                "{text}\nwanted {w:?} in\n{out}"
            );
        }
        let run = std::process::Command::new(warden_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(78), "{text}\n{err}");
        for w in &want {
            assert!(
                err.contains(&format!("warden: {cfg_name}: {w}")),
                "{text}\nwanted {w:?} in\n{err}"
            );
        }
    }
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn run_loads_plugins_and_stops_cleanly_on_sigterm() {
    let files = all_plugins();
    let dir = plugin_dir(&files.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    let work = tempfile::tempdir().unwrap();
    let services = work.path().join("services.toml");
    std::fs::write(
        &services,
        "[[services]]\nname = \"web\"\nmatch = { image = \"web\" }\n",
    )
    .unwrap();
    let cfg = work.path().join("warden.toml");
    std::fs::write(
        &cfg,
        format!(
            "[plugins]\ndirs = [{:?}]\n[registrar]\nenabled = false\n[[registrar.sources]]\nplugin = \"file-services\"\nconfig = {{ path = {:?} }}\n[metrics.m]\nplugin = \"template\"\nconfig = {{ value = 1 }}\n",
            dir.path(),
            services
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(warden_bin())
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("WARDEN_HTTP_LISTEN", "off")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read stderr to the end on a thread; hand over the "running" line when it comes.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("warden running") {
                let _ = tx.send(line.clone());
            }
            lines.push(line);
        }
        lines
    });
    let running = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("warden never said it was running");
    let running: serde_json::Value = serde_json::from_str(&running).unwrap();
    assert_eq!(running["plugins"], 3, "{running}");
    assert_eq!(running["metrics"], 1, "{running}");
    assert_eq!(running["registrar"], false, "{running}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert!(status.success(), "{status:?}: {lines:#?}");
    // Work in flight at SIGTERM (an instance being created) may still log after
    // "shutting down"; "stopped" is said once the runtime has ended, so it is last.
    let message =
        |l: &String| serde_json::from_str::<serde_json::Value>(l).unwrap()["message"].clone();
    assert!(
        lines.iter().any(|l| message(l) == "shutting down"),
        "{lines:#?}"
    );
    assert_eq!(message(lines.last().unwrap()), "stopped", "{lines:#?}");
}

/// The original warden's service files, Perl and Go spellings, read by the real
/// file-services `.so` through `warden plugins check --call`; a misspelt field is refused
/// with its line and column.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn the_original_wardens_service_files_are_read_by_file_services() {
    let so = plugin_so("warden_plugin_file_services");
    let fixtures = workspace_root().join("plugins/file-services/fixtures");
    for name in ["perl-services.json", "go-services.json"] {
        let path = fixtures.join(name);
        let config = serde_json::json!({ "path": path }).to_string();
        let (code, out, err) = warden(&[
            "plugins",
            "check",
            so.to_str().unwrap(),
            "--config",
            &config,
            "--call",
        ]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        for want in [
            r#""backend":"backend-1""#,
            r#""elb":"load-balancer-1""#,
            r#""frontends":["load-balancer-2.warden/fcgi-bin/"]"#,
            r#""match":{"image":"amazon/amazon-ecs-sample"}"#,
            r#""port":1080"#,
        ] {
            assert!(out.contains(want), "{name}: {want} in {out}");
        }
    }
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("services.json");
    let text = std::fs::read_to_string(fixtures.join("perl-services.json")).unwrap();
    std::fs::write(&bad, text.replacen("\"Site\"", "\"Sitee\"", 1)).unwrap();
    let config = serde_json::json!({ "path": bad }).to_string();
    let (code, out, err) = warden(&[
        "plugins",
        "check",
        so.to_str().unwrap(),
        "--config",
        &config,
    ]);
    assert_ne!(code, 0, "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("unknown field `Sitee`") && all.contains("line 9 column"),
        "{all}"
    );
}

/// `plugins call --timeout-ms` on a metric whose code never yields (a busy loop, in
/// process): the command ends by itself, exit 1, with `timeout` as the error kind and
/// the stage named apart; an async hang gets the call's own timeout, as before.
#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn plugins_call_honours_its_timeout_for_code_that_never_yields() {
    let so = plugin_so("warden_plugin_test_chaos");
    for (step, stage) in [("spin", "call"), ("sleep:60000", "call")] {
        let config = serde_json::json!({ "sequence": [step] }).to_string();
        let mut child = std::process::Command::new(warden_bin())
            .args(["plugins", "call"])
            .arg(&so)
            .args(["--config", &config, "--timeout-ms", "300"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{step}: plugins call did not return");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert_eq!(status.code(), Some(1), "{step}: {out}");
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{step}: {e}: {out}"));
        assert_eq!(v["stage"], stage, "{step}: {out}");
        assert_eq!(v["error"]["kind"], "timeout", "{step}: {out}");
    }
}
