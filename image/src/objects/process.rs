//! Process-wide state: identity, working directory, limits, the mm fields, clocks.

use serde::{Deserialize, Serialize};

use super::{IntervalTimer, SigAction};

/// The process as a whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Process {
    pub pid: i32,
    /// Name used for the image directory (SNAPSHIM_NAME or the executable's file name).
    pub name: String,
    pub exe: String,
    pub cmdline: Vec<String>,
    pub cwd: String,
    pub umask: u32,
    pub personality: u32,
    pub rlimits: Vec<Rlimit>,
    pub mm: MmFields,
    /// Raw auxiliary vector, pairs of (type, value), ending with AT_NULL.
    pub auxv: Vec<u64>,
    pub sigactions: Vec<SigAction>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, in that order.
    pub itimers: Vec<IntervalTimer>,
    /// XCR0 of the CPU that took the image: the XSAVE features in every signal frame.
    pub xsave_features: u64,
    pub clock_monotonic_ns: u64,
    pub clock_realtime_ns: u64,
    /// Statistics of the checkpoint that wrote this image.
    pub pause_ns: u64,
    pub resident_bytes: u64,
}

/// The mm fields `prctl(PR_SET_MM_MAP)` takes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// One resource limit (`RLIMIT_*`), as `prlimit` takes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}
