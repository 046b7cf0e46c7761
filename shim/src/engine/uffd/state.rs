//! The engine's state shared by the writer, the fault server and the program's threads (atomics
//! only: the server is a bare thread and the savers run inside interposed calls), and the
//! userfaultfd constants and write-protect calls they all use.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

use crate::sys::kapi::*;
use crate::sys::{self, sc};

// ---------------------------------------------------------------------------------------------
// The engine's userfaultfd features and messages (shared definitions: kapi.rs)

pub(super) const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub(super) const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub(super) const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub(super) const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub(super) const FEATURES: u64 =
    FEATURE_PAGEFAULT_FLAG_WP | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP;

pub(super) const EVENT_PAGEFAULT: u64 = 0x12;
pub(super) const EVENT_REMAP: u64 = 0x14;
pub(super) const EVENT_REMOVE: u64 = 0x15;
pub(super) const EVENT_UNMAP: u64 = 0x16;
pub(super) const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

pub(super) const PAGE: u64 = 4096;
/// Set while a flush is on: the savers and the thread-exit hook act only then.
pub(super) static FLUSHING: AtomicU32 = AtomicU32::new(0);
/// Program threads inside [`save_range`] (futex word: the writer waits for 0 before freeing).
pub(super) static SAVERS: AtomicU32 = AtomicU32::new(0);
/// The fault server's TID, cleared by the kernel when it exits (futex word).
pub(super) static SERVER_TID: AtomicU32 = AtomicU32::new(0);
/// The userfaultfd from [`prepare`] to [`end`] (or [`teardown`]), else -1.
pub(super) static UFFD: AtomicI32 = AtomicI32::new(-1);
/// The pipe that tells the fault server to end (read end, write end).
pub(super) static STOP: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
/// The writer holds the fault server between batches while it takes the snapshot (futex word),
/// and the server says whether it is inside a batch (futex word): see [`hold_server`].
pub(super) static HOLD: AtomicU32 = AtomicU32::new(0);
pub(super) static BUSY: AtomicU32 = AtomicU32::new(0);
/// Regions registered and write-protected ahead of the pause, `[start, end)`; `start` is set to
/// 0 for a region whose protection a thread on its way out lifted. Changed under `PRE_LOCK`.
pub(super) const PRE_MAX: usize = 1024;
pub(super) static PRE: [[AtomicU64; 2]; PRE_MAX] =
    [const { [AtomicU64::new(0), AtomicU64::new(0)] }; PRE_MAX];
pub(super) static PRE_N: AtomicU32 = AtomicU32::new(0);
pub(super) static PRE_LOCK: AtomicU32 = AtomicU32::new(0);
/// Threads that ran their exit hook and may be on their way out: TID and an address on the
/// stack they run on.
pub(super) static EXITING: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
pub(super) static EXITING_SP: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
pub(super) static EXITING_NEXT: AtomicU32 = AtomicU32::new(0);

/// Sets or lifts write protection. The kernel refuses (EAGAIN) while an unmap/remove/remap
/// event is waiting to be read: the fault server reads them, so other threads just retry, and
/// the server itself passes `once` and reads its messages before retrying.
pub(super) fn protect_inner(
    uffd: i32,
    start: u64,
    len: u64,
    on: bool,
    once: bool,
) -> sys::Result<i64> {
    let mut wp = UffdioWriteprotect {
        start,
        len,
        mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    loop {
        match ioctl(
            uffd,
            UFFDIO_WRITEPROTECT,
            &mut wp as *mut UffdioWriteprotect as *mut u8,
        ) {
            Err(libc::EINTR) => continue,
            Err(libc::EAGAIN) if !once => {
                // SAFETY: sched_yield has no arguments.
                unsafe { sc!(libc::SYS_sched_yield) };
            }
            r => return r,
        }
    }
}

pub(super) fn protect(uffd: i32, start: u64, len: u64, on: bool) -> sys::Result<i64> {
    protect_inner(uffd, start, len, on, false)
}
