//! A store: one directory per service, holding its images under the names the shim gives them
//! (`ckpt-N.snap`), so `snapshim-restore [--standby] STORE/NAME` reads it unchanged. What is
//! in a store, and how an image enters one.

use std::path::{Path, PathBuf};

use snapshim_image::{Chain, Header, Image, IMAGE_SUFFIX, LATEST, PAGE_SIZE};

use super::proto::HeldRef;
use super::ReplicateError;

/// The newest complete image of a directory, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub path: PathBuf,
    /// The file name, `ckpt-N.snap`.
    pub file: String,
    pub seq: u64,
    pub id: u64,
    /// The parent's id for a delta, 0 for a full image.
    pub parent_id: u64,
    /// 0 in images older than format 1.4, which record neither.
    pub lineage: u64,
    pub generation: u32,
    /// When the snapshot was taken, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// The newest image of `dir` that opens with every image it depends on (header and metadata
/// checked, not the pages), or `None`.
pub fn newest(dir: &Path) -> Option<Held> {
    newest_chain(dir).map(|c| held(c.head()))
}

/// The chain of the newest image of `dir` that opens completely.
pub(super) fn newest_chain(dir: &Path) -> Option<Chain> {
    let images = snapshim_image::list_images(dir).ok()?;
    images.iter().rev().find_map(|p| Chain::open(p).ok())
}

pub(super) fn held(img: &Image) -> Held {
    let file = file_name(&img.path);
    let l = img.meta.lineage.as_ref();
    Held {
        path: img.path.clone(),
        seq: seq_of(&file).unwrap_or(0),
        file,
        id: img.header.image_id,
        parent_id: img.header.parent_id,
        lineage: l.map_or(0, |l| l.id),
        generation: l.map_or(0, |l| l.generation),
        created_ns: img.header.created_ns,
    }
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// The sequence number of a committed image's name `ckpt-N.snap` (8 or more digits), or
/// `None` for any other name: the only names a receiver writes.
pub fn seq_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?.strip_suffix(IMAGE_SUFFIX)?;
    if digits.len() < 8 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (snapshim_image::image_file_name(seq) == name).then_some(seq)
}

/// A service name usable as a directory: one path component, not hidden.
pub fn check_service(name: &str) -> Result<(), ReplicateError> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
        return Err(ReplicateError::Protocol(format!(
            "'{name}' cannot be a service name (one path component, not starting with '.')"
        )));
    }
    Ok(())
}

/// The image id in the header of the image at `path`, if it has a readable header.
pub fn id_at(path: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    f.read_exact_at(&mut page, 0).ok()?;
    Header::decode(&page).ok().map(|h| h.image_id)
}

/// The committed images of `dir` (none if it does not exist), by name and header id.
pub fn holding(dir: &Path) -> Vec<HeldRef> {
    let images = snapshim_image::list_images(dir).unwrap_or_default();
    images
        .iter()
        .filter_map(|p| {
            Some(HeldRef {
                file: file_name(p),
                id: id_at(p)?,
            })
        })
        .collect()
}

/// Points `dir/latest` at the newest committed image of `dir`, as the shim's commit does.
pub fn repoint_latest(dir: &Path) -> std::io::Result<()> {
    let Some(newest) = snapshim_image::list_images(dir)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .pop()
    else {
        return Ok(());
    };
    let tmp = dir.join(".latest.replicate.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(newest.file_name().unwrap_or_default(), &tmp)?;
    std::fs::rename(&tmp, dir.join(LATEST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shims_image_names_are_committed_names() {
        assert_eq!(seq_of("ckpt-00000012.snap"), Some(12));
        assert_eq!(seq_of("ckpt-123456789.snap"), Some(123456789));
        for bad in [
            "ckpt-12.snap",
            "ckpt-0000001x.snap",
            ".ckpt-00000012.snap.tmp",
            "ckpt-00000012.snap.tmp",
            "../ckpt-00000012.snap",
            "ckpt-000000012.snap",
            "latest",
        ] {
            assert_eq!(seq_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn service_names_are_one_visible_component() {
        assert!(check_service("web").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a\0"] {
            assert!(check_service(bad).is_err(), "{bad:?}");
        }
    }
}
