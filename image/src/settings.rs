//! The shim's settings as users write them (`SNAPSHIM_SIGNAL`, `SNAPSHIM_INTERVAL`): one parser,
//! used by the shim that reads them and by the tools that check and pass them on, so the two can
//! never disagree about what a value means.

use std::time::Duration;

/// Parses a duration the way `SNAPSHIM_INTERVAL` and `--timeout` accept it: a non-negative
/// decimal number with an optional unit `ms`, `s`, `m` or `h`; a plain number means seconds.
///
/// ```text
/// 30s  10m  1h  500ms  90  1.5h
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "'{s}' is not a duration: the unit must be ms, s, m or h (e.g. 30s, 10m, 1h)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 10m, 1h, 500ms, or seconds)"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("'{s}' is too long a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Standard signal names, without the `SIG` prefix, for display.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// The signal names accepted in `SNAPSHIM_SIGNAL`.
pub const TRIGGER_NAMES: &[&str] = &["USR1", "USR2", "HUP", "PWR", "WINCH", "URG"];

/// Signals the shim refuses as a trigger: uncatchable, or raised by faults and by the C library.
const FORBIDDEN: &[i32] = &[
    libc::SIGKILL,
    libc::SIGSTOP,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGCHLD,
];

/// Parses `SNAPSHIM_SIGNAL`:
/// `USR2` or `SIGUSR2` (also USR1, HUP, PWR, WINCH, URG; upper case), `RTMIN+n` or `RTMAX-n`
/// (relative to this C library's `SIGRTMIN`, the one the shim runs on), or a number; not a
/// signal that cannot be caught or that faults raise, nor one glibc keeps for itself.
///
/// This may refuse what the shim would take, never the other way round: a value the shim refuses
/// turns its checkpoints off, and the signal would then reach the program unhandled.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    let bare = t.strip_prefix("SIG").unwrap_or(t);
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let not_a_signal = || {
        format!(
            "'{s}' is not a checkpoint signal (USR2, SIGUSR1, HUP, PWR, WINCH, URG, RTMIN+n, \
             RTMAX-n, or a number)"
        )
    };
    let signo = if let Ok(n) = bare.parse::<i32>() {
        n
    } else if let Some(rest) = bare.strip_prefix("RTMIN") {
        rtmin + rt_offset(rest, '+').ok_or_else(not_a_signal)?
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        rtmax - rt_offset(rest, '-').ok_or_else(not_a_signal)?
    } else if TRIGGER_NAMES.contains(&bare) {
        SIGNALS
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|&(_, n)| n)
            .ok_or_else(not_a_signal)?
    } else {
        return Err(not_a_signal());
    };
    if signo < 1 || signo > rtmax {
        return Err(format!("'{s}' is not a signal number (1 to {rtmax})"));
    }
    if FORBIDDEN.contains(&signo) {
        return Err(format!(
            "{} cannot be the checkpoint signal",
            signal_name(signo)
        ));
    }
    if signo > 31 && signo < rtmin {
        return Err(format!("signal {signo} is reserved by the C library"));
    }
    Ok(signo)
}

/// `""` → 0, `"+3"` → 3 (with `sign` `+`), within the real-time range.
fn rt_offset(rest: &str, sign: char) -> Option<i32> {
    if rest.is_empty() {
        return Some(0);
    }
    let n: i32 = rest.strip_prefix(sign)?.parse().ok()?;
    (0..=libc::SIGRTMAX() - libc::SIGRTMIN())
        .contains(&n)
        .then_some(n)
}

/// The usual name of a signal number: `SIGUSR2`, `SIGRTMIN+3`, or `SIG32` for numbers without
/// a name.
pub fn signal_name(signo: i32) -> String {
    if let Some((name, _)) = SIGNALS.iter().find(|&&(_, n)| n == signo) {
        return format!("SIG{name}");
    }
    let rtmin = libc::SIGRTMIN();
    if signo >= rtmin && signo <= libc::SIGRTMAX() {
        return match signo - rtmin {
            0 => "SIGRTMIN".into(),
            k => format!("SIGRTMIN+{k}"),
        };
    }
    format!("SIG{signo}")
}
