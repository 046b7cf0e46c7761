//! Timers, capture side: the three interval timers (`ITIMER_REAL`, `_VIRTUAL`, `_PROF`), and
//! the POSIX timers (`timer_create`), which the shim itself makes again after a restore.
#![allow(unsafe_code)]

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::*;
use core::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, AtomicUsize};

use snapshim_image::IntervalTimer;

use crate::sys::{self, sc};

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

// ---- POSIX timers (`timer_create`) -------------------------------------------------------
//
// The writer reads every timer into `POSIX_TIMERS`, a static of the shim: statics are memory
// of the image, so a restored process finds the table as it was at the snapshot, and the helper
// re-creates the timers from it (`restore_posix_timers`, from `resume::after_restore`) while
// every thread exists (a SIGEV_THREAD_ID timer names its thread) and none runs yet.

/// At most this many POSIX timers; more fails the checkpoint.
pub const MAX_POSIX_TIMERS: usize = 256;
/// `prctl` option (Linux 6.15+): `timer_create` takes the ID it is given (CRIU's).
const PR_TIMER_CREATE_RESTORE_IDS: i32 = 77;

/// The IDs of the timers the program last set with an absolute deadline (`TIMER_ABSTIME`),
/// which neither `/proc/self/timers` nor `timer_gettime` tell: noted by the interposed
/// `timer_settime` (`note_settime`); -1 marks a free slot.
static ABSOLUTE: [AtomicI32; MAX_POSIX_TIMERS] = [const { AtomicI32::new(-1) }; MAX_POSIX_TIMERS];

/// Timer `id` was just set, with an absolute deadline or not. Async-signal-safe (atomics).
pub fn note_settime(id: i32, absolute: bool) {
    let slot = ABSOLUTE.iter().find(|s| s.load(Relaxed) == id);
    match (slot, absolute) {
        (Some(_), true) | (None, false) => {}
        (Some(s), false) => s.store(-1, Relaxed),
        (None, true) => {
            // With the table full of absolute timers, this one comes back relative.
            let free = |s: &&AtomicI32| s.compare_exchange(-1, id, Relaxed, Relaxed).is_ok();
            let _ = ABSOLUTE.iter().find(free);
        }
    }
}

fn is_absolute(id: i32) -> bool {
    ABSOLUTE.iter().any(|s| s.load(Relaxed) == id)
}

/// A wall-clock timer keeps its deadline across a restore: the time between checkpoint and
/// restore passed for it as for the clock. (`CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` go on from
/// the checkpoint in the restore's time namespace: their time left is their deadline.)
fn wall_clock(clock: i32) -> bool {
    matches!(
        clock,
        libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM | libc::CLOCK_TAI
    )
}

/// One timer as `/proc/self/timers` and `timer_gettime` tell it.
pub struct PosixTimer {
    id: AtomicI32,
    clock: AtomicI32,
    /// SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD (glibc's helper thread), | SIGEV_THREAD_ID.
    notify: AtomicI32,
    signo: AtomicI32,
    /// SIGEV_THREAD_ID's target TID.
    tid: AtomicI32,
    value: AtomicU64,
    interval_ns: AtomicU64,
    left_ns: AtomicU64,
    /// For a wall-clock timer set absolute: its deadline on its clock (ns); 0 otherwise.
    deadline_ns: AtomicI64,
}

#[allow(clippy::declare_interior_mutable_const)]
const TIMER_INIT: PosixTimer = PosixTimer {
    id: AtomicI32::new(0),
    clock: AtomicI32::new(0),
    notify: AtomicI32::new(0),
    signo: AtomicI32::new(0),
    tid: AtomicI32::new(0),
    value: AtomicU64::new(0),
    interval_ns: AtomicU64::new(0),
    left_ns: AtomicU64::new(0),
    deadline_ns: AtomicI64::new(0),
};
static POSIX_TIMERS: [PosixTimer; MAX_POSIX_TIMERS] = [TIMER_INIT; MAX_POSIX_TIMERS];
static N_POSIX_TIMERS: AtomicUsize = AtomicUsize::new(0);

