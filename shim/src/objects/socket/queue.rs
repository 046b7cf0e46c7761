//! The data waiting in a Unix socket's receive queue, read without taking it: `MSG_PEEK` with a
//! peek offset (`SO_PEEK_OFF`), so each call returns the next piece (the next datagram, or the
//! next stream bytes) and the program later reads the queue as it was. The program's own peek
//! offset is put back.
#![allow(unsafe_code)]

use alloc::vec::Vec;

use crate::sys::{self, sc};

/// Stop there: more than a socket's queue can hold by default means something is wrong.
const MAX_QUEUED: usize = 64 << 20;

/// Every piece queued on `fd`, oldest first; refused if descriptors are in flight in it
/// (`SCM_RIGHTS`) or a datagram does not fit the buffer.
pub fn peek_all(fd: i32) -> Result<Vec<Vec<u8>>, &'static str> {
    let old = super::int_opt(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
    if set_peek_off(fd, 0).is_err() {
        return Err("its queued data cannot be read (SO_PEEK_OFF refused)");
    }
    let mut buf = alloc::vec![0u8; 256 << 10];
    let mut out = Vec::new();
    let mut total = 0;
    let result = loop {
        match peek(fd, &mut buf) {
            Ok(0) | Err(libc::EAGAIN) => break Ok(()),
            Ok(n) => {
                out.push(buf[..n].to_vec());
                total += n;
                if total > MAX_QUEUED {
                    break Err("more than 64 MiB is queued in it");
                }
            }
            Err(-1) => break Err("descriptors are in flight in it (SCM_RIGHTS)"),
            Err(-2) => break Err("a datagram queued in it is larger than 256 KiB"),
            Err(_) => break Err("its queued data cannot be read"),
        }
    };
    let _ = set_peek_off(fd, old);
    result.map(|()| out)
}

fn set_peek_off(fd: i32, v: i32) -> sys::Result<i64> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        sc!(
            libc::SYS_setsockopt,
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            &v as *const i32,
            4
        )
    };
    sys::check(r)
}

/// One `recvmsg(MSG_PEEK)`: the bytes, or an errno, or -1 for descriptors in flight (they were
/// received by the peek and are closed again) and -2 for a truncated datagram.
fn peek(fd: i32, buf: &mut [u8]) -> Result<usize, i32> {
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = core::mem::size_of_val(&control);
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: msg points at valid buffers of the lengths it gives.
    let r = unsafe { sc!(libc::SYS_recvmsg, fd, &mut msg as *mut libc::msghdr, flags) };
    let n = sys::check(r)? as usize;
    if close_passed_fds(&control, msg.msg_controllen) || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(-1);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(-2);
    }
    Ok(n)
}

/// Walks the control messages; closes descriptors an `SCM_RIGHTS` message brought, and says
/// whether there was one.
fn close_passed_fds(control: &[u64; 64], len: usize) -> bool {
    // SAFETY: the control buffer is plain bytes of at least `len` (the kernel wrote `len`).
    let bytes = unsafe { core::slice::from_raw_parts(control.as_ptr().cast::<u8>(), len) };
    let (mut off, mut found) = (0, false);
    while off + 16 <= bytes.len() {
        let word =
            |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let cmsg_len =
            u64::from_ne_bytes(bytes[off..off + 8].try_into().unwrap_or([0; 8])) as usize;
        if cmsg_len < 16 || off + cmsg_len > bytes.len() {
            break;
        }
        if word(off + 8) == libc::SOL_SOCKET as u32 && word(off + 12) == libc::SCM_RIGHTS as u32 {
            found = true;
            for i in (off + 16..off + cmsg_len).step_by(4) {
                sys::close(word(i) as i32);
            }
        }
        off += (cmsg_len + 7) & !7;
    }
    found
}
