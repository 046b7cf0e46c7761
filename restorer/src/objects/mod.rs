//! The restore side of each kind of process state: one module per kind, named as in the image
//! crate's `objects/` and the shim's (`memory`, `regular_file`, `deleted_file`, `directory`,
//! `char_device`, `pipe`, `socket`, `inherited`, `eventfd`, `timerfd`, `signalfd`, `epoll`,
//! `inotify`, `signals`, `timers`, `threads`, `process`).
//!
//! Descriptors are restored in two steps, so that no number the program had can be taken by
//! something the restorer still needs, and nothing of the program's exists while a later
//! descriptor can still fail:
//!
//! 1. [`prepare_fds`]: each descriptor kind's `prepare` opens what the program had on a spare
//!    number at or above [`FdPlan::high_base`] (above every number of the program); a failure
//!    here is a clear message and nothing is lost yet;
//! 2. [`install_fds`]: every other descriptor of this process is closed, and each prepared one
//!    is duplicated onto the program's number;
//! 3. [`epoll::register`]: a pass of its own, after every other kind: each epoll instance gets
//!    its registrations, which name the program's numbers (see `epoll.rs`).
//!
//! A descriptor no kind can rebuild (`FdKind::Unsupported`) is refused before anything
//! changes ([`unrestorable`]), unless the user asked to go on with it closed.
//!
//! The other kinds go into the plan phase 2 acts on (`memory`, `signals`, `timers`,
//! `threads`, `process`), or are set here (`process`: cwd, umask, personality).

pub mod char_device;
pub mod deleted_file;
pub mod directory;
pub mod epoll;
pub mod eventfd;
pub mod inherited;
pub mod inotify;
pub mod memory;
pub mod pipe;
pub mod process;
pub mod regular_file;
pub mod signalfd;
pub mod signals;
pub mod socket;
pub mod threads;
pub mod timerfd;
pub mod timers;

use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use snapshim_image::{Duplicate, FdKind, FdState, Metadata};

/// The descriptors prepared for the program.
pub struct FdPlan {
    /// (the program's number, the prepared spare number, close-on-exec)
    pub moves: Vec<(RawFd, RawFd, bool)>,
    /// Numbers taken from this process as they are (inherited stdio).
    pub inherit: Vec<RawFd>,
    /// Every spare number is at least this: above every number of the program.
    pub high_base: RawFd,
    /// The program's numbers that could not be rebuilt and only fail (`--unrestorable=closed`).
    pub closed: Vec<RawFd>,
}

/// What a kind's `prepare` made of one descriptor.
pub enum Prepared {
    /// Opened on this spare number.
    At(RawFd),
    /// This process's own descriptor of the same number serves as it is.
    Inherit,
    /// A descriptor that only fails (EBADF), on this spare number, holding the program's
    /// number of a descriptor that could not be rebuilt.
    Closed(RawFd),
}

/// What the kinds' `prepare` functions share: where spare numbers start, and the pipes made so
/// far (the two ends of a pipe are two descriptors).
pub struct Prepare {
    pub high_base: RawFd,
    pub pipes: pipe::Pipes,
    pub sockets: socket::Sockets,
    /// The directory of the image being restored: where a deleted file is re-created when its
    /// own directory is not there (`deleted_file.rs`).
    pub image_dir: std::path::PathBuf,
    /// `--tcp-established`: `SocketRole::Established` comes back alive, not reset.
    pub tcp_established: bool,
}

impl Prepare {
    /// Reopens `path` as descriptor `f` was opened (access mode and status flags, plus
    /// `extra`), on a spare number.
    pub fn reopen(&self, f: &FdState, path: &str, extra: i32) -> Result<RawFd, String> {
        let acc = access_mode(f);
        let file = std::fs::OpenOptions::new()
            .read(acc != libc::O_WRONLY)
            .write(acc != libc::O_RDONLY)
            .custom_flags(status_flags(f) | extra)
            .open(path)
            .map_err(|e| {
                let since = if e.kind() == std::io::ErrorKind::NotFound {
                    "; it was there at the checkpoint: it was removed or renamed since"
                } else {
                    ""
                };
                format!(
                    "cannot reopen {path} (descriptor {} of the program): {e}{since}",
                    f.fd
                )
            })?;
        move_high(file.into_raw_fd(), self.high_base)
    }
}

/// `O_RDONLY`, `O_WRONLY` or `O_RDWR`, as the program had the descriptor open.
pub fn access_mode(f: &FdState) -> i32 {
    f.flags as i32 & libc::O_ACCMODE
}

/// The descriptor's status flags (`O_APPEND`, `O_NONBLOCK`...), without the access mode and
/// the flags that only mean something when a file is created.
pub fn status_flags(f: &FdState) -> i32 {
    f.flags as i32 & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)
}

