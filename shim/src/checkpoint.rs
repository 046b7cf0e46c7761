//! The helper thread and the checkpoint pipeline: trigger → quiesce → capture → write → resume
//! → commit.
//!
//! Algorithm.
//! 1. The trigger handler (any thread) records who asked and writes a byte to the wake pipe.
//! 2. The helper wakes, marks a snapshot active and sends the quiesce signal to every other
//!    thread (re-listing /proc/self/task until no new thread appears), then waits until each has
//!    parked (see `park.rs`).
//! 3. The helper parks itself the same way, but runs the writer on a separate stack in the
//!    reserved range, so its own stack stays frozen too; the writer allocates only from scratch.
//! 4. The writer captures metadata, writes page data and metadata to a temporary file, releases
//!    the threads (the pause ends), then fsyncs, renames into place, fsyncs the directory and
//!    repoints `latest`. The previous image is complete until the new one is committed.
//! 5. In a restored process the helper comes back out of step 3 with "restored": it waits until
//!    every thread has redone its kernel state, then takes back the reserved range.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};
use std::os::unix::fs::DirBuilderExt;

use snapshim_image::layout::{RESERVED_END, RESERVED_START, STACK_END, STACK_START};
use snapshim_image::{self as image, Metadata, PageRun, Region, RegionKind, ShimInfo, ThreadState};

use crate::capture::{self, PM_FILE, PM_PRESENT, PM_SWAP};
use crate::config::Config;
use crate::park::{self, Slot, HELPER_SLOT, SLOTS};
use crate::sys::{self, sc};

/// The wake pipe: the trigger handler writes, the helper reads.
pub static WAKE_R: AtomicI32 = AtomicI32::new(-1);
pub static WAKE_W: AtomicI32 = AtomicI32::new(-1);
/// Set in a forked child: it has no helper thread.
pub static DISABLED: AtomicU32 = AtomicU32::new(0);

/// Who asked for a checkpoint and wants an answer: (pid << 32 | fd), 0 = free.
const MAX_REQ: usize = 16;
static REQUESTS: [AtomicU64; MAX_REQ] = [const { AtomicU64::new(0) }; MAX_REQ];
/// Sequence number of the last image this process (or the one it was restored from) wrote.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Handler of the trigger signal: only records the requester and wakes the helper.
pub extern "C" fn trigger_handler(_sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: errno slot of this thread; info is provided by the kernel (SA_SIGINFO).
    unsafe {
        let errno = *libc::__errno_location();
        if !info.is_null() && (*info).si_code == libc::SI_QUEUE {
            let pid = (*info).si_pid() as u64;
            let fd = (*info).si_value().sival_ptr as u64 & 0xffff_ffff;
            let v = pid << 32 | fd;
            for r in REQUESTS.iter() {
                if r.compare_exchange(0, v, AcqRel, Relaxed).is_ok() {
                    break;
                }
            }
        }
        let _ = sys::write(WAKE_W.load(Relaxed), b"c");
        *libc::__errno_location() = errno;
    }
}

