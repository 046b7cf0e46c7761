//! The image directory this instance owns (`snapshim_image::lineage`): its lock, the lineage
//! and generation its images carry, which images are its own, and the record `snapshim ps`
//! reads.
//!
//! - An original run takes its directory at its first checkpoint, or at start-up when
//!   `snapshim run` asks where the images go (`SNAPSHIM_ANNOUNCE`). If another running instance
//!   holds that directory, it takes `DIR.2`, `DIR.3`... and says so in one line, unless the user
//!   named the directory (`SNAPSHIM_NAME`): then it is refused.
//! - A restored process gets its directory from the restorer, which took the lock before the
//!   program resumed and left the descriptor open: [`after_restore`] finds it and reads its
//!   lineage and generation from the lock file's record.
//! - Images are numbered on from the highest number in the directory, so no commit replaces
//!   another instance's image; retention removes only the images this instance wrote.
//!
//! Only the helper thread (and the writer it forks, which inherits and keeps the lock until its
//! image is committed) uses this module; a child the program forks closes its copy of the lock
//! ([`LOCK_FD`], closed by the shim's `pthread_atfork` handler).
#![allow(unsafe_code)]

use alloc::string::String;
use core::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use snapshim_image::lineage::{self, Lineage, LockError, Record, LOCK_FILE};

use crate::config::Config;
use crate::sys;

/// The lock's descriptor, -1 while none is held.
pub static LOCK_FD: AtomicI32 = AtomicI32::new(-1);

struct Owner {
    dir: PathBuf,
    /// The lock file's device and inode: the program may close or reuse our descriptor.
    lock_id: (u64, u64),
    /// Images numbered from here on are this instance's.
    first_seq: u64,
    record: Record,
}

static OWNER: Mutex<Option<Owner>> = Mutex::new(None);

