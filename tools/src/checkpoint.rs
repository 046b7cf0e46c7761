//! `snapshim checkpoint PID`: ask a running program for a checkpoint and wait for the outcome.
//!
//! Protocol (the shim implements the other half, shim/src/pipeline/trigger.rs):
//!
//! ```text
//!  snapshim checkpoint                          program with libsnapshim.so
//!  -------------------                          ---------------------------
//!  /proc/PID/maps has libsnapshim.so?
//!  trigger = SNAPSHIM_SIGNAL from /proc/PID/environ, else SIGRTMAX (SIGUSR2 for a shim
//!            that does not export snapshim_checkpoint_signal_is_sigrtmax: an older one)
//!  /proc/PID/status SigCgt has the trigger?
//!  the library exports snapshim_requests_on_quiesce_signal?
//!    yes: signal = the quiesce signal (SIGRTMAX-1, or -2), which SigCgt must have too
//!    no (an older shim): signal = the trigger
//!  (if we are root and PID is not: become PID's user)
//!  pipe2(O_CLOEXEC) -> (r, w)
//!  sigqueue(PID, signal,  --------------------> handler (any thread): si_code == SI_QUEUE from
//!           sival = w | inode(w) << 32)           another process: a 16-byte record
//!                                                 (si_pid, fd, inode) into the wake pipe
//!  poll(r) in 200 ms slices, checking             helper: takes every record, up to the pause
//!  that PID is still alive                          ... quiesce, capture, flush, commit ...
//!                                                 to each: open("/proc/<si_pid>/fd/<fd>"), a pipe
//!                                                 of that inode?
//!                                <--------------  "ok path=... bytes=... pause_us=... total_us=...
//!                                                  resident=...\n"   or   "err <message>\n"
//! ```
//!
//! The quiesce signal is real-time, so it queues: requests sent at the same moment each reach
//! the shim with their own `siginfo`. Two instances of a standard signal such as SIGUSR2 pending
//! at once merge into one, and the second requester would never be answered; that remains the
//! case only with an older shim. Requests that reach the shim before a checkpoint's pause get
//! that checkpoint's outcome; later ones the next checkpoint's.
//!
//! We keep `w` open until the reply arrives: the shim reopens it through /proc, which works
//! only while it is open here, and only if the shim's user may open our descriptors. The inode
//! lets the shim make sure it writes into our pipe and nothing else. A signal is never sent to a
//! process that does not handle it: the default action of SIGUSR2 is to terminate, and a shim
//! whose set-up failed is loaded but installs no handler.
//!
//! A program restored in its own PID namespace (see snapshim-restore) cannot see us: `si_pid`
//! would be 0 and its /proc does not show our process. PID may then be the restorer that
//! supervises it (its descendant with the shim is the program), and the request is sent by a
//! child we fork inside the program's PID namespace (after entering its user namespace when it
//! has one: ours, so we may), which holds `w` until the reply is there.

