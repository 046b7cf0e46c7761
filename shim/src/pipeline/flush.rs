//! Flush: page data, metadata and header into the image's temporary file, from memory nothing
//! changes meanwhile (`write_out`: every thread parked, or in the forked writer) or while the
//! program runs (`write_live`: the uffd engine, which copies what the program is about to
//! change).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{AcqRel, Acquire};

use snapshim_image::layout::{RESERVED_END, RESERVED_START};
use snapshim_image::{self as image, Metadata, PageRun, PageSpan, Region, RegionKind, ShimInfo};

use super::capture::Captured;
use super::park;
use super::target::{cpath, errmsg, Target};
use crate::config::Config;
use crate::objects::memory::{self, MapsEntry, PM_FILE, PM_PRESENT, PM_SWAP};
use crate::sys::{self, sc};

/// Writes page data, metadata and header from this process's memory, which nothing may change
/// meanwhile (every thread parked, or this is the forked child). Returns the image's size.
pub fn write_out(cfg: &Config, cap: &Captured, t: &Target) -> Result<u64, String> {
    write_out_with(cfg, cap, t, true)
}

/// [`write_out`]; `direct` false writes through the page cache only (a delta written during the
/// pause: copying into the cache is faster than waiting for the device; the commit's fsync
/// comes after the program is released).
pub fn write_out_with(
    cfg: &Config,
    cap: &Captured,
    t: &Target,
    direct: bool,
) -> Result<u64, String> {
    let io = |what: &'static str| move |e: i32| errmsg(what, &t.tmp, e);
    let pm_fd = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| alloc::format!("cannot open /proc/self/pagemap: errno {e}"))?;
    let mem_fd = sys::open(b"/proc/self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap_or(-1);
    let mut pages = PageWriter::open(t);
    if !direct && pages.direct >= 0 {
        sys::close(pages.direct);
        pages.direct = -1;
    }
    let r =
        write_pages_and_meta(cfg, cap, &mut pages, pm_fd, mem_fd).map_err(|(what, e)| io(what)(e));
    for fd in [pm_fd, mem_fd] {
        if fd >= 0 {
            sys::close(fd);
        }
    }
    r
}

