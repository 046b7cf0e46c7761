//! Trigger: who asked for a checkpoint, and the helper's wait for the next one.
//!
//! Requests arrive as signals, on whatever thread of the program the kernel picks:
//! - `snapshim checkpoint` sends the quiesce signal with `sigqueue` (`si_code` SI_QUEUE): the
//!   value is the write end of its reply pipe, and above bit 32 the low 32 bits of that pipe's
//!   inode. A real-time signal queues: every request is delivered with its own `siginfo`, where
//!   two pending instances of a standard signal (SIGUSR2) merge into one and the second
//!   requester is lost. The quiesce handler tells a request (SI_QUEUE from another process) from
//!   the helper's own `tgkill` (SI_TKILL) and hands it here (`park.rs`);
//! - an older `snapshim checkpoint` sends the checkpoint signal the same way, and is answered
//!   the same way;
//! - `kill -USR2` (SI_USER), or a request whose sender this PID namespace cannot see (`si_pid`
//!   0), asks for a checkpoint without wanting an answer;
//! - `snapshim checkpoint --group` sends the quiesce signal with [`GROUP_BIT`] in the value and
//!   its token above bit 32: a [`Record::Group`], whatever `si_pid` is (a program restored in its
//!   own PID namespace sees 0), since the answer goes over the coordinator's abstract socket
//!   (`group.rs`), not into a descriptor of the sender.
//!
//! The handler writes one fixed-size [`Record`] into the wake pipe, non-blocking; a write of
//! [`RECORD_LEN`] bytes (under PIPE_BUF) lands whole or not at all. The pipe is the queue:
//!
//! ```text
//!  handler (any thread)           wake pipe               helper
//!  Record{pid, fd, ino} ────────► [rec][rec][rec] ──────► wait: readable (or the interval)
//!                                                         drain every record ┐ joined: one
//!                                                         ... prepare ...    │ checkpoint,
//!                                                         drain again ───────┘ one answer each
//!                                                         pause, write, commit
//!  records written from here on stay in the pipe ───────► next round: the next checkpoint
//! ```
//!
//! Every requester drained before the pause gets the outcome of that checkpoint (its image was
//! taken after they asked). A request that comes later stays in the pipe (during the pause every
//! thread blocks signals, so its signal waits in the kernel) and makes the next checkpoint: none
//! is dropped and none waits for a checkpoint that will not come.
//!
//! When a record cannot be written:
//! - the pipe is full (thousands of requests waiting): a plain trigger is dropped, since the
//!   records already there make a checkpoint; a requester is answered at once, from the
//!   handler, with an error;
//! - a child the program forked ([`DISABLED`]) has no helper, and shares the pipe with its
//!   parent: nothing is written (the parent would answer with its own image); a requester is
//!   answered at once with an error.
//!
//! A restored process gets the pipe back with what it held at the pause: records the original
//! process answers (it reads them after that checkpoint). The restored helper discards them
//! ([`discard_stale`]) before any restored thread can run a handler, so it never answers a
//! requester of the original, whose PID may by now be another process's.
#![allow(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering::*};

use snapshim_image::settings::{GROUP_BIT, STOP_AFTER_BIT};

use crate::config::Config;
use crate::sys::{self, sc};

/// The wake pipe (non-blocking both ends): the handlers write records, the helper reads them.
pub static WAKE_R: AtomicI32 = AtomicI32::new(-1);
pub static WAKE_W: AtomicI32 = AtomicI32::new(-1);
/// Set in a forked child: it has no helper thread.
pub static DISABLED: AtomicU32 = AtomicU32::new(0);

/// Exported: tells `snapshim checkpoint` that this shim takes requests on its quiesce signal
/// (`snapshim_image::settings::QUEUED_REQUESTS_SYMBOL`).
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static snapshim_requests_on_quiesce_signal: u32 = 1;

/// Exported so that `snapshim checkpoint` knows this shim's checkpoint signal, without
/// `SNAPSHIM_SIGNAL`, is SIGRTMAX and not an older shim's SIGUSR2
/// (`snapshim_image::settings::RT_DEFAULT_SYMBOL`).
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static snapshim_checkpoint_signal_is_sigrtmax: u32 = 1;

