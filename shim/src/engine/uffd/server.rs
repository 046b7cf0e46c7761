//! The fault server: a bare thread that serves the program's write faults during a flush
//! (saving the block around each, [`Around`]), and the writer's copying ahead from the far end.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};

use snapshim_image::layout::STACK_START;

use crate::config::CopyAhead;
use crate::sys::kapi::*;
use crate::sys::{self, sc};

use super::state::*;
use super::table::*;

/// The largest block saved around a write fault during a flush (`SNAPSHIM_FAULT_AROUND`, a
/// power of two from one page to 2 MiB; see [`Around`]).
pub(super) static AROUND: AtomicU64 =
    AtomicU64::new(snapshim_image::settings::DEFAULT_FAULT_AROUND);

/// Whether the user chose [`AROUND`] (`SNAPSHIM_FAULT_AROUND`): it then holds for every program.
static AROUND_CHOSEN: AtomicBool = AtomicBool::new(false);

/// Whether the program being checkpointed serves clients (it listens on a socket or holds a
/// TCP connection): each of its faults then saves one page. A server's requests write here and
/// there (redis updates an LRU clock on every read), which looks to the server like a program
/// writing all over its memory: growing blocks would make a request wait for a 2 MiB copy. One
/// page per fault keeps the largest latency of a request to a few milliseconds
/// (docs/benchmarks.md, redis), at the price of more faults for the program as a whole.
static SERVES_CLIENTS: AtomicBool = AtomicBool::new(false);

/// Sets the largest fault-around block (rounded down to a power of two, one page to 2 MiB).
pub fn set_fault_around(bytes: u64) {
    let b = bytes.clamp(PAGE, 2 << 20);
    AROUND.store(1 << (63 - b.leading_zeros()), Relaxed);
    AROUND_CHOSEN.store(true, Relaxed);
}

/// Says, at each checkpoint, whether the program serves clients (see [`SERVES_CLIENTS`]).
pub fn set_serves_clients(yes: bool) {
    SERVES_CLIENTS.store(yes, Relaxed);
}

/// The largest fault-around block for this checkpoint.
fn around_cap() -> u64 {
    if SERVES_CLIENTS.load(Relaxed) && !AROUND_CHOSEN.load(Relaxed) {
        PAGE
    } else {
        AROUND.load(Relaxed)
    }
}

/// How much the fault server saves around a write fault: the aligned block holding the page,
/// copied with one read and unprotected with one call, so a program writing all over its memory
/// takes one fault per block instead of one per page (each costs it 20-300 µs here, mostly
/// waiting for the server to be scheduled and to wake it again). Blocks start at 16 KiB and
/// double after every 10 ms in which the server was busy more than a tenth of the time, up to
/// [`AROUND`]; they halve after a 10 ms in which it was busy less than a fortieth. A program that
/// rarely writes unsaved pages keeps small blocks. The price is copy-store memory for the pages
/// of a block that the program would not have written before the writer got to them: never
/// more than the memory stored, as with the fork engine.
pub(super) struct Around {
    shift: u32,
    busy: u64,
    since: u64,
}

impl Around {
    const MIN_SHIFT: u32 = 14;
    const INTERVAL_NS: u64 = 10_000_000;

    pub(super) fn new() -> Around {
        Around {
            shift: Self::MIN_SHIFT,
            busy: 0,
            since: 0,
        }
    }

    pub(super) fn block(&self) -> u64 {
        (1u64 << self.shift).min(around_cap())
    }

    /// The server was busy from `from` to `to` (monotonic ns) saving pages.
    pub(super) fn busy(&mut self, from: u64, to: u64) {
        self.busy += to.saturating_sub(from);
        if to.saturating_sub(self.since) < Self::INTERVAL_NS {
            return;
        }
        let max = around_cap().trailing_zeros().max(Self::MIN_SHIFT);
        let elapsed = to - self.since;
        if self.busy * 10 > elapsed {
            self.shift = (self.shift + 1).min(max);
            if self.shift == max {
                HOT_UNTIL.store(to + 2 * Self::INTERVAL_NS, Relaxed);
            }
        } else if self.busy * 40 < elapsed {
            self.shift = (self.shift - 1).max(Self::MIN_SHIFT);
        }
        self.busy = 0;
        self.since = to;
    }
}

