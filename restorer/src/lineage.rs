//! The image directory the restored program will own (`snapshim_image::lineage`).
//!
//! A restored program is the next generation of its image's lineage and writes its images into
//! the image's directory, which it must own: the restorer takes the directory's lock before
//! anything changes ([`claim`]), refuses when a running instance holds it (the original, or
//! another restore of the same image), and leaves the lock's descriptor open in the restored
//! process ([`Claim::keep`]), where the shim finds it and reads its lineage, generation and
//! instance from the record written here ([`Claim::record`]).
//!
//! `--new-lineage[=DIR]` restores a copy beside a running instance instead: a lineage of its
//! own, in DIR or the first free `IMAGE_DIR.N`.
//!
//! When the instance holding the directory is dead but the lock is still held, the writer of its
//! last checkpoint (a forked child) is finishing: the restore waits for it, then takes the
//! newest image.

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapshim_image::lineage::{self, Held, Lineage, LockError, Origin, Record};
use snapshim_image::Image;

use crate::error::RestoreError;

/// How long a restore waits for the last writer of a dead instance.
const WRITER_WAIT: Duration = Duration::from_secs(120);

/// What the user asked about the lineage of the restored program.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Pick {
    /// The next generation of the image's lineage, in the image's directory.
    #[default]
    Continue,
    /// A lineage of its own (`--new-lineage[=DIR]`), in DIR or beside the image's directory.
    New(Option<PathBuf>),
}

/// An image directory's lock, taken for the restored program.
pub struct Claim {
    held: Held,
    new_lineage: bool,
    fd: RawFd,
}

/// Takes the lock of the directory the restored program's images go to, for the image (file or
/// directory) `target` names.
pub fn claim(target: &Path, pick: &Pick) -> Result<Claim, RestoreError> {
    let home = if target.is_dir() {
        target.to_path_buf()
    } else {
        let parent = target.parent().unwrap_or(Path::new("."));
        if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        }
    };
    let held = match pick {
        Pick::Continue => lock_home(&home)?,
        Pick::New(Some(dir)) => lineage::try_lock(dir).map_err(|e| refusal(e, false))?,
        Pick::New(None) => lock_beside(&home)?,
    };
    let fd = held.fd.as_raw_fd();
    Ok(Claim {
        held,
        new_lineage: *pick != Pick::Continue,
        fd,
    })
}

/// The image's own directory; when its holder is dead, waits for the writer it left.
fn lock_home(home: &Path) -> Result<Held, RestoreError> {
    let deadline = Instant::now() + WRITER_WAIT;
    let mut said = false;
    loop {
        match lineage::try_lock(home) {
            Ok(h) => return Ok(h),
            Err(LockError::Busy { pid: Some(pid), .. })
                if !alive(pid) && Instant::now() < deadline =>
            {
                if !said {
                    eprintln!(
                        "snapshim-restore: PID {pid}, which owned {}, is gone; waiting for its \
                         last checkpoint to be written",
                        home.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(refusal(e, true)),
        }
    }
}

/// The first free `HOME.2`, `HOME.3`... for a new lineage.
fn lock_beside(home: &Path) -> Result<Held, RestoreError> {
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    for n in 2..=100 {
        let mut d = home.clone().into_os_string();
        d.push(format!(".{n}"));
        match lineage::try_lock(Path::new(&d)) {
            Ok(h) => {
                eprintln!(
                    "snapshim-restore: a new lineage: the restored program's images go to {}/",
                    h.dir.display()
                );
                return Ok(h);
            }
            Err(LockError::Busy { .. }) => continue,
            Err(e) => return Err(refusal(e, false)),
        }
    }
    Err(format!("{}.2 to .100 are all in use", home.display()).into())
}

fn refusal(e: LockError, home: bool) -> RestoreError {
    let hint = match (&e, home) {
        (LockError::Busy { .. }, true) => {
            "; it runs this lineage now: stop it first, or restore a copy beside it with \
             --new-lineage"
        }
        (LockError::Io { .. }, true) => {
            "; the restored program writes its images there: give it a writable directory \
             with --new-lineage=DIR"
        }
        _ => "",
    };
    RestoreError::Step(format!("cannot restore: {e}{hint}"))
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Claim {
    /// The directory the restored program's images go to.
    pub fn dir(&self) -> &Path {
        &self.held.dir
    }

    /// Writes the restored instance's record (lineage, generation, origin) for the image at
    /// `path`: the next generation after both the image's and the newest the directory saw.
    pub fn record(&self, image: &Image) -> Result<Lineage, RestoreError> {
        let from = image.meta.lineage.clone().unwrap_or_default();
        let prev = self.held.previous.as_ref().map(|r| &r.lineage);
        let seen = prev
            .filter(|p| p.id == from.id && !self.new_lineage)
            .map_or(0, |p| p.generation);
        let l = Lineage {
            id: if self.new_lineage || from.id == 0 {
                lineage::random_id()
            } else {
                from.id
            },
            generation: if self.new_lineage {
                1
            } else {
                from.generation.max(seen) + 1
            },
            instance: lineage::random_id(),
            origin: Some(Origin {
                file: image.path.display().to_string(),
                image_id: image.header.image_id,
                lineage: from.id,
                generation: from.generation,
            }),
        };
        let r = Record {
            pid: std::process::id(),
            lineage: l.clone(),
            ..Record::default()
        };
        lineage::write_record(self.fd, &r)
            .map_err(|e| format!("cannot write {}: {e}", self.dir().display()))?;
        Ok(l)
    }

    /// Leaves the lock open in the restored process, on a number above the program's (`base`),
    /// for the shim to find.
    pub fn keep(self, base: RawFd) -> Result<RawFd, RestoreError> {
        let fd = self.held.fd.into_raw_fd();
        Ok(crate::objects::move_high(fd, base)?)
    }
}

/// Whether `image` is of an older generation of its lineage than the newest its directory's
/// lock file records: a stale image (written before a later restore or failover), which a
/// standby must not resume.
pub fn stale(image: &Image, dir: &Path) -> Option<String> {
    let l = image.meta.lineage.as_ref()?;
    let text = std::fs::read_to_string(dir.join(lineage::LOCK_FILE)).ok()?;
    let r = Record::parse(&text)?;
    (r.lineage.id == l.id && l.generation < r.lineage.generation).then(|| {
        format!(
            "{} is of generation {} of its lineage, and generation {} has run since",
            image.path.display(),
            l.generation,
            r.lineage.generation
        )
    })
}
