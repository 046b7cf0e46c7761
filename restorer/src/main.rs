//! snapshim-restore — rebuilds a process from a snapshim image, in this process, with no kernel
//! module and no privileges, then runs it in the foreground (like exec: same PID, and this
//! command's exit status is the program's).
//!
//! Algorithm.
//! Phase 1 (here, with std; every failure is a clear message and nothing is lost yet):
//! 1. resolve and open the image; check header, metadata (checksum and consistency:
//!    `Metadata::validate`) and every page checksum;
//! 2. check the machine: CPU XSAVE features, every mapped file present and the same
//!    (`snapshim_image::identity`: size and modification time, or build-id), every regular file
//!    the program had open present; plan where this kernel's vvar/vDSO go (`vdso.rs`: where the
//!    image had them, or elsewhere with a proxy at the old vDSO address);
//!    then (`ns.rs`) move into new PID, time and mount namespaces, as their first program, with
//!    the saved PID and clocks that go on from the checkpoint; this process stays outside and
//!    passes signals and the exit status through. Where the system refuses that, restore here,
//!    with new IDs, after one warning;
//! 3. prepare the descriptors the program had (reopen files at their offsets, cut files open for
//!    writing back to their checkpoint-time length, recreate pipes with their data), each on a
//!    spare high number, then put them in place; set cwd, umask, personality;
//! 4. decide how each page run gets into memory (mapped from the image, or read: see
//!    [`plan_runs`]), write the plan (regions, page runs, threads, signal state...) into the
//!    arena, load the phase-2 blob at its fixed address, block every signal and jump to it on
//!    its own stack.
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
#![allow(unsafe_code)]

mod ns;
mod plan;
mod standby;
mod vdso;

use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use snapshim_image::layout::{
    ARENA_END, ARENA_START, RESERVED_END, RESERVED_START, STACK_END, STACK_START, VDSO_PARK,
};
use snapshim_image::{
    Chain, CharDevice, Directory, FdKind, Image, Inherited, Metadata, Pipe, RegionKind,
    RegularFile, SourcedRun, Unsupported,
};

use plan::*;

static BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blob"));

const USAGE: &str = "usage: snapshim-restore [OPTIONS] IMAGE_OR_DIR

Rebuilds the process saved in a snapshim image and runs it in the foreground; exits with the
program's exit status. The program gets back its PID and thread IDs, and CLOCK_MONOTONIC and
CLOCK_BOOTTIME go on from the checkpoint, in new PID and time namespaces (this process stays
outside, passing signals on). Where the system does not allow that, the program runs in this
process, with new IDs, after a warning.

  IMAGE_OR_DIR          an image file, or an image directory (its `latest` image)
  --no-namespace        restore in this process, without namespaces (IDs change)
  --require-exact-pids  fail instead of restoring with new IDs
  --no-verify           skip checking page-data checksums (checking reads every stored page
                        before the program resumes; skip it for an instant restore)
  --copy                read every stored page into memory before resuming, instead of
                        mapping the image (copy-on-write) where the layout allows
  --prefetch=MODE       what happens to mapped pages when the program resumes:
                          none        each page is read from the image on its first touch
                          background  the kernel starts reading them all in and the program
                                      resumes at once (default)
                          eager       every page is read in and mapped before resuming
  --allow-changed-file PATH
                        accept the mapped file PATH although it changed since the checkpoint
                        (another size, modification time or build-id); repeat for each file.
                        Safe only if the file's content is the same (a copy or a reproducible
                        rebuild of it): any other change crashes or silently misleads the program
  --stats               print the time from start to resuming the program
  --pause               stop just before the jump and print the PID, for a debugger
                        (continue with kill -CONT PID)
  --standby             do all the checks ahead (page checksums included) for the newest image
                        of IMAGE_OR_DIR, keep its pages in the page cache, then wait; resume
                        within milliseconds on `snapshim activate DIR_OR_PID` or SIGUSR1,
                        taking the newest good image committed meanwhile";

