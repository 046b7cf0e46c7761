//! Signal dispositions, capture side: the kernel's sigaction of every catchable signal (the
//! shim's own two included: the restored process must have the shim's handlers again), and the
//! signals pending at the checkpoint, with their siginfo.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::*;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize};

use snapshim_image::SigAction;

use super::timers;
use crate::state;
use crate::sys::{self, sc};

/// Every signal's disposition, as the kernel holds it.
pub fn sigactions() -> Vec<SigAction> {
    let mut out = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let mut k = [0u64; 4]; // handler, flags, restorer, mask
                               // SAFETY: rt_sigaction with a null new action writes the 32-byte kernel sigaction.
        if sys::check(unsafe { sc!(libc::SYS_rt_sigaction, sig, 0, k.as_mut_ptr(), 8) }).is_ok() {
            out.push(SigAction {
                signo: sig,
                handler: k[0],
                flags: k[1],
                restorer: k[2],
                mask: k[3],
            });
        }
    }
    out
}

// ---- Pending signals ---------------------------------------------------------------------
//
// Each thread, in the quiesce handler before it parks, dequeues the signals pending for it
// alone (`/proc/thread-self/status`, SigPnd) with their siginfo, and the main thread then those
// pending for the process (ShdPnd); each notes them in `PENDING` and queues them again at once
// (itself: `rt_tgsigqueueinfo` to its own TID, `rt_sigqueueinfo` from the thread whose TID is
// the PID, the only callers the kernel lets queue any siginfo), so the running program keeps
// them. `PENDING` is a static of the shim, part of the image's memory: a restored thread queues
// its own again in `requeue_pending`, the main thread the process's. Left alone: the shim's own
// two signals, glibc's (SIGCANCEL, SIGSETXID), and the signals of periodic POSIX timers (see
// `timers::periodic_timer_signals`).

/// At most this many pending signals per checkpoint; more fails it.
pub const MAX_PENDING: usize = 256;
/// At most this many per thread and per dequeuing pass.
const MAX_PER_PASS: usize = 64;

/// One pending signal: the thread it was pending for (0: the process), its siginfo.
pub struct Pending {
    tid: AtomicI32,
    info: [AtomicU64; 16],
}

#[allow(clippy::declare_interior_mutable_const)]
const PENDING_INIT: Pending = Pending {
    tid: AtomicI32::new(0),
    info: [const { AtomicU64::new(0) }; 16],
};
static PENDING: [Pending; MAX_PENDING] = [PENDING_INIT; MAX_PENDING];
/// Entries claimed in `PENDING` (past `MAX_PENDING`: some did not fit).
static N_PENDING: AtomicUsize = AtomicUsize::new(0);
/// A thread had more than `MAX_PER_PASS` pending: the rest were not noted.
static TOO_MANY: AtomicBool = AtomicBool::new(false);
/// Entries written: `requeue_pending` reads only entries complete at the snapshot.
static DONE: [AtomicBool; MAX_PENDING] = [const { AtomicBool::new(false) }; MAX_PENDING];

/// Before the threads are asked to park (helper).
pub fn reset_pending() {
    TOO_MANY.store(false, Relaxed);
    let n = N_PENDING.swap(0, AcqRel).min(MAX_PENDING);
    for d in &DONE[..n] {
        d.store(false, Relaxed);
    }
}

/// In the writer: fails the checkpoint when pending signals did not fit (`MAX_PENDING` in all,
/// `MAX_PER_PASS` for one thread, or for the process).
pub fn check_pending() -> Result<usize, String> {
    let n = N_PENDING.load(Acquire);
    if n > MAX_PENDING || TOO_MANY.load(Acquire) {
        return Err(alloc::format!(
            "more than {MAX_PENDING} signals pending, or {MAX_PER_PASS} for one thread (blocked)"
        ));
    }
    Ok(n)
}

/// Signals never touched: SIGKILL, SIGSTOP, glibc's two, the shim's two.
fn left_alone() -> u64 {
    let bit = |s: i32| 1u64 << (s - 1);
    bit(libc::SIGKILL)
        | bit(libc::SIGSTOP)
        | bit(32)
        | bit(33)
        | bit(state::TRIGGER_SIG.load(Relaxed))
        | bit(state::QUIESCE_SIG.load(Relaxed))
}

