//! Blocking calls that a signal handler interrupts for good: the kernel restarts `read`,
//! `wait`, a `futex` without timeout... after a handler installed with `SA_RESTART` (as the
//! shim's are), but `epoll_wait`, `poll`, `select`, `nanosleep`, `clock_nanosleep`, `pause`,
//! `sigsuspend`, `sigtimedwait`, a timed `sem_wait` and a `futex` wait with a timeout return
//! `EINTR` after any handler. The
//! shim's quiesce signal reaches every thread at every checkpoint, so without these wrappers
//! an event loop would see `EINTR` at each one, and a restored thread (which resumes by
//! returning from that handler) once more.
//!
//! Each wrapper calls glibc's function and, when it fails with `EINTR` while no handler of the
//! program's ran on this thread since the call began (`state::program_signals_seen`: the program's
//! handlers are counted by the trampoline of `signals.rs`), calls it again with the time that
//! is left (measured on `CLOCK_MONOTONIC` from a deadline taken at the start, or the kernel's
//! remainder for the sleeps; an absolute timeout is passed again as it is). Timed futex waits
//! are seen where the program makes them with `syscall(SYS_futex, ...)`; glibc's own (inside
//! `pthread_cond_timedwait`, `pthread_mutex_timedlock`...) already retry. An interruption
//! with a handler of the program's among those that ran is returned as it is. Signal masks
//! passed to `ppoll`, `pselect`, `epoll_pwait` and `sigsuspend` lose the shim's two signals,
//! as `sigprocmask` does, or a checkpoint could not park the thread.
//!
//! In a restored process the deadline and the counters are on the thread's stack and in its
//! TLS, restored with memory, and `CLOCK_MONOTONIC` goes on from the checkpoint (time
//! namespace), so the call resumes with the time that was left. Without the namespace the
//! clock is this machine's: the time left is capped at the call's whole timeout.
#![allow(unsafe_code)]

use libc::{c_int, c_long, c_uint, sigset_t, timespec, timeval};

use super::signals::filtered;
use crate::state;
use crate::sys;

fn errno() -> c_int {
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Whether an interruption since [`Watch::new`] was the program's: one of its handlers ran on
/// this thread. Any other is the shim's to hide: its own handlers ran here, or this thread was
/// woken for a checkpoint request (sent to the process, `trigger.rs`) that another thread took
/// before it could, and returns `EINTR` having run no handler at all. The kernel does the same
/// for the program's own process-wide signals, and after a stop and a continue: an `EINTR`
/// that no handler explains is one no program can count on, so it is never passed on.
struct Watch {
    program: u64,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            program: state::program_signals_seen(),
        }
    }

    /// `interrupted`: the call failed with EINTR. True when it must be made again.
    fn again(&mut self, interrupted: bool) -> bool {
        interrupted && state::program_signals_seen() == self.program
    }

    /// For calls that return -1 and set errno.
    fn again_errno(&mut self, r: c_long) -> bool {
        self.again(r == -1 && errno() == libc::EINTR)
    }
}

/// When a relative timeout ends, on CLOCK_MONOTONIC; `None`: no timeout.
#[derive(Clone, Copy)]
struct Deadline {
    at_ns: u64,
    whole_ns: u64,
}

impl Deadline {
    fn after_ns(ns: u64) -> Deadline {
        Deadline {
            at_ns: sys::monotonic_ns().saturating_add(ns),
            whole_ns: ns,
        }
    }

    fn after_ms(ms: c_int) -> Option<Deadline> {
        (ms >= 0).then(|| Deadline::after_ns(ms as u64 * 1_000_000))
    }

    fn after_ts(ts: *const timespec) -> Option<Deadline> {
        // SAFETY: ts is null or a valid timespec, per the caller's contract.
        unsafe { ts.as_ref() }.map(|t| Deadline::after_ns(ts_ns(t)))
    }

    /// Time left (never more than the whole timeout: a clock that jumped does not stretch it).
    fn left_ns(&self) -> u64 {
        self.at_ns
            .saturating_sub(sys::monotonic_ns())
            .min(self.whole_ns)
    }

    /// Milliseconds left, rounded up (0 only when the time is up).
    fn left_ms(&self) -> c_int {
        self.left_ns().div_ceil(1_000_000).min(c_int::MAX as u64) as c_int
    }

    fn left_ts(&self) -> timespec {
        ns_ts(self.left_ns())
    }
}

