//! Warm standby: `snapshim-restore --standby IMAGE_OR_DIR` does ahead everything a restore can
//! do before it knows *when* to resume, then waits, and resumes within milliseconds when told.
//!
//! Algorithm.
//! 1. Claim the directory: listen on the abstract sockets named after the watched directory and
//!    after this PID (`snapshim_image::standby`); a second standby on the same directory fails
//!    here, before any work. Block [`ACTIVATE_SIGNAL`] and read it through a signalfd: it is
//!    one more descriptor for the poll loop, tells the sender's PID, and runs no handler (the
//!    signal stays blocked for good, so no disposition of ours is left for the program).
//! 2. Stage the newest committed image with the restore's own steps (`restore.rs`): `open`
//!    (header, metadata, `Metadata::validate`), `check_machine`, and every page-run checksum
//!    (the image crate's cancellable check). Reading every page for the
//!    checksums is also what puts the image into the page cache; `POSIX_FADV_WILLNEED` asks for
//!    it again every [`REWARM_MS`] while we wait, in case memory pressure evicted some of it.
//!    An image that fails any of this is reported in one line and the next older one is tried;
//!    none left: the standby fails.
//!    Then the namespaces' trial run (`ns::try_ahead`), so the activation does not repeat it.
//! 3. Wait. The directory is listed again every [`RESCAN_MS`] (a few microseconds; not inotify:
//!    closing an inotify descriptor waits for an RCU grace period, 10-15 ms here, which would
//!    land between the activation and the resume; an image file given alone is not watched).
//!    A newer image committed meanwhile (renamed into the directory) is staged the same
//!    way by a worker thread, while this thread keeps answering; a newer one still arriving
//!    cancels the worker's current check (between 4 MiB chunks) in favour of the newest. A
//!    damaged newer image is reported and the staged one kept.
//! 4. Activation (a connection from `snapshim activate`, or the signal): the time is taken at
//!    once. If an image newer than the staged one was committed before the activation and is
//!    still being checked, the activation waits for that check: the newest *good* image wins,
//!    and resuming an older state would silently lose the work the newer one holds. A newer
//!    image that fails is reported and the staged one is used.
//! 5. Let go of everything standby-only (the sockets; the worker thread is over by now: the
//!    restore forks and must be single-threaded), drain pending activation signals (they would otherwise reach
//!    the program once the supervisor forwards signals), and go on exactly like a normal restore
//!    (`restore::restore_image`) with the checksums already checked. Phase 2 reports "resuming after N
//!    us" counted from the activation, to `snapshim activate` over its connection, or on stderr
//!    for a signal.
//!
//! This module uses threads only before step 5; everything after is the ordinary restore.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use snapshim_image::standby::{dir_socket_name, peer, pid_socket_name, watched_dir, ACTIVATE};
use snapshim_image::verify::VerifyError;
use snapshim_image::{Chain, Image, ImageError, Metadata};

use crate::error::RestoreError;
use crate::lineage;
use crate::ns;
use crate::options::{monotonic_ns, Namespace, Options, RunState};
use crate::restore::{self, Never};

/// The signal that activates a standby (`kill -USR1 PID`). Not the checkpoint signal (SIGUSR2,
/// which a restored program's supervisor passes on), not one a terminal or the system sends,
/// and not SIGCONT, which job control sends on `fg`/`bg`.
pub const ACTIVATE_SIGNAL: Signal = Signal::SIGUSR1;

/// How often the staged image is advised back into the page cache while we wait.
const REWARM_MS: u64 = 30_000;

/// How often the directory is listed for newer images while we wait.
const RESCAN_MS: i32 = 100;

/// An image ready to restore: opened with its ancestors if it is a delta, validated, checked
/// against this machine, every page checksum of the chain checked.
struct Staged {
    chain: Chain,
    /// Time the checks took.
    check_ns: u64,
    bytes: u64,
}

impl Staged {
    fn path(&self) -> &Path {
        &self.chain.head().path
    }

    /// The images of the chain, every page of which was checked.
    fn checked(&self) -> Vec<Checked> {
        self.chain.images.iter().filter_map(Checked::of).collect()
    }

