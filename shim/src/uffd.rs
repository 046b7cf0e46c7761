//! The userfaultfd write-protect engine (`SNAPSHIM_COW=uffd`, the `auto` choice where the kernel
//! lets this process use userfaultfd).
//!
//! During the pause the writer registers every memory region it will store with a userfaultfd in
//! write-protect mode, records which pages hold data (`PAGEMAP_SCAN`: present or swapped, not the
//! shared zero page), write-protects them, starts the *fault server* thread and releases the
//! program. Pages without data at that instant are holes in the image whatever happens to them
//! later, so they need no protection: `UFFD_FEATURE_WP_UNPOPULATED` would only make the pause
//! longer (it fills the page tables of every untouched range with markers: 28-56 ms instead of
//! about 15 ms for the 265 MiB `pattern` test app here). From then on:
//!
//! - the writer reads page data from memory (through /proc/self/mem, so a concurrently unmapped
//!   range is an error code, not a crash), writes it with O_DIRECT, marks the pages stored and
//!   lifts their protection, window by window: later writes to them cost nothing;
//! - a program thread (or the kernel on its behalf: a `read()` into a buffer, a signal frame, the
//!   rseq area) that writes a page not yet stored blocks in the kernel; the fault server copies
//!   the page into the copy store, lifts its protection and the write goes on. The writer uses
//!   the copy when it reaches the page;
//! - a program thread about to unmap, remap or `MADV_DONTNEED` memory (interposed `munmap`,
//!   `mremap`, `madvise`, fixed `mmap`, and `free`/`realloc` of chunks glibc mapped itself) first
//!   saves the pages not yet stored, in its own thread ([`save_range`]); a thread that ends saves
//!   its stack (the kernel's final write of the thread's TID, done while the thread is exiting,
//!   could not wait for the fault server).
//! - memory released behind the shim's back (glibc trimming its heap) arrives as an unmap/remove
//!   event: if it held pages present at the snapshot and not yet saved, the image is no longer
//!   exact and is discarded (the helper retries with the fork engine).
//!
//! Per page there is one state word: STORED (the writer is past it), COPIED (+ the copy's slot),
//! PRESENT (it had data at the snapshot). Whoever finds neither STORED nor COPIED copies the
//! page and publishes the copy with a compare-and-swap; the writer sets STORED with a fetch-or
//! after reading the page, and uses the copy if COPIED was set by then: a page is only ever
//! modified after COPIED or STORED is set, so either the writer's read or the copy holds the
//! snapshot's bytes.
//!
//! Memory the fault server and the savers write must never be write-protected: the shim's own
//! data (its statics are copied during the pause instead of protected), the state table (scratch
//! region), the copy store (mapped after the snapshot's memory map was read) and the server's
//! stack (reserved range).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use snapshim_image::layout::STACK_START;

use crate::capture::{self, MapsEntry, PM_FILE, PM_PRESENT, PM_SWAP};
use crate::sys::{self, sc};

// ---------------------------------------------------------------------------------------------
// Kernel interface (linux/userfaultfd.h, linux/fs.h)

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

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

const PAGEMAP_SCAN: u64 = 0xc060_6610;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGE: u64 = 4096;
/// Most memory copied during the pause instead of protected before the fork engine is used.
const PAUSE_COPY_LIMIT: u64 = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Page states

const STORED: u32 = 1 << 31;
const COPIED: u32 = 1 << 30;
const PRESENT: u32 = 1 << 29;
const SLOT_MASK: u32 = PRESENT - 1;
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
    states: Vec<AtomicU32>,
    copies: u64,
    copies_cap: u32,
    next_copy: AtomicU32,
    uffd: i32,
    mem_fd: i32,
    stop_r: i32,
    stop_w: i32,
    /// Pages copied before the writer stored them.
    pub copied: AtomicU64,
    /// First address whose snapshot data was lost (+1), 0 if none.
    lost: AtomicU64,
    lost_how: AtomicU8,
}

