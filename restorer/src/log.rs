//! The detailed log of a restore (`-v` on stderr, `--log FILE` appended to a file): one line a
//! step, with the time since the restore started. Written on descriptors of the restorer's own,
//! opened before the program's descriptors replace stderr and closed before the jump, so the
//! program never sees them.

use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::Mutex;

use crate::options::monotonic_ns;

struct Sinks {
    fds: Vec<RawFd>,
    start_ns: u64,
}

static SINKS: Mutex<Sinks> = Mutex::new(Sinks {
    fds: Vec::new(),
    start_ns: 0,
});

/// Starts logging: to a copy of stderr if `verbose`, and appended to `file` if given.
pub fn start(verbose: bool, file: Option<&std::path::Path>, start_ns: u64) -> Result<(), String> {
    let mut s = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    s.start_ns = start_ns;
    if verbose {
        // SAFETY: dup of our own stderr, close-on-exec.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        if fd >= 0 {
            s.fds.push(fd);
        }
    }
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
        s.fds.push(f.into_raw_fd());
    }
    Ok(())
}

/// In a time namespace whose CLOCK_MONOTONIC is `shift_ns` ahead: times go on from there.
pub fn shift(shift_ns: i64) {
    let mut s = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    s.start_ns = (s.start_ns as i64).saturating_add(shift_ns) as u64;
}

/// Whether anything is logged.
pub fn on() -> bool {
    !SINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fds
        .is_empty()
}

/// Logs one line (see the [`log!`] macro).
pub fn line(text: std::fmt::Arguments) {
    let s = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    if s.fds.is_empty() {
        return;
    }
    let ms = monotonic_ns().saturating_sub(s.start_ns) as f64 / 1e6;
    let text = format!("snapshim-restore: [{ms:9.3} ms] {text}\n");
    for &fd in &s.fds {
        // SAFETY: borrowed for one write; ManuallyDrop keeps it open.
        let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let _ = f.write_all(text.as_bytes());
    }
}

/// The log's descriptors, moved above `base` (out of the way of the program's numbers).
pub fn move_high(base: RawFd) -> Result<(), String> {
    let mut s = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    for fd in s.fds.iter_mut() {
        *fd = crate::objects::move_high(*fd, base)?;
    }
    Ok(())
}

/// The log's descriptors, which the program must not inherit.
pub fn fds() -> Vec<RawFd> {
    SINKS.lock().unwrap_or_else(|e| e.into_inner()).fds.clone()
}

/// Logs a formatted line when logging is on.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        if $crate::log::on() {
            $crate::log::line(format_args!($($arg)*));
        }
    };
}
