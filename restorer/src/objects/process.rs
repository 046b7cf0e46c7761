//! Process-wide state: working directory, umask and personality are set here, in phase 1;
//! resource limits and the mm fields (brk, stack, arg/env, auxv) go into the plan, which
//! phase 2 applies once the program's memory is in place.

use snapshim_image::{Metadata, Process};

use crate::plan::PRlimit;

/// Enters the program's working directory (before its descriptors are installed: a failure
/// is still a clear message).
pub fn enter_cwd(meta: &Metadata) -> Result<(), String> {
    std::env::set_current_dir(&meta.process.cwd).map_err(|e| {
        format!(
            "cannot enter the program's working directory {}: {e}",
            meta.process.cwd
        )
    })
}

/// Sets the program's umask and personality on this process.
pub fn set_attributes(p: &Process) {
    // SAFETY: umask and personality only change process attributes.
    unsafe {
        libc::umask(p.umask);
        libc::personality(p.personality as libc::c_ulong);
    }
}

/// The plan's resource limits, as `prlimit64` takes them.
pub fn rlimits(p: &Process) -> Vec<PRlimit> {
    p.rlimits
        .iter()
        .map(|r| PRlimit {
            resource: r.resource as u64,
            cur: r.soft,
            max: r.hard,
        })
        .collect()
}

/// The mm fields in the order of `struct prctl_mm_map`.
pub fn mm(p: &Process) -> [u64; 11] {
    let m = &p.mm;
    [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
    ]
}
