//! What only the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) tell: the backlog a socket
//! listens with, and which socket a Unix socket is connected to (its peer's inode, which is how
//! the two ends of a `socketpair` find each other). One dump of the listening TCP sockets per
//! IP family (a stream of `inet_diag_msg` records), and one request per Unix socket, by inode
//! (one `unix_diag_msg` with its attributes).
#![allow(unsafe_code)]

use alloc::vec::Vec;

use crate::sys::{self, sc};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;

/// What the diagnostics say of one socket.
#[derive(Clone, Copy, Default)]
pub struct Info {
    pub ino: u64,
    /// The listen backlog, for a listening socket.
    pub backlog: Option<u32>,
    /// The inode of the socket a Unix socket is connected to (0: none).
    pub peer: u64,
}

/// The kernel's socket diagnostics: the listening TCP sockets (one dump per IP family, taken
/// at once) and Unix sockets (asked one by one, by inode, so the cost does not grow with the
/// number of Unix sockets on the machine). `nl` is -1 where the kernel refused them.
pub struct Diag {
    nl: i32,
    listeners: Vec<Info>,
}

impl Diag {
    /// Opens the netlink socket (closed when the `Diag` is dropped) and takes the dumps.
    pub fn collect() -> Diag {
        // SAFETY: plain socket creation.
        let nl = unsafe {
            sc!(
                libc::SYS_socket,
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG
            )
        };
        let mut d = Diag {
            nl: sys::check(nl).map_or(-1, |fd| fd as i32),
            listeners: Vec::new(),
        };
        let ok = d.nl >= 0
            && [libc::AF_INET, libc::AF_INET6].iter().all(|&family| {
                exchange(
                    d.nl,
                    &inet_request(family as u8),
                    &mut d.listeners,
                    inet_info,
                )
            });
        if !ok && d.nl >= 0 {
            sys::close(d.nl);
            d.nl = -1;
        }
        d
    }

    /// Whether the kernel answers at all.
    pub fn available(&self) -> bool {
        self.nl >= 0
    }

    /// An IP socket: its backlog if it is a listening TCP socket.
    pub fn inet(&self, ino: u64) -> Info {
        let found = self.listeners.iter().find(|i| i.ino == ino);
        found.copied().unwrap_or(Info {
            ino,
            ..Info::default()
        })
    }

    /// A Unix socket: its peer, and its backlog if it listens.
    pub fn unix(&self, ino: u64) -> Info {
        let mut out = Vec::new();
        if self.nl >= 0 {
            exchange(self.nl, &unix_request(ino as u32), &mut out, unix_info);
        }
        out.first().copied().unwrap_or(Info {
            ino,
            ..Info::default()
        })
    }
}

impl Drop for Diag {
    fn drop(&mut self) {
        if self.nl >= 0 {
            sys::close(self.nl);
        }
    }
}

/// `nlmsghdr` + `inet_diag_req_v2`: the listening TCP sockets of one family.
fn inet_request(family: u8) -> Vec<u8> {
    let mut r = header(16 + 56, libc::NLM_F_DUMP);
    r.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    r.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    r.resize(16 + 56, 0); // inet_diag_sockid: any
    r
}

/// `nlmsghdr` + `unix_diag_req`: the Unix socket `ino`, with its peer and queue lengths.
fn unix_request(ino: u32) -> Vec<u8> {
    let mut r = header(16 + 24, 0);
    r.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    r.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    r.extend_from_slice(&ino.to_ne_bytes());
    r.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    r.extend_from_slice(&[0xff; 8]); // cookie: INET_DIAG_NOCOOKIE, any
    r
}

fn header(len: u32, dump: i32) -> Vec<u8> {
    let mut h = Vec::with_capacity(len as usize);
    h.extend_from_slice(&len.to_ne_bytes());
    h.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | dump) as u16;
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&[0; 8]); // sequence, port id
    h
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_ne_bytes([s[0], s[1]]))
}

/// A listening TCP socket's record (`inet_diag_msg`): for listeners the kernel reports the
/// backlog in `idiag_wqueue`.
fn inet_info(msg: &[u8]) -> Option<Info> {
    Some(Info {
        ino: u32_at(msg, 68) as u64,
        backlog: Some(u32_at(msg, 60)),
        peer: 0,
    })
}

