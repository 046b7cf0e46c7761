//! Namespaces for an exact restore: the program gets back its PID and every thread its TID, and
//! its CLOCK_MONOTONIC and CLOCK_BOOTTIME go on from their checkpoint values.
//!
//! Algorithm (phase 1, before anything of the program's is set up):
//! 1. Check that the saved IDs can be reproduced at all: not PID 1 (that number belongs to the
//!    namespace's init, the reaper), every ID below `pid_max`, a main thread whose TID is the PID.
//! 2. Dry run in a throwaway child: the namespace steps below, up to mounting /proc. A system
//!    that refuses them (user namespaces off, a container that masks /proc, ...) is found out
//!    while nothing has changed yet, so the caller can still restore the old way.
//! 3. In this process (the *supervisor*, which keeps its PID outside): without CAP_SYS_ADMIN and
//!    CAP_SYS_TIME, a user namespace mapping only our uid and gid (setgroups denied); then
//!    unshare a PID and a time namespace, which only children enter, and write the clock offsets
//!    before any child exists.
//! 4. Fork the *reaper*, PID 1 of the new namespace. It takes a mount namespace with a /proc of
//!    the new PID namespace (the shim reads /proc/self/task and /proc/self/maps at the next
//!    checkpoint; the outer /proc would show other numbers), then creates the program's process
//!    with `clone3(set_tid = [saved PID])`, which goes on with the restore; the blob creates the
//!    other threads the same way with their TIDs.
//! 5. The supervisor and the reaper forward every signal that can be forwarded and that a
//!    process sent (a terminal's signals reach the whole process group anyway) to their child,
//!    wait for it, and exit the way it did (the reaper hands the program's wait status up
//!    through a pipe; PID 1 cannot re-raise a signal on itself).
//!
//! ```text
//!   outer namespace          new PID (+ user, time, mount) namespace
//!   snapshim-restore  ──fork──▶  reaper (PID 1)  ──clone3(set_tid)──▶  program (saved PID)
//!   (supervisor)                                                        threads (saved TIDs)
//! ```
//!
//! Each restore creates its namespaces below the restorer's own: restoring from inside a
//! restored program nests one level deeper; restoring on a standby machine (the normal case)
//! starts again at one level.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use snapshim_image::Metadata;

/// What the restoring process (the program's own, in the new namespaces) needs to know.
pub struct Entered {
    /// PID of the supervisor, outside: signals sent to it reach the program.
    pub supervisor: u32,
    /// CLOCK_MONOTONIC here minus CLOCK_MONOTONIC in the supervisor.
    pub clock_shift_ns: i64,
}

/// Why the saved IDs cannot be had again on this system, if they cannot.
pub fn unreproducible_ids(meta: &Metadata, pid_max: i64) -> Option<String> {
    let pid = meta.process.pid;
    if pid == 1 {
        return Some("the program was PID 1 of its namespace, the number of the reaper".into());
    }
    if !meta.threads.iter().any(|t| t.tid == pid) {
        return Some(format!(
            "no thread has the program's PID {pid} as its ID (its main thread had exited)"
        ));
    }
    let ids = std::iter::once(pid).chain(meta.threads.iter().map(|t| t.tid));
    if let Some(id) = ids.clone().find(|&id| id as i64 >= pid_max) {
        return Some(format!(
            "ID {id} is not below this system's pid_max ({pid_max})"
        ));
    }
    if let Some(id) = ids.clone().find(|&id| id < 1) {
        return Some(format!("the image holds the invalid thread ID {id}"));
    }
    None
}

/// `/proc/sys/kernel/pid_max`, or the kernel's default.
pub fn pid_max() -> i64 {
    procfs::sys::kernel::pid_max().map_or(32768, i64::from)
}

/// Set once [`try_ahead`] found that the system allows the namespaces.
static TRIED_AHEAD: AtomicBool = AtomicBool::new(false);

/// Runs the dry run of [`enter`] now, for a standby: [`enter`] then skips it, which takes a
/// fork, a namespace and a mount of /proc off the time to resume. A refusal is left for
/// [`enter`] to find again and report. Must be called while this process is single-threaded.
pub fn try_ahead(meta: &Metadata) {
    if dry_run(&Clocks::now(meta)).is_ok() {
        TRIED_AHEAD.store(true, Ordering::Relaxed);
    }
}

