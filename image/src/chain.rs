//! Chains of images: a delta image names its parent (identity, metadata checksum, file name in
//! the same directory), which may be a delta itself, down to a full image.
//!
//! ```text
//!   ckpt-5 (delta) ──parent──▶ ckpt-4 (delta) ──parent──▶ ckpt-3 (full)
//!   runs: written since 4      runs: written since 3      runs: every page with data
//!   inherited: the rest        inherited: the rest
//! ```
//!
//! The process at the instant of the newest image is its metadata (complete in every image)
//! plus, page by page, the data of the newest image of the chain that stores the page: a page
//! of image k is stored (a page run), inherited (look in image k+1) or neither (zero, or the
//! file's page for a private file mapping). [`Chain::sources`] resolves that into one list of
//! page runs, each naming the image file that holds it.

use std::path::{Path, PathBuf};

use crate::{Image, ImageError, PAGE_SIZE};

/// The longest chain a reader follows (a loop of parent names is an error, not a hang).
pub const MAX_CHAIN: usize = 4096;

/// An opened chain, newest image first, each checked by [`Image::open`] and each parent
/// checked against what its child says of it.
#[derive(Debug)]
pub struct Chain {
    pub images: Vec<Image>,
}

/// Pages the restored process takes from one image of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcedRun {
    /// Index into [`Chain::images`].
    pub image: usize,
    pub addr: u64,
    pub pages: u64,
    pub file_off: u64,
    /// Index of the page run it is (part of) in that image's metadata.
    pub run: usize,
}

impl SourcedRun {
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
    pub fn end(&self) -> u64 {
        self.addr + self.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

impl Chain {
    /// Opens the image at `head` and every ancestor it needs, in the same directory.
    pub fn open(head: &Path) -> Result<Chain, ImageError> {
        let mut images = vec![Image::open(head)?];
        while let Some(p) = images.last().and_then(|i| i.meta.parent.clone()) {
            let child = &images[images.len() - 1];
            let dir = child.path.parent().unwrap_or(Path::new("."));
            let path = dir.join(&p.file);
            if images.len() >= MAX_CHAIN {
                return Err(ImageError::BrokenChain {
                    path,
                    child: child.path.clone(),
                    why: format!("the chain is longer than {MAX_CHAIN} images (a loop?)"),
                });
            }
            let parent = Image::open(&path).map_err(|e| ImageError::Ancestor {
                path: path.clone(),
                head: head.to_path_buf(),
                what: "cannot be read",
                source: Box::new(e),
            })?;
            let h = &parent.header;
            let why = if h.image_id != p.image_id {
                Some(format!(
                    "it is image {:016x}, the delta names {:016x}",
                    h.image_id, p.image_id
                ))
            } else if h.meta_crc != p.meta_crc
                && parent.meta.merged_from.as_ref().map(|m| m.meta_crc) != Some(p.meta_crc)
            {
                Some(format!(
                    "its metadata checksum is {:08x}, the delta names {:08x}",
                    h.meta_crc, p.meta_crc
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ImageError::BrokenChain {
                    path,
                    child: child.path.clone(),
                    why,
                });
            }
            images.push(parent);
        }
        Ok(Chain { images })
    }

    /// The newest image: its metadata is the process's.
    pub fn head(&self) -> &Image {
        &self.images[0]
    }

    /// Bytes of page data stored in all images of the chain.
    pub fn stored_bytes(&self) -> u64 {
        self.images.iter().map(|i| i.stored_bytes()).sum()
    }

    /// The files of the chain, newest first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.images.iter().map(|i| i.path.clone()).collect()
    }

    /// The file names (no directory) of the images the newest one depends on, newest first.
    pub fn ancestor_names(&self) -> Vec<String> {
        self.images[1..]
            .iter()
            .map(|i| {
                i.path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Where each page with data of the newest image's process comes from, sorted by address,
    /// disjoint; adjacent pieces of the same page run are joined (never pieces of two runs:
    /// a run lies inside one region, and so must every run made of it).
    pub fn sources(&self) -> Vec<SourcedRun> {
        let mut out: Vec<SourcedRun> = Vec::new();
        // Address ranges still to be found, in the image being looked at.
        let mut want: Vec<(u64, u64)> = Vec::new();
        for (level, img) in self.images.iter().enumerate() {
            let m = &img.meta;
            let mut runs: Vec<(usize, &crate::PageRun)> = m.runs.iter().enumerate().collect();
            runs.sort_by_key(|r| r.1.addr);
            let inherited: Vec<(u64, u64)> =
                m.inherited.iter().map(|s| (s.addr, s.end())).collect();
            if level == 0 {
                out.extend(runs.iter().map(|&(run, r)| SourcedRun {
                    image: 0,
                    addr: r.addr,
                    pages: r.pages,
                    file_off: r.file_off,
                    run,
                }));
                want = inherited;
            } else {
                let mut next = Vec::new();
                for &(a, b) in &want {
                    let first = runs.partition_point(|r| r.1.end() <= a);
                    for &(run, r) in runs[first..].iter().take_while(|r| r.1.addr < b) {
                        let (s, e) = (r.addr.max(a), r.end().min(b));
                        out.push(SourcedRun {
                            image: level,
                            addr: s,
                            pages: (e - s) / PAGE_SIZE,
                            file_off: r.file_off + (s - r.addr),
                            run,
                        });
                    }
                    let first = inherited.partition_point(|&(_, e)| e <= a);
                    for &(s, e) in inherited[first..].iter().take_while(|&&(s, _)| s < b) {
                        next.push((s.max(a), e.min(b)));
                    }
                }
                want = next;
            }
            if want.is_empty() {
                break;
            }
        }
        out.sort_by_key(|r| r.addr);
        let mut joined: Vec<SourcedRun> = Vec::with_capacity(out.len());
        for r in out {
            match joined.last_mut() {
                Some(l)
                    if l.image == r.image
                        && l.run == r.run
                        && l.end() == r.addr
                        && l.file_off + l.len() == r.file_off =>
                {
                    l.pages += r.pages
                }
                _ => joined.push(r),
            }
        }
        joined
    }
}

/// Retention for directories with delta chains: keeps the newest `keep` images (restore points)
/// and every image they depend on, and deletes the other committed images (with their `.json`
/// statistics). An image that cannot be read is kept if it is among the newest, and names no
/// parent. Returns the deleted files.
pub fn retain(dir: &Path, keep: usize) -> Vec<PathBuf> {
    match crate::list_images(dir) {
        Ok(images) => retain_among(dir, images, keep),
        Err(_) => Vec::new(),
    }
}

/// [`retain`] given the directory's committed images, oldest first (as [`crate::list_images`]
/// returns them; the shim lists them with raw system calls instead, without libc's allocator).
pub fn retain_among(dir: &Path, images: Vec<PathBuf>, keep: usize) -> Vec<PathBuf> {
    if keep == 0 || images.len() <= keep {
        return Vec::new();
    }
    let mut needed: Vec<PathBuf> = Vec::new();
    for newest in &images[images.len() - keep..] {
        let mut path = newest.clone();
        for _ in 0..MAX_CHAIN {
            if needed.contains(&path) {
                break;
            }
            needed.push(path.clone());
            match Image::open(&path).ok().and_then(|i| i.meta.parent) {
                Some(p) => path = dir.join(p.file),
                None => break,
            }
        }
    }
    let mut removed = Vec::new();
    for p in images {
        if !needed.contains(&p) && std::fs::remove_file(&p).is_ok() {
            let _ = std::fs::remove_file(p.with_extension("json"));
            removed.push(p);
        }
    }
    removed
}
