//! Trigger: the checkpoint signal's handler (any thread) records who asked for an answer and
//! wakes the helper through a pipe; the helper waits on that pipe or for the interval, and
//! answers each requester after the commit.
#![allow(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

use crate::config::Config;
use crate::sys::{self, sc};

/// The wake pipe: the trigger handler writes, the helper reads.
pub static WAKE_R: AtomicI32 = AtomicI32::new(-1);
pub static WAKE_W: AtomicI32 = AtomicI32::new(-1);
/// Set in a forked child: it has no helper thread.
pub static DISABLED: AtomicU32 = AtomicU32::new(0);

/// Who asked for a checkpoint and wants an answer: (pid << 32 | fd), 0 = free.
const MAX_REQ: usize = 16;
static REQUESTS: [AtomicU64; MAX_REQ] = [const { AtomicU64::new(0) }; MAX_REQ];
/// Handler of the trigger signal: only records the requester and wakes the helper.
pub extern "C" fn trigger_handler(_sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: errno slot of this thread; info is provided by the kernel (SA_SIGINFO).
    unsafe {
        let errno = *libc::__errno_location();
        if !info.is_null() && (*info).si_code == libc::SI_QUEUE {
            let pid = (*info).si_pid() as u64;
            let fd = (*info).si_value().sival_ptr as u64 & 0xffff_ffff;
            let v = pid << 32 | fd;
            for r in REQUESTS.iter() {
                if r.compare_exchange(0, v, AcqRel, Relaxed).is_ok() {
                    break;
                }
            }
        }
        let _ = sys::write(WAKE_W.load(Relaxed), b"c");
        *libc::__errno_location() = errno;
    }
}

/// Answers one requester (see [`take_requests`]) with the outcome's line.
pub fn reply(req: u64, line: &str) {
    let path = alloc::format!("/proc/{}/fd/{}\0", req >> 32, req & 0xffff_ffff);
    if let Ok(fd) = sys::open(
        path.as_bytes(),
        libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0,
    ) {
        let _ = sys::write_all(fd, line.as_bytes());
        sys::close(fd);
    }
}

/// The requests made since the last call, taken (each is answered once).
pub fn take_requests() -> Vec<u64> {
    REQUESTS
        .iter()
        .map(|r| r.swap(0, AcqRel))
        .filter(|&v| v != 0)
        .collect()
}

/// In a restored process: the requests recorded in the image were answered by the original.
pub fn clear_requests() {
    for r in REQUESTS.iter() {
        r.store(0, Relaxed);
    }
}

/// The helper's wait for the next checkpoint: a byte on the wake pipe or the interval's end.
pub struct Waiter {
    wake: i32,
    interval_ms: Option<u64>,
    /// When the interval ends next (monotonic ms).
    next_due: Option<u64>,
}

impl Waiter {
    pub fn new(cfg: &Config) -> Waiter {
        Waiter {
            wake: WAKE_R.load(Relaxed),
            interval_ms: cfg.interval_ms,
            next_due: cfg
                .interval_ms
                .map(|ms| sys::monotonic_ns() / 1_000_000 + ms),
        }
    }

    /// Waits until a checkpoint is due; false if the wait was interrupted (wait again).
    pub fn wait(&mut self) -> bool {
        let timeout = self.next_due.map_or(-1, |due| {
            due.saturating_sub(sys::monotonic_ns() / 1_000_000) as i32
        });
        let mut pfd = libc::pollfd {
            fd: self.wake,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { sc!(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, timeout) };
        if n > 0 {
            let mut buf = [0u8; 64];
            let _ = sys::read(self.wake, &mut buf);
        } else if n == 0 {
            self.next_due = self
                .interval_ms
                .map(|ms| sys::monotonic_ns() / 1_000_000 + ms);
        } else {
            return false;
        }
        true
    }
}
