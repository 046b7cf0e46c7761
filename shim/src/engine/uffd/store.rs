//! The copy store: where the fault server and the savers copy pages the program is about to
//! change before the writer has stored them. Mapped and filled in before the pause; after the
//! flush given back (the default: the process's resident memory is what it was before the
//! checkpoint) or, with `SNAPSHIM_KEEP_STORE=1`, kept for the next flush ([`end_store`]).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use crate::objects::memory;
use crate::sys::{self, sc};

use super::state::*;
use super::table::*;

/// The copy store (address, pages) while no flush uses it: mapped by [`prepare`] while the
/// program runs, with its start filled in ([`warm_bytes`]), so the copies of a flush do not
/// wait for fresh memory (on this VM a fresh 2 MiB page took up to 10 ms); taken by [`setup`];
/// after the flush unmapped, or kept for the next flush ([`end_store`]). Not part of any image
/// (`objects::memory::is_own_mapping`).
pub(super) use crate::state::{COPY_STORE as STORE, COPY_STORE_PAGES as STORE_PAGES};
/// Bytes of the store [`prepare`] filled in (see [`warm_bytes`]).
pub(super) static STORE_FILLED: AtomicU64 = AtomicU64::new(0);
pub(super) const WARM_STORE: u64 = 32 << 20;
/// `SNAPSHIM_KEEP_STORE`: keep the store between flushes ([`end_store`]).
static KEEP: AtomicBool = AtomicBool::new(false);
/// Bytes at the start of the kept store that any flush filled in or used (given back lazily:
/// they count in the process's resident memory until the kernel takes them); 0 when none is
/// kept.
static KEPT_BYTES: AtomicU64 = AtomicU64::new(0);

/// `SNAPSHIM_KEEP_STORE`, set once at start-up.
pub fn set_keep_store(keep: bool) {
    KEEP.store(keep, Relaxed);
}

/// The copy store kept between flushes, in bytes that may count in the process's resident
/// memory (see [`KEPT_BYTES`]): for the statistics of a checkpoint. 0 when none is kept (by
/// default, after every flush).
pub fn kept_store_bytes() -> u64 {
    if STORE.load(Acquire) == 0 {
        0
    } else {
        KEPT_BYTES.load(Relaxed)
    }
}

/// Bytes of the copy store mapped and filled in for the coming flush: they count in the
/// process's resident memory at its pause, and are not the program's.
pub fn prepared_store_bytes() -> u64 {
    if STORE.load(Acquire) == 0 {
        0
    } else {
        STORE_FILLED.load(Relaxed)
    }
}

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
/// `kept`: bytes of a store kept from the last flush ([`kept_store_bytes`]), resident too but
/// not the program's (counted, each flush would grow the store by the last one's size).
pub(super) fn warm_bytes(kept: u64) -> u64 {
    let anon = memory::statm().map_or(0, |(resident, shared)| {
        (resident.saturating_sub(shared) * PAGE).saturating_sub(kept)
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
        KEPT_BYTES.store(0, Relaxed);
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
            KEPT_BYTES.store(0, Relaxed);
            map_store(cap)
        }
    }
}

/// After a flush, the copy store of `cap` pages at `addr`, of which `used` slots were used:
/// unmapped, so the process's resident memory is at once what it was before the checkpoint
/// (the default); or, with `SNAPSHIM_KEEP_STORE=1`, kept for the next flush ([`keep_store`]).
///
/// Unmapped, the next checkpoint maps and fills in a new store before its pause, while the
/// program runs (see docs/benchmarks.md for what that costs against a kept one).
pub(super) fn end_store(addr: u64, cap: u64, used: u64) {
    if KEEP.load(Relaxed) {
        keep_store(addr, cap, used);
    } else {
        drop_store();
        // SAFETY: the store this flush used, ours; the flush is over, so nobody uses it.
        unsafe { sc!(libc::SYS_munmap, addr, cap * PAGE) };
        STORE_FILLED.store(0, Relaxed);
    }
}

