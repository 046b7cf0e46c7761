//! The restore: rebuilds a process from a snapshim image, in this process, with no kernel
//! module and no privileges, then runs it in the foreground (like exec: same PID, and this
//! command's exit status is the program's).
//!
//! Algorithm.
//! Phase 1 (here, with std; every failure is a clear message and nothing is lost yet). Each
//! step is one function below, in this order; a warm standby (`standby.rs`) runs the same
//! functions, the first two ahead of time:
//! 1. [`open`]: resolve and open the image, and for a delta image its ancestors; check
//!    headers, metadata (checksum and consistency: `Metadata::validate`) and, unless
//!    `--no-verify`, every page checksum ([`verify_pages`]); decide how each page run gets into
//!    memory: mapped from the image, or read (`objects::memory`);
//! 2. [`check_machine`]: CPU XSAVE features, every mapped file present and the same
//!    (`snapshim_image::identity`: size and modification time, or build-id);
//!    [`kernel_mappings`]: where this kernel's vvar/vDSO go (`vdso.rs`: where the image had
//!    them, or elsewhere with a proxy at the old vDSO address); a descriptor no kind rebuilds is
//!    refused here (`objects::unrestorable`), unless `--unrestorable=closed`;
//! 3. [`namespaces`] (`ns.rs`): move into new PID, time and mount namespaces, as their first
//!    program, with the saved PID and clocks that go on from the checkpoint; this process stays
//!    outside and passes signals and the exit status through. Where the system refuses that,
//!    restore here, with new IDs, after one warning;
//! 4. [`descriptors`]: prepare the descriptors the program had (`objects/`: reopen files at
//!    their offsets, cut files open for writing back to their checkpoint-time length, recreate
//!    pipes with their data, eventfds, timerfds, signalfds, epoll instances), each on a spare
//!    high number, then put them in place, then add the epoll registrations (which name the
//!    program's numbers); set cwd, umask, personality;
//! 5. [`write_plan`]: write the plan (regions, page runs, threads, signal state, limits,
//!    timers...: each kind's part from its `objects/` module) into the arena;
//! 6. [`jump`]: load the phase-2 blob at its fixed address, block every signal and jump to it
//!    on its own stack.
//!
//! Phase 2 (`blob/main.rs`) replaces the address space and resumes every thread inside the
//! shim, which finishes the per-thread kernel state and returns through each thread's signal
//! frame. The reserved range that holds the blob and the arena is taken back by the shim.
//!
//! ```text
//!   this process before phase 2                 after phase 2
//!   0x55..  snapshim-restore (PIE), heap         the program's own mappings,
//!   0x6e00_0000 blob | 0x7400_0000 plan arena    at their original addresses
//!   0x7c00_0000 blob stack                       (reserved range: shim's again)
//!   0x7f..  libc, ld.so, [vdso], [stack]          [vdso] where the image had it
//! ```

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use snapshim_image::layout::{RESERVED_END, RESERVED_START, STACK_END, STACK_START, VDSO_PARK};
use snapshim_image::{Chain, Metadata};

use crate::blob::{self, Arena};
use crate::error::RestoreError;
use crate::objects::{self, memory, process, signals, threads, timers};
use crate::options::{monotonic_ns, Namespace, Options, RunState, Unrestorable};
use crate::plan::{KernPiece, PRun, Plan, PLAN_MAGIC};
use crate::{lineage, ns, vdso};

/// What a restore returns on success: nothing, it never returns.
pub enum Never {}

/// `snapshim-restore TARGET`: every step, the page checks included.
pub fn run(target: &Path, opt: &Options, state: RunState) -> Result<Never, RestoreError> {
    // The directory first: its newest image may be the one its dead owner's writer commits.
    let claim = lineage::claim(target, &opt.lineage)?;
    crate::log!(
        "image directory {} is this restore's",
        claim.dir().display()
    );
    let path = snapshim_image::resolve(target).map_err(RestoreError::Find)?;
    let chain = open(&path)?;
    let verify_start = monotonic_ns();
    if opt.verify {
        let bytes = verify_pages(&chain)?;
        crate::log!("page checksums: {bytes} bytes checked");
    }
    let verify_ns = monotonic_ns() - verify_start;
    restore_image(chain, verify_ns, opt, state, claim)
}

