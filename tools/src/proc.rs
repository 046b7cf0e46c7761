//! What the tools read of other processes in `/proc`, through the `procfs` crate, with errors
//! worded for the user ("no process with PID 42", "cannot read /proc/42/status: ...").

use procfs::process::{MMapPath, Process};
use procfs::ProcError;

use crate::failure::{Failure, Result};

/// The process `pid`, or "no process with PID".
pub fn process(pid: i32) -> Result<Process> {
    Process::new(pid).map_err(|e| failure(pid, "", e))
}

/// The user-facing error for a failed read of `/proc/PID/<file>`.
fn failure(pid: i32, file: &str, e: ProcError) -> Failure {
    match e {
        ProcError::NotFound(_) => Failure::op(format!("no process with PID {pid}")),
        e => Failure::op(format!("cannot read /proc/{pid}/{file}: {e}")),
    }
}

/// `/proc/PID/status`.
pub fn status(pid: i32) -> Result<procfs::process::Status> {
    process(pid)?
        .status()
        .map_err(|e| failure(pid, "status", e))
}

/// Whether a file named `lib` (a file name, no directory) is mapped in `pid`.
pub fn maps_file(pid: i32, lib: &str) -> Result<bool> {
    Ok(mapped_path(pid, lib)?.is_some())
}

/// The path of the file named `lib` (a file name, no directory) mapped in `pid`, if any.
pub fn mapped_path(pid: i32, lib: &str) -> Result<Option<std::path::PathBuf>> {
    let maps = process(pid)?.maps().map_err(|e| failure(pid, "maps", e))?;
    Ok(maps.into_iter().find_map(|m| match m.pathname {
        MMapPath::Path(p) if p.file_name().is_some_and(|n| n == lib) => Some(p),
        _ => None,
    }))
}

/// The value of the environment variable `name` in `pid`'s initial environment.
pub fn environ_var(pid: i32, name: &str) -> Result<Option<String>> {
    let env = process(pid)?
        .environ()
        .map_err(|e| failure(pid, "environ", e))?;
    Ok(env
        .get(std::ffi::OsStr::new(name))
        .map(|v| v.to_string_lossy().into_owned()))
}

/// The children of every thread of `pid` (none if it is gone).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = Process::new(pid).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.children().ok())
        .flatten()
        .map(|c| c as i32)
        .collect()
}

/// The command name of `pid` (`/proc/PID/comm`), if it exists.
pub fn comm(pid: i32) -> Option<String> {
    Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.comm)
}

/// True when `pid` no longer exists or is a zombie (exited, not yet reaped).
pub fn is_gone(pid: i32) -> bool {
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
        return true;
    }
    match Process::new(pid).and_then(|p| p.stat()) {
        Ok(stat) => matches!(stat.state, 'Z' | 'X'),
        Err(e) => matches!(e, ProcError::NotFound(_)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn own_status_has_our_ids_and_no_process_is_named() {
        let me = std::process::id() as i32;
        let status = status(me).unwrap();
        assert_eq!(status.fuid, nix::unistd::geteuid().as_raw());
        assert_eq!(status.fgid, nix::unistd::getegid().as_raw());
        // pid_max is at most 4194304: this PID never exists.
        let e = status_of_missing();
        assert_eq!(e.message, "no process with PID 999999999");
    }

    fn status_of_missing() -> Failure {
        status(999_999_999).unwrap_err()
    }

    #[test]
    fn a_missing_environment_variable_is_none() {
        let me = std::process::id() as i32;
        assert_eq!(environ_var(me, "SNAPSHIM_NO_SUCH_VARIABLE").unwrap(), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_gone() {
        assert!(!is_gone(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(is_gone(pid));
    }

    #[test]
    fn an_unreaped_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_gone(pid) {
            assert!(Instant::now() < deadline, "zombie not detected");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
    }
}
