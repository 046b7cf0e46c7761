//! The flush's page table: one state word per page of the snapshot (stored, or copied and
//! where), one bit per page that held data, the copies themselves, and what was lost.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use crate::sys::{self, sc};

use super::state::*;

// ---------------------------------------------------------------------------------------------
// Page states

pub(super) const STORED: u32 = 1 << 31;
pub(super) const COPIED: u32 = 1 << 30;
pub(super) const SLOT_MASK: u32 = COPIED - 1;
/// The slot of a COPIED page that holds nothing to store (it was not present at the snapshot).
pub(super) const NO_DATA: u32 = SLOT_MASK;

/// One region of the snapshot and where its pages' states start in the table.
pub struct PlanRegion {
    pub start: u64,
    pub end: u64,
    pub first: usize,
    /// Registered with the userfaultfd (else every page was settled during the pause).
    pub registered: bool,
}

/// Everything the writer, the fault server and the savers share during one flush. Built by the
/// writer in the scratch region before the program is released, freed after the flush.
pub struct Table {
    pub regions: Vec<PlanRegion>,
    /// One state word per page of `regions` (STORED, COPIED + slot), in a fresh zero-filled
    /// mapping: nothing is written for a page until it is stored or copied.
    pub(super) states: &'static [AtomicU32],
    /// One bit per page: it held data at the snapshot. Also a fresh mapping: only the ranges
    /// with data are written, 64 pages per word.
    pub(super) present: &'static [AtomicU64],
    pub(super) copies: u64,
    pub(super) copies_cap: u32,
    pub(super) next_copy: AtomicU32,
    pub(super) uffd: i32,
    /// Pages copied before the writer stored them.
    pub copied: AtomicU64,
    /// Of those, pages the writer copied ahead from the far end ([`help_from_end`]).
    pub ahead: AtomicU64,
    /// Pages holding data at the snapshot: the most the image stores.
    pub present_pages: u64,
    /// First address whose snapshot data was lost (+1), 0 if none.
    pub(super) lost: AtomicU64,
    pub(super) lost_how: AtomicU8,
    /// Huge pages split by serving a write fault in them with a small block (see
    /// [`Table::may_split`]): their 2 MiB-aligned addresses.
    pub(super) split: [AtomicU64; MAX_SPLITS],
    pub(super) nsplit: AtomicU32,
}

/// The current flush's table. Null before the snapshot: the fault server then only lifts
/// protection (see [`prepare`]).
pub(super) static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());

impl Table {
    pub(super) fn state_index(&self, addr: u64) -> Option<(usize, &PlanRegion)> {
        let i = self.regions.partition_point(|r| r.end <= addr);
        let r = self.regions.get(i)?;
        (r.start <= addr).then(|| (r.first + ((addr - r.start) / PAGE) as usize, r))
    }

    pub fn state(&self, idx: usize) -> &AtomicU32 {
        &self.states[idx]
    }

    /// Whether page `idx` held data at the snapshot.
    pub fn present(&self, idx: usize) -> bool {
        bit(self.present, idx)
    }

    /// Marks pages `[i0, i1)` as holding data at the snapshot. Only while [`setup`] fills the
    /// table, which nobody else sees yet.
    pub(super) fn set_present(&self, i0: usize, i1: usize) {
        set_bits(self.present, i0, i1)
    }

    pub(super) fn copy_ptr(&self, slot: u32) -> *mut u8 {
        (self.copies + slot as u64 * PAGE) as *mut u8
    }

    /// Saves page `idx` at `addr` unless the writer or another saver already has: copies it if
    /// it was present at the snapshot, else marks it as holding nothing. Returns false if the
    /// page's data could not be read (it is gone).
    pub(super) fn save_page(&self, idx: usize, addr: u64) -> bool {
        let st = &self.states[idx];
        if st.load(Acquire) & (STORED | COPIED) != 0 {
            return true;
        }
        if !self.present(idx) {
            let _ = st.compare_exchange(0, COPIED | NO_DATA, AcqRel, Acquire);
            return true;
        }
        match self.copy_run(idx, addr, 1) {
            Ok(_) => true,
            Err(LOST_STORE_FULL) => {
                // Cannot happen: only present pages are copied, once each, and the store has
                // slack for the slots lost to races.
                self.mark_lost(addr, LOST_STORE_FULL);
                false
            }
            Err(how) if st.load(Acquire) & (STORED | COPIED) == 0 => {
                self.mark_lost(addr, how);
                false
            }
            Err(_) => true,
        }
    }