/// Exported: tells `snapshim checkpoint --kill` that this shim stops the program itself after
/// a checkpoint asked with `STOP_AFTER_BIT` (`snapshim_image::settings::STOP_AFTER_SYMBOL`).
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static snapshim_stops_after_request: u32 = 1;

/// Exported: tells `snapshim checkpoint --group` that this shim takes part in group
/// checkpoints (`snapshim_image::settings::GROUP_SYMBOL`; see `group.rs`).
#[cfg_attr(not(test), no_mangle)]
#[allow(non_upper_case_globals)]
pub static snapshim_joins_group_checkpoints: u32 = 1;

/// Who wants the outcome of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requester {
    /// The process that sent the request, as this PID namespace sees it.
    pub pid: i32,
    /// Its reply pipe's write end, in that process.
    pub fd: i32,
    /// The low 32 bits of that pipe's inode; 0: not given (an older `snapshim checkpoint`).
    pub ino: u32,
    /// The checkpoint is to be the program's last (`snapshim checkpoint --kill`).
    pub stop: bool,
}

impl Requester {
    /// The requester a queued signal's value names (`si_pid`, `si_value`).
    pub fn from_value(pid: i32, value: u64) -> Requester {
        Requester {
            pid,
            fd: (value as u32 & !STOP_AFTER_BIT) as i32,
            ino: (value >> 32) as u32,
            stop: value as u32 & STOP_AFTER_BIT != 0,
        }
    }
}

/// One request in the wake pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Take a checkpoint; nobody to answer.
    Plain,
    /// Take a checkpoint and answer this requester.
    Request(Requester),
    /// Take a checkpoint together with the other members of a group: meet the coordinator
    /// listening with this token (`group.rs`) once parked, and answer it there.
    Group(u32),
}

/// Everyone a checkpoint answers: the requesters' pipes, and at most one group coordinator
/// (the newest: an older one still waiting has given up or will, and nothing is committed
/// for it).
#[derive(Default)]
pub struct Requests {
    pub pipes: Vec<Requester>,
    pub group: Option<u32>,
}

/// Bytes of a record in the wake pipe: written in one `write`, so whole or not at all.
pub const RECORD_LEN: usize = 16;
const MAGIC: [u8; 4] = *b"SRQ1";
/// A [`Record::Group`]: the token follows, then zeros.
const GROUP_MAGIC: [u8; 4] = *b"SRG1";
const _: () = assert!(RECORD_LEN <= libc::PIPE_BUF);

