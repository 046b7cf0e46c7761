//! The policy: whether the next image is a delta or a full one (the chain's length and size
//! since the last full image), and the parent the next delta builds on.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

use alloc::vec::Vec;

use snapshim_image::ParentRef;

use super::dirty::{available, scan_all, Tracked};
use crate::config::{Config, Incremental as Mode};
use crate::objects::memory::{self, MapsEntry};
use crate::sys;

/// The image the next delta builds on: sequence number (0: none, the next image is full),
/// identity and metadata checksum. Only the helper thread reads and writes these.
static PARENT_SEQ: AtomicU64 = AtomicU64::new(0);
static PARENT_ID: AtomicU64 = AtomicU64::new(0);
static PARENT_CRC: AtomicU32 = AtomicU32::new(0);
/// Deltas since the last full image, their bytes, and the last full image's bytes.
pub(super) static CHAIN_LEN: AtomicU64 = AtomicU64::new(0);
pub(super) static CHAIN_BYTES: AtomicU64 = AtomicU64::new(0);
static FULL_BYTES: AtomicU64 = AtomicU64::new(0);

/// What makes an image a delta: its parent, and the regions whose written pages are known.
pub struct Delta {
    pub parent: ParentRef,
    pub tracked: Vec<Tracked>,
}

/// A background merger failed: from then on the program takes the full images itself (see
/// merger.rs).
pub(super) static MERGE_FAILED: AtomicU8 = AtomicU8::new(0);

/// What the policy says the next checkpoint is.
pub fn next_is_delta(cfg: &Config) -> bool {
    if cfg.incremental == Mode::Off || PARENT_SEQ.load(Relaxed) == 0 || !available() {
        return false;
    }
    // The parent must still be there (someone may have removed it): else start a new chain.
    let parent =
        crate::owner::dir(cfg).join(snapshim_image::image_file_name(PARENT_SEQ.load(Relaxed)));
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
pub fn chain_too_long(cfg: &Config) -> bool {
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

/// Whether the last tracking scan succeeded: only then can the image it belongs to be a parent.
static SCAN_OK: AtomicU8 = AtomicU8::new(0);

/// During the pause of an incremental-mode checkpoint: scans (and re-protects) the written
/// pages and, if a delta was asked for and a parent exists, returns the delta the image is.
pub fn prepare(maps: &[MapsEntry], want_delta: bool) -> Option<Delta> {
    SCAN_OK.store(0, Relaxed);
    if !available() {
        return None;
    }
    let tracked = match scan_all(maps) {
        Ok(t) => t,
        Err(msg) => {
            let text = alloc::format!(
                "snapshim: dirty-page tracking failed ({msg}); the next image is a full one\n"
            );
            let _ = sys::write_all(2, text.as_bytes());
            forget();
            return None;
        }
    };
    SCAN_OK.store(1, Relaxed);
    match parent() {
        Some((seq, image_id, meta_crc)) if want_delta => Some(Delta {
            parent: snapshim_image::ParentRef {
                image_id,
                meta_crc,
                file: snapshim_image::image_file_name(seq),
            },
            tracked,
        }),
        _ => None,
    }
}

/// Whether a delta is small enough to write during the pause (into the page cache), rather than
/// by a forked writer. Measured here (`scripts/bench_incremental.py`, 1 GiB program): writing
/// during the pause costs about 1.2-3 ms per MiB of written pages on top of the tracking scan;
/// a fork costs a page-table copy, about 40 ms per GiB of the program, whatever the delta's
/// size. So a delta up to 1/50 of the program's resident memory (20 MiB for 1 GiB; at least
/// 1 MiB, at most 64 MiB) is written during the pause.
///
/// A delta stores more than its tracked regions' written pages: every region that is stored but
/// not tracked is stored whole, counted here at its size. In a restored program that is its
/// memory still mapped from the image (about all of it at the first checkpoint after the
/// restore), which must never be written during the pause.
pub fn pause_write(d: &Delta, maps: &[MapsEntry], resident_bytes: u64) -> bool {
    let written: u64 = d
        .tracked
        .iter()
        .flat_map(|t| t.written.iter())
        .filter(|w| Tracked::has_data(w.2))
        .map(|w| w.1 - w.0)
        .sum();
    let whole: u64 = maps
        .iter()
        .filter(|e| !memory::is_excluded(e) && memory::classify(e).1)
        .filter(|e| {
            !d.tracked
                .iter()
                .any(|t| t.start == e.start && t.end == e.end)
        })
        .map(|e| e.end - e.start)
        .sum();
    written + whole <= (resident_bytes / 50).clamp(1 << 20, 64 << 20)
}
