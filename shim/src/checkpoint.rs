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

use snapshim_image::layout::{RESERVED_END, RESERVED_START, STACK_END, STACK_START};

use crate::config::Config;
use crate::objects::memory;
use crate::objects::threads::{self, HELPER_SLOT, SLOTS};
use crate::park;
use crate::state::{mark, MARKS, PHASES};
use crate::sys::{self, sc};
use crate::writer::{self, Engine};

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
    if let Some(&off) = tid_candidates.iter().find(|&&o| threads::tid_at(o)) {
        threads::TID_OFFSET.store(off, Relaxed);
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
        crate::incremental::merger::reap_merger(cfg);
        // Incremental mode: the policy picks a delta or a full image; the synchronous uffd
        // engine cannot register what the tracking userfaultfd holds, so full images use fork.
        let delta = crate::incremental::policy::next_is_delta(cfg);
        let engine = match writer::resolve(cfg.engine) {
            Engine::Uffd if cfg.incremental != crate::config::Incremental::Off => Engine::Fork,
            Engine::Uffd if !crate::engine::uffd::available() => {
                let _ = sys::write_all(
                    2,
                    b"snapshim: SNAPSHIM_COW=uffd: this process may not use userfaultfd \
                      (vm.unprivileged_userfaultfd=0?); using fork\n",
                );
                Engine::Fork
            }
            e => e,
        };
        let mut outcome = take(cfg, engine, delta);
        if let Outcome::Retry(msg) = &outcome {
            let text = alloc::format!(
                "snapshim: the uffd snapshot was not exact ({msg}); taking it again with fork\n"
            );
            let _ = sys::write_all(2, text.as_bytes());
            outcome = take(cfg, Engine::Fork, false);
        }
        match &outcome {
            Outcome::Done(s) if cfg.incremental != crate::config::Incremental::Off => {
                crate::incremental::policy::committed(s.seq, &s.path, s.bytes, s.delta);
                // Keep the newest images and every image they depend on.
                writer::retain(cfg);
                if s.delta && cfg.incremental == crate::config::Incremental::Merge {
                    crate::incremental::merger::maybe_merge(cfg, &s.path);
                }
            }
            Outcome::Failed(_) | Outcome::Retry(_) => crate::incremental::policy::forget(),
            _ => {}
        }
        let line = match &outcome {
            Outcome::Restored => continue,
            Outcome::Retry(msg) => alloc::format!("err {msg}\n"),
            Outcome::Done(s) => {
                write_stats(s);
                alloc::format!(
                    "ok path={} bytes={} pause_us={} total_us={} resident={} flush_us={} copied={} engine={} kind={}\n",
                    s.path, s.bytes, s.pause_ns / 1000, s.total_ns / 1000, s.resident, s.flush_ns / 1000,
                    s.copied, s.engine.name(), if s.delta { "delta" } else { "full" }
                )
            }
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

/// The image's statistics, machine-readable, beside it (`ckpt-N.json`).
fn write_stats(s: &Stats) {
    // The pause's phases that were timed, in microseconds.
    let mut phases = String::new();
    let mut prev = MARKS[0].load(Relaxed);
    for (i, m) in MARKS.iter().enumerate().skip(1) {
        let t = m.load(Relaxed);
        if t != 0 && prev != 0 && t >= prev {
            if !phases.is_empty() {
                phases.push_str(", ");
            }
            phases.push_str(&alloc::format!("\"{}\": {}", PHASES[i], (t - prev) / 1000));
            prev = t;
        }
    }
    let json = alloc::format!(
        "{{\"image\": \"{}\", \"engine\": \"{}\", \"bytes\": {}, \"resident_bytes\": {}, \
         \"pause_us\": {}, \"flush_us\": {}, \"total_us\": {}, \"pages_copied_before_write\": {}, \
         \"pages_copied_ahead\": {}, \"huge_pages_split\": {}, \"delta\": {}, \"pause_started_monotonic_ns\": {}, \
         \"pause_phases_us\": {{{phases}}}}}\n",
        s.path.replace('\\', "\\\\").replace('"', "\\\""),
        s.engine.name(),
        s.bytes,
        s.resident,
        s.pause_ns / 1000,
        s.flush_ns / 1000,
        s.total_ns / 1000,
        s.copied,
        s.copied_ahead,
        s.huge_split,
        s.delta,
        MARKS[0].load(Relaxed)
    );
    let path = std::path::Path::new(&s.path).with_extension("json");
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path);
    if let Ok(mut f) = file {
        let _ = f.write_all(json.as_bytes());
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
    pub flush_ns: u64,
    /// Pages the program copied before the writer had stored them (approximate: its minor
    /// faults during the flush).
    pub copied: u64,
    /// Of those, pages the writer copied ahead of the program (uffd engine, see
    /// uffd::help_from_end).
    pub copied_ahead: u64,
    /// Huge pages split to serve a write fault quickly (uffd engine, see uffd::Table::may_split).
    pub huge_split: u64,
    pub total_ns: u64,
    pub resident: u64,
    pub engine: Engine,
    pub seq: u64,
    /// A delta image (incremental checkpoints).
    pub delta: bool,
}

pub enum Outcome {
    Done(Stats),
    Failed(String),
    /// The uffd engine lost part of the snapshot (memory released behind the shim's back): the
    /// image was discarded; take another one with the fork engine.
    Retry(String),
    Restored,
}

/// What the helper hands the writer. Lives on the helper's (frozen) stack; the writer writes its
/// results here, which a restored process never reads.
struct Job {
    cfg: &'static Config,
    engine: Engine,
    /// Pages copied before the writer stored them (uffd engine), and of those by the writer.
    copied: u64,
    copied_ahead: u64,
    huge_split: u64,
    /// The uffd engine's snapshot was not exact (see Outcome::Retry).
    retry: bool,
    /// Asked for a delta image; cleared by the writer when it takes a full one instead.
    delta: bool,
    t0: u64,
    seq: u64,
    nthreads: usize,
    /// The image's temporary file, created before the pause; the writer takes it.
    target: Option<writer::Target>,
    /// The image path, or the error.
    result: [u8; 1024],
    result_len: usize,
    ok: bool,
    bytes: u64,
    pause_ns: u64,
    resident: u64,
    /// Minor faults of the process when it was released (fork engine: each first write to a
    /// page the writer still shares is a fault that copies the page).
    faults_at_release: u64,
    /// Fork engine: the writer child and the pipe it reports on.
    child: i32,
    child_report: i32,
}

/// Takes one checkpoint. Returns in the original process when it is over, or in a restored one.
fn take(cfg: &'static Config, mut engine: Engine, delta: bool) -> Outcome {
    let started = sys::monotonic_ns();
    let unmap_stack = || {
        let _ = sys::mmap_fixed(
            STACK_START,
            STACK_END - STACK_START,
            libc::PROT_NONE,
            libc::MAP_NORESERVE,
        );
    };
    // The writer's stack; the uffd engine's fault server runs on its lowest part from before
    // the pause.
    if let Err(e) = sys::mmap_fixed(
        STACK_START,
        STACK_END - STACK_START,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_NORESERVE,
    ) {
        return Outcome::Failed(alloc::format!("cannot map the writer stack: errno {e}"));
    }
    // The image file is created before the pause (creating a file costs 0.1-0.5 ms on ext4
    // here, which the program need not wait for), and before the uffd engine protects memory:
    // what the program writes between that and the pause is protected again in the pause.
    let seq = SEQ.load(Relaxed) + 1;
    let target = match writer::create_target(cfg, seq) {
        Ok(t) => t,
        Err(msg) => {
            unmap_stack();
            return Outcome::Failed(msg);
        }
    };
    if engine == Engine::Uffd {
        let prepared = memory::read_maps()
            .map_err(|e| alloc::format!("cannot read the memory map: errno {e}"))
            .and_then(|maps| crate::engine::uffd::prepare(&maps, &memory::wanted(&maps)));
        if let Err(msg) = prepared {
            let text = alloc::format!("snapshim: uffd engine unavailable ({msg}); using fork\n");
            let _ = sys::write_all(2, text.as_bytes());
            engine = Engine::Fork;
        }
    }
    let t0 = sys::monotonic_ns();
    for m in MARKS.iter() {
        m.store(0, Relaxed);
    }
    MARKS[0].store(t0, Relaxed);
    let nthreads = match quiesce() {
        Ok(n) => n,
        Err(msg) => {
            release();
            if engine == Engine::Uffd {
                crate::engine::uffd::teardown();
            }
            writer::abandon(&target);
            unmap_stack();
            return Outcome::Failed(msg);
        }
    };
    SEQ.store(seq, Relaxed);
    let mut job = Job {
        cfg,
        engine,
        copied: 0,
        copied_ahead: 0,
        huge_split: 0,
        retry: false,
        delta,
        t0,
        seq,
        nthreads,
        target: Some(target),
        result: [0; 1024],
        result_len: 0,
        ok: false,
        bytes: 0,
        pause_ns: 0,
        resident: 0,
        faults_at_release: 0,
        child: 0,
        child_report: -1,
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
        crate::incremental::after_restore();
        after_restore(nthreads);
        return Outcome::Restored;
    }
    unmap_stack();
    let released_at = t0 + job.pause_ns;
    if job.ok && job.child > 0 {
        match wait_child(job.child, job.child_report) {
            Ok(bytes) => job.bytes = bytes,
            Err(msg) => {
                job.ok = false;
                let n = msg.len().min(job.result.len());
                job.result[..n].copy_from_slice(&msg.as_bytes()[..n]);
                job.result_len = n;
            }
        }
    }
    let copied = if job.child > 0 {
        minor_faults().saturating_sub(job.faults_at_release)
    } else {
        job.copied
    };
    let text = String::from_utf8_lossy(&job.result[..job.result_len]).into_owned();
    let now = sys::monotonic_ns();
    if job.ok {
        Outcome::Done(Stats {
            path: text,
            bytes: job.bytes,
            pause_ns: job.pause_ns,
            flush_ns: now - released_at,
            copied,
            copied_ahead: job.copied_ahead,
            huge_split: job.huge_split,
            total_ns: now - started,
            resident: job.resident,
            engine: job.engine,
            seq,
            delta: job.delta,
        })
    } else {
        SEQ.store(seq - 1, Relaxed);
        if job.retry {
            Outcome::Retry(text)
        } else {
            Outcome::Failed(text)
        }
    }
}

/// Minor page faults of this process so far (children excluded).
fn minor_faults() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe {
        sc!(
            libc::SYS_getrusage,
            libc::RUSAGE_SELF,
            &mut ru as *mut libc::rusage
        )
    };
    ru.ru_minflt as u64
}

/// Waits for the fork engine's writer: one line on its pipe ("ok BYTES" or "err MESSAGE"), then
/// its exit.
fn wait_child(pid: i32, report: i32) -> Result<u64, String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match sys::read(report, &mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(libc::EINTR) => {}
            Err(_) => break,
        }
    }
    sys::close(report);
    let mut status = 0i32;
    // SAFETY: wait4 on our own child (exit signal 0, hence __WCLONE); status is a valid pointer.
    unsafe {
        sc!(
            libc::SYS_wait4,
            pid,
            &mut status as *mut i32,
            libc::__WCLONE,
            0
        )
    };
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end();
    if let Some(b) = text.strip_prefix("ok ") {
        return Ok(b.trim().parse().unwrap_or(0));
    }
    if let Some(msg) = text.strip_prefix("err ") {
        return Err(msg.into());
    }
    if libc::WIFSIGNALED(status) {
        return Err(alloc::format!(
            "the writer process died of signal {}",
            libc::WTERMSIG(status)
        ));
    }
    Err("the writer process ended without a report".into())
}