/// Keeps the copy store for the next flush. Fresh memory is slow on this VM (the kernel zeroing
/// pages the hypervisor must back again took most of the time a dense program waited on
/// copies); the pages used or filled in are given back lazily (MADV_FREE: the kernel takes them
/// when it needs memory, else the next flush writes into them without a fault). Until the
/// kernel takes them they count in the process's resident memory (`LazyFree` in smaps): that
/// is what [`kept_store_bytes`] reports.
fn keep_store(addr: u64, cap: u64, used: u64) {
    // Earlier flushes' pages past this one's are still there too, unless the kernel took them.
    let kept = (used * PAGE)
        .max(STORE_FILLED.load(Relaxed))
        .max(KEPT_BYTES.load(Relaxed))
        .min(cap * PAGE);
    // SAFETY: our own store, no longer used by this flush.
    unsafe { sc!(libc::SYS_madvise, addr, kept, libc::MADV_FREE) };
    drop_store();
    KEPT_BYTES.store(kept, Relaxed);
    STORE_PAGES.store(cap, Relaxed);
    STORE.store(addr, Release);
}

/// Unmaps the copy store, unless a flush has it.
pub(super) fn drop_store() {
    let addr = STORE.swap(0, AcqRel);
    KEPT_BYTES.store(0, Relaxed);
    if addr != 0 {
        // SAFETY: the store, mapped by us and used by nobody (no flush has it).
        unsafe { sc!(libc::SYS_munmap, addr, STORE_PAGES.load(Relaxed) * PAGE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether any page of `[addr, addr + len)` is mapped (mincore fails with ENOMEM on a
    /// range that is not).
    fn mapped(addr: u64, len: u64) -> bool {
        let mut vec = [0u8; 1024];
        // SAFETY: mincore writes one byte per page of the range into `vec`, which holds them.
        unsafe { sc!(libc::SYS_mincore, addr, len, vec.as_mut_ptr()) == 0 }
    }

    /// The two ways a flush ends: with SNAPSHIM_KEEP_STORE the store is kept (the next flush
    /// takes it as it is) and its size reported; by default it is unmapped and nothing is
    /// reported. One test: the store is process-wide.
    #[test]
    fn the_store_is_given_back_unless_kept() {
        let (addr, cap) = map_store(1024).unwrap();
        let len = cap * PAGE;
        // SAFETY: filling in the start of the store just mapped, ours.
        unsafe { sc!(libc::SYS_madvise, addr, 1 << 20, libc::MADV_POPULATE_WRITE) };
        STORE_FILLED.store(1 << 20, Relaxed);

        set_keep_store(true);
        end_store(addr, cap, 100);
        assert_eq!(
            kept_store_bytes(),
            1 << 20,
            "filled in, more than the slots used"
        );
        assert_eq!(
            keep_or_map_store(512).unwrap(),
            (addr, cap),
            "the kept store is reused"
        );
        assert_eq!(
            kept_store_bytes(),
            0,
            "no store is kept while a flush has it"
        );
        end_store(addr, cap, 600);
        assert_eq!(kept_store_bytes(), 600 * PAGE, "used, more than filled in");
        let (addr, cap) = keep_or_map_store(1024).unwrap();
        end_store(addr, cap, 10);
        assert_eq!(
            kept_store_bytes(),
            600 * PAGE,
            "what earlier flushes used is there too"
        );
        let (addr, cap) = keep_or_map_store(1024).unwrap();

        set_keep_store(false);
        end_store(addr, cap, 300);
        assert_eq!(kept_store_bytes(), 0);
        assert_eq!(STORE.load(Relaxed), 0);
        assert_eq!(STORE_FILLED.load(Relaxed), 0);
        assert!(!mapped(addr, len), "the store is unmapped");
    }
}