use std::fs::File;
use std::io::{ErrorKind, IsTerminal, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use nix::sys::prctl::set_dumpable;
use nix::sys::wait::waitpid;
use nix::unistd::{geteuid, pipe2, setgroups, setresgid, setresuid, Gid, Pid, Uid};
use snapshim_image::progress::Progress;
use std::time::{Duration, Instant};

use snapshim_image::settings;

use crate::cli::CheckpointArgs;
use crate::failure::{Failure, Result};
use crate::keeper;
use crate::parse::{self, Reply};
use crate::proc;

/// How often the target's liveness is checked while waiting.
const SLICE: Duration = Duration::from_millis(200);
/// A reply longer than this is not a reply.
const MAX_REPLY: usize = 64 * 1024;

pub fn checkpoint(a: CheckpointArgs) -> Result<()> {
    if a.dir.is_some() {
        return Err(Failure::usage(
            "--dir goes with --group (a single program's images go where it was told at start)",
        ));
    }
    let pid = program_of(a.pid.unwrap_or(0));
    require_shim(pid)?;
    let trigger = trigger_signal(pid)?;
    require_handler(pid, trigger)?;
    let signo = request_signal(pid, trigger)?;
    // Its namespaces are looked up and entered while we may still read them: a program that
    // changed its credentials is not dumpable, and once we are its user its /proc/PID/ns/*
    // are closed to us.
    // (When it has its own user namespace, we become its user first: that user owns it.)
    let inner = pid_in_own_namespace(pid)?;
    let mut entered = false;
    if inner.is_some() && same_namespace(pid, "user") {
        enter_namespaces(pid)?;
        entered = true;
    }
    become_owner_of(pid)?;
    if inner.is_some() && !entered {
        enter_namespaces(pid)?;
    }
    let (read_end, write_end) = pipe()?;
    let shim_stops = a.kill && shim_exports(pid, settings::STOP_AFTER_SYMBOL);
    let mut value = request_value(&write_end)?;
    if shim_stops {
        value |= settings::STOP_AFTER_BIT as u64;
    }
    // Opened before the request: the PID cannot be another process's when we wait on it.
    let pidfd = if a.kill { Some(pidfd_open(pid)?) } else { None };
    let sender = match inner {
        None => {
            sigqueue(pid, signo, value)?;
            None
        }
        Some(inner) => Some(send_from_namespace(pid, inner, signo, value)?),
    };
    let show_progress = !a.quiet && !a.json && std::io::stderr().is_terminal();
    let line = wait_for_reply(pid, read_end, a.timeout, show_progress);
    drop(sender);
    drop(write_end);
    let mut outcome = line.and_then(|line| report(pid, &line, &a));
    if let (Some(pidfd), Ok(details)) = (pidfd, &mut outcome) {
        for line in stop(pid, pidfd, shim_stops, a.timeout)? {
            if !a.quiet && !a.json {
                println!("{line}");
            }
            details.push(line);
        }
    }
    if let Some(file) = &a.log {
        let lines = match &outcome {
            Ok(details) => details.clone(),
            Err(f) => vec![format!("failed: {}", f.message)],
        };
        append_log(file, pid, &lines)?;
    }
    outcome.map(|_| ())
}

/// Prints the outcome of the reply `line` as asked; returns the details of a committed
/// checkpoint (for `--verbose` and `--log`).
fn report(pid: i32, line: &str, a: &CheckpointArgs) -> Result<Vec<String>> {
    match parse::parse_reply(line) {
        Ok(Reply::Committed(c)) => {
            let details = details(&c.path);
            if a.json {
                return crate::json::print_ok(serde_json::json!({
                    "pid": pid,
                    "image": c.path,
                    "bytes": c.bytes,
                    "resident_bytes": c.resident,
                    "pause_us": c.pause_us,
                    "flush_us": c.flush_us,
                    "total_us": c.total_us,
                    "engine": c.engine,
                    "kind": c.kind,
                    "pages_copied_before_write": c.copied,
                    "stopped": a.kill,
                }))
                .map(|()| details);
            }
            if a.quiet {
                println!("{}", c.path);
            } else {
                println!("checkpoint committed: {}", c.path);
                let flush = c
                    .flush_us
                    .map(|f| format!(", flush {}", parse::format_ms(f)))
                    .unwrap_or_default();
                let engine = c
                    .engine
                    .as_deref()
                    .map(|e| format!(", engine {e}"))
                    .unwrap_or_default();
                let engine = match c.kind.as_deref() {
                    Some("delta") => format!("{engine}, delta image"),
                    _ => engine,
                };
                let copied = c
                    .copied
                    .map(|n| format!(", {n} pages copied before written"))
                    .unwrap_or_default();
                println!(
                    "  image {} (process resident {}), pause {}{flush}, total {}{engine}{copied}",
                    parse::human_bytes(c.bytes),
                    parse::human_bytes(c.resident),
                    parse::format_ms(c.pause_us),
                    parse::format_ms(c.total_us)
                );
                if a.verbose {
                    for l in &details {
                        println!("  {l}");
                    }
                }
            }
            Ok(details)
        }
        Ok(Reply::Failed(msg)) => Err(Failure::op(format!(
            "checkpoint of PID {pid} failed: {msg}"
        ))),
        Err(why) => Err(Failure::op(format!("checkpoint of PID {pid}: {why}"))),
    }
}

/// `--kill`, once the image is committed: takes the program's connections held in repair mode
/// for a keeper ([`keeper`]), kills the program (a shim that stops by itself, `shim_stops`,
/// waits for it), waits until it is gone and starts the keeper. Returns the lines that say so.
fn stop(pid: i32, pidfd: OwnedFd, shim_stops: bool, timeout: Duration) -> Result<Vec<String>> {
    let held = if shim_stops {
        keeper::take(pid, &pidfd)
    } else {
        Vec::new()
    };
    // SAFETY: pidfd_send_signal takes plain values (no siginfo).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    let mut pfd = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        match poll(
            &mut pfd,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(1..) => break,
            Err(Errno::EINTR) => continue,
            _ => {
                return Err(Failure::op(format!(
                    "checkpoint committed, but process {pid} did not stop within {}",
                    humantime(timeout)
                )))
            }
        }
    }
    let mut lines = vec![format!(
        "program {pid} stopped (SIGKILL) after the checkpoint"
    )];
    if !held.is_empty() {
        let n = held.len();
        keeper::spawn(held)?;
        lines.push(format!(
            "{n} live TCP connection(s) kept silent for a restore with --tcp-established \
             (for up to {})",
            humantime(keeper::KEEP_FOR)
        ));
    }
    Ok(lines)
}