fn ts_ns(t: &timespec) -> u64 {
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64)
}

fn ns_ts(ns: u64) -> timespec {
    timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    }
}

/// `set` without the shim's signals (null stays null).
fn without_ours(set: *const sigset_t, copy: &mut sigset_t) -> *const sigset_t {
    filtered(libc::SIG_SETMASK, set, copy)
}

/// Makes `call` (which returns -1 and sets errno on failure) again for as long as it fails with
/// EINTR because of the shim's signals alone; returns what it returned otherwise.
fn retry<R: Copy + Into<c_long>>(mut call: impl FnMut() -> R) -> R {
    let mut w = Watch::new();
    loop {
        let r = call();
        if !w.again_errno(r.into()) {
            return r;
        }
    }
}

/// [`retry`] for a timeout in milliseconds (negative: none), given each time as the time left.
fn retry_ms(timeout: c_int, mut call: impl FnMut(c_int) -> c_int) -> c_int {
    let d = Deadline::after_ms(timeout);
    retry(|| call(d.map_or(timeout, |d| d.left_ms())))
}

/// [`retry`] for a relative timeout (null: none), given each time as the time left.
fn retry_ts<R: Copy + Into<c_long>>(
    timeout: *const timespec,
    mut call: impl FnMut(*const timespec) -> R,
) -> R {
    let d = Deadline::after_ts(timeout);
    retry(|| {
        let left = d.map(|d| d.left_ts());
        call(
            left.as_ref()
                .map_or(core::ptr::null(), |t| t as *const timespec),
        )
    })
}

type EpollWait = unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
type EpollPwait =
    unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int, *const sigset_t) -> c_int;
type EpollPwait2 = unsafe extern "C" fn(
    c_int,
    *mut libc::epoll_event,
    c_int,
    *const timespec,
    *const sigset_t,
) -> c_int;
type Poll = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
type Ppoll = unsafe extern "C" fn(
    *mut libc::pollfd,
    libc::nfds_t,
    *const timespec,
    *const sigset_t,
) -> c_int;
type FdSet = *mut libc::fd_set;
type Select = unsafe extern "C" fn(c_int, FdSet, FdSet, FdSet, *mut timeval) -> c_int;
type Pselect =
    unsafe extern "C" fn(c_int, FdSet, FdSet, FdSet, *const timespec, *const sigset_t) -> c_int;
type Nanosleep = unsafe extern "C" fn(*const timespec, *mut timespec) -> c_int;
type ClockNanosleep =
    unsafe extern "C" fn(libc::clockid_t, c_int, *const timespec, *mut timespec) -> c_int;
type Pause = unsafe extern "C" fn() -> c_int;
type Sigsuspend = unsafe extern "C" fn(*const sigset_t) -> c_int;
type Sigtimedwait =
    unsafe extern "C" fn(*const sigset_t, *mut libc::siginfo_t, *const timespec) -> c_int;
type Sigwaitinfo = unsafe extern "C" fn(*const sigset_t, *mut libc::siginfo_t) -> c_int;
type SemTimedwait = unsafe extern "C" fn(*mut libc::sem_t, *const timespec) -> c_int;
type SemClockwait =
    unsafe extern "C" fn(*mut libc::sem_t, libc::clockid_t, *const timespec) -> c_int;

/// # Safety
/// As `epoll_wait(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    let f = real!(epoll_wait: EpollWait);
    // SAFETY: forwarded with the caller's contract.
    retry_ms(timeout, |t| unsafe { f(epfd, events, max, t) })
}

/// # Safety
/// As `epoll_pwait(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    set: *const sigset_t,
) -> c_int {
    let f = real!(epoll_pwait: EpollPwait);
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = without_ours(set, &mut copy);
    // SAFETY: forwarded with the caller's contract.
    retry_ms(timeout, |t| unsafe { f(epfd, events, max, t, set) })
}

/// # Safety
/// As `epoll_pwait2(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: *const timespec,
    set: *const sigset_t,
) -> c_int {
    let f = real!(epoll_pwait2: EpollPwait2);
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = without_ours(set, &mut copy);
    // SAFETY: forwarded with the caller's contract; t is null or a live timespec.
    retry_ts(timeout, |t| unsafe { f(epfd, events, max, t, set) })
}

