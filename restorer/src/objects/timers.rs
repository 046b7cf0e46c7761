//! Interval timers (`setitimer`): phase 2 arms them from the plan.

use snapshim_image::Process;

/// ITIMER_REAL, _VIRTUAL, _PROF as `struct itimerval` (interval sec, usec, value sec, usec).
pub fn plan(p: &Process) -> [[i64; 4]; 3] {
    let mut itimers = [[0i64; 4]; 3];
    for (i, t) in p.itimers.iter().take(3).enumerate() {
        let (interval, value) = (t.interval_us, t.value_us);
        // A periodic timer caught just as it expired reads 0 left; setitimer would take a zero
        // value as "disarm", so it fires at once instead.
        let value = if interval != 0 && value == 0 {
            1
        } else {
            value
        };
        itimers[i] = [
            (interval / 1_000_000) as i64,
            (interval % 1_000_000) as i64,
            (value / 1_000_000) as i64,
            (value % 1_000_000) as i64,
        ];
    }
    itimers
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshim_image::IntervalTimer;

    #[test]
    fn a_periodic_timer_that_just_expired_fires_at_once_instead_of_disarming() {
        let p = Process {
            itimers: vec![
                IntervalTimer {
                    interval_us: 1_500_000,
                    value_us: 0,
                },
                IntervalTimer::default(),
                IntervalTimer {
                    interval_us: 0,
                    value_us: 2_000_001,
                },
            ],
            ..Default::default()
        };
        assert_eq!(plan(&p), [[1, 500_000, 0, 1], [0; 4], [0, 0, 2, 1]]);
    }
}