/// Reads every POSIX timer of the process into the shim's table (writer, in the pause).
pub fn capture_posix_timers() -> Result<usize, String> {
    let mut text = Vec::new();
    sys::read_file(b"/proc/self/timers\0", &mut text)
        .map_err(|e| format!("cannot read /proc/self/timers: errno {e}"))?;
    let text = core::str::from_utf8(&text).unwrap_or("");
    let timers = parse_timers(text).ok_or("cannot parse /proc/self/timers")?;
    if timers.len() > MAX_POSIX_TIMERS {
        return Err(format!(
            "more than {MAX_POSIX_TIMERS} POSIX timers (timer_create)"
        ));
    }
    let mut n = 0;
    for t in timers {
        let mut spec = [0i64; 4]; // interval sec, nsec, value sec, nsec
                                  // SAFETY: timer_gettime writes one struct itimerspec (4 longs).
        sys::check(unsafe { sc!(libc::SYS_timer_gettime, t.id, spec.as_mut_ptr()) })
            .map_err(|e| format!("cannot read POSIX timer {}: errno {e}", t.id))?;
        let r = &POSIX_TIMERS[n];
        r.id.store(t.id, Relaxed);
        r.clock.store(t.clock, Relaxed);
        r.notify.store(t.notify, Relaxed);
        r.signo.store(t.signo, Relaxed);
        r.tid.store(t.tid, Relaxed);
        r.value.store(t.value, Relaxed);
        r.interval_ns
            .store((spec[0] * 1_000_000_000 + spec[1]) as u64, Relaxed);
        let left = spec[2] * 1_000_000_000 + spec[3];
        r.left_ns.store(left as u64, Relaxed);
        let deadline = if left > 0 && wall_clock(t.clock) && is_absolute(t.id) {
            sys::clock_ns(t.clock) as i64 + left
        } else {
            0
        };
        r.deadline_ns.store(deadline, Relaxed);
        n += 1;
    }
    N_POSIX_TIMERS.store(n, Release);
    Ok(n)
}

/// One timer's block of `/proc/self/timers`, after `ID: ` (kernel/time/posix-timers.c).
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    id: i32,
    signo: i32,
    value: u64,
    notify: i32,
    tid: i32,
    clock: i32,
}

fn parse_timers(text: &str) -> Option<Vec<Parsed>> {
    let mut out: Vec<Parsed> = Vec::new();
    for line in text.lines() {
        if let Some(id) = line.strip_prefix("ID: ") {
            out.push(Parsed {
                id: id.trim().parse().ok()?,
                ..Parsed::default()
            });
            continue;
        }
        let p = out.last_mut()?;
        if let Some(v) = line.strip_prefix("signal: ") {
            let (s, val) = v.trim().split_once('/')?;
            p.signo = s.parse().ok()?;
            p.value = u64::from_str_radix(val, 16).ok()?;
        } else if let Some(v) = line.strip_prefix("notify: ") {
            let (kind, target) = v.trim().split_once('/')?;
            p.notify = match kind {
                "signal" => libc::SIGEV_SIGNAL,
                "none" => libc::SIGEV_NONE,
                "thread" => libc::SIGEV_THREAD,
                _ => return None,
            };
            if let Some(tid) = target.strip_prefix("tid.") {
                p.notify |= libc::SIGEV_THREAD_ID;
                p.tid = tid.parse().ok()?;
            }
        } else if let Some(v) = line.strip_prefix("ClockID: ") {
            p.clock = v.trim().parse().ok()?;
        }
    }
    Some(out)
}

