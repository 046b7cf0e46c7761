//! Parking threads for a snapshot, and waking them up again — in this process or, after a
//! restore, in a new one.
//!
//! Algorithm. The helper sends the quiesce signal to every other thread. Each one enters
//! [`quiesce_handler`] on its own stack; the kernel has pushed a signal frame holding its complete
//! register state (general, FPU, AVX) there. The handler records what the kernel keeps outside
//! memory (fs base, robust list, alternate stack, mask, name) in a [`Slot`], then calls
//! `snapshim_ctx_call`, which pushes the callee-saved registers, stores the stack pointer in the
//! slot, and waits below that point until the snapshot is over:
//!
//! ```text
//!   higher addresses
//!   | app frames ...              |
//!   | kernel signal frame (ucontext + XSAVE area)   <- restored by rt_sigreturn
//!   | quiesce_handler frame       |
//!   | return address, rbp rbx r12..r15              <- slot.ctx_rsp points here
//!   | park() waiting on a futex   |  (below ctx_rsp: never needed again)
//! ```
//!
//! Nothing at or above `ctx_rsp` changes while the thread is parked, so memory captured at any
//! moment of the snapshot holds a consistent stack. To resume a restored thread, the restorer
//! starts a thread with `rsp = ctx_rsp`, fs base set, and jumps to `snapshim_resume`: it pops the
//! registers and returns 1 from `snapshim_ctx_call`, so the handler knows it runs in a restored
//! process, redoes the per-thread kernel state, and returns through the signal frame — every
//! register comes back exactly as it was when the signal arrived.
//!
//! Everything in this module runs in signal context: atomics and raw system calls only.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU32, Ordering::*};

use super::trigger;
use crate::objects::signals;
use crate::objects::threads::{record_thread, restore_thread, MAX_THREADS, NEXT_SLOT, SLOTS};
use crate::sys;

core::arch::global_asm!(
    ".text",
    ".globl snapshim_ctx_call",
    ".hidden snapshim_ctx_call",
    ".type snapshim_ctx_call,@function",
    // u64 snapshim_ctx_call(u64 *ctx, void (*f)(void *), void *arg, void *stack_top)
    "snapshim_ctx_call:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rbx, rdi",
    "test rcx, rcx",
    "jz 2f",
    "mov rsp, rcx",
    "2:",
    "and rsp, -16",
    "mov rdi, rdx",
    "call rsi",
    "mov rsp, [rbx]",
    "xor eax, eax",
    "jmp 3f",
    ".size snapshim_ctx_call, .-snapshim_ctx_call",
    ".globl snapshim_resume",
    ".hidden snapshim_resume",
    ".type snapshim_resume,@function",
    // Entered by a restored thread with rsp = ctx; nothing else is assumed.
    "snapshim_resume:",
    "mov eax, 1",
    "3:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size snapshim_resume, .-snapshim_resume",
);

extern "C" {
    /// Saves callee-saved registers and the stack pointer in `*ctx`, runs `f(arg)` (on
    /// `stack_top` if non-zero), and returns 0; or returns 1 when entered through
    /// `snapshim_resume` in a restored process.
    pub fn snapshim_ctx_call(
        ctx: *mut u64,
        f: extern "C" fn(*mut core::ffi::c_void),
        arg: *mut core::ffi::c_void,
        stack_top: u64,
    ) -> u64;
    pub fn snapshim_resume();
}

/// Non-zero while a snapshot is being taken: only then does the quiesce handler park.
pub static ACTIVE: AtomicU32 = AtomicU32::new(0);
/// Threads parked so far (futex word the helper waits on).
pub static PARKED: AtomicU32 = AtomicU32::new(0);
/// Bumped to release parked threads (futex word they wait on).
pub static RELEASE: AtomicU32 = AtomicU32::new(0);
/// Threads that have finished their post-restore fix-ups (futex word).
pub static RESUMED: AtomicU32 = AtomicU32::new(0);
/// Set by the helper of a restored process once it has noted which memory is mapped from the
/// image (`objects::memory::note_image_mappings`); restored threads wait for it before they return to
/// the program, so a discard of such memory gives zeros from the first instruction on. Cleared
/// before every snapshot, so it is 0 in every image (futex word).
pub static NOTED: AtomicU32 = AtomicU32::new(0);
/// Runs below `ctx_rsp`: counts this thread as parked and waits for the release.
///
/// glibc's SIGSETXID gets through while the thread waits: a thread of the program in the
/// middle of `setuid` waits until every other thread has run glibc's handler, and may not
/// park before that (glibc blocks signals in parts of it); blocked here, it would wait for the
/// end of the pause and the pause for it. The handler runs below `ctx_rsp`, like `park`.
extern "C" fn park(_: *mut core::ffi::c_void) {
    let gen = RELEASE.load(Acquire);
    PARKED.fetch_add(1, Release);
    sys::futex_wake(&PARKED);
    sys::allow_setxid(true);
    while RELEASE.load(Acquire) == gen {
        sys::futex_wait(&RELEASE, gen, None);
    }
    sys::allow_setxid(false);
}

/// Handler of the internal quiesce signal (installed with every signal masked). The same signal,
/// queued by another process, is a `snapshim checkpoint` request: it is queued for the helper
/// (`trigger.rs`) and never parks the thread, not even during a snapshot.
pub extern "C" fn quiesce_handler(_sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: info is the kernel's siginfo (SA_SIGINFO).
    if unsafe { trigger::queued_from_outside(info) } {
        // SAFETY: as above.
        trigger::post(unsafe { trigger::record_of(info) });
    } else if ACTIVE.load(Acquire) != 0 {
        let i = NEXT_SLOT.fetch_add(1, AcqRel) as usize;
        if i < MAX_THREADS {
            let slot = &SLOTS[i];
            record_thread(slot);
            signals::note_pending();
            // SAFETY: the ctx word is this slot's; park runs on this stack below it.
            let restored =
                unsafe { snapshim_ctx_call(slot.ctx_rsp.as_ptr(), park, core::ptr::null_mut(), 0) };
            if restored == 1 {
                restore_thread(slot);
                signals::requeue_pending(slot.tid.load(Relaxed));
                RESUMED.fetch_add(1, Release);
                sys::futex_wake(&RESUMED);
                while NOTED.load(Acquire) == 0 {
                    sys::futex_wait(&NOTED, 0, Some(100_000_000));
                }
            }
        } else {
            // Too many threads: the helper sees NEXT_SLOT overflow and abandons the snapshot.
            PARKED.fetch_add(1, Release);
            sys::futex_wake(&PARKED);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}
