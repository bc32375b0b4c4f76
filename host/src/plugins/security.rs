//! Who may put code into warden: plugin files and their directories must not be writable
//! by group or others, and must be owned by root or by warden's own user. Anyone who
//! can write such a file could otherwise run code as warden.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Checks one file or directory; the error says why it is refused.
pub fn check(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let what = if meta.is_dir() { "directory" } else { "file" };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} {} is writable by {} (mode {mode:04o}); run chmod go-w on it, or pass --allow-insecure-plugins for development",
            path.display(),
            match mode & 0o022 {
                0o020 => "its group",
                0o002 => "others",
                _ => "its group and others",
            }
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{what} {} is owned by uid {}, not by root or warden's own user (uid {me}); or pass --allow-insecure-plugins for development",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

/// Checks a plugin file and the directory that holds it.
pub fn check_plugin_file(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check(dir)?;
    }
    check(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_group_or_world_writable() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.so");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check_plugin_file(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_plugin_file(&f).unwrap_err();
        assert!(
            e.contains("writable by its group and others (mode 0666)"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_plugin_file(&f).unwrap_err();
        assert!(e.starts_with("directory") && e.contains("its group"), "{e}");
    }
}
