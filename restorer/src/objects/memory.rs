//! Memory: the mapped files must be the ones the program mapped; each region is rebuilt by
//! phase 2 at its address with its kind, and each stored page run either mapped from the image
//! or read into it, as decided here ([`MapPolicy`], [`plan_runs`]).

use std::os::fd::{IntoRawFd, RawFd};

use snapshim_image::{Image, Metadata, RegionKind, SourcedRun};

use crate::plan::{PRegion, PRun, RUN_MAP, RUN_READ};

const PAGE: u64 = snapshim_image::PAGE_SIZE;

/// Every file the program mapped must be the one it mapped (`snapshim_image::identity`), or
/// named by the user in `allowed` (`--allow-changed-file`), which is then used with a warning.
/// Files accepted by their build-id are listed in one note.
pub fn check_mapped_files(meta: &Metadata, allowed: &[String]) -> Result<(), String> {
    use snapshim_image::identity::{check_mapped_file, Verdict};
    // Named as the image names them: absolute, symbolic links resolved.
    let allowed: Vec<String> = allowed
        .iter()
        .map(|a| {
            std::fs::canonicalize(a)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| a.clone())
        })
        .collect();
    let mapped: Vec<(&str, &snapshim_image::FileIdentity)> = meta
        .regions
        .iter()
        .filter_map(|r| match &r.kind {
            RegionKind::File { path, identity, .. } => Some((path.as_str(), identity)),
            _ => None,
        })
        .collect();
    if let Some(a) = allowed
        .iter()
        .find(|a| !mapped.iter().any(|m| m.0 == a.as_str()))
    {
        return Err(format!(
            "--allow-changed-file {a}: the image maps no such file"
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut same_build = Vec::new();
    for (path, identity) in mapped {
        if !seen.insert(path) {
            continue;
        }
        let path = &path.to_string();
        match check_mapped_file(path, identity, meta.build_id_of(path)) {
            Verdict::Unchanged => {}
            Verdict::SameBuild(_) => same_build.push(path.clone()),
            Verdict::Missing(msg) => return Err(msg),
            Verdict::Changed { message, .. } if allowed.contains(path) => eprintln!(
                "snapshim-restore: WARNING: {message}; using it anyway, as \
                 --allow-changed-file asks: if its content is not the same, the program will \
                 crash or compute wrong results"
            ),
            Verdict::Changed {
                message,
                could_be_same_content: true,
            } => {
                return Err(format!(
                    "{message}; if its content is the same, --allow-changed-file {path} accepts it"
                ))
            }
            Verdict::Changed { message, .. } => return Err(message),
        }
    }
    if !same_build.is_empty() {
        eprintln!(
            "snapshim-restore: note: accepted by their build-id and size, with another \
             modification time: {}",
            same_build.join(", ")
        );
    }
    Ok(())
}

/// Whether, and how far, page runs may be mapped from the image instead of read.
///
/// A mapped run is a `MAP_PRIVATE` view of the image file: until the program writes a page, the
/// page is the file's, read through the page cache, possibly long after the restore. That is
/// sound only while the file's content at those offsets never changes under the mapping:
///
/// - snapshim never rewrites an image in place: images are written under a temporary name and
///   renamed, and retention unlinks old ones. Unlinking is harmless on a local file system: the
///   inode and its pages live on while mapped. Truncating or rewriting the file in place is not
///   (a clean page past a truncation raises SIGBUS; a rewritten one silently changes), so an
///   image must never be overwritten in place (`cp` onto it) while a program restored from it
///   runs; replace it with a rename instead.
/// - On network and user-space file systems (NFS, CIFS, FUSE, 9p, Ceph...) another machine can
///   delete or replace the file and the mapping then fails (NFS: ESTALE, seen as SIGBUS). Images
///   there are read (copied) instead: only the local file systems listed in
///   [`MAP_SAFE_FILE_SYSTEMS`] are mapped from.
/// - A file system mounted `noexec` refuses executable file mappings: runs in executable
///   regions are read there.
pub struct MapPolicy {
    /// Why nothing is mapped, or None.
    pub copy_reason: Option<String>,
    pub noexec: bool,
    /// At most this many runs are mapped (each may split a mapping in three).
    pub max_mapped: usize,
}

/// statfs magic numbers of local file systems on which an unlinked file stays readable through
/// its mappings and nobody else can change it behind the kernel's back.
const MAP_SAFE_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0xef53, "ext2/3/4"),
    (0x5846_5342, "xfs"),
    (0x9123_683e, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x8584_58f6, "ramfs"),
    (0xf2f5_2010, "f2fs"),
    (0xca45_1a4e, "bcachefs"),
    (0x2fc1_2fc1, "zfs"),
    (0x794c_7630, "overlayfs"),
];

