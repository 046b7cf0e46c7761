//! Sockets, capture side. Each socket descriptor is described by what the kernel answers about
//! it (`getsockopt` for its family, type, protocol and options; `getsockname`, `getpeername`;
//! the socket diagnostics for the backlog and a Unix socket's peer, see [`diag`]), and given the
//! role the restore plays for it (`SocketRole`): listening and bound sockets are bound again,
//! datagram sockets connected outside reconnect, Unix sockets with both ends in the program
//! become a pair again with their queued data ([`queue`]), stream connections to the outside
//! come back reset, or with `SNAPSHIM_TCP_ESTABLISHED` established TCP connections are captured
//! alive ([`repair`]).
//!
//! Runs in the writer while every other thread is parked: raw system calls, scratch
//! allocation, nothing that changes a socket's state for the program (queued data is peeked).
#![allow(unsafe_code)]

pub mod diag;
pub mod queue;
pub mod repair;

use alloc::vec::Vec;

use snapshim_image::{FdKind, FdState, Inherited, SockOpt, Socket, SocketRole};

use crate::sys::{self, sc};
use diag::Diag;

/// The options saved for every socket, for IP sockets, for TCP and for IPv6.
const SOCKET_OPTIONS: &[i32] = &[
    libc::SO_REUSEADDR,
    libc::SO_REUSEPORT,
    libc::SO_KEEPALIVE,
    libc::SO_RCVBUF,
    libc::SO_SNDBUF,
    libc::SO_BROADCAST,
    libc::SO_LINGER,
    libc::SO_OOBINLINE,
    libc::SO_RCVLOWAT,
    libc::SO_RCVTIMEO,
    libc::SO_SNDTIMEO,
    libc::SO_PASSCRED,
    libc::SO_PRIORITY,
];
const IP_OPTIONS: &[i32] = &[libc::IP_TOS, libc::IP_FREEBIND];
const IPV6_OPTIONS: &[i32] = &[libc::IPV6_V6ONLY, libc::IPV6_TCLASS];
const TCP_OPTIONS: &[i32] = &[
    libc::TCP_NODELAY,
    libc::TCP_KEEPIDLE,
    libc::TCP_KEEPINTVL,
    libc::TCP_KEEPCNT,
    libc::TCP_DEFER_ACCEPT,
    libc::TCP_USER_TIMEOUT,
    libc::TCP_FASTOPEN,
];

/// One socket descriptor. A Unix socket connected to another gets its final role from
/// [`pair_up`], once every descriptor is known.
pub fn capture(fd: i32, st: &libc::stat, diag: &mut Option<Diag>) -> FdKind {
    let diag = diag.get_or_insert_with(Diag::collect);
    let family = int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
    let sock_type = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
    let protocol = int_opt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(0);
    let listening = int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    let local = name(fd, libc::SYS_getsockname);
    let peer = name(fd, libc::SYS_getpeername);
    let info = match family {
        libc::AF_UNIX => diag.unix(st.st_ino),
        _ => diag.inet(st.st_ino),
    };
    let tcp = sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP;
    let role = match family {
        libc::AF_UNIX | libc::AF_INET | libc::AF_INET6
            if listening && (tcp || family == libc::AF_UNIX) =>
        {
            match info.backlog {
                Some(backlog) => SocketRole::Listening { backlog },
                None => refused("its listen backlog is unknown (no socket diagnostics)"),
            }
        }
        libc::AF_INET | libc::AF_INET6 => inet_role(fd, sock_type, protocol, &local, &peer),
        libc::AF_UNIX if info.peer != 0 => SocketRole::Pair {
            peer: info.peer,
            queued: Vec::new(),
        },
        libc::AF_UNIX if !peer.is_empty() && !diag.available() => {
            refused("its peer is unknown (no socket diagnostics)")
        }
        libc::AF_UNIX | libc::AF_NETLINK if local.len() > 2 => SocketRole::Bound,
        libc::AF_UNIX | libc::AF_NETLINK => SocketRole::Unbound,
        _ => refused("sockets of this family are not restored"),
    };
    FdKind::Socket(Socket {
        id: st.st_ino,
        family,
        sock_type,
        protocol,
        local,
        peer,
        options: options(fd, family, sock_type, protocol),
        role,
    })
}

fn refused(why: &str) -> SocketRole {
    SocketRole::Refused { why: why.into() }
}

/// TCP and UDP: a TCP connection comes back reset (or alive: [`repair`]); a connected UDP
/// socket reconnects.
fn inet_role(fd: i32, sock_type: i32, protocol: i32, local: &[u8], peer: &[u8]) -> SocketRole {
    let port = local
        .get(2..4)
        .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
    let tcp = (sock_type, protocol) == (libc::SOCK_STREAM, libc::IPPROTO_TCP);
    let udp = (sock_type, protocol) == (libc::SOCK_DGRAM, libc::IPPROTO_UDP);
    match () {
        _ if tcp && !peer.is_empty() => match repair::capture(fd) {
            Some(repair) => SocketRole::Established { repair },
            None => SocketRole::Reset,
        },
        _ if tcp && was_connected(fd) => SocketRole::Reset,
        _ if udp && !peer.is_empty() => SocketRole::Connected,
        _ if (tcp || udp) && port != 0 => SocketRole::Bound,
        _ if tcp || udp => SocketRole::Unbound,
        _ => refused("only TCP and UDP sockets of the IP families are restored"),
    }
}

