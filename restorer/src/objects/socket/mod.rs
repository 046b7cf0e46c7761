//! Sockets, restore side: each socket is made again on a spare number before anything of the
//! program's is touched, as its [`SocketRole`] says:
//!
//! - `Unbound`, `Bound`, `Listening`: created with its options, bound to the same address
//!   (`addr::bind_again`: a port or socket file someone else holds fails the restore with one
//!   line naming it), listening with the same backlog;
//! - `Connected` (datagram sockets): bound again if it had a name, connected to the same peer;
//!   a socket that does not listen and whose port, taken now, is one the kernel hands out by
//!   itself gets another port, with a warning (`addr::bind_client`);
//! - `Pair`: both ends of a Unix socket pair made by the first of the two descriptors
//!   ([`Sockets`]), each end's queued data sent again through the other end;
//! - `Reset`: a stream connection that cannot go on, made as one that was reset ([`reset`]);
//! - `Established`: with `--tcp-established`, an established TCP connection made again alive
//!   with `TCP_REPAIR` ([`repair`]); without it, reset like `Reset`;
//! - `Refused`: the restore fails naming the descriptor.
//!
//! The descriptor's status flags (`O_NONBLOCK`) are set last.

pub mod addr;
pub mod repair;
pub mod reset;

use std::os::fd::RawFd;

use snapshim_image::{FdState, Socket, SocketRole};

use super::{move_high, status_flags, Prepare, Prepared};

/// The sockets made so far: every one by its id (a socket the program had on two numbers is
/// made once), and both ends of each Unix socket pair from the moment its first end is made.
#[derive(Default)]
pub struct Sockets {
    made: Vec<(u64, RawFd)>,
    pair_ends: Vec<(u64, RawFd)>,
}

impl Sockets {
    /// Closes the pair ends that no descriptor of the program became (`used`).
    pub fn close_unused(&self, used: impl Fn(RawFd) -> bool) {
        for &(_, fd) in &self.pair_ends {
            if !used(fd) {
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(fd) };
            }
        }
    }
}

pub fn prepare(cx: &mut Prepare, f: &FdState, s: &Socket) -> Result<Prepared, String> {
    let what = addr::describe(s, if s.local.len() > 2 { &s.local } else { &s.peer });
    let fail = |why: String| format!("cannot restore descriptor {} ({what}): {why}", f.fd);
    if let Some(&(_, fd)) = cx.sockets.made.iter().find(|m| m.0 == s.id) {
        return Ok(Prepared::At(fd));
    }
    // A connection `snapshim checkpoint --kill` kept: alive, it is closed at the last moment
    // (`repair::restore`); reset, at once.
    let original = match s.role {
        SocketRole::Established { .. } => repair::take_from_keeper(s.id),
        _ => None,
    };
    let fd = match &s.role {
        SocketRole::Refused { why } => return Err(fail(why.clone())),
        SocketRole::Pair { peer, queued } => pair_end(cx, s, *peer, queued).map_err(fail)?,
        SocketRole::Established { repair } if cx.tcp_established => move_high(
            repair::restore(s, repair, original).map_err(fail)?,
            cx.high_base,
        )?,
        SocketRole::Reset | SocketRole::Established { .. } => {
            drop(original);
            move_high(reset::reset(s).map_err(fail)?, cx.high_base)?
        }
        role => {
            let fd = create(s.family, s.sock_type, s.protocol).map_err(fail)?;
            let made = set_options(fd, s).and_then(|()| connect_as(fd, s, role, f.fd));
            if let Err(why) = made {
                // SAFETY: our own socket, abandoned.
                unsafe { libc::close(fd) };
                return Err(fail(why));
            }
            move_high(fd, cx.high_base)?
        }
    };
    // SAFETY: F_SETFL on our descriptor (O_NONBLOCK and friends).
    unsafe { libc::fcntl(fd, libc::F_SETFL, status_flags(f)) };
    cx.sockets.made.push((s.id, fd));
    Ok(Prepared::At(fd))
}

