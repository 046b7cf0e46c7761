//! An epoll instance, made again with every registration.
//!
//! Registrations name descriptors of the program, and the kernel keys each by the open file
//! *and the number it was added under* (a later `epoll_ctl(MOD or DEL, fd)` looks it up by
//! both). So [`prepare`] only creates the instance, and [`register`] adds the registrations once
//! every descriptor of the program, of whatever kind, is on its own number (after
//! `install_fds`), in descriptor order. An epoll watching another epoll works the same way.
//!
//! Readiness is not saved: the kernel polls each target when it is added. A level-triggered
//! registration reports what is ready as before; an edge-triggered one (`EPOLLET`) whose target
//! is ready reports it once more; a one-shot registration that had fired (no event left) is
//! added again with the `EPOLLERR | EPOLLHUP` that `epoll_ctl` always adds.

use std::os::fd::RawFd;

use snapshim_image::{Epoll, FdKind, FdState, Metadata};

use super::{move_high, os_error, status_flags, Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, _e: &Epoll) -> Result<Prepared, String> {
    // SAFETY: epoll_create1 makes a new descriptor.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(os_error(f, "cannot create an epoll instance"));
    }
    let fd = move_high(fd, cx.high_base)?;
    // SAFETY: F_SETFL on our descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFL, status_flags(f)) };
    Ok(Prepared::At(fd))
}

/// Says which registrations [`register`] will drop: those of numbers left closed
/// (`--unrestorable=closed`). Called while stderr is still the restorer's.
pub fn warn_dropped(meta: &Metadata, closed: &[RawFd]) {
    for f in &meta.fds {
        let FdKind::Epoll(e) = &f.kind else { continue };
        for w in e.watches.iter().filter(|w| closed.contains(&w.fd)) {
            eprintln!(
                "snapshim-restore: warning: epoll descriptor {} no longer watches descriptor {} \
                 (closed)",
                f.fd, w.fd
            );
        }
    }
}

/// Adds every registration of every epoll of the program, its descriptors being in place, but
/// those of the numbers in `closed` (see [`warn_dropped`]).
pub fn register(meta: &Metadata, closed: &[RawFd]) -> Result<(), String> {
    for f in &meta.fds {
        let FdKind::Epoll(e) = &f.kind else { continue };
        let mut watches = e.watches.clone();
        watches.sort_by_key(|w| w.fd);
        for w in &watches {
            if closed.contains(&w.fd) {
                continue;
            }
            let mut ev = libc::epoll_event {
                events: w.events,
                u64: w.data,
            };
            // SAFETY: ev is a valid epoll_event; both numbers are the program's, in place.
            if unsafe { libc::epoll_ctl(f.fd, libc::EPOLL_CTL_ADD, w.fd, &mut ev) } < 0 {
                return Err(os_error(
                    f,
                    &format!(
                        "cannot register descriptor {} (events {:#x}) with an epoll instance",
                        w.fd, w.events
                    ),
                ));
            }
        }
    }
    Ok(())
}
