//! Functions the shim interposes in the program (`LD_PRELOAD` puts ours first).
//!
//! - The signal API, so the program cannot block, ignore or replace the shim's two signals (the
//!   trigger, SIGUSR2 by default, and the internal quiesce signal). What the program asks for on
//!   those signals is remembered and reported as a clash, once.
//! - The mmap family, so the program cannot map over the range kept for the restorer, and so the
//!   shim sees large mappings (counted; later engines hook here).
//! - The malloc family, forwarded to glibc's own entry points (`__libc_malloc`...), never through
//!   `dlsym`, so there is no recursion; large allocations are counted.
//!
//! `/proc/self/maps` stays the truth about memory: glibc maps memory internally without passing
//! through these symbols.
#![allow(unsafe_code)]

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

use libc::{c_int, sigset_t, size_t};
use snapshim_image::layout::{RESERVED_END, RESERVED_START};

use crate::state::{HUGEPAGES, HUGE_MIN, QUIESCE_SIG, TRIGGER_SIG};
use crate::sys::{self, sc};

/// Advises the whole 2 MiB extents of a large allocation to use transparent huge pages:
/// write-protecting or forking huge-page memory costs one entry per 2 MiB instead of 512.
/// Memory cost: the first touch of any byte of an extent allocates all 2 MiB of it.
fn advise_huge(ptr: *mut c_void, len: usize) {
    if len < HUGE_MIN || ptr.is_null() || !HUGEPAGES.load(Relaxed) {
        return;
    }
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize + HUGE - 1) & !(HUGE - 1);
    let end = (ptr as usize + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice only, on memory the program just got.
        unsafe {
            sys::syscall6(
                libc::SYS_madvise,
                start as u64,
                (end - start) as u64,
                libc::MADV_HUGEPAGE as u64,
                0,
                0,
                0,
            )
        };
    }
}

fn is_ours(sig: c_int) -> bool {
    sig != 0 && (sig == TRIGGER_SIG.load(Relaxed) || sig == QUIESCE_SIG.load(Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Signals

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SigmaskFn = unsafe extern "C" fn(c_int, *const sigset_t, *mut sigset_t) -> c_int;

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);

fn next(cache: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = cache.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds glibc's definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        cache.store(f, Relaxed);
    }
    f
}

/// glibc's sigaction, bypassing our interposition (used by the shim itself).
pub fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let f = next(&REAL_SIGACTION, c"sigaction");
    // SAFETY: f is glibc's sigaction (non-null in any glibc process); pointers come from callers
    // that pass valid or null structures.
    unsafe { core::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
}

/// What the program asked for on our signals: handler and flags (kept, never installed).
static APP_HANDLER: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static APP_FLAGS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static CLASH_REPORTED: AtomicBool = AtomicBool::new(false);

fn clash(sig: c_int) {
    if !CLASH_REPORTED.swap(true, Relaxed) {
        let which = if sig == TRIGGER_SIG.load(Relaxed) {
            "checkpoint"
        } else {
            "internal"
        };
        let mut msg = [0u8; 200];
        let text = sys::format_into(&mut msg, &[
            "snapshim: the program sets a handler for signal ",
            sys::itoa(sig as u64, &mut [0u8; 20]),
            ", snapshim's ", which,
            " signal; the program's handler will not run (choose another with SNAPSHIM_SIGNAL)\n",
        ]);
        let _ = sys::write_all(2, text);
    }
}

/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if !is_ours(sig) {
        return real_sigaction(sig, act, old);
    }
    let i = (sig != TRIGGER_SIG.load(Relaxed)) as usize;
    if !old.is_null() {
        // SAFETY: old is valid per the contract.
        unsafe {
            core::ptr::write_bytes(old, 0, 1);
            (*old).sa_sigaction = APP_HANDLER[i].load(Relaxed);
            (*old).sa_flags = APP_FLAGS[i].load(Relaxed) as c_int;
        }
    }
    if !act.is_null() {
        // SAFETY: act is valid per the contract.
        let (h, f) = unsafe { ((*act).sa_sigaction, (*act).sa_flags) };
        APP_HANDLER[i].store(h, Relaxed);
        APP_FLAGS[i].store(f as usize, Relaxed);
        if h != libc::SIG_DFL {
            clash(sig);
        }
    }
    0
}

