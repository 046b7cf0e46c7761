//! Epoll instances, capture side: every registration (target, events, data word) from fdinfo's
//! `tfd: N events: HEX data: HEX` lines.
//!
//! A registration names the descriptor number it was added with, but it belongs to the open
//! file: the program may have closed that number since (keeping the file open under another,
//! from `dup`) or even reused it for another file. [`resolve`] asks the kernel which of the
//! program's descriptors is the registered file (`kcmp(KCMP_EPOLL_TFD)`) and records that one;
//! a file no descriptor holds any more makes the epoll unrestorable, said in its description.
#![allow(unsafe_code)]

use alloc::format;
use alloc::vec::Vec;

use snapshim_image::{Epoll, EpollWatch, FdKind, FdState, Unsupported};

use super::Fdinfo;
use crate::sys::{self, sc};

const KCMP_EPOLL_TFD: i32 = 7;

/// `info` is the epoll descriptor's fdinfo.
pub fn capture(info: &Fdinfo) -> FdKind {
    let mut watches = Vec::new();
    for line in info.lines() {
        if let Some(w) = parse_watch(line) {
            watches.push(w);
        }
    }
    FdKind::Epoll(Epoll { watches })
}

/// `tfd:        5 events: 40000019 data:               2a  pos:0 ino:40e sdev:10`
fn parse_watch(line: &str) -> Option<EpollWatch> {
    let rest = line.strip_prefix("tfd:")?;
    let mut words = rest.split_whitespace();
    let fd = words.next()?.parse().ok()?;
    if words.next()? != "events:" {
        return None;
    }
    let events = u32::from_str_radix(words.next()?, 16).ok()?;
    if words.next()? != "data:" {
        return None;
    }
    let data = u64::from_str_radix(words.next()?, 16).ok()?;
    Some(EpollWatch { fd, events, data })
}

/// Points every registration at a descriptor that is its file (see the module comment).
pub fn resolve(out: &mut [FdState]) {
    let pid = sys::getpid();
    let fds: Vec<i32> = out.iter().map(|f| f.fd).collect();
    for st in out.iter_mut() {
        let epfd = st.fd;
        let FdKind::Epoll(ep) = &mut st.kind else {
            continue;
        };
        let mut lost = None;
        let registered: Vec<i32> = ep.watches.iter().map(|w| w.fd).collect();
        for (n, w) in ep.watches.iter_mut().enumerate() {
            // The kernel tells registrations under one number apart by their rank (`toff`),
            // in the order fdinfo lists them.
            let toff = registered[..n]
                .iter()
                .filter(|&&t| t == registered[n])
                .count();
            let tfd = registered[n];
            let is = |fd: i32| same_file(pid, fd, epfd, tfd, toff as u32);
            // Without kcmp (a kernel built without CONFIG_KCMP), the number is trusted.
            if is(tfd).unwrap_or(true) {
                continue;
            }
            match fds.iter().copied().find(|&fd| is(fd) == Some(true)) {
                Some(fd) => w.fd = fd,
                None => lost = Some(w.fd),
            }
        }
        if let Some(tfd) = lost {
            st.kind = FdKind::Unsupported(Unsupported {
                desc: format!(
                    "anon_inode:[eventpoll] watching a file registered as descriptor {tfd}, \
                     which no descriptor of the program holds any more"
                ),
            });
        }
    }
}

/// Whether descriptor `fd` is the file `epfd` watches under the number `tfd` (the `toff`-th
/// registration under that number); `None` if the kernel cannot tell (no kcmp).
fn same_file(pid: i32, fd: i32, epfd: i32, tfd: i32, toff: u32) -> Option<bool> {
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = Slot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff,
    };
    // SAFETY: kcmp only reads the slot.
    let r = unsafe {
        sc!(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            fd,
            &slot as *const Slot
        )
    };
    match r {
        0 => Some(true),
        r if r == -(libc::ENOSYS as i64) || r == -(libc::EPERM as i64) => None,
        _ => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_registration_line_of_this_kernel() {
        let w = parse_watch(
            "tfd:        3 events: 80000019 data: 1122334455667788  pos:0 ino:40e sdev:10",
        )
        .unwrap();
        assert_eq!(
            w,
            EpollWatch {
                fd: 3,
                events: 0x8000_0019,
                data: 0x1122_3344_5566_7788
            }
        );
        assert_eq!(parse_watch("pos:\t0"), None);
    }
}