    fn meta(&self) -> &Metadata {
        &self.chain.head().meta
    }
}

/// Why an image was not staged.
enum NotStaged {
    /// Damaged, or not restorable here: the message says why.
    Bad(String),
    /// A newer image came and the check was abandoned.
    Cancelled,
}

/// Which image file this is: the file (device, inode, length) and the image's identity. An
/// image of the staged chain whose pages were checked is not checked again when a newer delta
/// on top of it is staged: committed images are never written again (a merge commits a new
/// file under the name).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Checked {
    dev: u64,
    ino: u64,
    len: u64,
    image_id: u64,
}

impl Checked {
    fn of(image: &Image) -> Option<Checked> {
        let m = image.file.metadata().ok()?;
        Some(Checked {
            dev: m.dev(),
            ino: m.ino(),
            len: image.file_len,
            image_id: image.header.image_id,
        })
    }
}

/// Checks `path` fully (step 2), but for the images in `checked`, whose pages were checked
/// already (the staged chain's). `cancel` abandons the page checksums between chunks.
fn stage(
    path: &Path,
    cancel: &AtomicBool,
    allowed: &[String],
    checked: &[Checked],
) -> Result<Staged, NotStaged> {
    let start = monotonic_ns();
    let chain = restore::open(path).map_err(|e| NotStaged::Bad(e.to_string()))?;
    let meta = &chain.head().meta;
    if let Some(why) = lineage::stale(chain.head(), path.parent().unwrap_or(Path::new("."))) {
        return Err(NotStaged::Bad(why));
    }
    restore::check_machine(meta, allowed)
        .map_err(|e| NotStaged::Bad(format!("{}: {e}", path.display())))?;
    let mut bytes = 0;
    for (i, image) in chain.images.iter().enumerate() {
        if Checked::of(image).is_some_and(|c| checked.contains(&c)) {
            continue;
        }
        bytes += image
            .verify_pages_cancellable(cancel)
            .map_err(|e| match e {
                VerifyError::Cancelled => NotStaged::Cancelled,
                VerifyError::Image(e) if i > 0 => NotStaged::Bad(format!(
                    "{}: its ancestor {}",
                    path.display(),
                    bad(image, e)
                )),
                VerifyError::Image(e) => NotStaged::Bad(bad(image, e)),
            })?;
    }
    chain.images.iter().for_each(warm);
    Ok(Staged {
        chain,
        check_ns: monotonic_ns() - start,
        bytes,
    })
}

/// "IMAGE: what is wrong with it".
fn bad(image: &Image, e: ImageError) -> String {
    format!("{}: {e}", image.path.display())
}