/// Step 0 ([`lineage::claim`]): the image directory is the restored program's: no running
/// instance holds it (the original, another restore of it), unless `--new-lineage` gives the
/// program a directory of its own.
///
/// Step 1: opens the image, and for a delta image its ancestors (each page comes from the
/// newest image of the chain storing it), and checks headers and metadata
/// (`Metadata::validate` included).
pub fn open(path: &Path) -> Result<Chain, RestoreError> {
    let image_error = |source| RestoreError::Image {
        path: path.to_path_buf(),
        source,
    };
    let chain = Chain::open(path).map_err(image_error)?;
    let head = chain.head();
    head.meta.validate().map_err(image_error)?;
    crate::log!(
        "opened {} (format {}.{}, {} image(s) in its chain): {} regions, {} page runs, {} \
         threads, {} descriptors",
        path.display(),
        head.header.major,
        head.header.minor,
        chain.images.len(),
        head.meta.regions.len(),
        head.meta.runs.len(),
        head.meta.threads.len(),
        head.meta.fds.len()
    );
    Ok(chain)
}

/// Step 1: every page checksum of the chain, with a progress line on a terminal; returns the
/// bytes checked.
pub fn verify_pages(chain: &Chain) -> Result<u64, RestoreError> {
    chain
        .verify_pages_showing("snapshim-restore: checking page data")
        .map_err(|source| RestoreError::Pages {
            path: chain.head().path.clone(),
            source: source.into(),
        })
}

/// Steps 1 (the page plan) to 6 for an opened image whose page checksums were checked (in
/// `verify_ns`) if `opt.verify`, for the program that will own the image directory `claim`.
pub fn restore_image(
    chain: Chain,
    verify_ns: u64,
    opt: &Options,
    mut state: RunState,
    claim: lineage::Claim,
) -> Result<Never, RestoreError> {
    let meta = &chain.head().meta;
    let runs = plan_pages(&chain, verify_ns, opt)?;
    check_machine(meta, &opt.allow_changed)?;
    crate::log!("this machine: CPU features and every mapped file as at the checkpoint");
    if opt.unrestorable == Unrestorable::Fail {
        if let Some(refusal) = objects::unrestorable(meta) {
            return Err(refusal.into());
        }
    }
    if opt.tcp_established {
        objects::socket::repair::check_privilege(meta)?;
    }
    let vdso_plan = kernel_mappings(meta)?;
    let lineage = claim.record(chain.head())?;
    crate::log!(
        "generation {} of lineage {:016x}, instance {:016x}",
        lineage.generation,
        lineage.id,
        lineage.instance
    );
    let entered = namespaces(meta, opt.namespace)?;
    match &entered {
        Some(e) => crate::log!(
            "in new PID, time and mount namespaces as PID {} (supervisor outside: PID {}), \
             clocks shifted by {} ns",
            meta.process.pid,
            e.supervisor,
            e.clock_shift_ns
        ),
        None => crate::log!("without namespaces, as PID {}", std::process::id()),
    }
    if let Some(e) = &entered {
        state.start_ns = (state.start_ns as i64).saturating_add(e.clock_shift_ns) as u64;
        crate::log::shift(e.clock_shift_ns);
        state.exact_tids = true;
    }
    let fds = descriptors(&chain, opt, &mut state, claim)?;
    let runs: Vec<PRun> = runs
        .into_iter()
        .map(|r| PRun {
            fd: fds.image_fds[r.fd as usize] as i64,
            ..r
        })
        .collect();
    let plan = write_plan(meta, &runs, &fds, &vdso_plan, opt, &state)?;
    crate::log!(
        "plan written: {} regions, {} page runs; jumping to phase 2",
        meta.regions.len(),
        runs.len()
    );
    jump(plan, opt, entered.as_ref())
}

/// Step 1, the last part: how each page run gets into memory (`objects::memory`). Each run's
/// `fd` is the index of its image in the chain until step 4 has the descriptors. Said with
/// `--stats` while stderr is still ours.
fn plan_pages(chain: &Chain, verify_ns: u64, opt: &Options) -> Result<Vec<PRun>, RestoreError> {
    let image = chain.head();
    let policy = memory::MapPolicy::for_image(image, opt.copy)?;
    let runs = memory::plan_runs(&image.meta, &chain.sources(), &policy);
    if opt.stats {
        eprintln!(
            "snapshim-restore: page checksums {} in {} us; {}",
            if opt.verify { "checked" } else { "not checked" },
            verify_ns / 1000,
            policy.describe()
        );
    }
    crate::log!("pages: {}", policy.describe());
    Ok(runs)
}