/// # Safety
/// As `poll(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    let f = real!(poll: Poll);
    // SAFETY: forwarded with the caller's contract.
    retry_ms(timeout, |t| unsafe { f(fds, n, t) })
}

/// # Safety
/// As `ppoll(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: *const timespec,
    set: *const sigset_t,
) -> c_int {
    let f = real!(ppoll: Ppoll);
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = without_ours(set, &mut copy);
    // SAFETY: forwarded with the caller's contract; t is null or a live timespec.
    retry_ts(timeout, |t| unsafe { f(fds, n, t, set) })
}

/// # Safety
/// As `select(2)`. Linux's select writes the time left into `timeout`; so does this one.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn select(
    n: c_int,
    r: FdSet,
    wr: FdSet,
    e: FdSet,
    timeout: *mut timeval,
) -> c_int {
    let f = real!(select: Select);
    // SAFETY: timeout is null or valid per the contract.
    let d = unsafe { timeout.as_ref() }.map(|t| {
        Deadline::after_ns(
            (t.tv_sec.max(0) as u64) * 1_000_000_000 + t.tv_usec.max(0) as u64 * 1000,
        )
    });
    let mut w = Watch::new();
    loop {
        // SAFETY: forwarded with the caller's contract (the sets are left as they were when
        // select fails, so they are passed again as the program filled them).
        let res = unsafe { f(n, r, wr, e, timeout) };
        if !w.again_errno(res as c_long) {
            return res;
        }
        if let Some(d) = d {
            let left = d.left_ns();
            // SAFETY: timeout is non-null when d is set.
            unsafe {
                (*timeout).tv_sec = (left / 1_000_000_000) as i64;
                (*timeout).tv_usec = ((left % 1_000_000_000) / 1000) as i64;
            }
        }
    }
}

/// # Safety
/// As `pselect(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: FdSet,
    wr: FdSet,
    e: FdSet,
    timeout: *const timespec,
    set: *const sigset_t,
) -> c_int {
    let f = real!(pselect: Pselect);
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = without_ours(set, &mut copy);
    // SAFETY: forwarded with the caller's contract; t is null or a live timespec.
    retry_ts(timeout, |t| unsafe { f(n, r, wr, e, t, set) })
}

/// # Safety
/// As `nanosleep(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nanosleep(req: *const timespec, rem: *mut timespec) -> c_int {
    let f = real!(nanosleep: Nanosleep);
    let mut w = Watch::new();
    // SAFETY: req is valid per the contract (glibc reports EFAULT otherwise; so do we).
    let Some(mut cur) = (unsafe { req.as_ref() }).copied() else {
        // SAFETY: forwarded as it is.
        return unsafe { f(req, rem) };
    };
    let mut left = ns_ts(0);
    loop {
        // SAFETY: cur and left are live timespecs.
        let r = unsafe { f(&cur, &mut left) };
        if !w.again_errno(r as c_long) {
            if !rem.is_null() {
                // SAFETY: rem is valid per the contract.
                unsafe { *rem = left };
            }
            return r;
        }
        cur = left;
    }
}

/// # Safety
/// As `clock_nanosleep(2)` (returns the error number).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn clock_nanosleep(
    clock: libc::clockid_t,
    flags: c_int,
    req: *const timespec,
    rem: *mut timespec,
) -> c_int {
    let f = real!(clock_nanosleep: ClockNanosleep);
    let mut w = Watch::new();
    // SAFETY: req is valid per the contract.
    let Some(mut cur) = (unsafe { req.as_ref() }).copied() else {
        // SAFETY: forwarded as it is.
        return unsafe { f(clock, flags, req, rem) };
    };
    let mut left = ns_ts(0);
    loop {
        // SAFETY: cur and left are live timespecs.
        let r = unsafe { f(clock, flags, &cur, &mut left) };
        if !w.again(r == libc::EINTR) {
            if !rem.is_null() && r == libc::EINTR {
                // SAFETY: rem is valid per the contract.
                unsafe { *rem = left };
            }
            return r;
        }
        if flags & libc::TIMER_ABSTIME == 0 {
            cur = left;
        }
    }
}

/// # Safety
/// As `usleep(3)`: glibc's calls its own nanosleep, which is not this one.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn usleep(us: libc::useconds_t) -> c_int {
    let t = ns_ts(us as u64 * 1000);
    // SAFETY: t is a live timespec.
    unsafe { nanosleep(&t, core::ptr::null_mut()) }
}

