//! Dirty-page tracking: the tracking userfaultfd (`UFFD_FEATURE_WP_ASYNC`) and the
//! `PAGEMAP_SCAN` that reports, and protects again, the pages written since the last scan (see
//! the module above for what the kernel reports).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU8, Ordering::Relaxed};

use crate::objects::memory::{self, MapsEntry};
use crate::sys::kapi::*;
use crate::sys::{self, sc};

const UFFD_USER_MODE_ONLY: i64 = 1;
const FEATURE_WP_ASYNC: u64 = 1 << 15;

const PAGE: u64 = 4096;

/// The tracking userfaultfd, which is the shim's, not the program's (not in images), or -1.
pub fn own_fd() -> i32 {
    UFFD.load(Relaxed)
}

/// The tracking userfaultfd (-1: not open).
static UFFD: AtomicI32 = AtomicI32::new(-1);
/// 0: not probed, 1: available, 2: unavailable (said once).
static PROBED: AtomicU8 = AtomicU8::new(0);

/// Opens the tracking userfaultfd: a normal one, else one for user-mode faults only (which is
/// all WP_ASYNC needs: the kernel's own writes resolve asynchronously too).
fn open_uffd() -> Result<i32, String> {
    let mut why = String::new();
    for extra in [0, UFFD_USER_MODE_ONLY] {
        // SAFETY: userfaultfd takes only flags.
        let fd = match sys::check(unsafe {
            sc!(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC as i64 | libc::O_NONBLOCK as i64 | extra
            )
        }) {
            Ok(fd) => fd as i32,
            Err(e) => {
                why = alloc::format!("userfaultfd: errno {e}");
                continue;
            }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURE_WP_ASYNC,
            ioctls: 0,
        };
        match ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as *mut u8) {
            Ok(_) => return Ok(fd),
            Err(e) => {
                why = alloc::format!("no UFFD_FEATURE_WP_ASYNC (errno {e})");
                sys::close(fd);
            }
        }
    }
    Err(why)
}

/// Whether tracking works here; the first call opens the userfaultfd and checks that
/// `PAGEMAP_SCAN` exists, and says once on stderr why not if it does not.
pub fn available() -> bool {
    match PROBED.load(Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let r = open_uffd().and_then(|fd| match probe_scan() {
        Ok(()) => Ok(fd),
        Err(e) => {
            sys::close(fd);
            Err(e)
        }
    });
    match r {
        Ok(fd) => {
            UFFD.store(fd, Relaxed);
            PROBED.store(1, Relaxed);
            true
        }
        Err(why) => {
            let text = alloc::format!(
                "snapshim: incremental checkpoints are not possible here ({why}); every image \
                 is a full one\n"
            );
            let _ = sys::write_all(2, text.as_bytes());
            PROBED.store(2, Relaxed);
            false
        }
    }
}

fn probe_scan() -> Result<(), String> {
    let pm = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| alloc::format!("cannot open /proc/self/pagemap: errno {e}"))?;
    let probe = [0u8; 1];
    let at = probe.as_ptr() as u64 & !(PAGE - 1);
    let r = scan(pm, at, at + PAGE, 0, |_, _, _| {});
    sys::close(pm);
    r.map_err(|e| alloc::format!("no PAGEMAP_SCAN ioctl (errno {e})"))
}

/// Calls `f(start, end, categories)` for each range of `[start, end)` the scan returns.
/// `flags` 0: report present pages (a probe); else the written pages, protected again.
fn scan(
    fd: i32,
    start: u64,
    end: u64,
    flags: u64,
    f: impl FnMut(u64, u64, u64),
) -> sys::Result<()> {
    let (mask, anyof) = if flags == 0 {
        (0, PAGE_IS_PRESENT)
    } else {
        (PAGE_IS_WRITTEN, 0)
    };
    let q = ScanQuery {
        flags,
        inverted: 0,
        mask,
        anyof,
        ret: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
    };
    pagemap_scan(fd, start, end, &q, f)
}

