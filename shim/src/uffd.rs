//! The userfaultfd write-protect engine (`SNAPSHIM_COW=uffd`, the `auto` choice where the kernel
//! lets this process use userfaultfd).
//!
//! Write-protecting memory is a page-table walk (about 40 ms per GiB of 4 KiB pages here), too
//! long for the pause, so most of it happens before: [`prepare`], while the program runs,
//! registers the regions to store with a userfaultfd in write-protect mode, protects them and
//! starts the *fault server*, which for now only lifts the protection of each page the program
//! writes. In the pause, [`begin`] records which pages hold data at that instant and which lost
//! their protection since, in one `PAGEMAP_SCAN` (present or swapped, not the shared zero page;
//! `PAGE_IS_WRITTEN` is a clear write-protect bit: written since, or new), and protects those
//! again; the pause then grows with what changed, not with memory. Pages without data at that
//! instant are holes in the image whatever happens to them later, so they need no protection
//! (`UFFD_FEATURE_WP_UNPOPULATED` would fill the page tables of every untouched range with
//! markers). From the release on:
//!
//! - the writer reads page data from memory (with `process_vm_readv` on itself, so a
//!   concurrently unmapped range is an error code, not a crash), writes it with O_DIRECT, marks
//!   the pages stored and lifts their protection, window by window: later writes to them cost
//!   nothing;
//! - a program thread (or the kernel on its behalf: a `read()` into a buffer, a signal frame, the
//!   rseq area) that writes a page not yet stored blocks in the kernel; the fault server copies
//!   the page into the copy store, lifts its protection and the write goes on. The writer uses
//!   the copy when it reaches the page. While faults come often, the server copies a whole
//!   block around the faulting page (16 KiB growing to 2 MiB, see [`Around`]), and the writer,
//!   while the device writes, copies blocks from the far end of memory ([`help_from_end`]): a
//!   program writing all over its memory would otherwise wait for one fault per page;
//! - a program thread about to unmap, remap or `MADV_DONTNEED` memory (interposed `munmap`,
//!   `mremap`, `madvise`, fixed `mmap`, and `free`/`realloc` of chunks glibc mapped itself) first
//!   saves the pages not yet stored, in its own thread ([`save_range`]); a thread that ends saves
//!   its stack (the kernel's final write of the thread's TID, done while the thread is exiting,
//!   could not wait for the fault server).
//! - memory released behind the shim's back (glibc trimming its heap) arrives as an unmap/remove
//!   event: if it held pages present at the snapshot and not yet saved, the image is no longer
//!   exact and is discarded (the helper retries with the fork engine).
//!
//! Per page there is one state word, STORED (the writer is past it) or COPIED (+ the copy's
//! slot), and one bit: it had data at the snapshot. Whoever finds neither STORED nor COPIED
//! copies the page and publishes the copy with a compare-and-swap; the writer sets STORED with a fetch-or
//! after reading the page, and uses the copy if COPIED was set by then: a page is only ever
//! modified after COPIED or STORED is set, so either the writer's read or the copy holds the
//! snapshot's bytes.
//!
//! Memory the fault server and the savers write must never be write-protected: the shim's own
//! data (its statics are copied during the pause instead of protected), the page states and the
//! copy store (mapped after the snapshot's memory map was read), and the server's stack
//! (reserved range). The server is held between batches while the pause decides
//! what to protect ([`hold_server`]): no page loses its protection behind the pause's back.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use snapshim_image::layout::STACK_START;

use crate::config::CopyAhead;
use crate::objects::memory::{self, MapsEntry, Wanted, PM_FILE, PM_PRESENT, PM_SWAP};
use crate::objects::threads;
use crate::sys::kapi::*;
use crate::sys::{self, sc};

// ---------------------------------------------------------------------------------------------
// The engine's userfaultfd features and messages (shared definitions: kapi.rs)

const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_EVENT_REMAP: u64 = 1 << 2;
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const FEATURES: u64 =
    FEATURE_PAGEFAULT_FLAG_WP | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP;

const EVENT_PAGEFAULT: u64 = 0x12;
const EVENT_REMAP: u64 = 0x14;
const EVENT_REMOVE: u64 = 0x15;
const EVENT_UNMAP: u64 = 0x16;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

const PAGE: u64 = 4096;
/// Most memory copied during the pause instead of protected before the fork engine is used.
const PAUSE_COPY_LIMIT: u64 = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Page states

const STORED: u32 = 1 << 31;
const COPIED: u32 = 1 << 30;
const SLOT_MASK: u32 = COPIED - 1;
/// The slot of a COPIED page that holds nothing to store (it was not present at the snapshot).
const NO_DATA: u32 = SLOT_MASK;

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
    states: &'static [AtomicU32],
    /// One bit per page: it held data at the snapshot. Also a fresh mapping: only the ranges
    /// with data are written, 64 pages per word.
    present: &'static [AtomicU64],
    copies: u64,
    copies_cap: u32,
    next_copy: AtomicU32,
    uffd: i32,
    /// Pages copied before the writer stored them.
    pub copied: AtomicU64,
    /// Of those, pages the writer copied ahead from the far end ([`help_from_end`]).
    pub ahead: AtomicU64,
    /// Pages holding data at the snapshot: the most the image stores.
    pub present_pages: u64,
    /// First address whose snapshot data was lost (+1), 0 if none.
    lost: AtomicU64,
    lost_how: AtomicU8,
    /// Huge pages split by serving a write fault in them with a small block (see
    /// [`Table::may_split`]): their 2 MiB-aligned addresses.
    split: [AtomicU64; MAX_SPLITS],
    nsplit: AtomicU32,
}

/// The largest block saved around a write fault during a flush (`SNAPSHIM_FAULT_AROUND`, a
/// power of two from one page to 2 MiB; see [`Around`]).
static AROUND: AtomicU64 = AtomicU64::new(snapshim_image::settings::DEFAULT_FAULT_AROUND);

