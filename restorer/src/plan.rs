//! The plan: everything phase 2 needs, laid out by phase 1 in the arena (inside the reserved
//! range) as plain `#[repr(C)]` data. Shared by `restore.rs` and the freestanding blob
//! (`blob/main.rs` includes this file), so it uses only `core` types; pointers are stored as
//! `u64` addresses inside the arena.

pub const PLAN_MAGIC: u64 = 0x736e_6170_706c_616e; // "snapplan"

#[repr(C)]
pub struct Plan {
    pub magic: u64,
    pub regions: u64,
    pub n_regions: u64,
    pub runs: u64,
    pub n_runs: u64,
    pub threads: u64,
    pub n_threads: u64,
    pub main_thread: u64,
    pub sigactions: u64,
    pub n_sigactions: u64,
    pub rlimits: u64,
    pub n_rlimits: u64,
    pub close_fds: u64,
    pub n_close_fds: u64,
    pub resume_addr: u64,
    pub reserved_start: u64,
    pub reserved_end: u64,
    /// The kernel's vvar/vdso mappings in this process: pieces to move by one delta.
    pub kern: [KernPiece; 4],
    pub n_kern: u64,
    pub kern_delta: i64,
    pub park: u64,
    /// If `proxy_len` is not 0: anonymous executable memory at `proxy_addr`, filled with the
    /// `proxy_len` bytes at `proxy_bytes` (arena), once the kernel's mappings have moved away:
    /// stands in for the image's vDSO (see `vdso.rs`).
    pub proxy_addr: u64,
    pub proxy_len: u64,
    pub proxy_bytes: u64,
    /// start_code, end_code, start_data, end_data, start_brk, brk, start_stack, arg_start,
    /// arg_end, env_start, env_end: as `struct prctl_mm_map`.
    pub mm: [u64; 11],
    pub auxv: u64,
    pub auxv_bytes: u64,
    /// ITIMER_REAL, _VIRTUAL, _PROF as struct itimerval (interval sec, usec, value sec, usec).
    pub itimers: [[i64; 4]; 3],
    /// CLOCK_MONOTONIC when the restorer started; if `stats_fd` >= 0, phase 2 reports the time
    /// to resume there just before the threads start.
    pub start_ns: u64,
    pub stats_fd: i64,
    /// What phase 2 does for mapped runs once they are mapped: one of the `PREFETCH_*` values.
    pub prefetch: u64,
}

/// Mapped pages are read from the image on first touch.
pub const PREFETCH_NONE: u64 = 0;
/// `madvise(MADV_WILLNEED)` on every mapped run: the kernel starts reading it into the page
/// cache and returns; the program resumes while the reads complete.
pub const PREFETCH_BACKGROUND: u64 = 1;
/// `madvise(MADV_POPULATE_READ)` on every mapped run before resuming: every page is in the
/// page cache and mapped (read-only, shared with the cache; a write still copies it).
pub const PREFETCH_EAGER: u64 = 2;

/// How a page run gets into memory.
pub const RUN_READ: u32 = 0;
/// Mapped from the image with `MAP_PRIVATE | MAP_FIXED` (a copy-on-write view of the file).
pub const RUN_MAP: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct KernPiece {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PRegion {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub prot: u32,
    /// MAP_PRIVATE/MAP_SHARED, MAP_ANONYMOUS, MAP_GROWSDOWN (MAP_FIXED is added by the blob).
    pub flags: u32,
    pub fd: i32,
    /// Non-zero: page runs are written into it, so it is mapped writable first.
    pub fill: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PRun {
    pub addr: u64,
    pub len: u64,
    pub file_off: u64,
    /// Protection of the region the run is in (a mapped run must end up with it).
    pub prot: u32,
    /// `RUN_READ` or `RUN_MAP`.
    pub how: u32,
    /// The image file holding the run (a delta chain has several).
    pub fd: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PThread {
    pub ctx_rsp: u64,
    pub fs_base: u64,
    /// The thread's saved TID, to be created with (clone3 `set_tid`); 0: any.
    pub tid: i32,
}

/// `struct kernel_sigaction` plus the signal number.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PSig {
    pub signo: u64,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PRlimit {
    pub resource: u64,
    pub cur: u64,
    pub max: u64,
}
