//! Whose files warden acts on: a plugin, a config that names passwords and grants, a
//! service file that enrols the host in load balancers. Each must not be writable by
//! group or others, and must be owned by root or by the process's own user: anyone who
//! can write such a file could otherwise run code or steer AWS as warden.
//!
//! Like sshd's StrictModes, a check follows a symlink to the file it names and covers
//! every directory from there up to `/`: whoever can rename a directory on the way can
//! swap the file. A directory writable by others is accepted only with the sticky bit
//! and owned by root (`/tmp`): there nobody but its owner can rename an entry. Plugins
//! use it for their own data files ([`check_file`]); warden for plugins and its config.

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
            "{what} {} is writable by {} (mode {mode:04o}); run chmod go-w on it",
            path.display(),
            match mode & 0o022 {
                0o020 => "its group",
                0o002 => "others",
                _ => "its group and others",
            }
        ));
    }
    let me = euid();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{what} {} is owned by uid {}, not by root or warden's own user (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

/// Checks a directory on the way to a file: owned by root or warden's user, and not
/// writable by group or others unless sticky and owned by root.
pub fn check_ancestor(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o1000 != 0 && meta.uid() == 0 {
        return Ok(());
    }
    check(dir).map_err(|e| format!("on the way to it: {e}"))
}

/// Checks a file: the directory its entry is in, the file it resolves to (through
/// any symlink), and every directory from that file up to `/`.
pub fn check_file(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check(dir)?;
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    check(&real).map_err(|e| {
        if real != path {
            format!("{e} (the target of symlink {})", path.display())
        } else {
            e
        }
    })?;
    let mut dir = real.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        check_ancestor(d).map_err(|e| {
            if real != path {
                format!("{e} (holding the target of symlink {})", path.display())
            } else {
                e
            }
        })?;
        dir = d.parent();
    }
    Ok(())
}

/// Checks a directory and every directory above it.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    check(dir)?;
    let real =
        std::fs::canonicalize(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let mut d = real.parent();
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty()) {
        check_ancestor(p)?;
        d = p.parent();
    }
    Ok(())
}

/// The process's effective uid.
#[allow(unsafe_code)] // a system call
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The process's effective gid.
#[allow(unsafe_code)] // a system call
pub fn egid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

/// Whether people other than the owner (and the process's own group) can read it: a
/// file that holds a secret must not be. `Err` names the mode and the fix.
pub fn check_private(path: &Path, what_secret: &str) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    let others = mode & 0o004 != 0;
    let foreign_group = mode & 0o040 != 0 && meta.gid() != egid();
    if others || foreign_group {
        return Err(format!(
            "{} holds {what_secret} and is readable by {} (mode {mode:04o}, group {}); run chmod 0600 on it, or chown root:<warden's group> and chmod 0640",
            path.display(),
            if others { "others" } else { "a group that is not warden's own" },
            meta.gid()
        ));
    }
    Ok(())
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
        check_file(&f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_file(&f).unwrap_err();
        assert!(
            e.contains("writable by its group and others (mode 0666)"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_file(&f).unwrap_err();
        assert!(e.starts_with("directory") && e.contains("its group"), "{e}");
    }

    #[test]
    fn a_symlink_into_a_writable_directory_and_a_writable_parent_are_refused() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let plugins = base.path().join("plugins");
        let open = base.path().join("open");
        std::fs::create_dir(&plugins).unwrap();
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let target = open.join("p.so");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = plugins.join("p.so");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = check_file(&link).unwrap_err();
        assert!(
            e.contains("open") && e.contains("others") && e.contains("symlink"),
            "{e}"
        );
        // A plugin whose directory is fine but whose parent is group-writable.
        let nested = base.path().join("loose/plugins");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            base.path().join("loose"),
            std::fs::Permissions::from_mode(0o775),
        )
        .unwrap();
        let f = nested.join("q.so");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_file(&f).unwrap_err();
        assert!(e.contains("loose") && e.contains("on the way"), "{e}");
        assert!(check_dir(&nested).is_err());
    }
}