/// Sets the largest fault-around block (rounded down to a power of two, one page to 2 MiB).
pub fn set_fault_around(bytes: u64) {
    let b = bytes.clamp(PAGE, 2 << 20);
    AROUND.store(1 << (63 - b.leading_zeros()), Relaxed);
}

/// How much the fault server saves around a write fault: the aligned block holding the page,
/// copied with one read and unprotected with one call, so a program writing all over its memory
/// takes one fault per block instead of one per page (each costs it 20-300 µs here, mostly
/// waiting for the server to be scheduled and to wake it again). Blocks start at 16 KiB and
/// double after every 10 ms in which the server was busy more than a tenth of the time, up to
/// [`AROUND`]; they halve after a 10 ms in which it was busy less than a fortieth. A program that
/// rarely writes unsaved pages keeps small blocks. The price is copy-store memory for the pages
/// of a block that the program would not have written before the writer got to them: never
/// more than the memory stored, as with the fork engine.
struct Around {
    shift: u32,
    busy: u64,
    since: u64,
}

impl Around {
    const MIN_SHIFT: u32 = 14;
    const INTERVAL_NS: u64 = 10_000_000;

    fn new() -> Around {
        Around {
            shift: Self::MIN_SHIFT,
            busy: 0,
            since: 0,
        }
    }

    fn block(&self) -> u64 {
        (1u64 << self.shift).min(AROUND.load(Relaxed))
    }

    /// The server was busy from `from` to `to` (monotonic ns) saving pages.
    fn busy(&mut self, from: u64, to: u64) {
        self.busy += to.saturating_sub(from);
        if to.saturating_sub(self.since) < Self::INTERVAL_NS {
            return;
        }
        let max = AROUND.load(Relaxed).trailing_zeros().max(Self::MIN_SHIFT);
        let elapsed = to - self.since;
        if self.busy * 10 > elapsed {
            self.shift = (self.shift + 1).min(max);
            if self.shift == max {
                HOT_UNTIL.store(to + 2 * Self::INTERVAL_NS, Relaxed);
            }
        } else if self.busy * 40 < elapsed {
            self.shift = (self.shift - 1).max(Self::MIN_SHIFT);
        }
        self.busy = 0;
        self.since = to;
    }
}

/// Until when (monotonic ns) the program counts as writing all over unsaved memory: the fault
/// server was busy more than a tenth of the time with the largest blocks. The writer then
/// copies blocks from the far end while the device writes ([`help_from_end`]).
static HOT_UNTIL: AtomicU64 = AtomicU64::new(0);

/// The copy store (address, pages) while no flush uses it: mapped by [`prepare`] while the
/// program runs, with its first [`WARM_STORE`] bytes filled in, so the first copies of a flush
/// do not wait for fresh memory (on this VM a fresh 2 MiB page took up to 10 ms); taken by
/// [`setup`]; kept by [`end`] for the next flush ([`keep_store`]). Not part of any image
/// (`objects::memory::is_own_mapping`).
use crate::state::{COPY_STORE as STORE, COPY_STORE_PAGES as STORE_PAGES};
/// Bytes of the store [`prepare`] filled in (see [`warm_bytes`]).
static STORE_FILLED: AtomicU64 = AtomicU64::new(0);
const WARM_STORE: u64 = 32 << 20;

/// Set while a flush is on: the savers and the thread-exit hook act only then.
static FLUSHING: AtomicU32 = AtomicU32::new(0);
/// The current flush's table. Null before the snapshot: the fault server then only lifts
/// protection (see [`prepare`]).
static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
/// Program threads inside [`save_range`] (futex word: the writer waits for 0 before freeing).
static SAVERS: AtomicU32 = AtomicU32::new(0);
/// The fault server's TID, cleared by the kernel when it exits (futex word).
static SERVER_TID: AtomicU32 = AtomicU32::new(0);
/// The userfaultfd from [`prepare`] to [`end`] (or [`teardown`]), else -1.
static UFFD: AtomicI32 = AtomicI32::new(-1);
/// The pipe that tells the fault server to end (read end, write end).
static STOP: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
/// The writer holds the fault server between batches while it takes the snapshot (futex word),
/// and the server says whether it is inside a batch (futex word): see [`hold_server`].
static HOLD: AtomicU32 = AtomicU32::new(0);
static BUSY: AtomicU32 = AtomicU32::new(0);
/// Regions registered and write-protected ahead of the pause, `[start, end)`; `start` is set to
/// 0 for a region whose protection a thread on its way out lifted. Changed under `PRE_LOCK`.
const PRE_MAX: usize = 1024;
static PRE: [[AtomicU64; 2]; PRE_MAX] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; PRE_MAX];
static PRE_N: AtomicU32 = AtomicU32::new(0);
static PRE_LOCK: AtomicU32 = AtomicU32::new(0);
/// Threads that ran their exit hook and may be on their way out: TID and an address on the
/// stack they run on.
static EXITING: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
static EXITING_SP: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static EXITING_NEXT: AtomicU32 = AtomicU32::new(0);

