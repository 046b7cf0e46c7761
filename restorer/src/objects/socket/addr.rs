//! Socket addresses as the image keeps them (raw `sockaddr` bytes): how they are named in
//! messages, and binding to them again, with a port or socket file taken by someone else
//! reported as such.

use std::io::Error;
use std::os::fd::RawFd;

use snapshim_image::Socket;

pub use snapshim_image::objects::socket::{describe, port};
use snapshim_image::objects::socket::{unix_name, UnixName};

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
