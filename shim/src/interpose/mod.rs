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

use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering::*};

use libc::c_int;

use crate::sys;

mod memory;
mod signals;
mod threads;

pub use signals::real_sigaction;

/// The next definition of `name` (glibc's), looked up once into `cache`.
fn next(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = cache.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds glibc's definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        cache.store(f, Relaxed);
    }
    f
}

/// A raw mmap/mremap result as the C API returns it (MAP_FAILED and errno on failure).
fn map_result(r: i64) -> *mut c_void {
    c_result(r, |a| a as *mut c_void, libc::MAP_FAILED)
}

/// A raw result as a C function returns it: `ok(value)`, or `failed` with errno set.
fn c_result<T>(r: i64, ok: impl FnOnce(i64) -> T, failed: T) -> T {
    match sys::check(r) {
        Ok(v) => ok(v),
        Err(e) => {
            set_errno(e);
            failed
        }
    }
}

fn set_errno(e: c_int) {
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// A raw result as a C function returning int gives it (-1 and errno on failure).
fn int_result(r: i64) -> c_int {
    c_result(r, |v| v as c_int, -1)
}