/// Runs shorter than this are read: below it a read costs about what a mapping does, and every
/// mapping is one more kernel VMA in the program for ever.
const MAP_MIN_BYTES: u64 = 64 << 10;

impl MapPolicy {
    /// The policy for `image`; `copy`: `--copy`, read everything.
    pub fn for_image(image: &Image, copy: bool) -> Result<MapPolicy, String> {
        let st = nix::sys::statfs::fstatfs(&image.file).map_err(|e| {
            format!(
                "{}: cannot find its file system: {}",
                image.path.display(),
                std::io::Error::from(e)
            )
        })?;
        let fs_type = st.filesystem_type().0 as i64;
        // statvfs for the mount flags, which statfs does not report.
        let noexec = nix::sys::statvfs::fstatvfs(&image.file)
            .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        let copy_reason = if copy {
            Some("--copy".to_string())
        } else if !MAP_SAFE_FILE_SYSTEMS.iter().any(|&(t, _)| t == fs_type) {
            Some(format!(
                "the image is on a file system (type {fs_type:#x}) where it could change under a mapping"
            ))
        } else {
            None
        };
        let max_map_count = procfs::sys::vm::max_map_count().map_or(65530, |n| n as usize);
        // Leave the program at least half of its mapping budget: regions + 2 per mapped run.
        let max_mapped = (max_map_count / 2).saturating_sub(image.meta.regions.len()) / 2;
        Ok(MapPolicy {
            copy_reason,
            noexec,
            max_mapped,
        })
    }

    pub fn describe(&self) -> String {
        match &self.copy_reason {
            Some(why) => format!("pages are read into memory ({why})"),
            None => "page runs are mapped from the image where the layout allows".into(),
        }
    }
}

/// Decides, run by run, whether phase 2 maps it from the image or reads it.
///
/// A run is mapped only inside a private region that is not the grows-down stack (a file
/// mapping at the bottom of `[stack]` would stop it from growing), and never over the last page
/// of its region. That last page stays anonymous so that the program's `mremap` of a whole
/// region cannot grow a view of the image: that would show the image's next bytes instead of
/// zeros, or raise SIGBUS past its end. Across two kernel mappings `mremap` fails with EFAULT,
/// and glibc's `realloc` then copies, as it does whenever a mapping cannot grow. Shared
/// anonymous memory is always read: a private file page cannot stand in for it.
///
/// ```text
///   region  |<------------------------------------------------>|
///   run           |<------------------------------------------->|
///   plan          | mapped (>= MAP_MIN_BYTES)        | read (1 page)
/// ```
///
/// `runs` come from the image chain (`Chain::sources`); each planned run's `fd` is the index
/// of its image in the chain until the caller puts the descriptors in.
pub fn plan_runs(meta: &Metadata, runs: &[SourcedRun], policy: &MapPolicy) -> Vec<PRun> {
    let mut out: Vec<PRun> = Vec::with_capacity(runs.len() + 1);
    for run in runs {
        // check_layout proved every run lies inside one region; regions are sorted.
        let i = meta.regions.partition_point(|r| r.end <= run.addr);
        let r = &meta.regions[i];
        let read = |addr: u64, len: u64, file_off: u64| PRun {
            addr,
            len,
            file_off,
            prot: r.prot,
            how: RUN_READ,
            fd: run.image as i64,
        };
        let exec = r.prot & libc::PROT_EXEC as u32 != 0;
        let mappable = policy.copy_reason.is_none()
            && !r.shared
            && r.name != "[stack]"
            && matches!(r.kind, RegionKind::Anon | RegionKind::File { .. })
            && !(exec && policy.noexec);
        let end = run.addr + run.len();
        let map_len = if end == r.end {
            run.len().saturating_sub(PAGE)
        } else {
            run.len()
        };
        if !mappable || map_len < MAP_MIN_BYTES {
            out.push(read(run.addr, run.len(), run.file_off));
            continue;
        }
        out.push(PRun {
            how: RUN_MAP,
            ..read(run.addr, map_len, run.file_off)
        });
        if map_len < run.len() {
            out.push(read(
                run.addr + map_len,
                run.len() - map_len,
                run.file_off + map_len,
            ));
        }
    }
    // Over budget: the largest runs stay mapped, the rest are read.
    let mapped = out.iter().filter(|r| r.how == RUN_MAP).count();
    if mapped > policy.max_mapped {
        let mut lens: Vec<u64> = out
            .iter()
            .filter(|r| r.how == RUN_MAP)
            .map(|r| r.len)
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let cut = lens.get(policy.max_mapped).copied().unwrap_or(u64::MAX);
        let mut left = policy.max_mapped;
        for r in out.iter_mut().filter(|r| r.how == RUN_MAP) {
            if r.len >= cut && left > 0 {
                left -= 1;
            } else {
                r.how = RUN_READ;
            }
        }
    }
    out
}

