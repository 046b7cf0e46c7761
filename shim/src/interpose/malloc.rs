//! The malloc family (`malloc`, `calloc`, `realloc`, `free`, `memalign`, `aligned_alloc`,
//! `posix_memalign`), forwarded to the *next* definition of each, looked up with
//! `dlsym(RTLD_NEXT)`: glibc's, or the allocator the program brings (jemalloc, tcmalloc,
//! mimalloc, linked or preloaded after the shim). Every function of the family the shim does not
//! export (`malloc_usable_size`, `sdallocx`, `mallocx`, `reallocarray`...) resolves to that same
//! allocator, so a program never mixes two allocators. An allocator that comes before the shim
//! (in the executable, or preloaded in front of it) is simply never routed through here.
//!
//! Why the shim exports the family at all: for glibc's allocator only, which maps, moves and
//! unmaps its large chunks with its internal `mmap`/`mremap`/`munmap` that no one can interpose:
//!
//! - during a `uffd` flush, the pages of such a chunk are saved before `free` or `realloc` hands
//!   it to glibc (`save_mmapped_chunk`); without it the flush would lose them and retry with fork;
//! - with `SNAPSHIM_HUGEPAGES=1`, large allocations are advised to use huge pages.
//!
//! Other allocators map, unmap and discard through the interposed mmap family (`memory.rs`),
//! which does both for them; with them these functions only forward. Nothing here is needed for
//! a checkpoint taken while a thread sits inside the allocator: the shim never calls the
//! program's allocator while threads are parked (it has its own, `sys/alloc.rs`).
//!
//! Looking the definitions up: `dlsym` may itself allocate (glibc's, on an error), which would
//! come back here before anything is known. The thread that resolves is noted, and what it asks
//! for meanwhile comes from a small static buffer (`BOOT`), whose blocks `free` ignores.
#![allow(unsafe_code)]

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::*};

use libc::{c_int, size_t};

use crate::sys::{self, sc};

/// The family, in the order of [`NEXT`].
const NAMES: [&core::ffi::CStr; 7] = [
    c"malloc",
    c"calloc",
    c"realloc",
    c"free",
    c"memalign",
    c"aligned_alloc",
    c"posix_memalign",
];
const MALLOC: usize = 0;
const CALLOC: usize = 1;
const REALLOC: usize = 2;
const FREE: usize = 3;
const MEMALIGN: usize = 4;
const ALIGNED_ALLOC: usize = 5;
const POSIX_MEMALIGN: usize = 6;

/// The next definition of each function of [`NAMES`], once [`READY`].
static NEXT: [AtomicUsize; 7] = [const { AtomicUsize::new(0) }; 7];
/// Whether the next `malloc` is glibc's own (its chunk layout may then be read).
static GLIBC: AtomicBool = AtomicBool::new(false);

/// Set once every entry of [`NEXT`] is.
static READY: AtomicBool = AtomicBool::new(false);
/// The threads looking the definitions up (0: a free slot). Threads that race to be first each
/// look up for themselves (the answers are the same); they cannot wait for one another, since
/// `dlsym` takes the loader's lock, which a thread calling malloc from `dlopen` holds.
static RESOLVERS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];

/// Memory for the resolving thread's own allocations (dlsym's).
struct Boot(core::cell::UnsafeCell<[u8; BOOT_BYTES]>);
// SAFETY: disjoint pieces are handed out by an atomic bump pointer, never reused.
unsafe impl Sync for Boot {}
const BOOT_BYTES: usize = 16 << 10;
#[repr(align(64))]
struct BootAligned(Boot);
static BOOT: BootAligned = BootAligned(Boot(core::cell::UnsafeCell::new([0; BOOT_BYTES])));
static BOOT_NEXT: AtomicUsize = AtomicUsize::new(0);

fn boot_range() -> (usize, usize) {
    let start = BOOT.0 .0.get() as usize;
    (start, start + BOOT_BYTES)
}

fn in_boot(p: *mut c_void) -> bool {
    let (start, end) = boot_range();
    (start..end).contains(&(p as usize))
}

/// A block of the static buffer (zeroed: it is never reused), or null when it is used up.
fn boot_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(16);
    let (start, end) = boot_range();
    let mut cur = BOOT_NEXT.load(Relaxed);
    loop {
        let at = (start + cur + align - 1) & !(align - 1);
        if at.saturating_add(size) > end {
            return core::ptr::null_mut();
        }
        match BOOT_NEXT.compare_exchange(cur, at + size - start, Relaxed, Relaxed) {
            Ok(_) => return at as *mut c_void,
            Err(c) => cur = c,
        }
    }
}