/// Parks every thread but this one. Returns how many parked.
fn quiesce() -> Result<usize, String> {
    let me = sys::gettid();
    let pid = sys::getpid();
    let sig = crate::state::QUIESCE_SIG.load(Relaxed);
    threads::NEXT_SLOT.store(0, Relaxed);
    park::PARKED.store(0, Relaxed);
    park::RESUMED.store(0, Relaxed);
    park::NOTED.store(0, Relaxed);
    park::ACTIVE.store(1, SeqCst);
    let deadline = sys::monotonic_ns() + 10_000_000_000;
    let mut signaled: Vec<i32> = Vec::new();
    let mut gone: Vec<i32> = Vec::new();
    loop {
        let tasks = sys::list_numeric_dir(b"/proc/self/task\0")
            .map_err(|e| alloc::format!("cannot list threads: errno {e}"))?;
        let mut new = 0;
        for t in tasks {
            if t != me
                && t != crate::engine::uffd::server_tid()
                && !signaled.contains(&t)
                && !gone.contains(&t)
                && !is_zombie(t)
            {
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
                if !gone.contains(&t) && !parked_tid(t) && is_zombie(t) {
                    gone.push(t);
                }
            }
        }
    }
    let n = threads::NEXT_SLOT.load(Acquire) as usize;
    if n > threads::MAX_THREADS {
        return Err(alloc::format!("more than {} threads", threads::MAX_THREADS));
    }
    Ok(n)
}