/// The one-line refusal of the first descriptor the restorer cannot rebuild, if any.
pub fn unrestorable(meta: &Metadata) -> Option<String> {
    meta.fds.iter().find_map(|f| match &f.kind {
        FdKind::Unsupported(u) => Some(inherited::refusal(f, u)),
        _ => None,
    })
}

/// Opens everything the program's descriptor table needs, on numbers above any of its own.
/// A descriptor that cannot be rebuilt is an error, or with `leave_closed` one that fails
/// every call with `EBADF`. With `tcp_established`, TCP connections captured alive are made
/// again alive (`socket::repair`).
pub fn prepare_fds(
    meta: &Metadata,
    image_dir: &std::path::Path,
    leave_closed: bool,
    tcp_established: bool,
) -> Result<FdPlan, String> {
    let max_fd = meta.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    let mut cx = Prepare {
        high_base: (max_fd + 1).max(64),
        pipes: pipe::Pipes::default(),
        sockets: socket::Sockets::default(),
        image_dir: image_dir.to_path_buf(),
        tcp_established,
    };
    let mut moves = Vec::new();
    let mut inherit = Vec::new();
    let mut closed = Vec::new();
    for f in &meta.fds {
        let prepared = match &f.kind {
            FdKind::RegularFile(s) => regular_file::prepare(&cx, f, s)?,
            FdKind::Directory(s) => directory::prepare(&cx, f, s)?,
            FdKind::CharDevice(s) => char_device::prepare(&cx, f, s)?,
            FdKind::Pipe(s) => pipe::prepare(&mut cx, f, s)?,
            FdKind::Inherited(s) => inherited::prepare(&cx, f, s)?,
            FdKind::Unsupported(s) => inherited::prepare_unsupported(&cx, f, s, leave_closed)?,
            FdKind::Eventfd(s) => eventfd::prepare(&cx, f, s)?,
            FdKind::Timerfd(s) => timerfd::prepare(&cx, f, s)?,
            FdKind::Signalfd(s) => signalfd::prepare(&cx, f, s)?,
            FdKind::Epoll(s) => epoll::prepare(&cx, f, s)?,
            FdKind::Duplicate(d) => duplicate(&cx, f, d, &moves)?,
            FdKind::Inotify(s) => inotify::prepare(&cx, f, s)?,
            FdKind::Socket(s) => socket::prepare(&mut cx, f, s)?,
            FdKind::DeletedFile(s) => deleted_file::prepare(&cx, f, s, &moves)?,
        };
        match prepared {
            Prepared::At(high) => moves.push((f.fd, high, f.cloexec)),
            Prepared::Inherit => inherit.push(f.fd),
            Prepared::Closed(high) => {
                moves.push((f.fd, high, f.cloexec));
                closed.push(f.fd);
            }
        }
    }
    cx.pipes
        .close_unused(|end| moves.iter().any(|m| m.1 == end));
    epoll::warn_dropped(meta, &closed);
    cx.sockets
        .close_unused(|end| moves.iter().any(|m| m.1 == end));
    Ok(FdPlan {
        moves,
        inherit,
        high_base: cx.high_base,
        closed,
    })
}

/// Closes every descriptor the program did not have (but `keep`, the restorer's own), then
/// puts the prepared ones in place.
pub fn install_fds(plan: &FdPlan, keep: &[RawFd]) {
    let mut open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
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

/// Descriptor `f` is the same open file as the program's `d.of`, prepared before it (a lower
/// number): one more descriptor of what that one became.
fn duplicate(
    cx: &Prepare,
    f: &FdState,
    d: &Duplicate,
    moves: &[(RawFd, RawFd, bool)],
) -> Result<Prepared, String> {
    let Some(&(_, high, _)) = moves.iter().find(|m| m.0 == d.of) else {
        return Err(format!(
            "descriptor {} is a duplicate of descriptor {}, which the image does not rebuild",
            f.fd, d.of
        ));
    };
    // SAFETY: duplicates our own descriptor onto a spare number.
    let fd = unsafe { libc::fcntl(high, libc::F_DUPFD_CLOEXEC, cx.high_base) };
    if fd < 0 {
        return Err(os_error(f, "cannot duplicate a descriptor"));
    }
    Ok(Prepared::At(fd))
}

/// `what` about descriptor `f`, with the system's reason (`errno`): one line.
pub fn os_error(f: &FdState, what: &str) -> String {
    format!(
        "{what} (descriptor {} of the program): {}",
        f.fd,
        std::io::Error::last_os_error()
    )
}

/// Duplicates `fd` onto the lowest free number at or above `base` and closes the original.
pub fn move_high(fd: RawFd, base: RawFd) -> Result<RawFd, String> {
    // SAFETY: fcntl on a descriptor this process owns.
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