/// `pidfd_open(pid, 0)`: readable once the process has ended.
pub(crate) fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain values and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Failure::op(format!(
            "cannot watch process {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a descriptor the kernel just gave us, owned from here on.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// What the shim's statistics beside the image (`ckpt-N.json`) say of the checkpoint, one
/// line a subject.
fn details(image: &str) -> Vec<String> {
    let path = std::path::Path::new(image).with_extension("json");
    let Some(v) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        return vec![format!(
            "image {image} (no statistics in {})",
            path.display()
        )];
    };
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let phases: Vec<String> = v["pause_phases_us"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, us)| format!("{k} {}", parse::format_ms(us.as_u64().unwrap_or(0))))
                .collect()
        })
        .unwrap_or_default();
    vec![
        format!(
            "image {image}: {} ({}), engine {}",
            parse::human_bytes(n("bytes")),
            if v["delta"].as_bool() == Some(true) {
                "delta"
            } else {
                "full"
            },
            v["engine"].as_str().unwrap_or("?")
        ),
        format!(
            "pause {}: {}",
            parse::format_ms(n("pause_us")),
            if phases.is_empty() {
                "-".into()
            } else {
                phases.join(", ")
            }
        ),
        format!(
            "flush {}, total {}; pages copied before written {}, of them by the writer {}; \
             huge pages split {}",
            parse::format_ms(n("flush_us")),
            parse::format_ms(n("total_us")),
            n("pages_copied_before_write"),
            n("pages_copied_ahead"),
            n("huge_pages_split")
        ),
        format!(
            "resident {} at the checkpoint; copy store kept {}",
            parse::human_bytes(n("resident_bytes")),
            parse::human_bytes(n("copy_store_kept_bytes"))
        ),
    ]
}

/// Appends `lines` to the log `file`, each with the time and the PID.
fn append_log(file: &std::path::Path, pid: i32, lines: &[String]) -> Result<()> {
    use std::io::Write;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let stamp = parse::format_time(now, 0);
    let text: String = lines
        .iter()
        .map(|l| format!("{stamp} checkpoint of PID {pid}: {l}\n"))
        .collect();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Failure::op(format!("cannot write the log {}: {e}", file.display())))
}

