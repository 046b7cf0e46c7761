//! Lineages, generations and instances: who wrote an image, and the lock that makes an image
//! directory one running instance's own.
//!
//! - A **lineage** is one program's history: it starts when the program is started under
//!   snapshim (or restored with `--new-lineage`) and every image of it and of its restores
//!   carries its id.
//! - A **generation** counts the restores: the original run is generation 1; a restored process
//!   is one more than the newest generation its directory has seen. An image of an older
//!   generation than the newest one known is stale: a standby can recognise and refuse it.
//! - An **instance** is one running process (original or restored), with an id of its own.
//!
//! An image directory belongs to the instance that holds the exclusive `flock` of its
//! [`LOCK_FILE`]. The kernel drops the lock when the process exits or dies, so a crash never
//! leaves a stale lock. The file itself stays, with the last holder's [`Record`]: the newest
//! generation, and for `snapshim ps`, what the running instance is doing.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lock file of an image directory (a hidden name: not an image, not listed).
pub const LOCK_FILE: &str = ".snapshim.lock";

/// Who wrote an image (format 1.4; `None` in older images).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Lineage {
    /// Chosen at random when the lineage starts.
    pub id: u64,
    /// 1 for the original run; a restored instance's is one more than the newest before it.
    pub generation: u32,
    /// Chosen at random when the instance starts.
    pub instance: u64,
    /// The image a restored instance was restored from (`None` for an original run).
    pub origin: Option<Origin>,
}

/// The image a restored instance came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Origin {
    pub file: String,
    pub image_id: u64,
    pub lineage: u64,
    pub generation: u32,
}

/// What the lock file says: the instance that holds it (or held it last) and, while it runs,
/// what it is doing. Text, one `key value` per line, so that an operator can read it too.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub pid: u32,
    pub lineage: Lineage,
    /// The engine of the last checkpoint ("" before the first).
    pub engine: String,
    /// The last committed image ("" before the first).
    pub last: String,
    /// When it was committed, in milliseconds since the Unix epoch (0 before the first).
    pub last_unix_ms: u64,
    /// A checkpoint is being taken now.
    pub checkpointing: bool,
    /// Bytes of the uffd engine's copy store the process keeps between checkpoints.
    pub store_kept_bytes: u64,
}

const MAGIC_LINE: &str = "snapshim-lock 1";

impl Record {
    /// The file's text. Padded with newlines to a fixed length, so a rewrite in place is one
    /// `pwrite` over the whole previous record.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(RECORD_LEN);
        let l = &self.lineage;
        let _ = write!(
            s,
            "{MAGIC_LINE}\npid {}\nlineage {:016x}\ngeneration {}\ninstance {:016x}\n",
            self.pid, l.id, l.generation, l.instance
        );
        if let Some(o) = &l.origin {
            let _ = writeln!(
                s,
                "origin {:016x} {:016x} {} {}",
                o.image_id, o.lineage, o.generation, o.file
            );
        }
        let _ = write!(
            s,
            "engine {}\nlast {}\nlast_unix_ms {}\ncheckpointing {}\nstore_kept_bytes {}\n",
            self.engine,
            self.last,
            self.last_unix_ms,
            u8::from(self.checkpointing),
            self.store_kept_bytes
        );
        while s.len() < RECORD_LEN {
            s.push('\n');
        }
        s
    }

    /// Reads a record back; `None` if `text` is not one.
    pub fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC_LINE {
            return None;
        }
        let mut r = Record::default();
        let hex = |v: &str| u64::from_str_radix(v, 16).ok();
        for line in lines.filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            match k {
                "pid" => r.pid = v.parse().ok()?,
                "lineage" => r.lineage.id = hex(v)?,
                "generation" => r.lineage.generation = v.parse().ok()?,
                "instance" => r.lineage.instance = hex(v)?,
                "origin" => {
                    let mut f = v.splitn(4, ' ');
                    r.lineage.origin = Some(Origin {
                        image_id: hex(f.next()?)?,
                        lineage: hex(f.next()?)?,
                        generation: f.next()?.parse().ok()?,
                        file: f.next()?.to_string(),
                    });
                }
                "engine" => r.engine = v.to_string(),
                "last" => r.last = v.to_string(),
                "last_unix_ms" => r.last_unix_ms = v.parse().ok()?,
                "checkpointing" => r.checkpointing = v == "1",
                "store_kept_bytes" => r.store_kept_bytes = v.parse().ok()?,
                _ => {} // a newer writer's key
            }
        }
        Some(r)
    }
}