/// # Safety
/// As `signal(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: zeroed sigaction is a valid value.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: act and old are valid; BSD semantics as glibc's signal().
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers are to live structures.
    if unsafe { sigaction(sig, &act, &mut old) } < 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

/// # Safety
/// As `signal(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: forwarded with the same contract.
    unsafe { signal(sig, handler) }
}

/// Removes our signals from a set the program wants to block.
fn filtered(how: c_int, set: *const sigset_t, copy: &mut sigset_t) -> *const sigset_t {
    if set.is_null() || how == libc::SIG_UNBLOCK {
        return set;
    }
    // SAFETY: set is valid per the caller's contract; copy is a live sigset.
    unsafe {
        *copy = *set;
        for s in [TRIGGER_SIG.load(Relaxed), QUIESCE_SIG.load(Relaxed)] {
            if s != 0 {
                libc::sigdelset(copy, s);
            }
        }
    }
    copy
}

/// Calls glibc's `name` (sigprocmask or pthread_sigmask) with our signals taken out of a set
/// the program wants blocked.
///
/// # Safety
/// As `sigprocmask(2)`: `set` and `old` are null or valid.
unsafe fn masked(
    cache: &AtomicUsize,
    name: &core::ffi::CStr,
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: an all-zero sigset is valid.
    let mut copy: sigset_t = unsafe { core::mem::zeroed() };
    let set = filtered(how, set, &mut copy);
    let f = next(cache, name);
    // SAFETY: f is glibc's function of that signature; sets are valid or null.
    unsafe { core::mem::transmute::<usize, SigmaskFn>(f)(how, set, old) }
}

/// # Safety
/// As `sigprocmask(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's contract.
    unsafe { masked(&REAL_SIGPROCMASK, c"sigprocmask", how, set, old) }
}

/// # Safety
/// As `pthread_sigmask(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    // SAFETY: forwarded with the caller's contract.
    unsafe { masked(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask", how, set, old) }
}

// ---------------------------------------------------------------------------------------------
// The mmap family

fn hits_reserved(addr: usize, len: size_t) -> bool {
    let (a, e) = (addr as u64, addr as u64 + len as u64);
    a < RESERVED_END && e > RESERVED_START
}

/// A fixed mapping into the restorer's range is refused with ENOMEM (the range is in use).
fn refuse_reserved(fixed: bool, addr: usize, len: size_t) -> bool {
    let refuse = fixed && hits_reserved(addr, len) && crate::state::RESERVED.load(Relaxed);
    if refuse {
        set_errno(libc::ENOMEM);
    }
    refuse
}

/// A raw mmap/mremap result as the C API returns it (MAP_FAILED and errno on failure).
fn map_result(r: i64) -> *mut c_void {
    c_result(r, |a| a as *mut c_void, libc::MAP_FAILED)
}

/// A raw result as a C function returns it: `ok(value)`, or `failed` with errno set.
fn c_result<T>(r: i64, ok: impl FnOnce(i64) -> T, failed: T) -> T {
    match sys::check(r) {
        Ok(v) => ok(v),
        Err(e) => {
            set_errno(e);
            failed
        }
    }
}

fn set_errno(e: c_int) {
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// # Safety
/// As `mmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    if refuse_reserved(
        flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0,
        addr as usize,
        len,
    ) {
        return libc::MAP_FAILED;
    }
    if flags & libc::MAP_FIXED != 0 {
        crate::engine::uffd::save_range(addr as u64, len as u64); // the old pages go
    }
    // SAFETY: forwarded unchanged; the kernel validates everything.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_mmap,
            addr as u64,
            len as u64,
            prot as u64,
            flags as u64,
            fd as i64 as u64,
            off as u64,
        )
    };
    let a = map_result(r);
    if a != libc::MAP_FAILED && flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_SHARED == 0 {
        advise_huge(a, len);
    }
    a
}

