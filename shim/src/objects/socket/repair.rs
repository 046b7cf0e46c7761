//! Established TCP connections captured alive with `TCP_REPAIR` (`SNAPSHIM_TCP_ESTABLISHED=1`),
//! as CRIU's `--tcp-established` does, for `snapshim-restore --tcp-established`:
//!
//! ```text
//!  a filter that drops every packet is attached: nothing the peer sends from now on is taken
//!   (nor acknowledged), so the state read below cannot change under us, and an ACK cannot make
//!   the kernel send (in repair mode: pretend to send) from the send queue meanwhile; the peer
//!   sends it again, to this socket once the filter is gone, or to the restored one
//!  TCP_REPAIR on                              needs CAP_NET_ADMIN; EPERM: captured as Reset
//!  TCP_REPAIR_WINDOW read, then set with a send window of 0: a transmission the kernel
//!   deferred (small queues, pacing), which runs when one of our calls releases the socket,
//!   cannot send new data while the state is read (nor, on a held socket, ever after)
//!  TCP_QUEUE_SEQ of each queue, SIOCOUTQ, SIOCOUTQNSD, SIOCINQ, before and after: read again
//!   until they agree
//!  each queue peeked (TCP_REPAIR_QUEUE + MSG_PEEK): nothing is taken from the program
//!  TCP_MAXSEG, TCP_INFO (window scales, SACK, timestamps), TCP_TIMESTAMP
//!  the window back, TCP_REPAIR off with TCP_REPAIR_OFF_NO_WP (no window probe: the peer sees
//!   nothing), the filter removed
//!  [last checkpoint: left in repair mode, window closed, the filter kept (`HELD`): when the
//!   killed program's descriptors close, a socket in repair mode goes without FIN nor RST
//!   (`__tcp_close` → `tcp_disconnect`, which sends no reset in repair mode)]
//! ```
//!
//! Runs in the writer while every other thread is parked: raw system calls, scratch allocation.
#![allow(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::*};

use snapshim_image::TcpRepair;

use crate::sys::{self, sc};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const SIOCINQ: u64 = 0x541B;
const SIOCOUTQ: u64 = 0x5411;
const SIOCOUTQNSD: u64 = 0x894B;
const TCP_ESTABLISHED: u8 = 1;
/// The queued bytes one checkpoint keeps of all its connections together. They live in the
/// writer's scratch heap, and twice once the metadata is encoded (see `deleted_file::BUDGET`,
/// which shares the heap): a connection beyond what is left is captured as `Reset`.
pub const BUDGET: usize = 16 << 20;
static BUDGET_LEFT: AtomicUsize = AtomicUsize::new(BUDGET);

/// `SNAPSHIM_TCP_ESTABLISHED`: capture established connections alive.
static WANTED: AtomicBool = AtomicBool::new(false);
/// This checkpoint is the program's last (`snapshim checkpoint --kill`).
static LAST: AtomicBool = AtomicBool::new(false);
/// `TCP_REPAIR` was refused (EPERM) and the "needs CAP_NET_ADMIN" line written: later
/// checkpoints of this process do not try again.
static DENIED: AtomicBool = AtomicBool::new(false);
/// Sockets left in repair mode with the dropping filter, and their `SO_REUSEADDR` (repair mode
/// changes it), for [`let_go`] if the last checkpoint fails after all.
const MAX_HELD: usize = 256;
static HELD: [AtomicI32; MAX_HELD] = [const { AtomicI32::new(-1) }; MAX_HELD];
static HELD_REUSE: [AtomicI32; MAX_HELD] = [const { AtomicI32::new(0) }; MAX_HELD];
static HELD_N: AtomicUsize = AtomicUsize::new(0);

/// Before a checkpoint's capture: whether connections are captured alive, and whether the
/// checkpoint is the program's last.
pub fn begin(wanted: bool, last: bool) {
    WANTED.store(wanted, Relaxed);
    LAST.store(last, Relaxed);
    HELD_N.store(0, Relaxed);
    BUDGET_LEFT.store(BUDGET, Relaxed);
}

/// In a restored process: its sockets are new ones, none is held; and it may run with other
/// privileges than the original, so `TCP_REPAIR` is tried again.
pub fn after_restore() {
    HELD_N.store(0, Relaxed);
    DENIED.store(false, Relaxed);
}