impl Table {
    fn state_index(&self, addr: u64) -> Option<(usize, &PlanRegion)> {
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
    fn set_present(&self, i0: usize, i1: usize) {
        set_bits(self.present, i0, i1)
    }

    fn copy_ptr(&self, slot: u32) -> *mut u8 {
        (self.copies + slot as u64 * PAGE) as *mut u8
    }

    /// Saves page `idx` at `addr` unless the writer or another saver already has: copies it if
    /// it was present at the snapshot, else marks it as holding nothing. Returns false if the
    /// page's data could not be read (it is gone).
    fn save_page(&self, idx: usize, addr: u64) -> bool {
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
    fn save_around(&self, addr: u64, w: u64) -> (u64, u64) {
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
    fn may_split(&self, addr: u64) -> bool {
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
    fn save_block(&self, r: &PlanRegion, from: u64, to: u64) -> Option<u64> {
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
    fn copy_run(&self, i0: usize, addr: u64, n: usize) -> Result<u64, u8> {
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
    fn pieces(&self, start: u64, end: u64, mut f: impl FnMut(&PlanRegion, usize, u64, u64)) {
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
    fn save(&self, start: u64, end: u64) {
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
    fn check_released(&self, start: u64, end: u64, how: u8) {
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

    fn mark_lost(&self, addr: u64, how: u8) {
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

const LOST_UNREADABLE: u8 = 0;
const LOST_UNMAP: u8 = 1;
const LOST_REMOVE: u8 = 2;
const LOST_REMAP: u8 = 3;
const LOST_STORE_FULL: u8 = 4;

fn open_uffd() -> sys::Result<i32> {
    // SAFETY: userfaultfd takes only flags.
    let fd = sys::check(unsafe { sc!(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) })?
        as i32;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: FEATURES,
        ioctls: 0,
    };
    if let Err(e) = ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as *mut u8) {
        sys::close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// Whether this process may use the engine: a userfaultfd with write-protect faults, unpopulated
/// pages and the unmap/remove/remap events. Probed once.
pub fn available() -> bool {
    static PROBED: AtomicU8 = AtomicU8::new(0);
    match PROBED.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = open_uffd().map(sys::close).is_ok();
            PROBED.store(if ok { 1 } else { 2 }, Relaxed);
            ok
        }
    }
}

/// Sets or lifts write protection. The kernel refuses (EAGAIN) while an unmap/remove/remap
/// event is waiting to be read: the fault server reads them, so other threads just retry, and
/// the server itself passes `once` and reads its messages before retrying.
fn protect_inner(uffd: i32, start: u64, len: u64, on: bool, once: bool) -> sys::Result<i64> {
    let mut wp = UffdioWriteprotect {
        start,
        len,
        mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    loop {
        match ioctl(
            uffd,
            UFFDIO_WRITEPROTECT,
            &mut wp as *mut UffdioWriteprotect as *mut u8,
        ) {
            Err(libc::EINTR) => continue,
            Err(libc::EAGAIN) if !once => {
                // SAFETY: sched_yield has no arguments.
                unsafe { sc!(libc::SYS_sched_yield) };
            }
            r => return r,
        }
    }
}

const HUGE: u64 = 2 << 20;
/// Huge pages a flush may split to serve write faults quickly (see [`Table::may_split`]).
const MAX_SPLITS: usize = 32;

/// The aligned block of `w` bytes (a power of two) holding `addr`, cut to `[start, end)`.
fn block_of(addr: u64, w: u64, start: u64, end: u64) -> (u64, u64) {
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
fn huge(start: u64, end: u64) -> bool {
    crate::state::HUGEPAGES.load(Relaxed) && end - start >= crate::state::HUGE_MIN as u64
}

/// Before the snapshot, the range to unprotect for a write fault at `addr`: its page, or its
/// 2 MiB block in huge-page memory ([`huge`]; the pause protects again whatever was written).
fn pre_block(addr: u64) -> (u64, u64) {
    let n = (PRE_N.load(Acquire) as usize).min(PRE_MAX);
    for r in &PRE[..n] {
        let (start, end) = (r[0].load(Relaxed), r[1].load(Relaxed));
        if start != 0 && (start..end).contains(&addr) && huge(start, end) {
            let (from, to) = block_of(addr, HUGE, start, end);
            return (from, to - from);
        }
    }
    (addr, PAGE)
}

/// Wakes the threads waiting on faults in the range without lifting anything: they fault again.
fn wake(uffd: i32, start: u64, len: u64) {
    let mut r = [start, len];
    let _ = ioctl(uffd, UFFDIO_WAKE, r.as_mut_ptr() as *mut u8);
}

fn protect(uffd: i32, start: u64, len: u64, on: bool) -> sys::Result<i64> {
    protect_inner(uffd, start, len, on, false)
}

// ---------------------------------------------------------------------------------------------
// Before the pause

/// Starts a snapshot while the program still runs: opens the userfaultfd, starts the fault
/// server, registers the regions the snapshot will (probably) store and write-protects them.
/// Until [`begin`], the server only lifts the protection of each page the program writes.
///
/// `maps`/`wanted` are read without stopping the program: they may be out of date by the pause,
/// which is why [`begin`] trusts only its own map and the page tables.
///
/// On error nothing is left behind.
pub fn prepare(maps: &[MapsEntry], wanted: &[Wanted]) -> Result<(), String> {
    let uffd = open_uffd().map_err(|e| alloc::format!("userfaultfd: errno {e}"))?;
    let mut stop = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { sc!(libc::SYS_pipe2, stop.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        sys::close(uffd);
        return Err("cannot create a pipe for the fault server".into());
    }
    UFFD.store(uffd, Release);
    STOP[0].store(stop[0], Relaxed);
    STOP[1].store(stop[1], Relaxed);
    if let Err(e) = spawn_server() {
        teardown();
        return Err(alloc::format!("cannot start the fault server: errno {e}"));
    }
    let own = own_data_ranges(maps);
    let pages: u64 = wanted
        .iter()
        .filter(|w| !w.file_backed)
        .map(|w| (maps[w.entry].end - maps[w.entry].start) / PAGE)
        .sum();
    if let Ok((addr, cap)) = keep_or_map_store(store_cap(pages)) {
        let warm = warm_bytes().min(cap * PAGE);
        // SAFETY: filling in the start of the store, ours (a hint: may fail harmlessly). Pages
        // an earlier flush used and the kernel did not take back are there already.
        unsafe { sc!(libc::SYS_madvise, addr, warm, libc::MADV_POPULATE_WRITE) };
        STORE_FILLED.store(warm, Relaxed);
        STORE_PAGES.store(cap, Relaxed);
        STORE.store(addr, Release);
    }
    let mut n = 0usize;
    for w in wanted {
        let e = &maps[w.entry];
        if w.file_backed || own.iter().any(|&(s, t)| e.start < t && e.end > s) || n == PRE_MAX {
            continue;
        }
        if register(uffd, e.start, e.end).is_ok() {
            PRE[n][0].store(e.start, Relaxed);
            PRE[n][1].store(e.end, Relaxed);
            n += 1;
        }
    }
    PRE_N.store(n as u32, Release);
    for r in &PRE[..n] {
        lock_pre();
        let (start, end) = (r[0].load(Relaxed), r[1].load(Relaxed));
        // The stack of a thread already on its way out stays writable (see thread_exiting).
        if start != 0 && !exiting_in(start, end) {
            let _ = protect(uffd, start, end - start, true);
        }
        unlock_pre();
    }
    Ok(())
}

/// Copy-store slots for `pages` pages with data: at most one copy per page, plus slack for the
/// slots a saver loses when the writer or another saver publishes a page first.
fn store_cap(pages: u64) -> u64 {
    (pages + pages / 4 + 4096).clamp(1, NO_DATA as u64 - 1)
}

/// Maps a copy store of `cap` pages: never registered, in no image; untouched slots cost nothing
/// (MAP_NORESERVE). Huge pages where the system allows them: a copy into a fresh 4 KiB page
/// costs about 3.5 µs here, most of it allocating the page; into a huge page, 1.3 µs.
fn map_store(cap: u64) -> sys::Result<(u64, u64)> {
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
fn warm_bytes() -> u64 {
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
fn keep_or_map_store(cap: u64) -> sys::Result<(u64, u64)> {
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
fn keep_store(addr: u64, cap: u64, used: u64) {
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
fn drop_store() {
    let addr = STORE.swap(0, AcqRel);
    if addr != 0 {
        // SAFETY: the store, mapped by us and used by nobody (no flush has it).
        unsafe { sc!(libc::SYS_munmap, addr, STORE_PAGES.load(Relaxed) * PAGE) };
    }
}

fn bit(words: &[AtomicU64], i: usize) -> bool {
    words[i / 64].load(Relaxed) & (1 << (i % 64)) != 0
}

/// Sets bits `[i0, i1)`, a word at a time where it can. Not atomic as a whole (a plain load
/// and store: a locked fetch_or per word made the pause 0.1 ms longer on a 4 GiB heap), so for
/// words no other thread uses meanwhile.
fn set_bits(words: &[AtomicU64], mut i0: usize, i1: usize) {
    while i0 < i1 {
        let (w, b) = (i0 / 64, i0 % 64);
        let n = (64 - b).min(i1 - i0);
        let bits = if n == 64 { !0 } else { ((1u64 << n) - 1) << b };
        words[w].store(words[w].load(Relaxed) | bits, Relaxed);
        i0 += n;
    }
}

/// Whether a thread that ran its exit hook, and still exists, runs on `[start, end)`.
fn exiting_in(start: u64, end: u64) -> bool {
    let pid = sys::getpid();
    EXITING.iter().zip(&EXITING_SP).any(|(t, sp)| {
        let (tid, sp) = (t.load(Relaxed), sp.load(Relaxed));
        tid != 0 && (start..end).contains(&sp) && sys::tgkill(pid, tid, 0).is_ok()
    })
}

fn lock_pre() {
    while PRE_LOCK.compare_exchange(0, 1, Acquire, Relaxed).is_err() {
        sys::futex_wait(&PRE_LOCK, 1, Some(1_000_000));
    }
}

fn unlock_pre() {
    PRE_LOCK.store(0, Release);
    sys::futex_wake(&PRE_LOCK);
}

/// Ends a snapshot that will not be taken after [`prepare`] (or [`begin`] failed): stops the
/// fault server and closes the userfaultfd, which lifts every protection and registration.
pub fn teardown() {
    lock_pre();
    PRE_N.store(0, Release);
    drop_store();
    release_server();
    stop_server();
    for fd in [&UFFD, &STOP[0], &STOP[1]] {
        let f = fd.swap(-1, AcqRel);
        if f >= 0 {
            sys::close(f);
        }
    }
    unlock_pre();
}

/// Whether `fd` is one of the engine's own descriptors (not the program's, not in an image).
pub fn is_own_fd(fd: i32) -> bool {
    fd >= 0
        && [&UFFD, &STOP[0], &STOP[1]]
            .iter()
            .any(|w| w.load(Relaxed) == fd)
}

/// The TID of the fault server, 0 if there is none: it is not a program thread to park.
pub fn server_tid() -> i32 {
    SERVER_TID.load(Acquire) as i32
}

/// In a restored process: the shim's statics are those of the snapshot instant, when the
/// snapshot's userfaultfd, fault server and pause were alive. None of them exists here.
pub fn after_restore() {
    for w in [&UFFD, &STOP[0], &STOP[1]] {
        w.store(-1, Relaxed);
    }
    SERVER_TID.store(0, Relaxed);
    HOLD.store(0, Relaxed);
    BUSY.store(0, Relaxed);
    PRE_N.store(0, Relaxed);
    PRE_LOCK.store(0, Relaxed);
    FLUSHING.store(0, Relaxed);
    TABLE.store(core::ptr::null_mut(), Relaxed);
    SAVERS.store(0, Relaxed);
    // The snapshot may have been taken while prepare's copy store was mapped: not any more.
    STORE.store(0, Relaxed);
    STORE_PAGES.store(0, Relaxed);
    STORE_FILLED.store(0, Relaxed);
    for e in EXITING.iter() {
        e.store(0, Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The pause

/// Takes the snapshot during the pause, after [`prepare`]: registers the `wanted` regions not
/// registered yet, records which pages hold data (`PAGEMAP_SCAN`: present or swapped, not the
/// shared zero page) and write-protects again those whose protection is off (written since
/// [`prepare`], or new: the same scan says which), copies the pages of regions that cannot be
/// protected, and switches the fault server to saving pages. The program must be
/// parked. On error the snapshot is given up ([`teardown`]).
pub fn begin(maps: &[MapsEntry], wanted: &[Wanted]) -> Result<&'static Table, String> {
    let pm_fd = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0);
    hold_server();
    let r = match pm_fd {
        Ok(pm_fd) => setup(maps, wanted, pm_fd),
        Err(e) => Err(alloc::format!("cannot open /proc/self/pagemap: errno {e}")),
    };
    if let Ok(fd) = pm_fd {
        sys::close(fd);
    }
    match r {
        Ok(t) => {
            release_server();
            Ok(t)
        }
        Err(msg) => {
            teardown();
            Err(msg)
        }
    }
}

/// A zero-filled private mapping of `bytes`, as a slice of `T` (an atomic integer type, for
/// which all-zero bytes are a valid value). Unmapped by [`end`].
fn zeroed<T>(count: usize) -> Result<&'static [T], String> {
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

fn unmap_slice<T>(s: &[T]) {
    let bytes = (s.len().max(1) * core::mem::size_of::<T>()).next_multiple_of(PAGE as usize);
    // SAFETY: a mapping made by zeroed(), no longer used by anyone.
    unsafe { sc!(libc::SYS_munmap, s.as_ptr(), bytes) };
}

fn setup(maps: &[MapsEntry], wanted: &[Wanted], pm_fd: i32) -> Result<&'static Table, String> {
    let uffd = UFFD.load(Acquire);
    if uffd < 0 {
        return Err("the snapshot was not prepared".into());
    }
    let own = own_data_ranges(maps);
    let exiting = exiting_stacks();
    let mut regions = Vec::with_capacity(wanted.len());
    let mut total = 0usize;
    for w in wanted {
        let e = &maps[w.entry];
        let overlaps = |v: &[(u64, u64)]| v.iter().any(|&(s, t)| e.start < t && e.end > s);
        // Not protected: the shim's own data, and the stack of a thread on its way out (see
        // thread_exiting); their pages are copied now instead. Registering again what prepare
        // registered changes nothing; a region mapped since is registered now.
        let registered = !w.file_backed
            && !overlaps(&own)
            && !exiting.iter().any(|&a| (e.start..e.end).contains(&a))
            && register(uffd, e.start, e.end).is_ok();
        if !registered && !w.file_backed {
            let _ = unregister(uffd, e.start, e.end);
        }
        regions.push(PlanRegion {
            start: e.start,
            end: e.end,
            first: total,
            registered,
        });
        total += ((e.end - e.start) / PAGE) as usize;
    }
    let states = zeroed::<AtomicU32>(total)?;
    let present = match zeroed::<AtomicU64>(total.div_ceil(64)) {
        Ok(p) => p,
        Err(e) => {
            unmap_slice(states);
            return Err(e);
        }
    };
    let mut table = Table {
        regions,
        states,
        present,
        copies: 0,
        copies_cap: 0,
        next_copy: AtomicU32::new(0),
        uffd,
        copied: AtomicU64::new(0),
        ahead: AtomicU64::new(0),
        present_pages: 0,
        lost: AtomicU64::new(0),
        lost_how: AtomicU8::new(0),
        split: [const { AtomicU64::new(0) }; MAX_SPLITS],
        nsplit: AtomicU32::new(0),
    };
    let give_up = |t: &Table, msg: String| {
        unmap_slice(t.states);
        unmap_slice(t.present);
        msg
    };
    crate::state::mark(3);

    // Which pages hold data at this instant; protect again those whose protection is off.
    let mut count = 0u64;
    let mut pm = Vec::new();
    let mut scan_ok = true;
    for (r, w) in table.regions.iter().zip(wanted) {
        if r.registered && scan_ok {
            let mut failed = 0;
            let scanned = scan_pages(pm_fd, r.start, r.end, |a, b, written| {
                let i0 = r.first + ((a - r.start) / PAGE) as usize;
                table.set_present(i0, i0 + ((b - a) / PAGE) as usize);
                count += (b - a) / PAGE;
                if written {
                    if let Err(e) = protect_now(uffd, a, b - a) {
                        failed = e;
                    }
                }
            });
            match scanned {
                Ok(()) if failed == 0 => continue,
                Ok(()) => {
                    return Err(give_up(
                        &table,
                        alloc::format!(
                            "cannot write-protect in {:#x}-{:#x}: errno {failed}",
                            r.start,
                            r.end
                        ),
                    ))
                }
                Err(_) => scan_ok = false, // no PAGEMAP_SCAN here: read the pagemap instead
            }
        }
        if let Err(e) = memory::pagemap_of(pm_fd, &maps[w.entry], &mut pm) {
            return Err(give_up(
                &table,
                alloc::format!("cannot read the pagemap: errno {e}"),
            ));
        }
        for (k, &f) in pm.iter().enumerate() {
            let has = if w.file_backed {
                f & PM_SWAP != 0 || (f & PM_PRESENT != 0 && f & PM_FILE == 0)
            } else {
                f & (PM_PRESENT | PM_SWAP) != 0
            };
            if has && !table.present(r.first + k) {
                table.set_present(r.first + k, r.first + k + 1);
                count += 1;
            }
        }
        // Without the scan, which pages have data is not known cheaply: protect all again.
        if r.registered {
            if let Err(e) = protect_now(uffd, r.start, r.end - r.start) {
                return Err(give_up(
                    &table,
                    alloc::format!(
                        "cannot write-protect {:#x}-{:#x}: errno {e}",
                        r.start,
                        r.end
                    ),
                ));
            }
        }
    }

    crate::state::mark(4);
    // Pages that must be copied during the pause (regions that cannot be protected: private
    // file mappings, such as the image a restored process runs from). Past a limit the pause
    // would be long: the fork engine does better then.
    let unprotected: u64 = table
        .regions
        .iter()
        .filter(|r| !r.registered)
        .map(|r| {
            let n = ((r.end - r.start) / PAGE) as usize;
            (r.first..r.first + n).filter(|&i| table.present(i)).count() as u64
        })
        .sum();
    if unprotected * PAGE > PAUSE_COPY_LIMIT {
        return Err(give_up(
            &table,
            alloc::format!(
                "{} MiB would have to be copied during the pause (memory that cannot be \
                 write-protected, such as a restored process's pages mapped from its image)",
                (unprotected * PAGE) >> 20
            ),
        ));
    }
    // The copy store (see map_store), usually the one prepare made.
    // (Grown if memory was mapped since prepare and the store made then is too small.)
    let (copies, cap) = match keep_or_map_store(store_cap(count)) {
        Ok(s) => s,
        Err(e) => {
            return Err(give_up(
                &table,
                alloc::format!("cannot map the copy store: errno {e}"),
            ))
        }
    };
    table.copies = copies;
    table.copies_cap = cap as u32;
    table.present_pages = count;
    let table: &'static Table = alloc::boxed::Box::leak(alloc::boxed::Box::new(table));
    let give_up = |msg: String| {
        // SAFETY: the copy store just mapped, used by nobody yet.
        unsafe { sc!(libc::SYS_munmap, copies, cap * PAGE) };
        unmap_slice(table.states);
        unmap_slice(table.present);
        msg
    };

    // Regions that are not protected are settled now: their present pages are copied.
    for r in table.regions.iter().filter(|r| !r.registered) {
        let (mut a, mut i) = (r.start, r.first);
        while a < r.end {
            if !table.save_page(i, a) {
                return Err(give_up(alloc::format!("cannot read memory at {a:#x}")));
            }
            a += PAGE;
            i += 1;
        }
    }
    table.copied.store(0, Relaxed);
    table.ahead.store(0, Relaxed);
    crate::state::mark(5);
    TABLE.store(table as *const Table as *mut Table, Release);
    FLUSHING.store(1, SeqCst);
    PRE_N.store(0, Release);
    crate::state::mark(6);
    Ok(table)
}

/// Write-protects during the pause. The kernel refuses (EAGAIN) only while an unmap, remove or
/// remap event is unread, which cannot be the case with every program thread parked (each such
/// event is read before its system call returns); a bound keeps a surprise from hanging the
/// pause.
fn protect_now(uffd: i32, start: u64, len: u64) -> Result<(), i32> {
    for _ in 0..10_000 {
        match protect_inner(uffd, start, len, true, true) {
            Err(libc::EAGAIN) => {
                // SAFETY: sched_yield has no arguments.
                unsafe { sc!(libc::SYS_sched_yield) };
            }
            r => return r.map(|_| ()),
        }
    }
    Err(libc::EAGAIN)
}

fn register(uffd: i32, start: u64, end: u64) -> sys::Result<i64> {
    let mut reg = UffdioRegister {
        start,
        len: end - start,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl(
        uffd,
        UFFDIO_REGISTER,
        &mut reg as *mut UffdioRegister as *mut u8,
    )
}

fn unregister(uffd: i32, start: u64, end: u64) -> sys::Result<i64> {
    let mut range = [start, end - start];
    ioctl(uffd, UFFDIO_UNREGISTER, range.as_mut_ptr() as *mut u8)
}

/// Calls `f(start, end, written)` for every range of `[start, end)` whose pages hold data
/// (present or swapped, not the shared zero page), with the PAGEMAP_SCAN ioctl; `written` says
/// the range's write-protect bit is clear (written since it was protected, or never protected).
fn scan_pages(fd: i32, start: u64, end: u64, mut f: impl FnMut(u64, u64, bool)) -> sys::Result<()> {
    let q = ScanQuery {
        flags: 0,
        inverted: PAGE_IS_PFNZERO,
        mask: PAGE_IS_PFNZERO,
        anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        ret: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_WRITTEN,
    };
    pagemap_scan(fd, start, end, &q, |a, b, cats| {
        f(a, b, cats & PAGE_IS_WRITTEN != 0)
    })
}

/// The shim's own writable memory: its statics are written by the fault server and by savers
/// while the flush runs, so they are copied during the pause instead of protected.
fn own_data_ranges(maps: &[MapsEntry]) -> Vec<(u64, u64)> {
    let probes = [
        &FLUSHING as *const AtomicU32 as u64,
        &threads::SLOTS as *const _ as u64,
        &threads::HELPER_SLOT as *const _ as u64,
        &SERVER_TID as *const AtomicU32 as u64,
        &PRE as *const _ as u64,
    ];
    maps.iter()
        .filter(|e| probes.iter().any(|&p| (e.start..e.end).contains(&p)))
        .map(|e| (e.start, e.end))
        .collect()
}

/// Stack regions of threads that ran their exit hook (they may exit during the flush).
fn exiting_stacks() -> Vec<u64> {
    let n = (threads::NEXT_SLOT.load(Acquire) as usize).min(threads::MAX_THREADS);
    let mut v = Vec::new();
    for s in &threads::SLOTS[..n] {
        let tid = s.tid.load(Relaxed);
        if EXITING.iter().any(|e| e.load(Relaxed) == tid) {
            v.push(s.ctx_rsp.load(Relaxed));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The fault server: a bare thread (no TLS of its own, no libc), stack in the reserved range.

const SERVER_STACK: u64 = 256 << 10;

fn spawn_server() -> sys::Result<()> {
    let top = STACK_START + SERVER_STACK;
    let sp = top - 32;
    // SAFETY: the writer stack range is mapped read-write from before prepare() until the
    // checkpoint is over; the server's part is its lowest SERVER_STACK bytes, far below the
    // writer's own frames.
    unsafe {
        *(sp as *mut u64) = server_main as *const () as u64;
        *((sp + 8) as *mut u64) = 0;
    }
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID;
    let tid_word = SERVER_TID.as_ptr();
    let r: i64;
    // SAFETY: clone with a new stack holding the entry point and its argument. The child pops
    // them and calls server_main, which never returns (it ends with the exit system call); it
    // shares this thread's TLS pointer but never uses TLS. The parent continues normally.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "pop rax",
            "pop rdi",
            "and rsp, -16",
            "call rax",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone => r,
            in("rdi") flags as u64,
            in("rsi") sp,
            in("rdx") tid_word,
            in("r10") tid_word,
            in("r8") 0u64,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    sys::check(r).map(|_| ())
}

extern "C" fn server_main(_: u64) -> ! {
    let (uffd, stop) = (UFFD.load(Acquire), STOP[0].load(Relaxed));
    let mut msgs = [[0u64; 4]; 32];
    let mut around = Around::new();
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { sc!(libc::SYS_poll, pfd.as_mut_ptr(), 2, -1i64) };
        if pfd[1].revents != 0 {
            // Only ever asked while not held (see teardown and end).
            serve(uffd, &mut msgs, &mut around);
            // SAFETY: ends this thread only; the kernel clears SERVER_TID and wakes the writer.
            unsafe { sc!(libc::SYS_exit, 0) };
        }
        // A batch starts only while the writer does not hold the server; both sides announce
        // themselves first (sequentially consistent), so one of them always sees the other.
        BUSY.store(1, SeqCst);
        if HOLD.load(SeqCst) != 0 {
            BUSY.store(0, SeqCst);
            sys::futex_wake(&BUSY);
            while HOLD.load(SeqCst) != 0 {
                sys::futex_wait(&HOLD, 1, None);
            }
            continue;
        }
        serve(uffd, &mut msgs, &mut around);
        BUSY.store(0, SeqCst);
        sys::futex_wake(&BUSY);
    }
}

/// Keeps the fault server from starting a batch and waits for the one it is in to end: while
/// the writer takes the snapshot, no page may be unprotected behind its back.
fn hold_server() {
    HOLD.store(1, SeqCst);
    while BUSY.load(SeqCst) != 0 {
        sys::futex_wait(&BUSY, 1, Some(1_000_000));
    }
}

fn release_server() {
    HOLD.store(0, SeqCst);
    sys::futex_wake(&HOLD);
}

/// Asks the fault server to end and waits until it has.
fn stop_server() {
    let w = STOP[1].load(Relaxed);
    if w >= 0 {
        let _ = sys::write(w, b"x");
    }
    loop {
        let tid = SERVER_TID.load(Acquire);
        if tid == 0 {
            break;
        }
        sys::futex_wait(&SERVER_TID, tid, Some(10_000_000));
    }
}

/// Handles every message waiting on the userfaultfd. Before the snapshot (no table) a fault
/// only has its page unprotected: [`begin`] protects again every page written by then. After,
/// the page is saved first. A fault whose page cannot be unprotected yet (an event is pending)
/// is kept in `retry` and tried again after the next read, which completes the events.
fn serve(uffd: i32, msgs: &mut [[u64; 4]; 32], around: &mut Around) {
    let mut retry = [(0u64, 0u64, 0u64); 64];
    let mut nretry = 0usize;
    loop {
        // SAFETY: msgs is writable for its size; uffd_msg is 32 bytes.
        let n = unsafe { sc!(libc::SYS_read, uffd, msgs.as_mut_ptr(), 32 * 32) };
        let n = if n > 0 { n as usize / 32 } else { 0 };
        let table = TABLE.load(Acquire);
        // SAFETY: the writer frees the table only after this thread has exited.
        let t = (!table.is_null()).then(|| unsafe { &*table });
        // (start, length, faulting page): the range to unprotect, and the page alone if the
        // range cannot be (part of it was unmapped since the snapshot).
        let mut pending = [(0u64, 0u64, 0u64); 64];
        let mut npending = 0usize;
        for &r in &retry[..nretry] {
            pending[npending] = r;
            npending += 1;
        }
        for m in &msgs[..n] {
            let ev = m[0] & 0xff;
            match (ev, t) {
                (EVENT_PAGEFAULT, _) => {
                    let addr = m[2] & !(PAGE - 1);
                    let range = match (m[1] & PAGEFAULT_FLAG_WP != 0, t) {
                        (true, Some(t)) => {
                            let t0 = sys::monotonic_ns();
                            let r = t.save_around(addr, around.block());
                            around.busy(t0, sys::monotonic_ns());
                            r
                        }
                        (true, None) => pre_block(addr),
                        _ => (addr, PAGE),
                    };
                    if npending < pending.len() {
                        pending[npending] = (range.0, range.1, addr);
                        npending += 1;
                    } else {
                        // No room to remember it: wake the thread, whose write faults again
                        // and comes back in a later read.
                        wake(uffd, range.0, range.1);
                    }
                }
                (EVENT_UNMAP, Some(t)) => t.check_released(m[1], m[2], LOST_UNMAP),
                (EVENT_REMOVE, Some(t)) => t.check_released(m[1], m[2], LOST_REMOVE),
                (EVENT_REMAP, Some(t)) => t.check_released(m[1], m[1] + m[3], LOST_REMAP),
                _ => {}
            }
        }
        nretry = 0;
        for &(start, len, addr) in &pending[..npending] {
            let mut r = protect_inner(uffd, start, len, false, true);
            if r.is_err() && r != Err(libc::EAGAIN) && len > PAGE {
                r = protect_inner(uffd, addr, PAGE, false, true);
            }
            if r == Err(libc::EAGAIN) {
                retry[nretry] = (start, len, addr);
                nretry += 1;
            }
        }
        if n == 0 && nretry == 0 {
            return;
        }
        if n == 0 {
            // Only faults waiting for an event to be read by someone: let the kernel move on.
            // SAFETY: sched_yield has no arguments.
            unsafe { sc!(libc::SYS_sched_yield) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Program threads

/// Whether a flush is on (cheap: one load).
#[inline]
pub fn flushing() -> bool {
    FLUSHING.load(Relaxed) != 0
}

/// Runs `f` on the current flush's table, if a flush is on; the writer does not free the table
/// before every such call has returned.
fn with_table(f: impl FnOnce(&Table)) {
    if FLUSHING.load(Acquire) == 0 {
        return;
    }
    SAVERS.fetch_add(1, AcqRel);
    let t = TABLE.load(Acquire);
    if FLUSHING.load(Acquire) != 0 && !t.is_null() {
        // SAFETY: the writer frees the table only after FLUSHING is 0 and SAVERS drained.
        f(unsafe { &*t });
    }
    if SAVERS.fetch_sub(1, AcqRel) == 1 {
        sys::futex_wake(&SAVERS);
    }
}

/// Saves the snapshot's pages in `[addr, addr + len)` that are not stored yet, then lifts their
/// protection. Called by program threads right before they unmap, move or discard memory. Does
/// nothing unless a flush is on.
pub fn save_range(addr: u64, len: u64) {
    if len != 0 {
        with_table(|t| t.save(addr, addr.saturating_add(len)));
    }
}

/// A thread's exit hook (see the pthread_create wrapper): the thread is about to give its stack
/// back and have the kernel clear its TID in its descriptor, a write that cannot wait for the
/// fault server once the thread is exiting. Notes the thread, so a snapshot starting now leaves
/// its stack unprotected; lifts the protection [`prepare`] put on its stack; during a flush,
/// saves the stack region it runs on (the descriptor is at its top).
pub fn thread_exiting() {
    let tid = sys::gettid();
    let here = &tid as *const i32 as u64;
    // Not parked while holding the lock: a pause could need it (teardown).
    let old = sys::block_all_signals();
    lock_pre();
    let k = EXITING_NEXT.fetch_add(1, Relaxed) as usize % EXITING.len();
    EXITING_SP[k].store(here, Relaxed);
    EXITING[k].store(tid, Relaxed);
    let n = (PRE_N.load(Acquire) as usize).min(PRE_MAX);
    let uffd = UFFD.load(Acquire);
    for r in &PRE[..n] {
        let (start, end) = (r[0].load(Relaxed), r[1].load(Relaxed));
        if start != 0 && (start..end).contains(&here) {
            r[0].store(0, Relaxed);
            let _ = protect(uffd, start, end - start, false);
        }
    }
    unlock_pre();
    sys::restore_signals(&old);
    with_table(|t| {
        if let Some((_, r)) = t.state_index(here) {
            t.save(r.start, r.end);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The end of a flush

/// Stops the fault server, waits for savers, closes the userfaultfd (which lifts every remaining
/// protection and unregisters every region) and frees the copy store and the page table.
pub fn end(t: &'static Table) {
    HOT_UNTIL.store(0, Relaxed);
    FLUSHING.store(0, SeqCst);
    loop {
        let n = SAVERS.load(Acquire);
        if n == 0 {
            break;
        }
        sys::futex_wait(&SAVERS, n, Some(10_000_000));
    }
    lock_pre();
    stop_server();
    TABLE.store(core::ptr::null_mut(), Release);
    for fd in [&UFFD, &STOP[0], &STOP[1]] {
        let f = fd.swap(-1, AcqRel);
        if f >= 0 {
            sys::close(f);
        }
    }
    unlock_pre();
    recollapse(t);
    keep_store(
        t.copies,
        t.copies_cap as u64,
        t.next_copy.load(Relaxed) as u64,
    );
    unmap_slice(t.states);
    unmap_slice(t.present);
    for e in EXITING.iter() {
        e.store(0, Relaxed);
    }
}

/// Makes whole again the huge pages split during the flush (see [`Table::may_split`]), so the
/// next snapshot scans one entry for each instead of 512. The kernel copies each into a fresh
/// huge page, as khugepaged would (0.2-0.5 ms each, meanwhile a thread writing in that 2 MiB
/// waits). Only now: no page may still be write-protected. Where it fails (the memory was
/// unmapped meanwhile, the kernel has no free huge page) the mapping stays split.
fn recollapse(t: &Table) {
    let n = (t.nsplit.load(Relaxed) as usize).min(MAX_SPLITS);
    for s in &t.split[..n] {
        // SAFETY: advice on the program's memory; MADV_COLLAPSE keeps its contents.
        unsafe {
            sc!(
                libc::SYS_madvise,
                s.load(Relaxed),
                HUGE,
                libc::MADV_COLLAPSE
            )
        };
    }
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

static COPY_AHEAD: AtomicU8 = AtomicU8::new(0);

pub fn set_copy_ahead(c: CopyAhead) {
    COPY_AHEAD.store(c as u8, Relaxed);
}

/// Whether the writer should copy ahead now: the program is writing all over unsaved memory
/// (see [`HOT_UNTIL`]), unless `SNAPSHIM_COPY_AHEAD` says otherwise.
pub fn hot() -> bool {
    match COPY_AHEAD.load(Relaxed) {
        x if x == CopyAhead::Off as u8 => false,
        x if x == CopyAhead::Always as u8 => true,
        _ => sys::monotonic_ns() < HOT_UNTIL.load(Relaxed),
    }
}

/// The writer's hand while its last window is being written and the program is [`hot`]: saves
/// and unprotects the block of [`AROUND`] bytes below `*back` (a position in `t.regions`,
/// walking down from the end), unless that reaches `front`, where the writer is. False when
/// there is nothing left to do from this end.
pub fn help_from_end(t: &Table, back: &mut (usize, u64), front: u64) -> bool {
    loop {
        let (ri, end) = *back;
        let Some(r) = t.regions.get(ri) else {
            return false;
        };
        if end <= r.start || !r.registered {
            if ri == 0 {
                return false;
            }
            *back = (ri - 1, t.regions[ri - 1].end);
            continue;
        }
        let w = AROUND.load(Relaxed);
        let from = ((end - 1) & !(w - 1)).max(r.start);
        if from < front {
            return false;
        }
        if let Some(n) = t.save_block(r, from, end) {
            t.ahead.fetch_add(n, Relaxed);
            unprotect(t, from, end - from);
        }
        *back = (ri, from);
        return true;
    }
}

pub fn unprotect(t: &Table, start: u64, len: u64) {
    let _ = protect(t.uffd, start, len, false);
}

pub fn mark_lost(t: &Table, addr: u64) {
    t.mark_lost(addr, LOST_UNREADABLE);
}
