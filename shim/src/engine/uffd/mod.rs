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
//!
//! Files: `state.rs` (what the writer, the fault server and the savers share, and the
//! write-protect calls), `table.rs` (the flush's page states and copies), `store.rs` (the copy
//! store), `server.rs` (the fault server, fault-around sizing, copying ahead); this module
//! prepares, takes and ends a snapshot, and holds the program threads' hooks.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use crate::objects::memory::{self, MapsEntry, Wanted, PM_FILE, PM_PRESENT, PM_SWAP};
use crate::objects::threads;
use crate::sys::kapi::*;
use crate::sys::{self, sc};

mod server;
mod state;
mod store;
mod table;

use server::*;
pub use server::{help_from_end, hot, set_copy_ahead, set_fault_around, set_serves_clients};
use state::*;
use store::*;
pub use store::{kept_store_bytes, prepared_store_bytes, set_keep_store};
use table::*;
pub use table::{
    copy_of, huge_pages_split, is_no_data, mark_lost, unprotect, PlanRegion, Table, STORED_BIT,
};

/// Most memory copied during the pause instead of protected before the fork engine is used.
const PAUSE_COPY_LIMIT: u64 = 64 << 20;

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
    let kept = kept_store_bytes();
    if let Ok((addr, cap)) = keep_or_map_store(store_cap(pages)) {
        let warm = warm_bytes(kept).min(cap * PAGE);
        // SAFETY: filling in the start of the store, ours (a hint: may fail harmlessly). In a
        // store kept from an earlier flush (SNAPSHIM_KEEP_STORE), the pages it used and the
        // kernel did not take back are there already.
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
    protect_prepared(uffd);
    Ok(())
}

/// Write-protects the regions [`prepare`] registered (the program runs meanwhile).
fn protect_prepared(uffd: i32) {
    let n = PRE_N.load(Acquire) as usize;
    for r in &PRE[..n] {
        lock_pre();
        let (start, end) = (r[0].load(Relaxed), r[1].load(Relaxed));
        // The stack of a thread already on its way out stays writable (see thread_exiting).
        if start != 0 && !exiting_in(start, end) {
            let _ = protect(uffd, start, end - start, true);
        }
        unlock_pre();
    }
}

/// Some time after [`prepare`], still before the pause (a group member that waited for the
/// others to prepare): write-protects again, while the program runs, what it wrote since, so
/// that little is left for [`begin`] to protect in the pause.
pub fn protect_again() {
    let uffd = UFFD.load(Acquire);
    if uffd >= 0 {
        protect_prepared(uffd);
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
/// protection and unregisters every region), frees the page table and gives the copy store back
/// (or keeps it, with `SNAPSHIM_KEEP_STORE=1`: see [`end_store`]).
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
    end_store(
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