/// `pid`, or, when `pid` is a snapshim-restore that runs the program in new namespaces (it and
/// the namespace's init are the program's parent and grandparent), the program.
fn program_of(pid: i32) -> i32 {
    let is_restorer = proc::comm(pid).is_some_and(|c| c.starts_with("snapshim-restor"));
    if !is_restorer || has_shim(pid) {
        return pid;
    }
    for init in proc::children(pid) {
        if let Some(&app) = proc::children(init).iter().find(|&&c| has_shim(c)) {
            return app;
        }
    }
    pid
}

pub(crate) fn has_shim(pid: i32) -> bool {
    proc::maps_file(pid, crate::companions::SHIM_LIB).unwrap_or(false)
}

/// `None` when `pid` is in our PID namespace; else its PID in its own namespace.
fn pid_in_own_namespace(pid: i32) -> Result<Option<i32>> {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    if ns("self") == ns(&pid.to_string()) {
        return Ok(None);
    }
    let inner = proc::status(pid)?.nspid.and_then(|ids| ids.last().copied());
    match inner {
        Some(inner) => Ok(Some(inner)),
        None => Err(Failure::op(format!(
            "cannot tell the PID of process {pid} in its own PID namespace"
        ))),
    }
}

/// A child of ours inside the program's PID namespace that has sent the request and keeps the
/// reply pipe open (its copy of it is the one the shim opens) until dropped.
struct Sender {
    child: i32,
    hold: Option<OwnedFd>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Closing `hold` ends the child's wait.
        drop(self.hold.take());
        let _ = waitpid(Pid::from_raw(self.child), None);
    }
}

/// Enters the user namespace (if not ours) and the PID namespace of `pid`; our children are
/// born in the latter.
fn enter_namespaces(pid: i32) -> Result<()> {
    let enter = |kind: &str, flag: CloneFlags| -> Result<()> {
        let path = format!("/proc/{pid}/ns/{kind}");
        if same_namespace(pid, kind) {
            return Ok(());
        }
        let ns = File::open(&path).map_err(|e| Failure::op(format!("cannot open {path}: {e}")))?;
        setns(&ns, flag).map_err(|e| {
            Failure::op(format!(
                "cannot enter the {kind} namespace of process {pid} to ask it for a checkpoint: {}",
                std::io::Error::from(e)
            ))
        })
    };
    enter("user", CloneFlags::CLONE_NEWUSER)?;
    enter("pid", CloneFlags::CLONE_NEWPID)
}

/// Whether `pid`'s namespace of `kind` is ours (false when it cannot be told).
fn same_namespace(pid: i32, kind: &str) -> bool {
    let link = |p: String| std::fs::read_link(p).ok();
    let theirs = link(format!("/proc/{pid}/ns/{kind}"));
    theirs.is_some() && theirs == link(format!("/proc/self/ns/{kind}"))
}

/// Forks a child in the PID namespace we entered ([`enter_namespaces`]), which sends the
/// request to `inner` (the program's PID as it sees it).
fn send_from_namespace(pid: i32, inner: i32, signo: i32, value: u64) -> Result<Sender> {
    let (hold_r, hold_w) = pipe()?;
    let (mut ack_r, ack_w) = pipe()?;
    // SAFETY: single-threaded; the child only makes system calls and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::op(format!("cannot fork: {e}")));
    }
    if child == 0 {
        // SAFETY: plain system calls on our own descriptors, then _exit; the parent's death
        // ends us too.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::prctl(libc::PR_SET_DUMPABLE, 1);
            // Our copy of the reply pipe has the same descriptor number as the parent's.
            let value = libc::sigval {
                sival_ptr: value as usize as *mut libc::c_void,
            };
            let err = if libc::sigqueue(inner, signo, value) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::write(ack_w.as_raw_fd(), err.to_le_bytes().as_ptr().cast(), 4);
            libc::close(ack_w.as_raw_fd());
            libc::close(hold_w.as_raw_fd());
            let mut b = [0u8; 1];
            while libc::read(hold_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) < 0 {}
            libc::_exit(0)
        }
    }
    drop(ack_w);
    drop(hold_r);
    let sender = Sender {
        child,
        hold: Some(hold_w),
    };
    let mut word = [0u8; 4];
    let err = match ack_r.read_exact(&mut word) {
        Ok(()) => i32::from_le_bytes(word),
        Err(_) => libc::ESRCH,
    };
    if err != 0 {
        return Err(Failure::op(format!(
            "cannot send {} to process {pid}: {}",
            parse::signal_name(signo),
            std::io::Error::from_raw_os_error(err)
        )));
    }
    Ok(sender)
}

