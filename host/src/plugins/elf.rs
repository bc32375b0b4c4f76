//! A cheap first filter before any `dlopen`: is the file a complete ELF shared object?
//!
//! `dlopen` of a truncated ELF (an interrupted copy) dies with SIGBUS inside the calling
//! process, and a library's constructors run at `dlopen`. This reads the file's headers
//! only — no code of the file runs — and refuses a file that is not an ELF shared object,
//! or whose program segments or section table reach past its end.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// Checks the ELF structure of `data` (a whole file); the error says what is wrong.
pub fn check(data: &[u8]) -> Result<(), String> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Err("not an ELF file (not a shared library)".into());
    }
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| {
        format!(
            "not a complete 64-bit ELF file ({e}): truncated, or still being copied? ({} bytes)",
            data.len()
        )
    })?;
    let endian = header
        .endian()
        .map_err(|e| format!("bad ELF header: {e}"))?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err("an ELF file, but not a shared library (ET_DYN)".into());
    }
    let len = data.len() as u64;
    let segments = header.program_headers(endian, data).map_err(|e| {
        format!("program headers cut off ({e}): the file is truncated or still being copied ({len} bytes)")
    })?;
    for (i, ph) in segments.iter().enumerate() {
        let end = ph.p_offset(endian).saturating_add(ph.p_filesz(endian));
        if end > len {
            return Err(format!(
                "truncated: segment {i} ends at byte {end} but the file has {len} bytes (an interrupted or unfinished copy?)"
            ));
        }
    }
    header.section_headers(endian, data).map_err(|e| {
        format!("section table cut off ({e}): the file is truncated or still being copied ({len} bytes)")
    })?;
    Ok(())
}

/// Reads and checks a file.
pub fn check_file(path: &std::path::Path) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    check(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any shared library of this machine serves as a real ELF file.
    fn real_so() -> Vec<u8> {
        let p = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
        ]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libz");
        std::fs::read(p).unwrap()
    }

    #[test]
    fn a_whole_library_passes_and_truncations_are_named() {
        let data = real_so();
        check(&data).unwrap();
        for cut in [10, 100, 1000, data.len() / 2, data.len() - 1] {
            let e = check(&data[..cut]).expect_err(&format!("{cut} bytes accepted"));
            assert!(
                e.contains("truncated") || e.contains("cut off") || e.contains("not a complete"),
                "{cut}: {e}"
            );
        }
        assert!(check(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
    }
}