/// Step 2: this machine can run the image: the CPU has the register state the threads saved,
/// we may give the threads their credentials back, and every mapped file is the one the program mapped, or one the user allowed to differ.
pub fn check_machine(meta: &Metadata, allowed: &[String]) -> Result<(), RestoreError> {
    threads::check_cpu(meta)?;
    threads::check_credentials(meta)?;
    memory::check_mapped_files(meta, allowed)?;
    Ok(())
}

/// Step 2: where this kernel's vvar/vDSO go (`vdso.rs`); a proxy is announced in one note.
pub fn kernel_mappings(meta: &Metadata) -> Result<vdso::VdsoPlan, RestoreError> {
    let kern = vdso::current_kernel_mappings()?;
    let plan = vdso::plan(meta, &kern, &vdso::exports_here(&kern))?;
    if let Some(p) = &plan.proxy {
        eprintln!(
            "snapshim-restore: note: this kernel's vDSO differs from the image's ({}): the \
             program's {} vDSO functions at {:#x} jump to this kernel's vDSO at {:#x}",
            p.why, p.functions, p.addr, p.new_vdso
        );
    }
    Ok(plan)
}

/// Step 3: moves into new namespaces (see `ns.rs`) when wanted and possible. Returns `None`
/// when the restore goes on here without them; in the namespace case returns in the
/// program's process.
pub fn namespaces(meta: &Metadata, want: Namespace) -> Result<Option<ns::Entered>, RestoreError> {
    if want == Namespace::Off {
        return Ok(None);
    }
    let why = match ns::unreproducible_ids(meta, ns::pid_max()) {
        Some(why) => why,
        None => match ns::enter(meta) {
            Ok(entered) => return Ok(Some(entered)),
            Err(why) => format!("the system refuses the namespaces: {why}"),
        },
    };
    if want == Namespace::Required {
        return Err(format!("cannot give the program its saved PID and thread IDs: {why}").into());
    }
    eprintln!(
        "snapshim-restore: warning: restoring without namespaces ({why}); the program's PID and \
         thread IDs change and its monotonic clock jumps"
    );
    Ok(None)
}

/// The restorer's own descriptors that phase 2 still needs, on spare numbers.
pub struct Descriptors {
    /// The chain's image files, in chain order (page runs are mapped or read from them).
    pub image_fds: Vec<RawFd>,
    /// The file behind each region, in region order; -1 for memory without a file.
    pub region_fds: Vec<RawFd>,
    /// Every one of ours, for phase 2 to close before the program resumes.
    pub close: Vec<RawFd>,
}

/// Step 4: the program's descriptors, cwd, umask and personality, and the restorer's own
/// descriptors moved out of their way.
pub fn descriptors(
    chain: &Chain,
    opt: &Options,
    state: &mut RunState,
    claim: lineage::Claim,
) -> Result<Descriptors, RestoreError> {
    let meta = &chain.head().meta;
    let region_fds = memory::open_region_files(meta)?;
    // The program's directory first: a Unix socket bound by a relative path binds again there.
    process::enter_cwd(meta)?;
    let image_dir = chain.head().path.parent().unwrap_or(Path::new("/tmp"));
    let fd_plan = objects::prepare_fds(
        meta,
        image_dir,
        opt.unrestorable == Unrestorable::Closed,
        opt.tcp_established,
    )?;
    // Stays open in the program (phase 2 does not close it): the shim's image directory.
    let lock = claim.keep(fd_plan.high_base)?;
    let high = |fd| objects::move_high(fd, fd_plan.high_base);
    let image_fds: Vec<RawFd> = chain
        .images
        .iter()
        .map(|i| high(i.file.as_raw_fd()))
        .collect::<Result<_, _>>()?;
    // --stats reports on the restorer's own stderr, which the program's descriptors replace.
    state.stats_fd = if state.report_fd >= 0 {
        high(state.report_fd)?
    } else if opt.stats {
        // SAFETY: dup of our own stderr.
        high(unsafe { libc::dup(2) })?
    } else {
        -1
    };
    let region_fds: Vec<RawFd> = region_fds
        .into_iter()
        .map(|fd| if fd >= 0 { high(fd) } else { Ok(-1) })
        .collect::<Result<_, _>>()?;
    // The log's descriptors go too before the program resumes (phase 2 closes `ours`).
    crate::log::move_high(fd_plan.high_base)?;
    crate::log!(
        "descriptors: {} prepared, {} inherited; working directory {}",
        fd_plan.moves.len(),
        fd_plan.inherit.len(),
        meta.process.cwd
    );
    // From here on stderr may be the program's: only fatal, unlikely errors remain.
    let mut ours: Vec<RawFd> = image_fds.clone();
    ours.extend(crate::log::fds());
    ours.push(state.stats_fd);
    ours.extend(region_fds.iter().copied());
    objects::install_fds(&fd_plan, &[&ours[..], &[lock]].concat());
    objects::epoll::register(meta, &fd_plan.closed)?;
    process::set_attributes(&meta.process);
    Ok(Descriptors {
        image_fds,
        region_fds,
        close: ours.into_iter().filter(|&fd| fd >= 0).collect(),
    })
}

