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
