//! A stream connection that cannot go on after a restore (its peer's view is gone) is made as
//! one that was reset, so the program's next read or write fails and its own error handling
//! drops it:
//!
//! - TCP: the socket connects to a throwaway listener on the loopback address, which accepts
//!   and closes with `SO_LINGER` 0: the kernel answers with a RST, so the program's next read
//!   fails with `ECONNRESET` (then end of file) and its next write with `ECONNRESET` or `EPIPE`.
//!   An IPv6 socket connects to `::ffff:127.0.0.1`, which needs no IPv6 loopback.
//! - Unix stream: one end of a fresh socket pair whose other end is closed: end of file.

use std::os::fd::RawFd;

use snapshim_image::Socket;

use super::addr::sockaddr_call;
use super::{create, pair};

/// A socket of `s`'s family and type that was reset.
pub fn reset(s: &Socket) -> Result<RawFd, String> {
    if s.family == libc::AF_UNIX {
        let ends = pair(s.sock_type)?;
        // SAFETY: the other end, ours; closing it ends the connection.
        unsafe { libc::close(ends[1]) };
        return Ok(ends[0]);
    }
    let fd = create(s.family, libc::SOCK_STREAM, 0)?;
    let listener = create(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    let done = reset_through(fd, listener, s.family == libc::AF_INET6);
    // SAFETY: our throwaway listener.
    unsafe { libc::close(listener) };
    match done {
        Ok(()) => Ok(fd),
        Err(e) => {
            // SAFETY: our own socket, abandoned.
            unsafe { libc::close(fd) };
            Err(format!("cannot make it a reset connection: {e}"))
        }
    }
}

/// Connects `fd` to `listener` (on 127.0.0.1, any port), which resets the connection; returns
/// once the reset has arrived.
fn reset_through(fd: RawFd, listener: RawFd, v6: bool) -> Result<(), std::io::Error> {
    let mut loopback = [0u8; 16];
    loopback[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    loopback[4..8].copy_from_slice(&[127, 0, 0, 1]);
    sockaddr_call(libc::bind, listener, &loopback)?;
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(listener, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut bound = [0u8; 16];
    let mut len = bound.len() as libc::socklen_t;
    // SAFETY: bound and len are valid out-pointers of the sizes given.
    unsafe { libc::getsockname(listener, bound.as_mut_ptr().cast(), &mut len) };
    let to: Vec<u8> = if v6 {
        let mut a = vec![0u8; 28];
        a[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        a[2..4].copy_from_slice(&bound[2..4]);
        a[18..24].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        a
    } else {
        bound.to_vec()
    };
    sockaddr_call(libc::connect, fd, &to)?;
    // SAFETY: accept on our listener; the connection above is in its queue.
    let accepted = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if accepted < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct with its size, on the accepted socket.
    unsafe {
        libc::setsockopt(
            accepted,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            8,
        );
        libc::close(accepted);
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd. The RST travels over loopback; wait for it rather than assume.
    let r = unsafe { libc::poll(&mut p, 1, 10_000) };
    if r == 1 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLIN) != 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT))
    }
}