/// The next definition of function `i` of [`NAMES`]; 0 while this thread is looking them up.
/// Looking up is idempotent, so threads racing to do it first all get the same answers.
fn next(i: usize) -> usize {
    if READY.load(Acquire) {
        return NEXT[i].load(Relaxed);
    }
    let me = sys::gettid();
    if RESOLVERS.iter().any(|r| r.load(Relaxed) == me) {
        return 0; // a nested call from dlsym: served from BOOT
    }
    let slot = RESOLVERS
        .iter()
        .find(|r| r.compare_exchange(0, me, Relaxed, Relaxed).is_ok());
    let mut found = [0usize; 7];
    for (f, name) in found.iter_mut().zip(NAMES) {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT searches the objects after ours.
        *f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    }
    if found.contains(&0) {
        let _ = sys::write_all(2, b"snapshim: the malloc family has no next definition\n");
        // SAFETY: ends the process; nothing could allocate.
        unsafe { sc!(libc::SYS_exit_group, 127) };
    }
    for (slot, f) in NEXT.iter().zip(found) {
        slot.store(f, Relaxed);
    }
    GLIBC.store(in_libc(found[MALLOC]), Relaxed);
    READY.store(true, Release);
    if let Some(r) = slot {
        r.store(0, Relaxed);
    }
    NEXT[i].load(Relaxed)
}

/// Whether code address `f` lies in glibc (the object that defines `gnu_get_libc_version`).
fn in_libc(f: usize) -> bool {
    extern "C" {
        fn gnu_get_libc_version() -> *const libc::c_char;
    }
    let base = |a: usize| {
        // SAFETY: a zeroed Dl_info is a valid out-parameter; dladdr only reads loader state.
        let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let ok = unsafe { libc::dladdr(a as *const c_void, &mut info) } != 0;
        ok.then_some(info.dli_fbase as usize)
    };
    let libc_base = base(gnu_get_libc_version as *const () as usize);
    libc_base.is_some() && base(f) == libc_base
}

type Alloc1 = unsafe extern "C" fn(size_t) -> *mut c_void;
type Alloc2 = unsafe extern "C" fn(size_t, size_t) -> *mut c_void;
type Realloc = unsafe extern "C" fn(*mut c_void, size_t) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type PosixMemalign = unsafe extern "C" fn(*mut *mut c_void, size_t, size_t) -> c_int;

/// Function `i` as type `F`, or `None` while this thread is looking the family up.
///
/// # Safety
/// `F` is the C type of function `i` of [`NAMES`].
unsafe fn next_as<F: Copy>(i: usize) -> Option<F> {
    let f = next(i);
    // SAFETY: a non-null dlsym result for NAMES[i] is that function; F is its type (caller).
    (f != 0).then(|| unsafe { core::mem::transmute_copy::<usize, F>(&f) })
}

/// glibc's allocator maps large chunks itself: advise them (see `memory::advise_huge`).
fn advise(p: *mut c_void, len: usize) {
    if GLIBC.load(Relaxed) {
        super::memory::advise_huge(p, len);
    }
}

/// # Safety
/// As `malloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: size_t) -> *mut c_void {
    // SAFETY: malloc's type.
    let Some(f) = (unsafe { next_as::<Alloc1>(MALLOC) }) else {
        return boot_alloc(size, 16);
    };
    // SAFETY: the next malloc, with the caller's argument.
    let r = unsafe { f(size) };
    advise(r, size);
    r
}

/// # Safety
/// As `calloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    // SAFETY: calloc's type.
    let Some(f) = (unsafe { next_as::<Alloc2>(CALLOC) }) else {
        return n
            .checked_mul(size)
            .map_or(core::ptr::null_mut(), |b| boot_alloc(b, 16));
    };
    // SAFETY: the next calloc, with the caller's arguments.
    let r = unsafe { f(n, size) };
    advise(r, n.saturating_mul(size));
    r
}

/// During a flush, the pages of a chunk glibc mapped by itself are saved before glibc unmaps or
/// moves them (it calls its internal munmap/mremap, which nobody can interpose).
///
/// # Safety
/// `p` is null or a live pointer from the next allocator.
unsafe fn save_mmapped_chunk(p: *mut c_void) {
    if p.is_null() || !GLIBC.load(Relaxed) || !crate::engine::uffd::flushing() {
        return;
    }
    // glibc's chunk header: prev_size, then size with flag bit 1 = IS_MMAPPED; a mapped chunk's
    // prev_size is its offset from the start of its mapping.
    // SAFETY: the allocator is glibc's, and the two words before its allocations are the chunk
    // header.
    let (prev, size) = unsafe {
        let h = (p as *const usize).sub(2);
        (*h, *h.add(1))
    };
    if size & 2 != 0 {
        let start = (p as usize - 2 * core::mem::size_of::<usize>()) - prev;
        crate::engine::uffd::save_range(start as u64, (prev + (size & !7)) as u64);
    }
}

