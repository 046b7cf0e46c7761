//! Dirty-page tracking for incremental checkpoints (`SNAPSHIM_INCREMENTAL`).
//!
//! One userfaultfd, opened once with `UFFD_FEATURE_WP_ASYNC` (and `UFFD_USER_MODE_ONLY` where a
//! normal one is refused, as for unprivileged users), has the program's private anonymous
//! regions registered in write-protect mode for good. With WP_ASYNC the kernel resolves a write
//! to a protected page by itself (it clears the page's protection bit, ~1 us, nobody reads the
//! userfaultfd), so the bit records "not written since it was last protected". In each pause:
//!
//! 1. every trackable region of the memory map is registered (again: a no-op for a registered
//!    one; a region mapped since the last checkpoint is new, and all its pages count as written
//!    on its first scan);
//! 2. one `PAGEMAP_SCAN` per region with `PAGE_IS_WRITTEN` and `PM_SCAN_WP_MATCHING` returns the
//!    pages written since the last scan and protects them again in the same walk.
//!
//! For a delta image the written pages are stored (those holding data: present and not the
//! shared zero page, or swapped), the written pages without data are holes (zero), and the rest
//! of the region is inherited from the parent. For a full image the scan only re-protects.
//!
//! What the kernel reports was checked on this kernel by `testapps/c/wpasync.c` (run by
//! `testapps/tests/incremental.rs`): a discarded page (`MADV_DONTNEED`) counts as written (it is
//! zero now); a page the kernel writes (`read()` into it) counts as written; pages moved by
//! `mremap` or in a region mapped anew at the same address lose their registration and count as
//! written once registered again; a never-written page read in (the shared zero page) stays
//! unwritten; a scan over a region that is not registered fails (`PM_SCAN_CHECK_WPASYNC`),
//! which is why every region is registered before it is scanned.
//!
//! Untracked regions (private file mappings, shared memory, a restored program's memory still
//! mapped from its image, anything the kernel refuses to register) are stored in every delta
//! exactly as in a full image.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

use crate::config::Incremental as Mode;
use crate::objects::memory::{self, MapsEntry};
use crate::sys::kapi::*;
use crate::sys::{self, sc};

const UFFD_USER_MODE_ONLY: i64 = 1;
const FEATURE_WP_ASYNC: u64 = 1 << 15;

const PAGE: u64 = 4096;

/// Whether deltas may exist in the image directory (retention must follow chains).
static CHAINS: AtomicU8 = AtomicU8::new(0);

/// Called once at start-up with the configured mode.
pub fn init(mode: Mode) {
    CHAINS.store((mode != Mode::Off) as u8, Relaxed);
}

/// Retention must keep the images that kept deltas depend on.
pub fn chain_retention() -> bool {
    CHAINS.load(Relaxed) != 0
}

/// The tracking userfaultfd, which is the shim's, not the program's (not in images), or -1.
pub fn own_fd() -> i32 {
    UFFD.load(Relaxed)
}

/// The tracking userfaultfd (-1: not open).
static UFFD: AtomicI32 = AtomicI32::new(-1);
/// 0: not probed, 1: available, 2: unavailable (said once).
static PROBED: AtomicU8 = AtomicU8::new(0);

/// The image the next delta builds on: sequence number (0: none, the next image is full),
/// identity and metadata checksum. Only the helper thread reads and writes these.
static PARENT_SEQ: AtomicU64 = AtomicU64::new(0);
static PARENT_ID: AtomicU64 = AtomicU64::new(0);
static PARENT_CRC: AtomicU32 = AtomicU32::new(0);
/// Deltas since the last full image, their bytes, and the last full image's bytes.
static CHAIN_LEN: AtomicU64 = AtomicU64::new(0);
static CHAIN_BYTES: AtomicU64 = AtomicU64::new(0);
static FULL_BYTES: AtomicU64 = AtomicU64::new(0);

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

/// What the policy says the next checkpoint is.
pub fn next_is_delta(cfg: &crate::config::Config) -> bool {
    if cfg.incremental == Mode::Off || PARENT_SEQ.load(Relaxed) == 0 || !available() {
        return false;
    }
    // The parent must still be there (someone may have removed it): else start a new chain.
    let parent = cfg
        .image_dir
        .join(snapshim_image::image_file_name(PARENT_SEQ.load(Relaxed)));
    if !parent.exists() {
        return false;
    }
    if cfg.incremental == Mode::Merge && MERGE_FAILED.load(Relaxed) == 0 {
        // Full images come from the background merger.
        return true;
    }
    !chain_too_long(cfg)
}

