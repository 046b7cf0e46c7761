//! Sockets: what a socket was (family, type, protocol, addresses, options) and what the restore
//! makes of it ([`SocketRole`]).
//!
//! Addresses are kept as the raw `sockaddr` bytes `getsockname`/`getpeername` returned, so the
//! restorer hands them back to `bind`/`connect` unchanged, whatever the family.

use serde::{Deserialize, Serialize};

/// One socket descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Socket {
    /// The socket's inode: the two ends of a pair name each other by it.
    pub id: u64,
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, `AF_NETLINK`...
    pub family: i32,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`, `SOCK_RAW`.
    pub sock_type: i32,
    pub protocol: i32,
    /// Raw `sockaddr` of `getsockname`; empty if the socket has no address of its own.
    pub local: Vec<u8>,
    /// Raw `sockaddr` of `getpeername`; empty if it has no peer.
    pub peer: Vec<u8>,
    /// Options as `getsockopt` returned them; the restorer sets those that differ from a
    /// fresh socket's.
    pub options: Vec<SockOpt>,
    pub role: SocketRole,
}

/// One socket option: `setsockopt(fd, level, name, value)`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockOpt {
    pub level: i32,
    pub name: i32,
    pub value: Vec<u8>,
}

/// What the restore makes of a socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum SocketRole {
    /// Created, never bound: created again.
    Unbound,
    /// Bound to `local`, not listening nor connected: bound again.
    Bound,
    /// Listening on `local`: bound again and listening with the same backlog.
    Listening { backlog: u32 },
    /// Connected to `peer` outside the program (a datagram socket: UDP, a Unix datagram socket
    /// to `/dev/log`): bound to `local` again if it had a name, then connected to `peer`.
    Connected,
    /// A Unix socket whose peer (socket `peer`) is in the program too: the two are made again
    /// as a `socketpair`. `queued` is what waited in this end's receive queue (one entry per
    /// datagram; stream data in one or more pieces), sent again through the other end.
    Pair { peer: u64, queued: Vec<Vec<u8>> },
    /// A stream connection to something outside the program (an established TCP connection, a
    /// Unix stream socket whose peer is elsewhere): it cannot go on, so it comes back as a
    /// connection that was reset (TCP: the next read or write fails with `ECONNRESET`; Unix:
    /// end of file).
    Reset,
    /// Cannot be restored; the restore fails naming the descriptor, with this reason.
    Refused { why: String },
    /// An established TCP connection captured with `TCP_REPAIR` (the program ran with
    /// `SNAPSHIM_TCP_ESTABLISHED=1`): `snapshim-restore --tcp-established` makes it again alive,
    /// with its sequence numbers, window and queued data; without that option it comes back
    /// like [`SocketRole::Reset`]. Appended in format 1.4 (after every older role).
    Established { repair: TcpRepair },
}

/// What `TCP_REPAIR` tells of an established connection, and what the restore hands back to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpRepair {
    /// `TCP_QUEUE_SEQ` of the send queue: the sequence number of its first byte (the oldest
    /// byte not acknowledged).
    pub send_seq: u32,
    /// `TCP_QUEUE_SEQ` of the receive queue: the sequence number after its last byte.
    pub recv_seq: u32,
    /// The send queue (`SIOCOUTQ` bytes, peeked): sent and not acknowledged, then not sent.
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent (`SIOCOUTQNSD`).
    pub unsent: u32,
    /// The receive queue (`SIOCINQ` bytes, peeked): arrived, not read by the program.
    pub recv_queue: Vec<u8>,
    /// `TCP_REPAIR_WINDOW`: `struct tcp_repair_window` (`snd_wl1`, `snd_wnd`, `max_window`,
    /// `rcv_wnd`, `rcv_wup`).
    pub window: [u32; 5],
    /// `TCP_MAXSEG`.
    pub mss: u32,
    /// Window scales from `TCP_INFO` (send, receive), when both sides agreed on scaling.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    pub timestamps: bool,
    /// `TCP_TIMESTAMP`: the connection's timestamp clock (milliseconds, or microseconds when
    /// its lowest bit is set).
    pub timestamp: u32,
    /// CLOCK_REALTIME when `timestamp` was read: the restore moves the clock on by the time
    /// since, so that its timestamps are not older than any the original sent meanwhile.
    pub realtime_ns: u64,
}

/// The abstract Unix socket name on which `snapshim checkpoint --kill` keeps the killed
/// program's connection `id` (a socket inode) open in repair mode until a restore asks for it
/// (connects there), so that the peer's packets meanwhile are dropped instead of answered with
/// a reset by a port without a socket.
pub fn keeper_name(id: u64) -> String {
    format!("snapshim-tcp-keeper-{id}")
}

/// The port of an IP address (0 for other families).
pub fn port(a: &[u8]) -> u16 {
    a.get(2..4).map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
}

/// "TCP 127.0.0.1 port 8080", "UDP ::1 port 53", "Unix socket /run/x.sock",
/// "Unix socket @name", "netlink socket (protocol 0)".
pub fn describe(s: &Socket, a: &[u8]) -> String {
    let proto = if s.sock_type == libc::SOCK_STREAM {
        "TCP"
    } else {
        "UDP"
    };
    match s.family {
        libc::AF_INET if a.len() >= 8 => {
            let ip = std::net::Ipv4Addr::new(a[4], a[5], a[6], a[7]);
            format!("{proto} {ip} port {}", port(a))
        }
        libc::AF_INET6 if a.len() >= 24 => {
            let b: [u8; 16] = a[8..24].try_into().unwrap_or([0; 16]);
            format!("{proto} {} port {}", std::net::Ipv6Addr::from(b), port(a))
        }
        libc::AF_UNIX => match unix_name(a) {
            Some(UnixName::Path(p)) => format!("Unix socket {p}"),
            Some(UnixName::Abstract(n)) => format!("Unix socket @{n}"),
            None => "unnamed Unix socket".into(),
        },
        libc::AF_NETLINK => format!("netlink socket (protocol {})", s.protocol),
        f => format!("socket of family {f}"),
    }
}

pub enum UnixName {
    Path(String),
    Abstract(String),
}

/// The name in a `sockaddr_un`, if it has one.
pub fn unix_name(a: &[u8]) -> Option<UnixName> {
    let name = a.get(2..).filter(|n| !n.is_empty())?;
    if name[0] == 0 {
        return Some(UnixName::Abstract(
            String::from_utf8_lossy(&name[1..]).into(),
        ));
    }
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    Some(UnixName::Path(String::from_utf8_lossy(&name[..end]).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(family: i32, sock_type: i32, local: Vec<u8>) -> Socket {
        Socket {
            id: 1,
            family,
            sock_type,
            protocol: 0,
            local,
            peer: Vec::new(),
            options: Vec::new(),
            role: SocketRole::Bound,
        }
    }

    fn sockaddr_un(name: &[u8]) -> Vec<u8> {
        let mut a = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(name);
        a
    }

    #[test]
    fn addresses_are_named_as_users_know_them() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let s = socket(libc::AF_INET, libc::SOCK_STREAM, v4.clone());
        assert_eq!(port(&v4), 8080);
        assert_eq!(describe(&s, &v4), "TCP 127.0.0.1 port 8080");

        let mut v6 = vec![0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&53u16.to_be_bytes());
        v6[23] = 1;
        let s = socket(libc::AF_INET6, libc::SOCK_DGRAM, v6.clone());
        assert_eq!(describe(&s, &v6), "UDP ::1 port 53");

        let s = socket(libc::AF_UNIX, libc::SOCK_STREAM, Vec::new());
        assert_eq!(
            describe(&s, &sockaddr_un(b"/run/x.sock\0")),
            "Unix socket /run/x.sock"
        );
        assert_eq!(describe(&s, &sockaddr_un(b"\0name")), "Unix socket @name");
        assert_eq!(describe(&s, &sockaddr_un(b"")), "unnamed Unix socket");
        let s = socket(libc::AF_NETLINK, libc::SOCK_RAW, Vec::new());
        assert_eq!(describe(&s, &[]), "netlink socket (protocol 0)");
    }
}
