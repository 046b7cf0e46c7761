//! The checkpoint pipeline, run by the helper thread: trigger → quiesce → capture → protect →
//! resume → flush → commit, one module per stage (`protect` is the engine's, see engine/).
//!
//! Algorithm.
//! 1. Trigger (`trigger.rs`): a request (the checkpoint signal, or `snapshim checkpoint`'s
//!    queued quiesce signal) makes whichever thread it lands on write a record of who asked
//!    into the wake pipe; the helper wakes (or the interval ends), takes every record there,
//!    and the engine is chosen (`engine::choose`). The image's temporary file is created, the
//!    uffd engine protects memory while the program still runs (`engine::uffd::prepare`), and
//!    the records that came meanwhile are taken too: they all join this checkpoint.
//! 2. Quiesce (`quiesce.rs`, `park.rs`): the helper marks a snapshot active and sends the
//!    quiesce signal to every other thread (re-listing /proc/self/task until no new thread
//!    appears), then waits until each has parked.
//! 3. The helper parks itself the same way, but runs the writer on a separate stack in the
//!    reserved range, so its own stack stays frozen too; the writer allocates only from scratch.
//! 4. Capture (`capture.rs`): the writer reads what only the running process can tell into one
//!    `Captured` value; in incremental mode the tracking scan makes it a delta or not.
//! 5. Protect and resume (`resume.rs`): the engine makes the snapshot safe from the program —
//!    uffd: write-protects what changed since step 1; fork: forks the writer child; stop: keeps
//!    the program parked until the flush is done — and the threads are released (the pause
//!    ends).
//! 6. Flush (`flush.rs`): page data, metadata and header into the temporary file.
//! 7. Commit (`commit.rs`): fsync, rename into place, fsync the directory, repoint `latest`,
//!    retention. The previous image is complete until the new one is committed. The helper
//!    answers every requester it took with the outcome and writes the statistics beside the
//!    image. Records written since the last take wait in the pipe: the next checkpoint.
//! 8. In a restored process the helper comes back out of step 3 with "restored": it drops the
//!    requests that came with the image (the original answers them), waits until every thread
//!    has redone its kernel state, then takes back the reserved range (`resume.rs`).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::*};

use snapshim_image::layout::{STACK_END, STACK_START};

use crate::config::{Config, Incremental};
use crate::engine::{self, fork, stop, uffd, Engine, Moment};
use crate::incremental::{merger, policy};
use crate::objects::threads::{self, HELPER_SLOT};
use crate::objects::{memory, socket};
use crate::owner;
use crate::state::{mark, MARKS};
use crate::sys::{self, sc};

pub mod capture;
pub mod commit;
pub mod flush;
pub mod group;
pub mod park;
pub mod quiesce;
pub mod resume;
pub mod target;
pub mod trigger;

use commit::Stats;
use target::Target;