/// # Safety
/// As `mmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: same function on x86_64.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// As `munmap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    crate::engine::uffd::save_range(addr as u64, len as u64);
    // SAFETY: forwarded unchanged.
    let r = unsafe { sc!(libc::SYS_munmap, addr, len) };
    int_result(r)
}

/// Advice that throws page contents away.
const DISCARDING_ADVICE: [c_int; 4] = [
    libc::MADV_DONTNEED,
    libc::MADV_FREE,
    libc::MADV_REMOVE,
    24, // MADV_DONTNEED_LOCKED
];

/// # Safety
/// As `madvise(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if DISCARDING_ADVICE.contains(&advice) {
        crate::engine::uffd::save_range(addr as u64, len as u64);
        crate::objects::memory::anonymize_image_pages(addr as u64, len as u64);
    }
    // SAFETY: forwarded unchanged.
    let r = unsafe { sc!(libc::SYS_madvise, addr, len, advice) };
    int_result(r)
}

/// A raw result as a C function returning int gives it (-1 and errno on failure).
fn int_result(r: i64) -> c_int {
    c_result(r, |v| v as c_int, -1)
}

/// # Safety
/// As `mremap(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: usize,
) -> *mut c_void {
    // mremap is variadic in C; on x86_64 a variadic caller passes the optional fifth argument in
    // the same register as a fixed one, and it is only meaningful with MREMAP_FIXED.
    let new_addr = if flags & libc::MREMAP_FIXED != 0 {
        new_addr
    } else {
        0
    };
    if refuse_reserved(flags & libc::MREMAP_FIXED != 0, new_addr, new_len) {
        return libc::MAP_FAILED;
    }
    // The pages move (or shrink away), and a fixed target's old pages go.
    crate::engine::uffd::save_range(old as u64, old_len as u64);
    crate::incremental::before_mremap(old as u64, old_len as u64);
    if new_addr != 0 {
        crate::engine::uffd::save_range(new_addr as u64, new_len as u64);
    }
    // SAFETY: forwarded unchanged.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_mremap,
            old as u64,
            old_len as u64,
            new_len as u64,
            flags as u64,
            new_addr as u64,
            0,
        )
    };
    map_result(r)
}

// ---------------------------------------------------------------------------------------------
// The malloc family

extern "C" {
    fn __libc_malloc(size: size_t) -> *mut c_void;
    fn __libc_calloc(n: size_t, size: size_t) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: size_t) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: size_t, size: size_t) -> *mut c_void;
}

/// # Safety
/// As `malloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: size_t) -> *mut c_void {
    // SAFETY: glibc's malloc.
    let r = unsafe { __libc_malloc(size) };
    advise_huge(r, size);
    r
}

/// # Safety
/// As `calloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    // SAFETY: glibc's calloc.
    let r = unsafe { __libc_calloc(n, size) };
    advise_huge(r, n.saturating_mul(size));
    r
}

/// During a flush, the pages of a chunk glibc mapped by itself are saved before glibc unmaps or
/// moves them (it calls its internal munmap/mremap, which nobody can interpose).
///
/// # Safety
/// `p` is null or a live pointer from glibc's allocator.
unsafe fn save_mmapped_chunk(p: *mut c_void) {
    if p.is_null() || !crate::engine::uffd::flushing() {
        return;
    }
    // glibc's chunk header: prev_size, then size with flag bit 1 = IS_MMAPPED; a mapped chunk's
    // prev_size is its offset from the start of its mapping.
    // SAFETY: the two words before a glibc allocation are its chunk header.
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
    // SAFETY: p comes from the program, as realloc requires.
    unsafe { save_mmapped_chunk(p) };
    // SAFETY: glibc's realloc on a pointer from glibc's allocator.
    let r = unsafe { __libc_realloc(p, size) };
    advise_huge(r, size);
    r
}