fn gone_signaled(signaled: &[i32], gone: &[i32]) -> usize {
    signaled.iter().filter(|t| gone.contains(t)).count()
}

fn parked_tid(t: i32) -> bool {
    let n = (threads::NEXT_SLOT.load(Acquire) as usize).min(threads::MAX_THREADS);
    SLOTS[..n].iter().any(|s| s.tid.load(Relaxed) == t)
}

fn task_path(t: i32, leaf: &str) -> Vec<u8> {
    alloc::format!("/proc/self/task/{t}{leaf}\0").into_bytes()
}

/// The task has exited: a zombie, dead, or already gone from /proc.
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
    crate::sys::alloc::SCRATCH_ACTIVE.store(false, SeqCst);
    crate::engine::uffd::after_restore();
    memory::note_image_mappings();
    park::NOTED.store(1, Release);
    sys::futex_wake(&park::NOTED);
    threads::record_restored_helper();
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
    threads::record_thread(&HELPER_SLOT);
    threads::rseq(true);
    let r = match crate::sys::alloc::scratch_begin() {
        Ok(()) => write_image(job),
        Err(e) => Err(alloc::format!("cannot map scratch memory: errno {e}")),
    };
    if park::ACTIVE.load(Relaxed) != 0 {
        job.pause_ns = sys::monotonic_ns() - job.t0;
        release();
    }
    let (ok, text) = match r {
        Ok(path) => (true, path),
        Err(msg) => (false, msg),
    };
    let n = text.len().min(job.result.len());
    job.result[..n].copy_from_slice(&text.as_bytes()[..n]);
    job.result_len = n;
    job.ok = ok;
    crate::sys::alloc::scratch_end();
    threads::rseq(false);
}

