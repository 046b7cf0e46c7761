//! The kernel interfaces both userfaultfd users of the shim need (linux/userfaultfd.h and
//! linux/fs.h): the copy-on-write engine (engine/uffd/) and dirty tracking
//! (incremental/dirty.rs).
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

/// What a `PAGEMAP_SCAN` asks for besides the range: `struct pm_scan_arg`'s flags and
/// categories.
pub struct ScanQuery {
    pub flags: u64,
    pub inverted: u64,
    pub mask: u64,
    pub anyof: u64,
    pub ret: u64,
}

/// Calls `f(start, end, categories)` for each range of `[start, end)` that `PAGEMAP_SCAN` on
/// `fd` (this process's pagemap) reports for `q`.
///
/// When the output vector fills, the kernel stops early and `walk_end` says where; it can lie
/// before ranges already returned (DESIGN §4), so the next call starts at the later of the two
/// and ranges are clipped to what was not reported yet.
pub fn pagemap_scan(
    fd: i32,
    start: u64,
    end: u64,
    q: &ScanQuery,
    mut f: impl FnMut(u64, u64, u64),
) -> sys::Result<()> {
    let mut vec = [[0u64; 3]; 512];
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: from,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: q.inverted,
            category_mask: q.mask,
            category_anyof_mask: q.anyof,
            return_mask: q.ret,
        };
        let n = ioctl(fd, PAGEMAP_SCAN, &mut arg as *mut PmScanArg as *mut u8)? as usize;
        let mut last = from;
        for r in &vec[..n.min(vec.len())] {
            let (a, b) = (r[0].max(from), r[1].min(end));
            if a < b {
                f(a, b, r[2]);
                last = last.max(b);
            }
        }
        let next = arg.walk_end.max(last);
        if next <= from {
            break;
        }
        from = next;
    }
    Ok(())
}