/// In a restored process (helper, before any thread runs): every timer again, with its ID,
/// clock, notification, interval and time left. A timer that cannot be made is one line on
/// stderr; the others are still made.
pub fn restore_posix_timers() {
    let n = N_POSIX_TIMERS.load(Acquire).min(MAX_POSIX_TIMERS);
    if n == 0 {
        return;
    }
    // SAFETY: prctl with integer arguments.
    let chosen_ids =
        sys::check(unsafe { sc!(libc::SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0) })
            .is_ok();
    let mut fillers: Vec<i32> = Vec::new();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| POSIX_TIMERS[i].id.load(Relaxed));
    for i in order {
        if let Err(e) = restore_one(&POSIX_TIMERS[i], chosen_ids, &mut fillers) {
            let mut b = [0u8; 20];
            let id = POSIX_TIMERS[i].id.load(Relaxed);
            let mut line = String::from("snapshim: cannot restore POSIX timer ");
            line.push_str(sys::itoa(id as u64, &mut b));
            line.push_str(": ");
            line.push_str(e);
            line.push('\n');
            let _ = sys::write_all(2, line.as_bytes());
        }
    }
    for f in fillers {
        // SAFETY: deletes a timer made only to use up its ID.
        unsafe { sc!(libc::SYS_timer_delete, f) };
    }
    if chosen_ids {
        // SAFETY: as above.
        unsafe { sc!(libc::SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0) };
    }
}

/// Makes one timer with its ID: asked for (`chosen_ids`), or reached by making filler timers
/// in ID order (the kernel hands out increasing IDs in a new process).
fn restore_one(
    t: &PosixTimer,
    chosen_ids: bool,
    fillers: &mut Vec<i32>,
) -> Result<(), &'static str> {
    let want = t.id.load(Relaxed);
    // struct sigevent: value (8), signo (4), notify (4), tid (4), padding to 64 bytes.
    let mut ev = [0u64; 8];
    ev[0] = t.value.load(Relaxed);
    ev[1] = (t.signo.load(Relaxed) as u32 as u64) | ((t.notify.load(Relaxed) as u32 as u64) << 32);
    ev[2] = t.tid.load(Relaxed) as u32 as u64;
    let clock = t.clock.load(Relaxed);
    let mut got: i32 = want;
    loop {
        // SAFETY: timer_create reads the sigevent and reads (with restore IDs on) and writes
        // the timer ID.
        let r = unsafe {
            sc!(
                libc::SYS_timer_create,
                clock,
                ev.as_ptr(),
                &mut got as *mut i32
            )
        };
        if sys::check(r).is_err() {
            return Err("timer_create refused it");
        }
        if got == want || chosen_ids {
            break;
        }
        if got > want || fillers.len() > 1 << 16 {
            // SAFETY: deletes the timer just made.
            unsafe { sc!(libc::SYS_timer_delete, got) };
            return Err("its ID is no longer free");
        }
        fillers.push(got);
    }
    let interval = t.interval_ns.load(Relaxed);
    let mut left = t.left_ns.load(Relaxed);
    if left == 0 && interval == 0 {
        return Ok(()); // disarmed
    }
    // A periodic timer caught just as it expired reads 0 left: it fires at once instead.
    if left == 0 {
        left = 1;
    }
    // A wall-clock timer set absolute keeps its deadline (it expires at once if that passed).
    let deadline = t.deadline_ns.load(Relaxed);
    let (flags, value) = if deadline > 0 {
        (libc::TIMER_ABSTIME, deadline as u64)
    } else {
        (0, left)
    };
    let spec = [
        (interval / 1_000_000_000) as i64,
        (interval % 1_000_000_000) as i64,
        (value / 1_000_000_000) as i64,
        (value % 1_000_000_000) as i64,
    ];
    // SAFETY: timer_settime reads one struct itimerspec; no old value.
    let r = unsafe { sc!(libc::SYS_timer_settime, got, flags, spec.as_ptr(), 0) };
    sys::check(r)
        .map(|_| ())
        .map_err(|_| "timer_settime refused it")
}

/// The signals periodic POSIX timers send, as a mask (bit `s - 1` for signal `s`), for the
/// quiesce handler: the pending signal of such a timer is the timer's own, which holds the
/// timer still until it is taken (and then re-arms it), so it must stay where it is.
/// Async-signal-safe: raw calls, a stack buffer (timers past its 4 KiB are not seen).
pub fn periodic_timer_signals() -> u64 {
    let mut buf = [0u8; 4096];
    let len = sys::read_small_file(b"/proc/self/timers\0", &mut buf);
    let (mut id, mut signo, mut mask) = (-1i64, 0i64, 0u64);
    for line in buf[..len].split(|&c| c == b'\n') {
        if let Some(v) = line.strip_prefix(b"ID: ") {
            id = decimal(v);
        } else if let Some(v) = line.strip_prefix(b"signal: ") {
            signo = decimal(v);
        } else if line.starts_with(b"notify: ") && !line.starts_with(b"notify: none") {
            let mut spec = [0i64; 4];
            // SAFETY: timer_gettime writes one struct itimerspec (4 longs).
            let r = unsafe { sc!(libc::SYS_timer_gettime, id, spec.as_mut_ptr()) };
            if r == 0 && (spec[0] | spec[1]) != 0 && (1..=64).contains(&signo) {
                mask |= 1 << (signo - 1);
            }
        }
    }
    mask
}