/// An established TCP connection's repair state, when it is wanted and the kernel gives it;
/// None: the connection is captured as `Reset`.
pub fn capture(fd: i32) -> Option<TcpRepair> {
    if !WANTED.load(Relaxed)
        || DENIED.load(Relaxed)
        || tcp_info(fd).map(|i| i[0]) != Some(TCP_ESTABLISHED)
    {
        return None;
    }
    let reuse = get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap_or(0);
    let filtered = attach_drop_filter(fd);
    match set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1) {
        Ok(()) => {}
        Err(e) => {
            if e == libc::EPERM && !DENIED.swap(true, Relaxed) {
                let _ = sys::write_all(
                    2,
                    b"snapshim: SNAPSHIM_TCP_ESTABLISHED: TCP_REPAIR needs CAP_NET_ADMIN; \
                      established TCP connections are captured as reset\n",
                );
            }
            if filtered {
                detach_filter(fd);
            }
            return None;
        }
    }
    // The send window closed while the state is read: a transmission the kernel deferred
    // (TCP small queues, pacing) and runs when a call of ours releases the socket cannot send
    // new data meanwhile, nor, when the socket is held, after the capture.
    let window = get_window(fd);
    let frozen = window.is_some_and(|w| set_window(fd, [w[0], 0, w[2], w[3], w[4]]));
    let state = window.filter(|_| frozen).and_then(|w| read_stable(fd, w));
    let _ = set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE);
    if !(LAST.load(Relaxed) && filtered && state.is_some() && hold(fd, reuse)) {
        if let (Some(w), true) = (window, frozen) {
            set_window(fd, w);
        }
        leave_repair(fd, reuse, filtered);
    }
    state
}

/// [`read_state`] until two readings of the sequence numbers and queue sizes, before and
/// after, agree (at most three tries): nothing moved while the queues were read.
fn read_stable(fd: i32, window: [u32; 5]) -> Option<TcpRepair> {
    let budget = BUDGET_LEFT.load(Relaxed);
    for _ in 0..3 {
        let before = marks(fd)?;
        let state = read_state(fd, window);
        if state.is_some() && marks(fd)? == before {
            return state;
        }
        BUDGET_LEFT.store(budget, Relaxed);
    }
    None
}

/// `write_seq`, `rcv_nxt`, `SIOCOUTQ`, `SIOCOUTQNSD`, `SIOCINQ`.
fn marks(fd: i32) -> Option<[usize; 5]> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).ok()?;
    let write_seq = get_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)? as u32 as usize;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).ok()?;
    let rcv_nxt = get_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)? as u32 as usize;
    let _ = set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE);
    Some([
        write_seq,
        rcv_nxt,
        ioctl(fd, SIOCOUTQ)?,
        ioctl(fd, SIOCOUTQNSD)?,
        ioctl(fd, SIOCINQ)?,
    ])
}

/// `TCP_REPAIR_WINDOW`: `snd_wl1`, `snd_wnd`, `max_window`, `rcv_wnd`, `rcv_wup`.
fn get_window(fd: i32) -> Option<[u32; 5]> {
    let mut w = [0u8; 20];
    (get(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &mut w)? == 20).then_some(())?;
    let word = |i: usize| u32::from_ne_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
    Some([word(0), word(4), word(8), word(12), word(16)])
}

fn set_window(fd: i32, w: [u32; 5]) -> bool {
    // SAFETY: struct tcp_repair_window is five u32, passed by pointer with its size.
    let r = unsafe {
        sc!(
            libc::SYS_setsockopt,
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            w.as_ptr(),
            20
        )
    };
    sys::check(r).is_ok()
}

/// Takes every held socket out of repair mode, as the program had it: the last checkpoint
/// failed and the program goes on.
pub fn let_go() {
    let n = HELD_N.swap(0, Relaxed).min(MAX_HELD);
    for i in 0..n {
        leave_repair(HELD[i].load(Relaxed), HELD_REUSE[i].load(Relaxed), true);
    }
}

fn hold(fd: i32, reuse: i32) -> bool {
    let i = HELD_N.load(Relaxed);
    if i >= MAX_HELD {
        return false;
    }
    HELD[i].store(fd, Relaxed);
    HELD_REUSE[i].store(reuse, Relaxed);
    HELD_N.store(i + 1, Relaxed);
    true
}

/// Repair mode off without a window probe (the peer sees nothing), the filter removed, and the
/// program's `SO_REUSEADDR` back (repair mode turned it to "force", its end to "no").
fn leave_repair(fd: i32, reuse: i32, filtered: bool) {
    let _ = set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    let _ = set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
    if filtered {
        detach_filter(fd);
    }
}