/// Fails unless `libsnapshim.so` is mapped in `pid`.
pub(crate) fn require_shim(pid: i32) -> Result<()> {
    if !proc::maps_file(pid, crate::companions::SHIM_LIB)? {
        return Err(Failure::op(format!(
            "process {pid} is not running under snapshim ({} is not loaded)",
            crate::companions::SHIM_LIB
        )));
    }
    if proc::is_gone(pid) {
        return Err(Failure::op(format!("process {pid} has exited")));
    }
    Ok(())
}

/// When we run as root and `pid` does not, becomes its user for good. The shim opens
/// `/proc/<our pid>/fd/<n>` with its own credentials: that needs our process to be of its user
/// (and dumpable), and the pipe to be created by that user (pipes are mode 0600).
fn become_owner_of(pid: i32) -> Result<()> {
    if !geteuid().is_root() {
        return Ok(());
    }
    // The filesystem ids: the ones the kernel checks when that process opens files.
    let status = proc::status(pid)?;
    let (uid, gid) = (status.fuid, status.fgid);
    if uid == 0 {
        return Ok(());
    }
    let fail = |what: String| {
        move |e: Errno| {
            Failure::op(format!(
                "cannot {what} to receive the reply of process {pid} (uid {uid}): {}",
                std::io::Error::from(e)
            ))
        }
    };
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[]).map_err(fail("drop supplementary groups".into()))?;
    setresgid(g, g, g).map_err(fail(format!("switch to group {gid}")))?;
    setresuid(u, u, u).map_err(fail(format!("switch to user {uid}")))?;
    // Changing credentials made us non-dumpable, which would hide our /proc/PID/fd.
    set_dumpable(true).map_err(fail("become dumpable".into()))
}

/// Fails unless `pid` catches `signo`. The shim installs its handler only when its set-up
/// succeeded: with `SNAPSHIM_DISABLE`, a `SNAPSHIM_SIGNAL` it refused or its address range
/// taken, it stays loaded but checkpoints are off, and the signal's default action would
/// kill the program.
pub(crate) fn require_handler(pid: i32, signo: i32) -> Result<()> {
    let caught = proc::status(pid)?.sigcgt;
    if caught & (1u64 << (signo - 1)) == 0 {
        return Err(Failure::op(format!(
            "process {pid} does not handle {}: snapshim is loaded but its checkpoints are off \
             (the program's stderr says why); not signalling it",
            parse::signal_name(signo)
        )));
    }
    Ok(())
}

/// The checkpoint signal of `pid`: `SNAPSHIM_SIGNAL` in its environment, else its shim's
/// default: SIGRTMAX, or SIGUSR2 for an older shim.
pub(crate) fn trigger_signal(pid: i32) -> Result<i32> {
    match proc::environ_var(pid, "SNAPSHIM_SIGNAL")?.as_deref() {
        None | Some("") if shim_exports(pid, settings::RT_DEFAULT_SYMBOL) => {
            Ok(settings::default_signal())
        }
        None | Some("") => Ok(libc::SIGUSR2),
        Some(v) => parse::parse_signal(v).map_err(|why| {
            Failure::op(format!(
                "cannot tell which signal triggers a checkpoint in process {pid}: \
                     its SNAPSHIM_SIGNAL={v}: {why}"
            ))
        }),
    }
}

/// The signal to send the request with: the shim's quiesce signal, which queues, when the shim
/// takes requests on it; else, for an older shim, the checkpoint signal. Fails unless the
/// process handles it.
fn request_signal(pid: i32, trigger: i32) -> Result<i32> {
    if !takes_queued_requests(pid) {
        return Ok(trigger);
    }
    let signo = settings::quiesce_signal(trigger);
    require_handler(pid, signo)?;
    Ok(signo)
}

