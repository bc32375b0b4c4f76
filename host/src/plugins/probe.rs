//! Each plugin file is opened first in a short-lived child process (warden re-executed as
//! the hidden `warden plugins probe FILE`), so that a file that crashes, aborts or hangs
//! while loading — a truncated copy, a constructor that misbehaves — costs that child,
//! not the daemon. The child checks the ELF structure, loads the file as warden would
//! (interface version, manifest) and prints one JSON line; the parent turns a crash, a
//! hang or a refusal into the file's one-line reason.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The executable that answers `plugins probe` (set by the `warden` binary at start;
/// unset in a library user such as a test, which then loads without a probe).
static COMMAND: OnceLock<PathBuf> = OnceLock::new();

pub fn set_command(exe: PathBuf) {
    let _ = COMMAND.set(exe);
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the child probe off or on (the benchmark compares both).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// The warden executable, when known (it also hosts isolated plugins).
pub fn command() -> Option<&'static PathBuf> {
    COMMAND.get()
}

/// How long a probe may take (a constructor that hangs).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What the child prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The manifest, as checked by loading the file in the child: the parent needs no
    /// more to list the plugin and check configs against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<warden_plugin_api::Manifest>,
}

/// The child's side: check and load `path`, say what happened.
pub fn run_here(path: &Path) -> Report {
    if let Err(reason) = super::elf::check_file(path) {
        return Report {
            ok: false,
            reason: Some(reason),
            name: None,
            manifest: None,
        };
    }
    match warden_plugin_api::host::Library::load(path) {
        Ok(lib) => Report {
            ok: true,
            reason: None,
            name: Some(lib.manifest().name.clone()),
            manifest: Some(lib.manifest().clone()),
        },
        Err(e) => Report {
            ok: false,
            reason: Some(e.to_string()),
            name: None,
            manifest: None,
        },
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGKILL => "SIGKILL".into(),
        n => format!("signal {n}"),
    }
}

/// The parent's side: probes `path` in a child. `Ok(None)` without a probe command.
pub fn in_child(path: &Path) -> Result<Option<Report>, String> {
    let Some(exe) = COMMAND.get() else {
        return Ok(None);
    };
    if !ENABLED.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let mut child = Command::new(exe)
        .args(["plugins", "probe"])
        .arg(path)
        // The file is not trusted yet (its constructors run here): none of warden's
        // environment, where AWS and Redis secrets may be.
        .env_clear()
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the probe ({}): {e}", exe.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        // A report is a manifest: a few kB. Bounded, whatever the file prints.
        let mut out = String::new();
        let _ = stdout.take(4 << 20).read_to_string(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hung while loading (no answer within {}s; a constructor that never returns?)",
                    TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("probe: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&status) {
        let hint = if sig == libc::SIGBUS {
            ": the file may be truncated or still being copied"
        } else {
            ""
        };
        return Err(format!(
            "crashed while loading ({}){hint}",
            signal_name(sig)
        ));
    }
    // A constructor may print too: the report is the last line that parses.
    let report = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Report>(l).ok())
        .ok_or_else(|| {
            format!(
                "the probe gave no report (exit status {}); the library may have ended the process while loading",
                status.code().map_or("none".into(), |c| c.to_string())
            )
        })?;
    Ok(Some(report))
}