/// Until when (monotonic ns) the program counts as writing all over unsaved memory: the fault
/// server was busy more than a tenth of the time with the largest blocks. The writer then
/// copies blocks from the far end while the device writes ([`help_from_end`]).
pub(super) static HOT_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Before the snapshot, the range to unprotect for a write fault at `addr`: its page, or its
/// 2 MiB block in huge-page memory ([`huge`]; the pause protects again whatever was written).
pub(super) fn pre_block(addr: u64) -> (u64, u64) {
    let n = (PRE_N.load(Acquire) as usize).min(PRE_MAX);
    for r in &PRE[..n] {
        let (start, end) = (r[0].load(Relaxed), r[1].load(Relaxed));
        if start != 0 && (start..end).contains(&addr) && huge(start, end) {
            let (from, to) = block_of(addr, HUGE, start, end);
            return (from, to - from);
        }
    }
    (addr, PAGE)
}

/// Wakes the threads waiting on faults in the range without lifting anything: they fault again.
pub(super) fn wake(uffd: i32, start: u64, len: u64) {
    let mut r = [start, len];
    let _ = ioctl(uffd, UFFDIO_WAKE, r.as_mut_ptr() as *mut u8);
}

// ---------------------------------------------------------------------------------------------
// The fault server: a bare thread (no TLS of its own, no libc), stack in the reserved range.

pub(super) const SERVER_STACK: u64 = 256 << 10;

pub(super) fn spawn_server() -> sys::Result<()> {
    let top = STACK_START + SERVER_STACK;
    let sp = top - 32;
    // SAFETY: the writer stack range is mapped read-write from before prepare() until the
    // checkpoint is over; the server's part is its lowest SERVER_STACK bytes, far below the
    // writer's own frames.
    unsafe {
        *(sp as *mut u64) = server_main as *const () as u64;
        *((sp + 8) as *mut u64) = 0;
    }
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID;
    let tid_word = SERVER_TID.as_ptr();
    let r: i64;
    // SAFETY: clone with a new stack holding the entry point and its argument. The child pops
    // them and calls server_main, which never returns (it ends with the exit system call); it
    // shares this thread's TLS pointer but never uses TLS. The parent continues normally.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "pop rax",
            "pop rdi",
            "and rsp, -16",
            "call rax",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone => r,
            in("rdi") flags as u64,
            in("rsi") sp,
            in("rdx") tid_word,
            in("r10") tid_word,
            in("r8") 0u64,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    sys::check(r).map(|_| ())
}

pub(super) extern "C" fn server_main(_: u64) -> ! {
    let (uffd, stop) = (UFFD.load(Acquire), STOP[0].load(Relaxed));
    let mut msgs = [[0u64; 4]; 32];
    let mut around = Around::new();
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        unsafe { sc!(libc::SYS_poll, pfd.as_mut_ptr(), 2, -1i64) };
        if pfd[1].revents != 0 {
            // Only ever asked while not held (see teardown and end).
            serve(uffd, &mut msgs, &mut around);
            // SAFETY: ends this thread only; the kernel clears SERVER_TID and wakes the writer.
            unsafe { sc!(libc::SYS_exit, 0) };
        }
        // A batch starts only while the writer does not hold the server; both sides announce
        // themselves first (sequentially consistent), so one of them always sees the other.
        BUSY.store(1, SeqCst);
        if HOLD.load(SeqCst) != 0 {
            BUSY.store(0, SeqCst);
            sys::futex_wake(&BUSY);
            while HOLD.load(SeqCst) != 0 {
                sys::futex_wait(&HOLD, 1, None);
            }
            continue;
        }
        serve(uffd, &mut msgs, &mut around);
        BUSY.store(0, SeqCst);
        sys::futex_wake(&BUSY);
    }
}

