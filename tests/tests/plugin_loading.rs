//! A plugin file is checked in a child process (the probe, which reports its manifest)
//! and mapped into warden only when an in-process instance of it is first created: a
//! plugin that sits unused in the directory costs warden no memory. Read on the far side:
//! the kernel's `/proc/PID/maps` of the process.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use warden::plugins::LoadError;
use warden_tests::harness::*;
use warden_tests::{plugin_dir, plugin_so, warden_bin};

fn mapped(pid: u32, file: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .any(|l| l.ends_with(file))
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_plugin_the_configuration_does_not_use_is_listed_but_never_mapped() {
    // The harness's plugin directory holds eight plugins; this warden uses one.
    let w = Warden::start(
        "[registrar]\nenabled = false\n[metrics.m]\nplugin = \"template\"\nisolation = \"in-process\"\nconfig = { value = 3.0 }\n[metrics.n]\nplugin = \"test-chaos\"\nconfig = { sequence = [\"ok:1\"] }\n",
        &[],
    );
    eventually(Duration::from_secs(20), "both metrics' instances", || {
        let log = w.log_text();
        (log.contains("plugin instance created (in-process)")
            && log.contains("plugin instance created (process)"))
        .then_some(())
    });
    let log = w.log_text();
    for listed in ["dynamodb-services", "s3-table", "docker-labels"] {
        assert!(
            log.lines()
                .any(|l| l.contains("plugin loaded")
                    && l.contains(&format!(r#""plugin":"{listed}""#))),
            "{listed} is still found and checked: {log}"
        );
    }
    let pid = w.child.id();
    assert!(
        mapped(pid, "libwarden_plugin_template.so"),
        "the plugin in use is mapped"
    );
    // test-chaos is not shipped with warden: under the default `isolation = "auto"`
    // its instance runs in a child, and warden never maps it.
    for unused in [
        "libwarden_plugin_test_chaos.so",
        "libwarden_plugin_dynamodb_services.so",
        "libwarden_plugin_s3_table.so",
        "libwarden_plugin_beanstalk_instances.so",
        "libwarden_plugin_redis_services.so",
        "libwarden_plugin_docker_labels.so",
    ] {
        assert!(!mapped(pid, unused), "{unused} is mapped but not used");
    }
}

fn copy_as(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The atomic rename an operator uses to ship a plugin.
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_library_is_mapped_on_first_use_and_a_file_changed_since_its_check_is_refused() {
    warden::plugins::probe::set_command(warden_bin());
    let dir = plugin_dir(&[]);
    let me = std::process::id();

    let good = dir.path().join("good.so");
    copy_as(&plugin_so("warden_plugin_template"), &good);
    let plugin = warden::plugins::load_file(&good, false).unwrap();
    assert_eq!(plugin.manifest().name, "template");
    assert!(
        !plugin.is_loaded() && !mapped(me, "/good.so"),
        "checked, not mapped"
    );
    let library = plugin.library().unwrap();
    assert_eq!(library.manifest(), plugin.manifest());
    assert!(
        plugin.is_loaded() && mapped(me, "/good.so"),
        "mapped on first use"
    );

    // Another plugin renamed over the file between the check and the first use.
    let changed = dir.path().join("changed.so");
    copy_as(&plugin_so("warden_plugin_template"), &changed);
    let plugin = warden::plugins::load_file(&changed, false).unwrap();
    copy_as(&plugin_so("warden_plugin_test_chaos"), &changed);
    let why = plugin.library().unwrap_err();
    assert_eq!(
        why,
        LoadError::Changed {
            checked: "template 0.1.0".into(),
            loaded: "test-chaos 0.1.0".into()
        }
    );
    assert!(
        why.to_string().ends_with("restart warden to use it"),
        "{why}"
    );
    assert!(!plugin.is_loaded());
    // A refusal stays: the file is not tried again before a restart.
    copy_as(&plugin_so("warden_plugin_template"), &changed);
    assert_eq!(plugin.library().unwrap_err(), why);

    // A new plugin renamed over a library already mapped (as before a reload): the file
    // is checked afresh, but the loader hands back the library mapped at that path.
    copy_as(&plugin_so("warden_plugin_test_chaos"), &good);
    let again = warden::plugins::load_file(&good, false).unwrap();
    assert_eq!(
        again.manifest().name,
        "test-chaos",
        "the probe reads the new file"
    );
    let why = again.library().unwrap_err();
    assert_eq!(
        why,
        LoadError::Changed {
            checked: "test-chaos 0.1.0".into(),
            loaded: "template 0.1.0".into()
        }
    );

    // A file truncated after its check is refused by the ELF check, before any of its
    // code runs, and not mapped.
    let cut = dir.path().join("cut.so");
    copy_as(&plugin_so("warden_plugin_template"), &cut);
    let plugin = warden::plugins::load_file(&cut, false).unwrap();
    let bytes = std::fs::read(&cut).unwrap();
    let half = dir.path().join("half");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    copy_as(&half, &cut);
    let why = plugin.library().unwrap_err();
    assert!(matches!(why, LoadError::Elf(_)), "{why}");
    assert!(!plugin.is_loaded() && !mapped(me, "/cut.so"), "{why}");
}