/// After an in-process write and commit: keeps the image's size, or gives the temporary file up
/// (the previous image stays as it was).
fn settle(job: &mut Job, t: &writer::Target, r: Result<u64, String>) -> Result<(), String> {
    match r {
        Ok(bytes) => {
            sys::close(t.fd);
            job.bytes = bytes;
            Ok(())
        }
        Err(msg) => {
            writer::abandon(t);
            Err(msg)
        }
    }
}

/// Captures, writes and commits one image with the configured engine. Releases the program as
/// early as the engine allows. Returns the image path.
fn write_image(job: &mut Job) -> Result<String, String> {
    let cfg = job.cfg;
    let t = job.target.take().ok_or("no image file")?;
    mark(1);
    let mut cap = match writer::capture(cfg, job.nthreads, t.fd) {
        Ok(cap) => cap,
        Err(msg) => {
            writer::abandon(&t);
            return Err(msg);
        }
    };
    mark(2);
    if cfg.incremental != crate::config::Incremental::Off {
        // Delta or full, the tracking scan re-protects what was written: the next delta
        // starts from this instant (track.rs).
        cap.delta = crate::incremental::policy::prepare(&cap.maps, job.delta);
        job.delta = cap.delta.is_some();
        if job.delta {
            // Few written pages are written out during the pause (into the page cache: about
            // as fast as copying them), many by a forked writer (see track::pause_write).
            job.engine = if cap.delta.as_ref().is_some_and(|d| {
                crate::incremental::policy::pause_write(d, cap.process.resident_bytes)
            }) && !cfg.twin_full
            {
                Engine::Stop
            } else {
                Engine::Fork
            };
        }
    }
    job.resident = cap.process.resident_bytes;
    let path = t.path.display().to_string();
    // The uffd engine sets up during the pause; where it cannot, this checkpoint uses fork.
    let live = if job.engine == Engine::Uffd {
        let layout = memory::layout(&cap.maps);
        match crate::engine::uffd::begin(&cap.maps, &layout.wanted) {
            Ok(table) => Some((table, layout)),
            Err(msg) => {
                let text =
                    alloc::format!("snapshim: uffd engine unavailable ({msg}); using fork\n");
                let _ = sys::write_all(2, text.as_bytes());
                job.engine = Engine::Fork;
                None
            }
        }
    } else {
        None
    };
    match (job.engine, live) {
        (Engine::Uffd, Some((table, layout))) => {
            mark(7);
            job.pause_ns = sys::monotonic_ns() - job.t0;
            release();
            // The image is written after the pause: it can say how long the pause was.
            cap.process.pause_ns = job.pause_ns;
            let r = writer::write_live(cfg, &cap, &t, table, layout);
            crate::engine::uffd::end(table);
            job.copied = table.copied.load(Relaxed);
            job.copied_ahead = table.ahead.load(Relaxed);
            job.huge_split = crate::engine::uffd::huge_pages_split(table);
            let r = match (r, table.lost()) {
                (Ok(bytes), None) => writer::commit(cfg, &t, job.seq).map(|()| bytes),
                (Ok(_), Some(lost)) => {
                    job.retry = true;
                    Err(lost)
                }
                (Err(msg), _) => Err(msg),
            };
            settle(job, &t, r).map(|()| path)
        }
        (Engine::Stop, _) => {
            // A delta written during the pause goes into the page cache; commit syncs it.
            let r = writer::write_out_with(cfg, &cap, &t, !job.delta);
            job.pause_ns = sys::monotonic_ns() - job.t0;
            release();
            let r = r.and_then(|bytes| writer::commit(cfg, &t, job.seq).map(|()| bytes));
            settle(job, &t, r).map(|()| path)
        }
        _ => {
            let mut report = [0i32; 2];
            // SAFETY: pipe2 writes two descriptors.
            if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                writer::abandon(&t);
                return Err("cannot create a pipe for the writer process".into());
            }
            let seq = job.seq;
            let forked = sys::fork_child(|| {
                sys::close(report[0]);
                let mut r = writer::write_out(cfg, &cap, &t)
                    .and_then(|b| writer::commit(cfg, &t, seq).map(|()| b));
                if r.is_ok() && cap.delta.is_some() && cfg.twin_full {
                    // Testing aid: a full image of the same instant, beside the delta.
                    if let Err(msg) = writer::write_twin(cfg, &cap, seq) {
                        r = Err(msg);
                    }
                }
                let line = match r {
                    Ok(bytes) => alloc::format!("ok {bytes}\n"),
                    Err(msg) => {
                        writer::abandon(&t);
                        alloc::format!("err {msg}\n")
                    }
                };
                let _ = sys::write_all(report[1], line.as_bytes());
                0
            });
            job.pause_ns = sys::monotonic_ns() - job.t0;
            job.faults_at_release = minor_faults();
            release();
            sys::close(report[1]);
            sys::close(t.fd);
            match forked {
                Ok(pid) => {
                    job.child = pid;
                    job.child_report = report[0];
                    Ok(path)
                }
                Err(e) => {
                    sys::close(report[0]);
                    let _ = std::fs::remove_file(&t.tmp);
                    Err(alloc::format!(
                        "cannot fork the writer process: {}",
                        std::io::Error::from_raw_os_error(e)
                    ))
                }
            }
        }
    }
}
