//! The process, capture side: identity (pid, name, exe, command line), cwd, umask,
//! personality, rlimits, the mm fields of `/proc/self/stat` (brk, stack, arg/env), auxv, the
//! CPU's XSAVE features and the clocks; signal dispositions and interval timers come from their
//! own modules.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use snapshim_image::{MmFields, Process, Rlimit};

use super::{memory, signals, timers};
use crate::config::Config;
use crate::sys::{self, sc};

/// Per-process kernel state.
pub fn capture(cfg: &Config) -> Process {
    let mut p = Process {
        pid: sys::getpid(),
        name: cfg.name.clone(),
        exe: cfg.exe.clone(),
        cmdline: cfg.cmdline.clone(),
        cwd: sys::readlink(b"/proc/self/cwd\0").unwrap_or_default(),
        ..Default::default()
    };
    // SAFETY: umask has no memory effects; set back at once (every other thread is parked).
    unsafe {
        let old = sc!(libc::SYS_umask, 0o22);
        sc!(libc::SYS_umask, old);
        p.umask = old as u32;
        p.personality = sc!(libc::SYS_personality, 0xffff_ffffu32) as u32;
    }
    for res in 0..16u32 {
        let mut lim = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a null new limit writes the old one.
        if sys::check(unsafe {
            sc!(
                libc::SYS_prlimit64,
                0,
                res,
                0,
                &mut lim as *mut libc::rlimit64
            )
        })
        .is_ok()
        {
            p.rlimits.push(Rlimit {
                resource: res,
                soft: lim.rlim_cur,
                hard: lim.rlim_max,
            });
        }
    }
    let mut buf = Vec::new();
    if sys::read_file(b"/proc/self/stat\0", &mut buf).is_ok() {
        let text = String::from_utf8_lossy(&buf);
        if let Some(i) = text.rfind(')') {
            let f: Vec<u64> = text[i + 1..]
                .split_whitespace()
                .map(|t| t.parse().unwrap_or(0))
                .collect();
            let g = |field: usize| f.get(field - 3).copied().unwrap_or(0);
            p.mm = MmFields {
                start_code: g(26),
                end_code: g(27),
                start_stack: g(28),
                start_data: g(45),
                end_data: g(46),
                start_brk: g(47),
                arg_start: g(48),
                arg_end: g(49),
                env_start: g(50),
                env_end: g(51),
                // SAFETY: brk(0) only reports the current break.
                brk: unsafe { sc!(libc::SYS_brk, 0) } as u64,
            };
        }
    }
    if sys::read_file(b"/proc/self/auxv\0", &mut buf).is_ok() {
        p.auxv = buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
    }
    p.sigactions = signals::sigactions();
    p.itimers = timers::itimers();
    p.xsave_features = snapshim_image::xsave_features();
    p.clock_monotonic_ns = sys::monotonic_ns();
    p.clock_realtime_ns = sys::clock_ns(libc::CLOCK_REALTIME);
    p.resident_bytes = memory::statm().map_or(0, |(resident, _)| resident * 4096);
    p
}

/// Refuses a checkpoint while the program has child processes (live, or exited and not yet
/// reaped): the image would hold this process alone, and its restore would wait for children
/// that are not there. The shim's own children are not the program's: the fork engine's writer
/// has exit signal 0, and `own` names the others (the merger, which `execve` made an ordinary
/// child).
pub fn check_no_children(own: &[i32]) -> Result<(), String> {
    let Ok(tids) = sys::list_numeric_dir(b"/proc/self/task\0") else {
        return Ok(());
    };
    let mut buf = Vec::new();
    let mut named = Vec::new();
    for tid in tids {
        let path = alloc::format!("/proc/self/task/{tid}/children\0");
        if sys::read_file(path.as_bytes(), &mut buf).is_err() {
            continue;
        }
        let pids: Vec<i32> = String::from_utf8_lossy(&buf)
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        for pid in pids.into_iter().filter(|p| !own.contains(p)) {
            if let Some(child) = program_child(pid, &mut buf) {
                named.push(child);
            }
        }
    }
    if named.is_empty() {
        return Ok(());
    }
    Err(alloc::format!(
        "the program has child processes ({}); snapshim does not checkpoint process trees yet",
        named.join(", ")
    ))
}

/// `PID NAME` (with "exited, not reaped" for a zombie) of child `pid`, or None if it is gone
/// or one of the shim's own (exit signal 0).
fn program_child(pid: i32, buf: &mut Vec<u8>) -> Option<String> {
    let path = alloc::format!("/proc/{pid}/stat\0");
    sys::read_file(path.as_bytes(), buf).ok()?;
    let text = String::from_utf8_lossy(buf);
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // Field 3 is the state, field 38 the exit signal.
    let exit_signal: i32 = fields.get(38 - 3)?.parse().ok()?;
    if exit_signal == 0 {
        return None;
    }
    let name = &text[open + 1..close];
    Some(match fields.first() {
        Some(&"Z") => alloc::format!("PID {pid} {name}, exited, not reaped"),
        _ => alloc::format!("PID {pid} {name}"),
    })
}