/// Asks the kernel to (re)read the whole image into the page cache; returns at once.
fn warm(image: &Image) {
    // SAFETY: an advice on our own descriptor; no memory is involved.
    unsafe { libc::posix_fadvise(image.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
}

/// The committed images of `dir`, newest first (names sort by sequence number).
fn newest_first(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut v = snapshim_image::list_images(dir).map_err(|e| e.to_string())?;
    v.reverse();
    Ok(v)
}

/// Whether image `a` was committed after image `b` (same directory: compare sequence numbers,
/// which the names sort by).
fn newer(a: &Path, b: &Path) -> bool {
    a.file_name() > b.file_name()
}

fn name(p: &Path) -> String {
    p.file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// A check of a newer image, running on its own thread.
struct Worker {
    path: PathBuf,
    cancel: Arc<AtomicBool>,
    handle: JoinHandle<Result<Staged, NotStaged>>,
    /// Becomes readable when the check is over.
    done: OwnedFd,
}

impl Worker {
    fn start(path: PathBuf, allowed: Vec<String>, checked: Vec<Checked>) -> Result<Worker, String> {
        let (r, w) = pipe()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (p, c) = (path.clone(), Arc::clone(&cancel));
        let handle = std::thread::Builder::new()
            .name("standby-check".into())
            .spawn(move || {
                let result = stage(&p, &c, &allowed, &checked);
                // Dropping the write end wakes the waiter (POLLHUP).
                drop(w);
                result
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(Worker {
            path,
            cancel,
            handle,
            done: r,
        })
    }

    fn finish(self) -> Result<Staged, NotStaged> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(NotStaged::Bad("the check of the image panicked".into())))
    }

    fn cancel(self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.finish();
    }
}

/// Who activated the standby.
enum Activation {
    /// `snapshim activate`, connected here; the report goes back over the connection.
    Client(UnixStream),
    /// The signal, sent by this PID.
    Signal(u32),
}

/// The standby's state while it waits.
struct Standby {
    /// None when a single image file was given.
    dir: Option<PathBuf>,
    staged: Staged,
    worker: Option<Worker>,
    /// Images found damaged or not restorable: never tried again.
    bad: HashSet<PathBuf>,
    /// Mapped files the user allowed to differ (`--allow-changed-file`).
    allowed: Vec<String>,
}

impl Standby {
    /// The newest image worth checking: newer than the staged one, not known bad, and (when
    /// `cutoff` is given) not newer than it.
    fn wanted(&self, cutoff: Option<&Path>) -> Result<Option<PathBuf>, String> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        Ok(newest_first(dir)?.into_iter().find(|p| {
            newer(p, self.staged.path())
                && !self.bad.contains(p)
                && !cutoff.is_some_and(|c| newer(p, c))
        }))
    }

    /// Starts (or redirects) the worker towards the newest image worth checking.
    fn reconcile(&mut self, cutoff: Option<&Path>) -> Result<(), String> {
        let Some(want) = self.wanted(cutoff)? else {
            return Ok(());
        };
        if let Some(w) = &self.worker {
            if !newer(&want, &w.path) {
                return Ok(());
            }
            eprintln!(
                "snapshim-restore: standby: {} arrived; abandoning the check of {}",
                name(&want),
                name(&w.path)
            );
            self.worker.take().expect("checked").cancel();
        }
        self.worker = Some(Worker::start(
            want,
            self.allowed.clone(),
            self.staged.checked(),
        )?);
        Ok(())
    }

    /// Collects the finished worker's result. Returns a line to pass on to the user.
    fn collect(&mut self) -> Option<String> {
        let w = self.worker.take()?;
        let path = w.path.clone();
        match w.finish() {
            Ok(s) => {
                let line = format!(
                    "{} staged ({}; replaces {})",
                    name(s.path()),
                    describe(&s),
                    name(self.staged.path())
                );
                self.staged = s;
                Some(line)
            }
            Err(NotStaged::Bad(why)) => {
                self.bad.insert(path);
                Some(format!(
                    "a newer image is not usable, keeping {}: {why}",
                    name(self.staged.path())
                ))
            }
            Err(NotStaged::Cancelled) => None,
        }
    }
}

fn describe(s: &Staged) -> String {
    format!(
        "{} MiB of pages checked in {} ms",
        s.bytes >> 20,
        s.check_ns / 1_000_000
    )
}

/// `snapshim-restore --standby TARGET`: returns only with an error before the activation, or
/// with whatever the restore returns after it.
pub fn run(target: &Path, opt: &Options, mut state: RunState) -> Result<Never, RestoreError> {
    let is_dir = std::fs::metadata(target)
        .map_err(|e| format!("cannot find {}: {e}", target.display()))?
        .is_dir();
    let dir = watched_dir(target).map_err(|e| e.to_string())?;

    // 1. Claim the directory, then the signal.
    let listeners = listen(&dir)?;
    let signals = activation_signal()?;

    // 2. The newest good image.
    let candidates = if is_dir {
        newest_first(&dir)?
    } else {
        vec![snapshim_image::resolve(target).map_err(|e| e.to_string())?]
    };
    if candidates.is_empty() {
        return Err(format!("no image in {}", dir.display()).into());
    }
    let mut bad = HashSet::new();
    let mut why_bad = Vec::new();
    let never = AtomicBool::new(false);
    let mut staged = None;
    for path in &candidates {
        match stage(path, &never, &opt.allow_changed, &[]) {
            Ok(s) => {
                staged = Some(s);
                break;
            }
            Err(NotStaged::Bad(why)) => {
                bad.insert(path.clone());
                why_bad.push(why);
            }
            Err(NotStaged::Cancelled) => unreachable!("never cancelled"),
        }
    }
    let Some(staged) = staged else {
        return Err(format!(
            "no usable image in {}: {}",
            dir.display(),
            why_bad.join("; ")
        )
        .into());
    };
    for why in &why_bad {
        eprintln!(
            "snapshim-restore: standby: skipping a newer image, damaged or not restorable here \
             ({why}); using {}",
            name(staged.path())
        );
    }
    let mut sb = Standby {
        dir: is_dir.then_some(dir.clone()),
        staged,
        worker: None,
        bad,
        allowed: opt.allow_changed.clone(),
    };
    eprintln!(
        "snapshim-restore: standby: {} staged ({}); activate with `snapshim activate {}` or \
         `kill -USR1 {}`; waiting for activation",
        sb.staged.path().display(),
        describe(&sb.staged),
        dir.display(),
        std::process::id()
    );
    // The namespaces' trial run forks: now, before the first worker thread exists.
    if opt.namespace != Namespace::Off
        && ns::unreproducible_ids(sb.staged.meta(), ns::pid_max()).is_none()
    {
        ns::try_ahead(sb.staged.meta());
    }
    // Anything committed while the first image was being checked.
    sb.reconcile(None)?;

    // 3. Wait.
    let mut warmed_ns = monotonic_ns();
    let activation = loop {
        let mut fds = vec![
            pollin(signals.as_raw_fd()),
            pollin(listeners[0].as_raw_fd()),
            pollin(listeners[1].as_raw_fd()),
        ];
        if let Some(w) = &sb.worker {
            fds.push(pollin(w.done.as_raw_fd()));
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, RESCAN_MS) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("standby: poll: {e}").into());
        }
        if monotonic_ns() - warmed_ns > REWARM_MS * 1_000_000 {
            sb.staged.chain.images.iter().for_each(warm);
            warmed_ns = monotonic_ns();
        }
        if fds[0].revents != 0 {
            if let Some(pid) = read_activation(&signals) {
                break Activation::Signal(pid);
            }
        }
        if let Some(conn) = listeners.iter().find_map(accept_activation) {
            break Activation::Client(conn);
        }
        if sb.worker.as_ref().is_some_and(|w| {
            fds.iter()
                .any(|p| p.fd == w.done.as_raw_fd() && p.revents != 0)
        }) {
            if let Some(line) = sb.collect() {
                eprintln!("snapshim-restore: standby: {line}; waiting for activation");
            }
        }
        sb.reconcile(None)?;
    };

    // 4. Activated: the newest good image committed up to now.
    let activated_ns = monotonic_ns();
    let (mut client, who) = match activation {
        Activation::Client(c) => {
            let pid = peer(c.as_raw_fd()).map_or(0, |p| p.0);
            (Some(c), format!("snapshim activate (PID {pid})"))
        }
        Activation::Signal(pid) => (None, format!("a signal from PID {pid}")),
    };
    let mut tell = |line: &str| {
        eprintln!("snapshim-restore: standby: {line}");
        if let Some(c) = &mut client {
            let _ = c.write_all(format!("note {line}\n").as_bytes());
        }
    };
    let cutoff = sb
        .dir
        .as_deref()
        .map(newest_first)
        .transpose()?
        .and_then(|v| v.into_iter().next());
    sb.reconcile(cutoff.as_deref())?;
    if sb.worker.is_some() {
        let waited = monotonic_ns();
        while sb.worker.is_some() {
            if let Some(line) = sb.collect() {
                tell(&line);
            }
            sb.reconcile(cutoff.as_deref())?;
        }
        tell(&format!(
            "waited {} ms at activation for the checks of the newer image",
            (monotonic_ns() - waited) / 1_000_000
        ));
    }

    // 5. Only the restore from here on.
    drop(listeners);
    // Discard every pending activation signal.
    while read_activation(&signals).is_some() {}
    drop(signals);
    let Standby { staged, .. } = sb;
    eprintln!(
        "snapshim-restore: standby: activated by {who}; restoring {}",
        staged.path().display()
    );
    // The files the program maps may have changed while we waited: cheap to check again. The
    // image directory becomes the program's (refused while the instance that ran it lives).
    let claim = restore::check_machine(staged.meta(), &opt.allow_changed)
        .and_then(|()| lineage::claim(staged.path(), &opt.lineage));
    let claim = match claim {
        Ok(c) => c,
        Err(e) => {
            if let Some(c) = &mut client {
                let _ = c.write_all(format!("error {e}\n").as_bytes());
            }
            return Err(e);
        }
    };
    state.start_ns = activated_ns;
    state.report_fd = match client {
        Some(mut c) => {
            let _ = c.write_all(format!("image {}\n", staged.path().display()).as_bytes());
            c.into_raw_fd()
        }
        // SAFETY: dup of our own stderr, for the report of a signal activation.
        None => unsafe { libc::dup(2) },
    };
    restore::restore_image(staged.chain, staged.check_ns, opt, state, claim)
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Listens on the directory's socket and on this PID's; refuses when another standby holds the
/// directory's.
fn listen(dir: &Path) -> Result<[UnixListener; 2], String> {
    let bind = |name: &[u8]| -> std::io::Result<UnixListener> {
        let l = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let by_dir = bind(&dir_socket_name(dir)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            let who = SocketAddr::from_abstract_name(dir_socket_name(dir))
                .and_then(|a| UnixStream::connect_addr(&a))
                .ok()
                .and_then(|c| peer(c.as_raw_fd()))
                .map(|(pid, _)| format!(" (PID {pid})"))
                .unwrap_or_default();
            format!("a standby is already waiting on {}{who}", dir.display())
        } else {
            format!("cannot listen for activation: {e}")
        }
    })?;
    let by_pid = bind(&pid_socket_name(std::process::id()))
        .map_err(|e| format!("cannot listen for activation: {e}"))?;
    Ok([by_dir, by_pid])
}