/// Sets up the namespaces and creates the program's process. Returns in that process; the
/// supervisor never returns from here on success (it exits with the program's status).
/// `Err` comes back in this process, unchanged, when the system refuses the namespaces.
pub fn enter(meta: &Metadata) -> Result<Entered, String> {
    let clocks = Clocks::now(meta);
    if !TRIED_AHEAD.load(Ordering::Relaxed) {
        dry_run(&clocks)?;
    }
    let supervisor = std::process::id();
    let fatal = |e: String| -> String { format!("cannot set up the restore's namespaces: {e}") };
    if let Err(e) = unshare_all(&clocks) {
        // The dry run passed, so this is no refusal, and it is too late to go the old way.
        eprintln!("snapshim-restore: {}", fatal(e));
        std::process::exit(1);
    }
    let (report_r, report_w) = pipe()?;
    block_forwarded(true);
    // SAFETY: single-threaded; the child continues with a copy of this process.
    let reaper = unsafe { libc::fork() };
    if reaper < 0 {
        eprintln!("snapshim-restore: {}", fatal(format!("fork: {}", errno())));
        std::process::exit(1);
    }
    if reaper == 0 {
        // SAFETY: closing our copy of the supervisor's read end.
        unsafe { libc::close(report_r) };
        return reaper_main(meta.process.pid, report_w, supervisor, clocks.shift_ns);
    }
    // SAFETY: closing our copy of the reaper's write end.
    unsafe { libc::close(report_w) };
    // SAFETY: report_r is a pipe end this process owns from here on.
    let mut report = unsafe { std::fs::File::from_raw_fd(report_r) };
    let mut first = [0u8; 1];
    let ok = report.read_exact(&mut first).is_ok() && first[0] == b'K';
    if !ok {
        let mut why = String::new();
        let _ = report.read_to_string(&mut why);
        let status = wait_for(reaper);
        if why.is_empty() {
            why = format!("the namespace's init process ended ({status:#x})");
        }
        eprintln!("snapshim-restore: {}", fatal(why));
        std::process::exit(1);
    }
    close_all_but(&[2, report_r]);
    let status = supervise(reaper, false);
    // The reaper writes the program's own wait status before it exits.
    let mut word = [0u8; 4];
    let status = if report.read_exact(&mut word).is_ok() {
        i32::from_le_bytes(word)
    } else {
        status
    };
    exit_like(status, true)
}

/// PID 1: a /proc of its own, then the program's process with the saved PID.
fn reaper_main(
    pid: i32,
    report_w: RawFd,
    supervisor: u32,
    clock_shift_ns: i64,
) -> Result<Entered, String> {
    // SAFETY: report_w is our pipe end.
    let mut report = unsafe { std::fs::File::from_raw_fd(report_w) };
    let fail = |report: &mut std::fs::File, why: String| -> ! {
        let _ = report.write_all(format!("E{why}").as_bytes());
        // SAFETY: leaving this forked child without running the parent's exit handlers.
        unsafe { libc::_exit(1) }
    };
    // SAFETY: prctl with plain values; the supervisor's death takes the namespace down.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Died before the prctl? Then nobody reads the pipe any more.
    let mut pfd = libc::pollfd {
        fd: report_w,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 && pfd.revents & libc::POLLERR != 0 {
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(1) }
    }
    if let Err(e) = init_mounts() {
        fail(&mut report, e);
    }
    let app = match clone3_with_pid(pid) {
        Ok(0) => {
            // The program's process: the forwarding handlers are the reaper's business.
            drop(report);
            default_forwarded();
            block_forwarded(false);
            return Ok(Entered {
                supervisor,
                clock_shift_ns,
            });
        }
        Ok(app) => app,
        Err(e) => fail(
            &mut report,
            format!("cannot create the program's process with its PID {pid}: {e}"),
        ),
    };
    let _ = report.write_all(b"K");
    close_all_but(&[2, report_w]);
    let status = supervise(app, true);
    let _ = report.write_all(&status.to_le_bytes());
    drop(report);
    exit_like(status, false)
}

/// Offsets for the time namespace, and the clocks they were computed from.
struct Clocks {
    /// Lines for /proc/self/timens_offsets.
    offsets: String,
    /// CLOCK_MONOTONIC in the new namespace minus CLOCK_MONOTONIC here.
    shift_ns: i64,
}

impl Clocks {
    fn now(meta: &Metadata) -> Clocks {
        let (own_mono, own_boot) = own_time_offsets();
        let mono_here = clock_ns(libc::CLOCK_MONOTONIC);
        let boot_here = clock_ns(libc::CLOCK_BOOTTIME);
        let saved_mono = meta.process.clock_monotonic_ns;
        // Images before format 1.1 lack CLOCK_BOOTTIME: keep today's gap to CLOCK_MONOTONIC.
        let saved_boot = match meta.clock_boottime_ns {
            0 => saved_mono.saturating_add(boot_here.saturating_sub(mono_here)),
            b => b,
        };
        let mono = time_offset(saved_mono, mono_here, own_mono);
        let boot = time_offset(saved_boot, boot_here, own_boot);
        Clocks {
            offsets: offsets_text(mono, boot),
            shift_ns: mono.saturating_sub(own_mono),
        }
    }
}

