//! Progress of an operation of several seconds (a checkpoint, a page check, a restore), on a
//! terminal only: one line on stderr, redrawn at most ten times a second, shown only once the
//! operation has taken a second, and erased when it ends. Nothing at all when stderr is not a
//! terminal, so logs and pipes see only the usual output.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Shown only for operations longer than this.
const AFTER: Duration = Duration::from_secs(1);
/// Redrawn at most this often.
const EVERY: Duration = Duration::from_millis(100);

/// One operation's progress line.
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    drawn_at: Option<Instant>,
    on: bool,
}

impl Progress {
    /// Progress of `label` over `total` bytes (0: unknown), shown if stderr is a terminal.
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        Progress::with(label, total, std::io::stderr().is_terminal())
    }

    /// The same, shown only if `on`.
    pub fn with(label: impl Into<String>, total: u64, on: bool) -> Progress {
        Progress {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            drawn_at: None,
            on,
        }
    }

    /// `n` more bytes done.
    pub fn add(&mut self, n: u64) {
        self.set(self.done + n);
    }

    /// `done` bytes done so far.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        let now = Instant::now();
        if !self.on || now - self.start < AFTER {
            return;
        }
        if self.drawn_at.is_some_and(|t| now - t < EVERY) {
            return;
        }
        self.drawn_at = Some(now);
        let line = self.line(now - self.start);
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
    }

    /// "LABEL: 412.0 MiB of 1.0 GiB (40%), 830.2 MiB/s, 1 s left".
    pub fn line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let mut s = format!("{}: {}", self.label, human(self.done));
        if self.total > 0 {
            let pct = (self.done as f64 * 100.0 / self.total as f64).min(100.0);
            s.push_str(&format!(" of {} ({pct:.0}%)", human(self.total)));
        }
        s.push_str(&format!(", {}/s", human(rate as u64)));
        if self.total > self.done && rate > 0.0 {
            let left = (self.total - self.done) as f64 / rate;
            s.push_str(&format!(", {left:.0} s left"));
        }
        s
    }

    /// Erases the line, if it was drawn.
    pub fn finish(&mut self) {
        if self.drawn_at.take().is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Bytes in B, KiB, MiB or GiB with one decimal.
fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_bytes_share_rate_and_time_left() {
        let mut p = Progress::with("verify", 4 << 30, false);
        p.set(1 << 30);
        assert_eq!(
            p.line(Duration::from_secs(2)),
            "verify: 1.0 GiB of 4.0 GiB (25%), 512.0 MiB/s, 6 s left"
        );
        let mut q = Progress::with("checkpoint", 0, false);
        q.set(3 << 20);
        assert_eq!(
            q.line(Duration::from_secs(1)),
            "checkpoint: 3.0 MiB, 3.0 MiB/s"
        );
    }
}
