//! Group checkpoints, member side: several programs checkpointed at one instant
//! (`snapshim checkpoint --group NAME`, whose half is tools/src/group.rs).
//!
//! ```text
//!  coordinator (snapshim checkpoint --group)        member (this helper)
//!  listen on @snapshim-group:<token>
//!  sigqueue(member, quiesce signal,  ───────────►  handler: Record::Group(token) into the wake
//!           GROUP_BIT | token << 32)                  pipe, whatever si_pid is
//!                                                   helper: create the image file, prepare
//!                                  ◄───────────── connect, "ready\n"        (still running)
//!  every member ready: "stop\n"    ───────────►   quiesce
//!                                  ◄───────────── "parked\n"               (threads parked)
//!  every member parked: "go\n"     ───────────►   capture, protect, resume, flush, commit
//!                                  ◄───────────── "ok path=... paused_at_ns=... released_at_ns=...\n"
//!                                                  or "err ...\n"; close
//! ```
//!
//! `ready` comes before the pause, so that no member waits stopped while another creates its
//! image file or write-protects its memory: the pauses start together, on `stop`. Anything
//! but `stop` or `go` (the coordinator closed the connection, a member failed or died,
//! [`GO_WAIT_MS`] passed) calls this member's checkpoint off, before its pause or while its
//! threads are still parked: nothing is captured, nothing committed, and the program runs on
//! as if no checkpoint had been asked.
//!
//! The connection is the helper's own: it is left out of the image (`capture.rs`), and a
//! restored process forgets its number without closing it (the descriptor was never restored,
//! so that number may be the program's). Raw system calls only: the threads are parked, maybe
//! in malloc.
#![allow(unsafe_code)]

use alloc::string::String;
use core::sync::atomic::{AtomicI32, AtomicU64, Ordering::*};

use snapshim_image::settings::{
    group_socket_name, GROUP_GO, GROUP_PARKED, GROUP_READY, GROUP_STOP,
};

use crate::sys::{self, sc};

/// How long a member waits for `stop` or `go` before it calls its checkpoint off.
pub const GO_WAIT_MS: u64 = 30_000;

/// The connection to the coordinator, from [`meet`] to [`answer`]; -1 without one.
static CONN: AtomicI32 = AtomicI32::new(-1);
/// When the pause began (monotonic ns), for the times the answer reports.
static PAUSE_T0: AtomicU64 = AtomicU64::new(0);

/// The connection's descriptor, which the image leaves out; -1 without one.
pub fn own_fd() -> i32 {
    CONN.load(Relaxed)
}

/// Before the pause, everything prepared: tells the coordinator with `token` that this member
/// is ready and waits for `stop`. Err: the checkpoint is called off, with why.
pub fn ready(token: u32) -> Result<(), String> {
    let fd = connect(token)
        .map_err(|e| off(alloc::format!("cannot reach the coordinator: errno {e}")))?;
    CONN.store(fd, Relaxed);
    say(fd, GROUP_READY, GROUP_STOP)
}

/// With every thread parked (the pause began at `t0`): tells the coordinator and waits for
/// `go`. Err: the checkpoint is called off, with why.
pub fn meet(t0: u64) -> Result<(), String> {
    PAUSE_T0.store(t0, Relaxed);
    say(CONN.load(Relaxed), GROUP_PARKED, GROUP_GO)
}

/// Writes `line` on the connection `fd` and waits for `answer`; on failure closes it.
fn say(fd: i32, line: &[u8], answer: &[u8]) -> Result<(), String> {
    let r = send(fd, line)
        .map_err(|e| alloc::format!("cannot write to the coordinator: errno {e}"))
        .and_then(|()| wait_for(fd, answer));
    if let Err(why) = r {
        CONN.store(-1, Relaxed);
        sys::close(fd);
        return Err(off(why));
    }
    Ok(())
}

fn off(why: String) -> String {
    alloc::format!("the group checkpoint was called off: {why}")
}