    /// A write fault at `addr` during the flush: saves the pages of the block of `w` bytes (a
    /// power of two) holding it, within its region, that are present and not saved, and
    /// returns the range whose protection may be lifted: every page in it is stored, copied or
    /// held no data. Falls back to the faulting page alone if a block could not be copied whole.
    pub(super) fn save_around(&self, addr: u64, w: u64) -> (u64, u64) {
        let Some((idx, r)) = self.state_index(addr) else {
            return (addr, PAGE);
        };
        if w <= PAGE || !r.registered {
            self.save_page(idx, addr);
            return (addr, PAGE);
        }
        let w = if huge(r.start, r.end) && (w >= HUGE || !self.may_split(addr)) {
            HUGE
        } else {
            w
        };
        let (from, to) = block_of(addr, w, r.start, r.end);
        if self.save_block(r, from, to).is_none() {
            self.save_page(idx, addr);
            return (addr, PAGE);
        }
        (from, to - from)
    }

    /// Whether a write fault at `addr`, in memory the shim advised to use huge pages, may be
    /// served with a block smaller than its huge page. Saving the whole huge page first costs
    /// the faulting thread 0.3-0.6 ms here (a 2 MiB copy), and right after the pause every
    /// thread's first writes fault at once, so the program would feel them as a longer pause;
    /// a small block costs 20-50 µs but splits the huge page's mapping into 512 entries (as the
    /// kernel's own copy-on-write of a huge page does), which makes each later snapshot's scan
    /// about 4 µs longer until the huge page is whole again (see [`end`]). So: the first
    /// [`MAX_SPLITS`] huge pages written after the pause are split, later ones saved whole.
    pub(super) fn may_split(&self, addr: u64) -> bool {
        let hp = addr & !(HUGE - 1);
        let n = (self.nsplit.load(Relaxed) as usize).min(MAX_SPLITS);
        if self.split[..n].iter().any(|s| s.load(Relaxed) == hp) {
            return true;
        }
        if n == MAX_SPLITS {
            return false;
        }
        // Only the fault server calls this: no other thread adds entries.
        self.split[n].store(hp, Relaxed);
        self.nsplit.store(n as u32 + 1, Relaxed);
        true
    }