fn main() -> ExitCode {
    let start_ns = monotonic_ns();
    let mut verify = true;
    let mut copy = false;
    let mut prefetch = PREFETCH_BACKGROUND;
    let mut stats = false;
    let mut namespace = Namespace::Preferred;
    let mut pause = std::env::var_os("SNAPSHIM_RESTORE_PAUSE").is_some();
    let mut standby = false;
    let mut target = None;
    let mut allow_changed: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("snapshim-restore {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--no-verify" => verify = false,
            "--copy" => copy = true,
            s if s.starts_with("--prefetch=") => {
                prefetch = match &s["--prefetch=".len()..] {
                    "none" => PREFETCH_NONE,
                    "background" => PREFETCH_BACKGROUND,
                    "eager" => PREFETCH_EAGER,
                    other => {
                        eprintln!("snapshim-restore: unknown prefetch mode {other:?} (none, background or eager)\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            "--pause" => pause = true,
            "--standby" => standby = true,
            "--stats" => stats = true,
            "--allow-changed-file" => {
                match args.next() {
                    Some(p) => allow_changed.push(p),
                    None => {
                        eprintln!("snapshim-restore: --allow-changed-file needs the path of a file\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            s if s.starts_with("--allow-changed-file=") => {
                allow_changed.push(s["--allow-changed-file=".len()..].to_string())
            }
            "--no-namespace" | "--require-exact-pids" => {
                let want = if a == "--no-namespace" {
                    Namespace::Off
                } else {
                    Namespace::Required
                };
                if namespace != Namespace::Preferred && namespace != want {
                    eprintln!("snapshim-restore: --no-namespace and --require-exact-pids exclude each other\n{USAGE}");
                    return ExitCode::from(2);
                }
                namespace = want;
            }
            s if s.starts_with('-') => {
                eprintln!("snapshim-restore: unknown option {s}\n{USAGE}");
                return ExitCode::from(2);
            }
            _ if target.is_some() => {
                eprintln!("snapshim-restore: one image at a time\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => target = Some(PathBuf::from(a)),
        }
    }
    let Some(target) = target else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opt = Options {
        stats_fd: -1,
        report_fd: -1,
        verify,
        copy,
        prefetch,
        pause,
        stats,
        start_ns,
        namespace,
        exact_tids: false,
        allow_changed,
    };
    if standby {
        if !verify {
            eprintln!("snapshim-restore: --standby always checks page checksums (ahead, while it waits); drop --no-verify\n{USAGE}");
            return ExitCode::from(2);
        }
        return match standby::run(&target, opt) {
            Ok(never) => match never {},
            Err(msg) => {
                eprintln!("snapshim-restore: {msg}");
                ExitCode::FAILURE
            }
        };
    }
    match restore(&target, opt) {
        Ok(never) => match never {},
        Err(msg) => {
            eprintln!("snapshim-restore: {msg}");
            ExitCode::FAILURE
        }
    }
}

enum Never {}

/// Whether to restore in new namespaces (exact PID and TIDs, continuous clocks).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Namespace {
    /// When the system allows it; otherwise warn and restore without.
    Preferred,
    /// Or fail.
    Required,
    /// Never (`--no-namespace`).
    Off,
}

struct Options {
    /// Where --stats reports (a copy of our stderr), or -1.
    stats_fd: i32,
    /// Where the resume report goes instead (a standby's activation), or -1.
    report_fd: i32,
    verify: bool,
    /// Read every stored page instead of mapping the image.
    copy: bool,
    /// `PREFETCH_*`: what phase 2 does with mapped runs.
    prefetch: u64,
    pause: bool,
    stats: bool,
    start_ns: u64,
    namespace: Namespace,
    /// Set once in the new namespaces: threads are created with their saved TIDs.
    exact_tids: bool,
    /// Mapped files accepted although they changed (`--allow-changed-file`).
    allow_changed: Vec<String>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn restore(target: &Path, opt: Options) -> Result<Never, String> {
    // 1. The image.
    let path = snapshim_image::resolve(target).map_err(|e| e.to_string())?;
    let chain = open_image(&path)?;
    let verify_start = monotonic_ns();
    if opt.verify {
        chain
            .verify_pages()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let verify_ns = monotonic_ns() - verify_start;
    restore_image(chain, verify_ns, opt)
}

/// Opens the image, and for a delta image its ancestors (each page comes from the newest image
/// of the chain storing it), and checks headers and metadata (`Metadata::validate` included).
fn open_image(path: &Path) -> Result<Chain, String> {
    let chain = Chain::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    chain
        .head()
        .meta
        .validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(chain)
}

/// Steps 2 to 4 for an opened image whose page checksums were checked (in `verify_ns`) if
/// `opt.verify`.
fn restore_image(chain: Chain, verify_ns: u64, mut opt: Options) -> Result<Never, String> {
    let image = chain.head();
    let meta = &image.meta;
    let how = map_policy(image, opt.copy)?;
    let sources = chain.sources();
    let mut runs = plan_runs(meta, &sources, &how);
    if opt.stats {
        eprintln!(
            "snapshim-restore: page checksums {} in {} us; {}",
            if opt.verify { "checked" } else { "not checked" },
            verify_ns / 1000,
            how.describe()
        );
    }

    // 2. The machine.
    check_machine(meta)?;
    check_mapped_files(meta, &opt.allow_changed)?;
    let kern = current_kernel_mappings()?;
    let vdso_plan = vdso::plan(meta, &kern, &vdso::exports_here(&kern))?;
    if let Some(p) = &vdso_plan.proxy {
        eprintln!(
            "snapshim-restore: note: this kernel's vDSO differs from the image's ({}): the \
             program's {} vDSO functions at {:#x} jump to this kernel's vDSO at {:#x}",
            p.why, p.functions, p.addr, p.new_vdso
        );
    }
    let entered = enter_namespaces(meta, opt.namespace)?;
    if let Some(e) = &entered {
        opt.start_ns = (opt.start_ns as i64).saturating_add(e.clock_shift_ns) as u64;
        opt.exact_tids = true;
    }
    let region_fds = open_region_files(meta)?;

    // 3. Descriptors, cwd, umask, personality.
    let fd_plan = prepare_fds(meta)?;
    std::env::set_current_dir(&meta.process.cwd).map_err(|e| {
        format!(
            "cannot enter the program's working directory {}: {e}",
            meta.process.cwd
        )
    })?;
    let image_fds: Vec<i32> = chain
        .images
        .iter()
        .map(|i| move_high(i.file.as_raw_fd(), fd_plan.high_base))
        .collect::<Result<_, _>>()?;
    for r in runs.iter_mut() {
        r.fd = image_fds[r.fd as usize] as i64;
    }
    // --stats reports on the restorer's own stderr, which the program's descriptors replace.
    opt.stats_fd = if opt.report_fd >= 0 {
        move_high(opt.report_fd, fd_plan.high_base)?
    } else if opt.stats {
        // SAFETY: dup of our own stderr.
        let copy = unsafe { libc::dup(2) };
        move_high(copy, fd_plan.high_base)?
    } else {
        -1
    };
    let region_fds: Vec<i32> = region_fds
        .into_iter()
        .map(|fd| {
            if fd >= 0 {
                move_high(fd, fd_plan.high_base)
            } else {
                Ok(-1)
            }
        })
        .collect::<Result<_, _>>()?;
    // From here on stderr may be the program's: only fatal, unlikely errors remain.
    let mut ours: Vec<i32> = image_fds.clone();
    ours.push(opt.stats_fd);
    ours.extend(region_fds.iter().copied());
    install_fds(&fd_plan, &ours);
    // SAFETY: umask and personality only change process attributes.
    unsafe {
        libc::umask(meta.process.umask);
        libc::personality(meta.process.personality as libc::c_ulong);
    }

    // 4. The plan, the blob, the jump.
    let close: Vec<i32> = ours.into_iter().filter(|&fd| fd >= 0).collect();
    let plan = write_plan(meta, &runs, &region_fds, &close, &vdso_plan, &opt)?;
    let entry = load_blob()?;
    map_fixed(STACK_START, STACK_END - STACK_START)?;
    if opt.pause {
        let me = std::process::id();
        match &entered {
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
    // returns through its own signal frame, which restores its mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        unregister_rseq();
        jump(entry, plan)
    }
}

/// Moves into new namespaces (see `ns.rs`) when wanted and possible. Returns `None` when the
/// restore goes on here without them; in the namespace case returns in the program's process.
fn enter_namespaces(meta: &Metadata, want: Namespace) -> Result<Option<ns::Entered>, String> {
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
        return Err(format!(
            "cannot give the program its saved PID and thread IDs: {why}"
        ));
    }
    eprintln!(
        "snapshim-restore: warning: restoring without namespaces ({why}); the program's PID and \
         thread IDs change and its monotonic clock jumps"
    );
    Ok(None)
}

fn check_machine(meta: &Metadata) -> Result<(), String> {
    let have = snapshim_image::xsave_features();
    let need = meta.process.xsave_features;
    if need & !have != 0 {
        return Err(format!(
            "the image uses CPU register state this CPU lacks (XSAVE features {need:#x}, this CPU has {have:#x})"));
    }
    Ok(())
}

/// Every file the program mapped must be the one it mapped (`snapshim_image::identity`), or
/// named by the user in `allowed` (`--allow-changed-file`), which is then used with a warning.
/// Files accepted by their build-id are listed in one note.
fn check_mapped_files(meta: &Metadata, allowed: &[String]) -> Result<(), String> {
    use snapshim_image::identity::{check_mapped_file, Verdict};
    // Named as the image names them: absolute, symbolic links resolved.
    let allowed: Vec<String> = allowed
        .iter()
        .map(|a| {
            std::fs::canonicalize(a)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| a.clone())
        })
        .collect();
    let mapped: Vec<(&str, &snapshim_image::FileIdentity)> = meta
        .regions
        .iter()
        .filter_map(|r| match &r.kind {
            RegionKind::File { path, identity, .. } => Some((path.as_str(), identity)),
            _ => None,
        })
        .collect();
    if let Some(a) = allowed
        .iter()
        .find(|a| !mapped.iter().any(|m| m.0 == a.as_str()))
    {
        return Err(format!(
            "--allow-changed-file {a}: the image maps no such file"
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut same_build = Vec::new();
    for (path, identity) in mapped {
        if !seen.insert(path) {
            continue;
        }
        let path = &path.to_string();
        match check_mapped_file(path, identity, meta.build_id_of(path)) {
            Verdict::Unchanged => {}
            Verdict::SameBuild(_) => same_build.push(path.clone()),
            Verdict::Missing(msg) => return Err(msg),
            Verdict::Changed { message, .. } if allowed.contains(path) => eprintln!(
                "snapshim-restore: WARNING: {message}; using it anyway, as \
                 --allow-changed-file asks: if its content is not the same, the program will \
                 crash or compute wrong results"
            ),
            Verdict::Changed {
                message,
                could_be_same_content: true,
            } => {
                return Err(format!(
                    "{message}; if its content is the same, --allow-changed-file {path} accepts it"
                ))
            }
            Verdict::Changed { message, .. } => return Err(message),
        }
    }
    if !same_build.is_empty() {
        eprintln!(
            "snapshim-restore: note: accepted by their build-id and size, with another \
             modification time: {}",
            same_build.join(", ")
        );
    }
    Ok(())
}

/// Whether, and how far, page runs may be mapped from the image instead of read.
///
/// A mapped run is a `MAP_PRIVATE` view of the image file: until the program writes a page, the
/// page is the file's, read through the page cache, possibly long after the restore. That is
/// sound only while the file's content at those offsets never changes under the mapping:
///
/// - snapshim never rewrites an image in place: images are written under a temporary name and
///   renamed, and retention unlinks old ones. Unlinking is harmless on a local file system: the
///   inode and its pages live on while mapped. Truncating or rewriting the file in place is not
///   (a clean page past a truncation raises SIGBUS; a rewritten one silently changes), so an
///   image must never be overwritten in place (`cp` onto it) while a program restored from it
///   runs; replace it with a rename instead.
/// - On network and user-space file systems (NFS, CIFS, FUSE, 9p, Ceph...) another machine can
///   delete or replace the file and the mapping then fails (NFS: ESTALE, seen as SIGBUS). Images
///   there are read (copied) instead: only the local file systems listed in
///   [`MAP_SAFE_FILE_SYSTEMS`] are mapped from.
/// - A file system mounted `noexec` refuses executable file mappings: runs in executable
///   regions are read there.
struct MapPolicy {
    /// Why nothing is mapped, or None.
    copy_reason: Option<String>,
    noexec: bool,
    /// At most this many runs are mapped (each may split a mapping in three).
    max_mapped: usize,
}

/// statfs magic numbers of local file systems on which an unlinked file stays readable through
/// its mappings and nobody else can change it behind the kernel's back.
const MAP_SAFE_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0xef53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683e, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x8584_58f6, "ramfs"),
    (0xf2f5_2010, "f2fs"),
    (0xca45_1a4e, "bcachefs"),
    (0x2fc1_2fc1, "zfs"),
    (0x794c_7630, "overlayfs"),
];

/// Runs shorter than this are read: below it a read costs about what a mapping does, and every
/// mapping is one more kernel VMA in the program for ever.
const MAP_MIN_BYTES: u64 = 64 << 10;

impl MapPolicy {
    fn describe(&self) -> String {
        match &self.copy_reason {
            Some(why) => format!("pages are read into memory ({why})"),
            None => "page runs are mapped from the image where the layout allows".into(),
        }
    }
}

fn map_policy(image: &Image, copy: bool) -> Result<MapPolicy, String> {
    // SAFETY: zeroed statfs is valid; fstatfs fills it for our own descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(image.file.as_raw_fd(), &mut st) } != 0 {
        return Err(format!(
            "{}: cannot find its file system: {}",
            image.path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let fs_type = st.f_type as i64;
    // SAFETY: zeroed statvfs is valid; fstatvfs fills it for our own descriptor (for the mount
    // flags, which statfs does not report).
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let noexec = unsafe { libc::fstatvfs(image.file.as_raw_fd(), &mut vfs) } == 0
        && vfs.f_flag & libc::ST_NOEXEC != 0;
    let copy_reason = if copy {
        Some("--copy".to_string())
    } else if !MAP_SAFE_FILE_SYSTEMS.iter().any(|&(t, _)| t == fs_type) {
        Some(format!(
            "the image is on a file system (type {fs_type:#x}) where it could change under a mapping"
        ))
    } else {
        None
    };
    let max_map_count: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530);
    // Leave the program at least half of its mapping budget: regions + 2 per mapped run.
    let max_mapped = (max_map_count / 2).saturating_sub(image.meta.regions.len()) / 2;
    Ok(MapPolicy {
        copy_reason,
        noexec,
        max_mapped,
    })
}

/// Decides, run by run, whether phase 2 maps it from the image or reads it.
///
/// A run is mapped only inside a private region that is not the grows-down stack (a file
/// mapping at the bottom of `[stack]` would stop it from growing), and never over the last page
/// of its region. That last page stays anonymous so that the program's `mremap` of a whole
/// region cannot grow a view of the image: that would show the image's next bytes instead of
/// zeros, or raise SIGBUS past its end. Across two kernel mappings `mremap` fails with EFAULT,
/// and glibc's `realloc` then copies, as it does whenever a mapping cannot grow. Shared
/// anonymous memory is always read: a private file page cannot stand in for it.
///
/// ```text
///   region  |<------------------------------------------------>|
///   run           |<------------------------------------------->|
///   plan          | mapped (>= MAP_MIN_BYTES)        | read (1 page)
/// ```
///
/// `runs` come from the image chain ([`Chain::sources`]); each planned run's `fd` is the index
/// of its image in the chain until the caller puts the descriptors in.
fn plan_runs(meta: &Metadata, runs: &[SourcedRun], policy: &MapPolicy) -> Vec<PRun> {
    let mut out: Vec<PRun> = Vec::with_capacity(runs.len() + 1);
    for run in runs {
        // check_layout proved every run lies inside one region; regions are sorted.
        let i = meta.regions.partition_point(|r| r.end <= run.addr);
        let r = &meta.regions[i];
        let read = |addr: u64, len: u64, file_off: u64| PRun {
            addr,
            len,
            file_off,
            prot: r.prot,
            how: RUN_READ,
            fd: run.image as i64,
        };
        let exec = r.prot & libc::PROT_EXEC as u32 != 0;
        let mappable = policy.copy_reason.is_none()
            && !r.shared
            && r.name != "[stack]"
            && matches!(r.kind, RegionKind::Anon | RegionKind::File { .. })
            && !(exec && policy.noexec);
        let end = run.addr + run.len();
        let map_len = if end == r.end {
            run.len().saturating_sub(PAGE)
        } else {
            run.len()
        };
        if !mappable || map_len < MAP_MIN_BYTES {
            out.push(read(run.addr, run.len(), run.file_off));
            continue;
        }
        out.push(PRun {
            how: RUN_MAP,
            ..read(run.addr, map_len, run.file_off)
        });
        if map_len < run.len() {
            out.push(read(
                run.addr + map_len,
                run.len() - map_len,
                run.file_off + map_len,
            ));
        }
    }
    // Over budget: the largest runs stay mapped, the rest are read.
    let mapped = out.iter().filter(|r| r.how == RUN_MAP).count();
    if mapped > policy.max_mapped {
        let mut lens: Vec<u64> = out
            .iter()
            .filter(|r| r.how == RUN_MAP)
            .map(|r| r.len)
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let cut = lens.get(policy.max_mapped).copied().unwrap_or(u64::MAX);
        let mut left = policy.max_mapped;
        for r in out.iter_mut().filter(|r| r.how == RUN_MAP) {
            if r.len >= cut && left > 0 {
                left -= 1;
            } else {
                r.how = RUN_READ;
            }
        }
    }
    out
}

const PAGE: u64 = snapshim_image::PAGE_SIZE;

/// This process's [vvar], [vvar_vclock], [vdso] as (name, start, end).
fn current_kernel_mappings() -> Result<Vec<(String, u64, u64)>, String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let mut v = Vec::new();
    for line in maps.lines() {
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if matches!(name, "[vvar]" | "[vvar_vclock]" | "[vdso]") {
            let range = line.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            v.push((
                name.to_string(),
                u64::from_str_radix(a, 16).unwrap_or(0),
                u64::from_str_radix(b, 16).unwrap_or(0),
            ));
        }
    }
    Ok(v)
}

/// Opens the file behind each file mapping (-1 for the others), in region order.
fn open_region_files(meta: &Metadata) -> Result<Vec<i32>, String> {
    meta.regions
        .iter()
        .map(|r| match &r.kind {
            RegionKind::File { path, .. } => {
                let write = r.shared && r.prot & libc::PROT_WRITE as u32 != 0;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)
                    .map(|f| f.into_raw_fd())
                    .map_err(|e| format!("cannot open {path}, mapped by the program: {e}"))
            }
            _ => Ok(-1),
        })
        .collect()
}

/// Duplicates `fd` onto the lowest free number at or above `base` and closes the original.
fn move_high(fd: i32, base: i32) -> Result<i32, String> {
    // SAFETY: fcntl/close on descriptors this process owns.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
    if n < 0 {
        return Err(format!(
            "cannot move a descriptor: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is ours and no longer used.
    unsafe { libc::close(fd) };
    Ok(n)
}

struct FdPlan {
    /// (target fd, prepared high fd, cloexec)
    moves: Vec<(i32, i32, bool)>,
    /// Numbers taken from this process as they are (inherited stdio).
    inherit: Vec<i32>,
    high_base: i32,
}

/// Opens everything the program's descriptor table needs, on numbers above any of its own.
fn prepare_fds(meta: &Metadata) -> Result<FdPlan, String> {
    let max_fd = meta.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    let high_base = (max_fd + 1).max(64);
    let mut moves = Vec::new();
    let mut inherit = Vec::new();
    let mut pipes: Vec<(u64, i32, i32)> = Vec::new(); // id, read high, write high
    for f in &meta.fds {
        let acc = f.flags as i32 & libc::O_ACCMODE;
        let status =
            f.flags as i32 & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
        let open = |path: &str, extra: i32| -> Result<i32, String> {
            let file = std::fs::OpenOptions::new()
                .read(acc != libc::O_WRONLY)
                .write(acc != libc::O_RDONLY)
                .custom_flags(status | extra)
                .open(path)
                .map_err(|e| {
                    format!(
                        "cannot reopen {path} (descriptor {} of the program): {e}",
                        f.fd
                    )
                })?;
            move_high(file.into_raw_fd(), high_base)
        };
        let high = match &f.kind {
            FdKind::Regular(RegularFile {
                path, offset, size, ..
            }) => {
                let fd = open(path, 0)?;
                if acc != libc::O_RDONLY {
                    // SAFETY: fstat/ftruncate on our descriptor.
                    let cur = unsafe {
                        let mut st: libc::stat = std::mem::zeroed();
                        libc::fstat(fd, &mut st);
                        st.st_size as u64
                    };
                    if cur < *size {
                        return Err(format!(
                            "{path} (descriptor {} of the program) is shorter than at the checkpoint ({cur} < {size} bytes)", f.fd));
                    }
                    // SAFETY: cutting our own descriptor's file back to its checkpoint length.
                    if cur > *size && unsafe { libc::ftruncate(fd, *size as i64) } != 0 {
                        return Err(format!(
                            "cannot cut {path} back to {size} bytes: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                }
                // SAFETY: lseek on our descriptor.
                unsafe { libc::lseek(fd, *offset as i64, libc::SEEK_SET) };
                fd
            }
            FdKind::Directory(Directory { path }) => open(path, libc::O_DIRECTORY)?,
            FdKind::CharDevice(CharDevice { path }) => open(path, 0)?,
            FdKind::Pipe(Pipe { id, read_end, data }) => {
                let pair = match pipes.iter().find(|p| p.0 == *id) {
                    Some(p) => *p,
                    None => {
                        let mut fds = [0i32; 2];
                        // SAFETY: pipe2 writes two descriptors.
                        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                            return Err(format!(
                                "cannot create a pipe: {}",
                                std::io::Error::last_os_error()
                            ));
                        }
                        let p = (
                            *id,
                            move_high(fds[0], high_base)?,
                            move_high(fds[1], high_base)?,
                        );
                        pipes.push(p);
                        p
                    }
                };
                if *read_end && !data.is_empty() {
                    // SAFETY: writing the pipe's saved content into its write end (it fits: it
                    // came out of a pipe of the default size).
                    unsafe {
                        libc::write(pair.2, data.as_ptr() as *const libc::c_void, data.len())
                    };
                }
                let fd = if *read_end { pair.1 } else { pair.2 };
                // SAFETY: F_SETFL on our descriptor (O_NONBLOCK and friends).
                unsafe { libc::fcntl(fd, libc::F_SETFL, status) };
                fd
            }
            FdKind::Inherited(Inherited { desc }) => {
                // SAFETY: F_GETFD only checks that the number is open here.
                if f.fd <= 2 && unsafe { libc::fcntl(f.fd, libc::F_GETFD) } >= 0 {
                    inherit.push(f.fd);
                    continue;
                }
                eprintln!("snapshim-restore: warning: descriptor {} ({desc}) led outside the program; it is /dev/null now", f.fd);
                open("/dev/null", 0)?
            }
            FdKind::Unsupported(Unsupported { desc }) => {
                eprintln!("snapshim-restore: warning: descriptor {} ({desc}) cannot be restored yet; it is /dev/null now", f.fd);
                open("/dev/null", 0)?
            }
        };
        moves.push((f.fd, high, f.cloexec));
    }
    // Pipe ends the program did not have are not needed.
    for &(_, r, w) in &pipes {
        for end in [r, w] {
            if !moves.iter().any(|m| m.1 == end) {
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(end) };
            }
        }
    }
    Ok(FdPlan {
        moves,
        inherit,
        high_base,
    })
}

/// Closes every descriptor the program did not have, then puts the prepared ones in place.
fn install_fds(plan: &FdPlan, keep: &[i32]) {
    let mut open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    open.sort();
    for fd in open {
        let needed = keep.contains(&fd)
            || plan.inherit.contains(&fd)
            || plan.moves.iter().any(|m| m.1 == fd);
        if !needed {
            // SAFETY: closing a descriptor of this process that nothing uses any more.
            unsafe { libc::close(fd) };
        }
    }
    for &(target, high, cloexec) in &plan.moves {
        // SAFETY: dup2/fcntl on our descriptors.
        unsafe {
            libc::dup2(high, target);
            libc::fcntl(
                target,
                libc::F_SETFD,
                if cloexec { libc::FD_CLOEXEC } else { 0 },
            );
        }
    }
    for &(_, high, _) in &plan.moves {
        if !plan.moves.iter().any(|m| m.0 == high) {
            // SAFETY: the prepared copy is in place; close the spare number.
            unsafe { libc::close(high) };
        }
    }
}

fn map_fixed(start: u64, len: u64) -> Result<(), String> {
    // SAFETY: the reserved range is free in this process (checked by MAP_FIXED_NOREPLACE).
    let a = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if a as u64 != start {
        return Err(format!(
            "cannot map {start:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A bump writer over the arena.
struct Arena {
    next: u64,
}

impl Arena {
    fn put<T: Copy>(&mut self, items: &[T]) -> Result<u64, String> {
        let align = std::mem::align_of::<T>().max(8) as u64;
        let at = (self.next + align - 1) & !(align - 1);
        let bytes = std::mem::size_of_val(items) as u64;
        if at + bytes > ARENA_END {
            return Err(
                "the image has too many regions or page runs for the restorer's arena".into(),
            );
        }
        // SAFETY: [at, at+bytes) is inside the mapped arena; T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                items.as_ptr() as *const u8,
                at as *mut u8,
                bytes as usize,
            )
        };
        self.next = at + bytes;
        Ok(at)
    }
}

#[allow(clippy::too_many_arguments)]
fn write_plan(
    meta: &Metadata,
    runs: &[PRun],
    region_fds: &[i32],
    close: &[i32],
    vdso_plan: &vdso::VdsoPlan,
    opt: &Options,
) -> Result<u64, String> {
    let kern = &vdso_plan.pieces;
    let p = &meta.process;
    let regions: Vec<PRegion> = meta
        .regions
        .iter()
        .zip(region_fds)
        .filter_map(|(r, &fd)| {
            let base = if r.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let flags = match &r.kind {
                RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => return None,
                RegionKind::File { .. } => base,
                RegionKind::Anon if r.name == "[stack]" => {
                    base | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN
                }
                RegionKind::Anon => base | libc::MAP_ANONYMOUS,
            };
            let offset = if let RegionKind::File { offset, .. } = r.kind {
                offset
            } else {
                0
            };
            let fill = runs
                .iter()
                .any(|run| run.addr >= r.start && run.addr < r.end) as u32;
            Some(PRegion {
                start: r.start,
                end: r.end,
                offset,
                prot: r.prot,
                flags: flags as u32,
                fd,
                fill,
            })
        })
        .collect();
    let threads: Vec<PThread> = meta
        .threads
        .iter()
        .map(|t| PThread {
            ctx_rsp: t.ctx_rsp,
            fs_base: t.fs_base,
            tid: if opt.exact_tids { t.tid } else { 0 },
        })
        .collect();
    let main_thread = meta
        .threads
        .iter()
        .position(|t| t.tid == p.pid)
        .or_else(|| meta.threads.iter().position(|t| !t.helper))
        .unwrap_or(0) as u64;
    let sigs: Vec<PSig> = p
        .sigactions
        .iter()
        .map(|s| PSig {
            signo: s.signo as u64,
            handler: s.handler,
            flags: s.flags,
            restorer: s.restorer,
            mask: s.mask,
        })
        .collect();
    let rlimits: Vec<PRlimit> = p
        .rlimits
        .iter()
        .map(|r| PRlimit {
            resource: r.resource as u64,
            cur: r.soft,
            max: r.hard,
        })
        .collect();
    let mut itimers = [[0i64; 4]; 3];
    for (i, t) in p.itimers.iter().take(3).enumerate() {
        let (interval, value) = (t.interval_us, t.value_us);
        // A periodic timer caught just as it expired reads 0 left; setitimer would take a zero
        // value as "disarm", so it fires at once instead.
        let value = if interval != 0 && value == 0 {
            1
        } else {
            value
        };
        itimers[i] = [
            (interval / 1_000_000) as i64,
            (interval % 1_000_000) as i64,
            (value / 1_000_000) as i64,
            (value % 1_000_000) as i64,
        ];
    }
    let mut kern_arr = [KernPiece::default(); 4];
    for (i, k) in kern.iter().take(4).enumerate() {
        kern_arr[i] = *k;
    }

    let proxy: &[u8] = vdso_plan.proxy.as_ref().map_or(&[], |p| &p.bytes);
    map_fixed(ARENA_START, ARENA_END - ARENA_START)?;
    let mut a = Arena {
        next: ARENA_START + 4096,
    };
    let m = &p.mm;
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
        close_fds: a.put(close)?,
        n_close_fds: close.len() as u64,
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
        mm: [
            m.start_code,
            m.end_code,
            m.start_data,
            m.end_data,
            m.start_brk,
            m.brk,
            m.start_stack,
            m.arg_start,
            m.arg_end,
            m.env_start,
            m.env_end,
        ],
        auxv: a.put(&p.auxv)?,
        auxv_bytes: p.auxv.len() as u64 * 8,
        itimers,
        start_ns: opt.start_ns,
        stats_fd: opt.stats_fd as i64,
        prefetch: opt.prefetch,
    };
    // SAFETY: the first arena page is reserved for the plan header.
    unsafe { std::ptr::write(ARENA_START as *mut Plan, plan) };
    Ok(ARENA_START)
}

/// Maps the blob's PT_LOAD segments at their link addresses; returns its entry point.
fn load_blob() -> Result<u64, String> {
    let b = BLOB;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("the embedded restorer blob is damaged".into());
    }
    let (entry, phoff, phentsize, phnum) = (
        u64_at(0x18),
        u64_at(0x20) as usize,
        u16_at(0x36),
        u16_at(0x38),
    );
    let segs: Vec<(u32, u64, u64, u64, u64)> = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&o| u32_at(o) == 1) // PT_LOAD
        .map(|o| {
            (
                u32_at(o + 4),
                u64_at(o + 8),
                u64_at(o + 16),
                u64_at(o + 32),
                u64_at(o + 40),
            )
        })
        .collect();
    let lo = segs.iter().map(|s| s.2 & !4095).min().unwrap_or(0);
    let hi = segs
        .iter()
        .map(|s| (s.2 + s.4 + 4095) & !4095)
        .max()
        .unwrap_or(0);
    if lo < RESERVED_START || hi > ARENA_START {
        return Err("the embedded restorer blob is not linked inside the reserved range".into());
    }
    map_fixed(lo, hi - lo)?;
    for &(_, off, vaddr, filesz, _) in &segs {
        // SAFETY: the destination was just mapped writable; the source is inside the blob.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b[off as usize..].as_ptr(),
                vaddr as *mut u8,
                filesz as usize,
            )
        };
    }
    for &(flags, _, vaddr, _, memsz) in &segs {
        let prot = (if flags & 4 != 0 { libc::PROT_READ } else { 0 })
            | (if flags & 2 != 0 { libc::PROT_WRITE } else { 0 })
            | (if flags & 1 != 0 { libc::PROT_EXEC } else { 0 });
        let start = vaddr & !4095;
        // SAFETY: changes protection of the blob's own pages only.
        unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                ((vaddr + memsz + 4095) & !4095) as usize - start as usize,
                prot,
            )
        };
    }
    Ok(entry)
}

/// glibc registered an rseq area in this thread's TLS; the kernel writes it on every return to
/// user space, so it must go before phase 2 unmaps that memory (else: SIGSEGV).
fn unregister_rseq() {
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc's exported constants; RSEQ_FLAG_UNREGISTER with the registered area, length
    // (32, the kernel ABI size glibc registers) and signature.
    unsafe {
        if __rseq_size == 0 {
            return;
        }
        let mut tp: u64;
        core::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly));
        tp = (tp as i64 + __rseq_offset as i64) as u64;
        libc::syscall(libc::SYS_rseq, tp, 32u32, 1i32, 0x5305_3053u32);
    }
}

/// Switches to the blob's stack and calls its entry with the plan. Never returns.
///
/// # Safety
/// `entry` is the loaded blob's entry point and `plan` a complete plan in the arena.
unsafe fn jump(entry: u64, plan: u64) -> ! {
    // SAFETY: the stack range is mapped; the blob takes the plan in rdi and never returns.
    unsafe {
        core::arch::asm!("mov rsp, {sp}", "xor ebp, ebp", "call {entry}", "ud2",
            sp = in(reg) STACK_END - 64, entry = in(reg) entry, in("rdi") plan, options(noreturn))
    }
}
