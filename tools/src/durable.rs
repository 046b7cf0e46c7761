//! Committing a file so that a crash never leaves it half there: a rename that never replaces
//! what is at the new name, and the fsync of the directory that makes a rename last. Used by the
//! group sets and by the replication receiver (the shim's commit does the same with raw calls).

use std::path::Path;

/// `rename`, failing with EEXIST rather than replacing `to` (as the shim commits).
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call, relative to no directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// fsync of a directory (its entries: a rename, a new link).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