/// The helper thread's life.
pub fn helper_main(cfg: &'static Config, tid_candidates: Vec<i32>) {
    // The program's signals must never run on this thread (a process-directed signal goes to
    // any thread that does not block it), nor may its handlers change memory while the writer
    // copies it. Our trigger signal then lands on a program thread, which is fine.
    let all = u64::MAX;
    // SAFETY: rt_sigprocmask with an 8-byte set; the raw call bypasses our own filter.
    unsafe {
        sc!(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            0,
            8
        )
    };
    // glibc's cached TID is at the offset where both the main thread and this one hold their TID.
    if let Some(&off) = tid_candidates.iter().find(|&&o| park::tid_at(o)) {
        park::TID_OFFSET.store(off, Relaxed);
    }
    let wake = WAKE_R.load(Relaxed);
    let mut next_due = cfg
        .interval_ms
        .map(|ms| sys::monotonic_ns() / 1_000_000 + ms);
    loop {
        let timeout = next_due.map_or(-1, |due| {
            due.saturating_sub(sys::monotonic_ns() / 1_000_000) as i32
        });
        let mut pfd = libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { sc!(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, timeout) };
        if n > 0 {
            let mut buf = [0u8; 64];
            let _ = sys::read(wake, &mut buf);
        } else if n == 0 {
            next_due = cfg
                .interval_ms
                .map(|ms| sys::monotonic_ns() / 1_000_000 + ms);
        } else {
            continue;
        }
        if DISABLED.load(Relaxed) != 0 {
            continue;
        }
        let requests: Vec<u64> = REQUESTS
            .iter()
            .map(|r| r.swap(0, AcqRel))
            .filter(|&v| v != 0)
            .collect();
        let outcome = take(cfg);
        let line = match &outcome {
            Outcome::Restored => continue,
            Outcome::Done(s) => alloc::format!(
                "ok path={} bytes={} pause_us={} total_us={} resident={}\n",
                s.path,
                s.bytes,
                s.pause_ns / 1000,
                s.total_ns / 1000,
                s.resident
            ),
            Outcome::Failed(msg) => {
                let text = alloc::format!("snapshim: checkpoint failed: {msg}\n");
                let _ = sys::write_all(2, text.as_bytes());
                alloc::format!("err {msg}\n")
            }
        };
        for r in requests {
            reply(r, &line);
        }
    }
}

fn reply(req: u64, line: &str) {
    let path = alloc::format!("/proc/{}/fd/{}\0", req >> 32, req & 0xffff_ffff);
    if let Ok(fd) = sys::open(
        path.as_bytes(),
        libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0,
    ) {
        let _ = sys::write_all(fd, line.as_bytes());
        sys::close(fd);
    }
}

pub struct Stats {
    pub path: String,
    pub bytes: u64,
    pub pause_ns: u64,
    pub total_ns: u64,
    pub resident: u64,
}

pub enum Outcome {
    Done(Stats),
    Failed(String),
    Restored,
}

/// What the helper hands the writer. Lives on the helper's (frozen) stack; the writer writes
/// only `result`, which a restored process never reads.
struct Job {
    cfg: &'static Config,
    t0: u64,
    seq: u64,
    nthreads: usize,
    result: [u8; 1024],
    result_len: usize,
    ok: bool,
    bytes: u64,
    pause_ns: u64,
    resident: u64,
}

/// Takes one checkpoint. Returns in the original process when it is over, or in a restored one.
fn take(cfg: &'static Config) -> Outcome {
    let t0 = sys::monotonic_ns();
    let nthreads = match quiesce() {
        Ok(n) => n,
        Err(msg) => {
            release();
            return Outcome::Failed(msg);
        }
    };
    if let Err(e) = sys::mmap_fixed(
        STACK_START,
        STACK_END - STACK_START,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_NORESERVE,
    ) {
        release();
        return Outcome::Failed(alloc::format!("cannot map the writer stack: errno {e}"));
    }
    let seq = SEQ.load(Relaxed) + 1;
    SEQ.store(seq, Relaxed);
    let mut job = Job {
        cfg,
        t0,
        seq,
        nthreads,
        result: [0; 1024],
        result_len: 0,
        ok: false,
        bytes: 0,
        pause_ns: 0,
        resident: 0,
    };
    // SAFETY: the ctx word is the helper slot's; the writer stack was just mapped; job outlives
    // the call.
    let restored = unsafe {
        park::snapshim_ctx_call(
            HELPER_SLOT.ctx_rsp.as_ptr(),
            writer_entry,
            &mut job as *mut Job as *mut core::ffi::c_void,
            STACK_END,
        )
    };
    if restored == 1 {
        after_restore(nthreads);
        return Outcome::Restored;
    }
    let _ = sys::mmap_fixed(
        STACK_START,
        STACK_END - STACK_START,
        libc::PROT_NONE,
        libc::MAP_NORESERVE,
    );
    let text = String::from_utf8_lossy(&job.result[..job.result_len]).into_owned();
    if job.ok {
        Outcome::Done(Stats {
            path: text,
            bytes: job.bytes,
            pause_ns: job.pause_ns,
            total_ns: sys::monotonic_ns() - t0,
            resident: job.resident,
        })
    } else {
        SEQ.store(seq - 1, Relaxed);
        Outcome::Failed(text)
    }
}