/// Keeps the fault server from starting a batch and waits for the one it is in to end: while
/// the writer takes the snapshot, no page may be unprotected behind its back.
pub(super) fn hold_server() {
    HOLD.store(1, SeqCst);
    while BUSY.load(SeqCst) != 0 {
        sys::futex_wait(&BUSY, 1, Some(1_000_000));
    }
}

pub(super) fn release_server() {
    HOLD.store(0, SeqCst);
    sys::futex_wake(&HOLD);
}

/// Asks the fault server to end and waits until it has.
pub(super) fn stop_server() {
    let w = STOP[1].load(Relaxed);
    if w >= 0 {
        let _ = sys::write(w, b"x");
    }
    loop {
        let tid = SERVER_TID.load(Acquire);
        if tid == 0 {
            break;
        }
        sys::futex_wait(&SERVER_TID, tid, Some(10_000_000));
    }
}

/// Handles every message waiting on the userfaultfd. Before the snapshot (no table) a fault
/// only has its page unprotected: [`begin`] protects again every page written by then. After,
/// the page is saved first. A fault whose page cannot be unprotected yet (an event is pending)
/// is kept in `retry` and tried again after the next read, which completes the events.
pub(super) fn serve(uffd: i32, msgs: &mut [[u64; 4]; 32], around: &mut Around) {
    let mut retry = [(0u64, 0u64, 0u64); 64];
    let mut nretry = 0usize;
    loop {
        // SAFETY: msgs is writable for its size; uffd_msg is 32 bytes.
        let n = unsafe { sc!(libc::SYS_read, uffd, msgs.as_mut_ptr(), 32 * 32) };
        let n = if n > 0 { n as usize / 32 } else { 0 };
        let table = TABLE.load(Acquire);
        // SAFETY: the writer frees the table only after this thread has exited.
        let t = (!table.is_null()).then(|| unsafe { &*table });
        // (start, length, faulting page): the range to unprotect, and the page alone if the
        // range cannot be (part of it was unmapped since the snapshot).
        let mut pending = [(0u64, 0u64, 0u64); 64];
        let mut npending = 0usize;
        for &r in &retry[..nretry] {
            pending[npending] = r;
            npending += 1;
        }
        for m in &msgs[..n] {
            let ev = m[0] & 0xff;
            match (ev, t) {
                (EVENT_PAGEFAULT, _) => {
                    let addr = m[2] & !(PAGE - 1);
                    let range = match (m[1] & PAGEFAULT_FLAG_WP != 0, t) {
                        (true, Some(t)) => {
                            let t0 = sys::monotonic_ns();
                            let r = t.save_around(addr, around.block());
                            around.busy(t0, sys::monotonic_ns());
                            r
                        }
                        (true, None) => pre_block(addr),
                        _ => (addr, PAGE),
                    };
                    if npending < pending.len() {
                        pending[npending] = (range.0, range.1, addr);
                        npending += 1;
                    } else {
                        // No room to remember it: wake the thread, whose write faults again
                        // and comes back in a later read.
                        wake(uffd, range.0, range.1);
                    }
                }
                (EVENT_UNMAP, Some(t)) => t.check_released(m[1], m[2], LOST_UNMAP),
                (EVENT_REMOVE, Some(t)) => t.check_released(m[1], m[2], LOST_REMOVE),
                (EVENT_REMAP, Some(t)) => t.check_released(m[1], m[1] + m[3], LOST_REMAP),
                _ => {}
            }
        }
        nretry = 0;
        for &(start, len, addr) in &pending[..npending] {
            let mut r = protect_inner(uffd, start, len, false, true);
            if r.is_err() && r != Err(libc::EAGAIN) && len > PAGE {
                r = protect_inner(uffd, addr, PAGE, false, true);
            }
            if r == Err(libc::EAGAIN) {
                retry[nretry] = (start, len, addr);
                nretry += 1;
            }
        }
        if n == 0 && nretry == 0 {
            return;
        }
        if n == 0 {
            // Only faults waiting for an event to be read by someone: let the kernel move on.
            // SAFETY: sched_yield has no arguments.
            unsafe { sc!(libc::SYS_sched_yield) };
        }
    }
}

