//! The kernel interfaces both userfaultfd users of the shim need (linux/userfaultfd.h and
//! linux/fs.h): the copy-on-write engine (uffd.rs) and dirty tracking (track.rs).
#![allow(unsafe_code)]

use crate::sys::{self, sc};

pub const UFFD_API: u64 = 0xaa;
pub const UFFDIO_API: u64 = 0xc018_aa3f;
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
pub const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
pub const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

pub const PAGEMAP_SCAN: u64 = 0xc060_6610;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
pub struct UffdioRegister {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
pub struct UffdioWriteprotect {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
}

#[repr(C)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

pub fn ioctl(fd: i32, req: u64, arg: *mut u8) -> sys::Result<i64> {
    // SAFETY: callers pass a request and a pointer to its matching, live argument struct.
    sys::check(unsafe { sc!(libc::SYS_ioctl, fd, req, arg) })
}