/// The offset to give a new time namespace so that a clock in it reads `saved_ns` now.
///
/// `now_ns` is the clock as this process reads it, which is the host's clock plus `own_ns`, the
/// offset of the time namespace this process is in (0 outside any). The kernel adds offsets to
/// the host's clock, so the result is relative to that. Positive when the checkpoint was taken
/// on a machine that had been up longer than this one, negative when not.
pub fn time_offset(saved_ns: u64, now_ns: u64, own_ns: i64) -> i64 {
    let host_now = now_ns as i128 - own_ns as i128;
    (saved_ns as i128 - host_now).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// `/proc/PID/timens_offsets` lines: seconds may be negative, nanoseconds are 0..1e9.
fn offsets_text(mono_ns: i64, boot_ns: i64) -> String {
    let line = |name: &str, ns: i64| {
        format!(
            "{name} {} {}\n",
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000)
        )
    };
    line("monotonic", mono_ns) + &line("boottime", boot_ns)
}

/// The offsets of the time namespace this process is in (0, 0 outside any).
fn own_time_offsets() -> (i64, i64) {
    let text = std::fs::read_to_string("/proc/self/timens_offsets").unwrap_or_default();
    parse_offsets(&text)
}

fn parse_offsets(text: &str) -> (i64, i64) {
    let mut mono = 0;
    let mut boot = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [clock, s, ns] = f[..] {
            let (Ok(s), Ok(ns)) = (s.parse::<i64>(), ns.parse::<i64>()) else {
                continue;
            };
            let v = s.saturating_mul(1_000_000_000).saturating_add(ns);
            match clock {
                "monotonic" | "1" => mono = v,
                "boottime" | "7" => boot = v,
                _ => {}
            }
        }
    }
    (mono, boot)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Tries every step in a throwaway child and grandchild; `Err` names the refused step.
fn dry_run(clocks: &Clocks) -> Result<(), String> {
    let (r, w) = pipe()?;
    // SAFETY: single-threaded; the child only runs the steps below and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", errno()));
    }
    if child == 0 {
        // SAFETY: w is our pipe end.
        let mut out = unsafe { std::fs::File::from_raw_fd(w) };
        let result = unshare_all(clocks).and_then(|()| {
            // SAFETY: as above; the grandchild is PID 1 of the new namespace.
            let init = unsafe { libc::fork() };
            match init {
                i if i < 0 => Err(format!("fork: {}", errno())),
                0 => {
                    let code = match init_mounts() {
                        Ok(()) => 0,
                        Err(e) => {
                            let _ = out.write_all(e.as_bytes());
                            1
                        }
                    };
                    // SAFETY: leaving the forked grandchild.
                    unsafe { libc::_exit(code) }
                }
                i => match wait_for(i) {
                    0 => Ok(()),
                    _ => Err(String::new()),
                },
            }
        });
        if let Err(e) = result {
            let _ = out.write_all(e.as_bytes());
        }
        // SAFETY: leaving the forked child.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: closing our copy of the write end; r is ours.
    unsafe { libc::close(w) };
    // SAFETY: r is a pipe end this process owns.
    let mut input = unsafe { std::fs::File::from_raw_fd(r) };
    let mut why = String::new();
    let _ = input.read_to_string(&mut why);
    let status = wait_for(child);
    if !why.is_empty() {
        return Err(why);
    }
    if status != 0 {
        return Err(format!("the trial process ended with status {status:#x}"));
    }
    Ok(())
}

/// User namespace (when needed), then PID and time namespaces for our children, with the
/// clock offsets written before any child exists.
fn unshare_all(clocks: &Clocks) -> Result<(), String> {
    if !privileged() {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        unshare(CloneFlags::CLONE_NEWUSER, "unshare(CLONE_NEWUSER)")?;
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    // nix has no name for CLONE_NEWTIME.
    let pid_time = CloneFlags::CLONE_NEWPID | CloneFlags::from_bits_retain(libc::CLONE_NEWTIME);
    unshare(pid_time, "unshare(CLONE_NEWPID | CLONE_NEWTIME)")?;
    write_proc("/proc/self/timens_offsets", &clocks.offsets)
}

/// The new PID namespace's init: its own mount namespace, and a /proc that shows that namespace.
fn init_mounts() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS, "unshare(CLONE_NEWNS)")?;
    // Our mounts must not propagate back to the machine's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| failed("making / a slave mount", e))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| failed("mounting /proc for the new PID namespace", e))
}