pub(super) static COPY_AHEAD: AtomicU8 = AtomicU8::new(0);

pub fn set_copy_ahead(c: CopyAhead) {
    COPY_AHEAD.store(c as u8, Relaxed);
}

/// Whether the writer should copy ahead now: the program is writing all over unsaved memory
/// (see [`HOT_UNTIL`]), unless `SNAPSHIM_COPY_AHEAD` says otherwise.
pub fn hot() -> bool {
    match COPY_AHEAD.load(Relaxed) {
        x if x == CopyAhead::Off as u8 => false,
        x if x == CopyAhead::Always as u8 => true,
        _ => sys::monotonic_ns() < HOT_UNTIL.load(Relaxed),
    }
}

/// The writer's hand while its last window is being written and the program is [`hot`]: saves
/// and unprotects the block of [`around_cap`] bytes below `*back` (a position in `t.regions`,
/// walking down from the end), unless that reaches `front`, where the writer is. False when
/// there is nothing left to do from this end.
pub fn help_from_end(t: &Table, back: &mut (usize, u64), front: u64) -> bool {
    loop {
        let (ri, end) = *back;
        let Some(r) = t.regions.get(ri) else {
            return false;
        };
        if end <= r.start || !r.registered {
            if ri == 0 {
                return false;
            }
            *back = (ri - 1, t.regions[ri - 1].end);
            continue;
        }
        let w = around_cap();
        let from = ((end - 1) & !(w - 1)).max(r.start);
        if from < front {
            return false;
        }
        if let Some(n) = t.save_block(r, from, end) {
            t.ahead.fetch_add(n, Relaxed);
            unprotect(t, from, end - from);
        }
        *back = (ri, from);
        return true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// One test, because the largest block is a process-wide setting.
    #[test]
    fn fault_around_blocks_grow_with_a_busy_server_and_shrink_when_idle() {
        set_fault_around(snapshim_image::settings::DEFAULT_FAULT_AROUND);
        let mut a = Around::new();
        assert_eq!(a.block(), 16 << 10);
        // The first report closes the interval since 0: idle, blocks stay at the smallest.
        a.busy(100 * MS, 100 * MS);
        assert_eq!(a.block(), 16 << 10);
        // Busy 5 of 10 ms: doubles; within an interval nothing changes.
        a.busy(101 * MS, 106 * MS);
        assert_eq!(a.block(), 16 << 10);
        a.busy(109 * MS, 110 * MS);
        assert_eq!(a.block(), 32 << 10);
        // Busy 1 of 10 ms (a tenth, not more): stays.
        a.busy(119 * MS, 120 * MS);
        assert_eq!(a.block(), 32 << 10);
        // Busy well under a fortieth: halves, never below 16 KiB.
        a.busy(130 * MS, 130 * MS + 100_000);
        assert_eq!(a.block(), 16 << 10);
        a.busy(140 * MS, 140 * MS);
        assert_eq!(a.block(), 16 << 10);
        // Always busy: up to the largest block, 2 MiB, and the program counts as hot.
        let mut t = 140 * MS;
        for _ in 0..20 {
            a.busy(t, t + 10 * MS);
            t += 10 * MS;
        }
        assert_eq!(a.block(), 2 << 20);
        assert_eq!(HOT_UNTIL.load(Relaxed), t + 20 * MS);
        // SNAPSHIM_FAULT_AROUND caps the block, rounded down to a power of two in [4 KiB, 2 MiB].
        set_fault_around(100 << 10);
        assert_eq!(a.block(), 64 << 10);
        set_fault_around(1);
        assert_eq!(a.block(), 4 << 10);
        set_fault_around(1 << 30);
        assert_eq!(a.block(), 2 << 20);
        set_fault_around(snapshim_image::settings::DEFAULT_FAULT_AROUND);
        HOT_UNTIL.store(0, Relaxed);
    }
}
