//! An established TCP connection made again alive (`--tcp-established`), from what the shim
//! captured with `TCP_REPAIR` (`SocketRole::Established`), as CRIU's `sk-tcp` does:
//!
//! ```text
//!  socket(); TCP_REPAIR on                  the kernel sends nothing from here on
//!  TCP_QUEUE_SEQ of each queue              first byte of the receive and send queues
//!  options (as every socket), bind, connect no SYN in repair mode: ESTABLISHED at once
//!  TCP_REPAIR_OPTIONS, TCP_TIMESTAMP        mss, window scales, SACK, timestamps, ts clock
//!  receive queue (TCP_RECV_QUEUE)           the unread bytes, for the program to read
//!  sent part of the send queue              counted as sent, not acknowledged: the
//!    (TCP_SEND_QUEUE)                       retransmission timer sends them again
//!  TCP_REPAIR_WINDOW, TCP_REPAIR off        a window probe tells the peer we are back
//!  the part never sent, sent normally
//! ```
//!
//! The bind takes the connection's own address and port: a listener of the program on that
//! port is no obstacle (repair mode forces reuse), but the address must be this machine's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use snapshim_image::{Metadata, Socket, SocketRole, TcpRepair};

use super::addr::sockaddr_call;
use super::{create, set_options};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// Before anything changes: with `--tcp-established` and a connection to restore alive, this
/// process must be allowed `TCP_REPAIR` (CAP_NET_ADMIN).
pub fn check_privilege(meta: &Metadata) -> Result<(), String> {
    let any = meta.fds.iter().any(|f| {
        matches!(&f.kind, snapshim_image::FdKind::Socket(s)
            if matches!(s.role, SocketRole::Established { .. }))
    });
    if !any {
        return Ok(());
    }
    let fd = create(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP)?;
    let r = set(fd, TCP_REPAIR, &1i32.to_ne_bytes());
    // SAFETY: our probe socket.
    unsafe { libc::close(fd) };
    r.map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => "cannot restore TCP connections alive (--tcp-established): \
                              TCP_REPAIR needs CAP_NET_ADMIN, which this restore does not have"
            .to_string(),
        _ => format!("cannot restore TCP connections alive (--tcp-established): TCP_REPAIR: {e}"),
    })
}

/// If `snapshim checkpoint --kill` keeps the original connection `id` (see tools/src/keeper.rs),
/// takes it from the keeper (`SCM_RIGHTS`): ours from then on, to close (silently: it is in
/// repair mode) at the last moment before the connection is taken over, since from its close
/// until the new socket is connected the peer's packets find no socket and are answered with a
/// reset.
pub fn take_from_keeper(id: u64) -> Option<OwnedFd> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};
    let name = snapshim_image::objects::socket::keeper_name(id);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).ok()?;
    let mut c = UnixStream::connect_addr(&addr).ok()?;
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let original = receive_fd(c.as_raw_fd());
    // End of file once the keeper has closed its own descriptor of it: ours is the last, and
    // closing it ends the original at once.
    let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
    original
}

/// One descriptor sent with `SCM_RIGHTS` on `c`.
fn receive_fd(c: RawFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at valid buffers of the lengths it gives.
    if unsafe { libc::recvmsg(c, &mut msg, libc::MSG_CMSG_CLOEXEC) } <= 0 {
        return None;
    }
    // SAFETY: the kernel filled the control buffer; CMSG_* walk within msg_controllen.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return None;
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Some(OwnedFd::from_raw_fd(fd))
    }
}

/// A socket holding the connection `s` as `r` describes it; `original`, the killed program's
/// socket taken from the keeper, is closed right before the connection is taken over.
pub fn restore(s: &Socket, r: &TcpRepair, original: Option<OwnedFd>) -> Result<RawFd, String> {
    let fd = create(s.family, libc::SOCK_STREAM, libc::IPPROTO_TCP)?;
    match rebuild(fd, s, r, original) {
        Ok(()) => Ok(fd),
        Err(e) => {
            // SAFETY: our own socket, abandoned (in repair mode: closing it sends nothing).
            unsafe { libc::close(fd) };
            Err(format!("cannot restore the connection alive: {e}"))
        }
    }
}

