//! The mmap family, so the program cannot map over the range kept for the restorer and the uffd
//! engine saves pages before they go; large anonymous mappings are advised to use huge pages
//! (`SNAPSHIM_HUGEPAGES`). Every allocator but glibc's maps and unmaps through these (the malloc
//! family itself is in `malloc.rs`).
#![allow(unsafe_code)]

use core::ffi::c_void;
use core::sync::atomic::Ordering::*;

use libc::{c_int, size_t};
use snapshim_image::layout::{RESERVED_END, RESERVED_START};

use crate::state::{HUGEPAGES, HUGE_MIN};
use crate::sys::{self, sc};

/// Advises the whole 2 MiB extents of a large allocation to use transparent huge pages:
/// write-protecting or forking huge-page memory costs one entry per 2 MiB instead of 512.
/// Memory cost: the first touch of any byte of an extent allocates all 2 MiB of it.
pub(super) fn advise_huge(ptr: *mut c_void, len: usize) {
    if len < HUGE_MIN || ptr.is_null() || !HUGEPAGES.load(Relaxed) {
        return;
    }
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize + HUGE - 1) & !(HUGE - 1);
    let end = (ptr as usize + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice only, on memory the program just got.
        unsafe {
            sys::syscall6(
                libc::SYS_madvise,
                start as u64,
                (end - start) as u64,
                libc::MADV_HUGEPAGE as u64,
                0,
                0,
                0,
            )
        };
    }
}

fn hits_reserved(addr: usize, len: size_t) -> bool {
    let (a, e) = (addr as u64, addr as u64 + len as u64);
    a < RESERVED_END && e > RESERVED_START
}

/// A fixed mapping into the restorer's range is refused with ENOMEM (the range is in use).
fn refuse_reserved(fixed: bool, addr: usize, len: size_t) -> bool {
    let refuse = fixed && hits_reserved(addr, len) && crate::state::RESERVED.load(Relaxed);
    if refuse {
        set_errno(libc::ENOMEM);
    }
    refuse
}

/// # Safety
/// As `mmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    if refuse_reserved(
        flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0,
        addr as usize,
        len,
    ) {
        return libc::MAP_FAILED;
    }
    if flags & libc::MAP_FIXED != 0 {
        crate::engine::uffd::save_range(addr as u64, len as u64); // the old pages go
    }
    // SAFETY: forwarded unchanged; the kernel validates everything.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_mmap,
            addr as u64,
            len as u64,
            prot as u64,
            flags as u64,
            fd as i64 as u64,
            off as u64,
        )
    };
    let a = map_result(r);
    if a != libc::MAP_FAILED && flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_SHARED == 0 {
        advise_huge(a, len);
    }
    a
}

/// # Safety
/// As `mmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: same function on x86_64.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// As `munmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    crate::engine::uffd::save_range(addr as u64, len as u64);
    // SAFETY: forwarded unchanged.
    let r = unsafe { sc!(libc::SYS_munmap, addr, len) };
    int_result(r)
}

/// Advice that throws page contents away.
const DISCARDING_ADVICE: [c_int; 4] = [
    libc::MADV_DONTNEED,
    libc::MADV_FREE,
    libc::MADV_REMOVE,
    24, // MADV_DONTNEED_LOCKED
];

/// # Safety
/// As `madvise(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if DISCARDING_ADVICE.contains(&advice) {
        crate::engine::uffd::save_range(addr as u64, len as u64);
        crate::objects::memory::anonymize_image_pages(addr as u64, len as u64);
    }
    // SAFETY: forwarded unchanged.
    let r = unsafe { sc!(libc::SYS_madvise, addr, len, advice) };
    int_result(r)
}

/// # Safety
/// As `mremap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: usize,
) -> *mut c_void {
    // mremap is variadic in C; on x86_64 a variadic caller passes the optional fifth argument in
    // the same register as a fixed one, and it is only meaningful with MREMAP_FIXED.
    let new_addr = if flags & libc::MREMAP_FIXED != 0 {
        new_addr
    } else {
        0
    };
    if refuse_reserved(flags & libc::MREMAP_FIXED != 0, new_addr, new_len) {
        return libc::MAP_FAILED;
    }
    // The pages move (or shrink away), and a fixed target's old pages go.
    crate::engine::uffd::save_range(old as u64, old_len as u64);
    crate::incremental::before_mremap(old as u64, old_len as u64);
    if new_addr != 0 {
        crate::engine::uffd::save_range(new_addr as u64, new_len as u64);
    }
    // SAFETY: forwarded unchanged.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_mremap,
            old as u64,
            old_len as u64,
            new_len as u64,
            flags as u64,
            new_addr as u64,
            0,
        )
    };
    map_result(r)
}

// ---------------------------------------------------------------------------------------------
// Results as the C API gives them

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
pub(super) fn int_result(r: i64) -> c_int {
    c_result(r, |v| v as c_int, -1)
}
