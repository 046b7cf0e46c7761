//! Timerfds, capture side: clock, settime flags, time left, interval and expirations not read.
//!
//! fdinfo alone is not enough: once an interval timer has expired, the kernel leaves it
//! stopped (fdinfo shows no time left and one tick) until the next read or `timerfd_gettime`
//! moves it past the overruns and counts them. So `timerfd_gettime` comes first, which does what
//! the program's next read would have done, without consuming anything; fdinfo is read after it.
#![allow(unsafe_code)]

use snapshim_image::{FdKind, Timerfd};

use super::{fdinfo_field, read_fdinfo};
use crate::sys::{self, sc};

pub fn capture(fd: i32) -> FdKind {
    // SAFETY: zeroed itimerspec is valid.
    let mut cur: libc::itimerspec = unsafe { core::mem::zeroed() };
    // SAFETY: cur is a valid out-pointer.
    let _ = sys::check(unsafe {
        sc!(
            libc::SYS_timerfd_gettime,
            fd,
            &mut cur as *mut libc::itimerspec
        )
    });
    let info = read_fdinfo(fd);
    let clock = fdinfo_field(&info, "clockid:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(libc::CLOCK_MONOTONIC);
    let settime_flags = fdinfo_field(&info, "settime flags:")
        .and_then(|v| i32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    let ticks = fdinfo_field(&info, "ticks:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    FdKind::Timerfd(Timerfd {
        clock,
        settime_flags,
        value_ns: ns(&cur.it_value),
        interval_ns: ns(&cur.it_interval),
        ticks,
        now_ns: sys::clock_ns(clock) as i64,
    })
}

fn ns(t: &libc::timespec) -> u64 {
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}
