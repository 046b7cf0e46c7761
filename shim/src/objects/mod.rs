//! The kinds of kernel object an image holds, capture side: one module per kind, named as in
//! the image crate (`snapshim_image::objects`) and the restorer. This module lists the file
//! descriptor table and hands each descriptor to its kind; memory, threads, signals, timers and
//! the process's own state are captured by their modules directly.
//!
//! Everything here runs in the writer while every other thread is parked: it allocates only
//! from the scratch region and reads /proc with raw system calls.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use snapshim_image::{Duplicate, FdKind, FdState};

use crate::sys::{self, sc};

pub mod char_device;
pub mod deleted_file;
pub mod directory;
pub mod epoll;
pub mod eventfd;
pub mod inherited;
pub mod inotify;
pub mod memory;
pub mod pipe;
pub mod process;
pub mod regular_file;
pub mod signalfd;
pub mod signals;
pub mod socket;
pub mod threads;
pub mod timerfd;
pub mod timers;

/// The file descriptor table, but for the descriptors `own` says are the shim's.
pub fn fds(own: impl Fn(i32) -> bool) -> Vec<FdState> {
    let mut out = Vec::new();
    let Ok(list) = sys::list_numeric_dir(b"/proc/self/fd\0") else {
        return out;
    };
    let mut pipes = pipe::Ends::new();
    let mut diag = None;
    let mut deleted_files = deleted_file::Seen::new();
    for fd in list {
        if own(fd) {
            continue;
        }
        let mut nb = [0u8; 20];
        let num = sys::itoa(fd as u64, &mut nb);
        let target = sys::readlink(&cpath(&["/proc/self/fd/", num])).unwrap_or_default();
        let info = read_fdinfo(fd);
        let pos = fdinfo_field(&info, "pos:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64);
        let flags = fdinfo_field(&info, "flags:")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .unwrap_or(0);
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        let flags = flags & !(libc::O_CLOEXEC as u32);
        let Some(st) = fstat(fd) else { continue };
        let fmt = st.st_mode & libc::S_IFMT;
        let deleted = target.ends_with(" (deleted)");
        let kind = if fmt == libc::S_IFREG && !deleted {
            regular_file::capture(target, pos, &st)
        } else if fmt == libc::S_IFREG {
            deleted_file::capture(fd, target, pos, &st, &mut deleted_files)
        } else if fmt == libc::S_IFDIR && !deleted {
            directory::capture(target)
        } else if fmt == libc::S_IFCHR {
            char_device::capture(target)
        } else if fmt == libc::S_IFIFO && target.starts_with("pipe:") {
            pipe::capture(fd, flags, &st, &mut pipes)
        } else if fmt == libc::S_IFSOCK {
            socket::capture(fd, &st, &mut diag)
        } else if let Some(kind) = anon_inode(fd, &target, &info) {
            kind
        } else {
            inherited::capture(fd, target)
        };
        out.push(FdState {
            fd,
            flags,
            cloexec,
            kind,
        });
    }
    pipe::pair_up(&mut out, &pipes);
    epoll::resolve(&mut out);
    mark_duplicates(&mut out);
    socket::pair_up(&mut out);
    out
}

/// A descriptor of one of the kinds that are rebuilt from their state alone (eventfd, timerfd,
/// signalfd, epoll, inotify, a deleted file) that is the same open file as a lower one (`dup`)
/// becomes a [`Duplicate`] of it, so that the restore gives both numbers one object again.
fn mark_duplicates(out: &mut [FdState]) {
    let pid = sys::getpid();
    let rebuilt = |k: &FdKind| {
        matches!(
            k,
            FdKind::Eventfd(_)
                | FdKind::Timerfd(_)
                | FdKind::Signalfd(_)
                | FdKind::Epoll(_)
                | FdKind::Inotify(_)
                | FdKind::DeletedFile(_)
        )
    };
    for i in 0..out.len() {
        if !rebuilt(&out[i].kind) {
            continue;
        }
        let fd = out[i].fd;
        let first = out[..i].iter().find(|o| {
            rebuilt(&o.kind) && o.kind.name() == out[i].kind.name() && same_file(pid, o.fd, fd)
        });
        if let Some(o) = first {
            out[i].kind = FdKind::Duplicate(Duplicate { of: o.fd });
        }
    }
}

/// Whether descriptors `a` and `b` are the same open file (`kcmp(KCMP_FILE)`).
fn same_file(pid: i32, a: i32, b: i32) -> bool {
    const KCMP_FILE: i32 = 0;
    // SAFETY: kcmp compares two descriptors of this process; no memory is passed.
    unsafe { sc!(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) == 0 }
}

/// The kinds the kernel names `anon_inode:[...]` in `/proc/self/fd`.
fn anon_inode(fd: i32, target: &str, info: &Fdinfo) -> Option<FdKind> {
    Some(match target {
        "anon_inode:[eventfd]" => eventfd::capture(info),
        "anon_inode:[timerfd]" => timerfd::capture(fd),
        "anon_inode:[signalfd]" => signalfd::capture(info),
        "anon_inode:[eventpoll]" => epoll::capture(info),
        "anon_inode:inotify" => inotify::capture(info),
        _ => return None,
    })
}

/// The text of `/proc/self/fdinfo/FD` (empty if it cannot be read).
pub type Fdinfo = String;

pub fn read_fdinfo(fd: i32) -> Fdinfo {
    let mut nb = [0u8; 20];
    let num = sys::itoa(fd as u64, &mut nb);
    let mut bytes = Vec::new();
    if sys::read_file(&cpath(&["/proc/self/fdinfo/", num]), &mut bytes).is_err() {
        bytes.clear();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The value of the fdinfo line starting with `key` (such as `"flags:"`), trimmed.
pub fn fdinfo_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim())
}

fn fstat(fd: i32) -> Option<libc::stat> {
    // SAFETY: zeroed stat is valid.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    sys::check(unsafe { sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat) }).ok()?;
    Some(st)
}

fn cpath(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
    }
    v.push(0);
    v
}
