//! Commit: fsync the image's temporary file (`target.rs`), rename it into place, fsync the
//! directory, repoint `latest`; retention (the one place images are removed); the statistics
//! beside the image. The previous image stays complete until the new one is committed: a crash
//! at any instant leaves a restorable `latest`.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;

use snapshim_image as image;

use super::capture::Captured;
use super::flush;
use super::target::{abandon, create_named_target, errmsg, Target};
use crate::config::Config;
use crate::state::{MARKS, PHASES};
use crate::sys::{self, sc};

/// fsync, rename into place, fsync the directory, repoint `latest`, drop images beyond `keep`.
pub fn commit(cfg: &Config, t: &Target, seq: u64) -> Result<(), String> {
    // SAFETY: fsync on our own descriptor.
    sys::check(unsafe { sc!(libc::SYS_fsync, t.fd) }).map_err(|e| errmsg("fsync", &t.tmp, e))?;
    // Never over an existing image (another instance's, or one a dead writer committed late).
    rename_noreplace(&t.tmp, &t.path)
        .map_err(|e| alloc::format!("cannot rename {} into place: {e}", t.tmp.display()))?;
    let link_tmp = t.dir.join(".latest.tmp");
    let _ = std::fs::remove_file(&link_tmp);
    let name = t.path.file_name().unwrap_or_default();
    std::os::unix::fs::symlink(name, &link_tmp)
        .and_then(|()| std::fs::rename(&link_tmp, t.dir.join(image::LATEST)))
        .map_err(|e| alloc::format!("cannot update {}/latest: {e}", t.dir.display()))?;
    if let Ok(d) = std::fs::File::open(&t.dir) {
        let _ = d.sync_all();
    }
    retain_after_commit(cfg, &t.dir, seq);
    Ok(())
}

/// `rename`, but failing with EEXIST rather than replacing `to`.
fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let (f, t) = (super::target::cpath(from), super::target::cpath(to));
    // SAFETY: two NUL-terminated paths, relative to no directory descriptor.
    let r = unsafe {
        sc!(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE
        )
    };
    sys::check(r)
        .map(|_| ())
        .map_err(std::io::Error::from_raw_os_error)
}

// ---------------------------------------------------------------------------------------------
// Retention: the one place images are removed (SNAPSHIM_KEEP).

/// Retention right after a commit, in the writer (which may be the forked child): without
/// chains, the image `keep` numbers older than `seq` goes, with its statistics, if this
/// instance wrote it (`owner::is_own`: never another instance's or generation's). Deltas depend on
/// older images: with chains, the helper applies [`retain_chains`] after the commit instead (it
/// reads directories and image headers: not here, where this may be a forked writer).
fn retain_after_commit(cfg: &Config, dir: &std::path::Path, seq: u64) {
    let keep = cfg.keep;
    if cfg.chains() {
        return;
    }
    if keep > 0 && seq > keep && crate::owner::is_own(seq - keep) {
        let old = dir.join(image::image_file_name(seq - keep));
        let _ = std::fs::remove_file(&old);
        let _ = std::fs::remove_file(old.with_extension("json"));
    }
}

/// Retention with chains (after a committed image, outside the pause): keeps the newest
/// `SNAPSHIM_KEEP` images of this instance and every image they depend on; other instances'
/// images are not considered. The directory is listed with raw system calls.
pub fn retain_chains(cfg: &Config) {
    let dir = crate::owner::dir(cfg);
    let Ok(names) = sys::list_dir_names(&super::target::cpath(&dir)) else {
        return;
    };
    let mut images: Vec<std::path::PathBuf> = names
        .iter()
        .filter(|n| n.ends_with(snapshim_image::IMAGE_SUFFIX) && !n.starts_with('.'))
        .filter(|n| crate::owner::seq_of(n).is_some_and(crate::owner::is_own))
        .map(|n| dir.join(n))
        .collect();
    images.sort();
    snapshim_image::retain_among(&dir, images, cfg.keep as usize);
}

/// `SNAPSHIM_TWIN_FULL`: in the forked writer of a delta, after the delta is committed, writes a
/// full image of the same instant as `ckpt-N.twin` (renamed into place, `latest` untouched), so
/// tests can check that the chain restores exactly what a full image does.
pub fn write_twin(cfg: &Config, cap: &Captured, seq: u64) -> Result<(), String> {
    let full = cap.as_full();
    let name = alloc::format!("ckpt-{seq:08}.twin");
    let t = create_named_target(cfg, &name)?;
    let r = flush::write_out(cfg, &full, &t).and_then(|_| {
        std::fs::rename(&t.tmp, &t.path)
            .map_err(|e| alloc::format!("cannot rename {}: {e}", t.tmp.display()))
    });
    if r.is_err() {
        abandon(&t);
    } else {
        sys::close(t.fd);
    }
    r
}
/// The image's statistics, machine-readable, beside it (`ckpt-N.json`). Also what the process
/// keeps after the checkpoint: the uffd engine's copy store (`SNAPSHIM_KEEP_STORE`), whose
/// pages count in its resident memory.
pub fn write_stats(s: &Stats) {
    // The pause's phases that were timed, in microseconds.
    let mut phases = String::new();
    let mut prev = MARKS[0].load(Relaxed);
    for (i, m) in MARKS.iter().enumerate().skip(1) {
        let t = m.load(Relaxed);
        if t != 0 && prev != 0 && t >= prev {
            if !phases.is_empty() {
                phases.push_str(", ");
            }
            phases.push_str(&alloc::format!("\"{}\": {}", PHASES[i], (t - prev) / 1000));
            prev = t;
        }
    }
    let json = alloc::format!(
        "{{\"image\": \"{}\", \"engine\": \"{}\", \"bytes\": {}, \"resident_bytes\": {}, \
         \"pause_us\": {}, \"flush_us\": {}, \"total_us\": {}, \"pages_copied_before_write\": {}, \
         \"pages_copied_ahead\": {}, \"huge_pages_split\": {}, \"copy_store_kept_bytes\": {}, \"delta\": {}, \
         \"pause_started_monotonic_ns\": {}, \"pause_phases_us\": {{{phases}}}}}\n",
        s.path.replace('\\', "\\\\").replace('"', "\\\""),
        s.engine.name(),
        s.bytes,
        s.resident,
        s.pause_ns / 1000,
        s.flush_ns / 1000,
        s.total_ns / 1000,
        s.copied,
        s.copied_ahead,
        s.huge_split,
        crate::engine::uffd::kept_store_bytes(),
        s.delta,
        MARKS[0].load(Relaxed)
    );
    let path = std::path::Path::new(&s.path).with_extension("json");
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path);
    if let Ok(mut f) = file {
        let _ = f.write_all(json.as_bytes());
    }
}

/// A committed image and how it went.
pub struct Stats {
    pub path: String,
    pub bytes: u64,
    pub pause_ns: u64,
    pub flush_ns: u64,
    /// Pages the program copied before the writer had stored them (approximate: its minor
    /// faults during the flush).
    pub copied: u64,
    /// Of those, pages the writer copied ahead of the program (uffd engine, see
    /// uffd::help_from_end).
    pub copied_ahead: u64,
    /// Huge pages split to serve a write fault quickly (uffd engine, see uffd::Table::may_split).
    pub huge_split: u64,
    pub total_ns: u64,
    pub resident: u64,
    pub engine: crate::engine::Engine,
    pub seq: u64,
    /// A delta image (incremental checkpoints).
    pub delta: bool,
}
