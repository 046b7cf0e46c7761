//! `snapshim ls [DIR]`: the images of one image directory, or of every image directory under a
//! base directory, oldest first.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use snapshim_image::{Header, IMAGE_SUFFIX, LATEST, PAGE_SIZE};

use crate::failure::{Failure, Result};
use crate::inspect::utc_offset;
use crate::parse::{format_time, human_bytes};

pub fn ls(dir: Option<PathBuf>, json: bool) -> Result<()> {
    let dir = dir.unwrap_or_else(crate::companions::default_dir);
    let list_err = |e: std::io::Error| Failure::op(format!("cannot list {}: {e}", dir.display()));
    if !std::fs::metadata(&dir).map_err(list_err)?.is_dir() {
        return Err(Failure::op(format!(
            "cannot list {}: not a directory",
            dir.display()
        )));
    }
    // DIR is either an image directory itself or a base directory of image directories.
    let mut image_dirs = Vec::new();
    if is_image_dir(&dir) {
        image_dirs.push(dir.clone());
    } else {
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(list_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && is_image_dir(p))
            .collect();
        subdirs.sort();
        image_dirs = subdirs;
    }
    if json {
        let dirs: Vec<_> = image_dirs.iter().map(|d| dir_document(d)).collect();
        return crate::json::print_ok(serde_json::json!({ "dirs": dirs }));
    }
    if image_dirs.is_empty() {
        println!("no snapshim images in {}", dir.display());
        return Ok(());
    }
    let mut out = String::new();
    for (i, d) in image_dirs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        list_dir(d, &mut out)?;
    }
    print!("{out}");
    Ok(())
}

fn is_image_dir(p: &Path) -> bool {
    p.join(LATEST).symlink_metadata().is_ok()
        || snapshim_image::list_images(p).is_ok_and(|v| !v.is_empty())
}

/// One image directory: a heading, then one line per image, oldest first.
fn list_dir(dir: &Path, out: &mut String) -> Result<()> {
    let images = snapshim_image::list_images(dir).map_err(|e| Failure::op(e.to_string()))?;
    let latest_link = dir.join(LATEST);
    let latest = std::fs::canonicalize(&latest_link).ok();
    let shown = std::path::absolute(dir).unwrap_or(dir.to_path_buf());
    let _ = writeln!(out, "{}/", shown.display());
    // Each image's own size and, for a delta, the chain it needs: its parent and the bytes of
    // every image needed to restore it.
    let size_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    for img in &images {
        let name = img.file_name().unwrap_or_default().to_string_lossy();
        let size = size_of(img);
        let created = match read_header(img) {
            Ok(h) => format_time(h.created_ns, utc_offset(h.created_ns)),
            Err(why) => format!("unreadable: {why}"),
        };
        let kind = match read_header(img) {
            Ok(h) if h.flags & snapshim_image::FLAG_DELTA == 0 => "full".to_string(),
            Ok(_) => match snapshim_image::Chain::open(img) {
                Ok(c) => {
                    let parent = c.images[1].path.file_name().unwrap_or_default();
                    let total: u64 = c.paths().iter().map(|p| size_of(p)).sum();
                    format!(
                        "delta of {}, chain of {} images, {}",
                        parent.to_string_lossy(),
                        c.images.len(),
                        human_bytes(total)
                    )
                }
                Err(e) => format!("delta, chain broken: {e}"),
            },
            Err(_) => "?".to_string(),
        };
        let is_latest = latest.is_some() && std::fs::canonicalize(img).ok() == latest;
        let _ = writeln!(
            out,
            "  {name:<22} {:>10}  {created}  {kind}{}",
            human_bytes(size),
            if is_latest { "  <- latest" } else { "" }
        );
    }
    if latest_link.symlink_metadata().is_ok() && latest.is_none() {
        let target = std::fs::read_link(&latest_link)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let _ = writeln!(out, "  latest -> {target} is dangling");
    } else if latest.as_ref().is_some_and(|l| {
        !images
            .iter()
            .any(|i| std::fs::canonicalize(i).ok().as_ref() == Some(l))
    }) {
        let _ = writeln!(
            out,
            "  latest -> {} (outside this directory's *{IMAGE_SUFFIX} files)",
            latest.as_ref().unwrap().display()
        );
    }
    Ok(())
}

/// One image directory for `--json`: its images, oldest first, as [`list_dir`] shows them.
fn dir_document(dir: &Path) -> serde_json::Value {
    use serde_json::json;
    let images = snapshim_image::list_images(dir).unwrap_or_default();
    let latest = std::fs::canonicalize(dir.join(LATEST)).ok();
    let size_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let list: Vec<_> = images
        .iter()
        .map(|img| {
            let mut doc = json!({
                "file": img.file_name().unwrap_or_default().to_string_lossy(),
                "bytes": size_of(img),
                "latest": latest.is_some() && std::fs::canonicalize(img).ok() == latest,
            });
            match read_header(img) {
                Err(why) => doc["error"] = json!(why),
                Ok(h) => {
                    doc["created_ns"] = json!(h.created_ns);
                    doc["id"] = json!(format!("{:016x}", h.image_id));
                    let delta = h.flags & snapshim_image::FLAG_DELTA != 0;
                    doc["kind"] = json!(if delta { "delta" } else { "full" });
                    if delta {
                        match snapshim_image::Chain::open(img) {
                            Ok(c) => {
                                let parent = c.images[1].path.file_name().unwrap_or_default();
                                doc["parent"] = json!(parent.to_string_lossy());
                                doc["chain_images"] = json!(c.images.len());
                                doc["chain_bytes"] =
                                    json!(c.paths().iter().map(|p| size_of(p)).sum::<u64>());
                            }
                            Err(e) => doc["error"] = json!(format!("chain broken: {e}")),
                        }
                    }
                }
            }
            doc
        })
        .collect();
    json!({
        "dir": std::path::absolute(dir).unwrap_or(dir.to_path_buf()),
        "latest": latest,
        "images": list,
    })
}

/// Reads and checks only the header page of an image.
fn read_header(path: &Path) -> std::result::Result<Header, String> {
    let mut page = Vec::with_capacity(PAGE_SIZE as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(PAGE_SIZE).read_to_end(&mut page))
        .map_err(|e| e.to_string())?;
    Header::decode(&page).map_err(|e| e.to_string())
}