/// Whether a TCP socket without a peer was connected once, or is connecting: not closed, or
/// closed after segments went through (a connection that was reset and not closed yet; its
/// port is not its own any more, so binding it again would be wrong).
fn was_connected(fd: i32) -> bool {
    let mut info = [0u8; 232];
    let mut len: u32 = info.len() as u32;
    // SAFETY: info and len are valid out-pointers of the sizes given.
    let r = unsafe {
        sc!(
            libc::SYS_getsockopt,
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr(),
            &mut len as *mut u32
        )
    };
    if sys::check(r).is_err() || len < 144 {
        return false;
    }
    const TCP_CLOSE: u8 = 7;
    let word = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    // struct tcp_info: tcpi_state at 0, tcpi_segs_out at 136, tcpi_segs_in at 140.
    info[0] != TCP_CLOSE || word(136) + word(140) > 0
}

/// Settles the role of each connected Unix socket now that every descriptor is known: a peer
/// in the program makes a pair (its queued data saved); a datagram socket connected to a
/// named socket elsewhere reconnects; a stream to elsewhere comes back ended (or, on 0-2, is
/// inherited from whoever restores).
pub fn pair_up(out: &mut [FdState]) {
    let ids: Vec<(u64, u64)> = out.iter().filter_map(|f| socket_ids(&f.kind)).collect();
    for f in out.iter_mut() {
        let FdKind::Socket(s) = &mut f.kind else {
            continue;
        };
        let SocketRole::Pair { peer, .. } = s.role else {
            continue;
        };
        let peer_of_peer = ids.iter().find(|i| i.0 == peer).map(|i| i.1);
        s.role = if peer_of_peer == Some(s.id) {
            match queue::peek_all(f.fd) {
                Ok(queued) => SocketRole::Pair { peer, queued },
                Err(why) => refused(why),
            }
        } else if peer_of_peer.is_some() {
            refused("it is connected to another socket of the program that is not its pair")
        } else if s.sock_type == libc::SOCK_DGRAM && s.peer.len() > 2 {
            SocketRole::Connected
        } else if f.fd <= 2 {
            f.kind = FdKind::Inherited(Inherited {
                desc: alloc::format!("socket:[{}]", s.id),
            });
            continue;
        } else {
            SocketRole::Reset
        };
    }
    for f in out.iter_mut() {
        let FdKind::Socket(s) = &mut f.kind else {
            continue;
        };
        if f.fd <= 2 && s.role == SocketRole::Reset {
            f.kind = FdKind::Inherited(Inherited {
                desc: alloc::format!("socket:[{}]", s.id),
            });
        }
    }
}

/// A socket's id and, for a Unix socket connected to another, its peer's (else 0).
fn socket_ids(k: &FdKind) -> Option<(u64, u64)> {
    match k {
        FdKind::Socket(s) => match s.role {
            SocketRole::Pair { peer, .. } => Some((s.id, peer)),
            _ => Some((s.id, 0)),
        },
        _ => None,
    }
}

/// `getsockopt` of an `int` option.
fn int_opt(fd: i32, level: i32, name: i32) -> Option<i32> {
    let v = raw_opt(fd, level, name)?;
    Some(i32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
}

/// `getsockopt` into a buffer large enough for every option saved (a `timeval` is 16 bytes).
fn raw_opt(fd: i32, level: i32, name: i32) -> Option<Vec<u8>> {
    let mut v = alloc::vec![0u8; 16];
    let mut len: u32 = v.len() as u32;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    let r = unsafe {
        sc!(
            libc::SYS_getsockopt,
            fd,
            level,
            name,
            v.as_mut_ptr(),
            &mut len as *mut u32
        )
    };
    sys::check(r).ok()?;
    v.truncate(len as usize);
    (v.len() >= 4).then_some(v)
}

/// The options of [`SOCKET_OPTIONS`] and those of its family and protocol that it answers.
fn options(fd: i32, family: i32, sock_type: i32, protocol: i32) -> Vec<SockOpt> {
    let mut lists: Vec<(i32, &[i32])> = alloc::vec![(libc::SOL_SOCKET, SOCKET_OPTIONS)];
    match family {
        libc::AF_INET => lists.push((libc::IPPROTO_IP, IP_OPTIONS)),
        libc::AF_INET6 => lists.push((libc::IPPROTO_IPV6, IPV6_OPTIONS)),
        _ => {}
    }
    let ip = family == libc::AF_INET || family == libc::AF_INET6;
    if ip && sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP {
        lists.push((libc::IPPROTO_TCP, TCP_OPTIONS));
    }
    let mut out = Vec::new();
    for (level, names) in lists {
        for &name in names {
            if let Some(value) = raw_opt(fd, level, name) {
                out.push(SockOpt { level, name, value });
            }
        }
    }
    out
}

/// `getsockname` or `getpeername` (`nr`): the raw address, empty if there is none.
fn name(fd: i32, nr: i64) -> Vec<u8> {
    let mut v = alloc::vec![0u8; core::mem::size_of::<libc::sockaddr_storage>()];
    let mut len: u32 = v.len() as u32;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    let r = unsafe { sc!(nr, fd, v.as_mut_ptr(), &mut len as *mut u32) };
    if sys::check(r).is_err() {
        return Vec::new();
    }
    v.truncate((len as usize).min(v.len()));
    v
}

/// Whether the program serves clients, whose requests must not wait long during a checkpoint:
/// it listens on a socket, or has an IP socket bound or connected (a UDP server, a TCP
/// connection).
pub fn serves_clients(fds: &[FdState]) -> bool {
    fds.iter().any(|f| match &f.kind {
        FdKind::Socket(s) => match s.role {
            SocketRole::Listening { .. } => true,
            SocketRole::Unbound | SocketRole::Refused { .. } | SocketRole::Pair { .. } => false,
            _ => s.family == libc::AF_INET || s.family == libc::AF_INET6,
        },
        _ => false,
    })
}
