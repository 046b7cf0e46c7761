//! The fork engine (`SNAPSHIM_COW=fork`, and the fallback of the uffd engine): during the pause
//! a child is forked with a raw `clone` (exit signal 0: the program never sees it); the child
//! writes and commits the image from its copy-on-write view of memory, frozen at that instant,
//! with raw system calls and the shim's own allocator only (no lock the program may hold), and
//! reports one line on a pipe. The program is released as soon as the child exists.
//!
//! The kernel leaves out of a child the memory its parent advised `MADV_DONTFORK` (V8, the
//! JavaScript engine of node, does so for its heap): the child would store it as empty pages and
//! the image would restore with that memory zeroed. The child checks its view first
//! ([`check_view`]) and fails the checkpoint with one line instead.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use crate::objects::memory::{read_maps, MapsEntry};
use crate::sys::{self, sc};

/// The writer child: its PID and the pipe it reports on.
pub struct Child {
    pub pid: i32,
    pub report: i32,
}

/// The report pipe (read end, write end), made before the fork.
pub fn report_pipe() -> Result<[i32; 2], String> {
    let mut report = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err("cannot create a pipe for the writer process".into());
    }
    Ok(report)
}

/// Forks the writer child, which runs `write` and reports its outcome on `report[1]` ("ok
/// BYTES" or "err MESSAGE"), then exits. Returns the child's PID.
pub fn spawn(report: [i32; 2], write: impl FnOnce() -> Result<u64, String>) -> sys::Result<i32> {
    sys::fork_child(|| {
        sys::close(report[0]);
        let line = match write() {
            Ok(bytes) => alloc::format!("ok {bytes}\n"),
            Err(msg) => alloc::format!("err {msg}\n"),
        };
        let _ = sys::write_all(report[1], line.as_bytes());
        0
    })
}

/// In the writer child: every readable mapping the parent had right before the fork (`maps`) is
/// mapped in the child too, else (memory advised `MADV_DONTFORK`) the error to report.
pub fn check_view(maps: &[MapsEntry]) -> Result<(), String> {
    let child = read_maps()
        .map_err(|e| alloc::format!("cannot read /proc/self/maps in the writer: errno {e}"))?;
    match maps.iter().find(|m| {
        m.prot & libc::PROT_READ as u32 != 0
            && !covered(m.start, m.end, child.iter().map(|c| (c.start, c.end)))
    }) {
        Some(m) => Err(alloc::format!(
            "memory at {:#x}-{:#x} is advised MADV_DONTFORK, which the fork engine cannot see; \
             SNAPSHIM_COW=stop (or uffd) can checkpoint this program",
            m.start,
            m.end
        )),
        None => Ok(()),
    }
}

/// Whether the mappings `child` (`[start, end)` pairs, disjoint, as the kernel lists them)
/// cover `[start, end)` entirely.
fn covered(start: u64, end: u64, child: impl Iterator<Item = (u64, u64)>) -> bool {
    let inside: u64 = child
        .map(|(s, e)| e.min(end).saturating_sub(s.max(start)))
        .sum();
    inside == end - start
}

/// Minor page faults of this process so far (children excluded).
pub fn minor_faults() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe {
        sc!(
            libc::SYS_getrusage,
            libc::RUSAGE_SELF,
            &mut ru as *mut libc::rusage
        )
    };
    ru.ru_minflt as u64
}

/// Waits for the fork engine's writer: one line on its pipe ("ok BYTES" or "err MESSAGE"), then
/// its exit.
pub fn wait(pid: i32, report: i32) -> Result<u64, String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match sys::read(report, &mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(libc::EINTR) => {}
            Err(_) => break,
        }
    }
    sys::close(report);
    let mut status = 0i32;
    // SAFETY: wait4 on our own child (exit signal 0, hence __WCLONE); status is a valid pointer.
    unsafe {
        sc!(
            libc::SYS_wait4,
            pid,
            &mut status as *mut i32,
            libc::__WCLONE,
            0
        )
    };
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end();
    if let Some(b) = text.strip_prefix("ok ") {
        return Ok(b.trim().parse().unwrap_or(0));
    }
    if let Some(msg) = text.strip_prefix("err ") {
        return Err(msg.into());
    }
    if libc::WIFSIGNALED(status) {
        return Err(alloc::format!(
            "the writer process died of signal {}",
            libc::WTERMSIG(status)
        ));
    }
    Err("the writer process ended without a report".into())
}

#[cfg(test)]
mod tests {
    use super::covered;

    #[test]
    fn a_mapping_is_covered_only_by_mappings_over_all_of_it() {
        let child = [(0x1000, 0x3000), (0x3000, 0x5000), (0x8000, 0x9000)];
        assert!(covered(0x1000, 0x5000, child.iter().copied()));
        assert!(covered(0x2000, 0x4000, child.iter().copied()));
        assert!(covered(0x8000, 0x9000, child.iter().copied()));
        // A hole (memory left out of the child) anywhere in it.
        assert!(!covered(0x4000, 0x9000, child.iter().copied()));
        assert!(!covered(0x6000, 0x7000, child.iter().copied()));
        assert!(!covered(0x8000, 0xa000, child.iter().copied()));
    }
}