    /// Saves every page of `[from, to)` (inside region `r`) that is present and unsaved, a run
    /// of neighbours with one read, and marks the unsaved pages without data. Returns the pages
    /// copied, or None if a run could not be (the range is no longer mapped, or the store is
    /// full): some pages may be unsaved then, and nothing may be unprotected.
    pub(super) fn save_block(&self, r: &PlanRegion, from: u64, to: u64) -> Option<u64> {
        let i0 = r.first + ((from - r.start) / PAGE) as usize;
        let n = ((to - from) / PAGE) as usize;
        let unsaved = |k: usize| self.states[i0 + k].load(Acquire) & (STORED | COPIED) == 0;
        let (mut k, mut copied) = (0, 0);
        while k < n {
            if !unsaved(k) {
                k += 1;
                continue;
            }
            if !self.present(i0 + k) {
                let _ = self.states[i0 + k].compare_exchange(0, COPIED | NO_DATA, AcqRel, Acquire);
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < n && unsaved(e) && self.present(i0 + e) {
                e += 1;
            }
            copied += self.copy_run(i0 + k, from + k as u64 * PAGE, e - k).ok()?;
            k = e;
        }
        Some(copied)
    }

    /// Copies the `n` pages from `addr` (states from `i0`), present at the snapshot and unsaved
    /// when looked at, into consecutive slots with one read, and publishes each copy unless the
    /// writer or another saver got there first (its slot is then left unused). Returns the
    /// copies published, or why none could be: the store is full (`LOST_STORE_FULL`) or the
    /// range could not be read whole (`LOST_UNREADABLE`).
    pub(super) fn copy_run(&self, i0: usize, addr: u64, n: usize) -> Result<u64, u8> {
        let slot = self.next_copy.fetch_add(n as u32, Relaxed);
        if slot as u64 + n as u64 > self.copies_cap as u64 {
            return Err(LOST_STORE_FULL);
        }
        // SAFETY: slots [slot, slot + n) are ours alone (fetch_add) and inside the copy store.
        let dst =
            unsafe { core::slice::from_raw_parts_mut(self.copy_ptr(slot), n * PAGE as usize) };
        let mut done = 0;
        while done < dst.len() {
            match sys::read_mem(&mut dst[done..], addr + done as u64) {
                Ok(0) | Err(_) => return Err(LOST_UNREADABLE),
                Ok(k) => done += k,
            }
        }
        let mut won = 0;
        for j in 0..n {
            // An unsaved page's state is 0 (nothing else is ever set), and such a page is still
            // protected, so what was just read is its snapshot data.
            let st = &self.states[i0 + j];
            if st
                .compare_exchange(0, COPIED | (slot + j as u32), AcqRel, Acquire)
                .is_ok()
            {
                won += 1;
            }
        }
        self.copied.fetch_add(won, Relaxed);
        Ok(won)
    }

    /// Calls `f(region, index of the first page's state, from, to)` for each part of
    /// `[start, end)` that lies in a region of the snapshot.
    pub(super) fn pieces(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(&PlanRegion, usize, u64, u64),
    ) {
        let mut a = start & !(PAGE - 1);
        while a < end {
            let Some(r) = self
                .regions
                .get(self.regions.partition_point(|r| r.end <= a))
            else {
                return;
            };
            let from = a.max(r.start);
            if from >= end {
                return;
            }
            let to = r.end.min(end);
            f(r, r.first + ((from - r.start) / PAGE) as usize, from, to);
            a = to;
        }
    }

    /// Saves the snapshot's pages in `[start, end)` not stored yet, and lifts their protection.
    pub(super) fn save(&self, start: u64, end: u64) {
        self.pieces(start, end, |r, first, from, to| {
            for (i, a) in (from..to).step_by(PAGE as usize).enumerate() {
                self.save_page(first + i, a);
            }
            if r.registered {
                let _ = protect(self.uffd, from, to - from, false);
            }
        });
    }

    /// The snapshot data of `[start, end)` is going away: anything present and not saved is lost.
    pub(super) fn check_released(&self, start: u64, end: u64, how: u8) {
        self.pieces(start, end, |_, first, from, to| {
            for (i, a) in (from..to).step_by(PAGE as usize).enumerate() {
                let st = &self.states[first + i];
                let s = st.load(Acquire);
                if s & (STORED | COPIED) == 0 {
                    if self.present(first + i) {
                        self.mark_lost(a, how);
                    } else {
                        // Nothing was there at the snapshot: nothing to keep.
                        let _ = st.compare_exchange(s, s | COPIED | NO_DATA, AcqRel, Acquire);
                    }
                }
            }
        });
    }

    pub(super) fn mark_lost(&self, addr: u64, how: u8) {
        if self
            .lost
            .compare_exchange(0, addr + 1, AcqRel, Relaxed)
            .is_ok()
        {
            self.lost_how.store(how, Relaxed);
        }
    }

    /// Why the snapshot is not exact, if it is not.
    pub fn lost(&self) -> Option<String> {
        let a = self.lost.load(Acquire);
        if a == 0 {
            return None;
        }
        let how = match self.lost_how.load(Relaxed) {
            LOST_UNMAP => "unmapped",
            LOST_REMOVE => "discarded (MADV_DONTNEED or similar)",
            LOST_REMAP => "moved by mremap",
            LOST_STORE_FULL => "not copied (copy store full)",
            _ => "unreadable",
        };
        Some(alloc::format!(
            "memory at {:#x} was {how} inside a library before the writer saved it",
            a - 1
        ))
    }
}

pub(super) const LOST_UNREADABLE: u8 = 0;
pub(super) const LOST_UNMAP: u8 = 1;
pub(super) const LOST_REMOVE: u8 = 2;
pub(super) const LOST_REMAP: u8 = 3;
pub(super) const LOST_STORE_FULL: u8 = 4;

pub(super) const HUGE: u64 = 2 << 20;
/// Huge pages a flush may split to serve write faults quickly (see [`Table::may_split`]).
pub(super) const MAX_SPLITS: usize = 32;

/// The aligned block of `w` bytes (a power of two) holding `addr`, cut to `[start, end)`.
pub(super) fn block_of(addr: u64, w: u64, start: u64, end: u64) -> (u64, u64) {
    (
        (addr & !(w - 1)).max(start),
        ((addr | (w - 1)) + 1).min(end),
    )
}

/// Whether `[start, end)` is memory the shim advised to use transparent huge pages
/// (`SNAPSHIM_HUGEPAGES=1`, allocations of 32 MiB or more). Lifting the protection of part of a
/// huge page splits it into 512 page-table entries, which makes every later protection and scan
/// of it slower: such memory is unprotected and saved 2 MiB at a time, but for the few huge
/// pages [`Table::may_split`] splits (and [`recollapse`] makes whole again).
pub(super) fn huge(start: u64, end: u64) -> bool {
    crate::state::HUGEPAGES.load(Relaxed) && end - start >= crate::state::HUGE_MIN as u64
}

pub(super) fn bit(words: &[AtomicU64], i: usize) -> bool {
    words[i / 64].load(Relaxed) & (1 << (i % 64)) != 0
}

/// Sets bits `[i0, i1)`, a word at a time where it can. Not atomic as a whole (a plain load
/// and store: a locked fetch_or per word made the pause 0.1 ms longer on a 4 GiB heap), so for
/// words no other thread uses meanwhile.
pub(super) fn set_bits(words: &[AtomicU64], mut i0: usize, i1: usize) {
    while i0 < i1 {
        let (w, b) = (i0 / 64, i0 % 64);
        let n = (64 - b).min(i1 - i0);
        let bits = if n == 64 { !0 } else { ((1u64 << n) - 1) << b };
        words[w].store(words[w].load(Relaxed) | bits, Relaxed);
        i0 += n;
    }
}

/// A zero-filled private mapping of `bytes`, as a slice of `T` (an atomic integer type, for
/// which all-zero bytes are a valid value). Unmapped by [`end`].
pub(super) fn zeroed<T>(count: usize) -> Result<&'static [T], String> {
    let bytes = (count.max(1) * core::mem::size_of::<T>()).next_multiple_of(PAGE as usize);
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = sys::check(unsafe {
        sc!(
            libc::SYS_mmap,
            0,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1i64,
            0
        )
    })
    .map_err(|e| alloc::format!("cannot map the page table of the flush: errno {e}"))?;
    // SAFETY: the mapping is readable and writable, zero-filled (a valid T for the atomic integer
    // types used here), suitably aligned (page-aligned) and ours until end() unmaps it.
    Ok(unsafe { core::slice::from_raw_parts(p as *const T, count) })
}

