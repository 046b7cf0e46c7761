//! Socket addresses as the image keeps them (raw `sockaddr` bytes): how they are named in
//! messages, and binding to them again, with a port or socket file taken by someone else
//! reported as such.

use std::io::Error;
use std::os::fd::RawFd;

use snapshim_image::Socket;

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

/// `bind` or `connect` (`call`) to raw address bytes.
pub fn sockaddr_call(
    call: unsafe extern "C" fn(RawFd, *const libc::sockaddr, libc::socklen_t) -> i32,
    fd: RawFd,
    a: &[u8],
) -> Result<(), Error> {
    // SAFETY: a is a sockaddr of its length, as the kernel gave it at the checkpoint.
    let r = unsafe { call(fd, a.as_ptr().cast(), a.len() as libc::socklen_t) };
    if r < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Binds `fd` to the socket's saved address. A TCP socket binds with `SO_REUSEADDR` (a restore
/// on the same machine finds the old connections in TIME_WAIT; a listener there still makes it
/// fail), then gets the program's own setting back. A Unix socket file left by the killed
/// program (nobody accepts on it) is removed first.
pub fn bind_again(fd: RawFd, s: &Socket) -> Result<(), String> {
    let a = &s.local;
    let tcp = s.sock_type == libc::SOCK_STREAM && s.family != libc::AF_UNIX;
    if tcp {
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    }
    let mut r = sockaddr_call(libc::bind, fd, a);
    if s.family == libc::AF_UNIX && in_use(&r) && stale_socket_file(s) {
        r = sockaddr_call(libc::bind, fd, a);
    }
    if s.family == libc::AF_NETLINK && in_use(&r) && a.len() >= 12 {
        let mut any = a.clone();
        any[4..8].copy_from_slice(&0u32.to_ne_bytes()); // nl_pid: let the kernel choose
        r = sockaddr_call(libc::bind, fd, &any);
    }
    if tcp {
        let own = s
            .options
            .iter()
            .find(|o| o.level == libc::SOL_SOCKET && o.name == libc::SO_REUSEADDR);
        let v = own.map_or(0, |o| {
            i32::from_ne_bytes(o.value[..4].try_into().unwrap_or([0; 4]))
        });
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, v);
    }
    r.map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) if s.family == libc::AF_INET || s.family == libc::AF_INET6 => {
            format!("port {} is in use by another program", port(a))
        }
        Some(libc::EADDRINUSE) => "its address is in use by another program".into(),
        _ => format!("cannot bind: {e}"),
    })
}

/// Binds a socket that does not listen (a client's, or a datagram socket's) to its saved
/// address. An IP port in the range the kernel hands out by itself (`ip_local_port_range`: it
/// was most likely not chosen by the program) that someone else holds now is replaced by
/// another one; returns whether it was. Any other port is bound as [`bind_again`] does.
pub fn bind_client(fd: RawFd, s: &Socket) -> Result<bool, String> {
    let ip = s.family == libc::AF_INET || s.family == libc::AF_INET6;
    if !ip || !ephemeral(port(&s.local)) {
        return bind_again(fd, s).map(|()| false);
    }
    match sockaddr_call(libc::bind, fd, &s.local) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            let mut any = s.local.clone();
            any[2..4].copy_from_slice(&[0, 0]);
            sockaddr_call(libc::bind, fd, &any)
                .map(|()| true)
                .map_err(|e| format!("cannot bind: {e}"))
        }
        Err(e) => Err(format!("cannot bind: {e}")),
    }
}

/// Whether `port` is in this machine's `ip_local_port_range`.
fn ephemeral(port: u16) -> bool {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    match (bounds.next(), bounds.next()) {
        (Some(lo), Some(hi)) => (lo..=hi).contains(&port),
        _ => false,
    }
}

fn in_use(r: &Result<(), Error>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE))
}

/// A socket file at the saved path that nobody accepts on any more: removed (true).
fn stale_socket_file(s: &Socket) -> bool {
    let Some(UnixName::Path(path)) = unix_name(&s.local) else {
        return false;
    };
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    // SAFETY: a plain socket, closed below.
    let probe = unsafe { libc::socket(libc::AF_UNIX, s.sock_type | libc::SOCK_CLOEXEC, 0) };
    if !is_socket || probe < 0 {
        return false;
    }
    let refused = matches!(sockaddr_call(libc::connect, probe, &s.local),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED));
    // SAFETY: our probe socket.
    unsafe { libc::close(probe) };
    refused && std::fs::remove_file(&path).is_ok()
}

/// `setsockopt` of an `int` option; failures are the caller's to notice.
pub fn set_int(fd: RawFd, level: i32, name: i32, v: i32) -> bool {
    // SAFETY: an int option passed by pointer with its size.
    unsafe { libc::setsockopt(fd, level, name, (&v as *const i32).cast(), 4) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshim_image::SocketRole;

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