/// The chain since the last full image has reached the policy's length or size.
pub fn chain_too_long(cfg: &crate::config::Config) -> bool {
    let len = CHAIN_LEN.load(Relaxed);
    let bytes = CHAIN_BYTES.load(Relaxed) as f64;
    len + 1 >= cfg.full_every.max(1) || bytes > cfg.full_fraction * FULL_BYTES.load(Relaxed) as f64
}

/// The parent of the next delta: (sequence number, identity, metadata checksum).
pub fn parent() -> Option<(u64, u64, u32)> {
    match PARENT_SEQ.load(Relaxed) {
        0 => None,
        seq => Some((seq, PARENT_ID.load(Relaxed), PARENT_CRC.load(Relaxed))),
    }
}

/// After a committed image: it is the next delta's parent. Reads its header for the checksum
/// (a forked writer computed it).
pub fn committed(seq: u64, path: &str, bytes: u64, delta: bool) {
    let mut c = path.as_bytes().to_vec();
    c.push(0);
    let mut page = [0u8; 128];
    let header = sys::open(&c, libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .ok()
        .and_then(|fd| {
            let n = sys::pread(fd, &mut page, 0);
            sys::close(fd);
            n.ok()
        })
        .and_then(|n| snapshim_image::Header::decode(&page[..n]).ok());
    let Some(h) = header.filter(|_| SCAN_OK.load(Relaxed) != 0) else {
        forget();
        return;
    };
    PARENT_SEQ.store(seq, Relaxed);
    PARENT_ID.store(h.image_id, Relaxed);
    PARENT_CRC.store(h.meta_crc, Relaxed);
    if delta {
        CHAIN_LEN.fetch_add(1, Relaxed);
        CHAIN_BYTES.fetch_add(bytes, Relaxed);
    } else {
        CHAIN_LEN.store(0, Relaxed);
        CHAIN_BYTES.store(0, Relaxed);
        FULL_BYTES.store(bytes, Relaxed);
    }
}

/// The tracking state is lost (a failed checkpoint after its scan, or a restored process whose
/// userfaultfd did not survive): the next image is a full one.
pub fn forget() {
    PARENT_SEQ.store(0, Relaxed);
}

/// In a restored process: the userfaultfd is gone with the old process; a new one is opened
/// at the next checkpoint, which is a full image.
pub fn after_restore() {
    forget();
    UFFD.store(-1, Relaxed);
    PROBED.store(0, Relaxed);
}

/// Retention with chains (after a committed image, outside the pause): keeps the newest
/// `SNAPSHIM_KEEP` images and every image they depend on. The directory is listed with raw
/// system calls: the shim does not use the allocator it interposes.
pub fn retain(cfg: &crate::config::Config) {
    let mut dir = cfg.image_dir.as_os_str().as_encoded_bytes().to_vec();
    dir.push(0);
    let Ok(names) = sys::list_dir_names(&dir) else {
        return;
    };
    let mut images: Vec<std::path::PathBuf> = names
        .iter()
        .filter(|n| n.ends_with(snapshim_image::IMAGE_SUFFIX) && !n.starts_with('.'))
        .map(|n| cfg.image_dir.join(n))
        .collect();
    images.sort();
    snapshim_image::retain_among(&cfg.image_dir, images, cfg.keep as usize);
}

/// Whether the last tracking scan succeeded: only then can the image it belongs to be a parent.
static SCAN_OK: AtomicU8 = AtomicU8::new(0);

/// During the pause of an incremental-mode checkpoint: scans (and re-protects) the written
/// pages and, if a delta was asked for and a parent exists, makes `cap` a delta. Returns whether
/// the image is a delta.
pub fn prepare(cap: &mut crate::writer::Captured, want_delta: bool) -> bool {
    SCAN_OK.store(0, Relaxed);
    if !available() {
        return false;
    }
    let tracked = match scan_all(&cap.maps) {
        Ok(t) => t,
        Err(msg) => {
            let text = alloc::format!(
                "snapshim: dirty-page tracking failed ({msg}); the next image is a full one\n"
            );
            let _ = sys::write_all(2, text.as_bytes());
            forget();
            return false;
        }
    };
    SCAN_OK.store(1, Relaxed);
    match parent() {
        Some((seq, image_id, meta_crc)) if want_delta => {
            cap.delta = Some(crate::writer::Delta {
                parent: snapshim_image::ParentRef {
                    image_id,
                    meta_crc,
                    file: snapshim_image::image_file_name(seq),
                },
                tracked,
            });
            true
        }
        _ => false,
    }
}

/// Whether a delta is small enough to write during the pause (into the page cache), rather than
/// by a forked writer. Measured here (`scripts/bench_incremental.py`, 1 GiB program): writing
/// during the pause costs about 1.2-3 ms per MiB of written pages on top of the tracking scan;
/// a fork costs a page-table copy, about 40 ms per GiB of the program, whatever the delta's
/// size. So a delta up to 1/50 of the program's resident memory (20 MiB for 1 GiB; at least
/// 1 MiB, at most 64 MiB) is written during the pause.
pub fn pause_write(cap: &crate::writer::Captured) -> bool {
    let Some(d) = &cap.delta else { return false };
    let bytes: u64 = d
        .tracked
        .iter()
        .flat_map(|t| t.written.iter())
        .filter(|w| Tracked::has_data(w.2))
        .map(|w| w.1 - w.0)
        .sum();
    bytes <= (cap.process.resident_bytes / 50).clamp(1 << 20, 64 << 20)
}

// ---------------------------------------------------------------------------------------------
// Background merge (SNAPSHIM_INCREMENTAL=merge): `snapshim merge IMAGE`, next to the shim.

/// The running merger's PID (0: none), the sequence number it merges, and the chain counters
/// when it started (what the merge takes off the chain).
static MERGER: AtomicI32 = AtomicI32::new(0);
/// A merger failed: from then on the program takes the full images itself (said once).
static MERGE_FAILED: AtomicU8 = AtomicU8::new(0);
/// The sequence number of the image being merged.
static MERGE_SEQ: AtomicU64 = AtomicU64::new(0);
static MERGE_LEN: AtomicU64 = AtomicU64::new(0);
static MERGE_BYTES: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static environ: *const *const libc::c_char;
}