fn owner() -> std::sync::MutexGuard<'static, Option<Owner>> {
    OWNER.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory this instance writes its images to, taken now if it holds none (or lost the
/// one it had: the program closed the descriptor).
pub fn acquire(cfg: &Config) -> Result<PathBuf, String> {
    let mut g = owner();
    if let Some(o) = g.as_ref() {
        if still_held(o) {
            return Ok(o.dir.clone());
        }
    }
    // An instance that lost its lock keeps its lineage, generation and instance id.
    let lineage = g
        .take()
        .map(|o| o.record.lineage)
        .unwrap_or_else(|| Lineage {
            id: lineage::random_id(),
            generation: 1,
            instance: lineage::random_id(),
            origin: None,
        });
    let (held, note) = some_dir(cfg, lineage::try_lock)?;
    if let Some(note) = note {
        let _ = sys::write_all(2, alloc::format!("snapshim: {note}\n").as_bytes());
    }
    let fd = high(held.fd.into_raw_fd());
    let record = Record {
        pid: std::process::id(),
        lineage,
        ..Record::default()
    };
    let o = adopt(fd, held.dir, record);
    let dir = o.dir.clone();
    *g = Some(o);
    Ok(dir)
}

/// The directories beside `dir` that earlier programs of this process took before they
/// `exec`ed this one (a script and its interpreter, `env`...: `snapshim run` announces each),
/// known by their lock record's PID: each goes if nothing but its lock file is in it.
pub fn remove_earlier_stages(dir: &Path) {
    let Some(base) = dir.parent() else { return };
    let mut c = base.as_os_str().as_encoded_bytes().to_vec();
    c.push(0);
    let Ok(names) = sys::list_dir_names(&c) else {
        return;
    };
    for n in names.iter().filter(|n| *n != "." && *n != "..") {
        let other = base.join(n);
        let ours = std::fs::read_to_string(other.join(LOCK_FILE))
            .ok()
            .and_then(|t| Record::parse(&t))
            .is_some_and(|r| r.pid == std::process::id() && r.last.is_empty());
        if other != dir && ours {
            if let Ok(held) = lineage::try_lock(&other) {
                remove_if_unused(&other);
                drop(held);
            }
        }
    }
}

/// Removes `dir` if nothing but its lock file is in it.
fn remove_if_unused(dir: &Path) {
    let mut c = dir.as_os_str().as_encoded_bytes().to_vec();
    c.push(0);
    match sys::list_dir_names(&c) {
        Ok(names)
            if names
                .iter()
                .all(|n| n == "." || n == ".." || n == LOCK_FILE) =>
        {
            let _ = std::fs::remove_file(dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(dir);
        }
        _ => {}
    }
}

/// `cfg.image_dir`, or if another instance holds it (and the user did not name it), the first
/// of `DIR.2`, `DIR.3`... that is free (`take` tries one), with a line saying so.
fn some_dir<T>(
    cfg: &Config,
    take: impl Fn(&Path) -> Result<T, LockError>,
) -> Result<(T, Option<String>), String> {
    let mut first_busy = None;
    for n in 1..=100u32 {
        let dir = if n == 1 {
            cfg.image_dir.clone()
        } else {
            let mut d = cfg.image_dir.clone().into_os_string();
            d.push(alloc::format!(".{n}"));
            PathBuf::from(d)
        };
        match take(&dir) {
            Ok(held) => {
                let note = first_busy
                    .map(|busy| alloc::format!("{busy}: images go to {}/", dir.display()));
                return Ok((held, note));
            }
            Err(e @ LockError::Busy { .. }) if cfg.name_given => {
                return Err(alloc::format!(
                    "image directory {e}; give this program another name (--name) or directory \
                     (--dir)"
                ));
            }
            Err(e @ LockError::Busy { .. }) => {
                first_busy.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                let errno = match &e {
                    LockError::Io { source, .. } => source.raw_os_error().unwrap_or(0),
                    LockError::Busy { .. } => 0,
                };
                return Err(alloc::format!("{e}{}", access_hint(errno, &dir)));
            }
        }
    }
    Err(alloc::format!(
        "{} and the 99 directories beside it are in use",
        cfg.image_dir.display()
    ))
}

/// Owns the directory of the lock `fd`: numbering goes on after its highest image, and the
/// record says who holds it.
fn adopt(fd: i32, dir: PathBuf, record: Record) -> Owner {
    LOCK_FD.store(fd, Relaxed);
    let _ = lineage::write_record(fd, &record);
    Owner {
        first_seq: highest_seq(&dir) + 1,
        lock_id: file_id(fd).unwrap_or_default(),
        dir,
        record,
    }
}

/// In a restored process: the restorer left the lock of the directory this instance owns
/// open (see the restorer's `lineage.rs`); its record holds the lineage and generation.
/// Without one (an older restorer), the next checkpoint takes a directory as an original run
/// does, as the next generation.
pub fn after_restore() {
    let mut g = owner();
    let before = g.take();
    LOCK_FD.store(-1, Relaxed);
    if let Some((fd, dir)) = find_restorer_lock() {
        if let Some(record) = read_record(fd) {
            *g = Some(adopt(fd, dir, record));
            return;
        }
        sys::close(fd);
    }
    if let Some(b) = before {
        // Not ours any more: the original's lock went with the original.
        let mut l = b.record.lineage;
        l.generation += 1;
        l.instance = lineage::random_id();
        *g = Some(Owner {
            dir: PathBuf::new(),
            lock_id: (0, 0),
            first_seq: 0,
            record: Record {
                lineage: l,
                ..Record::default()
            },
        });
    }
}

/// The lineage the next image carries.
pub fn lineage() -> Option<Lineage> {
    owner().as_ref().map(|o| o.record.lineage.clone())
}

/// The number of the next image: after `last` (this instance's last one) and after every image
/// already in the directory.
pub fn next_seq(last: u64) -> u64 {
    let first = owner().as_ref().map_or(1, |o| o.first_seq);
    (last + 1).max(first)
}

/// Whether image number `seq` was written by this instance (retention removes no other).
pub fn is_own(seq: u64) -> bool {
    owner().as_ref().is_some_and(|o| seq >= o.first_seq)
}

/// The directory this instance owns, or the configured one before it owns any.
pub fn dir(cfg: &Config) -> PathBuf {
    match owner().as_ref() {
        Some(o) if !o.dir.as_os_str().is_empty() => o.dir.clone(),
        _ => cfg.image_dir.clone(),
    }
}

/// Updates the record: a checkpoint starts (`None`) or was committed.
pub fn note(checkpointing: bool, committed: Option<(&str, &str, u64)>) {
    let mut g = owner();
    let Some(o) = g.as_mut() else { return };
    o.record.checkpointing = checkpointing;
    if let Some((path, engine, store)) = committed {
        o.record.last = path.into();
        o.record.engine = engine.into();
        o.record.store_kept_bytes = store;
        o.record.last_unix_ms = sys::clock_ns(libc::CLOCK_REALTIME) / 1_000_000;
    }
    let fd = LOCK_FD.load(Relaxed);
    if fd >= 0 {
        let _ = lineage::write_record(fd, &o.record);
    }
}

/// Our descriptor is still the lock, and the lock file is still the directory's (someone may
/// have removed the directory). A program that gave up root's privileges may no longer see
/// the file: the descriptor is then all there is to go by.
fn still_held(o: &Owner) -> bool {
    use std::os::unix::fs::MetadataExt;
    let fd = LOCK_FD.load(Relaxed);
    let ours = fd >= 0 && file_id(fd) == Some(o.lock_id);
    match std::fs::metadata(o.dir.join(LOCK_FILE)) {
        Ok(m) => ours && (m.dev(), m.ino()) == o.lock_id,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => ours,
        Err(_) => false,
    }
}

/// Hands the image directory this instance holds (itself, its lock file and its images) to
/// `uid`: the program is about to give up root's privileges for that user's, as whom it writes
/// its next images. Signals stay blocked meanwhile, so that no checkpoint parks this thread
/// while it holds the owner's lock.
pub fn hand_over(uid: u32) {
    let old = sys::block_all_signals();
    if let Some(o) = owner().as_ref() {
        let chown = |p: &Path| std::os::unix::fs::lchown(p, Some(uid), None);
        let _ = chown(&o.dir);
        if let Ok(entries) = std::fs::read_dir(&o.dir) {
            entries.flatten().for_each(|e| {
                let _ = chown(&e.path());
            });
        }
    }
    sys::restore_signals(&old);
}

/// What to add to an error of `errno` on the image directory: when access was denied to a
/// program that runs as another user than the directory's owner (one that gave up root's
/// privileges after it started, as servers do), what to do about it.
pub fn access_hint(errno: i32, dir: &Path) -> String {
    if errno != libc::EACCES && errno != libc::EPERM {
        return String::new();
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    // The first directory on the way that this user can look at, and its owner.
    let owner = dir.ancestors().find_map(|d| {
        let m = std::fs::metadata(d).ok()?;
        Some((d, std::os::unix::fs::MetadataExt::uid(&m)))
    });
    match owner {
        Some((d, uid)) if uid != euid => alloc::format!(
            "; this program runs as uid {euid} now and {} is uid {uid}'s: a program that changes \
             its user after it starts needs an image directory that user can reach and write \
             (--dir)",
            d.display()
        ),
        _ => String::new(),
    }
}

fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: a zeroed stat is valid; fstat fills it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Moves the lock's descriptor out of the program's usual range (programs count on getting the
/// lowest free numbers).
fn high(fd: i32) -> i32 {
    // SAFETY: dup of our own descriptor to a free number at or above 900.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 900) };
    if n < 0 {
        return fd;
    }
    sys::close(fd);
    n
}

fn read_record(fd: i32) -> Option<Record> {
    // SAFETY: borrows the descriptor for the read only; it stays open.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    lineage::read_record(&b.try_clone_to_owned().ok()?)
}

/// The descriptor the restorer left: the one open on a lock file (the original's own lock was
/// not in the image).
fn find_restorer_lock() -> Option<(i32, PathBuf)> {
    let fds = sys::list_numeric_dir(b"/proc/self/fd\0").ok()?;
    fds.into_iter().find_map(|fd| {
        let mut link = alloc::format!("/proc/self/fd/{fd}").into_bytes();
        link.push(0);
        let target = PathBuf::from(sys::readlink(&link).ok()?);
        if target.file_name()? != LOCK_FILE {
            return None;
        }
        Some((fd, target.parent()?.to_path_buf()))
    })
}

/// The highest image number in `dir`, committed or being written (a writer of a dead instance
/// may still commit its temporary file).
fn highest_seq(dir: &Path) -> u64 {
    let mut c = dir.as_os_str().as_encoded_bytes().to_vec();
    c.push(0);
    let Ok(names) = sys::list_dir_names(&c) else {
        return 0;
    };
    names
        .iter()
        .filter_map(|n| seq_of(n.trim_start_matches('.')))
        .max()
        .unwrap_or(0)
}

/// `ckpt-00000012.snap...` → 12.
pub fn seq_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?.split('.').next()?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_come_from_every_kind_of_image_name() {
        assert_eq!(seq_of("ckpt-00000012.snap"), Some(12));
        assert_eq!(seq_of("ckpt-00000013.snap.tmp"), Some(13));
        assert_eq!(seq_of("ckpt-00000014.json"), Some(14));
        assert_eq!(seq_of("latest"), None);
        assert_eq!(seq_of(LOCK_FILE.trim_start_matches('.')), None);
    }
}