/// Whether the `libsnapshim.so` mapped in `pid` exports
/// [`settings::QUEUED_REQUESTS_SYMBOL`]. Read in the program's own view of the filesystem
/// (`/proc/PID/root`), else in ours. False when it cannot be told: a shim that has the symbol
/// also answers requests sent with the checkpoint signal.
fn takes_queued_requests(pid: i32) -> bool {
    shim_exports(pid, settings::QUEUED_REQUESTS_SYMBOL)
}

/// Whether the `libsnapshim.so` mapped in `pid` exports `symbol` (see [`takes_queued_requests`]).
pub(crate) fn shim_exports(pid: i32, symbol: &str) -> bool {
    let Ok(Some(lib)) = proc::mapped_path(pid, crate::companions::SHIM_LIB) else {
        return false;
    };
    let inside =
        Path::new(&format!("/proc/{pid}/root")).join(lib.strip_prefix("/").unwrap_or(&lib));
    let Ok(file) = File::open(&inside).or_else(|_| File::open(&lib)) else {
        return false;
    };
    // SAFETY: a read-only private mapping, read within the length it had when mapped; a file
    // truncated meanwhile gives SIGBUS at worst in this short-lived tool.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return false;
    };
    exports(&map, symbol)
}

/// Whether the ELF shared object `elf` exports (defines in its dynamic symbol table) `name`.
fn exports(elf: &[u8], name: &str) -> bool {
    let Ok(elf) = goblin::elf::Elf::parse(elf) else {
        return false;
    };
    elf.dynsyms
        .iter()
        .any(|s| s.st_shndx != 0 && elf.dynstrtab.get_at(s.st_name) == Some(name))
}

/// The request's value: the reply pipe's descriptor, and above bit 32 the low 32 bits of its
/// inode, so that the shim writes into this pipe and nothing else (an older shim reads only the
/// low 32 bits).
fn request_value(w: &OwnedFd) -> Result<u64> {
    let st = nix::sys::stat::fstat(w.as_fd())
        .map_err(|e| Failure::op(format!("cannot stat our pipe: {}", std::io::Error::from(e))))?;
    Ok(request_value_of(w.as_raw_fd(), st.st_ino))
}

fn request_value_of(fd: i32, ino: u64) -> u64 {
    ((ino & 0xffff_ffff) << 32) | fd as u32 as u64
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(File, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Failure::op(format!("cannot create a pipe: {}", std::io::Error::from(e))))?;
    Ok((File::from(r), w))
}

/// `sigqueue(pid, signo, { sival_ptr = value })`: the shim reads our PID from `si_pid` and
/// the pipe to reply on from `si_value` (see [`request_value`]).
pub(crate) fn sigqueue(pid: i32, signo: i32, value: u64) -> Result<()> {
    let value = libc::sigval {
        sival_ptr: value as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue takes plain values; the pointer is never dereferenced by anyone.
    if unsafe { libc::sigqueue(pid, signo, value) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::op(format!(
            "cannot send {} to process {pid}: {e}",
            parse::signal_name(signo)
        )));
    }
    Ok(())
}

/// Waits for one line on `r`, giving up when `pid` is gone or `timeout` has passed.
fn wait_for_reply(pid: i32, mut r: File, timeout: Duration, show: bool) -> Result<String> {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut watch = Watch::new(show, pid);
    let result = loop {
        let elapsed = start.elapsed();
        let slice = SLICE.min(timeout.saturating_sub(elapsed));
        if let Err(e) = poll_read(&mut r, &mut buf, slice) {
            break Err(Failure::op(format!("cannot read the shim's reply: {e}")));
        }
        if let Some(line) = take_line(&mut buf) {
            break Ok(line);
        }
        if buf.len() > MAX_REPLY {
            break Err(Failure::op(format!(
                "checkpoint of PID {pid}: the shim's reply is longer than {MAX_REPLY} bytes"
            )));
        }
        if proc::is_gone(pid) {
            // It may have replied just before exiting.
            let _ = poll_read(&mut r, &mut buf, Duration::ZERO);
            if let Some(line) = take_line(&mut buf) {
                break Ok(line);
            }
            break Err(Failure::op(format!(
                "process {pid} exited before the checkpoint was committed"
            )));
        }
        if start.elapsed() >= timeout {
            break Err(Failure::op(format!(
                "checkpoint of PID {pid}: no outcome within {} (the program is still running; \
                 the checkpoint may still complete)",
                humantime(timeout)
            )));
        }
        watch.tick(start.elapsed());
    };
    watch.clear();
    result
}

