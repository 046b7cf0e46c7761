//! `timer_settime`, whose `TIMER_ABSTIME` the kernel does not tell a checkpoint: noted
//! (`objects::timers::note_settime`) so that a wall-clock POSIX timer set absolute keeps its
//! deadline across a restore. A raw `timer_settime` system call is not seen: such a timer
//! comes back with its time left (docs/limits.md).
#![allow(unsafe_code)]

use libc::{c_int, itimerspec, timer_t};

type TimerSettime =
    unsafe extern "C" fn(timer_t, c_int, *const itimerspec, *mut itimerspec) -> c_int;

/// # Safety
/// As `timer_settime(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn timer_settime(
    timer: timer_t,
    flags: c_int,
    new: *const itimerspec,
    old: *mut itimerspec,
) -> c_int {
    let f = real!(timer_settime: TimerSettime);
    // SAFETY: forwarded with the caller's contract.
    let r = unsafe { f(timer, flags, new, old) };
    // glibc's timer_t is the kernel's timer ID, except for SIGEV_THREAD timers (a negative
    // value naming glibc's record of the timer), which are left out.
    let id = timer as isize;
    if r == 0 && (0..=i32::MAX as isize).contains(&id) {
        crate::objects::timers::note_settime(id as i32, flags & libc::TIMER_ABSTIME != 0);
    }
    r
}
