//! `snapshim merge IMAGE_OR_DIR`: folds a chain of delta images into one full image.
//!
//! Algorithm (a crash at any step leaves a restorable chain):
//! 1. open the chain from the named image down to its full base, check every checksum (damage is
//!    never folded into a new image);
//! 2. write a full image under a temporary name (`.NAME.merge.tmp`): the newest image's
//!    metadata, and each page from the newest image of the chain that stores it
//!    ([`Chain::sources`]); same identity as the newest image, which it replaces, and that
//!    image's metadata checksum and the older images' names in `merged_from`, so deltas that
//!    name it as their parent (written meanwhile by the running program) still find it, and an
//!    interrupted merge can finish step 4 when run again; fsync;
//! 3. rename it over the newest image (atomic: the name holds the delta or the full image,
//!    both restorable to the same state), fsync the directory;
//! 4. delete the older images of the chain, newest first, each unless another image in the
//!    directory still names it as its parent.
//!
//! `SNAPSHIM_MERGE_CRASH=after-write|after-rename` kills the merger with SIGKILL right after
//! step 2 or 3, for the tests that check a crash leaves a restorable chain.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use snapshim_image::{Chain, MergedFrom, PageRun, PAGE_SIZE};

use crate::failure::{Failure, Result};

/// Bytes copied at a time.
const CHUNK: u64 = 8 << 20;

pub fn merge(arg: &Path, quiet: bool) -> Result<()> {
    let head = snapshim_image::resolve(arg).map_err(|e| Failure::op(e.to_string()))?;
    let head = std::fs::canonicalize(&head).unwrap_or(head);
    let chain = Chain::open(&head).map_err(|e| Failure::op(format!("{}: {e}", head.display())))?;
    let dir = head.parent().unwrap_or(Path::new(".")).to_path_buf();
    if chain.images.len() == 1 {
        // A merged image whose old chain may still be there (the merge was interrupted).
        let old: Vec<PathBuf> = chain
            .head()
            .meta
            .merged_from
            .iter()
            .flat_map(|m| m.files.iter().map(|f| dir.join(f)))
            .filter(|p| p.exists())
            .collect();
        let removed = remove_old_chain(&dir, &old);
        if !quiet {
            println!(
                "{} is a full image already{}",
                head.display(),
                removed_text(&removed)
            );
        }
        return Ok(());
    }
    chain
        .verify_pages()
        .map_err(|e| Failure::op(format!("{}: {e}", head.display())))?;
    let name = head
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.merge.tmp"));
    let bytes = write_merged(&chain, &tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    crash_point("after-write");
    std::fs::rename(&tmp, &head).map_err(|e| {
        Failure::op(format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            head.display()
        ))
    })?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    crash_point("after-rename");
    let removed = remove_old_chain(&dir, &chain.paths()[1..]);
    if !quiet {
        println!(
            "merged {} images into {} ({}){}",
            chain.images.len(),
            head.display(),
            crate::parse::human_bytes(bytes),
            removed_text(&removed)
        );
    }
    Ok(())
}

fn removed_text(removed: &[PathBuf]) -> String {
    if removed.is_empty() {
        return String::new();
    }
    let names: Vec<String> = removed
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    format!("; removed {}", names.join(", "))
}

fn crash_point(at: &str) {
    if std::env::var("SNAPSHIM_MERGE_CRASH").is_ok_and(|v| v == at) {
        // SAFETY: kill(2) on ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Writes the full image of the chain's newest instant to `tmp` and syncs it. Returns its size.
fn write_merged(chain: &Chain, tmp: &Path) -> Result<u64> {
    let io = |what: &str| {
        let p = tmp.to_path_buf();
        let what = what.to_string();
        move |e: std::io::Error| Failure::op(format!("cannot {what} {}: {e}", p.display()))
    };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io("create"))?;
    let head = chain.head();
    let mut off = PAGE_SIZE;
    let mut runs = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for s in chain.sources() {
        let src = &chain.images[s.image];
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0;
        while done < s.len() {
            let n = (s.len() - done).min(CHUNK) as usize;
            src.file
                .read_exact_at(&mut buf[..n], s.file_off + done)
                .map_err(|e| {
                    Failure::op(format!(
                        "cannot read page data of {}: {e}",
                        src.path.display()
                    ))
                })?;
            crc.update(&buf[..n]);
            out.write_all_at(&buf[..n], off + done)
                .map_err(io("write"))?;
            done += n as u64;
        }
        runs.push(PageRun {
            addr: s.addr,
            pages: s.pages,
            file_off: off,
            crc: crc.finalize(),
        });
        off += s.len();
    }
    let mut meta = head.meta.clone();
    meta.runs = runs;
    meta.parent = None;
    meta.inherited.clear();
    meta.merged_from = Some(MergedFrom {
        meta_crc: head.header.meta_crc,
        files: chain.ancestor_names(),
    });
    let tail =
        snapshim_image::write::tail(&meta, head.header.image_id, head.header.created_ns, off);
    out.write_all_at(&tail.meta, tail.meta_off)
        .map_err(io("write"))?;
    out.write_all_at(&tail.header, 0).map_err(io("write"))?;
    out.flush().map_err(io("write"))?;
    out.sync_all().map_err(io("fsync"))?;
    Ok(tail.file_len())
}

/// Deletes the older images of the merged chain that no remaining image names as its parent
/// (newest first, so a crash midway leaves every remaining delta's parent in place).
fn remove_old_chain(dir: &Path, old: &[PathBuf]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for p in old {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let needed = snapshim_image::list_images(dir)
            .unwrap_or_default()
            .iter()
            .filter(|i| *i != p)
            .filter_map(|i| snapshim_image::Image::open(i).ok())
            .any(|i| i.meta.parent.is_some_and(|r| r.file == name));
        if !needed && std::fs::remove_file(p).is_ok() {
            let _ = std::fs::remove_file(p.with_extension("json"));
            removed.push(p.clone());
        }
    }
    removed
}
