//! A timerfd, made again on its clock with its interval, its time left and its expirations not
//! read yet (`TFD_IOC_SET_TICKS`, a kernel built with CONFIG_CHECKPOINT_RESTORE).
//!
//! Time across a restore: the program runs in a time namespace whose `CLOCK_MONOTONIC` and
//! `CLOCK_BOOTTIME` go on from the checkpoint (`ns.rs`), so for those clocks no time passed
//! while it was stopped: the timer keeps its time left, and an absolute one its deadline on the
//! program's clock (`now + time left`, with `TFD_TIMER_ABSTIME`, which the kernel translates
//! out of the namespace). Restored without namespaces the clock jumps, and the time left is
//! still kept. A `CLOCK_REALTIME` timer set absolute keeps its deadline (`TFD_TIMER_ABSTIME`
//! and `TFD_TIMER_CANCEL_ON_SET` as they were): if it passed meanwhile the timer expires at
//! once, counting the intervals missed; one set relative keeps its time left.

use std::os::fd::RawFd;

use snapshim_image::{FdState, Timerfd};

use super::{move_high, os_error, status_flags, Prepare, Prepared};

/// `_IOW('T', 0, __u64)`.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

pub fn prepare(cx: &Prepare, f: &FdState, t: &Timerfd) -> Result<Prepared, String> {
    let flags = libc::TFD_CLOEXEC | (status_flags(f) & libc::O_NONBLOCK);
    // SAFETY: timerfd_create makes a new descriptor.
    let fd = unsafe { libc::timerfd_create(t.clock, flags) };
    if fd < 0 {
        return Err(os_error(
            f,
            &format!("cannot create a timerfd on clock {}", t.clock),
        ));
    }
    let fd = move_high(fd, cx.high_base)?;
    if let Some((value, settime_flags)) = when(t) {
        let spec = libc::itimerspec {
            it_interval: timespec(t.interval_ns as i64),
            it_value: timespec(value),
        };
        // SAFETY: spec is a valid itimerspec; no old value wanted.
        if unsafe { libc::timerfd_settime(fd, settime_flags, &spec, std::ptr::null_mut()) } < 0 {
            return Err(os_error(f, "cannot arm a timerfd"));
        }
    }
    // An expiration the new timer already had (a deadline that passed) is not lost.
    let ticks = t.ticks + ticks_now(fd);
    if ticks > 0 && set_ticks(fd, ticks) < 0 {
        return Err(os_error(
            f,
            "cannot give a timerfd its expirations not read yet (TFD_IOC_SET_TICKS)",
        ));
    }
    Ok(Prepared::At(fd))
}

/// The `it_value` and flags to arm it with (see the module comment); `None`: it was not armed.
///
/// An interval timer can be armed with no time left: its expiration was due at the checkpoint
/// (the kernel reports no time left rather than a negative one, and a timer that expired is
/// stopped until it is read). It expires at once, then every interval.
fn when(t: &Timerfd) -> Option<(i64, i32)> {
    if t.value_ns == 0 && t.interval_ns == 0 {
        return None;
    }
    let left = t.value_ns.max(1) as i64;
    if t.settime_flags & libc::TFD_TIMER_ABSTIME == 0 {
        return Some((left, 0));
    }
    let realtime = matches!(t.clock, libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM);
    let deadline = if realtime {
        t.now_ns.saturating_add(left)
    } else {
        clock_ns(t.clock).saturating_add(left)
    };
    Some((deadline, t.settime_flags))
}

fn set_ticks(fd: RawFd, ticks: u64) -> i32 {
    // SAFETY: the ioctl reads one u64.
    unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks as *const u64) }
}

/// Expirations the new timer counted so far (fdinfo's `ticks`).
fn ticks_now(fd: RawFd) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("ticks:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn clock_ns(clock: i32) -> i64 {
    let mut ts = timespec(0);
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(clock: i32, settime_flags: i32) -> Timerfd {
        Timerfd {
            clock,
            settime_flags,
            value_ns: 2_000_000_000,
            interval_ns: 0,
            ticks: 0,
            now_ns: 1_000_000_000_000,
        }
    }

    #[test]
    fn a_relative_timer_keeps_its_time_left() {
        assert_eq!(
            when(&timer(libc::CLOCK_REALTIME, 0)),
            Some((2_000_000_000, 0))
        );
        assert_eq!(
            when(&timer(libc::CLOCK_MONOTONIC, 0)),
            Some((2_000_000_000, 0))
        );
    }

    #[test]
    fn an_interval_timer_due_at_the_checkpoint_stays_armed() {
        let due = Timerfd {
            value_ns: 0,
            interval_ns: 1_000_000,
            ..timer(libc::CLOCK_MONOTONIC, 0)
        };
        assert_eq!(when(&due), Some((1, 0)));
        let stopped = Timerfd {
            interval_ns: 0,
            ..due
        };
        assert_eq!(when(&stopped), None);
    }

    #[test]
    fn an_absolute_realtime_timer_keeps_its_deadline() {
        let flags = libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET;
        assert_eq!(
            when(&timer(libc::CLOCK_REALTIME, flags)),
            Some((1_002_000_000_000, flags))
        );
    }

    #[test]
    fn an_absolute_monotonic_timer_keeps_its_time_left_on_this_clock() {
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let (deadline, flags) =
            when(&timer(libc::CLOCK_MONOTONIC, libc::TFD_TIMER_ABSTIME)).expect("armed");
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        assert_eq!(flags, libc::TFD_TIMER_ABSTIME);
        assert!(deadline >= before + 2_000_000_000 && deadline <= after + 2_000_000_000);
    }
}
