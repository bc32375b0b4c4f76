//! The Debian package: built with `cargo deb` from the build the suite already has (no
//! second, release build), installed with `dpkg -i`, then its own `warden check` and
//! `warden plugins list` run against the files it installed; then deployed as shipped:
//! its read-only Docker proxy, its router run as the `warden` user and warden itself as
//! the `warden` user (not in the docker group) route a container and reload the router
//! for its port; purged at the end. Needs root and cargo-deb (scripts/setup.sh).

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
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
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
            // The debug build's files are ~150 MB: xz at its default level took 37 s of
            // two cores, --fast 6 s. The shipped package keeps the default.
            "--fast",
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
        "./usr/share/doc/warden/iam-policy-registrar.json",
        "./usr/share/doc/warden/iam-policy-manager.json",
        "./usr/share/warden/docker-proxy.conf",
        "./lib/systemd/system/warden-router.service",
        "./lib/systemd/system/warden-docker-proxy.service",
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

    // The config is the warden user's to read, nobody else's; the user is not in the
    // docker group.
    let (_, text) = run(Command::new("stat").args(["-c", "%a %U:%G", "/etc/warden/warden.toml"]));
    assert_eq!(text.trim(), "640 root:warden");
    let (_, groups) = run(Command::new("id").args(["-nG", "warden"]));
    assert!(
        !groups.split_whitespace().any(|g| g == "docker"),
        "{groups}"
    );
    deployed_as_shipped();

    drop(_purge);
    assert!(!bin.exists(), "purged: /usr/bin/warden is gone");
}

/// Kills a process group when dropped.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        warden_tests::harness::kill_group(&mut self.0);
    }
}

/// Runs `cmd` as the package's `warden` user (its own group only), in a process group.
fn as_warden(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let (uid, gid) = ids("warden");
    cmd.uid(uid).gid(gid).process_group(0)
}

fn ids(user: &str) -> (u32, u32) {
    let (_, u) = run(Command::new("id").args(["-u", user]));
    let (_, g) = run(Command::new("id").args(["-g", user]));
    (u.trim().parse().unwrap(), g.trim().parse().unwrap())
}

/// The shipped Docker proxy (as root), the router and warden (as `warden`): a labelled
/// container is routed through Docker's events read via the proxy, its port front-end
/// appears because warden reloaded a router it may signal, and the proxy refuses writes.
fn deployed_as_shipped() {
    use std::os::unix::fs::{chown, PermissionsExt};
    use std::time::Duration;
    use warden_tests::harness::*;
    let (uid, gid) = ids("warden");
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The proxy's socket directory: root:warden 0750, as RuntimeDirectory makes it.
    let sock_dir = base.path().join("docker");
    std::fs::create_dir(&sock_dir).unwrap();
    chown(&sock_dir, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let socket = sock_dir.join("docker.sock");
    let conf = std::fs::read_to_string("/usr/share/warden/docker-proxy.conf")
        .unwrap()
        .replace("@SOCKET@", socket.to_str().unwrap())
        .replace("@DOCKER@", "/var/run/docker.sock")
        .replace("@PID@", sock_dir.join("nginx.pid").to_str().unwrap());
    let proxy_conf = sock_dir.join("nginx.conf");
    std::fs::write(&proxy_conf, conf).unwrap();
    let _proxy = Group({
        use std::os::unix::process::CommandExt;
        Command::new("nginx")
            .args([
                "-c",
                proxy_conf.to_str().unwrap(),
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ])
            .process_group(0)
            .spawn()
            .unwrap()
    });
    eventually(Duration::from_secs(10), "the docker proxy's socket", || {
        socket.exists().then_some(())
    });

    let redis = Redis::start();
    let router_dir = base.path().join("router");
    std::fs::create_dir(&router_dir).unwrap();
    chown(&router_dir, Some(uid), Some(gid)).unwrap();
    let router_port = free_port();
    let _router = Group(
        as_warden(
            Command::new("/usr/share/warden/router/start.sh")
                .args([
                    router_dir.to_str().unwrap(),
                    &router_port.to_string(),
                    "127.0.0.1",
                    &redis.port.to_string(),
                ])
                .stdout(std::process::Stdio::null()),
        )
        .spawn()
        .unwrap(),
    );
    wait_for_port(router_port, "the router run as warden");

    let service_port = free_port();
    let http_port = free_port();
    let cfg = base.path().join("warden.toml");
    std::fs::write(
        &cfg,
        format!(
            "[plugins]\ndirs = [\"/usr/lib/warden/plugins\"]\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [registrar]\nlocal_redis = \"{}\"\nrouter_ports_file = {:?}\nrouter_pid_file = {:?}\n\
             reserved_ports = [{router_port}]\nrequire_label = \"{}\"\n\
             [grants]\nfrontends = [\"*.pkg.example\"]\nfrontend_ports = [\"{service_port}\"]\n",
            redis.url(),
            router_dir.join("ports.conf"),
            router_dir.join("nginx.pid"),
            run_label()
        ),
    )
    .unwrap();
    chown(&cfg, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o640)).unwrap();
    let log = base.path().join("warden.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let _warden = Group(
        as_warden(
            Command::new("/usr/bin/warden")
                .args(["run", "--config", cfg.to_str().unwrap()])
                .env("DOCKER_HOST", format!("unix://{}", socket.display()))
                .env_remove("WARDEN_PLUGIN_DIR")
                .stderr(log_file),
        )
        .spawn()
        .unwrap(),
    );
    let cs = Containers::new("pkg");
    let port = service_port.to_string();
    cs.run(
        "web",
        &[
            ("warden.service", "pkg-web"),
            ("warden.frontend", "web.pkg.example"),
            ("warden.frontend-port", &port),
        ],
        &[],
    );
    let page = cs.full_name("web");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(
        Duration::from_secs(30),
        "routed through the router's port front-end",
        || {
            let (s, body) = http_get(service_port, "x", "/").ok()?;
            (s == 200 && body == page).then_some(())
        },
    );
    let (s, body) = http_get(router_port, "web.pkg.example", "/").unwrap();
    assert_eq!((s, body.as_str()), (200, page.as_str()), "{}", text());
    assert!(!text().contains("ERROR"), "{}", text());
    // The proxy: writes and reads of anything but the container list and events refused.
    for request in [
        "POST /v1.41/containers/create HTTP/1.0\r\n\r\n",
        "GET /v1.41/containers/x/export HTTP/1.0\r\n\r\n",
        "GET /v1.41/secrets HTTP/1.0\r\n\r\n",
    ] {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 403"), "{request}: {reply}");
    }
}
