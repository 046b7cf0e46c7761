//! Functions the shim interposes in the program (`LD_PRELOAD` puts ours first), grouped:
//! `memory.rs`, `signals.rs`, `threads.rs`. Each is a few lines that hand over to the layers
//! below; nothing but the crate root imports this module. Unit tests build them without
//! `no_mangle`, so the test runner's own calls are not interposed.
//!
//! - The signal API, so the program cannot block, ignore or replace the shim's two signals (the
//!   trigger, SIGUSR2 by default, and the internal quiesce signal). What the program asks for on
//!   those signals is remembered and reported as a clash, once.
//! - The mmap family, so the program cannot map over the range kept for the restorer, and so the
//!   shim sees large mappings (counted; later engines hook here).
//! - The malloc family, forwarded to glibc's own entry points (`__libc_malloc`...), never through
//!   `dlsym`, so there is no recursion; large allocations are counted.
//!
//! `/proc/self/maps` stays the truth about memory: glibc maps memory internally without passing
//! through these symbols.
#![allow(unsafe_code)]

mod memory;
mod signals;
mod threads;
mod waits;

pub use signals::real_sigaction;