/// Step 5: the plan for phase 2, in the arena; returns its address.
pub fn write_plan(
    meta: &Metadata,
    runs: &[PRun],
    fds: &Descriptors,
    vdso_plan: &vdso::VdsoPlan,
    opt: &Options,
    state: &RunState,
) -> Result<u64, RestoreError> {
    let p = &meta.process;
    let regions = memory::plan_regions(meta, runs, &fds.region_fds);
    let (threads, main_thread) = threads::plan(meta, state.exact_tids);
    let sigs = signals::plan(p);
    let rlimits = process::rlimits(p);
    let kern = &vdso_plan.pieces;
    let mut kern_arr = [KernPiece::default(); 4];
    for (i, k) in kern.iter().take(4).enumerate() {
        kern_arr[i] = *k;
    }
    let proxy: &[u8] = vdso_plan.proxy.as_ref().map_or(&[], |p| &p.bytes);
    let mut a = Arena::map()?;
    let plan = Plan {
        magic: PLAN_MAGIC,
        regions: a.put(&regions)?,
        n_regions: regions.len() as u64,
        runs: a.put(runs)?,
        n_runs: runs.len() as u64,
        threads: a.put(&threads)?,
        n_threads: threads.len() as u64,
        main_thread,
        sigactions: a.put(&sigs)?,
        n_sigactions: sigs.len() as u64,
        rlimits: a.put(&rlimits)?,
        n_rlimits: rlimits.len() as u64,
        close_fds: a.put(&fds.close)?,
        n_close_fds: fds.close.len() as u64,
        resume_addr: meta.shim.resume_addr,
        reserved_start: RESERVED_START,
        reserved_end: RESERVED_END,
        kern: kern_arr,
        n_kern: kern.len().min(4) as u64,
        kern_delta: vdso_plan.delta,
        park: VDSO_PARK,
        proxy_addr: vdso_plan.proxy.as_ref().map_or(0, |p| p.addr),
        proxy_len: proxy.len() as u64,
        proxy_bytes: if proxy.is_empty() { 0 } else { a.put(proxy)? },
        mm: process::mm(p),
        auxv: a.put(&p.auxv)?,
        auxv_bytes: p.auxv.len() as u64 * 8,
        itimers: timers::plan(p),
        start_ns: state.start_ns,
        stats_fd: state.stats_fd as i64,
        prefetch: opt.prefetch,
    };
    Ok(a.finish(plan))
}

/// Step 6: loads the blob, maps its stack, stops for a debugger if asked, blocks every signal
/// and jumps.
pub fn jump(
    plan: u64,
    opt: &Options,
    entered: Option<&ns::Entered>,
) -> Result<Never, RestoreError> {
    let entry = blob::load()?;
    blob::map_fixed(STACK_START, STACK_END - STACK_START)?;
    if opt.pause {
        let me = std::process::id();
        match entered {
            None => eprintln!(
                "snapshim-restore: PID {me} stopped before the jump; continue with: kill -CONT {me}"
            ),
            Some(e) => eprintln!(
                "snapshim-restore: the program (PID {me} in its namespace) stopped before the \
                 jump; continue with: kill -CONT {}",
                e.supervisor
            ),
        }
        // SAFETY: stops this process until SIGCONT. Not raise(): after clone3, glibc's cached
        // thread ID is the parent's.
        unsafe { libc::kill(me as i32, libc::SIGSTOP) };
    }
    // SAFETY: a full signal set; blocking everything keeps signals pending until each thread
    // returns through its own signal frame, which restores its mask. The blob is loaded, its
    // stack mapped and the plan complete.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        blob::unregister_rseq();
        blob::jump(entry, plan)
    }
}
