//! A group's image set: `DIR/NAME.group/set-N.json`, one file naming every member's image of
//! one instant, and `latest` pointing at the newest committed set.
//!
//! The commit is one rename, as an image's: the set is written to a temporary name, fsynced,
//! renamed to `set-N.json` (`RENAME_NOREPLACE`: never over another set), the directory fsynced,
//! then `latest` is repointed (a new symlink renamed over it) and the directory fsynced again.
//! A crash at any point leaves `latest` at a complete set: the previous one, or the new one.
//!
//! Each member's image is found at restore time by its image id, first beside the group
//! directory (`../<image directory name>/<image file>`: where it is when every member shares
//! one image directory DIR, also in a copy of DIR), else at the absolute path it had when the
//! set was committed.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::{rename_noreplace, sync_dir};
use crate::failure::{Failure, Result};

/// The name of the pointer at the newest committed set in a group directory.
pub const LATEST: &str = "latest";

/// One member of a set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    /// The program's name (`/proc/PID/comm`).
    pub program: String,
    /// Its PID when the set was taken, as the coordinator saw it.
    pub pid: i32,
    /// Its image, absolute, as committed.
    pub image: PathBuf,
    /// The image's id (its header's), in hexadecimal.
    pub image_id: String,
    /// Its own pause, in microseconds.
    pub pause_us: u64,
}

/// A group's image set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Set {
    pub group: String,
    /// The N of `set-N.json`.
    pub set: u64,
    /// When it was committed (ns since the epoch).
    pub time_ns: u64,
    /// From the first member's pause to the last member's resume, in microseconds.
    pub group_pause_us: u64,
    pub members: Vec<Member>,
}

/// `DIR/NAME.group`.
pub fn group_dir(base: &Path, name: &str) -> PathBuf {
    base.join(format!("{name}.group"))
}

/// Writes `set` (its `set` number is chosen here) into `dir` and makes it the current one.
/// Returns its path.
pub fn commit(dir: &Path, set: &mut Set) -> Result<PathBuf> {
    let io = |what: &str, p: &Path| {
        let what = what.to_string();
        let p = p.to_path_buf();
        move |e: std::io::Error| Failure::op(format!("cannot {what} {}: {e}", p.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create the group directory", dir))?;
    set.set = next_number(dir)?;
    let name = format!("set-{}.json", set.set);
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_vec_pretty(set)
        .map_err(|e| Failure::op(format!("cannot encode the set: {e}")))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, &text)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    let path = dir.join(&name);
    if let Err(e) = rename_noreplace(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("commit the set as", &path)(e));
    }
    sync_dir(dir).map_err(io("fsync", dir))?;
    let link_tmp = dir.join(format!(".{LATEST}.{}", std::process::id()));
    let _ = std::fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(&name, &link_tmp).map_err(io("create", &link_tmp))?;
    std::fs::rename(&link_tmp, dir.join(LATEST)).map_err(io("repoint", &dir.join(LATEST)))?;
    sync_dir(dir).map_err(io("fsync", dir))?;
    Ok(path)
}

/// One past the highest N of the `set-N.json` in `dir`.
fn next_number(dir: &Path) -> Result<u64> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failure::op(format!("cannot list {}: {e}", dir.display())))?;
    let highest = entries
        .flatten()
        .filter_map(|e| set_number(&e.file_name().to_string_lossy()))
        .max()
        .unwrap_or(0);
    Ok(highest + 1)
}

/// N of a file named `set-N.json`.
fn set_number(name: &str) -> Option<u64> {
    name.strip_prefix("set-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// The set `target` names: a set file, or a group directory (its `latest`). Returns the set
/// and its path.
pub fn read(target: &Path) -> Result<(Set, PathBuf)> {
    let path = if target.is_dir() {
        let latest = target.join(LATEST);
        std::fs::canonicalize(&latest).map_err(|e| {
            Failure::op(format!(
                "{} holds no committed group set ({}: {e})",
                target.display(),
                latest.display()
            ))
        })?
    } else {
        target.to_path_buf()
    };
    let text = std::fs::read(&path)
        .map_err(|e| Failure::op(format!("cannot read {}: {e}", path.display())))?;
    let set: Set = serde_json::from_slice(&text)
        .map_err(|e| Failure::op(format!("{} is not a group set: {e}", path.display())))?;
    if set.members.is_empty() {
        return Err(Failure::op(format!("{} names no member", path.display())));
    }
    Ok((set, path))
}

/// Where `m`'s image is now, for the set at `set_path`: beside the group directory, else where
/// it was committed; only a file with the recorded image id. Err says why not.
pub fn locate(m: &Member, set_path: &Path) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for candidate in candidates(m, set_path) {
        match image_id(&candidate) {
            Some(id) if id == m.image_id => return Ok(candidate),
            Some(id) => tried.push(format!("{} is image {id}", candidate.display())),
            None => tried.push(format!("{} is not there", candidate.display())),
        }
        if tried.len() > 1 {
            break;
        }
    }
    Err(Failure::op(format!(
        "member {} (PID {}): image {} not found ({})",
        m.program,
        m.pid,
        m.image_id,
        tried.join("; ")
    )))
}

/// Where to look for `m`'s image, in order (see the module doc).
fn candidates(m: &Member, set_path: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let file = m.image.file_name();
    let dir_name = m.image.parent().and_then(|d| d.file_name());
    let base = set_path.parent().and_then(|g| g.parent());
    if let (Some(base), Some(dir_name), Some(file)) = (base, dir_name, file) {
        v.push(base.join(dir_name).join(file));
    }
    if !v.contains(&m.image) {
        v.push(m.image.clone());
    }
    v
}

/// The id of the image at `path`, from its header, in hexadecimal.
pub fn image_id(path: &Path) -> Option<String> {
    let image = snapshim_image::Image::open(path).ok()?;
    Some(format!("{:016x}", image.header.image_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(image: &str) -> Member {
        Member {
            program: "p".into(),
            pid: 1,
            image: PathBuf::from(image),
            image_id: "0".into(),
            pause_us: 0,
        }
    }

    #[test]
    fn images_are_looked_for_beside_the_group_directory_first() {
        let m = member("/old/ckpt/solver/ckpt-3.snap");
        assert_eq!(
            candidates(&m, Path::new("/copy/ckpt/g.group/set-2.json")),
            [
                PathBuf::from("/copy/ckpt/solver/ckpt-3.snap"),
                PathBuf::from("/old/ckpt/solver/ckpt-3.snap")
            ]
        );
        // In place: one candidate.
        assert_eq!(
            candidates(&m, Path::new("/old/ckpt/g.group/set-2.json")).len(),
            1
        );
    }

    #[test]
    fn sets_are_numbered_and_committed_with_latest() {
        let dir = std::env::temp_dir().join(format!("snapshim-set-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut set = Set {
            group: "g".into(),
            set: 0,
            time_ns: 5,
            group_pause_us: 7,
            members: vec![member("/a/b/ckpt-1.snap")],
        };
        let first = commit(&dir, &mut set).unwrap();
        assert_eq!(first, dir.join("set-1.json"));
        let second = commit(&dir, &mut set).unwrap();
        assert_eq!(second, dir.join("set-2.json"));
        let (read_back, path) = read(&dir).unwrap();
        assert_eq!((read_back.set, path), (2, second));
        assert_eq!(set_number("set-12.json"), Some(12));
        assert_eq!(set_number(".set-1.json.tmp"), None);
        std::fs::write(dir.join("bad.json"), "{").unwrap();
        assert!(read(&dir.join("bad.json"))
            .unwrap_err()
            .message
            .contains("is not a group set"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