/// A Unix socket's record (`unix_diag_msg` and its attributes): for a listener
/// `UNIX_DIAG_RQLEN`'s second word is the backlog.
fn unix_info(msg: &[u8]) -> Option<Info> {
    let mut info = Info {
        ino: u32_at(msg, 4) as u64,
        ..Info::default()
    };
    let listening = msg.get(2) == Some(&(TCP_LISTEN as u8));
    let mut off = 16;
    while off + 4 <= msg.len() {
        let (len, kind) = (u16_at(msg, off) as usize, u16_at(msg, off + 2));
        if len < 4 {
            break;
        }
        match kind {
            UNIX_DIAG_PEER => info.peer = u32_at(msg, off + 4) as u64,
            UNIX_DIAG_RQLEN if listening => info.backlog = Some(u32_at(msg, off + 8)),
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Some(info)
}

/// Sends one request and reads its answer, each record through `parse`: a dump to its end
/// (`NLMSG_DONE`), a request for one socket to its one record. False if the kernel answered
/// with an error.
fn exchange(nl: i32, req: &[u8], out: &mut Vec<Info>, parse: fn(&[u8]) -> Option<Info>) -> bool {
    let dump = u16_at(req, 6) & libc::NLM_F_DUMP as u16 != 0;
    // SAFETY: a zeroed sockaddr_nl is the kernel's address.
    let mut kernel: libc::sockaddr_nl = unsafe { core::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    let len = core::mem::size_of::<libc::sockaddr_nl>();
    // SAFETY: req and kernel are valid for their lengths.
    let sent = unsafe {
        sc!(
            libc::SYS_sendto,
            nl,
            req.as_ptr(),
            req.len(),
            0,
            &kernel as *const _,
            len
        )
    };
    if sys::check(sent).is_err() {
        return false;
    }
    let mut buf = alloc::vec![0u8; 32 << 10];
    loop {
        let Ok(n) = sys::read(nl, &mut buf) else {
            return false;
        };
        let mut off = 0;
        while off + 16 <= n {
            let (len, kind) = (u32_at(&buf, off) as usize, u16_at(&buf, off + 4));
            if len < 16 || off + len > n {
                return false;
            }
            match kind {
                NLMSG_DONE => return true,
                NLMSG_ERROR => return false,
                _ => out.extend(parse(&buf[off + 16..off + len])),
            }
            if !dump {
                return true;
            }
            off += (len + 3) & !3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `unix_diag_msg` of a listening socket (inode 77) with a `UNIX_DIAG_PEER` (0) and a
    /// `UNIX_DIAG_RQLEN` attribute (2 waiting, backlog 9).
    #[test]
    fn unix_records_give_the_peer_and_backlog() {
        let mut m = vec![libc::AF_UNIX as u8, 1, TCP_LISTEN as u8, 0];
        m.extend_from_slice(&77u32.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        for (kind, payload) in [
            (UNIX_DIAG_PEER, 0u64.to_ne_bytes()[..4].to_vec()),
            (
                UNIX_DIAG_RQLEN,
                [2u32.to_ne_bytes(), 9u32.to_ne_bytes()].concat(),
            ),
        ] {
            m.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&payload);
        }
        let info = unix_info(&m).unwrap();
        assert_eq!((info.ino, info.peer, info.backlog), (77, 0, Some(9)));
        // Connected, not listening: the peer, no backlog.
        m[2] = 1;
        m[20..24].copy_from_slice(&78u32.to_ne_bytes());
        let info = unix_info(&m).unwrap();
        assert_eq!((info.peer, info.backlog), (78, None));
    }

    #[test]
    fn requests_are_the_sizes_the_kernel_expects() {
        let r = unix_request(5);
        assert_eq!(r.len(), 40);
        assert_eq!(u32_at(&r, 0), 40);
        assert_eq!(u16_at(&r, 6), libc::NLM_F_REQUEST as u16);
        assert_eq!(u32_at(&r, 24), 5);
        let r = inet_request(libc::AF_INET6 as u8);
        assert_eq!((r.len(), u32_at(&r, 0)), (72, 72));
        assert_eq!(
            u16_at(&r, 6),
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16
        );
        assert_eq!(u32_at(&r, 20), 1 << TCP_LISTEN);
    }
}