/// # Safety
/// As `free(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: p comes from the program, as free requires.
    unsafe { save_mmapped_chunk(p) };
    // SAFETY: glibc's free on a pointer from glibc's allocator.
    unsafe { __libc_free(p) }
}

/// # Safety
/// As `memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memalign(align: size_t, size: size_t) -> *mut c_void {
    // SAFETY: glibc's memalign.
    let r = unsafe { __libc_memalign(align, size) };
    advise_huge(r, size);
    r
}

/// # Safety
/// As `aligned_alloc(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    // SAFETY: same contract as memalign.
    unsafe { memalign(align, size) }
}

/// # Safety
/// As `posix_memalign(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    if align < core::mem::size_of::<usize>() || !align.is_power_of_two() {
        return libc::EINVAL;
    }
    // SAFETY: glibc's memalign.
    let p = unsafe { memalign(align, size) };
    if p.is_null() && size != 0 {
        return libc::ENOMEM;
    }
    // SAFETY: out is valid per the contract.
    unsafe { *out = p };
    0
}

// ---------------------------------------------------------------------------------------------
// Threads: every thread the program creates runs a hook of ours as it ends (see
// uffd::thread_exiting): glibc gives most of a dead thread's stack back with its internal
// madvise, and the kernel's last write to the thread's descriptor cannot wait for the fault
// server once the thread is exiting.

type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreate = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartRoutine,
    *mut c_void,
) -> c_int;

/// glibc's pthread_create, looked up once.
static REAL_PTHREAD_CREATE: AtomicUsize = AtomicUsize::new(0);

extern "C" {
    fn __cxa_thread_atexit_impl(
        dtor: extern "C" fn(*mut c_void),
        obj: *mut c_void,
        dso: *mut c_void,
    ) -> c_int;
    static __dso_handle: u8;
}

fn real_pthread_create() -> Option<PthreadCreate> {
    let mut f = REAL_PTHREAD_CREATE.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT finds glibc's definition.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        REAL_PTHREAD_CREATE.store(f, Relaxed);
    }
    // SAFETY: a non-null result of dlsym for pthread_create is that function.
    (f != 0).then(|| unsafe { core::mem::transmute::<usize, PthreadCreate>(f) })
}

extern "C" fn on_thread_exit(_: *mut c_void) {
    crate::engine::uffd::thread_exiting();
}

/// The new thread's first frame: registers the exit hook, then runs the program's routine.
extern "C" fn thread_start(boxed: *mut c_void) -> *mut c_void {
    // SAFETY: boxed is the two-word block pthread_create allocated for this thread, ours now.
    let (start, arg) = unsafe {
        let b = boxed as *mut [usize; 2];
        let v = *b;
        __libc_free(boxed);
        (
            core::mem::transmute::<usize, StartRoutine>(v[0]),
            v[1] as *mut c_void,
        )
    };
    // SAFETY: registers a plain function for this thread's exit, tied to this library.
    unsafe {
        __cxa_thread_atexit_impl(
            on_thread_exit,
            core::ptr::null_mut(),
            &__dso_handle as *const u8 as *mut c_void,
        )
    };
    start(arg)
}

/// # Safety
/// As `pthread_create(3)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    let Some(real) = real_pthread_create() else {
        return libc::EAGAIN;
    };
    // SAFETY: glibc's malloc; the block is handed to the new thread, or freed below.
    let b = unsafe { __libc_malloc(2 * core::mem::size_of::<usize>()) } as *mut [usize; 2];
    if b.is_null() {
        // SAFETY: the caller's arguments, unchanged.
        return unsafe { real(thread, attr, start, arg) };
    }
    // SAFETY: b is a fresh allocation of two words.
    unsafe { *b = [start as usize, arg as usize] };
    // SAFETY: the caller's arguments, with our first frame in front of the routine.
    let r = unsafe { real(thread, attr, thread_start, b as *mut c_void) };
    if r != 0 {
        // SAFETY: the thread was not created, the block is still ours.
        unsafe { __libc_free(b as *mut c_void) };
    }
    r
}