/// After a committed delta: if the chain is due for a full image, starts `snapshim merge` on it
/// (unless one runs already). The merger is a child with exit signal 0 (the program never sees
/// it), its output goes to /dev/null, and it does not load the shim.
pub fn maybe_merge(cfg: &crate::config::Config, path: &str) {
    if MERGER.load(Relaxed) != 0 || MERGE_FAILED.load(Relaxed) != 0 || !chain_too_long(cfg) {
        return;
    }
    let Some((seq, _, _)) = parent() else {
        return;
    };
    let tool = std::path::Path::new(&cfg.shim_path).with_file_name("snapshim");
    let cstr = |b: &[u8]| {
        let mut v = b.to_vec();
        v.push(0);
        v
    };
    let args: Vec<Vec<u8>> = [
        tool.as_os_str().as_encoded_bytes(),
        b"merge",
        b"--quiet",
        path.as_bytes(),
    ]
    .iter()
    .map(|a| cstr(a))
    .collect();
    let mut env: Vec<Vec<u8>> = Vec::new();
    // SAFETY: environ is glibc's NULL-terminated array of C strings; read, not changed.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let s = core::ffi::CStr::from_ptr(*p).to_bytes();
            if !s.starts_with(b"LD_PRELOAD=") {
                env.push(cstr(s));
            }
            p = p.add(1);
        }
    }
    let argv: Vec<*const u8> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([core::ptr::null()])
        .collect();
    let envp: Vec<*const u8> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain([core::ptr::null()])
        .collect();
    let tool_c = &args[0];
    let forked = sys::fork_child(|| {
        // In the child: raw system calls only. Unblock signals (the helper blocks them all),
        // stdout to /dev/null, no descriptor of the program's left open.
        let none = 0u64;
        // SAFETY: an 8-byte empty signal set.
        unsafe {
            sc!(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &none as *const u64,
                0,
                8
            )
        };
        if let Ok(fd) = sys::open(b"/dev/null\0", libc::O_WRONLY, 0) {
            // SAFETY: dup2 onto stdout; close_range of everything above stderr.
            unsafe {
                sc!(libc::SYS_dup2, fd, 1);
                sc!(libc::SYS_close_range, 3, u32::MAX, 0);
            }
        }
        // SAFETY: NUL-terminated path, NULL-terminated argv and envp built before the fork.
        unsafe {
            sc!(
                libc::SYS_execve,
                tool_c.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr()
            )
        };
        127
    });
    if let Ok(pid) = forked {
        MERGER.store(pid, Relaxed);
        MERGE_SEQ.store(seq, Relaxed);
        MERGE_LEN.store(CHAIN_LEN.load(Relaxed), Relaxed);
        MERGE_BYTES.store(CHAIN_BYTES.load(Relaxed), Relaxed);
    }
}