/// In the quiesce handler, before parking: notes this thread's pending signals (and, on the
/// main thread, the process's) and queues them again. Async-signal-safe: raw calls only.
pub fn note_pending() {
    let mut set = 0u64;
    // SAFETY: rt_sigpending writes one 8-byte kernel sigset.
    unsafe { sc!(libc::SYS_rt_sigpending, &mut set as *mut u64, 8) };
    if set & !left_alone() == 0 {
        return;
    }
    let keep = left_alone() | timers::periodic_timer_signals();
    let (pid, tid) = (sys::getpid(), sys::gettid());
    pass(b"SigPnd:\t", keep, tid, tid);
    if tid == pid {
        pass(b"ShdPnd:\t", keep, 0, tid);
    }
}

/// Dequeues what the `field` line of `/proc/thread-self/status` names but `keep`, notes each
/// under `owner` (0: the process), then queues them again in the same order.
fn pass(field: &[u8], keep: u64, owner: i32, me: i32) {
    let mut mine = [0u16; MAX_PER_PASS];
    let mut n = 0;
    loop {
        let set = status_mask(field) & !keep;
        if set == 0 {
            break;
        }
        if n == MAX_PER_PASS {
            TOO_MANY.store(true, Release);
            break;
        }
        let one = 1u64 << set.trailing_zeros();
        let ts = [0i64; 2];
        let mut info = [0u64; 16];
        // SAFETY: rt_sigtimedwait reads the set and the zero timeout, writes one siginfo.
        let sig = unsafe {
            sc!(
                libc::SYS_rt_sigtimedwait,
                &one as *const u64,
                info.as_mut_ptr(),
                ts.as_ptr(),
                8
            )
        };
        if sig <= 0 {
            break;
        }
        let i = N_PENDING.fetch_add(1, AcqRel);
        if i >= MAX_PENDING {
            requeue(owner, me, &info);
            break;
        }
        let e = &PENDING[i];
        e.tid.store(owner, Relaxed);
        for (w, v) in e.info.iter().zip(info) {
            w.store(v, Relaxed);
        }
        DONE[i].store(true, Release);
        mine[n] = i as u16;
        n += 1;
    }
    for &i in &mine[..n] {
        requeue(owner, me, &load(&PENDING[i as usize]));
    }
}

fn load(e: &Pending) -> [u64; 16] {
    let mut info = [0u64; 16];
    for (v, w) in info.iter_mut().zip(&e.info) {
        *v = w.load(Relaxed);
    }
    info
}

/// Queues one signal again: to this thread (`owner` its TID) or to the process (`owner` 0).
fn requeue(owner: i32, me: i32, info: &[u64; 16]) {
    let sig = info[0] as u32 as i32; // si_signo
    let pid = sys::getpid();
    // SAFETY: both read one siginfo; the caller is the target thread, or the main thread for
    // the process, so the kernel takes any si_code.
    unsafe {
        if owner == 0 {
            sc!(libc::SYS_rt_sigqueueinfo, pid, sig, info.as_ptr())
        } else {
            sc!(libc::SYS_rt_tgsigqueueinfo, pid, me, sig, info.as_ptr())
        }
    };
}

/// In a restored thread (signals blocked until it returns): queues again what was pending for
/// it at the snapshot, and on the main thread what was pending for the process.
pub fn requeue_pending(tid: i32) {
    let n = N_PENDING.load(Acquire).min(MAX_PENDING);
    let main = tid == sys::getpid();
    for (e, done) in PENDING[..n].iter().zip(&DONE) {
        let owner = e.tid.load(Relaxed);
        if done.load(Acquire) && (owner == tid || (owner == 0 && main)) {
            requeue(owner, tid, &load(e));
        }
    }
}

/// The hexadecimal mask on the `field` line of this thread's status file (0 if unreadable).
fn status_mask(field: &[u8]) -> u64 {
    let mut buf = [0u8; 4096];
    let len = sys::read_small_file(b"/proc/thread-self/status\0", &mut buf);
    let text = &buf[..len];
    let Some(at) = text.windows(field.len()).position(|w| w == field) else {
        return 0;
    };
    let mut v = 0u64;
    for &c in text[at + field.len()..].iter().take(16) {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => break,
        };
        v = v << 4 | d as u64;
    }
    v
}
