//! The copy store: where the fault server and the savers copy pages the program is about to
//! change before the writer has stored them. Kept between flushes, filled in before the pause.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::objects::memory;
use crate::sys::{self, sc};

use super::state::*;
use super::table::*;

/// The copy store (address, pages) while no flush uses it: mapped by [`prepare`] while the
/// program runs, with its first [`WARM_STORE`] bytes filled in, so the first copies of a flush
/// do not wait for fresh memory (on this VM a fresh 2 MiB page took up to 10 ms); taken by
/// [`setup`]; kept by [`end`] for the next flush ([`keep_store`]). Not part of any image
/// (`objects::memory::is_own_mapping`).
pub(super) use crate::state::{COPY_STORE as STORE, COPY_STORE_PAGES as STORE_PAGES};
/// Bytes of the store [`prepare`] filled in (see [`warm_bytes`]).
pub(super) static STORE_FILLED: AtomicU64 = AtomicU64::new(0);
pub(super) const WARM_STORE: u64 = 32 << 20;

/// Copy-store slots for `pages` pages with data: at most one copy per page, plus slack for the
/// slots a saver loses when the writer or another saver publishes a page first.
pub(super) fn store_cap(pages: u64) -> u64 {
    (pages + pages / 4 + 4096).clamp(1, NO_DATA as u64 - 1)
}

/// Maps a copy store of `cap` pages: never registered, in no image; untouched slots cost nothing
/// (MAP_NORESERVE). Huge pages where the system allows them: a copy into a fresh 4 KiB page
/// costs about 3.5 µs here, most of it allocating the page; into a huge page, 1.3 µs.
pub(super) fn map_store(cap: u64) -> sys::Result<(u64, u64)> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let addr = sys::check(unsafe {
        sc!(
            libc::SYS_mmap,
            0,
            cap * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1i64,
            0
        )
    })? as u64;
    // SAFETY: advice on the mapping just made (a hint: nothing fails without it).
    unsafe { sc!(libc::SYS_madvise, addr, cap * PAGE, libc::MADV_HUGEPAGE) };
    Ok((addr, cap))
}

/// How much of the copy store [`prepare`] fills in, while the program runs: as much as the
/// program has anonymous memory resident (what a flush copies when the program writes all over
/// it), within half the memory the system has available, and at least [`WARM_STORE`]. Copies
/// into fresh memory made the program wait on the kernel zeroing pages (most of a dense
/// program's wait on this VM); filling them in before the pause delays the snapshot instead.
pub(super) fn warm_bytes() -> u64 {
    let anon = memory::statm().map_or(0, |(resident, shared)| {
        resident.saturating_sub(shared) * PAGE
    });
    let mut buf = Vec::new();
    let avail = match sys::read_file(b"/proc/meminfo\0", &mut buf) {
        Ok(_) => {
            String::from_utf8_lossy(&buf)
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                << 10
        }
        Err(_) => 0,
    };
    anon.min(avail / 2).max(WARM_STORE)
}

/// The copy store an earlier flush left ([`end`]), grown to `cap` pages if it is smaller (the
/// pages it has stay), or a new one.
pub(super) fn keep_or_map_store(cap: u64) -> sys::Result<(u64, u64)> {
    let addr = STORE.swap(0, AcqRel);
    let have = STORE_PAGES.load(Relaxed);
    if addr == 0 {
        return map_store(cap);
    }
    if have >= cap {
        return Ok((addr, have));
    }
    // SAFETY: growing our own store, which nobody uses between flushes; it may move.
    match sys::check(unsafe {
        sc!(
            libc::SYS_mremap,
            addr,
            have * PAGE,
            cap * PAGE,
            libc::MREMAP_MAYMOVE
        )
    }) {
        Ok(moved) => {
            // SAFETY: advice on our own mapping (a hint).
            unsafe { sc!(libc::SYS_madvise, moved, cap * PAGE, libc::MADV_HUGEPAGE) };
            Ok((moved as u64, cap))
        }
        Err(_) => {
            // SAFETY: the old store, ours, used by nobody.
            unsafe { sc!(libc::SYS_munmap, addr, have * PAGE) };
            map_store(cap)
        }
    }
}

/// After a flush: keeps the copy store for the next one. Fresh memory is slow on this VM (the
/// kernel zeroing pages the hypervisor must back again took most of the time a dense program
/// waited on copies); the pages used or filled in are given back lazily (MADV_FREE: the kernel takes them
/// when it needs memory, else the next flush writes into them without a fault).
pub(super) fn keep_store(addr: u64, cap: u64, used: u64) {
    // SAFETY: our own store, no longer used by this flush.
    unsafe {
        sc!(
            libc::SYS_madvise,
            addr,
            (used * PAGE)
                .max(STORE_FILLED.load(Relaxed))
                .min(cap * PAGE),
            libc::MADV_FREE
        )
    };
    drop_store();
    STORE_PAGES.store(cap, Relaxed);
    STORE.store(addr, Release);
}

/// Unmaps the copy store, unless a flush has it.
pub(super) fn drop_store() {
    let addr = STORE.swap(0, AcqRel);
    if addr != 0 {
        // SAFETY: the store, mapped by us and used by nobody (no flush has it).
        unsafe { sc!(libc::SYS_munmap, addr, STORE_PAGES.load(Relaxed) * PAGE) };
    }
}