/// Set while a flush is on: the savers and the thread-exit hook act only then.
static FLUSHING: AtomicU32 = AtomicU32::new(0);
/// The current flush's table.
static TABLE: AtomicPtr<Table> = AtomicPtr::new(core::ptr::null_mut());
/// Program threads inside [`save_range`] (futex word: the writer waits for 0 before freeing).
static SAVERS: AtomicU32 = AtomicU32::new(0);
/// The fault server's TID, cleared by the kernel when it exits (futex word).
static SERVER_TID: AtomicU32 = AtomicU32::new(0);
/// TIDs of threads that ran their exit hook and may be on their way out.
static EXITING: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];
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

    fn copy_ptr(&self, slot: u32) -> *mut u8 {
        (self.copies + slot as u64 * PAGE) as *mut u8
    }

    /// Saves page `idx` at `addr` unless the writer or another saver already has: copies it if
    /// it was present at the snapshot, else marks it as holding nothing. Returns false if the
    /// page's data could not be read (it is gone).
    fn save_page(&self, idx: usize, addr: u64) -> bool {
        let st = &self.states[idx];
        let s = st.load(Acquire);
        if s & (STORED | COPIED) != 0 {
            return true;
        }
        if s & PRESENT == 0 {
            let _ = st.compare_exchange(s, s | COPIED | NO_DATA, AcqRel, Acquire);
            return true;
        }
        let slot = self.next_copy.fetch_add(1, Relaxed);
        if slot >= self.copies_cap {
            // Cannot happen: only present pages are copied, each at most once.
            self.mark_lost(addr, LOST_STORE_FULL);
            return false;
        }
        // SAFETY: the slot is ours alone (fetch_add) and inside the copy store.
        let dst = unsafe { core::slice::from_raw_parts_mut(self.copy_ptr(slot), PAGE as usize) };
        if !matches!(sys::pread(self.mem_fd, dst, addr), Ok(4096)) {
            if st.load(Acquire) & (STORED | COPIED) == 0 {
                self.mark_lost(addr, LOST_UNREADABLE);
                return false;
            }
            return true;
        }
        if st
            .compare_exchange(s, s | COPIED | slot, AcqRel, Acquire)
            .is_ok()
        {
            self.copied.fetch_add(1, Relaxed);
        }
        true
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
                    if s & PRESENT != 0 {
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

fn ioctl(fd: i32, req: u64, arg: *mut u8) -> sys::Result<i64> {
    // SAFETY: callers pass a request and a pointer to its matching, live argument struct.
    sys::check(unsafe { sc!(libc::SYS_ioctl, fd, req, arg) })
}

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

fn protect(uffd: i32, start: u64, len: u64, on: bool) -> sys::Result<i64> {
    protect_inner(uffd, start, len, on, false)
}

/// What a region of the captured map needs: stored, and if so whether it can be registered.
pub struct Wanted {
    pub entry: usize,
    pub file_backed: bool,
}

/// Sets up the flush during the pause: registers and write-protects `wanted` regions, copies the
/// pages of those that cannot be registered, starts the fault server. The program must be parked.
pub fn begin(maps: &[MapsEntry], wanted: &[Wanted]) -> Result<&'static Table, String> {
    let uffd = open_uffd().map_err(|e| alloc::format!("userfaultfd: errno {e}"))?;
    let mem_fd = sys::open(b"/proc/self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0);
    let pm_fd = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0);
    let r = match (mem_fd, pm_fd) {
        (Ok(mem_fd), Ok(pm_fd)) => setup(maps, wanted, uffd, mem_fd, pm_fd),
        (Err(e), _) | (_, Err(e)) => Err(alloc::format!(
            "cannot open /proc/self/mem or pagemap: errno {e}"
        )),
    };
    if let Ok(fd) = pm_fd {
        sys::close(fd);
    }
    if r.is_err() {
        // Closing the userfaultfd lifts every protection and registration made so far.
        sys::close(uffd);
        if let Ok(fd) = mem_fd {
            sys::close(fd);
        }
    }
    r
}

fn setup(
    maps: &[MapsEntry],
    wanted: &[Wanted],
    uffd: i32,
    mem_fd: i32,
    pm_fd: i32,
) -> Result<&'static Table, String> {
    let own = own_data_ranges(maps);
    let exiting = exiting_stacks();
    let mut regions = Vec::with_capacity(wanted.len());
    let mut total = 0usize;
    for w in wanted {
        let e = &maps[w.entry];
        let overlaps = |v: &[(u64, u64)]| v.iter().any(|&(s, t)| e.start < t && e.end > s);
        // Not protected: the shim's own data, and the stack of a thread on its way out (see
        // thread_exiting); their pages are copied now instead.
        let registered = !w.file_backed
            && !overlaps(&own)
            && !exiting.iter().any(|&a| (e.start..e.end).contains(&a))
            && register(uffd, e.start, e.end).is_ok();
        regions.push(PlanRegion {
            start: e.start,
            end: e.end,
            first: total,
            registered,
        });
        total += ((e.end - e.start) / PAGE) as usize;
    }
    let states: Vec<AtomicU32> = (0..total).map(|_| AtomicU32::new(0)).collect();
    crate::checkpoint::mark(3);

    // Which pages hold data at this instant.
    let mut present = 0u64;
    let mut pm = Vec::new();
    let mut scan_ok = true;
    for (r, w) in regions.iter().zip(wanted) {
        if r.registered && scan_ok {
            let scanned = scan_present(pm_fd, r.start, r.end, |a, b| {
                let i0 = r.first + ((a - r.start) / PAGE) as usize;
                let i1 = r.first + ((b - r.start) / PAGE) as usize;
                for s in &states[i0..i1] {
                    s.store(PRESENT, Relaxed);
                }
                present += (b - a) / PAGE;
            });
            match scanned {
                Ok(()) => continue,
                Err(_) => scan_ok = false, // no PAGEMAP_SCAN here: read the pagemap instead
            }
        }
        capture::pagemap_of(pm_fd, &maps[w.entry], &mut pm)
            .map_err(|e| alloc::format!("cannot read the pagemap: errno {e}"))?;
        for (k, &f) in pm.iter().enumerate() {
            let has = if w.file_backed {
                f & PM_SWAP != 0 || (f & PM_PRESENT != 0 && f & PM_FILE == 0)
            } else {
                f & (PM_PRESENT | PM_SWAP) != 0
            };
            if has && states[r.first + k].swap(PRESENT, Relaxed) == 0 {
                present += 1;
            }
        }
    }

    crate::checkpoint::mark(4);
    // Pages that must be copied during the pause (regions that cannot be protected: private
    // file mappings, such as the image a restored process runs from). Past a limit the pause
    // would be long: the fork engine does better then.
    let unprotected: u64 = regions
        .iter()
        .filter(|r| !r.registered)
        .map(|r| {
            let n = ((r.end - r.start) / PAGE) as usize;
            states[r.first..r.first + n]
                .iter()
                .filter(|s| s.load(Relaxed) & PRESENT != 0)
                .count() as u64
        })
        .sum();
    if unprotected * PAGE > PAUSE_COPY_LIMIT {
        return Err(alloc::format!(
            "{} MiB would have to be copied during the pause (memory that cannot be \
             write-protected, such as a restored process's pages mapped from its image)",
            (unprotected * PAGE) >> 20
        ));
    }
    // The copy store: at most one copy per present page. Mapped now, after the snapshot's map
    // was read, so it is in no image, and never registered.
    let cap = present.clamp(1, NO_DATA as u64 - 1);
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let copies = sys::check(unsafe {
        sc!(
            libc::SYS_mmap,
            0,
            cap * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1i64,
            0
        )
    })
    .map_err(|e| alloc::format!("cannot map the copy store: errno {e}"))? as u64;
    let unmap_copies = || {
        // SAFETY: the copy store just mapped, used by nobody yet.
        unsafe { sc!(libc::SYS_munmap, copies, cap * PAGE) };
    };
    let mut stop = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { sc!(libc::SYS_pipe2, stop.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        unmap_copies();
        return Err("cannot create a pipe for the fault server".into());
    }
    let table: &'static Table = alloc::boxed::Box::leak(alloc::boxed::Box::new(Table {
        regions,
        states,
        copies,
        copies_cap: cap as u32,
        next_copy: AtomicU32::new(0),
        uffd,
        mem_fd,
        stop_r: stop[0],
        stop_w: stop[1],
        copied: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        lost_how: AtomicU8::new(0),
    }));
    let give_up = |msg: String| {
        unmap_copies();
        sys::close(stop[0]);
        sys::close(stop[1]);
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
    crate::checkpoint::mark(5);
    for r in table.regions.iter().filter(|r| r.registered) {
        protect(uffd, r.start, r.end - r.start, true).map_err(|e| {
            give_up(alloc::format!(
                "cannot write-protect {:#x}-{:#x}: errno {e}",
                r.start,
                r.end
            ))
        })?;
    }
    crate::checkpoint::mark(6);
    TABLE.store(table as *const Table as *mut Table, Release);
    if let Err(e) = spawn_server(table) {
        TABLE.store(core::ptr::null_mut(), Release);
        return Err(give_up(alloc::format!(
            "cannot start the fault server: errno {e}"
        )));
    }
    FLUSHING.store(1, SeqCst);
    Ok(table)
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

/// Calls `f(start, end)` for every range of `[start, end)` whose pages hold data (present or
/// swapped, not the shared zero page), with the PAGEMAP_SCAN ioctl.
fn scan_present(fd: i32, start: u64, end: u64, mut f: impl FnMut(u64, u64)) -> sys::Result<()> {
    let mut vec = [[0u64; 3]; 256];
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: from,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_PFNZERO,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        let n = ioctl(fd, PAGEMAP_SCAN, &mut arg as *mut PmScanArg as *mut u8)? as usize;
        let mut last = from;
        for r in &vec[..n.min(vec.len())] {
            let (a, b) = (r[0].max(from), r[1].min(end));
            if a < b {
                f(a, b);
                last = last.max(b);
            }
        }
        // When the vector fills, walk_end can lie before ranges already returned.
        let next = arg.walk_end.max(last);
        if next <= from {
            break;
        }
        from = next;
    }
    Ok(())
}