/// Binds, listens or connects a fresh socket as `role` says, for the program's descriptor
/// `number`.
fn connect_as(fd: RawFd, s: &Socket, role: &SocketRole, number: RawFd) -> Result<(), String> {
    let bind_client = || match addr::bind_client(fd, s)? {
        true => {
            eprintln!(
                "snapshim-restore: warning: descriptor {number} ({}): the port is taken, another \
                 one is used",
                addr::describe(s, &s.local)
            );
            Ok(())
        }
        false => Ok(()),
    };
    let named = match s.family {
        libc::AF_INET | libc::AF_INET6 => addr::port(&s.local) != 0,
        _ => s.local.len() > 2,
    };
    match role {
        SocketRole::Bound => bind_client(),
        SocketRole::Listening { backlog } => {
            addr::bind_again(fd, s)?;
            // SAFETY: listen on our own bound socket.
            match unsafe { libc::listen(fd, *backlog as i32) } {
                0 => Ok(()),
                _ => Err(format!(
                    "cannot listen: {}",
                    std::io::Error::last_os_error()
                )),
            }
        }
        SocketRole::Connected => {
            if named {
                bind_client()?;
            }
            addr::sockaddr_call(libc::connect, fd, &s.peer).map_err(|e| {
                format!(
                    "cannot connect again to {}: {e}",
                    addr::describe(s, &s.peer)
                )
            })
        }
        _ => Ok(()),
    }
}

/// `socket(family, type | SOCK_CLOEXEC, protocol)`.
pub fn create(family: i32, sock_type: i32, protocol: i32) -> Result<RawFd, String> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(family, sock_type | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(format!(
            "cannot create the socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// A Unix socket pair of `sock_type`, close-on-exec.
pub fn pair(sock_type: i32) -> Result<[RawFd; 2], String> {
    let mut ends = [0; 2];
    // SAFETY: ends is a valid out-array of two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            sock_type | libc::SOCK_CLOEXEC,
            0,
            ends.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot create a socket pair: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(ends)
}

/// Sets each saved option that differs from the fresh socket's. The kernel doubles what is
/// asked of `SO_RCVBUF`/`SO_SNDBUF` (and reports the double), so half is asked. An option
/// this kernel refuses is a warning, not a failure.
fn set_options(fd: RawFd, s: &Socket) -> Result<(), String> {
    for o in &s.options {
        let mut now = [0u8; 16];
        let mut len = now.len() as libc::socklen_t;
        // SAFETY: now and len are valid out-pointers of the sizes given.
        let r = unsafe { libc::getsockopt(fd, o.level, o.name, now.as_mut_ptr().cast(), &mut len) };
        if r == 0 && now[..len as usize] == o.value[..] {
            continue;
        }
        let mut value = o.value.clone();
        if o.level == libc::SOL_SOCKET && [libc::SO_RCVBUF, libc::SO_SNDBUF].contains(&o.name) {
            let v = i32::from_ne_bytes(value[..4].try_into().unwrap_or([0; 4])) / 2;
            value[..4].copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: the option's bytes as getsockopt gave them, with their length.
        let r = unsafe {
            libc::setsockopt(
                fd,
                o.level,
                o.name,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            eprintln!(
                "snapshim-restore: warning: socket option {}/{} not set again: {}",
                o.level,
                o.name,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// One end of a Unix socket pair: the first end made creates both; each end's queued data is
/// sent through the other end.
fn pair_end(cx: &mut Prepare, s: &Socket, peer: u64, queued: &[Vec<u8>]) -> Result<RawFd, String> {
    let find = |sockets: &Sockets, id| sockets.pair_ends.iter().find(|p| p.0 == id).map(|p| p.1);
    if find(&cx.sockets, s.id).is_none() {
        let ends = pair(s.sock_type)?;
        let a = move_high(ends[0], cx.high_base)?;
        let b = move_high(ends[1], cx.high_base)?;
        cx.sockets.pair_ends.push((s.id, a));
        cx.sockets.pair_ends.push((peer, b));
    }
    let (mine, other) = (find(&cx.sockets, s.id), find(&cx.sockets, peer));
    let (Some(mine), Some(other)) = (mine, other) else {
        return Err("its peer is not the other end of its pair".into());
    };
    set_options(mine, s)?;
    for piece in queued {
        // SAFETY: sending our saved bytes through our own socket.
        let n = unsafe {
            libc::send(
                other,
                piece.as_ptr().cast(),
                piece.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n != piece.len() as isize {
            return Err(format!(
                "cannot queue its {} bytes again: {}",
                piece.len(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(mine)
}