fn rebuild(fd: RawFd, s: &Socket, r: &TcpRepair, original: Option<OwnedFd>) -> Result<(), String> {
    set_int(fd, TCP_REPAIR, 1, "TCP_REPAIR")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    set_int(fd, TCP_QUEUE_SEQ, r.recv_seq as i32, "TCP_QUEUE_SEQ")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    set_int(fd, TCP_QUEUE_SEQ, r.send_seq as i32, "TCP_QUEUE_SEQ")?;
    set_options(fd, s)?;
    // The connection's MSS before `connect`, which sizes segments by it (`tcp_connect_init`);
    // TCP_REPAIR_OPTIONS, after it, would leave the default of 536 in force. The kernel takes
    // at most 32767 here (loopback's is 65483): best effort.
    let _ = set_int(fd, libc::TCP_MAXSEG, r.mss.min(32767) as i32, "TCP_MAXSEG");
    sockaddr_call(libc::bind, fd, &s.local).map_err(|e| format!("cannot bind: {e}"))?;
    drop(original);
    sockaddr_call(libc::connect, fd, &s.peer).map_err(|e| format!("cannot connect: {e}"))?;
    set(fd, TCP_REPAIR_OPTIONS, &repair_options(r)).map_err(|e| why("TCP_REPAIR_OPTIONS", e))?;
    if r.timestamps {
        set_int(fd, TCP_TIMESTAMP, timestamp_now(r) as i32, "TCP_TIMESTAMP")?;
    }
    let sent = r.send_queue.len() - (r.unsent as usize).min(r.send_queue.len());
    make_room(fd, r.recv_queue.len(), r.send_queue.len());
    set_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(fd, &r.recv_queue).map_err(|e| format!("cannot queue the unread bytes: {e}"))?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    send_all(fd, &r.send_queue[..sent]).map_err(|e| format!("cannot queue the sent bytes: {e}"))?;
    set_int(fd, TCP_REPAIR_QUEUE, 0, "TCP_REPAIR_QUEUE")?;
    let window: Vec<u8> = r.window.iter().flat_map(|w| w.to_ne_bytes()).collect();
    set(fd, TCP_REPAIR_WINDOW, &window).map_err(|e| why("TCP_REPAIR_WINDOW", e))?;
    set_int(fd, TCP_REPAIR, 0, "TCP_REPAIR")?;
    send_all(fd, &r.send_queue[sent..]).map_err(|e| format!("cannot send the unsent bytes: {e}"))
}

/// The connection's timestamp clock now: as captured, moved on by the time since (plus a second
/// for clocks set meanwhile). Until the original was killed it may have sent segments (a
/// retransmission, a window probe) stamped later than the capture; the peer drops a segment
/// stamped older than the last it saw (PAWS), so the restored clock must not be behind. Later
/// is harmless: round trips are measured on this clock alone. The lowest bit says microseconds
/// and is kept.
fn timestamp_now(r: &TcpRepair) -> u32 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(r.realtime_ns);
    let elapsed_ns = now.saturating_sub(r.realtime_ns) + 1_000_000_000;
    let ticks = if r.timestamp & 1 != 0 {
        elapsed_ns / 1_000
    } else {
        elapsed_ns / 1_000_000
    };
    r.timestamp.wrapping_add(ticks as u32 & !1)
}