/// Parks every thread but this one. Returns how many parked.
fn quiesce() -> Result<usize, String> {
    let me = sys::gettid();
    let pid = sys::getpid();
    let sig = crate::interpose::QUIESCE_SIG.load(Relaxed);
    park::NEXT_SLOT.store(0, Relaxed);
    park::PARKED.store(0, Relaxed);
    park::RESUMED.store(0, Relaxed);
    park::ACTIVE.store(1, SeqCst);
    let deadline = sys::monotonic_ns() + 10_000_000_000;
    let mut signaled: Vec<i32> = Vec::new();
    let mut gone: Vec<i32> = Vec::new();
    loop {
        let tasks = capture::list_numeric_dir(b"/proc/self/task\0")
            .map_err(|e| alloc::format!("cannot list threads: errno {e}"))?;
        let mut new = 0;
        for t in tasks {
            if t != me && !signaled.contains(&t) && !gone.contains(&t) && !is_zombie(t) {
                if sys::tgkill(pid, t, sig).is_ok() {
                    signaled.push(t);
                    new += 1;
                } else {
                    gone.push(t);
                }
            }
        }
        if new == 0
            && park::PARKED.load(Acquire) as usize
                >= signaled.len() - gone_signaled(&signaled, &gone)
        {
            break;
        }
        // Wait for the signaled threads; drop the ones that exited instead of parking.
        loop {
            let parked = park::PARKED.load(Acquire);
            if parked as usize >= signaled.len() - gone_signaled(&signaled, &gone) {
                break;
            }
            sys::futex_wait(&park::PARKED, parked, Some(20_000_000));
            if sys::monotonic_ns() > deadline {
                let stuck: Vec<i32> = signaled
                    .iter()
                    .copied()
                    .filter(|t| !gone.contains(t) && !parked_tid(*t))
                    .collect();
                return Err(alloc::format!(
                    "thread(s) {stuck:?} did not stop within 10 s (blocking signal {sig}?)"
                ));
            }
            for &t in &signaled {
                if !gone.contains(&t) && !parked_tid(t) && (is_zombie(t) || !task_exists(t)) {
                    gone.push(t);
                }
            }
        }
    }
    let n = park::NEXT_SLOT.load(Acquire) as usize;
    if n > park::MAX_THREADS {
        return Err(alloc::format!("more than {} threads", park::MAX_THREADS));
    }
    Ok(n)
}

fn gone_signaled(signaled: &[i32], gone: &[i32]) -> usize {
    signaled.iter().filter(|t| gone.contains(t)).count()
}

fn parked_tid(t: i32) -> bool {
    let n = (park::NEXT_SLOT.load(Acquire) as usize).min(park::MAX_THREADS);
    SLOTS[..n].iter().any(|s| s.tid.load(Relaxed) == t)
}

fn task_path(t: i32, leaf: &str) -> Vec<u8> {
    alloc::format!("/proc/self/task/{t}{leaf}\0").into_bytes()
}

fn task_exists(t: i32) -> bool {
    capture::stat_path(
        core::str::from_utf8(&task_path(t, "")[..])
            .unwrap_or("")
            .trim_end_matches('\0'),
    )
    .is_some()
}

fn is_zombie(t: i32) -> bool {
    let mut buf = Vec::new();
    if sys::read_file(&task_path(t, "/stat"), &mut buf).is_err() {
        return true;
    }
    let text = String::from_utf8_lossy(&buf);
    text.rfind(')')
        .and_then(|i| text[i + 1..].split_whitespace().next())
        .is_some_and(|s| s == "Z" || s == "X")
}

