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

use snapshim_image::FdState;

use crate::sys::{self, sc};

pub mod char_device;
pub mod directory;
pub mod inherited;
pub mod memory;
pub mod pipe;
pub mod process;
pub mod regular_file;
pub mod signals;
pub mod socket;
pub mod threads;
pub mod timers;

/// The file descriptor table, but for the descriptors `own` says are the shim's.
pub fn fds(own: impl Fn(i32) -> bool) -> Vec<FdState> {
    let mut out = Vec::new();
    let Ok(list) = sys::list_numeric_dir(b"/proc/self/fd\0") else {
        return out;
    };
    let mut info = Vec::new();
    let mut pipes = pipe::Ends::new();
    let mut diag = None;
    for fd in list {
        if own(fd) {
            continue;
        }
        let mut nb = [0u8; 20];
        let num = sys::itoa(fd as u64, &mut nb);
        let target = sys::readlink(&cpath(&["/proc/self/fd/", num])).unwrap_or_default();
        let (mut pos, mut flags) = (0u64, 0u32);
        if sys::read_file(&cpath(&["/proc/self/fdinfo/", num]), &mut info).is_ok() {
            for line in String::from_utf8_lossy(&info).lines() {
                if let Some(v) = line.strip_prefix("pos:") {
                    pos = v.trim().parse().unwrap_or(0);
                } else if let Some(v) = line.strip_prefix("flags:") {
                    flags = u32::from_str_radix(v.trim(), 8).unwrap_or(0);
                }
            }
        }
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        let flags = flags & !(libc::O_CLOEXEC as u32);
        let Some(st) = fstat(fd) else { continue };
        let fmt = st.st_mode & libc::S_IFMT;
        let deleted = target.ends_with(" (deleted)");
        let kind = if fmt == libc::S_IFREG && !deleted {
            regular_file::capture(target, pos, &st)
        } else if fmt == libc::S_IFDIR && !deleted {
            directory::capture(target)
        } else if fmt == libc::S_IFCHR {
            char_device::capture(target)
        } else if fmt == libc::S_IFIFO && target.starts_with("pipe:") {
            pipe::capture(fd, flags, &st, &mut pipes)
        } else if fmt == libc::S_IFSOCK {
            socket::capture(fd, &st, &mut diag)
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
    socket::pair_up(&mut out);
    out
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