/// The shim's own writable memory: its statics are written by the fault server and by savers
/// while the flush runs, so they are copied during the pause instead of protected.
fn own_data_ranges(maps: &[MapsEntry]) -> Vec<(u64, u64)> {
    let probes = [
        &FLUSHING as *const AtomicU32 as u64,
        &crate::park::SLOTS as *const _ as u64,
        &crate::park::HELPER_SLOT as *const _ as u64,
        &SERVER_TID as *const AtomicU32 as u64,
    ];
    maps.iter()
        .filter(|e| probes.iter().any(|&p| (e.start..e.end).contains(&p)))
        .map(|e| (e.start, e.end))
        .collect()
}

/// Stack regions of threads that ran their exit hook (they may exit during the flush).
fn exiting_stacks() -> Vec<u64> {
    let n = (crate::park::NEXT_SLOT.load(Acquire) as usize).min(crate::park::MAX_THREADS);
    let mut v = Vec::new();
    for s in &crate::park::SLOTS[..n] {
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

fn spawn_server(table: &'static Table) -> sys::Result<()> {
    let top = STACK_START + SERVER_STACK;
    let sp = top - 32;
    // SAFETY: the writer stack range is mapped read-write while the writer runs; the server's
    // part is its lowest SERVER_STACK bytes, far below the writer's own frames.
    unsafe {
        *(sp as *mut u64) = server_main as *const () as u64;
        *((sp + 8) as *mut u64) = table as *const Table as u64;
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

extern "C" fn server_main(arg: u64) -> ! {
    // SAFETY: the writer keeps the table alive until this thread has exited.
    let t = unsafe { &*(arg as *const Table) };
    let mut msgs = [[0u64; 4]; 32];
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: t.uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: t.stop_r,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { sc!(libc::SYS_poll, pfd.as_mut_ptr(), 2, -1i64) };
        serve(t, &mut msgs);
        if pfd[1].revents != 0 {
            serve(t, &mut msgs);
            // SAFETY: ends this thread only; the kernel clears SERVER_TID and wakes the writer.
            unsafe { sc!(libc::SYS_exit, 0) };
        }
    }
}

/// Handles every message waiting on the userfaultfd. A fault whose page cannot be unprotected
/// yet (an event is pending) is kept in `retry` and tried again after the next read, which
/// completes the events.
fn serve(t: &Table, msgs: &mut [[u64; 4]; 32]) {
    let mut retry = [0u64; 32];
    let mut nretry = 0usize;
    loop {
        // SAFETY: msgs is writable for its size; uffd_msg is 32 bytes.
        let n = unsafe { sc!(libc::SYS_read, t.uffd, msgs.as_mut_ptr(), 32 * 32) };
        let n = if n > 0 { n as usize / 32 } else { 0 };
        let mut pending = [0u64; 32];
        let mut npending = 0usize;
        for &addr in &retry[..nretry] {
            pending[npending] = addr;
            npending += 1;
        }
        for m in &msgs[..n] {
            match m[0] & 0xff {
                EVENT_PAGEFAULT => {
                    let addr = m[2] & !(PAGE - 1);
                    if m[1] & PAGEFAULT_FLAG_WP != 0 {
                        if let Some((idx, _)) = t.state_index(addr) {
                            t.save_page(idx, addr);
                        }
                    }
                    if npending < pending.len() {
                        pending[npending] = addr;
                        npending += 1;
                    }
                }
                EVENT_UNMAP => t.check_released(m[1], m[2], LOST_UNMAP),
                EVENT_REMOVE => t.check_released(m[1], m[2], LOST_REMOVE),
                EVENT_REMAP => t.check_released(m[1], m[1] + m[3], LOST_REMAP),
                _ => {}
            }
        }
        nretry = 0;
        for &addr in &pending[..npending] {
            if protect_inner(t.uffd, addr, PAGE, false, true) == Err(libc::EAGAIN) {
                retry[nretry] = addr;
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
/// fault server once the thread is exiting. Saves the stack region it runs on (the descriptor is
/// at its top), and notes the thread so a snapshot starting now leaves that region unprotected.
pub fn thread_exiting() {
    let tid = sys::gettid();
    let k = EXITING_NEXT.fetch_add(1, Relaxed) as usize % EXITING.len();
    EXITING[k].store(tid, Relaxed);
    let here = &tid as *const i32 as u64;
    with_table(|t| {
        if let Some((_, r)) = t.state_index(here) {
            t.save(r.start, r.end);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The end of a flush

/// Stops the fault server, waits for savers, closes the userfaultfd (which lifts every remaining
/// protection and unregisters every region) and frees the copy store.
pub fn end(t: &'static Table) {
    FLUSHING.store(0, SeqCst);
    loop {
        let n = SAVERS.load(Acquire);
        if n == 0 {
            break;
        }
        sys::futex_wait(&SAVERS, n, Some(10_000_000));
    }
    let _ = sys::write(t.stop_w, b"x");
    loop {
        let tid = SERVER_TID.load(Acquire);
        if tid == 0 {
            break;
        }
        sys::futex_wait(&SERVER_TID, tid, Some(10_000_000));
    }
    TABLE.store(core::ptr::null_mut(), Release);
    for fd in [t.uffd, t.mem_fd, t.stop_r, t.stop_w] {
        sys::close(fd);
    }
    // SAFETY: the copy store mapped in begin(); nobody uses it any more.
    unsafe { sc!(libc::SYS_munmap, t.copies, t.copies_cap as u64 * PAGE) };
    for e in EXITING.iter() {
        e.store(0, Relaxed);
    }
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
pub fn is_present(s: u32) -> bool {
    s & PRESENT != 0
}
pub fn is_no_data(s: u32) -> bool {
    s & COPIED != 0 && s & SLOT_MASK == NO_DATA
}
pub const STORED_BIT: u32 = STORED;

pub fn mem_fd(t: &Table) -> i32 {
    t.mem_fd
}

pub fn unprotect(t: &Table, start: u64, len: u64) {
    let _ = protect(t.uffd, start, len, false);
}

pub fn mark_lost(t: &Table, addr: u64) {
    t.mark_lost(addr, LOST_UNREADABLE);
}