/// Sequence number of the last image this process (or the one it was restored from) wrote.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The helper thread's life: wait for a request, take one checkpoint, answer every requester.
pub fn helper_main(cfg: &'static Config, tid_candidates: Vec<i32>) {
    // The program's signals must never run on this thread (a process-directed signal goes to
    // any thread that does not block it), nor may its handlers change memory while the writer
    // copies it. Our trigger signal then lands on a program thread, which is fine. The one
    // exception is glibc's SIGSETXID, outside the writer: see `sys::allow_setxid`.
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
    sys::allow_setxid(true);
    let mut waiter = trigger::Waiter::new(cfg);
    loop {
        if !waiter.wait() {
            continue;
        }
        if trigger::DISABLED.load(Relaxed) != 0 {
            continue;
        }
        // Everyone who has asked so far; `take` adds those who ask until the pause.
        let mut requests = trigger::Requests::default();
        trigger::drain(&mut requests);
        merger::reap_merger(cfg);
        // Incremental mode: the policy picks a delta or a full image.
        let delta = policy::next_is_delta(cfg);
        let engine = engine::choose(cfg, Moment::Start);
        owner::note(true, None);
        let mut outcome = take(cfg, engine, delta, &mut requests);
        // A group's instant has passed: a second try would not be at it.
        if let (Outcome::Retry(msg), None) = (&outcome, requests.group) {
            let engine = engine::choose(cfg, Moment::Retry(msg));
            outcome = take(cfg, engine, false, &mut requests);
        }
        match &outcome {
            Outcome::Done(s) if cfg.incremental != Incremental::Off => {
                policy::committed(s.seq, &s.path, s.bytes, s.delta);
                // Keep the newest images and every image they depend on.
                commit::retain_chains(cfg);
                if s.delta && cfg.incremental == Incremental::Merge {
                    merger::maybe_merge(cfg, &s.path);
                }
            }
            Outcome::Failed(_) | Outcome::Retry(_) => policy::forget(),
            _ => {}
        }
        let line = match &outcome {
            // The requests taken were the original process's, which answers them.
            Outcome::Restored => continue,
            Outcome::Retry(msg) => {
                owner::note(false, None);
                alloc::format!("err {msg}\n")
            }
            Outcome::Done(s) => {
                commit::write_stats(s);
                let store = crate::engine::uffd::kept_store_bytes();
                owner::note(false, Some((&s.path, s.engine.name(), store)));
                alloc::format!(
                    "ok path={} bytes={} pause_us={} total_us={} resident={} flush_us={} copied={} engine={} kind={}{}\n",
                    s.path, s.bytes, s.pause_ns / 1000, s.total_ns / 1000, s.resident, s.flush_ns / 1000,
                    s.copied, s.engine.name(), if s.delta { "delta" } else { "full" },
                    if resume::HOLD.load(Relaxed) != 0 { " stopping=1" } else { "" }
                )
            }
            Outcome::Failed(msg) => {
                owner::note(false, None);
                let text = alloc::format!("snapshim: checkpoint failed: {msg}\n");
                let _ = sys::write_all(2, text.as_bytes());
                alloc::format!("err {msg}\n")
            }
        };
        for r in &requests.pipes {
            trigger::answer(*r, line.as_bytes());
        }
        if let Some(token) = requests.group {
            let pause_ns = match &outcome {
                Outcome::Done(s) => Some(s.pause_ns),
                _ => None,
            };
            group::answer(token, &line, pause_ns);
        }
        // Only a committed last checkpoint still holds the threads.
        if resume::HOLD.load(Relaxed) != 0 {
            resume::stop_program();
        }
    }
}

pub enum Outcome {
    Done(Stats),
    Failed(String),
    /// The uffd engine lost part of the snapshot (memory released behind the shim's back): the
    /// image was discarded; take another one with the fork engine.
    Retry(String),
    Restored,
}

/// What the helper hands the writer, and what the writer reports back. Lives on the helper's
/// (frozen) stack; a restored process never reads the report. Nothing in it points into the
/// writer's scratch memory, which is gone when the writer returns.
struct Job {
    cfg: &'static Config,
    /// When the pause started, the image's sequence number, and the threads parked.
    t0: u64,
    seq: u64,
    nthreads: usize,
    /// The image's temporary file, created before the pause; the writer takes it.
    target: Option<Target>,
    /// The engine asked for; the writer changes it when it uses another.
    engine: Engine,
    /// Asked for a delta image; cleared by the writer when it takes a full one instead.
    delta: bool,
    report: Report,
}

/// What the writer did.
struct Report {
    ok: bool,
    /// The uffd engine's snapshot was not exact (see Outcome::Retry).
    retry: bool,
    /// The image path, or the error.
    result: [u8; 1024],
    result_len: usize,
    bytes: u64,
    pause_ns: u64,
    resident: u64,
    /// Pages copied before the writer stored them (uffd engine), of those by the writer, and
    /// huge pages split.
    copied: u64,
    copied_ahead: u64,
    huge_split: u64,
    /// Minor faults of the process when it was released (fork engine: each first write to a
    /// page the writer still shares is a fault that copies the page).
    faults_at_release: u64,
    /// Fork engine: the writer child.
    child: Option<fork::Child>,
}

