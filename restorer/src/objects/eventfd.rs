//! An eventfd, made again with its counter and its semaphore mode.

use std::os::fd::RawFd;

use snapshim_image::{Eventfd, FdState};

use super::{move_high, os_error, status_flags, Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, e: &Eventfd) -> Result<Prepared, String> {
    let mut flags = libc::EFD_CLOEXEC | (status_flags(f) & libc::O_NONBLOCK);
    if e.semaphore {
        flags |= libc::EFD_SEMAPHORE;
    }
    // SAFETY: eventfd creates a new descriptor.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(os_error(f, "cannot create an eventfd"));
    }
    let fd = move_high(fd, cx.high_base)?;
    // The counter goes in with a write: eventfd() takes only 32 bits of it.
    if e.count > 0 && write_count(fd, e.count) != 8 {
        return Err(os_error(f, "cannot set an eventfd's counter"));
    }
    Ok(Prepared::At(fd))
}

fn write_count(fd: RawFd, count: u64) -> isize {
    // SAFETY: writes 8 bytes from a local u64.
    unsafe { libc::write(fd, &count as *const u64 as *const libc::c_void, 8) }
}