pub(super) fn unmap_slice<T>(s: &[T]) {
    let bytes = (s.len().max(1) * core::mem::size_of::<T>()).next_multiple_of(PAGE as usize);
    // SAFETY: a mapping made by zeroed(), no longer used by anyone.
    unsafe { sc!(libc::SYS_munmap, s.as_ptr(), bytes) };
}

/// Huge pages the flush split (see [`Table::may_split`]).
pub fn huge_pages_split(t: &Table) -> u64 {
    (t.nsplit.load(Relaxed) as usize).min(MAX_SPLITS) as u64
}

/// The copy of a page, if the state says there is one with data.
pub fn copy_of(t: &Table, s: u32) -> Option<&[u8]> {
    if s & COPIED == 0 || s & SLOT_MASK == NO_DATA {
        return None;
    }
    // SAFETY: a published slot holds a full page copy that nobody writes again.
    Some(unsafe { core::slice::from_raw_parts(t.copy_ptr(s & SLOT_MASK), PAGE as usize) })
}

/// State bits the writer needs.
pub fn is_no_data(s: u32) -> bool {
    s & COPIED != 0 && s & SLOT_MASK == NO_DATA
}
pub const STORED_BIT: u32 = STORED;

pub fn unprotect(t: &Table, start: u64, len: u64) {
    let _ = protect(t.uffd, start, len, false);
}

pub fn mark_lost(t: &Table, addr: u64) {
    t.mark_lost(addr, LOST_UNREADABLE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_of_is_aligned_and_cut_to_the_region() {
        assert_eq!(
            block_of(0x12345, 0x4000, 0x10000, 0x20000),
            (0x10000, 0x14000)
        );
        assert_eq!(
            block_of(0x1f000, 0x4000, 0x10000, 0x1e000 + 0x2000),
            (0x1c000, 0x20000)
        );
        assert_eq!(
            block_of(0x10000, 0x200000, 0x10000, 0x30000),
            (0x10000, 0x30000)
        );
        assert_eq!(block_of(0x10000, 0x1000, 0, u64::MAX), (0x10000, 0x11000));
    }

    #[test]
    fn bits_are_set_a_word_at_a_time() {
        let words: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        set_bits(&words, 3, 130);
        for i in 0..256 {
            assert_eq!(bit(&words, i), (3..130).contains(&i), "bit {i}");
        }
        assert_eq!(words[1].load(Relaxed), u64::MAX);
    }
}