/// Lets parked threads go (once per snapshot).
fn release() {
    if park::ACTIVE.swap(0, SeqCst) != 0 {
        park::RELEASE.fetch_add(1, Release);
        sys::futex_wake(&park::RELEASE);
    }
}

/// In a restored process: wait for every thread's fix-ups, then take the reserved range back
/// (it still holds the restorer, which the threads have left by now).
fn after_restore(nthreads: usize) {
    // The snapshot was taken while the writer ran: its scratch heap was active, and is gone now.
    crate::shim_alloc::SCRATCH_ACTIVE.store(false, SeqCst);
    park::record_restored_helper();
    loop {
        let r = park::RESUMED.load(Acquire);
        if r as usize >= nthreads {
            break;
        }
        sys::futex_wait(&park::RESUMED, r, Some(100_000_000));
    }
    let _ = sys::mmap_fixed(
        RESERVED_START,
        RESERVED_END - RESERVED_START,
        libc::PROT_NONE,
        libc::MAP_NORESERVE,
    );
    park::ACTIVE.store(0, SeqCst);
    for r in REQUESTS.iter() {
        r.store(0, Relaxed);
    }
}

extern "C" fn writer_entry(arg: *mut core::ffi::c_void) {
    // SAFETY: arg is the helper's Job, alive for the whole call.
    let job = unsafe { &mut *(arg as *mut Job) };
    park::record_thread(&HELPER_SLOT);
    park::rseq(true);
    let r = match crate::shim_alloc::scratch_begin() {
        Ok(()) => write_image(job),
        Err(e) => Err(alloc::format!("cannot map scratch memory: errno {e}")),
    };
    release();
    let (ok, text) = match r {
        Ok(path) => (true, path),
        Err(msg) => (false, msg),
    };
    let n = text.len().min(job.result.len());
    job.result[..n].copy_from_slice(&text.as_bytes()[..n]);
    job.result_len = n;
    job.ok = ok;
    crate::shim_alloc::scratch_end();
    park::rseq(false);
}

fn thread_state(s: &Slot, helper: bool) -> ThreadState {
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(&s.name[0].load(Relaxed).to_le_bytes());
    name[8..].copy_from_slice(&s.name[1].load(Relaxed).to_le_bytes());
    let len = name.iter().position(|&c| c == 0).unwrap_or(16);
    ThreadState {
        tid: s.tid.load(Relaxed),
        fs_base: s.fs_base.load(Relaxed),
        ctx_rsp: s.ctx_rsp.load(Relaxed),
        robust_head: s.robust_head.load(Relaxed),
        robust_len: s.robust_len.load(Relaxed),
        altstack_sp: s.altstack_sp.load(Relaxed),
        altstack_flags: s.altstack_flags.load(Relaxed),
        altstack_size: s.altstack_size.load(Relaxed),
        sigmask: s.sigmask.load(Relaxed),
        name: String::from_utf8_lossy(&name[..len]).into_owned(),
        helper,
    }
}

fn errmsg(what: &str, path: &std::path::Path, e: i32) -> String {
    alloc::format!(
        "cannot {what} {}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(e)
    )
}

/// Writes the image while every other thread is parked; releases them before the slow commit.
fn write_image(job: &mut Job) -> Result<String, String> {
    let cfg = job.cfg;
    let dir = &cfg.image_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| alloc::format!("cannot create image directory {}: {e}", dir.display()))?;
    let final_name = image::image_file_name(job.seq);
    let final_path = dir.join(&final_name);
    let tmp_path = dir.join(alloc::format!(".{final_name}.tmp"));
    let mut tmp_c = tmp_path.as_os_str().as_encoded_bytes().to_vec();
    tmp_c.push(0);
    let fd = sys::open(
        &tmp_c,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
        0o600,
    )
    .map_err(|e| errmsg("create image file", &tmp_path, e))?;
    let result = write_contents(job, fd, &tmp_path);
    let result = result.and_then(|()| {
        // The program runs again from here on: its memory is in the file (or the page cache).
        job.pause_ns = sys::monotonic_ns() - job.t0;
        release();
        commit(fd, &tmp_path, &final_path, dir, job.seq, cfg.keep)
    });
    sys::close(fd);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result.map(|()| final_path.display().to_string())
}

