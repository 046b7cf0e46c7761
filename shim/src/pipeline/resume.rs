//! Resume: parked threads are let go (the pause ends); in a restored process the helper waits
//! for every thread's fix-ups, then takes the reserved range back.
//!
//! A checkpoint that is the program's last (`snapshim checkpoint --kill`) holds the threads
//! ([`HOLD`]): they stay parked through the flush and the commit, whatever the engine, and the
//! program is killed once the image is committed ([`stop_program`]); if the checkpoint fails
//! they are let go ([`let_go`]) and the program runs on.

use core::sync::atomic::{AtomicU32, Ordering::*};

use snapshim_image::layout::{RESERVED_END, RESERVED_START};

use super::{park, trigger};
use crate::objects::{memory, threads, timers};
use crate::sys::{self, sc};

/// Non-zero while the threads are held parked for a last checkpoint: [`release`] leaves them.
pub static HOLD: AtomicU32 = AtomicU32::new(0);

/// Whether the coming snapshot is the program's last (before the quiesce).
pub fn hold(last: bool) {
    HOLD.store(last as u32, SeqCst);
}

/// Lets parked threads go (once per snapshot), unless they are held.
pub fn release() {
    if HOLD.load(SeqCst) != 0 {
        return;
    }
    if park::ACTIVE.swap(0, SeqCst) != 0 {
        park::RELEASE.fetch_add(1, Release);
        sys::futex_wake(&park::RELEASE);
    }
}

/// The last checkpoint did not commit: the held threads go on, and so does the program.
pub fn let_go() {
    HOLD.store(0, SeqCst);
    release();
}

/// The last checkpoint is committed and answered: the program ends here, its threads still
/// parked. `snapshim checkpoint --kill` first takes its own descriptors of the connections held
/// in repair mode (`objects::socket::repair`), so that they stay open, silent, until the
/// restore, then sends SIGKILL; if it has not within [`STOP_WAIT_NS`], the program kills
/// itself (its held connections then close, silently too).
pub fn stop_program() -> ! {
    let mut t = libc::timespec {
        tv_sec: (STOP_WAIT_NS / 1_000_000_000) as i64,
        tv_nsec: 0,
    };
    let mut left = t;
    // SAFETY: valid timespecs; an interrupted sleep goes on with what is left.
    while unsafe {
        sc!(
            libc::SYS_nanosleep,
            &t as *const libc::timespec,
            &mut left as *mut libc::timespec
        )
    } == -(libc::EINTR as i64)
    {
        t = left;
    }
    loop {
        // SAFETY: kill takes plain values; SIGKILL to ourselves does not return.
        unsafe { sc!(libc::SYS_kill, sys::getpid(), libc::SIGKILL) };
    }
}

/// How long a program whose last checkpoint is committed waits for the requester's SIGKILL.
pub const STOP_WAIT_NS: u64 = 30_000_000_000;

/// In a restored process: wait for every thread's fix-ups, then take the reserved range back
/// (it still holds the restorer, which the threads have left by now).
pub fn after_restore(nthreads: usize) {
    // The snapshot was taken while the writer ran: its scratch heap was active, and is gone now.
    crate::sys::alloc::SCRATCH_ACTIVE.store(false, SeqCst);
    // A last checkpoint's image: this process is its next life, not its end.
    HOLD.store(0, SeqCst);
    crate::objects::socket::repair::after_restore();
    crate::engine::uffd::after_restore();
    crate::owner::after_restore();
    memory::note_image_mappings();
    // While every restored thread still blocks signals (until NOTED): the requests that came
    // with the image are the original's to answer; requests to this process reach it once the
    // threads run again, and are kept.
    trigger::discard_stale();
    timers::restore_posix_timers();
    park::NOTED.store(1, Release);
    sys::futex_wake(&park::NOTED);
    threads::record_restored_helper();
    loop {
        let r = park::RESUMED.load(Acquire);
        if r as usize >= nthreads {
            break;
        }
        sys::futex_wait(&park::RESUMED, r, Some(100_000_000));
    }
    let _ = sys::mmap_fixed(
        RESERVED_START,
        RESERVED_END - RESERVED_START,
        libc::PROT_NONE,
        libc::MAP_NORESERVE,
    );
    park::ACTIVE.store(0, SeqCst);
}
