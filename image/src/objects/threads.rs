//! Threads: what the kernel holds per thread besides the registers, which are in the signal
//! frame on the thread's own stack (saved with memory).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: i32,
    pub fs_base: u64,
    /// Stack pointer saved by the shim when the thread parked (callee-saved registers and the
    /// return address sit there; the kernel's signal frame with the full register state is above).
    pub ctx_rsp: u64,
    pub robust_head: u64,
    pub robust_len: u64,
    pub altstack_sp: u64,
    pub altstack_flags: i32,
    pub altstack_size: u64,
    /// Mask in force while parked (inside the shim's handler).
    pub sigmask: u64,
    pub name: String,
    /// The shim's own helper thread.
    pub helper: bool,
}

/// A thread's credentials (format 1.4): the kernel keeps them per thread. glibc's `setuid`,
/// `setgroups`... change every thread alike; a raw system call changes only its caller's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Credentials {
    pub tid: i32,
    /// Real, effective and saved user ID.
    pub uid: [u32; 3],
    /// Real, effective and saved group ID.
    pub gid: [u32; 3],
    /// Supplementary groups, as `getgroups` lists them.
    pub groups: Vec<u32>,
}
