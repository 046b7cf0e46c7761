//! The signal API, so the program cannot block, ignore or replace the shim's two signals (the
//! trigger, SIGRTMAX by default, and the internal quiesce signal). What the program asks for on
//! those signals is remembered and reported as a clash, once.
//!
//! The program's own handlers are installed behind a trampoline that counts, per thread, the
//! signals they handle (`state::note_program_signal`) before calling them: an interrupted wait
//! during which no handler of the program's ran is not the program's to see and is resumed
//! (`waits.rs`). `sigaction` reports the program's handler and flags, never the trampoline.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

use libc::{c_int, sigset_t};

use crate::state::{self, QUIESCE_SIG, TRIGGER_SIG};
use crate::sys;

/// The next definition of `name` (glibc's), looked up once into `cache`.
fn next(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = cache.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds glibc's definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        cache.store(f, Relaxed);
    }
    f
}

fn is_ours(sig: c_int) -> bool {
    sig != 0 && (sig == TRIGGER_SIG.load(Relaxed) || sig == QUIESCE_SIG.load(Relaxed))
}

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SigmaskFn = unsafe extern "C" fn(c_int, *const sigset_t, *mut sigset_t) -> c_int;

type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);

/// glibc's sigaction, bypassing our interposition (used by the shim itself).
pub fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let f = next(&REAL_SIGACTION, c"sigaction");
    // SAFETY: f is glibc's sigaction (non-null in any glibc process); pointers come from callers
    // that pass valid or null structures.
    unsafe { core::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
}

/// What the program asked for on our signals: handler and flags (kept, never installed).
static APP_HANDLER: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static APP_FLAGS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static CLASH_REPORTED: AtomicBool = AtomicBool::new(false);

fn clash(sig: c_int) {
    if !CLASH_REPORTED.swap(true, Relaxed) {
        let which = if sig == TRIGGER_SIG.load(Relaxed) {
            "checkpoint"
        } else {
            "internal"
        };
        let mut msg = [0u8; 200];
        let text = sys::format_into(&mut msg, &[
            "snapshim: the program sets a handler for signal ",
            sys::itoa(sig as u64, &mut [0u8; 20]),
            ", snapshim's ", which,
            " signal; the program's handler will not run (choose another with SNAPSHIM_SIGNAL)\n",
        ]);
        let _ = sys::write_all(2, text);
    }
}

/// The program's handler of each signal and whether it takes three arguments (SA_SIGINFO),
/// for [`trampoline`].
static PROGRAM_HANDLER: [AtomicUsize; 65] = [const { AtomicUsize::new(0) }; 65];
static PROGRAM_SIGINFO: [AtomicBool; 65] = [const { AtomicBool::new(false) }; 65];

type Handler3 = extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void);
type Handler1 = extern "C" fn(c_int);

/// Installed in place of every handler of the program's: counts the signal, runs the handler.
extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    state::note_program_signal();
    let i = (sig as usize).min(64);
    let h = PROGRAM_HANDLER[i].load(Relaxed);
    if h <= libc::SIG_IGN {
        return;
    }
    if PROGRAM_SIGINFO[i].load(Relaxed) {
        // SAFETY: the program installed h as a three-argument (SA_SIGINFO) handler.
        unsafe { core::mem::transmute::<usize, Handler3>(h)(sig, info, uc) }
    } else {
        // SAFETY: the program installed h as a one-argument handler.
        unsafe { core::mem::transmute::<usize, Handler1>(h)(sig) }
    }
}