/// Everything [`TcpRepair`] holds, read in repair mode; `window` as it was before the capture
/// closed it.
fn read_state(fd: i32, window: [u32; 5]) -> Option<TcpRepair> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).ok()?;
    let write_seq = get_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)? as u32;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).ok()?;
    let rcv_nxt = get_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)? as u32;
    let (outq, unsent, inq) = (
        ioctl(fd, SIOCOUTQ)?,
        ioctl(fd, SIOCOUTQNSD)?,
        ioctl(fd, SIOCINQ)?,
    );
    let left = BUDGET_LEFT.load(Relaxed);
    if outq + inq > left || unsent > outq {
        return None;
    }
    BUDGET_LEFT.store(left - outq - inq, Relaxed);
    let recv_queue = peek(fd, inq)?;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).ok()?;
    let send_queue = peek(fd, outq)?;
    let info = tcp_info(fd)?;
    let (options, scales) = (info[5], info[6]);
    Some(TcpRepair {
        send_seq: write_seq.wrapping_sub(outq as u32),
        recv_seq: rcv_nxt.wrapping_sub(inq as u32),
        send_queue,
        unsent: unsent as u32,
        recv_queue,
        window,
        mss: get_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)? as u32,
        // TCPI_OPT_WSCALE; tcpi_snd_wscale in the low 4 bits, tcpi_rcv_wscale in the high.
        wscale: (options & 4 != 0).then_some((scales & 0xf, scales >> 4)),
        sack: options & 2 != 0,
        timestamps: options & 1 != 0,
        timestamp: get_int(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP)? as u32,
        realtime_ns: sys::clock_ns(libc::CLOCK_REALTIME),
    })
}

/// `len` bytes of the queue `TCP_REPAIR_QUEUE` names, peeked; None if fewer came.
fn peek(fd: i32, len: usize) -> Option<Vec<u8>> {
    let mut buf = alloc::vec![0u8; len];
    if len == 0 {
        return Some(buf);
    }
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: buf is writable for len bytes; no address is asked for.
    let r = unsafe { sc!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), len, flags, 0, 0) };
    (sys::check(r).ok()? as usize == len).then_some(buf)
}

/// `struct tcp_info`, its first 104 bytes (state at 0, options at 5, window scales at 6).
fn tcp_info(fd: i32) -> Option<[u8; 104]> {
    let mut info = [0u8; 104];
    (get(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)? >= 8).then_some(info)
}

/// A classic BPF program of one instruction, `ret #0`: every packet is dropped before TCP
/// sees it (`tcp_filter` in `tcp_v4_rcv`/`tcp_v6_rcv`). Not attached over a filter of the
/// program's own (that one would be lost if the checkpoint failed).
fn attach_drop_filter(fd: i32) -> bool {
    // SO_GET_FILTER (the same number as SO_ATTACH_FILTER) with a zero length answers the
    // number of instructions attached.
    if get(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &mut []) != Some(0) {
        return false;
    }
    let drop_all: [u64; 1] = [0x06]; // { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: 0 }
    let prog: [u64; 2] = [1, drop_all.as_ptr() as u64]; // struct sock_fprog { len, filter }
                                                        // SAFETY: prog is a sock_fprog pointing at one instruction, both alive for the call.
    let r = unsafe {
        sc!(
            libc::SYS_setsockopt,
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            prog.as_ptr(),
            16
        )
    };
    sys::check(r).is_ok()
}

fn detach_filter(fd: i32) {
    let _ = set_int(fd, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0);
}

/// An `ioctl` answering an int (a queue's size).
fn ioctl(fd: i32, req: u64) -> Option<usize> {
    let mut v = 0i32;
    // SAFETY: the three requests write one int.
    let r = unsafe { sc!(libc::SYS_ioctl, fd, req, &mut v as *mut i32) };
    sys::check(r).ok()?;
    usize::try_from(v).ok()
}

fn set_int(fd: i32, level: i32, name: i32, v: i32) -> Result<(), i32> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe { sc!(libc::SYS_setsockopt, fd, level, name, &v as *const i32, 4) };
    sys::check(r).map(|_| ())
}

fn get_int(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut v = [0u8; 4];
    (get(fd, level, name, &mut v)? == 4).then_some(i32::from_ne_bytes(v))
}

/// `getsockopt` into `buf`; the length the kernel wrote.
fn get(fd: i32, level: i32, name: i32, buf: &mut [u8]) -> Option<usize> {
    let mut len = buf.len() as u32;
    // SAFETY: buf and len are valid out-pointers of the sizes given.
    let r = unsafe {
        sc!(
            libc::SYS_getsockopt,
            fd,
            level,
            name,
            buf.as_mut_ptr(),
            &mut len as *mut u32
        )
    };
    sys::check(r).ok()?;
    Some(len as usize)
}
