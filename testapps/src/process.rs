//! Child processes with deadlines: reading a child's output line by line while it runs, waiting
//! for a marker line, waiting for exit with a timeout (a hang fails the test instead of blocking
//! CI), and running a command to completion with its output captured.
//!
//! Waiting uses a pidfd (`pidfd_open` + `poll`), so there is no sleep-polling and no race with
//! PID reuse: the child is only reaped after the pidfd said it exited, or after we killed it.
#![allow(unsafe_code)] // pidfd_open, poll, geteuid and kill, each with its SAFETY note.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Failure, Result};

/// How long any one child may take before it counts as hung: `SNAPSHIM_TEST_TIMEOUT` seconds,
/// default 120.
pub fn timeout() -> Duration {
    let secs = std::env::var("SNAPSHIM_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// `kill(pid, sig)`.
pub fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill takes plain values and has no memory effects.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this test process runs as root (then chmod does not restrict it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One output pipe of a child, read by a background thread. Lines arrive on a channel (so a
/// waiter blocks on the pipe, with a deadline) and are also kept as text for diagnostics.
pub struct Stream {
    rx: Receiver<Option<String>>,
    text: Arc<Mutex<String>>,
    eof: bool,
}

/// Why a wait for a marker line ended without it.
#[derive(Debug, PartialEq, Eq)]
pub enum Missed {
    /// The pipe closed: the process exited (or closed the stream) first.
    Eof,
    Timeout,
}

impl Stream {
    pub fn spawn(pipe: impl Read + Send + 'static) -> Stream {
        let (tx, rx) = mpsc::channel();
        let text = Arc::new(Mutex::new(String::new()));
        let keep = Arc::clone(&text);
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        keep.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_str(&line);
                        if tx.send(Some(line)).is_err() {
                            // Nobody listens any more; keep draining so the child never blocks.
                            continue;
                        }
                    }
                }
            }
            let _ = tx.send(None);
        });
        Stream {
            rx,
            text,
            eof: false,
        }
    }

    /// Blocks until a line ending in `marker` arrives (later lines stay queued for the next
    /// wait), the stream ends, or `deadline` passes.
    pub fn wait_for_line(
        &mut self,
        marker: &str,
        deadline: Instant,
    ) -> std::result::Result<(), Missed> {
        loop {
            if self.eof {
                return Err(Missed::Eof);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Some(line)) if line.trim_end().ends_with(marker) => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => return Err(Missed::Timeout),
            }
        }
    }

    /// Waits (until `deadline` at most) for the stream to end, then returns all its text.
    pub fn finish(&mut self, deadline: Instant) -> String {
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Some(_)) => {}
                Ok(None) | Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        self.text()
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Waits for `child` to exit, until `deadline`. Returns `None` on timeout (the child is left
/// running and unreaped).
pub fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; the pid is our
    // unreaped child, so it cannot have been reused.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        // No pidfd (old kernel, seccomp): fall back to polling.
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if pidfd_exited(&pidfd, deadline)? {
        child.wait().map(Some)
    } else {
        Ok(None)
    }
}

/// Waits until the process `pid`, which need not be our child, has exited (a zombie counts),
/// until `deadline`. Returns whether it did. The caller must know that `pid` cannot be reaped
/// and reused meanwhile (its parent reaps it only when the test lets it).
pub fn wait_for_exit_of(pid: u32, deadline: Instant) -> std::io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        // Gone already (exited and reaped).
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(true),
            _ => Err(err),
        };
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pidfd_exited(&pidfd, deadline)
}

/// Polls a pidfd until its process exits (true) or `deadline` passes (false).
fn pidfd_exited(pidfd: &OwnedFd, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, and the descriptor stays open for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            return Ok(false);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The processes `pid` started and has not reaped yet (zombies included), from every one of its
/// threads (`/proc/PID/task/TID/children`: a child is listed under the thread that forked it).
/// Empty when `pid` is gone.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|t| t.children().unwrap_or_default())
        .collect()
}