impl Report {
    const fn new() -> Report {
        Report {
            ok: false,
            retry: false,
            result: [0; 1024],
            result_len: 0,
            bytes: 0,
            pause_ns: 0,
            resident: 0,
            copied: 0,
            copied_ahead: 0,
            huge_split: 0,
            faults_at_release: 0,
            child: None,
        }
    }

    fn set_result(&mut self, text: &str) {
        let n = text.len().min(self.result.len());
        self.result[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.result_len = n;
    }
}

/// Takes one checkpoint, for `requests` and whoever else asks before the pause (added to it).
/// Returns in the original process when it is over, or in a restored one.
fn take(
    cfg: &'static Config,
    mut engine: Engine,
    delta: bool,
    requests: &mut trigger::Requests,
) -> Outcome {
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
    // The directory is this instance's (its lock), and the number is past every image in it.
    if let Err(msg) = owner::acquire(cfg) {
        unmap_stack();
        return Outcome::Failed(msg);
    }
    let seq = owner::next_seq(SEQ.load(Relaxed));
    let target = match target::create_target(cfg, seq) {
        Ok(t) => t,
        Err(msg) => {
            unmap_stack();
            return Outcome::Failed(msg);
        }
    };
    if engine == Engine::Uffd {
        let prepared = memory::read_maps()
            .map_err(|e| alloc::format!("cannot read the memory map: errno {e}"))
            .and_then(|maps| uffd::prepare(&maps, &memory::wanted(&maps)));
        if let Err(msg) = prepared {
            engine = engine::choose(cfg, Moment::UffdUnavailable(&msg));
        }
    }
    // Who asked while the file was created and memory protected joins this checkpoint: its
    // image is taken after they asked. A request from now on stays in the pipe for the next.
    trigger::drain(requests);
    // A group member's pause starts when every member is ready for it.
    if let Some(token) = requests.group {
        if let Err(msg) = group::ready(token) {
            if engine == Engine::Uffd {
                uffd::teardown();
            }
            target::abandon(&target);
            unmap_stack();
            return Outcome::Failed(msg);
        }
        // What it wrote while the others prepared is protected again before the pause.
        if engine == Engine::Uffd {
            uffd::protect_again();
        }
    }
    // A request for the program's last checkpoint holds the threads until the end.
    let last = requests.pipes.iter().any(|r| r.stop);
    resume::hold(last);
    crate::objects::socket::repair::begin(cfg.tcp_established, last);
    let t0 = sys::monotonic_ns();
    for m in MARKS.iter() {
        m.store(0, Relaxed);
    }
    MARKS[0].store(t0, Relaxed);
    // A group member meets the coordinator once parked, and captures only when told to.
    let parked = quiesce::quiesce().and_then(|n| match requests.group {
        Some(_) => group::meet(t0).map(|()| n),
        None => Ok(n),
    });
    let nthreads = match parked {
        Ok(n) => n,
        Err(msg) => {
            resume::let_go();
            if engine == Engine::Uffd {
                uffd::teardown();
            }
            target::abandon(&target);
            unmap_stack();
            return Outcome::Failed(msg);
        }
    };
    SEQ.store(seq, Relaxed);
    let mut job = Job {
        cfg,
        t0,
        seq,
        nthreads,
        target: Some(target),
        engine,
        delta,
        report: Report::new(),
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
    // The writer blocked SIGSETXID (see `writer_entry`); a credential change the program
    // started meanwhile completes now.
    sys::allow_setxid(true);
    if restored == 1 {
        group::forget();
        crate::incremental::after_restore();
        resume::after_restore(nthreads);
        return Outcome::Restored;
    }
    unmap_stack();
    let r = &mut job.report;
    let released_at = t0 + r.pause_ns;
    if let Some(child) = r.child.as_ref().filter(|_| r.ok) {
        match fork::wait(child.pid, child.report) {
            Ok(bytes) => r.bytes = bytes,
            Err(msg) => {
                r.ok = false;
                r.set_result(&msg);
            }
        }
    }
    let copied = if r.child.is_some() {
        fork::minor_faults().saturating_sub(r.faults_at_release)
    } else {
        r.copied
    };
    let text = String::from_utf8_lossy(&r.result[..r.result_len]).into_owned();
    let now = sys::monotonic_ns();
    if r.ok {
        Outcome::Done(Stats {
            path: text,
            bytes: r.bytes,
            pause_ns: r.pause_ns,
            flush_ns: now - released_at,
            copied,
            copied_ahead: r.copied_ahead,
            huge_split: r.huge_split,
            total_ns: now - started,
            resident: r.resident,
            engine: job.engine,
            seq,
            delta: job.delta,
        })
    } else {
        SEQ.store(seq - 1, Relaxed);
        if resume::HOLD.load(Relaxed) != 0 {
            crate::objects::socket::repair::let_go();
            resume::let_go();
        }
        if r.retry {
            Outcome::Retry(text)
        } else {
            Outcome::Failed(text)
        }
    }
}

/// The writer: runs on the writer stack, with the helper parked in [`park::snapshim_ctx_call`].
extern "C" fn writer_entry(arg: *mut core::ffi::c_void) {
    // SAFETY: arg is the helper's Job, alive for the whole call.
    let job = unsafe { &mut *(arg as *mut Job) };
    // glibc's credential handler must not run in the writer: it would write memory being
    // captured or copied, and change the credentials the image is written with halfway. A
    // program thread that changes credentials during a flush waits until the writer is done.
    sys::allow_setxid(false);
    threads::record_thread(&HELPER_SLOT);
    threads::rseq(true);
    let r = match crate::sys::alloc::scratch_begin() {
        Ok(()) => write_image(job),
        Err(e) => Err(alloc::format!("cannot map scratch memory: errno {e}")),
    };
    if park::ACTIVE.load(Relaxed) != 0 {
        job.report.pause_ns = sys::monotonic_ns() - job.t0;
        resume::release();
    }
    let (ok, text) = match r {
        Ok(path) => (true, path),
        Err(msg) => (false, msg),
    };
    job.report.set_result(&text);
    job.report.ok = ok;
    crate::sys::alloc::scratch_end();
    threads::rseq(false);
}

/// After an in-process write and commit: keeps the image's size, or gives the temporary file up
/// (the previous image stays as it was).
fn settle(job: &mut Job, t: &Target, r: Result<u64, String>) -> Result<(), String> {
    match r {
        Ok(bytes) => {
            sys::close(t.fd);
            job.report.bytes = bytes;
            Ok(())
        }
        Err(msg) => {
            target::abandon(t);
            Err(msg)
        }
    }
}

/// Captures, protects, flushes and commits one image with the chosen engine. Releases the
/// program as early as the engine allows. Returns the image path.
fn write_image(job: &mut Job) -> Result<String, String> {
    let cfg = job.cfg;
    let t = job.target.take().ok_or("no image file")?;
    mark(1);
    let mut cap = match capture::capture(cfg, job.nthreads, t.fd) {
        Ok(cap) => cap,
        Err(msg) => {
            // Memory the uffd engine protected before the pause must not stay protected with
            // nobody serving its faults.
            if job.engine == Engine::Uffd {
                uffd::teardown();
            }
            target::abandon(&t);
            return Err(msg);
        }
    };
    mark(2);
    // The copy store filled in for this flush counts in the resident memory read at the pause.
    let store = uffd::prepared_store_bytes();
    cap.process.resident_bytes = cap.process.resident_bytes.saturating_sub(store);
    if cfg.incremental != Incremental::Off {
        // Delta or full, the tracking scan re-protects what was written: the next delta
        // starts from this instant (incremental/).
        cap.delta = policy::prepare(&cap.maps, job.delta);
        job.delta = cap.delta.is_some();
        if let Some(d) = &cap.delta {
            let small = policy::pause_write(d, &cap.maps, cap.process.resident_bytes);
            job.engine = engine::choose(cfg, Moment::Delta { small });
        }
    }
    job.report.resident = cap.process.resident_bytes;
    let path = t.path.display().to_string();
    // The uffd engine sets up during the pause; where it cannot, this checkpoint uses fork.
    let live = if job.engine == Engine::Uffd {
        uffd::set_serves_clients(socket::serves_clients(&cap.fds));
        let layout = memory::layout(&cap.maps);
        match uffd::begin(&cap.maps, &layout.wanted) {
            Ok(table) => Some((table, layout)),
            Err(msg) => {
                job.engine = engine::choose(cfg, Moment::UffdUnavailable(&msg));
                None
            }
        }
    } else {
        None
    };
    match (job.engine, live) {
        (Engine::Uffd, Some((table, layout))) => {
            mark(7);
            job.report.pause_ns = sys::monotonic_ns() - job.t0;
            resume::release();
            // The image is written after the pause: it can say how long the pause was.
            cap.process.pause_ns = job.report.pause_ns;
            let r = flush::write_live(cfg, &cap, &t, table, layout);
            uffd::end(table);
            job.report.copied = table.copied.load(Relaxed);
            job.report.copied_ahead = table.ahead.load(Relaxed);
            job.report.huge_split = uffd::huge_pages_split(table);
            let r = match (r, table.lost()) {
                (Ok(bytes), None) => commit::commit(cfg, &t, job.seq).map(|()| bytes),
                (Ok(_), Some(lost)) => {
                    job.report.retry = true;
                    Err(lost)
                }
                (Err(msg), _) => Err(msg),
            };
            settle(job, &t, r).map(|()| path)
        }
        (Engine::Stop, _) => {
            // A delta written during the pause goes into the page cache; commit syncs it.
            let (direct, t0) = (!job.delta, job.t0);
            let mut pause_ns = 0;
            let r = stop::write_parked(
                || flush::write_out_with(cfg, &cap, &t, direct),
                || {
                    pause_ns = sys::monotonic_ns() - t0;
                    resume::release();
                },
            );
            job.report.pause_ns = pause_ns;
            let r = r.and_then(|bytes| commit::commit(cfg, &t, job.seq).map(|()| bytes));
            settle(job, &t, r).map(|()| path)
        }
        _ => {
            let report = match fork::report_pipe() {
                Ok(r) => r,
                Err(msg) => {
                    target::abandon(&t);
                    return Err(msg);
                }
            };
            let seq = job.seq;
            // The map right before the fork (the uffd engine may have given back its store since
            // the capture): what the child lacks of it was advised MADV_DONTFORK.
            let parent_view = memory::read_maps().unwrap_or_default();
            let forked = fork::spawn(report, || {
                let mut r = fork::check_view(&parent_view)
                    .and_then(|()| flush::write_out(cfg, &cap, &t))
                    .and_then(|b| commit::commit(cfg, &t, seq).map(|()| b));
                if r.is_ok() && cap.delta.is_some() && cfg.twin_full {
                    // Testing aid: a full image of the same instant, beside the delta.
                    if let Err(msg) = commit::write_twin(cfg, &cap, seq) {
                        r = Err(msg);
                    }
                }
                if r.is_err() {
                    target::abandon(&t);
                }
                r
            });
            job.report.pause_ns = sys::monotonic_ns() - job.t0;
            job.report.faults_at_release = fork::minor_faults();
            resume::release();
            sys::close(report[1]);
            sys::close(t.fd);
            match forked {
                Ok(pid) => {
                    job.report.child = Some(fork::Child {
                        pid,
                        report: report[0],
                    });
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
