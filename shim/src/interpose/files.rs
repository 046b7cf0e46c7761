//! `inotify_add_watch`: the kernel tells a checkpoint which inode each watch is on, not the
//! path; the path the program gave is noted here for the capture (`objects::inotify`).
#![allow(unsafe_code)]

use core::ffi::c_char;

use libc::c_int;

use super::memory::int_result;
use crate::objects::inotify;
use crate::sys::sc;

/// # Safety
/// As `inotify_add_watch(2)`: `path` is a NUL-terminated string.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn inotify_add_watch(fd: c_int, path: *const c_char, mask: u32) -> c_int {
    // SAFETY: the program's arguments, passed on as they are.
    let r = unsafe { sc!(libc::SYS_inotify_add_watch, fd, path, mask) };
    if r >= 0 {
        // SAFETY: the kernel just read `path` as a string.
        unsafe { inotify::note_watch(path, mask) };
    }
    int_result(r)
}
