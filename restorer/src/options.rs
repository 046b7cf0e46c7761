//! What the user asked for ([`Options`], fixed once the command line is read) and what the
//! restore learns as it goes ([`RunState`]).

use std::os::fd::RawFd;

/// Whether to restore in new namespaces (exact PID and TIDs, continuous clocks).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Namespace {
    /// When the system allows it; otherwise warn and restore without.
    Preferred,
    /// Or fail (`--require-exact-pids`).
    Required,
    /// Never (`--no-namespace`).
    Off,
}

/// What becomes of a descriptor the restorer cannot rebuild (`--unrestorable`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unrestorable {
    /// The restore fails, naming it (the default).
    Fail,
    /// The program goes on with that number closed: every call on it fails with `EBADF`.
    Closed,
}

/// The command line's choices; read-only during the restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Check every page run's checksum before changing anything.
    pub verify: bool,
    /// Read every stored page instead of mapping the image.
    pub copy: bool,
    /// `PREFETCH_*` (plan.rs): what phase 2 does with mapped runs.
    pub prefetch: u64,
    /// Stop just before the jump, for a debugger.
    pub pause: bool,
    /// Report the time to resume.
    pub stats: bool,
    pub namespace: Namespace,
    /// Mapped files accepted although they changed (`--allow-changed-file`).
    pub allow_changed: Vec<String>,
    /// The restored program's lineage (`--new-lineage`, see lineage.rs).
    pub lineage: crate::lineage::Pick,
    pub unrestorable: Unrestorable,
    /// Established TCP connections captured with `TCP_REPAIR` come back alive
    /// (`--tcp-established`); otherwise reset.
    pub tcp_established: bool,
}

/// What changes while the restore runs.
#[derive(Debug)]
pub struct RunState {
    /// CLOCK_MONOTONIC when the restore started (a standby: when it was activated), as this
    /// process reads it: shifted once it is inside a time namespace.
    pub start_ns: u64,
    /// Where phase 2 reports the time to resume (a copy of our stderr, or the activating
    /// client's connection), or -1.
    pub stats_fd: RawFd,
    /// Where the resume report goes instead of stderr (a standby's activation), or -1.
    pub report_fd: RawFd,
    /// Set once in the new namespaces: threads are created with their saved TIDs.
    pub exact_tids: bool,
}

impl RunState {
    pub fn starting_at(start_ns: u64) -> RunState {
        RunState {
            start_ns,
            stats_fd: -1,
            report_fd: -1,
            exact_tids: false,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}