/// `struct tcp_repair_opt` entries (code, value) for `TCP_REPAIR_OPTIONS`.
fn repair_options(r: &TcpRepair) -> Vec<u8> {
    let mut opts = vec![(TCPOPT_MAXSEG, r.mss)];
    if let Some((snd, rcv)) = r.wscale {
        opts.push((TCPOPT_WINDOW, snd as u32 | (rcv as u32) << 16));
    }
    if r.sack {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if r.timestamps {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    opts.iter()
        .flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect()
}

/// A fresh socket's buffers (`tcp_rmem`/`tcp_wmem` defaults) may be smaller than what the
/// connection had queued, which the kernel's autotuning had grown: they are raised to hold it
/// (`SO_*BUFFORCE`, allowed with CAP_NET_ADMIN; the kernel doubles the value asked).
fn make_room(fd: RawFd, recv: usize, send: usize) {
    for (get, force, need) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, recv),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, send),
    ] {
        let mut now = 0i32;
        let mut len = 4 as libc::socklen_t;
        // SAFETY: an int out-value with its size.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                get,
                (&mut now as *mut i32).cast(),
                &mut len,
            )
        };
        let want = (need + (64 << 10)) as i32;
        if need > 0 && now < 2 * want {
            let _ = set_sol(fd, force, want).or_else(|_| set_sol(fd, get, want));
        }
    }
}

fn set_sol(fd: RawFd, name: i32, v: i32) -> Result<(), std::io::Error> {
    // SAFETY: an int option passed by pointer with its size.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, name, (&v as *const i32).cast(), 4) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends every byte of `data` (blocking), in pieces the kernel takes.
fn send_all(fd: RawFd, data: &[u8]) -> Result<(), std::io::Error> {
    let mut off = 0;
    while off < data.len() {
        let piece = &data[off..data.len().min(off + (256 << 10))];
        // SAFETY: sending our saved bytes through our own socket.
        let n = unsafe { libc::send(fd, piece.as_ptr().cast(), piece.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += n as usize;
    }
    Ok(())
}

fn why(what: &str, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

fn set_int(fd: RawFd, name: i32, v: i32, what: &str) -> Result<(), String> {
    set(fd, name, &v.to_ne_bytes()).map_err(|e| why(what, e))
}

/// `setsockopt(fd, IPPROTO_TCP, name, value)`.
fn set(fd: RawFd, name: i32, value: &[u8]) -> Result<(), std::io::Error> {
    // SAFETY: the option's bytes with their length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(b: &[u8]) -> Vec<u32> {
        b.chunks(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn repair_options_are_the_kernels_pairs() {
        let mut r = TcpRepair {
            send_seq: 0,
            recv_seq: 0,
            send_queue: Vec::new(),
            unsent: 0,
            recv_queue: Vec::new(),
            window: [0; 5],
            mss: 1460,
            wscale: Some((7, 9)),
            sack: true,
            timestamps: true,
            timestamp: 0,
            realtime_ns: 0,
        };
        // struct tcp_repair_opt { opt_code, opt_val }: the window option carries the send
        // scale in its low 16 bits and the receive scale in its high ones.
        assert_eq!(
            words(&repair_options(&r)),
            [2, 1460, 3, 7 | 9 << 16, 4, 0, 8, 0]
        );
        r.wscale = None;
        r.sack = false;
        r.timestamps = false;
        assert_eq!(words(&repair_options(&r)), [2, 1460]);
    }

    #[test]
    fn the_timestamp_clock_moves_on_by_the_time_since_the_capture() {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).unwrap();
        let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        let mut r = TcpRepair {
            send_seq: 0,
            recv_seq: 0,
            send_queue: Vec::new(),
            unsent: 0,
            recv_queue: Vec::new(),
            window: [0; 5],
            mss: 1460,
            wscale: None,
            sack: false,
            timestamps: true,
            timestamp: 1_000_000,
            realtime_ns: now_ns - 5_000_000_000,
        };
        // Milliseconds: 5 s since, and the second of margin; the lowest bit stays clear.
        let ms = timestamp_now(&r) - 1_000_000;
        assert!((6_000..7_000).contains(&ms) && ms & 1 == 0, "{ms}");
        // Microseconds (lowest bit set), across the 32-bit wrap.
        r.timestamp = u32::MAX;
        let us = timestamp_now(&r).wrapping_sub(u32::MAX);
        assert!((6_000_000..7_000_000).contains(&us), "{us}");
        assert_eq!(timestamp_now(&r) & 1, 1);
    }
}