fn write_contents(job: &mut Job, fd: i32, tmp_path: &std::path::Path) -> Result<(), String> {
    let cfg = job.cfg;
    let io = |what: &'static str| move |e: i32| errmsg(what, tmp_path, e);
    let mut maps_text = Vec::new();
    sys::read_file(b"/proc/self/maps\0", &mut maps_text)
        .map_err(|e| alloc::format!("cannot read /proc/self/maps: errno {e}"))?;
    let maps = capture::parse_maps(&String::from_utf8_lossy(&maps_text));
    let pm_fd = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| alloc::format!("cannot open /proc/self/pagemap: errno {e}"))?;
    let mem_fd = sys::open(b"/proc/self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap_or(-1);
    let fds = capture::fds(&[fd, pm_fd, mem_fd]);
    let process = capture::process(cfg);
    job.resident = process.resident_bytes;

    // Page data starts after the header page.
    let mut off = image::PAGE_SIZE;
    let mut regions = Vec::new();
    let mut runs: Vec<PageRun> = Vec::new();
    let mut pm = Vec::new();
    let mut page_buf = alloc::vec![0u8; 4096];
    let r: Result<(), String> = (|| {
        for e in maps.iter().filter(|e| !capture::is_excluded(e)) {
            let deleted = e.name.ends_with(" (deleted)");
            let kind = match e.name.as_str() {
                "[vdso]" => RegionKind::Vdso,
                "[vvar]" => RegionKind::Vvar,
                "[vvar_vclock]" => RegionKind::VvarVclock,
                n if e.inode != 0 && n.starts_with('/') && !deleted => {
                    let identity = capture::stat_path(n)
                        .map(|st| capture::identity_of(&st))
                        .unwrap_or_default();
                    RegionKind::File {
                        path: n.into(),
                        offset: e.offset,
                        identity,
                    }
                }
                _ => RegionKind::Anon,
            };
            let store = match &kind {
                RegionKind::Anon => true,
                RegionKind::File { .. } => !e.shared,
                _ => false,
            };
            if store {
                capture::pagemap(pm_fd, e.start, e.end, &mut pm)
                    .map_err(|e| alloc::format!("cannot read pagemap: errno {e}"))?;
                let file_backed = matches!(kind, RegionKind::File { .. });
                let readable = e.prot & libc::PROT_READ as u32 != 0;
                let mut i = 0;
                let n = pm.len();
                while i < n {
                    let want = |f: u64| {
                        if file_backed {
                            f & PM_SWAP != 0 || (f & PM_PRESENT != 0 && f & PM_FILE == 0)
                        } else {
                            f & (PM_PRESENT | PM_SWAP) != 0
                        }
                    };
                    if !want(pm[i])
                        || (readable && !file_backed && is_zero_page(e.start + i as u64 * 4096))
                    {
                        i += 1;
                        continue;
                    }
                    // A run of consecutive pages to store.
                    let first = i;
                    let mut crc = crc32fast::Hasher::new();
                    let start_off = off;
                    while i < n
                        && want(pm[i])
                        && !(readable && !file_backed && is_zero_page(e.start + i as u64 * 4096))
                    {
                        let addr = e.start + i as u64 * 4096;
                        let page: &[u8] = if readable {
                            // SAFETY: a present page of a readable mapping; every other thread is parked,
                            // so nothing unmaps it meanwhile.
                            unsafe { core::slice::from_raw_parts(addr as *const u8, 4096) }
                        } else {
                            // Unreadable mapping: read through /proc/self/mem, which ignores protection.
                            page_buf.fill(0);
                            let _ = sys::pread(mem_fd, &mut page_buf, addr);
                            &page_buf
                        };
                        crc.update(page);
                        i += 1;
                        // Consecutive readable pages are written in one system call below.
                        if !readable {
                            sys::pwrite(fd, page, off).map_err(io("write"))?;
                        }
                        off += 4096;
                    }
                    let addr = e.start + first as u64 * 4096;
                    let len = off - start_off;
                    if readable {
                        // SAFETY: the run's pages are present and readable (checked above).
                        let data =
                            unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
                        pwrite_all(fd, data, start_off).map_err(io("write"))?;
                    }
                    runs.push(PageRun {
                        addr,
                        pages: len / 4096,
                        file_off: start_off,
                        crc: crc.finalize(),
                    });
                }
            }
            regions.push(Region {
                start: e.start,
                end: e.end,
                prot: e.prot,
                shared: e.shared,
                kind,
                name: e.name.clone(),
            });
        }
        Ok(())
    })();
    sys::close(pm_fd);
    if mem_fd >= 0 {
        sys::close(mem_fd);
    }
    r?;

    let nthreads = job.nthreads.min(park::MAX_THREADS);
    let mut threads: Vec<ThreadState> = SLOTS[..nthreads]
        .iter()
        .map(|s| thread_state(s, false))
        .collect();
    threads.push(thread_state(&HELPER_SLOT, true));
    let meta = Metadata {
        process,
        shim: ShimInfo {
            path: cfg.shim_path.clone(),
            resume_addr: park::snapshim_resume as *const () as u64,
            reserved_start: RESERVED_START,
            reserved_end: RESERVED_END,
        },
        threads,
        regions,
        runs,
        fds,
    };
    let data_len = off - image::PAGE_SIZE;
    let (meta_bytes, meta_crc) = image::encode_metadata(&meta);
    pwrite_all(fd, &meta_bytes, off).map_err(io("write"))?;
    let mut h = image::Header::new(random_id(), sys::clock_ns(libc::CLOCK_REALTIME));
    h.data_len = data_len;
    h.meta_off = off;
    h.meta_len = meta_bytes.len() as u64;
    h.meta_crc = meta_crc;
    pwrite_all(fd, &h.encode(), 0).map_err(io("write"))?;
    job.bytes = off + meta_bytes.len() as u64;
    Ok(())
}

