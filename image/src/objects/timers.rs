//! Interval timers (`setitimer`: ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF).

use serde::{Deserialize, Serialize};

/// One interval timer, in microseconds; both zero when it is disarmed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IntervalTimer {
    pub interval_us: u64,
    pub value_us: u64,
}