/// Before each checkpoint: collects a finished merger. A merge that succeeded takes the merged
/// deltas off the chain's length and size; the merged image becomes the base.
///
/// The merger was cloned with exit signal 0, but `execve` makes it an ordinary child again
/// (exit signal SIGCHLD): the program gets a SIGCHLD when it ends, and a program that waits
/// for any child may reap it first. So the outcome is read from the image directory: the
/// merge succeeded if the image it merged is a full image now.
pub fn reap_merger(cfg: &crate::config::Config) {
    let pid = MERGER.load(Relaxed);
    if pid == 0 {
        return;
    }
    let mut status = 0i32;
    // SAFETY: wait4 on our own child (exit signal 0, hence __WCLONE); status is valid.
    let r = unsafe {
        sc!(
            libc::SYS_wait4,
            pid,
            &mut status as *mut i32,
            libc::WNOHANG | libc::__WALL,
            0
        )
    };
    if r == 0 {
        return; // still merging
    }
    MERGER.store(0, Relaxed);
    let merged = cfg
        .image_dir
        .join(snapshim_image::image_file_name(MERGE_SEQ.load(Relaxed)));
    let full = std::fs::File::open(&merged).ok().and_then(|f| {
        let mut page = [0u8; 128];
        use std::os::unix::fs::FileExt;
        let n = f.read_at(&mut page, 0).ok()?;
        snapshim_image::Header::decode(&page[..n]).ok()
    });
    if full.is_some_and(|h| h.flags & snapshim_image::FLAG_DELTA == 0) {
        CHAIN_LEN.store(
            CHAIN_LEN
                .load(Relaxed)
                .saturating_sub(MERGE_LEN.load(Relaxed)),
            Relaxed,
        );
        CHAIN_BYTES.store(
            CHAIN_BYTES
                .load(Relaxed)
                .saturating_sub(MERGE_BYTES.load(Relaxed)),
            Relaxed,
        );
    } else {
        // Without merges the chain would grow for ever: full images from now on.
        MERGE_FAILED.store(1, Relaxed);
        let how = if r != pid as i64 {
            alloc::format!("did not merge {}", merged.display())
        } else if libc::WIFEXITED(status) {
            alloc::format!("exited with status {}", libc::WEXITSTATUS(status))
        } else {
            alloc::format!("died of signal {}", libc::WTERMSIG(status))
        };
        let text = alloc::format!(
            "snapshim: the background merge (snapshim merge, next to libsnapshim.so) {how}; \
             the program takes full images itself from now on\n"
        );
        let _ = sys::write_all(2, text.as_bytes());
    }
}

/// `SNAPSHIM_TWIN_FULL`: in the forked writer of a delta, after the delta is committed, writes a
/// full image of the same instant as `ckpt-N.twin` (renamed into place, `latest` untouched), so
/// tests can check that the chain restores exactly what a full image does.
pub fn write_twin(
    cfg: &crate::config::Config,
    cap: &crate::writer::Captured,
    seq: u64,
) -> Result<(), String> {
    let full = cap.as_full();
    let name = alloc::format!("ckpt-{seq:08}.twin");
    let t = crate::writer::create_named_target(cfg, &name)?;
    let r = crate::writer::write_out(cfg, &full, &t).and_then(|_| {
        std::fs::rename(&t.tmp, &t.path)
            .map_err(|e| alloc::format!("cannot rename {}: {e}", t.tmp.display()))
    });
    if r.is_err() {
        crate::writer::abandon(&t);
    } else {
        sys::close(t.fd);
    }
    r
}
