//! SHA-256 pins of plugin files (`plugins.sha256`), as Vault pins each plugin binary:
//! the operator says which build of a plugin warden may run, and a file of that name
//! whose digest differs is refused before it is mapped into warden or an isolated child.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The lower-case hex SHA-256 of what `r` yields.
pub fn digest_of(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `path` against `pin` (hex, any case); the error names both digests.
pub fn verify(path: &Path, plugin: &str, pin: &str) -> Result<(), String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    verify_reader(file, plugin, pin)
}

/// As [`verify`], for an open file (so that what was checked is what is loaded).
pub fn verify_reader(r: impl Read, plugin: &str, pin: &str) -> Result<(), String> {
    let found = digest_of(r).map_err(|e| format!("cannot read it: {e}"))?;
    if found.eq_ignore_ascii_case(pin.trim()) {
        Ok(())
    } else {
        Err(format!(
            "its SHA-256 is {found}, not the {} pinned for plugin {plugin:?} (plugins.sha256)",
            pin.trim().to_ascii_lowercase()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_matches_its_pin_and_nothing_else() {
        // sha256("abc")
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(digest_of(&b"abc"[..]).unwrap(), abc);
        verify_reader(&b"abc"[..], "p", &abc.to_ascii_uppercase()).unwrap();
        let e = verify_reader(&b"abd"[..], "p", abc).unwrap_err();
        assert!(e.contains(abc) && e.contains("plugins.sha256"), "{e}");
    }
}
