//! The shim's own memory allocator: it never calls the malloc it interposes, takes no lock, and
//! keeps the writer's temporary allocations out of the image.
//!
//! - Normally every allocation is its own anonymous mapping (the shim allocates rarely: at start
//!   and around checkpoints), so there is no allocator state that a parked thread could be in the
//!   middle of changing.
//! - While the writer runs, the writer's allocations come from a bump region in the reserved
//!   range, which no image contains; it is reset when the writer finishes. Nothing allocated by
//!   the writer may outlive it. Other threads (the program runs on during a `uffd` flush) keep
//!   allocating with mmap: scratch memory goes away under them when the writer ends.
#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use snapshim_image::layout::{SCRATCH_END, SCRATCH_START};

use crate::sys::{check, sc};

pub struct ShimAlloc;

/// Set while the writer runs: allocations come from the scratch region.
pub static SCRATCH_ACTIVE: AtomicBool = AtomicBool::new(false);
/// The thread whose allocations come from scratch (the writer).
static SCRATCH_OWNER: AtomicI32 = AtomicI32::new(0);
static SCRATCH_NEXT: AtomicU64 = AtomicU64::new(SCRATCH_START);

const PAGE: usize = 4096;

/// Makes the scratch region usable for the calling thread and empties it.
pub fn scratch_begin() -> crate::sys::Result<()> {
    crate::sys::mmap_fixed(
        SCRATCH_START,
        SCRATCH_END - SCRATCH_START,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_NORESERVE,
    )?;
    SCRATCH_NEXT.store(SCRATCH_START, Ordering::Relaxed);
    SCRATCH_OWNER.store(crate::sys::gettid(), Ordering::Relaxed);
    SCRATCH_ACTIVE.store(true, Ordering::SeqCst);
    Ok(())
}

/// Ends the scratch period and gives the memory back (the range stays reserved).
pub fn scratch_end() {
    SCRATCH_ACTIVE.store(false, Ordering::SeqCst);
    let _ = crate::sys::mmap_fixed(
        SCRATCH_START,
        SCRATCH_END - SCRATCH_START,
        libc::PROT_NONE,
        libc::MAP_NORESERVE,
    );
}

fn scratch_alloc(layout: Layout) -> *mut u8 {
    let align = layout.align().max(16) as u64;
    let mut cur = SCRATCH_NEXT.load(Ordering::Relaxed);
    loop {
        let start = (cur + align - 1) & !(align - 1);
        let end = start + layout.size() as u64;
        if end > SCRATCH_END {
            return core::ptr::null_mut();
        }
        match SCRATCH_NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return start as *mut u8,
            Err(c) => cur = c,
        }
    }
}

/// Whether this thread's allocations come from scratch now. A forked writer child has another
/// TID: it maps its own memory.
fn uses_scratch() -> bool {
    SCRATCH_ACTIVE.load(Ordering::Relaxed)
        && SCRATCH_OWNER.load(Ordering::Relaxed) == crate::sys::gettid()
}

fn in_scratch(p: *mut u8) -> bool {
    (SCRATCH_START..SCRATCH_END).contains(&(p as u64))
}

/// Mapping size for a layout, in whole pages (alignment up to a page comes with mmap).
fn map_len(layout: Layout) -> usize {
    (layout.size() + PAGE - 1) & !(PAGE - 1)
}

// SAFETY: every pointer returned is either a fresh private mapping of at least `size` bytes
// aligned to `align`, or a disjoint slice of the scratch region; dealloc unmaps exactly what
// alloc mapped (the same layout gives the same length).
unsafe impl GlobalAlloc for ShimAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if uses_scratch() {
            return scratch_alloc(layout);
        }
        if layout.align() > PAGE {
            return core::ptr::null_mut(); // never needed by the shim
        }
        let len = map_len(layout).max(PAGE);
        // SAFETY: a fresh anonymous mapping, no fixed address.
        let r = check(unsafe {
            sc!(
                libc::SYS_mmap,
                0,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1i64,
                0
            )
        });
        r.map_or(core::ptr::null_mut(), |a| a as *mut u8)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_scratch(ptr) {
            return;
        }
        let len = map_len(layout).max(PAGE);
        // SAFETY: exactly ptr..ptr+len was mapped by alloc for this layout.
        unsafe { sc!(libc::SYS_munmap, ptr, len) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the new layout has the old alignment and a non-zero size (GlobalAlloc contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !in_scratch(ptr) && !uses_scratch() && map_len(new_layout) <= map_len(layout).max(PAGE) {
            return ptr;
        }
        // SAFETY: as in alloc.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and at least min(old, new) bytes long.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}
