//! A cheap first filter before any `dlopen`: is the file a complete ELF shared object?
//!
//! `dlopen` of a truncated ELF (an interrupted copy) dies with SIGBUS inside the calling
//! process, and a library's constructors run at `dlopen`. This reads the file's headers
//! only — no code of the file runs — and refuses a file that is not an ELF shared object,
//! or whose program segments or section table reach past its end.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, ReadRef};

/// Checks the ELF structure of a file of `len` bytes read through `data` (a slice, or a
/// cache that reads only the ranges asked for); the error says what is wrong.
pub fn check_in<'a, R: ReadRef<'a>>(data: R, len: u64) -> Result<(), String> {
    if data.read_bytes_at(0, 4).ok() != Some(&b"\x7fELF"[..]) {
        return Err("not an ELF file (not a shared library)".into());
    }
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| {
        format!(
            "not a complete 64-bit ELF file ({e}): truncated, or still being copied? ({len} bytes)"
        )
    })?;
    let endian = header
        .endian()
        .map_err(|e| format!("bad ELF header: {e}"))?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err("an ELF file, but not a shared library (ET_DYN)".into());
    }
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

/// Checks the ELF structure of `data` (a whole file in memory).
pub fn check(data: &[u8]) -> Result<(), String> {
    check_in(data, data.len() as u64)
}

/// Checks a file, reading only its headers (a plugin is megabytes; its headers are not).
pub fn check_file(path: &std::path::Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    let cache = object::ReadCache::new(file);
    check_in(&cache, len)
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

    #[test]
    fn a_file_is_checked_through_its_headers_alone() {
        let data = real_so();
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.so");
        let cut = dir.path().join("cut.so");
        std::fs::write(&whole, &data).unwrap();
        std::fs::write(&cut, &data[..data.len() / 3]).unwrap();
        check_file(&whole).unwrap();
        assert!(check_file(&cut).unwrap_err().contains("truncated"));
    }
}