impl Record {
    /// `MAGIC`, then pid, fd and inode (little-endian); pid 0 is [`Record::Plain`]. A group
    /// record is `GROUP_MAGIC`, then the token, then zeros.
    pub fn encode(self) -> [u8; RECORD_LEN] {
        let (magic, words) = match self {
            Record::Plain => (MAGIC, [0; 3]),
            Record::Request(r) => {
                let fd = r.fd as u32 | if r.stop { STOP_AFTER_BIT } else { 0 };
                (MAGIC, [r.pid as u32, fd, r.ino])
            }
            Record::Group(token) => (GROUP_MAGIC, [token, 0, 0]),
        };
        let mut b = [0u8; RECORD_LEN];
        b[..4].copy_from_slice(&magic);
        for (i, w) in words.iter().enumerate() {
            b[4 + 4 * i..8 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// The record in `b`; None if `b` is not one (wrong length or magic).
    pub fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_LEN {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[..4] == GROUP_MAGIC {
            return Some(Record::Group(word(4)));
        }
        if b[..4] != MAGIC {
            return None;
        }
        let pid = word(4) as i32;
        Some(if pid <= 0 {
            Record::Plain
        } else {
            Record::Request(Requester {
                pid,
                fd: (word(8) & !STOP_AFTER_BIT) as i32,
                ino: word(12),
                stop: word(8) & STOP_AFTER_BIT != 0,
            })
        })
    }
}

/// Whether `info` is a request from outside: SI_QUEUE, sent by another process (the shim's own
/// quiesce signals are SI_TKILL from this one).
///
/// # Safety
/// `info` is null or the kernel's siginfo of the signal being handled.
pub unsafe fn queued_from_outside(info: *const libc::siginfo_t) -> bool {
    // SAFETY: per the contract.
    !info.is_null()
        && unsafe { (*info).si_code == libc::SI_QUEUE && (*info).si_pid() != sys::getpid() }
}

/// The record a checkpoint signal asks for: a request when it was queued by another process we
/// can see (never one of ours: the answer would go into our own descriptors), else plain.
///
/// # Safety
/// As [`queued_from_outside`].
pub unsafe fn record_of(info: *const libc::siginfo_t) -> Record {
    // SAFETY: per the contract.
    unsafe {
        if !queued_from_outside(info) {
            return Record::Plain;
        }
        let value = (*info).si_value().sival_ptr as u64;
        if value as u32 & GROUP_BIT != 0 {
            return Record::Group((value >> 32) as u32);
        }
        if (*info).si_pid() <= 0 {
            return Record::Plain;
        }
        Record::Request(Requester::from_value((*info).si_pid(), value))
    }
}

/// Queues `rec` for the helper, from a signal handler (raw system calls only). A record that
/// cannot be queued is answered at once (see the module doc).
pub fn post(rec: Record) {
    let refused: &[u8] = if DISABLED.load(Relaxed) != 0 {
        b"err checkpoints are off in this process: it is a child the program forked, which \
          takes no checkpoints of its own\n"
    } else {
        match sys::write(WAKE_W.load(Relaxed), &rec.encode()) {
            Ok(_) => return,
            Err(_) => {
                b"err too many checkpoint requests are waiting (the shim's request pipe is \
                  full); ask again once they are answered\n"
            }
        }
    };
    if let Record::Request(r) = rec {
        answer(r, refused);
    }
}

/// Handler of the checkpoint signal: queues the request (see the module doc).
pub extern "C" fn trigger_handler(_sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: errno slot of this thread; info is provided by the kernel (SA_SIGINFO).
    unsafe {
        let errno = *libc::__errno_location();
        post(record_of(info));
        *libc::__errno_location() = errno;
    }
}

/// Writes `line` into a requester's reply pipe, reopened through `/proc/<pid>/fd/<fd>`: only if
/// that is a pipe, and the very pipe the requester named when it gave the inode (one that gave
/// up and exited may have left its PID to another process). Async-signal-safe: no allocation.
pub fn answer(r: Requester, line: &[u8]) {
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let mut path = [0u8; 64];
    let n = sys::format_into(
        &mut path[..63],
        &[
            "/proc/",
            sys::itoa(r.pid as u32 as u64, &mut a),
            "/fd/",
            sys::itoa(r.fd as u32 as u64, &mut b),
        ],
    )
    .len();
    // path[n] is still 0: the path is NUL-terminated.
    let path = &path[..n + 1];
    let is_theirs = |st: &libc::stat| {
        st.st_mode & libc::S_IFMT == libc::S_IFIFO && (r.ino == 0 || st.st_ino as u32 == r.ino)
    };
    // SAFETY: a zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // Looked at before it is opened: opening some other kind of file can have effects of its own.
    // SAFETY: path is NUL-terminated; st is writable.
    if sys::check(unsafe { sc!(libc::SYS_stat, path.as_ptr(), &mut st as *mut libc::stat) })
        .is_err()
        || !is_theirs(&st)
    {
        return;
    }
    let Ok(fd) = sys::open(path, libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC, 0) else {
        return;
    };
    // SAFETY: fd is open; st is writable.
    if sys::check(unsafe { sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat) }).is_ok()
        && is_theirs(&st)
    {
        let _ = sys::write_all(fd, line);
    }
    sys::close(fd);
}

/// Takes every record now in the wake pipe and adds each requester among them to `to` (once).
pub fn drain(to: &mut Requests) {
    take_records(|rec| match rec {
        Record::Request(r) if !to.pipes.contains(&r) => to.pipes.push(r),
        Record::Group(token) => to.group = Some(token),
        _ => {}
    });
}

/// In a restored process, before any restored thread may run a handler: the records in the
/// wake pipe came with the image and belong to the original process, which answers them.
/// Allocates nothing.
pub fn discard_stale() {
    take_records(|_| {});
}

/// Reads every record now in the wake pipe (it is non-blocking) and hands each to `f`.
fn take_records(mut f: impl FnMut(Record)) {
    let fd = WAKE_R.load(Relaxed);
    let mut buf = [0u8; RECORD_LEN * 64];
    // Every write is one whole record and every read asks for whole records, so a read never
    // ends inside one; a stray remainder would be skipped.
    while let Ok(n @ 1..) = sys::read(fd, &mut buf) {
        for chunk in buf[..n].chunks_exact(RECORD_LEN) {
            // Not a record (cannot happen: only the handlers write): a checkpoint all the same.
            f(Record::decode(chunk).unwrap_or(Record::Plain));
        }
    }
}

/// The helper's wait for the next checkpoint: a record in the wake pipe or the interval's end.
pub struct Waiter {
    wake: i32,
    interval_ms: Option<u64>,
    /// When the interval ends next (monotonic ms).
    next_due: Option<u64>,
}

impl Waiter {
    pub fn new(cfg: &Config) -> Waiter {
        Waiter {
            wake: WAKE_R.load(Relaxed),
            interval_ms: cfg.interval_ms,
            next_due: cfg
                .interval_ms
                .map(|ms| sys::monotonic_ns() / 1_000_000 + ms),
        }
    }

    /// Waits until a checkpoint is due; false if the wait was interrupted (wait again). The
    /// records stay in the pipe for [`drain`].
    pub fn wait(&mut self) -> bool {
        let timeout = self.next_due.map_or(-1, |due| {
            due.saturating_sub(sys::monotonic_ns() / 1_000_000) as i32
        });
        let mut pfd = libc::pollfd {
            fd: self.wake,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { sc!(libc::SYS_poll, &mut pfd as *mut libc::pollfd, 1, timeout) };
        if n == 0 {
            self.next_due = self
                .interval_ms
                .map(|ms| sys::monotonic_ns() / 1_000_000 + ms);
        } else if n < 0 {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exported_marker_is_the_one_the_tools_look_for() {
        assert_eq!(
            stringify!(snapshim_requests_on_quiesce_signal),
            snapshim_image::settings::QUEUED_REQUESTS_SYMBOL
        );
        assert_eq!(
            stringify!(snapshim_checkpoint_signal_is_sigrtmax),
            snapshim_image::settings::RT_DEFAULT_SYMBOL
        );
        assert_eq!(
            stringify!(snapshim_stops_after_request),
            snapshim_image::settings::STOP_AFTER_SYMBOL
        );
        assert_eq!(
            stringify!(snapshim_joins_group_checkpoints),
            snapshim_image::settings::GROUP_SYMBOL
        );
    }

    #[test]
    fn records_round_trip() {
        let r = Requester {
            pid: 4_194_303,
            fd: 7,
            ino: 0xdead_beef,
            stop: false,
        };
        let last = Requester { stop: true, ..r };
        for rec in [
            Record::Plain,
            Record::Request(r),
            Record::Request(last),
            Record::Group(0xfeed_f00d),
        ] {
            let b = rec.encode();
            assert_eq!(b.len(), RECORD_LEN);
            assert_eq!(
                &b[..4],
                if matches!(rec, Record::Group(_)) {
                    b"SRG1"
                } else {
                    b"SRQ1"
                }
            );
            assert_eq!(Record::decode(&b), Some(rec));
        }
        assert_eq!(
            Record::Request(r).encode(),
            *b"SRQ1\xff\xff\x3f\x00\x07\x00\x00\x00\xef\xbe\xad\xde"
        );
    }

    #[test]
    fn what_is_not_a_record_is_refused() {
        let mut b = Record::Plain.encode();
        assert_eq!(Record::decode(&b[..15]), None);
        b[0] = b'c';
        assert_eq!(Record::decode(&b), None);
        // A negative PID names nobody.
        let mut b = Record::Plain.encode();
        b[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert_eq!(Record::decode(&b), Some(Record::Plain));
    }

    #[test]
    fn the_value_carries_the_descriptor_and_the_inode() {
        assert_eq!(
            Requester::from_value(42, 0x0012_3456_0000_0009),
            Requester {
                pid: 42,
                fd: 9,
                ino: 0x0012_3456,
                stop: false,
            }
        );
        // `snapshim checkpoint --kill`: the bit above every descriptor number.
        let r = Requester::from_value(42, 0x0012_3456_4000_0009);
        assert!(r.stop && r.fd == 9);
        // An older `snapshim checkpoint` sends the descriptor alone.
        assert_eq!(Requester::from_value(42, 5).ino, 0);
    }
}