fn is_zero_page(addr: u64) -> bool {
    // SAFETY: callers pass present pages of readable mappings while the program is parked.
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

fn random_id() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes 8 bytes into v.
    unsafe { sc!(libc::SYS_getrandom, &mut v as *mut u64, 8, 0) };
    v
}

/// fsync, rename into place, fsync the directory, repoint `latest`, drop images beyond `keep`.
fn commit(
    fd: i32,
    tmp: &std::path::Path,
    fin: &std::path::Path,
    dir: &std::path::Path,
    seq: u64,
    keep: u64,
) -> Result<(), String> {
    // SAFETY: fsync on our own descriptor.
    sys::check(unsafe { sc!(libc::SYS_fsync, fd) }).map_err(|e| errmsg("fsync", tmp, e))?;
    std::fs::rename(tmp, fin)
        .map_err(|e| alloc::format!("cannot rename {} into place: {e}", tmp.display()))?;
    let link_tmp = dir.join(".latest.tmp");
    let _ = std::fs::remove_file(&link_tmp);
    let name = fin.file_name().unwrap_or_default();
    std::os::unix::fs::symlink(name, &link_tmp)
        .and_then(|()| std::fs::rename(&link_tmp, dir.join(image::LATEST)))
        .map_err(|e| alloc::format!("cannot update {}/latest: {e}", dir.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    if keep > 0 && seq > keep {
        let _ = std::fs::remove_file(dir.join(image::image_file_name(seq - keep)));
    }
    Ok(())
}