/// The length a record is padded to (a longer one is written as it is).
pub const RECORD_LEN: usize = 1024;

/// An image directory's lock, held.
#[derive(Debug)]
pub struct Held {
    pub fd: OwnedFd,
    pub dir: PathBuf,
    /// The record the previous holder left (`None`: a new lock file, or not a record).
    pub previous: Option<Record>,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is in use by {}", .dir.display(), holder(*.pid))]
    Busy { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("the running snapshim instance with PID {p}"),
        None => "another running snapshim instance".into(),
    }
}

/// Takes `dir`'s lock without waiting (creating the directory and the lock file if need be).
/// The descriptor is close-on-exec.
pub fn try_lock(dir: &Path) -> Result<Held, LockError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    // The directories above may be shared with other programs' image directories: others may
    // pass through them (a program that gives up root's privileges keeps its own directory,
    // `shim/src/interpose/credentials.rs`), not list them.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(io)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(e)),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    let fd = OwnedFd::from(file);
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Busy {
                dir: dir.to_path_buf(),
                pid: read_record(&fd).map(|r| r.pid),
            });
        }
        return Err(io(e));
    }
    Ok(Held {
        previous: read_record(&fd),
        fd,
        dir: dir.to_path_buf(),
    })
}

/// The record in a lock file, read through its descriptor.
pub fn read_record(fd: &OwnedFd) -> Option<Record> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone().ok()?);
    let mut buf = vec![0u8; 4 * RECORD_LEN];
    let n = f.read_at(&mut buf, 0).ok()?;
    Record::parse(std::str::from_utf8(&buf[..n]).ok()?)
}

/// Writes `r` over the lock file's record, in one `pwrite`, and cuts what a longer previous
/// record left behind.
pub fn write_record(fd: i32, r: &Record) -> std::io::Result<()> {
    let text = r.render();
    // SAFETY: pwrite from a live buffer to a descriptor the caller owns.
    let n = unsafe { libc::pwrite(fd, text.as_ptr().cast(), text.len(), 0) };
    if n < 0 || n as usize != text.len() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ftruncate on the caller's descriptor.
    unsafe { libc::ftruncate(fd, text.len() as libc::off_t) };
    Ok(())
}

/// A random 64-bit id (never 0), from the kernel's generator.
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a live 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    let v = u64::from_le_bytes(b);
    if n == 8 && v != 0 {
        v
    } else {
        // No randomness: time and pid still tell instances apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 40) | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back() {
        let r = Record {
            pid: 42,
            lineage: Lineage {
                id: 0xabc,
                generation: 3,
                instance: 0x1234_5678_9abc_def0,
                origin: Some(Origin {
                    file: "/x y/ckpt-00000002.snap".into(),
                    image_id: 7,
                    lineage: 0xabc,
                    generation: 2,
                }),
            },
            engine: "uffd".into(),
            last: "/x y/ckpt-00000005.snap".into(),
            last_unix_ms: 99,
            checkpointing: true,
            store_kept_bytes: 4096,
        };
        let text = r.render();
        assert_eq!(text.len(), RECORD_LEN);
        assert_eq!(Record::parse(&text), Some(r));
        assert_eq!(Record::parse("not a lock\n"), None);
    }

    #[test]
    fn a_second_lock_is_refused_until_the_first_goes() {
        let dir = std::env::temp_dir().join(format!("snapshim-lock-test-{}", random_id()));
        let first = try_lock(&dir).unwrap();
        write_record(
            first.fd.as_raw_fd(),
            &Record {
                pid: 7,
                ..Record::default()
            },
        )
        .unwrap();
        match try_lock(&dir) {
            Err(LockError::Busy { pid: Some(7), .. }) => {}
            other => panic!("expected busy, got {other:?}"),
        }
        drop(first);
        let again = try_lock(&dir).unwrap();
        assert_eq!(again.previous.map(|r| r.pid), Some(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