/// The decimal number at the start of `v` (-1 if none).
fn decimal(v: &[u8]) -> i64 {
    let digits = v.iter().take_while(|c| c.is_ascii_digit());
    if v.first().is_none_or(|c| !c.is_ascii_digit()) {
        return -1;
    }
    digits.fold(0i64, |n, &c| {
        n.saturating_mul(10).saturating_add((c - b'0') as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_timer_and_its_notification() {
        let text = "ID: 3\nsignal: 38/00000000deadbeef\nnotify: signal/tid.4711\nClockID: 1\n\
                    ID: 0\nsignal: 14/0000000000000000\nnotify: none/pid.12\nClockID: 0\n";
        let timers = parse_timers(text).unwrap();
        assert_eq!(
            timers,
            [
                Parsed {
                    id: 3,
                    signo: 38,
                    value: 0xdead_beef,
                    notify: libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID,
                    tid: 4711,
                    clock: 1
                },
                Parsed {
                    id: 0,
                    signo: 14,
                    notify: libc::SIGEV_NONE,
                    ..Parsed::default()
                }
            ]
        );
        assert_eq!(parse_timers(""), Some(Vec::new()));
        assert!(parse_timers("ID: x\n").is_none());
        assert!(parse_timers("ID: 1\nnotify: bogus/pid.1\n").is_none());
    }

    #[test]
    fn decimal_reads_the_leading_number() {
        assert_eq!(decimal(b"38/00000000deadbeef"), 38);
        assert_eq!(decimal(b"0"), 0);
        assert_eq!(decimal(b"/1"), -1);
        assert_eq!(decimal(b""), -1);
    }

    /// The fallback for kernels without PR_TIMER_CREATE_RESTORE_IDS: filler timers up to the
    /// ID (this kernel hands out increasing IDs), the timer armed as recorded.
    #[test]
    fn filler_timers_reach_the_wanted_id() {
        let none = [0u64, (libc::SIGEV_NONE as u64) << 32, 0, 0, 0, 0, 0, 0];
        let mut first = 0i32;
        // SAFETY: timer_create reads the sigevent and writes the ID; the timer is deleted.
        unsafe {
            sc!(
                libc::SYS_timer_create,
                libc::CLOCK_MONOTONIC,
                none.as_ptr(),
                &mut first as *mut i32
            );
            sc!(libc::SYS_timer_delete, first);
        }
        let t = TIMER_INIT;
        t.id.store(first + 4, Relaxed);
        t.clock.store(libc::CLOCK_MONOTONIC, Relaxed);
        t.notify.store(libc::SIGEV_NONE, Relaxed);
        t.interval_ns.store(7_000_000_000, Relaxed);
        t.left_ns.store(3_600_000_000_000, Relaxed);
        let mut fillers = Vec::new();
        assert_eq!(restore_one(&t, false, &mut fillers), Ok(()));
        assert_eq!(fillers, [first + 1, first + 2, first + 3]);
        let mut spec = [0i64; 4];
        // SAFETY: timer_gettime writes one struct itimerspec; then the timers are deleted.
        unsafe {
            assert_eq!(
                sc!(libc::SYS_timer_gettime, first + 4, spec.as_mut_ptr()),
                0
            );
            for id in fillers.iter().chain([&(first + 4)]) {
                sc!(libc::SYS_timer_delete, *id);
            }
        }
        assert_eq!(spec[0], 7);
        assert!(spec[2] > 3000 && spec[2] <= 3600);
    }
}