/// CAP_SYS_ADMIN and CAP_SYS_TIME here: then no user namespace is needed, and the program keeps
/// the privileges it had (a user namespace would confine them to itself).
fn privileged() -> bool {
    let eff = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map_or(0, |s| s.capeff);
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_TIME: u32 = 25;
    eff & (1 << CAP_SYS_ADMIN) != 0 && eff & (1 << CAP_SYS_TIME) != 0
}

/// unshare(2); only changes this process's namespaces (we are single-threaded).
fn unshare(flags: CloneFlags, what: &str) -> Result<(), String> {
    nix::sched::unshare(flags).map_err(|e| failed(what, e))
}

/// "what: the system's message for the error".
fn failed(what: &str, e: nix::errno::Errno) -> String {
    format!("{what}: {}", std::io::Error::from(e))
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn write_proc(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
}

/// A pipe (read end, write end), both close-on-exec; the caller owns the raw numbers.
fn pipe() -> Result<(RawFd, RawFd), String> {
    let (r, w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("cannot create a pipe", e))?;
    Ok((r.into_raw_fd(), w.into_raw_fd()))
}

/// The program's process: a copy of this one (like fork) whose PID in the new namespace is
/// `pid`. Returns 0 in it, its PID in the caller.
fn clone3_with_pid(pid: i32) -> Result<i32, std::io::Error> {
    let set_tid = [pid];
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size, cgroup.
    let args: [u64; 11] = [
        0,
        0,
        0,
        0,
        libc::SIGCHLD as u64,
        0,
        0,
        0,
        set_tid.as_ptr() as u64,
        1,
        0,
    ];
    // SAFETY: a fork-like clone3 (no CLONE_VM) of a single-threaded process; args and set_tid
    // outlive the call. The child runs on its own copy of this stack.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(r as i32)
}

fn wait_for(pid: i32) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && errno().kind() != std::io::ErrorKind::Interrupted {
            return status;
        }
    }
}

