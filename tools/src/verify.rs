//! `snapshim verify IMAGE`: every check the restorer makes of an image before it changes
//! anything, without restoring.

use std::collections::BTreeSet;
use std::path::Path;

use snapshim_image::{Metadata, RegionKind};

use crate::failure::{Failure, Result};
use crate::parse::human_bytes;

/// Checks everything the restorer checks about the image itself before it changes anything:
/// header (magic, architecture, version, checksum, layout), metadata (checksum, decoding,
/// consistency), every page run's checksum; then that the mapped files are unchanged. Prints
/// what was checked; the first damage found is the error, in the restorer's words.
pub fn verify(arg: &Path, json: bool) -> Result<()> {
    let path = snapshim_image::resolve(arg).map_err(|e| Failure::op(e.to_string()))?;
    // A delta is checked with every image it depends on; damage in one of them is named.
    let chain = snapshim_image::Chain::open(&path)
        .map_err(|e| Failure::op(format!("{}: {e}", path.display())))?;
    let img = chain.head();
    let damaged =
        |e: snapshim_image::ImageError| Failure::op(format!("{}: {e}", img.path.display()));
    img.meta.validate().map_err(damaged)?;
    let checked = if json {
        chain.verify_pages()
    } else {
        chain.verify_pages_showing("snapshim: checking page data")
    }
    .map_err(damaged)?;
    let (problems, same_build) = check_mapped_files(&img.meta);
    if !problems.is_empty() {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {p}", img.path.display()))
            .collect();
        return Err(Failure::op(lines.join("\n")));
    }
    let (h, m) = (&img.header, &img.meta);
    let mapped: BTreeSet<&str> = m
        .regions
        .iter()
        .filter_map(|r| match &r.kind {
            RegionKind::File { path, .. } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    if json {
        return crate::json::print_ok(serde_json::json!({
            "image": img.path,
            "format": format!("{}.{}", h.major, h.minor),
            "metadata_bytes": h.meta_len,
            "regions": m.regions.len(),
            "page_runs": m.runs.len(),
            "threads": m.threads.len(),
            "descriptors": m.fds.len(),
            "page_bytes_checked": checked,
            "mapped_files": mapped,
            "same_build_id": same_build,
            "chain": chain.paths(),
            "lineage": crate::inspect::lineage_document(m),
        }));
    }
    println!("ok: {}", img.path.display());
    println!("  header     format {}.{}, checksum ok", h.major, h.minor);
    println!(
        "  metadata   {}, checksum ok, consistent: {}, {}, {}, {}",
        human_bytes(h.meta_len),
        count(m.regions.len(), "region"),
        count(m.runs.len(), "page run"),
        count(m.threads.len(), "thread"),
        count(m.fds.len(), "descriptor")
    );
    println!(
        "  page data  {} in {}, every checksum ok",
        human_bytes(checked),
        count(m.runs.len(), "run")
    );
    println!(
        "  files      {} present and unchanged{}",
        count(mapped.len(), "mapped file"),
        if same_build.is_empty() {
            String::new()
        } else {
            format!(
                " ({} with another modification time but the same build-id and size: {})",
                same_build.len(),
                same_build.join(", ")
            )
        }
    );
    if chain.images.len() > 1 {
        let names = chain.ancestor_names();
        println!(
            "  chain      a delta; with {} ({}), every checksum ok",
            names.join(" <- "),
            human_bytes(chain.stored_bytes())
        );
    }
    Ok(())
}

/// "1 run", "2 runs".
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Each file mapped by a File region must still be the file the program mapped, by the rule
/// the restorer applies (`snapshim_image::identity`: size and modification time, or the same
/// build-id and size). Returns the problems, in the restorer's words, and the files accepted by
/// their build-id although their modification time changed.
fn check_mapped_files(m: &Metadata) -> (Vec<String>, Vec<String>) {
    use snapshim_image::identity::{check_mapped_file, Verdict};
    let mut seen = BTreeSet::new();
    let (mut problems, mut same_build) = (Vec::new(), Vec::new());
    for r in &m.regions {
        let RegionKind::File { path, identity, .. } = &r.kind else {
            continue;
        };
        if !seen.insert(path.as_str()) {
            continue;
        }
        match check_mapped_file(path, identity, m.build_id_of(path)) {
            Verdict::Unchanged => {}
            Verdict::SameBuild(_) => same_build.push(path.clone()),
            Verdict::Changed { message, .. } | Verdict::Missing(message) => problems.push(message),
        }
    }
    (problems, same_build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::tests::region;
    use snapshim_image::FileIdentity;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn mapped_files_are_checked_by_size_and_mtime_or_build_id() {
        let exe = std::env::current_exe().unwrap();
        let st = std::fs::metadata(&exe).unwrap();
        let identity = FileIdentity {
            size: st.len(),
            mtime_ns: st.mtime() * 1_000_000_000 + st.mtime_nsec(),
            inode: 0,
        };
        let exe = exe.to_str().unwrap();
        let build_id = snapshim_image::elf::build_id_of_file(std::path::Path::new(exe))
            .unwrap()
            .unwrap();
        let meta = |identity: FileIdentity, path: &str, id: Option<&[u8]>| Metadata {
            regions: vec![region(
                0x1000,
                0x2000,
                RegionKind::File {
                    path: path.into(),
                    offset: 0,
                    identity,
                },
                path,
            )],
            build_ids: id
                .map(|id| snapshim_image::BuildId {
                    path: path.into(),
                    id: id.to_vec(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            check_mapped_files(&meta(identity.clone(), exe, None)),
            (vec![], vec![])
        );
        let bigger = FileIdentity {
            size: identity.size + 1,
            ..identity.clone()
        };
        let (p, _) = check_mapped_files(&meta(bigger, exe, None));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("has changed") && p[0].contains("size"),
            "{p:?}"
        );
        let older = FileIdentity {
            mtime_ns: identity.mtime_ns - 1,
            ..identity.clone()
        };
        let (p, _) = check_mapped_files(&meta(older.clone(), exe, None));
        assert!(p[0].contains("modification time"), "{p:?}");
        // The same build-id and size: accepted, and listed.
        let (p, same) = check_mapped_files(&meta(older.clone(), exe, Some(&build_id)));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(same, vec![exe.to_string()]);
        let (p, _) = check_mapped_files(&meta(older, exe, Some(&[1, 2, 3])));
        assert!(p[0].contains("build-id 010203 is now"), "{p:?}");
        let (p, _) = check_mapped_files(&meta(identity, "/no/such/lib.so", None));
        assert!(p[0].contains("/no/such/lib.so is not available"), "{p:?}");
    }
}
