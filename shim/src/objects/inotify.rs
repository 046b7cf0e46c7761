//! Inotify descriptors, capture side: each watch's number (`wd`), mask and path.
//!
//! fdinfo names a watch by its inode (`inotify wd:1 ino:3c4a7 sdev:fe00000 mask:300 ...`), not
//! by path, and turning its file handle back into a path needs privileges. So the interposed
//! `inotify_add_watch` (`interpose/files.rs`) notes the path the program gave, made absolute,
//! with the inode it named ([`note_watch`]); the capture looks each watch's inode up there. A
//! watch whose path is unknown (added by a raw system call) makes the descriptor unrestorable,
//! said in its description.
//!
//! The notes are a list behind a spin lock that is only taken with every signal blocked, so no
//! thread can be parked holding it while the writer reads the list.
#![allow(unsafe_code)]

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ffi::c_char;
use core::sync::atomic::{AtomicBool, Ordering::*};

use snapshim_image::{FdKind, Inotify, InotifyWatch, Unsupported};

use super::Fdinfo;
use crate::sys::{self, sc};

/// A path the program watched: (device as `stat` gives it, inode, absolute path).
struct Noted {
    dev: u64,
    ino: u64,
    path: String,
}

struct Notes {
    busy: AtomicBool,
    list: UnsafeCell<Vec<Noted>>,
}

// SAFETY: `list` is only touched while `busy` is held (see `with_notes`).
unsafe impl Sync for Notes {}

static NOTES: Notes = Notes {
    busy: AtomicBool::new(false),
    list: UnsafeCell::new(Vec::new()),
};

/// Runs `f` on the notes, holding the lock with every signal blocked.
fn with_notes<T>(f: impl FnOnce(&mut Vec<Noted>) -> T) -> T {
    let old = sys::block_all_signals();
    while NOTES
        .busy
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    // SAFETY: the lock is held: nobody else touches the list.
    let r = f(unsafe { &mut *NOTES.list.get() });
    NOTES.busy.store(false, Release);
    sys::restore_signals(&old);
    r
}

/// Notes the path of a watch the program just added (`mask` as it gave it).
///
/// # Safety
/// `path` is a NUL-terminated string.
pub unsafe fn note_watch(path: *const c_char, mask: u32) {
    // SAFETY: per the contract.
    let given = unsafe { core::ffi::CStr::from_ptr(path) }.to_bytes();
    let Some(path) = absolute(given) else { return };
    let mut c = path.clone().into_bytes();
    c.push(0);
    // SAFETY: zeroed stat is valid.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    let nofollow = if mask & libc::IN_DONT_FOLLOW != 0 {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: c is NUL-terminated, st a valid out-pointer.
    let r = unsafe {
        sc!(
            libc::SYS_newfstatat,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut st as *mut libc::stat,
            nofollow
        )
    };
    if r == 0 {
        let (dev, ino) = (st.st_dev, st.st_ino);
        with_notes(|l| {
            l.retain(|n| (n.dev, n.ino) != (dev, ino));
            l.push(Noted { dev, ino, path });
        });
    }
}

/// `given`, relative to the working directory unless it starts with `/`.
fn absolute(given: &[u8]) -> Option<String> {
    let given = core::str::from_utf8(given).ok()?;
    if given.starts_with('/') {
        return Some(String::from(given));
    }
    let mut buf = alloc::vec![0u8; 4096];
    // SAFETY: buf is writable for its length.
    let n = sys::check(unsafe { sc!(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) }).ok()?;
    buf.truncate((n as usize).saturating_sub(1));
    let cwd = String::from_utf8(buf).ok()?;
    Some(format!("{}/{given}", cwd.trim_end_matches('/')))
}

/// `info` is the inotify descriptor's fdinfo.
pub fn capture(info: &Fdinfo) -> FdKind {
    let mut watches = Vec::new();
    for (wd, ino, sdev, mask) in info.lines().filter_map(parse_watch) {
        let dev = libc::makedev((sdev >> 20) as u32, (sdev & 0xfffff) as u32);
        let path = with_notes(|l| {
            l.iter()
                .rev()
                .find(|n| n.dev == dev && n.ino == ino)
                .map(|n| n.path.clone())
        });
        let Some(path) = path else {
            return FdKind::Unsupported(Unsupported {
                desc: format!(
                    "anon_inode:inotify with watch {wd} on inode {ino}, whose path is unknown \
                     (added without inotify_add_watch)"
                ),
            });
        };
        watches.push(InotifyWatch { wd, mask, path });
    }
    FdKind::Inotify(Inotify { watches })
}

/// `inotify wd:1 ino:3c4a7 sdev:fe00000 mask:300 ignored_mask:0 ...` → (wd, ino, sdev, mask).
fn parse_watch(line: &str) -> Option<(i32, u64, u64, u32)> {
    let rest = line.strip_prefix("inotify ")?;
    let field = |key: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(String::from)
    };
    Some((
        field("wd:")?.parse().ok()?,
        u64::from_str_radix(&field("ino:")?, 16).ok()?,
        u64::from_str_radix(&field("sdev:")?, 16).ok()?,
        u32::from_str_radix(&field("mask:")?, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_watch_line_of_this_kernel() {
        let line = "inotify wd:1 ino:3c4a7 sdev:fe00000 mask:84000100 ignored_mask:0 \
                    fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000";
        assert_eq!(
            parse_watch(line),
            Some((1, 0x3c4a7, 0xfe0_0000, 0x8400_0100))
        );
        assert_eq!(parse_watch("flags:\t00"), None);
    }
}