/// `sigaction` for a signal that is not the shim's: a handler goes behind [`trampoline`].
///
/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
unsafe fn program_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !(1..=64).contains(&sig) {
        return real_sigaction(sig, act, old);
    }
    let i = sig as usize;
    let (was_h, was_si) = (
        PROGRAM_HANDLER[i].load(Relaxed),
        PROGRAM_SIGINFO[i].load(Relaxed),
    );
    // SAFETY: a zeroed sigaction is a valid value.
    let mut prev: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: act is null or valid per the contract.
    let r = match unsafe { act.as_ref() } {
        Some(a) if a.sa_sigaction > libc::SIG_IGN => {
            let mut ours = *a;
            PROGRAM_SIGINFO[i].store(a.sa_flags & libc::SA_SIGINFO != 0, Relaxed);
            PROGRAM_HANDLER[i].store(a.sa_sigaction, Relaxed);
            ours.sa_sigaction = trampoline as *const () as usize;
            ours.sa_flags |= libc::SA_SIGINFO;
            real_sigaction(sig, &ours, &mut prev)
        }
        _ => real_sigaction(sig, act, &mut prev),
    };
    if r == 0 && !old.is_null() {
        if prev.sa_sigaction == trampoline as *const () as usize {
            prev.sa_sigaction = was_h;
            if !was_si {
                prev.sa_flags &= !libc::SA_SIGINFO;
            }
        }
        // SAFETY: old is valid per the contract.
        unsafe { *old = prev };
    }
    r
}

/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !is_ours(sig) {
        // SAFETY: forwarded with the caller's contract.
        return unsafe { program_sigaction(sig, act, old) };
    }
    let i = (sig != TRIGGER_SIG.load(Relaxed)) as usize;
    if !old.is_null() {
        // SAFETY: old is valid per the contract.
        unsafe {
            core::ptr::write_bytes(old, 0, 1);
            (*old).sa_sigaction = APP_HANDLER[i].load(Relaxed);
            (*old).sa_flags = APP_FLAGS[i].load(Relaxed) as c_int;
        }
    }
    if !act.is_null() {
        // SAFETY: act is valid per the contract.
        let (h, f) = unsafe { ((*act).sa_sigaction, (*act).sa_flags) };
        APP_HANDLER[i].store(h, Relaxed);
        APP_FLAGS[i].store(f as usize, Relaxed);
        if h != libc::SIG_DFL {
            clash(sig);
        }
    }
    0
}

/// # Safety
/// As `signal(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if !is_ours(sig) {
        // glibc's own, exactly (its mask and siginterrupt's choice of SA_RESTART).
        let f = next(&REAL_SIGNAL, c"signal");
        // SAFETY: f is glibc's signal (non-null in any glibc process), same signature.
        return unsafe { core::mem::transmute::<usize, SignalFn>(f)(sig, handler) };
    }
    // Ours: through the interposed sigaction, which keeps the wish on the side.
    // SAFETY: zeroed sigaction is a valid value.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: act and old are valid; BSD semantics as glibc's signal().
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers are to live structures.
    if unsafe { sigaction(sig, &act, &mut old) } < 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// # Safety
/// As `signal(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: forwarded with the same contract.
    unsafe { signal(sig, handler) }
}

/// Removes our signals from a set the program wants to block.
pub(super) fn filtered(how: c_int, set: *const sigset_t, copy: &mut sigset_t) -> *const sigset_t {
    if set.is_null() || how == libc::SIG_UNBLOCK {
        return set;
    }
    // SAFETY: set is valid per the caller's contract; copy is a live sigset.
    unsafe {
        *copy = *set;
        for s in [TRIGGER_SIG.load(Relaxed), QUIESCE_SIG.load(Relaxed)] {
            if s != 0 {
                libc::sigdelset(copy, s);
            }
        }
    }
    copy
}

/// Calls glibc's `name` (sigprocmask or pthread_sigmask) with our signals taken out of a set
/// the program wants blocked.
///
/// # Safety
/// As `sigprocmask(2)`: `set` and `old` are null or valid.
unsafe fn masked(
    cache: &AtomicUsize,
    name: &core::ffi::CStr,
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = filtered(how, set, &mut copy);
    let f = next(cache, name);
    // SAFETY: f is glibc's function of that signature; sets are valid or null.
    unsafe { core::mem::transmute::<usize, SigmaskFn>(f)(how, set, old) }
}

/// # Safety
/// As `sigprocmask(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's contract.
    unsafe { masked(&REAL_SIGPROCMASK, c"sigprocmask", how, set, old) }
}

/// # Safety
/// As `pthread_sigmask(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's contract.
    unsafe { masked(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask", how, set, old) }
}