/// # Safety
/// As `sleep(3)`: returns the whole seconds not slept when a handler of the program's
/// interrupted it, and leaves errno alone otherwise (as glibc's).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sleep(s: c_uint) -> c_uint {
    let saved = errno();
    let mut t = ns_ts(s as u64 * 1_000_000_000);
    let p: *mut timespec = &mut t;
    // SAFETY: p is a live timespec, read before the kernel writes the time left into it.
    if unsafe { nanosleep(p, p) } != 0 {
        return t.tv_sec as c_uint;
    }
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = saved };
    0
}

/// # Safety
/// As `pause(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pause() -> c_int {
    let f = real!(pause: Pause);
    // SAFETY: no arguments.
    retry(|| unsafe { f() })
}

/// # Safety
/// As `sigsuspend(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigsuspend(set: *const sigset_t) -> c_int {
    let f = real!(sigsuspend: Sigsuspend);
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = without_ours(set, &mut copy);
    // SAFETY: forwarded with the caller's contract.
    retry(|| unsafe { f(set) })
}

/// # Safety
/// As `sigtimedwait(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigtimedwait(
    set: *const sigset_t,
    info: *mut libc::siginfo_t,
    timeout: *const timespec,
) -> c_int {
    let f = real!(sigtimedwait: Sigtimedwait);
    // SAFETY: forwarded with the caller's contract; t is null or a live timespec.
    retry_ts(timeout, |t| unsafe { f(set, info, t) })
}

/// # Safety
/// As `sigwaitinfo(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigwaitinfo(set: *const sigset_t, info: *mut libc::siginfo_t) -> c_int {
    let f = real!(sigwaitinfo: Sigwaitinfo);
    // SAFETY: forwarded with the caller's contract.
    retry(|| unsafe { f(set, info) })
}

/// # Safety
/// As `sem_timedwait(3)` (an absolute timeout: passed again as it is).
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sem_timedwait(sem: *mut libc::sem_t, abs: *const timespec) -> c_int {
    let f = real!(sem_timedwait: SemTimedwait);
    // SAFETY: forwarded with the caller's contract.
    retry(|| unsafe { f(sem, abs) })
}

/// # Safety
/// As `sem_clockwait(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sem_clockwait(
    sem: *mut libc::sem_t,
    clock: libc::clockid_t,
    abs: *const timespec,
) -> c_int {
    let f = real!(sem_clockwait: SemClockwait);
    // SAFETY: forwarded with the caller's contract.
    retry(|| unsafe { f(sem, clock, abs) })
}

/// # Safety
/// As `syscall(2)`, which takes up to six arguments after the number: declared here with all
/// six (a variadic caller passes them in the same registers, and glibc's reads all six too).
/// Made here as glibc makes it (the system call, errno from a result in -4095..-1), without
/// looking glibc's up: the shim's own code (Rust's std) calls `syscall` too, maybe in the
/// writer, where `dlsym` could wait for a lock a parked thread holds.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    let f = |a4: c_long| {
        // SAFETY: the caller's system call, with the caller's arguments (a4 maybe ours: a live
        // timespec).
        let r = unsafe {
            sys::syscall6(
                n, a1 as u64, a2 as u64, a3 as u64, a4 as u64, a5 as u64, a6 as u64,
            )
        };
        if (-4095..0).contains(&r) {
            // SAFETY: this thread's errno slot.
            unsafe { *libc::__errno_location() = -r as c_int };
            return -1;
        }
        r
    };
    if n != libc::SYS_futex || a4 == 0 || !is_timed_wait(a2 as c_int) {
        return f(a4);
    }
    // FUTEX_WAIT's timeout is relative (CLOCK_MONOTONIC); the others' absolute.
    let relative = a2 as c_int & libc::FUTEX_CMD_MASK == libc::FUTEX_WAIT;
    let d = if relative {
        Deadline::after_ts(a4 as *const timespec)
    } else {
        None
    };
    retry(|| {
        let left = d.map(|d| d.left_ts());
        f(left.as_ref().map_or(a4, |t| t as *const timespec as c_long))
    })
}

/// The futex operations that wait with a timeout.
fn is_timed_wait(op: c_int) -> bool {
    matches!(
        op & libc::FUTEX_CMD_MASK,
        libc::FUTEX_WAIT | libc::FUTEX_WAIT_BITSET | libc::FUTEX_WAIT_REQUEUE_PI
    )
}
