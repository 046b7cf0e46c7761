//! Process-wide values set once at start-up (or by the pipeline) and read by the lower layers:
//! the shim's two signals, whether the restorer's range is reserved, the huge-page advice, and
//! the timeline of the last pause. Atomics only: readable from signal handlers and interposed
//! functions alike.

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};

use crate::sys;

/// The shim is on: set first thing at start-up unless `SNAPSHIM_DISABLE` is set. Interposed
/// functions add nothing of their own while it is off.
pub static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The checkpoint (trigger) signal and the internal quiesce signal, once the shim is
/// initialised (0 before).
pub static TRIGGER_SIG: AtomicI32 = AtomicI32::new(0);
pub static QUIESCE_SIG: AtomicI32 = AtomicI32::new(0);

/// The reserved range is ours (mapped PROT_NONE at start-up).
pub static RESERVED: AtomicBool = AtomicBool::new(false);

/// SNAPSHIM_HUGEPAGES=1: advise large anonymous memory MADV_HUGEPAGE.
pub static HUGEPAGES: AtomicBool = AtomicBool::new(false);
/// Allocations at least this large are advised.
pub const HUGE_MIN: usize = 32 << 20;

/// Moments of the last pause (monotonic ns), for the statistics: see [`PHASES`].
pub static MARKS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
/// What ends at each mark: the pause is the sum of these phases.
pub const PHASES: [&str; 8] = [
    "start", "quiesce", "capture", "register", "scan", "copy", "protect", "release",
];

pub fn mark(i: usize) {
    MARKS[i].store(sys::monotonic_ns(), Relaxed);
}

/// The uffd engine's copy store (address, pages; 0: none): the shim's own memory, in no image.
/// Set by the engine (`engine::uffd::store`), read by the memory capture.
pub static COPY_STORE: AtomicU64 = AtomicU64::new(0);
pub static COPY_STORE_PAGES: AtomicU64 = AtomicU64::new(0);

std::thread_local! {
    /// Handlers of the program's that ran on this thread (the shim calls them through a
    /// trampoline, see `interpose/signals.rs`). Const-initialised, without destructor: reading
    /// or bumping it is a plain TLS access, fine in a signal handler. A blocking call
    /// interrupted while it did not change was not interrupted for the program
    /// (`interpose/waits.rs`).
    static PROGRAM_SIGNALS: Cell<u64> = const { Cell::new(0) };
}

/// Called by the trampoline before it runs a handler of the program's.
pub fn note_program_signal() {
    PROGRAM_SIGNALS.with(|c| c.set(c.get().wrapping_add(1)));
}

/// Handlers of the program's this thread has run so far.
pub fn program_signals_seen() -> u64 {
    PROGRAM_SIGNALS.with(Cell::get)
}