/// Closes every descriptor but `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep = keep.to_vec();
    keep.sort();
    let mut from = 0u32;
    for &k in &keep {
        if k as u32 > from {
            // SAFETY: closing descriptors this process no longer needs.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}

/// Signals passed on to the child: all but the ones that cannot be caught, SIGCHLD, and those
/// the kernel sends for a fault of the receiver itself. glibc keeps 32 and 33 for itself.
fn forwarded() -> impl Iterator<Item = i32> {
    (1..=64).filter(|&s| {
        !matches!(
            s,
            libc::SIGKILL
                | libc::SIGSTOP
                | libc::SIGCHLD
                | libc::SIGSEGV
                | libc::SIGBUS
                | libc::SIGILL
                | libc::SIGFPE
                | libc::SIGTRAP
                | libc::SIGSYS
                | 32
                | 33
        )
    })
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in forwarded() {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks (or unblocks) the forwarded signals: from before the fork until the handler knows
/// whom to forward to, none may take its default action.
fn block_forwarded(block: bool) {
    let set = forwarded_set();
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: a valid set; no old set wanted.
    unsafe { libc::sigprocmask(how, &set, std::ptr::null_mut()) };
}

fn default_forwarded() {
    for s in forwarded() {
        // SAFETY: restoring the default disposition.
        unsafe { libc::signal(s, libc::SIG_DFL) };
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

/// Passes on a signal sent by a process (kill, sigqueue, tgkill: `si_code` <= 0). Signals from
/// the kernel are not passed on: a terminal's (Ctrl-C, hangup, resize) go to the whole
/// foreground process group, program included, and would arrive twice.
extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let from_kernel = info.is_null() || unsafe { (*info).si_code } > 0;
    if from_kernel && matches!(sig, libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) {
        // Ctrl-Z stopped the program: stop with it, so that the shell sees the job stopped
        // (PID 1 of a namespace cannot stop itself; it need not).
        // SAFETY: kill and getpid are async-signal-safe.
        unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
        return;
    }
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 && !from_kernel {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

/// Forwards signals to `child` and waits for it; as PID 1 (`init`) also reaps every orphan of
/// the namespace meanwhile. Returns the child's wait status.
fn supervise(child: i32, init: bool) -> i32 {
    CHILD.store(child, Ordering::Relaxed);
    for s in forwarded() {
        // SAFETY: installing a handler that only calls kill; every signal blocked inside it.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
            libc::sigfillset(&mut sa.sa_mask);
            libc::sigaction(s, &sa, std::ptr::null_mut());
        }
    }
    block_forwarded(false);
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(if init { -1 } else { child }, &mut status, libc::__WALL) };
        if r == child {
            return status;
        }
        if r < 0 && errno().kind() != std::io::ErrorKind::Interrupted {
            // No child left (cannot happen while `child` is ours): report a plain failure.
            return 1 << 8;
        }
    }
}

/// Ends this process the way a child with wait status `status` ended: the same exit code, or
/// the same signal where it can be re-raised (not as PID 1 of a namespace), else 128 + signal.
fn exit_like(status: i32, can_raise: bool) -> ! {
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let sig = if libc::WIFSIGNALED(status) {
        libc::WTERMSIG(status)
    } else {
        libc::SIGKILL
    };
    if can_raise {
        // SAFETY: default action for `sig`, unblocked, no core file of ours; then the signal.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    std::process::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn offset_continues_the_saved_clock_on_a_machine_up_for_less_time() {
        // Saved at 10 days of uptime, restored 1 hour after boot: the clock jumps forward.
        let off = time_offset(10 * 86400 * S, 3600 * S, 0);
        assert_eq!(off, (10 * 86400 - 3600) as i64 * S as i64);
        assert!(off > 0);
        assert_eq!((3600 * S) as i64 + off, (10 * 86400 * S) as i64);
    }

    #[test]
    fn offset_continues_the_saved_clock_on_a_machine_up_for_longer() {
        let off = time_offset(5 * S, 100 * S + 7, 0);
        assert_eq!(off, -(95 * S as i64) - 7);
        assert_eq!((100 * S + 7) as i64 + off, (5 * S) as i64);
    }

    #[test]
    fn offset_is_relative_to_the_host_inside_a_time_namespace() {
        // This process reads 1000 s but sits in a namespace 900 s ahead of the host (100 s).
        let off = time_offset(50 * S, 1000 * S, 900 * S as i64);
        assert_eq!(off, -(50 * S as i64));
        assert_eq!(100 * S as i64 + off, (50 * S) as i64);
    }

    #[test]
    fn offsets_are_written_as_seconds_and_non_negative_nanoseconds() {
        assert_eq!(
            offsets_text(1_500_000_000, -1_500_000_000),
            "monotonic 1 500000000\nboottime -2 500000000\n"
        );
        assert_eq!(
            offsets_text(0, -1),
            "monotonic 0 0\nboottime -1 999999999\n"
        );
        let (m, b) = parse_offsets(&offsets_text(-7 * S as i64 - 3, 42));
        assert_eq!((m, b), (-7 * S as i64 - 3, 42));
        assert_eq!(
            parse_offsets("monotonic           0         0\nboottime  -3 0\n"),
            (0, -3 * S as i64)
        );
        assert_eq!(parse_offsets(""), (0, 0));
    }

    #[test]
    fn ids_that_cannot_be_had_again_are_named() {
        use snapshim_image::{Process, ThreadState};
        let thread = |tid| ThreadState {
            tid,
            fs_base: 0,
            ctx_rsp: 0,
            robust_head: 0,
            robust_len: 0,
            altstack_sp: 0,
            altstack_flags: 0,
            altstack_size: 0,
            sigmask: 0,
            name: String::new(),
            helper: false,
        };
        let meta = |pid, tids: &[i32]| Metadata {
            process: Process {
                pid,
                ..Default::default()
            },
            shim: Default::default(),
            threads: tids.iter().map(|&t| thread(t)).collect(),
            regions: vec![],
            runs: vec![],
            fds: vec![],
            clock_boottime_ns: 0,
            build_ids: vec![],
            vdso: Default::default(),
            parent: None,
            inherited: Vec::new(),
            merged_from: None,
            lineage: None,
            credentials: Vec::new(),
        };
        assert_eq!(
            unreproducible_ids(&meta(300, &[300, 301, 305]), 32768),
            None
        );
        assert!(unreproducible_ids(&meta(1, &[1, 2]), 32768)
            .unwrap()
            .contains("PID 1"));
        let e = unreproducible_ids(&meta(300, &[300, 40000]), 32768).unwrap();
        assert!(e.contains("40000") && e.contains("pid_max"), "{e}");
        assert!(unreproducible_ids(&meta(32768, &[32768]), 32768).is_some());
        assert!(unreproducible_ids(&meta(32767, &[32767]), 32768).is_none());
        assert!(unreproducible_ids(&meta(300, &[301]), 32768)
            .unwrap()
            .contains("main thread"));
    }
}