/// Waits up to `wait` for data on `r` and appends what is there to `buf`.
fn poll_read(r: &mut File, buf: &mut Vec<u8>, wait: Duration) -> std::io::Result<()> {
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    let mut pfd = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
    match poll(
        &mut pfd,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Err(Errno::EINTR) | Ok(0) => return Ok(()),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    if !pfd[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLIN))
    {
        return Ok(());
    }
    let mut chunk = [0u8; 4096];
    // The pipe has data, so this read does not block.
    match r.read(&mut chunk) {
        Ok(k) => buf.extend_from_slice(&chunk[..k]),
        Err(e) if e.kind() == ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The first complete line in `buf`, without its newline.
pub(crate) fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..=end);
    Some(line)
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} s", s.round())
    }
}

/// Progress on stderr while waiting, when stderr is a terminal (see
/// `snapshim_image::progress`): the bytes of the image file being written (the shim's
/// temporary `.ckpt-N.snap.tmp`, found among the program's descriptors) against the program's
/// resident memory, the most an image can hold.
struct Watch {
    pid: i32,
    progress: Progress,
}

impl Watch {
    fn new(show: bool, pid: i32) -> Watch {
        let resident = crate::proc::status(pid)
            .ok()
            .and_then(|s| s.vmrss)
            .map_or(0, |kib| kib * 1024);
        Watch {
            pid,
            progress: Progress::with(format!("snapshim: checkpoint of PID {pid}"), resident, show),
        }
    }

    fn tick(&mut self, _elapsed: Duration) {
        self.progress.set(written(self.pid).unwrap_or(0));
    }

    fn clear(&mut self) {
        self.progress.finish();
    }
}

/// The size of the image file `pid` has open for writing, if any.
fn written(pid: i32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().ends_with(".snap.tmp"))
        })
        .and_then(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_taken_whole() {
        let mut buf = b"ok path=/a".to_vec();
        assert_eq!(take_line(&mut buf), None);
        buf.extend_from_slice(b" bytes=1\nrest");
        assert_eq!(take_line(&mut buf).as_deref(), Some("ok path=/a bytes=1"));
        assert_eq!(buf, b"rest");
    }

    #[test]
    fn the_value_holds_the_descriptor_and_the_low_inode_bits() {
        assert_eq!(request_value_of(9, 0x1_2345_6789), 0x2345_6789_0000_0009);
        // The shim's side: fd = the low 32 bits, inode = the high ones.
        let v = request_value_of(1023, 77);
        assert_eq!((v as u32, (v >> 32) as u32), (1023, 77));
    }

    #[test]
    fn exported_symbols_are_found_and_others_not() {
        // libc exports sigqueue, and not the shim's marker.
        let libc_path = proc::mapped_path(std::process::id() as i32, "libc.so.6")
            .unwrap()
            .expect("libc is mapped");
        let libc = std::fs::read(libc_path).unwrap();
        assert!(exports(&libc, "sigqueue"));
        assert!(!exports(&libc, settings::QUEUED_REQUESTS_SYMBOL));
        assert!(!exports(b"not an ELF file", "sigqueue"));
    }

    #[test]
    fn a_process_without_the_shim_is_refused() {
        let e = require_shim(std::process::id() as i32).unwrap_err();
        assert!(
            e.message.contains("is not running under snapshim"),
            "{}",
            e.message
        );
        assert_eq!(e.code, 1);
    }
}
