//! Resume: parked threads are let go (the pause ends); in a restored process the helper waits
//! for every thread's fix-ups, then takes the reserved range back.

use core::sync::atomic::Ordering::*;

use snapshim_image::layout::{RESERVED_END, RESERVED_START};

use super::{park, trigger};
use crate::objects::{memory, threads, timers};
use crate::sys;

/// Lets parked threads go (once per snapshot).
pub fn release() {
    if park::ACTIVE.swap(0, SeqCst) != 0 {
        park::RELEASE.fetch_add(1, Release);
        sys::futex_wake(&park::RELEASE);
    }
}

/// In a restored process: wait for every thread's fix-ups, then take the reserved range back
/// (it still holds the restorer, which the threads have left by now).
pub fn after_restore(nthreads: usize) {
    // The snapshot was taken while the writer ran: its scratch heap was active, and is gone now.
    crate::sys::alloc::SCRATCH_ACTIVE.store(false, SeqCst);
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
