//! An inotify descriptor, made again with every watch on its path, under its old number (`wd`),
//! and an `IN_Q_OVERFLOW` event first in its queue.
//!
//! Watch numbers: the kernel hands them out in increasing order from the last one given, so a
//! scratch file is watched and unwatched until the next number is the one wanted.
//!
//! The overflow event: events queued but not read at the checkpoint, and those of the time in
//! between, are lost; `IN_Q_OVERFLOW` is how inotify tells a program that events were lost, and
//! programs answer it by rescanning what they watch. Only the kernel queues it, when the queue
//! is full: two scratch files are watched and read in turn (alternating, so that the kernel
//! does not merge the events) until the queue overflows, the scratch watches are removed (their
//! `IN_IGNORED` is dropped, the queue being full), and every event but the overflow is read
//! back out. About 16 000 reads with the default `fs.inotify.max_queued_events`.

use std::fs::File;
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;

use snapshim_image::{FdState, Inotify};

use super::{move_high, os_error, status_flags, Prepare, Prepared};

/// A queue longer than this is not filled (it would take seconds); the overflow event is then
/// left out, with a warning.
const MAX_FILL: usize = 1 << 20;

pub fn prepare(cx: &Prepare, f: &FdState, i: &Inotify) -> Result<Prepared, String> {
    // SAFETY: inotify_init1 makes a new descriptor.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(os_error(f, "cannot create an inotify descriptor"));
    }
    let fd = move_high(fd, cx.high_base)?;
    let scratch = [Scratch::new(f)?, Scratch::new(f)?];
    let mut watches = i.watches.clone();
    watches.sort_by_key(|w| w.wd);
    let mut last = 0;
    for w in &watches {
        while last < w.wd - 1 {
            last = add(fd, &scratch[0].path, libc::IN_ACCESS).map_err(|e| why(f, e))?;
            remove(fd, last);
        }
        let mask = w.mask & !(libc::IN_MASK_ADD | IN_MASK_CREATE);
        match add(fd, &w.path, mask) {
            Ok(wd) if wd == w.wd => last = wd,
            Ok(wd) => {
                return Err(format!(
                    "cannot give the inotify watch of {} its number {} back (got {wd}; \
                     descriptor {} of the program)",
                    w.path, w.wd, f.fd
                ))
            }
            Err(e) => eprintln!(
                "snapshim-restore: warning: descriptor {} (inotify) no longer watches {} \
                 (watch {}): {e}",
                f.fd, w.path, w.wd
            ),
        }
    }
    overflow(fd, &scratch, f)?;
    // SAFETY: F_SETFL on our descriptor (O_NONBLOCK as the program had it).
    unsafe { libc::fcntl(fd, libc::F_SETFL, status_flags(f)) };
    Ok(Prepared::At(fd))
}

const IN_MASK_CREATE: u32 = 0x1000_0000;

/// A file to watch and read for the restore's own purposes (a memfd, opened again by path so
/// that reading it is reported: the memfd's own descriptor is not).
struct Scratch {
    path: String,
    _memfd: File,
    reader: File,
}

impl Scratch {
    fn new(f: &FdState) -> Result<Scratch, String> {
        // SAFETY: memfd_create with a NUL-terminated name makes a new descriptor.
        let fd = unsafe { libc::memfd_create(c"snapshim-inotify".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_error(f, "cannot create a scratch file for inotify"));
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let mut memfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let path = format!("/proc/self/fd/{fd}");
        memfd.write_all(b"x").map_err(|e| why(f, e))?;
        let reader = File::open(&path).map_err(|e| why(f, e))?;
        Ok(Scratch {
            path,
            _memfd: memfd,
            reader,
        })
    }
}

/// Queues `IN_Q_OVERFLOW` alone (see the module comment).
fn overflow(fd: RawFd, scratch: &[Scratch; 2], f: &FdState) -> Result<(), String> {
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usize::MAX);
    if max > MAX_FILL {
        eprintln!(
            "snapshim-restore: warning: descriptor {} (inotify) is restored without an \
             IN_Q_OVERFLOW event (fs.inotify.max_queued_events is {max}): events of the \
             checkpoint's queue are lost silently",
            f.fd
        );
        return Ok(());
    }
    let wds = [
        add(fd, &scratch[0].path, libc::IN_ACCESS).map_err(|e| why(f, e))?,
        add(fd, &scratch[1].path, libc::IN_ACCESS).map_err(|e| why(f, e))?,
    ];
    let mut byte = [0u8];
    for k in 0..=max {
        let _ = scratch[k % 2].reader.read_at(&mut byte, 0);
    }
    wds.iter().for_each(|&wd| remove(fd, wd));
    let queued = queued_bytes(fd);
    let ev = std::mem::size_of::<libc::inotify_event>();
    let mut rest = vec![0u8; queued.saturating_sub(ev)];
    // SAFETY: reads into our buffer, at most its length.
    let n = unsafe { libc::read(fd, rest.as_mut_ptr() as *mut libc::c_void, rest.len()) };
    if queued < ev || n != rest.len() as isize || queued_bytes(fd) != ev {
        return Err(format!(
            "cannot queue IN_Q_OVERFLOW on inotify descriptor {} of the program ({queued} bytes \
             queued)",
            f.fd
        ));
    }
    Ok(())
}

fn queued_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n.max(0) as usize
}

fn add(fd: RawFd, path: &str, mask: u32) -> std::io::Result<i32> {
    let c = std::ffi::CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: c is NUL-terminated.
    let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
    if wd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(wd)
}

fn remove(fd: RawFd, wd: i32) {
    // SAFETY: removes a watch of our own descriptor.
    unsafe { libc::inotify_rm_watch(fd, wd) };
}

fn why(f: &FdState, e: std::io::Error) -> String {
    format!(
        "cannot restore inotify descriptor {} of the program: {e}",
        f.fd
    )
}