/// The command name (`comm`, the executable's name cut to 15 bytes) of process `pid`; it stays
/// readable while the process is a zombie.
pub fn command_name(pid: u32) -> Option<String> {
    let p = procfs::process::Process::new(pid as i32).ok()?;
    p.stat().ok().map(|s| s.comm)
}

/// "exit status 3", "killed by signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
        None => format!("{status}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => "?",
    }
}

/// A finished command's status and output.
#[derive(Debug)]
pub struct Captured {
    /// The command line, for messages.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// Everything about the run, for a failure message.
    pub fn report(&self) -> String {
        format!(
            "`{}`: {}\n--- stdout ---\n{}--- stderr ---\n{}--------------",
            self.what,
            describe_status(self.status),
            with_newline(&self.stdout),
            with_newline(&self.stderr)
        )
    }
}

pub(crate) fn with_newline(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// `argv` of a command, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin /dev/null, stdout and stderr captured). A run longer than
/// `limit` is killed and reported as a failure.
pub fn run_captured(cmd: &mut Command, limit: Duration) -> Result<Captured> {
    let what = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::new(format!("cannot start `{what}`: {e}")))?;
    let mut out = Stream::spawn(child.stdout.take().expect("piped"));
    let mut err = Stream::spawn(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + limit;
    let status = wait_until(&mut child, deadline)
        .map_err(|e| Failure::new(format!("cannot wait for `{what}`: {e}")))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let grace = Instant::now() + Duration::from_secs(2);
        return Err(Failure::new(format!(
            "`{what}` did not finish within {limit:?}; killed it\n--- stdout ---\n{}--- stderr ---\n{}",
            with_newline(&out.finish(grace)),
            with_newline(&err.finish(grace))
        )));
    };
    // Children of the child may hold the pipes open: do not wait for them for long.
    let grace = Instant::now() + Duration::from_secs(10);
    Ok(Captured {
        what,
        status,
        stdout: out.finish(grace),
        stderr: err.finish(grace),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn waits_for_markers_in_order() {
        let mut child = sh("echo noise >&2; echo READY >&2; sleep 0.2; echo 'PHASE 2' >&2")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Stream::spawn(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        assert_eq!(s.wait_for_line("READY", deadline), Ok(()));
        assert_eq!(s.wait_for_line("PHASE 2", deadline), Ok(()));
        assert_eq!(s.wait_for_line("NEVER", deadline), Err(Missed::Eof));
        assert_eq!(s.text(), "noise\nREADY\nPHASE 2\n");
        assert!(wait_until(&mut child, deadline).unwrap().unwrap().success());
    }

    #[test]
    fn marker_wait_times_out() {
        let mut child = sh("sleep 5").stderr(Stdio::piped()).spawn().unwrap();
        let mut s = Stream::spawn(child.stderr.take().unwrap());
        let start = Instant::now();
        let r = s.wait_for_line("READY", start + Duration::from_millis(200));
        assert_eq!(r, Err(Missed::Timeout));
        assert!(start.elapsed() < Duration::from_secs(3));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn exit_wait_times_out_then_reports_the_kill() {
        let mut child = sh("sleep 30").spawn().unwrap();
        let start = Instant::now();
        let r = wait_until(&mut child, start + Duration::from_millis(200)).unwrap();
        assert!(r.is_none());
        assert!(start.elapsed() < Duration::from_secs(3));
        child.kill().unwrap();
        let status = wait_until(&mut child, Instant::now() + Duration::from_secs(20))
            .unwrap()
            .unwrap();
        assert_eq!(describe_status(status), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn run_captured_collects_output_and_status() {
        let c = run_captured(
            &mut sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(c.stdout, "out\n");
        assert_eq!(c.stderr, "err\n");
        assert_eq!(describe_status(c.status), "exit status 3");
        assert!(c.report().contains("exit status 3"));
    }

    #[test]
    fn run_captured_kills_a_hang() {
        let start = Instant::now();
        let e = run_captured(
            &mut sh("echo started; sleep 30"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        let msg = format!("{e:?}");
        assert!(msg.contains("did not finish"), "{msg}");
        assert!(msg.contains("started"), "{msg}");
    }
}