type IoResult<T> = Result<T, (&'static str, i32)>;

/// Runs at least this long are written with O_DIRECT.
const DIRECT_MIN: usize = 256 << 10;

/// Writes page data into the image: through O_DIRECT where the file system allows it (several
/// times faster here than through the page cache, and it does not evict the program's cached
/// files), small runs through the page cache (a synchronous O_DIRECT write per scattered page
/// costs a device round trip each, ~50 us here).
///
/// [`PageWriter::submit`] starts a large O_DIRECT write with Linux AIO and returns: the caller
/// prepares the next buffer while the device writes. Up to [`IN_FLIGHT`] writes are in flight,
/// so the device has the next one queued when one ends, whatever the writer is doing then
/// (with one, the device waited for the writer between writes: the live flush wrote 0.9-1.3
/// GiB/s to a disk that takes 1.7 GiB/s).
struct PageWriter {
    fd: i32,
    /// The image opened with O_DIRECT, or -1.
    direct: i32,
    /// The AIO context, or 0 (then writes are synchronous).
    aio: u64,
    /// The writes in flight: buffer, length and offset (to redo one on a refusal).
    inflight: [Option<(*const u8, usize, u64)>; IN_FLIGHT],
}

const IN_FLIGHT: usize = 2;

/// `struct iocb` and `struct io_event` (linux/aio_abi.h, x86_64).
#[repr(C)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: u32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

#[repr(C)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_PWRITE: u16 = 1;

impl PageWriter {
    fn open(t: &Target) -> PageWriter {
        let direct = sys::open(
            &cpath(&t.tmp),
            libc::O_WRONLY | libc::O_DIRECT | libc::O_CLOEXEC,
            0,
        );
        let mut aio = 0u64;
        if direct.is_ok() {
            // SAFETY: io_setup writes the new context into aio.
            if unsafe { sc!(libc::SYS_io_setup, IN_FLIGHT as u64, &mut aio as *mut u64) } != 0 {
                aio = 0;
            }
        }
        PageWriter {
            fd: t.fd,
            direct: direct.unwrap_or(-1),
            aio,
            inflight: [None; IN_FLIGHT],
        }
    }

    fn write(&mut self, data: &[u8], off: u64) -> sys::Result<()> {
        self.wait()?;
        if self.direct >= 0 && data.len() >= DIRECT_MIN {
            match pwrite_all(self.direct, data, off) {
                Err(libc::EINVAL) => {
                    // This file system does not do O_DIRECT.
                    self.no_direct();
                }
                r => return r,
            }
        }
        pwrite_all(self.fd, data, off)
    }

    fn no_direct(&mut self) {
        sys::close(self.direct);
        self.direct = -1;
    }

    /// Starts writing `data` at `off`, once fewer than [`IN_FLIGHT`] writes are in flight.
    /// `data` must stay untouched until [`PageWriter::wait_for`] it or [`PageWriter::wait`].
    fn submit(&mut self, data: &[u8], off: u64) -> sys::Result<()> {
        if self.aio == 0 || self.direct < 0 || data.len() < DIRECT_MIN {
            return self.write(data, off);
        }
        while self.in_flight() >= IN_FLIGHT {
            self.reap(true)?;
        }
        let i = self.inflight.iter().position(|w| w.is_none()).unwrap_or(0);
        let mut cb = Iocb {
            data: i as u64,
            key: 0,
            rw_flags: 0,
            opcode: IOCB_CMD_PWRITE,
            reqprio: 0,
            fildes: self.direct as u32,
            buf: data.as_ptr() as u64,
            nbytes: data.len() as u64,
            offset: off as i64,
            reserved2: 0,
            flags: 0,
            resfd: 0,
        };
        let mut cbs = [&mut cb as *mut Iocb];
        // SAFETY: one valid iocb whose buffer the caller keeps alive and unchanged until the
        // write is reaped; the kernel copies the iocb itself during the call.
        let r = unsafe { sc!(libc::SYS_io_submit, self.aio, 1, cbs.as_mut_ptr()) };
        if r == 1 {
            self.inflight[i] = Some((data.as_ptr(), data.len(), off));
            return Ok(());
        }
        self.write(data, off)
    }

    /// Waits for every write in flight; finishes any that came back short or refused
    /// synchronously.
    fn wait(&mut self) -> sys::Result<()> {
        while self.in_flight() > 0 {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Waits until the buffer at `buf` is no longer being written.
    fn wait_for(&mut self, buf: *const u8) -> sys::Result<()> {
        while self.inflight.iter().flatten().any(|w| w.0 == buf) {
            self.reap(true)?;
        }
        Ok(())
    }

    /// Writes in flight, after finishing those that have ended.
    fn busy(&mut self) -> sys::Result<usize> {
        while self.in_flight() > 0 && self.reap(false)? {}
        Ok(self.in_flight())
    }

    fn in_flight(&self) -> usize {
        self.inflight.iter().flatten().count()
    }

    /// Finishes one write that has ended, waiting for one if `block`. Returns whether one did.
    fn reap(&mut self, block: bool) -> sys::Result<bool> {
        if self.in_flight() == 0 {
            return Ok(false);
        }
        let mut ev = IoEvent {
            data: 0,
            obj: 0,
            res: 0,
            res2: 0,
        };
        let now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let timeout = if block {
            core::ptr::null()
        } else {
            &now as *const libc::timespec
        };
        loop {
            // SAFETY: room for one event; the timeout is null (wait) or a zero timespec.
            let n = unsafe {
                sc!(
                    libc::SYS_io_getevents,
                    self.aio,
                    block as u64,
                    1,
                    &mut ev as *mut IoEvent,
                    timeout
                )
            };
            match n {
                1 => break,
                0 if !block => return Ok(false),
                n if n == -(libc::EINTR as i64) => continue,
                n => {
                    self.inflight = [None; IN_FLIGHT];
                    return Err(-n as i32);
                }
            }
        }
        let Some((buf, len, off)) = self
            .inflight
            .get_mut(ev.data as usize)
            .and_then(|w| w.take())
        else {
            return Ok(true);
        };
        // SAFETY: the buffer given to submit(), which the caller kept alive until now.
        let data = unsafe { core::slice::from_raw_parts(buf, len) };
        match ev.res {
            r if r == len as i64 => Ok(()),
            r if r == -(libc::EINVAL as i64) => {
                self.no_direct();
                pwrite_all(self.fd, data, off)
            }
            r if r < 0 => Err(-r as i32),
            r => pwrite_all(self.direct, &data[r as usize..], off + r as u64),
        }
        .map(|()| true)
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        let _ = self.wait();
        if self.aio != 0 {
            // SAFETY: the context made by io_setup, with nothing in flight.
            unsafe { sc!(libc::SYS_io_destroy, self.aio) };
        }
        if self.direct >= 0 {
            sys::close(self.direct);
        }
    }
}

fn write_pages_and_meta(
    cfg: &Config,
    cap: &Captured,
    pages: &mut PageWriter,
    pm_fd: i32,
    mem_fd: i32,
) -> IoResult<u64> {
    let fd = pages.fd;
    let mut off = image::PAGE_SIZE; // page data starts after the header page
    let mut regions = Vec::new();
    let mut runs: Vec<PageRun> = Vec::new();
    let mut pm = Vec::new();
    let mut page_buf = alloc::vec![0u8; 4096];
    let mut inherited: Vec<PageSpan> = Vec::new();
    for e in cap.maps.iter().filter(|e| !memory::is_excluded(e)) {
        let (kind, store) = memory::classify(e);
        // A delta knows the written pages of a tracked region: it stores those with data and
        // inherits the others from its parent (incremental/).
        let tracked = cap.delta.as_ref().and_then(|d| {
            d.tracked
                .iter()
                .find(|t| t.start == e.start && t.end == e.end)
        });
        if let Some(t) = tracked {
            delta_pages(e, t, &mut pm, &mut inherited);
        }
        if store {
            if tracked.is_none() {
                memory::pagemap_of(pm_fd, e, &mut pm).map_err(|e| ("read the pagemap for", e))?;
            }
            let file_backed = matches!(kind, RegionKind::File { .. });
            let readable = e.prot & libc::PROT_READ as u32 != 0;
            // Pages written page by page from a copy, checksummed as copied: an unreadable
            // mapping's (read through /proc/self/mem), and a parked thread's stack and thread
            // block, which can still change for a moment: the thread is counted as parked just
            // before it goes to sleep, and the kernel rewrites its rseq area if it is preempted
            // meanwhile (seen once in ~100 `stop` checkpoints of the threads app: a thread block
            // changed between the checksum and the write).
            let holds = |a: u64| (e.start..e.end).contains(&a);
            let copied = !readable
                || cap
                    .threads
                    .iter()
                    .any(|t| !t.helper && (holds(t.ctx_rsp) || holds(t.fs_base)));
            // A page is stored if it holds data that is neither zero nor the file's own.
            let wanted = |i: usize| {
                let f = pm[i];
                let addr = e.start + i as u64 * 4096;
                if file_backed {
                    f & PM_SWAP != 0 || (f & PM_PRESENT != 0 && f & PM_FILE == 0)
                } else {
                    f & (PM_PRESENT | PM_SWAP) != 0 && !(readable && is_zero_page(addr))
                }
            };
            let n = pm.len();
            let mut i = 0;
            while i < n {
                if !wanted(i) {
                    i += 1;
                    continue;
                }
                let first = i;
                let start_off = off;
                let mut crc = crc32fast::Hasher::new();
                while i < n && wanted(i) {
                    let addr = e.start + i as u64 * 4096;
                    if !copied {
                        // SAFETY: a present page of a readable mapping that nothing changes
                        // while it is written (see write_out).
                        crc.update(unsafe { core::slice::from_raw_parts(addr as *const u8, 4096) });
                    } else {
                        if readable {
                            // SAFETY: a present page of a readable mapping, read once.
                            page_buf.copy_from_slice(unsafe {
                                core::slice::from_raw_parts(addr as *const u8, 4096)
                            });
                        } else {
                            // /proc/self/mem ignores protection.
                            page_buf.fill(0);
                            let _ = sys::pread(mem_fd, &mut page_buf, addr);
                        }
                        crc.update(&page_buf);
                        pwrite_all(fd, &page_buf, off).map_err(|e| ("write", e))?;
                    }
                    off += 4096;
                    i += 1;
                }
                let addr = e.start + first as u64 * 4096;
                if !copied {
                    // SAFETY: as above, for the whole run.
                    let data = unsafe {
                        core::slice::from_raw_parts(addr as *const u8, (off - start_off) as usize)
                    };
                    pages.write(data, start_off).map_err(|e| ("write", e))?;
                }
                runs.push(PageRun {
                    addr,
                    pages: (off - start_off) / 4096,
                    file_off: start_off,
                    crc: crc.finalize(),
                });
            }
        }
        regions.push(memory::region(e, kind));
    }

    finish(cfg, cap, fd, regions, runs, inherited, off)
}

/// For a tracked region of a delta: fills `pm` with pagemap-like flags (PM_PRESENT for the
/// written pages that hold data, 0 for the rest) and appends the unwritten pages to `inherited`.
fn delta_pages(
    e: &MapsEntry,
    t: &crate::incremental::Tracked,
    pm: &mut Vec<u64>,
    inherited: &mut Vec<PageSpan>,
) {
    let n = ((e.end - e.start) / 4096) as usize;
    pm.clear();
    pm.resize(n, 0);
    let mut next = e.start; // first page not yet accounted for
    let mut inherit = |a: u64, b: u64| {
        if a < b {
            inherited.push(PageSpan {
                addr: a,
                pages: (b - a) / 4096,
            });
        }
    };
    for &(a, b, cat) in &t.written {
        inherit(next, a);
        if crate::incremental::Tracked::has_data(cat) {
            for i in (a - e.start) / 4096..(b - e.start) / 4096 {
                pm[i as usize] = PM_PRESENT;
            }
        }
        next = b;
    }
    inherit(next, e.end);
}

/// Writes metadata and header after the page data (which ends at `off`). Returns the file size.
#[allow(clippy::too_many_arguments)]
pub fn finish(
    cfg: &Config,
    cap: &Captured,
    fd: i32,
    regions: Vec<Region>,
    runs: Vec<PageRun>,
    inherited: Vec<PageSpan>,
    off: u64,
) -> IoResult<u64> {
    let meta = Metadata {
        process: cap.process.clone(),
        shim: ShimInfo {
            path: cfg.shim_path.clone(),
            resume_addr: park::snapshim_resume as *const () as u64,
            reserved_start: RESERVED_START,
            reserved_end: RESERVED_END,
        },
        threads: cap.threads.clone(),
        regions,
        runs,
        fds: cap.fds.clone(),
        clock_boottime_ns: cap.boottime_ns,
        build_ids: cap.build_ids.clone(),
        vdso: cap.vdso.clone(),
        parent: cap.delta.as_ref().map(|d| d.parent.clone()),
        inherited,
        merged_from: None,
        lineage: cap.lineage.clone(),
        credentials: cap.credentials.clone(),
    };
    let tail = image::write::tail(
        &meta,
        cap.image_id,
        sys::clock_ns(libc::CLOCK_REALTIME),
        off,
    );
    pwrite_all(fd, &tail.meta, tail.meta_off).map_err(|e| ("write", e))?;
    pwrite_all(fd, &tail.header, 0).map_err(|e| ("write", e))?;
    Ok(tail.file_len())
}

fn is_zero_page(addr: u64) -> bool {
    // SAFETY: callers pass present pages of readable mappings that nothing changes meanwhile.
    let words = unsafe { core::slice::from_raw_parts(addr as *const u64, 512) };
    words.iter().all(|&w| w == 0)
}

fn pwrite_all(fd: i32, mut data: &[u8], mut off: u64) -> sys::Result<()> {
    while !data.is_empty() {
        let n = data.len().min(1 << 30);
        match sys::pwrite(fd, &data[..n], off) {
            Ok(0) => return Err(libc::EIO),
            Ok(k) => {
                data = &data[k..];
                off += k as u64;
            }
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a page is all zero bytes (word by word: this runs for every page stored).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Address space the live writer handles at once: read, written, then released to the program.
const WINDOW: usize = 4 << 20;

/// A run being built: its first page, page count, file offset and checksum so far.
struct OpenRun {
    addr: u64,
    pages: u64,
    file_off: u64,
    crc: crc32fast::Hasher,
}

/// The userfaultfd engine's flush, while the program runs (see engine/uffd/): page data window by
/// window from memory or from the copies made before the program could change it, then
/// metadata and header. Returns the image's size.
pub fn write_live(
    cfg: &Config,
    cap: &Captured,
    t: &Target,
    table: &crate::engine::uffd::Table,
    layout: memory::Layout,
) -> Result<u64, String> {
    use crate::engine::uffd;
    let io = |what: &'static str| move |e: i32| errmsg(what, &t.tmp, e);
    let mut pages = PageWriter::open(t);
    // Give the file its largest size first: an O_DIRECT write that extends a file is done
    // synchronously by ext4 and others, so without this no write would overlap the next
    // window's reading. Cut to the real size once written. (Best effort: without fallocate the
    // writes are merely not overlapped.)
    // Not on tmpfs, where it would only fill the file with zeroed pages first: writes there are
    // memory copies, done in the call anyway.
    let most = image::PAGE_SIZE + table.present_pages * 4096;
    // SAFETY: fstatfs writes into fs; fallocate on our own descriptor.
    let preallocated = unsafe {
        let mut fs: libc::statfs = core::mem::zeroed();
        sc!(libc::SYS_fstatfs, t.fd, &mut fs as *mut libc::statfs) == 0
            && fs.f_type != libc::TMPFS_MAGIC
            && sc!(libc::SYS_fallocate, t.fd, 0, 0, most) == 0
    };
    let aligned = core::alloc::Layout::from_size_align(WINDOW, 4096).expect("valid layout");
    // One buffer per write in flight and one being filled. SAFETY: non-zero size; the scratch
    // allocator honours the alignment. Freed with the scratch region when the writer ends.
    let bufs: [*mut u8; IN_FLIGHT + 1] =
        core::array::from_fn(|_| unsafe { alloc::alloc::alloc(aligned) });
    if bufs.iter().any(|b| b.is_null()) {
        return Err("out of scratch memory for the writer's buffers".into());
    }
    // SAFETY: distinct live allocations of WINDOW bytes, used only by this thread (and by the
    // device while a write from one is in flight, see PageWriter::submit).
    let bufs = bufs.map(|b| unsafe { core::slice::from_raw_parts_mut(b, WINDOW) });
    let mut cur = 0usize;
    let mut off = image::PAGE_SIZE;
    let mut runs: Vec<PageRun> = Vec::new();
    let close = |run: &mut Option<OpenRun>, runs: &mut Vec<PageRun>| {
        if let Some(r) = run.take() {
            runs.push(PageRun {
                addr: r.addr,
                pages: r.pages,
                file_off: r.file_off,
                crc: r.crc.finalize(),
            });
        }
    };
    let mut result = Ok(());
    let mut back = (
        table.regions.len().saturating_sub(1),
        table.regions.last().map_or(0, |r| r.end),
    );
    let mut helped_out = false;
    'regions: for (pr, w) in table.regions.iter().zip(&layout.wanted) {
        let mut run: Option<OpenRun> = None;
        let mut a = pr.start;
        while a < pr.end {
            let wend = pr.end.min(a + WINDOW as u64);
            let n = ((wend - a) / 4096) as usize;
            let i0 = pr.first + ((a - pr.start) / 4096) as usize;
            let present = |k: usize| table.present(i0 + k);
            // The device may still be writing the other buffers; this one it is done with.
            if let Err(e) = pages.wait_for(bufs[cur].as_ptr()) {
                result = Err(io("write")(e));
                break 'regions;
            }
            let buf = &mut *bufs[cur];
            // Read the pages with data that nobody has copied, in one call: each run of them
            // lands where its first page stands among the window's pages with data, so packing
            // below only ever moves a page down, over pages already dealt with.
            const NO_POS: u16 = u16::MAX;
            // Page -> its place in buf, and its page in the read's order (NO_POS: not read).
            let mut place = [(NO_POS, NO_POS); WINDOW / 4096];
            let mut local = [(0u64, 0u64); WINDOW / 8192 + 1];
            let mut remote = [(0u64, 0u64); WINDOW / 8192 + 1];
            let (mut nio, mut order, mut slot) = (0usize, 0u16, 0u16);
            for (k, place) in place.iter_mut().enumerate().take(n) {
                if !present(k) {
                    continue;
                }
                if table.state(i0 + k).load(Acquire) == 0 {
                    let addr = a + k as u64 * 4096;
                    let at = buf.as_ptr() as u64 + slot as u64 * 4096;
                    let last = nio.wrapping_sub(1);
                    if nio > 0
                        && remote[last].0 + remote[last].1 == addr
                        && local[last].0 + local[last].1 == at
                    {
                        remote[last].1 += 4096;
                        local[last].1 += 4096;
                    } else {
                        remote[nio] = (addr, 4096);
                        local[nio] = (at, 4096);
                        nio += 1;
                    }
                    *place = (slot, order);
                    order += 1;
                }
                slot += 1;
            }
            let done = if nio > 0 {
                // SAFETY: the local ranges are distinct pages of buf (slot < n pages).
                unsafe { sys::read_mem_v(&local[..nio], &remote[..nio]) }.unwrap_or(0)
            } else {
                0
            };
            // Pages to store are packed in place towards the start of the buffer (a page only
            // ever moves down, over pages already dealt with).
            let mut out_len = 0usize;
            for (k, &(at, order)) in place.iter().enumerate().take(n) {
                let s = table.state(i0 + k).fetch_or(uffd::STORED_BIT, AcqRel);
                let addr = a + k as u64 * 4096;
                if !present(k) || uffd::is_no_data(s) {
                    close(&mut run, &mut runs);
                    continue;
                } else if let Some(c) = uffd::copy_of(table, s) {
                    buf[out_len..out_len + 4096].copy_from_slice(c);
                } else if order != NO_POS && (order as usize + 1) * 4096 <= done {
                    let at = at as usize * 4096;
                    if out_len != at {
                        buf.copy_within(at..at + 4096, out_len);
                    }
                } else {
                    // Gone before it was read or saved (glibc unmapped it behind our back).
                    uffd::mark_lost(table, addr);
                    close(&mut run, &mut runs);
                    continue;
                }
                let page = &buf[out_len..out_len + 4096];
                if !w.file_backed && is_zero(page) {
                    close(&mut run, &mut runs);
                    continue;
                }
                let file_off = off + out_len as u64;
                out_len += 4096;
                match &mut run {
                    Some(r) if r.addr + r.pages * 4096 == addr => {
                        r.pages += 1;
                        r.crc.update(page);
                    }
                    _ => {
                        close(&mut run, &mut runs);
                        let mut crc = crc32fast::Hasher::new();
                        crc.update(page);
                        run = Some(OpenRun {
                            addr,
                            pages: 1,
                            file_off,
                            crc,
                        });
                    }
                }
            }
            // Everything in the window is in the buffer: the program may write it freely now.
            if pr.registered {
                uffd::unprotect(table, a, wend - a);
            }
            // While the device has as many writes as it takes, copy from the far end if the
            // program is writing all over unsaved memory: the fault server alone is its
            // bottleneck then.
            while uffd::hot() && !helped_out {
                match pages.busy() {
                    Ok(n) if n >= IN_FLIGHT => {
                        helped_out = !uffd::help_from_end(table, &mut back, wend)
                    }
                    Ok(_) => break,
                    Err(e) => {
                        result = Err(io("write")(e));
                        break 'regions;
                    }
                }
            }
            if out_len > 0 {
                if let Err(e) = pages.submit(&buf[..out_len], off) {
                    result = Err(io("write")(e));
                    break 'regions;
                }
                off += out_len as u64;
                cur = (cur + 1) % bufs.len();
            }
            a = wend;
        }
        close(&mut run, &mut runs);
    }
    if let Err(e) = pages.wait() {
        result = result.and(Err(io("write")(e)));
    }
    drop(pages);
    result?;
    let size = finish(cfg, cap, t.fd, layout.regions, runs, Vec::new(), off)
        .map_err(|(what, e)| io(what)(e))?;
    if preallocated {
        // SAFETY: ftruncate on our own descriptor.
        sys::check(unsafe { sc!(libc::SYS_ftruncate, t.fd, size) }).map_err(io("truncate"))?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incremental::Tracked;
    use crate::sys::kapi::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN};

    #[test]
    fn a_delta_stores_written_pages_with_data_and_inherits_the_rest() {
        let e = memory::parse_maps("10000-20000 rw-p 00000000 00:00 0")
            .pop()
            .unwrap();
        let written = PAGE_IS_WRITTEN;
        let t = Tracked {
            start: 0x10000,
            end: 0x20000,
            written: alloc::vec![
                (0x11000, 0x13000, written | PAGE_IS_PRESENT),
                (0x13000, 0x14000, written | PAGE_IS_SWAPPED),
                (
                    0x15000,
                    0x16000,
                    written | PAGE_IS_PRESENT | PAGE_IS_PFNZERO
                ),
                (0x1f000, 0x20000, written),
            ],
        };
        let (mut pm, mut inherited) = (alloc::vec![7u64; 3], Vec::new());
        delta_pages(&e, &t, &mut pm, &mut inherited);
        let stored: Vec<usize> = (0..pm.len()).filter(|&i| pm[i] == PM_PRESENT).collect();
        assert_eq!(pm.len(), 16);
        assert_eq!(stored, [1, 2, 3]);
        assert!(pm.iter().all(|&f| f == 0 || f == PM_PRESENT));
        let spans: Vec<(u64, u64)> = inherited.iter().map(|s| (s.addr, s.pages)).collect();
        assert_eq!(spans, [(0x10000, 1), (0x14000, 1), (0x16000, 9)]);
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut page = alloc::vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
    }
}
