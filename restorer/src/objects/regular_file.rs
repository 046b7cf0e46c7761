//! A regular file the program had open: reopened at its offset. A file open for writing is cut
//! back to its checkpoint-time length, so that what the program writes after the restore
//! lands where it did the first time (no duplicated or torn output); a file shorter than then
//! is refused: the program's view of it is gone.

use std::os::fd::RawFd;

use snapshim_image::{FdState, RegularFile};

use super::{access_mode, Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, r: &RegularFile) -> Result<Prepared, String> {
    let RegularFile {
        path, offset, size, ..
    } = r;
    let fd = cx.reopen(f, path, 0)?;
    if access_mode(f) != libc::O_RDONLY {
        let cur = file_size(fd);
        if cur < *size {
            return Err(format!(
                "{path} (descriptor {} of the program) is shorter than at the checkpoint ({cur} < {size} bytes)",
                f.fd
            ));
        }
        // SAFETY: cutting our own descriptor's file back to its checkpoint length.
        if cur > *size && unsafe { libc::ftruncate(fd, *size as i64) } != 0 {
            return Err(format!(
                "cannot cut {path} back to {size} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: lseek on our descriptor.
    unsafe { libc::lseek(fd, *offset as i64, libc::SEEK_SET) };
    Ok(Prepared::At(fd))
}

/// The size of the file open as `fd` (0 if it cannot be had, as before).
fn file_size(fd: RawFd) -> u64 {
    // SAFETY: fstat on our descriptor into a zeroed (valid) stat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st);
        st.st_size as u64
    }
}
