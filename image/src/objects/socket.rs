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
}
