//! Timers, capture side: the three interval timers (`ITIMER_REAL`, `_VIRTUAL`, `_PROF`).
#![allow(unsafe_code)]

use alloc::vec::Vec;

use snapshim_image::IntervalTimer;

use crate::sys::sc;

/// The interval timers, in `which` order.
pub fn itimers() -> Vec<IntervalTimer> {
    let mut out = Vec::new();
    for which in 0..3 {
        let mut v = [0i64; 4];
        // SAFETY: getitimer writes a struct itimerval (4 longs).
        unsafe { sc!(libc::SYS_getitimer, which, v.as_mut_ptr()) };
        out.push(IntervalTimer {
            interval_us: (v[0] * 1_000_000 + v[1]) as u64,
            value_us: (v[2] * 1_000_000 + v[3]) as u64,
        });
    }
    out
}
