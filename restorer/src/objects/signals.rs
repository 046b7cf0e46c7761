//! Signal dispositions: phase 2 sets each with `rt_sigaction` from the plan. Masks and
//! alternate stacks are per thread: the shim restores them as each thread returns through its
//! signal frame.

use snapshim_image::Process;

use crate::plan::PSig;

/// The plan's dispositions, as `struct kernel_sigaction` plus the signal number.
pub fn plan(p: &Process) -> Vec<PSig> {
    p.sigactions
        .iter()
        .map(|s| PSig {
            signo: s.signo as u64,
            handler: s.handler,
            flags: s.flags,
            restorer: s.restorer,
            mask: s.mask,
        })
        .collect()
}
