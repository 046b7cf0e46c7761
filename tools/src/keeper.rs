//! `snapshim checkpoint --kill`: the killed program's live TCP connections are kept until the
//! restore asks for them.
//!
//! A connection the shim captured alive for the program's last checkpoint is left in repair
//! mode, behind a filter that drops every packet (shim/src/objects/socket/repair.rs). Closed
//! with the program, it would go without a word, but the peer's next packet (a retransmission,
//! a window update once it reads) would then find no socket on the port and be answered with a
//! reset. So before the program is killed, [`take`] duplicates each such socket out of it
//! (`pidfd_getfd`), and [`spawn`] hands them to a keeper, `snapshim keep-tcp FD...` ([`run`]):
//!
//! ```text
//!  snapshim checkpoint --kill          program (held parked)        keeper (own process group)
//!  reply "ok ... stopping=1" <──────── image committed
//!  pidfd_getfd each socket in repair mode
//!  SIGKILL ──────────────────────────▶ gone; its sockets stay open
//!  spawn keep-tcp FD... ────────────────────────────────────────────▶ listens on
//!                                                                    @snapshim-tcp-keeper-INODE
//!  snapshim-restore, per connection: connect there ─────────────────▶ hands its socket over
//!    receives it ◀───────────────────────────────────────────────────── (SCM_RIGHTS), closes it
//!    builds its own up to the bind, closes the original (silent in repair mode), connects
//! ```
//!
//! The keeper gives up after [`KEEP_FOR`]: the connections then close, silently too, and the
//! peer's next packet gets a reset.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::linux::net::SocketAddrExt;

use snapshim_image::objects::socket::keeper_name;

use crate::failure::{Failure, Result};

/// How long the keeper keeps connections nobody restores.
pub const KEEP_FOR: Duration = Duration::from_secs(600);
const TCP_REPAIR_WINDOW: i32 = 29;

/// Our own descriptors of the sockets of `pid` that are in repair mode (the kernel answers
/// `TCP_REPAIR_WINDOW` only for those). Sockets we may not take are left out.
pub fn take(pid: i32, pidfd: &OwnedFd) -> Vec<OwnedFd> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    for e in entries.flatten() {
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:["));
        let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd takes plain values and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: a descriptor the kernel just gave us, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        if in_repair_mode(fd.as_raw_fd()) {
            kept.push(fd);
        }
    }
    kept
}

fn in_repair_mode(fd: RawFd) -> bool {
    let mut w = [0u8; 20];
    let mut len = w.len() as libc::socklen_t;
    // SAFETY: w and len are valid out-pointers of the sizes given.
    unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            w.as_mut_ptr().cast(),
            &mut len,
        ) == 0
    }
}

/// Starts the keeper with `held` (inherited), in a process group of its own, its standard
/// input and error on /dev/null; returns once it listens (it then closes its standard output,
/// a pipe to us), so that a restore started right after finds it.
pub fn spawn(held: Vec<OwnedFd>) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::op(format!("cannot find our own executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("keep-tcp");
    for fd in &held {
        // SAFETY: F_SETFD on our own descriptor: the keeper inherits it.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
        cmd.arg(fd.as_raw_fd().to_string());
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Failure::op(format!("cannot start the connection keeper: {e}")))?;
    drop(held);
    // End of file once it listens (or if it died).
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut out, &mut Vec::new());
    }
    Ok(())
}

/// `snapshim keep-tcp FD...`: keeps each socket until a restore connects to its keeper name,
/// or [`KEEP_FOR`] has passed.
pub fn run(fds: &[RawFd]) -> Result<()> {
    let mut kept: Vec<(OwnedFd, OwnedFd)> = Vec::new();
    for &fd in fds {
        // SAFETY: the descriptors named on our command line were inherited for us to own.
        let held = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(listener) = listen_for(&held) {
            kept.push((held, listener));
        }
    }
    // Listening: the end of our standard output tells `spawn`.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        // SAFETY: dup2 of our own descriptor onto standard output.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    let until = Instant::now() + KEEP_FOR;
    while !kept.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfds: Vec<libc::pollfd> = kept
            .iter()
            .map(|(_, l)| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfds is a valid array of its length.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        for i in (0..pfds.len()).rev() {
            if pfds[i].revents != 0 {
                let (held, listener) = kept.remove(i);
                // SAFETY: accept on our listener; the caller waits for our end of file.
                let c = unsafe {
                    libc::accept(
                        listener.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                };
                if c >= 0 {
                    hand_over(c, held.as_raw_fd());
                }
                // Ours first, then the connection: its end of file tells the restore that
                // the socket it received is the last reference.
                drop(held);
                if c >= 0 {
                    // SAFETY: the accepted connection, ours.
                    unsafe { libc::close(c) };
                }
            }
        }
    }
    Ok(())
}

/// Sends `held` over the connection `c` (`SCM_RIGHTS`, with one byte): the restore closes it
/// at the last moment, right before its own socket takes the connection over.
fn hand_over(c: RawFd, held: RawFd) {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // CMSG_SPACE(sizeof(int)) is 24 on x86_64; u64 keeps it aligned.
    let mut control = [0u64; 3];
    // SAFETY: a zeroed msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg's control buffer holds one cmsghdr and one int; CMSG_* walk within it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), held);
        libc::sendmsg(c, &msg, libc::MSG_NOSIGNAL);
    }
}

/// A listener on the keeper name of `held`'s socket (its inode).
fn listen_for(held: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: a zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of our descriptor into st.
    if unsafe { libc::fstat(held.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    let name = keeper_name(st.st_ino);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr).ok()?;
    Some(OwnedFd::from(l))
}
