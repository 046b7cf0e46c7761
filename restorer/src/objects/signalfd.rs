//! A signalfd, made again with its mask.

use snapshim_image::{FdState, Signalfd};

use super::{move_high, os_error, status_flags, Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, s: &Signalfd) -> Result<Prepared, String> {
    // SAFETY: an all-zero sigset_t is a valid empty set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    for sig in 1..=64 {
        if s.mask & (1u64 << (sig - 1)) != 0 {
            // SAFETY: set is a valid sigset_t; a signal number outside it is refused, not UB.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
    }
    let flags = libc::SFD_CLOEXEC | (status_flags(f) & libc::O_NONBLOCK);
    // SAFETY: signalfd(-1, ...) creates a new descriptor from a valid set.
    let fd = unsafe { libc::signalfd(-1, &set, flags) };
    if fd < 0 {
        return Err(os_error(f, "cannot create a signalfd"));
    }
    move_high(fd, cx.high_base).map(Prepared::At)
}