/// Called by the `mremap` wrapper before pages move: takes the range off the tracking
/// userfaultfd. The kernel refuses to move a range spanning several mappings if any of them is
/// registered with a userfaultfd (allowed otherwise since Linux 6.17): a restored program's
/// memory is such a range (runs mapped from its image). Moved pages count as written anyway
/// (the move drops their protection), and the next checkpoint registers the new place.
pub fn before_mremap(addr: u64, len: u64) {
    let uffd = UFFD.load(Relaxed);
    if uffd < 0 || len == 0 {
        return;
    }
    let start = addr & !(PAGE - 1);
    let end = addr.saturating_add(len).saturating_add(PAGE - 1) & !(PAGE - 1);
    let unregister = |a: u64, b: u64| {
        let mut range = [a, b - a];
        ioctl(uffd, UFFDIO_UNREGISTER, range.as_mut_ptr() as *mut u8)
    };
    if unregister(start, end) != Err(libc::EINVAL) {
        return;
    }
    // The kernel refuses a range with a mapping that cannot be registered (a regular file's):
    // one mapping at a time, then (the rare case of a restored program's memory).
    if let Ok(maps) = memory::read_maps() {
        for e in maps
            .iter()
            .filter(|e| e.start < end && e.end > start && trackable(e))
        {
            let _ = unregister(e.start.max(start), e.end.min(end));
        }
    }
}

/// A region the delta handles page by page.
pub struct Tracked {
    pub start: u64,
    pub end: u64,
    /// Written ranges `[a, b)` with their categories, sorted.
    pub written: Vec<(u64, u64, u64)>,
}

impl Tracked {
    /// Whether a written range's pages hold data to store.
    pub fn has_data(categories: u64) -> bool {
        (categories & PAGE_IS_PRESENT != 0 && categories & PAGE_IS_PFNZERO == 0)
            || categories & PAGE_IS_SWAPPED != 0
    }
}

/// Whether the writer may track this region: private anonymous memory of the program, writable
/// (the first scan of a registered region fills page tables for all of it, ~2 MiB per GiB: a
/// large reservation without write access holds nothing to track and stays out; should it
/// become writable, the next checkpoint registers it and counts all its pages as written).
pub fn trackable(e: &MapsEntry) -> bool {
    !e.shared
        && e.inode == 0
        && !e.whole
        && e.prot & libc::PROT_WRITE as u32 != 0
        && !memory::is_excluded(e)
        && {
            let (kind, store) = memory::classify(e);
            store && matches!(kind, snapshim_image::RegionKind::Anon)
        }
}

/// During the pause: registers every trackable region and scans it, protecting it again.
/// Returns the regions whose written pages are known; regions missing from the result are to be
/// stored whole. An error means the tracking state is unknown: the image must be a full one.
pub fn scan_all(maps: &[MapsEntry]) -> Result<Vec<Tracked>, String> {
    let uffd = UFFD.load(Relaxed);
    if uffd < 0 {
        return Err("no tracking userfaultfd".into());
    }
    let pm = sys::open(b"/proc/self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| alloc::format!("cannot open /proc/self/pagemap: errno {e}"))?;
    let mut out = Vec::new();
    let mut result = Ok(());
    for e in maps.iter().filter(|e| trackable(e)) {
        let mut reg = UffdioRegister {
            start: e.start,
            len: e.end - e.start,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        if ioctl(
            uffd,
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister as *mut u8,
        )
        .is_err()
        {
            continue; // stored whole
        }
        let mut written = Vec::new();
        if let Err(err) = scan(
            pm,
            e.start,
            e.end,
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            |a, b, c| written.push((a, b, c)),
        ) {
            result = Err(alloc::format!(
                "cannot scan {:#x}-{:#x} for written pages: errno {err}",
                e.start,
                e.end
            ));
            break;
        }
        out.push(Tracked {
            start: e.start,
            end: e.end,
            written,
        });
    }
    sys::close(pm);
    result.map(|()| out)
}

/// In a restored process: the userfaultfd is gone with the old process; a new one is opened
/// at the next checkpoint.
pub fn reset() {
    UFFD.store(-1, Relaxed);
    PROBED.store(0, Relaxed);
}
