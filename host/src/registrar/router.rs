//! The router's listen ports: one per service front-end port, rendered into an nginx
//! include file. nginx is reloaded (SIGHUP to its master) only when the set changes;
//! backend changes never need a reload, the router reads Redis on every request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

/// The include file's text for a set of ports.
pub fn render(ports: &BTreeSet<u16>) -> String {
    let mut s =
        String::from("# Written by warden: the port front-ends of the services. Do not edit.\n");
    for p in ports {
        s.push_str(&format!("listen {p};\n"));
    }
    s
}

/// Writes the file if its text differs (atomic rename); true if it changed.
pub fn write_if_changed(path: &Path, text: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// Why a reload was not sent.
#[derive(Debug, PartialEq)]
pub enum ReloadError {
    /// No pid file: the router has not started yet (it reads the ports file when it
    /// does), or it is not running.
    NotRunning(String),
    /// A pid file that does not hold a live nginx, or a signal refused.
    Failed(String),
}

/// Sends SIGHUP to the nginx master named in `pid_file`.
#[allow(unsafe_code)] // system calls
pub fn reload(pid_file: &Path) -> Result<(), ReloadError> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        let message = format!("cannot read {}: {e}", pid_file.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            ReloadError::NotRunning(message)
        } else {
            ReloadError::Failed(message)
        }
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        ReloadError::Failed(format!(
            "{} does not hold a pid: {text:?}",
            pid_file.display()
        ))
    })?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(ReloadError::Failed(format!(
            "cannot signal nginx (pid {pid}, from {}): {}",
            pid_file.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// How long the router may be absent before warden says so (once).
const ROUTER_ABSENT_WARN: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the loop still owes the router, and what it has said about it.
#[derive(Default)]
struct Pending {
    /// The set last written to the ports file.
    written: Option<BTreeSet<u16>>,
    reload: bool,
    retry: Option<Duration>,
    absent_since: Option<tokio::time::Instant>,
    said_absent: bool,
    said_failure: bool,
}

impl Pending {
    fn write(&mut self, ports_file: &Path, wanted: &BTreeSet<u16>, reloads: bool) {
        match write_if_changed(ports_file, &render(wanted)) {
            Ok(changed) => {
                if changed {
                    tracing::info!(ports = %wanted.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), file = %ports_file.display(), "router listen ports changed");
                    self.reload |= reloads;
                }
                self.written = Some(wanted.clone());
                self.said_failure = false;
            }
            Err(e) => self.failed(format!("cannot write {}: {e}", ports_file.display())),
        }
    }

    fn reload(&mut self, pid_file: &Path) {
        match reload(pid_file) {
            Ok(()) => {
                tracing::info!("router reloaded");
                *self = Pending {
                    written: self.written.take(),
                    ..Pending::default()
                };
            }
            // A normal start order (warden before the router): wait quietly, say it
            // once if the router never comes.
            Err(ReloadError::NotRunning(e)) => {
                let since = *self
                    .absent_since
                    .get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= ROUTER_ABSENT_WARN && !self.said_absent {
                    self.said_absent = true;
                    tracing::warn!(pid_file = %pid_file.display(), "the router has not started in {}s ({e}); its listen ports are in the ports file, which it reads when it starts", ROUTER_ABSENT_WARN.as_secs());
                }
                self.retry = Some(Duration::from_secs(1));
            }
            Err(ReloadError::Failed(e)) => self.failed(format!("cannot reload the router: {e}")),
        }
    }

    /// Said once, then retried with a doubling delay until it works.
    fn failed(&mut self, message: String) {
        if !self.said_failure {
            self.said_failure = true;
            tracing::error!("{message}; retrying");
        } else {
            tracing::debug!("{message}; retrying");
        }
        let next = self
            .retry
            .map_or(Duration::from_secs(1), |r| (r * 2).min(RETRY_MAX));
        self.retry = Some(next);
    }

    fn due(&self, wanted: &BTreeSet<u16>) -> bool {
        self.reload || self.written.as_ref() != Some(wanted)
    }
}

/// Follows the wanted ports until shutdown: writes the ports file when the set changes
/// and reloads the router; a failed write or reload is retried until it works.
pub async fn run(
    ports_file: PathBuf,
    pid_file: Option<PathBuf>,
    mut ports: watch::Receiver<BTreeSet<u16>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending = Pending::default();
    loop {
        let wanted = ports.borrow_and_update().clone();
        if pending.written.as_ref() != Some(&wanted) {
            pending.write(&ports_file, &wanted, pid_file.is_some());
        }
        if let (true, Some(pid_file)) = (pending.reload, &pid_file) {
            pending.reload(pid_file);
        }
        let retry = pending
            .due(&wanted)
            .then(|| pending.retry.unwrap_or(Duration::from_secs(1)));
        tokio::select! {
            r = ports.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_listen_line_per_port_and_rewrites_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ports.conf");
        let text = render(&BTreeSet::from([8002, 8001]));
        assert!(text.ends_with("listen 8001;\nlisten 8002;\n"), "{text}");
        assert!(write_if_changed(&f, &text).unwrap());
        assert!(!write_if_changed(&f, &text).unwrap());
        assert!(write_if_changed(&f, &render(&BTreeSet::new())).unwrap());
    }

    /// A process that SIGHUP ends (so that a reload sent to it is seen).
    fn hup_target() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    fn ended_by_hup(child: &mut std::process::Child) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.signal() == Some(libc::SIGHUP);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        false
    }

    /// Waits (5 s at most) until `file` holds `text`.
    async fn until_written(file: &Path, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(file).is_ok_and(|t| t.contains(text)) {
            assert!(std::time::Instant::now() < deadline, "{text:?} not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A "router" starts and writes its pid file; whether it gets the reload (SIGHUP).
    async fn router_appears(pid_file: &Path) -> bool {
        let mut router = hup_target();
        std::fs::write(pid_file, router.id().to_string()).unwrap();
        tokio::task::spawn_blocking(move || ended_by_hup(&mut router))
            .await
            .unwrap()
    }

    #[test]
    fn a_missing_pid_file_is_a_router_not_started_yet() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            reload(&dir.path().join("nginx.pid")),
            Err(ReloadError::NotRunning(_))
        ));
        std::fs::write(dir.path().join("bad.pid"), "x").unwrap();
        assert!(matches!(
            reload(&dir.path().join("bad.pid")),
            Err(ReloadError::Failed(_))
        ));
    }

    /// warden before the router: the ports are written at once, and the reload is sent
    /// when the router's pid file appears; a pid file that names no process is retried
    /// until it names one.
    #[tokio::test]
    async fn reloads_wait_for_the_router_and_failures_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (ports_file, pid_file) = (dir.path().join("ports.conf"), dir.path().join("nginx.pid"));
        let (tx, rx) = watch::channel(BTreeSet::from([8001]));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(ports_file.clone(), Some(pid_file.clone()), rx, stop));
        until_written(&ports_file, "listen 8001;").await;
        assert!(
            router_appears(&pid_file).await,
            "the reload was not sent once the router appeared"
        );

        // A stale pid file (a process that is gone): retried until it names nginx.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        std::fs::write(&pid_file, gone.id().to_string()).unwrap();
        tx.send(BTreeSet::from([8001, 8002])).unwrap();
        // The reload is tried right after the write, in the same step.
        until_written(&ports_file, "listen 8002;").await;
        assert!(
            router_appears(&pid_file).await,
            "a failed reload was not retried"
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
