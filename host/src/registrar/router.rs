//! The router's listen ports: one per service front-end port, rendered into an nginx
//! include file. nginx is reloaded (SIGHUP to its master) only when the set changes;
//! backend changes never need a reload, the router reads Redis on every request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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

/// Sends SIGHUP to the nginx master named in `pid_file`.
pub fn reload(pid_file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} does not hold a pid: {text:?}", pid_file.display()))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(format!(
            "cannot signal nginx (pid {pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Follows the wanted ports until shutdown.
pub async fn run(
    ports_file: PathBuf,
    pid_file: Option<PathBuf>,
    mut ports: watch::Receiver<BTreeSet<u16>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wanted = ports.borrow_and_update().clone();
        match write_if_changed(&ports_file, &render(&wanted)) {
            Ok(true) => {
                tracing::info!(ports = %wanted.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), file = %ports_file.display(), "router listen ports changed");
                if let Some(pid_file) = &pid_file {
                    match reload(pid_file) {
                        Ok(()) => tracing::info!("router reloaded"),
                        Err(e) => tracing::error!("cannot reload the router: {e}"),
                    }
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(file = %ports_file.display(), "cannot write the router's ports file: {e}")
            }
        }
        tokio::select! {
            r = ports.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
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
}
