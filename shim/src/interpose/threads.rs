//! Threads: every thread the program creates runs a hook of ours as it ends (see
//! `engine::uffd::thread_exiting`): glibc gives most of a dead thread's stack back with its
//! internal madvise, and the kernel's last write to the thread's descriptor cannot wait for the
//! fault server once the thread is exiting.
#![allow(unsafe_code)]

use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering::*};

use libc::c_int;

use super::malloc::{free, malloc};

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
        free(boxed);
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
    if !crate::state::ACTIVE.load(Relaxed) {
        // SAFETY: the caller's arguments, unchanged.
        return unsafe { real(thread, attr, start, arg) };
    }
    // SAFETY: the program's malloc (the program's thread, not parked); the block is handed to
    // the new thread, or freed below.
    let b = unsafe { malloc(2 * core::mem::size_of::<usize>()) } as *mut [usize; 2];
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
        unsafe { free(b as *mut c_void) };
    }
    r
}