/// Accepts one pending connection, if any, and returns it if it is an activation request from
/// our own user (or root). Anything else is answered with an error and dropped.
fn accept_activation(l: &UnixListener) -> Option<UnixStream> {
    let (mut c, _) = l.accept().ok()?;
    let refuse = |c: &mut UnixStream, why: &str| {
        let _ = c.write_all(format!("error {why}\n").as_bytes());
        None
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer(c.as_raw_fd()) {
        Some((_, uid)) if uid == me || uid == 0 => {}
        _ => {
            return refuse(
                &mut c,
                "permission denied: the standby belongs to another user",
            )
        }
    }
    // The request is sent at once by a well-behaved client: do not let a silent one hold us.
    if c.set_nonblocking(false).is_err()
        || c.set_read_timeout(Some(Duration::from_secs(2))).is_err()
    {
        return None;
    }
    let mut req = [0u8; 64];
    let mut got = 0;
    while got < ACTIVATE.len() {
        match c.read(&mut req[got..ACTIVATE.len()]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n,
        }
    }
    if &req[..got] != ACTIVATE {
        return refuse(&mut c, "unknown request");
    }
    Some(c)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {}", std::io::Error::from(e)))
}

/// Blocks [`ACTIVATE_SIGNAL`] for good (the restore blocks it anyway, and the supervisor
/// unblocks it once it forwards signals), so that it is only ever read here, through a
/// signalfd.
fn activation_signal() -> Result<SignalFd, String> {
    let mut set = SigSet::empty();
    set.add(ACTIVATE_SIGNAL);
    set.thread_block()
        .and_then(|()| SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC))
        .map_err(|e| {
            format!(
                "cannot wait for the activation signal: signalfd: {}",
                std::io::Error::from(e)
            )
        })
}

/// One pending activation signal: its sender's PID.
fn read_activation(signals: &SignalFd) -> Option<u32> {
    signals
        .read_signal()
        .ok()
        .flatten()
        .map(|info| info.ssi_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_means_a_higher_sequence_number() {
        let d = Path::new("/d");
        let (a, b) = (
            d.join(snapshim_image::image_file_name(9)),
            d.join(snapshim_image::image_file_name(10)),
        );
        assert!(newer(&b, &a));
        assert!(!newer(&a, &b));
        assert!(!newer(&a, &a));
    }
}
