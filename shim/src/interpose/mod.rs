//! Functions the shim interposes in the program (`LD_PRELOAD` puts ours first), grouped:
//! `memory.rs`, `malloc.rs`, `signals.rs`, `threads.rs`, `files.rs`. Each is a few lines that hand
//! over to the layers below; nothing but the crate root imports this module. Unit tests build them
//! without
//! `no_mangle`, so the test runner's own calls are not interposed.
//!
//! - The signal API, so the program cannot block, ignore or replace the shim's two signals (the
//!   trigger, SIGRTMAX by default, and the internal quiesce signal). What the program asks for on
//!   those signals is remembered and reported as a clash, once.
//! - The mmap family, so the program cannot map over the range kept for the restorer, and so the
//!   uffd engine saves pages before they are unmapped, moved or discarded.
//! - `pthread_create`, so each thread runs the uffd engine's hook as it ends.
//! - The malloc family, forwarded to the next definition (`dlsym(RTLD_NEXT)`: glibc's, or the
//!   program's own allocator, jemalloc, tcmalloc, mimalloc...), so the program keeps one
//!   allocator; for glibc's, large chunks are advised to use huge pages and saved before glibc
//!   unmaps them during a flush.
//! - `inotify_add_watch`, whose path the kernel does not tell a checkpoint (noted for
//!   `objects::inotify`).
//! - The setuid family, so that a program giving up root's privileges for good first hands
//!   its image directory to its new user (`credentials.rs`).
//! - `timer_settime`, whose `TIMER_ABSTIME` the kernel does not tell (`timers.rs`).
//!
//! With `SNAPSHIM_DISABLE` every one of them only forwards: each extra it adds depends on state
//! that only an active shim sets (`state::ACTIVE`, the signals, a flush, the reserved range).
//!
//! `/proc/self/maps` stays the truth about memory: glibc maps memory internally without passing
//! through these symbols.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// glibc's definition of `name`, looked up once into `cache`.
fn next(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = cache.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds glibc's definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        cache.store(f, Relaxed);
    }
    f
}

fn c_str(s: &'static str) -> &'static core::ffi::CStr {
    core::ffi::CStr::from_bytes_with_nul(s.as_bytes()).expect("NUL-terminated")
}

/// Calls glibc's `$name` (looked up once) as a function of type `$ty`.
macro_rules! real {
    ($name:ident: $ty:ty) => {{
        static CACHE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
        let f = crate::interpose::next(
            &CACHE,
            crate::interpose::c_str(concat!(stringify!($name), "\0")),
        );
        // SAFETY: f is glibc's function of that name, whose C signature is $ty.
        unsafe { core::mem::transmute::<usize, $ty>(f) }
    }};
}

mod credentials;
mod files;
mod malloc;
mod memory;
mod signals;
mod threads;
mod timers;
mod waits;

pub use signals::real_sigaction;