/// # Safety
/// As `realloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: size_t) -> *mut c_void {
    if in_boot(p) {
        // SAFETY: as malloc; the old block is ours and stays readable for ever.
        let new = unsafe { malloc(size) };
        if !new.is_null() {
            let avail = boot_range().1 - p as usize;
            // SAFETY: new holds size bytes; p..p+avail is inside BOOT.
            unsafe {
                core::ptr::copy_nonoverlapping(p as *const u8, new as *mut u8, size.min(avail))
            };
        }
        return new;
    }
    // SAFETY: realloc's type.
    let Some(f) = (unsafe { next_as::<Realloc>(REALLOC) }) else {
        return boot_alloc(size, 16); // p is null: the resolver only reallocates its own blocks
    };
    // SAFETY: p comes from the program, as realloc requires.
    unsafe { save_mmapped_chunk(p) };
    // SAFETY: the next realloc on a pointer from the next allocator.
    let r = unsafe { f(p, size) };
    advise(r, size);
    r
}

/// # Safety
/// As `free(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || in_boot(p) {
        return;
    }
    // SAFETY: free's type.
    let Some(f) = (unsafe { next_as::<Free>(FREE) }) else {
        return; // the resolver frees only what it got from BOOT
    };
    // SAFETY: p comes from the program, as free requires.
    unsafe { save_mmapped_chunk(p) };
    // SAFETY: the next free on a pointer from the next allocator.
    unsafe { f(p) }
}

/// # Safety
/// As `memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memalign(align: size_t, size: size_t) -> *mut c_void {
    // SAFETY: memalign's type.
    let Some(f) = (unsafe { next_as::<Alloc2>(MEMALIGN) }) else {
        return boot_alloc(size, align);
    };
    // SAFETY: the next memalign, with the caller's arguments.
    let r = unsafe { f(align, size) };
    advise(r, size);
    r
}

/// # Safety
/// As `aligned_alloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    // SAFETY: aligned_alloc's type.
    let Some(f) = (unsafe { next_as::<Alloc2>(ALIGNED_ALLOC) }) else {
        return boot_alloc(size, align);
    };
    // SAFETY: the next aligned_alloc, with the caller's arguments.
    let r = unsafe { f(align, size) };
    advise(r, size);
    r
}

/// # Safety
/// As `posix_memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    // SAFETY: posix_memalign's type.
    let Some(f) = (unsafe { next_as::<PosixMemalign>(POSIX_MEMALIGN) }) else {
        let p = boot_alloc(size, align);
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: out is valid per the contract.
        unsafe { *out = p };
        return 0;
    };
    // SAFETY: the next posix_memalign, with the caller's arguments.
    let r = unsafe { f(out, align, size) };
    if r == 0 {
        // SAFETY: on success the allocator wrote a pointer to *out.
        advise(unsafe { *out }, size);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_forwards_to_glibc_in_a_glibc_program() {
        for (i, name) in NAMES.iter().enumerate() {
            assert_ne!(next(i), 0, "{name:?}");
        }
        assert!(GLIBC.load(Relaxed), "the test runner's malloc is glibc's");
        assert!(!in_libc(boot_alloc as *const () as usize));
        // SAFETY: the malloc family, used as C code would.
        unsafe {
            let p = malloc(100) as *mut u8;
            assert!(!p.is_null() && !in_boot(p as *mut c_void));
            p.write_bytes(7, 100);
            let q = realloc(p as *mut c_void, 5000) as *mut u8;
            assert_eq!(*q.add(99), 7);
            free(q as *mut c_void);
            let mut a = core::ptr::null_mut();
            assert_eq!(posix_memalign(&mut a, 4096, 10), 0);
            assert_eq!(a as usize % 4096, 0);
            free(a);
            let z = calloc(10, 10) as *const u8;
            assert!((0..100).all(|i| *z.add(i) == 0));
            free(z as *mut c_void);
        }
    }

    #[test]
    fn boot_blocks_are_aligned_disjoint_and_ignored_by_free() {
        let a = boot_alloc(10, 16);
        let b = boot_alloc(100, 256);
        assert!(in_boot(a) && in_boot(b));
        assert_eq!(a as usize % 16, 0);
        assert_eq!(b as usize % 256, 0);
        assert!(b as usize >= a as usize + 10);
        assert!(
            boot_alloc(BOOT_BYTES, 16).is_null(),
            "larger than what is left"
        );
        // SAFETY: a is a BOOT block: free leaves it alone, realloc copies it out.
        unsafe {
            (a as *mut u8).write_bytes(9, 10);
            free(a);
            let moved = realloc(a, 20) as *mut u8;
            assert!(!in_boot(moved as *mut c_void));
            assert_eq!(*moved.add(9), 9);
            free(moved as *mut c_void);
        }
    }
}
