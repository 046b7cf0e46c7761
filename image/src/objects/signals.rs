//! Signal state: dispositions (per process). Masks and alternate stacks are per thread
//! ([`super::ThreadState`]).

use serde::{Deserialize, Serialize};

/// One signal disposition as the kernel holds it (`struct kernel_sigaction`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}