/// Opens the file behind each file mapping (-1 for the others), in region order.
pub fn open_region_files(meta: &Metadata) -> Result<Vec<RawFd>, String> {
    meta.regions
        .iter()
        .map(|r| match &r.kind {
            RegionKind::File { path, .. } => {
                let write = r.shared && r.prot & libc::PROT_WRITE as u32 != 0;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)
                    .map(|f| f.into_raw_fd())
                    .map_err(|e| format!("cannot open {path}, mapped by the program: {e}"))
            }
            _ => Ok(-1),
        })
        .collect()
}

/// The plan's regions: every region but the kernel's own (vvar, vDSO: moved, not mapped),
/// with the descriptor of its file (`region_fds`, in region order) and whether page runs are
/// written into it.
pub fn plan_regions(meta: &Metadata, runs: &[PRun], region_fds: &[RawFd]) -> Vec<PRegion> {
    meta.regions
        .iter()
        .zip(region_fds)
        .filter_map(|(r, &fd)| {
            let base = if r.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let flags = match &r.kind {
                RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => return None,
                RegionKind::File { .. } => base,
                RegionKind::Anon if r.name == "[stack]" => {
                    base | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN
                }
                RegionKind::Anon => base | libc::MAP_ANONYMOUS,
            };
            let offset = if let RegionKind::File { offset, .. } = r.kind {
                offset
            } else {
                0
            };
            let fill = runs
                .iter()
                .any(|run| run.addr >= r.start && run.addr < r.end) as u32;
            Some(PRegion {
                start: r.start,
                end: r.end,
                offset,
                prot: r.prot,
                flags: flags as u32,
                fd,
                fill,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshim_image::Region;

    fn region(start: u64, end: u64, name: &str, shared: bool) -> Region {
        Region {
            start,
            end,
            prot: 3,
            shared,
            kind: RegionKind::Anon,
            name: name.into(),
        }
    }

    fn run(image: usize, addr: u64, pages: u64) -> SourcedRun {
        SourcedRun {
            image,
            addr,
            pages,
            file_off: 0x1000 + addr,
            run: 0,
        }
    }

    fn meta(regions: Vec<Region>) -> Metadata {
        Metadata {
            regions,
            ..Default::default()
        }
    }

    fn policy(max_mapped: usize) -> MapPolicy {
        MapPolicy {
            copy_reason: None,
            noexec: false,
            max_mapped,
        }
    }

    #[test]
    fn the_last_page_of_a_region_is_read_and_small_runs_are_read() {
        let m = meta(vec![region(0x100000, 0x200000, "", false)]);
        let p = plan_runs(
            &m,
            &[run(0, 0x100000, 4), run(1, 0x110000, 0xf0)],
            &policy(100),
        );
        let got: Vec<(u64, u64, u32, i64)> =
            p.iter().map(|r| (r.addr, r.len, r.how, r.fd)).collect();
        assert_eq!(
            got,
            [
                (0x100000, 0x4000, RUN_READ, 0),
                (0x110000, 0xef000, RUN_MAP, 1),
                (0x1ff000, 0x1000, RUN_READ, 1),
            ]
        );
        assert_eq!(p[2].file_off, 0x1000 + 0x1ff000);
    }

    #[test]
    fn shared_memory_the_stack_and_copy_are_read() {
        let m = meta(vec![
            region(0x100000, 0x200000, "", true),
            region(0x300000, 0x400000, "[stack]", false),
        ]);
        let runs = [run(0, 0x100000, 0x80), run(0, 0x300000, 0x80)];
        assert!(plan_runs(&m, &runs, &policy(100))
            .iter()
            .all(|r| r.how == RUN_READ));
        let m = meta(vec![region(0x100000, 0x200000, "", false)]);
        let copy = MapPolicy {
            copy_reason: Some("--copy".into()),
            ..policy(100)
        };
        assert!(plan_runs(&m, &[run(0, 0x100000, 0x80)], &copy)
            .iter()
            .all(|r| r.how == RUN_READ));
    }

    #[test]
    fn over_budget_at_most_the_budget_is_mapped_the_largest_run_included() {
        let m = meta(vec![region(0x100000, 0x1000000, "", false)]);
        let runs = [
            run(0, 0x100000, 0x20),
            run(0, 0x200000, 0x40),
            run(0, 0x300000, 0x30),
        ];
        let p = plan_runs(&m, &runs, &policy(2));
        let mapped: Vec<u64> = p
            .iter()
            .filter(|r| r.how == RUN_MAP)
            .map(|r| r.addr)
            .collect();
        assert_eq!(mapped.len(), 2);
        assert!(mapped.contains(&0x200000));
    }
}
