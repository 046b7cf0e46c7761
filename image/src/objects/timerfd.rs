//! A timerfd (`timerfd_create(2)`): a timer on one clock whose expirations are read from a
//! descriptor.

use serde::{Deserialize, Serialize};

/// A timer as `timerfd_gettime` and fdinfo show it at the checkpoint.
///
/// `value_ns` is the time left until the next expiration (0: disarmed), whatever flags it was
/// set with; `now_ns` is the timer's clock read right after, so that an absolute deadline is
/// `now_ns + value_ns` on that clock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timerfd {
    /// `CLOCK_REALTIME`, `CLOCK_MONOTONIC`, `CLOCK_BOOTTIME`, or their `_ALARM` variants.
    pub clock: i32,
    /// The flags of the last `timerfd_settime` (`TFD_TIMER_ABSTIME`,
    /// `TFD_TIMER_CANCEL_ON_SET`), fdinfo's `settime flags`.
    pub settime_flags: i32,
    pub value_ns: u64,
    pub interval_ns: u64,
    /// Expirations not read yet (fdinfo's `ticks`, after `timerfd_gettime` counted overruns).
    pub ticks: u64,
    pub now_ns: i64,
}