/// Reads what the coordinator says next: Ok if it is `want`.
fn wait_for(fd: i32, want: &[u8]) -> Result<(), String> {
    let deadline = sys::monotonic_ns() + GO_WAIT_MS * 1_000_000;
    let mut got = [0u8; 8];
    let mut n = 0;
    while n < want.len() {
        let left_ms = deadline.saturating_sub(sys::monotonic_ns()) / 1_000_000;
        if left_ms == 0 {
            return Err(alloc::format!(
                "no word from the coordinator within {} s",
                GO_WAIT_MS / 1000
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { sc!(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, left_ms) };
        if r <= 0 {
            continue;
        }
        match sys::read(fd, &mut got[n..want.len()]) {
            Ok(0) => {
                return Err(
                    "the coordinator ended it (another member failed or is gone, or it gave up)"
                        .into(),
                )
            }
            Ok(k) => n += k,
            Err(libc::EINTR) => {}
            Err(e) => {
                return Err(alloc::format!(
                    "cannot read from the coordinator: errno {e}"
                ))
            }
        }
    }
    if got[..n] != *want {
        return Err(alloc::format!(
            "the coordinator said {:?} instead of {:?}",
            String::from_utf8_lossy(&got[..n]),
            String::from_utf8_lossy(want).trim_end()
        ));
    }
    Ok(())
}

/// After the checkpoint: writes its outcome `line` (`ok ...\n` or `err ...\n`) to the
/// coordinator with `token`, and closes the connection. A committed checkpoint's line gets the
/// pause's start and end (`CLOCK_REALTIME` ns, which every namespace shares) so that the
/// coordinator can tell the whole group's pause. A member that failed before it met the
/// coordinator connects to say why, so the coordinator need not wait for it.
pub fn answer(token: u32, line: &str, pause_ns: Option<u64>) {
    let mut fd = CONN.swap(-1, Relaxed);
    if fd < 0 {
        match connect(token) {
            Ok(c) => fd = c,
            Err(_) => return,
        }
    }
    let text = match pause_ns {
        Some(p) => {
            let t0 = PAUSE_T0.load(Relaxed);
            alloc::format!(
                "{} paused_at_ns={} released_at_ns={}\n",
                line.trim_end(),
                realtime_of(t0),
                realtime_of(t0 + p)
            )
        }
        None => String::from(line),
    };
    let _ = send(fd, text.as_bytes());
    sys::close(fd);
}

/// In a restored process: the connection was the original's, and is not in this one.
pub fn forget() {
    CONN.store(-1, Relaxed);
}

/// `CLOCK_REALTIME` at the monotonic instant `mono_ns` (in the past).
fn realtime_of(mono_ns: u64) -> u64 {
    let ago = sys::monotonic_ns().saturating_sub(mono_ns);
    sys::clock_ns(libc::CLOCK_REALTIME).saturating_sub(ago)
}

/// A Unix stream socket connected to the coordinator's abstract name.
fn connect(token: u32) -> sys::Result<i32> {
    let name = group_socket_name(token);
    // SAFETY: a zeroed sockaddr_un is valid; the name fits (it is short).
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    // sun_path[0] stays 0: an abstract name.
    for (d, &b) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *d = b as libc::c_char;
    }
    let len = core::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: plain values.
    let fd = sys::check(unsafe {
        sc!(
            libc::SYS_socket,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0
        )
    })? as i32;
    loop {
        // SAFETY: addr is a valid sockaddr_un of at least len bytes.
        let r = unsafe {
            sc!(
                libc::SYS_connect,
                fd,
                &addr as *const libc::sockaddr_un,
                len
            )
        };
        match sys::check(r) {
            Ok(_) => return Ok(fd),
            Err(libc::EINTR) => {}
            Err(e) => {
                sys::close(fd);
                return Err(e);
            }
        }
    }
}

/// Writes all of `buf` on the socket, without SIGPIPE if the coordinator has gone.
fn send(fd: i32, mut buf: &[u8]) -> sys::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice; no address.
        let r = unsafe {
            sc!(
                libc::SYS_sendto,
                fd,
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL,
                0,
                0
            )
        };
        match sys::check(r) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => buf = &buf[n as usize..],
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
