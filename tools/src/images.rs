//! `snapshim inspect`, `verify` and `ls`: read images through `snapshim-image` only.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use snapshim_image::{
    CharDevice, Directory, FdKind, FdState, Header, Image, Inherited, Metadata, Pipe, Region,
    RegionKind, RegularFile, SigAction, Unsupported, IMAGE_SUFFIX, LATEST, PAGE_SIZE,
};

use crate::parse::{format_ms, format_time, human_bytes, signal_name};
use crate::{Failure, Result};

/// Resolves and opens an image, with errors in the tool's one-line form.
fn open(arg: &Path) -> Result<Image> {
    let path = snapshim_image::resolve(arg).map_err(|e| Failure::op(e.to_string()))?;
    Image::open(&path).map_err(|e| Failure::op(format!("{}: {e}", path.display())))
}

pub fn inspect(arg: &Path) -> Result<()> {
    let img = open(arg)?;
    print!("{}", describe(&img));
    Ok(())
}

/// The whole `inspect` report.
fn describe(img: &Image) -> String {
    let (h, m, p) = (&img.header, &img.meta, &img.meta.process);
    let mut o = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(o, "{k:<10} {v}");
    };
    field("image", img.path.display().to_string());
    field(
        "format",
        format!(
            "{}.{}, {} on disk",
            h.major,
            h.minor,
            human_bytes(img.file_len)
        ),
    );
    let parent = match (&m.parent, h.parent_id) {
        (Some(r), _) => format!(
            "{:016x} ({}, metadata checksum {:08x}): a delta image, {} pages inherited",
            r.image_id,
            r.file,
            r.meta_crc,
            m.inherited.iter().map(|s| s.pages).sum::<u64>()
        ),
        (None, 0) => "none (full image)".to_string(),
        (None, id) => format!("{id:016x}"),
    };
    field("id", format!("{:016x}, parent {parent}", h.image_id));
    if let Some(mf) = &m.merged_from {
        field(
            "merged",
            format!(
                "from a chain (replaced {}); the delta it replaced had metadata checksum {:08x}",
                if mf.files.is_empty() {
                    "nothing older".to_string()
                } else {
                    mf.files.join(", ")
                },
                mf.meta_crc
            ),
        );
    }
    field("created", local_time(h.created_ns));
    field("program", format!("{}, PID {}", p.name, p.pid));
    field("exe", p.exe.clone());
    field("cmdline", shell_words(&p.cmdline));
    field("cwd", p.cwd.clone());
    field(
        "memory",
        format!(
            "{} stored, {} resident at the checkpoint",
            human_bytes(img.stored_bytes()),
            human_bytes(p.resident_bytes)
        ),
    );
    field(
        "pause",
        match p.pause_ns {
            0 => "not recorded".to_string(),
            ns => format_ms(ns / 1000),
        },
    );
    field("shim", m.shim.path.clone());

    let stored = stored_per_region(m);
    let _ = writeln!(o, "\nregions ({}):", m.regions.len());
    let _ = writeln!(
        o,
        "  {:<25}  {:>10} {:<4} {:<7} {:<16} {:>10}  NAME",
        "ADDRESS", "SIZE", "PROT", "MAP", "KIND", "STORED"
    );
    for (r, bytes) in m.regions.iter().zip(&stored) {
        let _ = writeln!(
            o,
            "  {:012x}-{:012x}  {:>10} {:<4} {:<7} {:<16} {:>10}  {}",
            r.start,
            r.end,
            human_bytes(r.end - r.start),
            prot_string(r.prot),
            if r.shared { "shared" } else { "private" },
            kind_string(&r.kind),
            human_bytes(*bytes),
            r.name
        );
    }

    if !m.build_ids.is_empty() {
        let _ = writeln!(o, "\nbuild-ids of mapped files ({}):", m.build_ids.len());
        for b in &m.build_ids {
            let _ = writeln!(o, "  {}  {}", snapshim_image::elf::hex(&b.id), b.path);
        }
    }
    if !m.vdso.bytes.is_empty() {
        let names: Vec<&str> = m
            .vdso
            .symbols
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| n.starts_with("__vdso_"))
            .collect();
        let _ = writeln!(
            o,
            "\nvdso: {} recorded, {} functions: {}",
            human_bytes(m.vdso.bytes.len() as u64),
            m.vdso.symbols.len(),
            names.join(" ")
        );
    }

    let _ = writeln!(o, "\nthreads ({}):", m.threads.len());
    let _ = writeln!(o, "  {:>8}  {:<16} ROLE", "TID", "NAME");
    for t in &m.threads {
        let role = if t.helper { "snapshim helper" } else { "app" };
        let _ = writeln!(o, "  {:>8}  {:<16} {role}", t.tid, t.name);
    }

    let _ = writeln!(o, "\nfile descriptors ({}):", m.fds.len());
    let _ = writeln!(o, "  {:>4}  {:<24} WHAT", "FD", "FLAGS");
    for f in &m.fds {
        let _ = writeln!(o, "  {:>4}  {:<24} {}", f.fd, fd_flags(f), fd_kind(&f.kind));
    }

    let handlers: Vec<&SigAction> = p.sigactions.iter().filter(|s| s.handler != 0).collect();
    let _ = writeln!(o, "\nsignal handlers ({} not default):", handlers.len());
    for s in handlers {
        let what = match s.handler {
            1 => "ignored".to_string(),
            addr => match region_of(&m.regions, addr) {
                Some(r) if !r.name.is_empty() => format!("handler {addr:#x} in {}", r.name),
                _ => format!("handler {addr:#x}"),
            },
        };
        let flags = sa_flags(s.flags);
        let _ = writeln!(
            o,
            "  {:<12} {what}{}",
            signal_name(s.signo as i32),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{flags}]")
            }
        );
    }
    o
}

/// Bytes of page data stored for each region (runs never cross regions: `Image::open` checks).
fn stored_per_region(m: &Metadata) -> Vec<u64> {
    let mut stored = vec![0u64; m.regions.len()];
    for run in &m.runs {
        let i = m.regions.partition_point(|r| r.end <= run.addr);
        if let Some(slot) = stored.get_mut(i) {
            *slot += run.len();
        }
    }
    stored
}

/// The region containing `addr` (regions are sorted and disjoint).
fn region_of(regions: &[Region], addr: u64) -> Option<&Region> {
    let i = regions.partition_point(|r| r.end <= addr);
    regions.get(i).filter(|r| r.start <= addr)
}

fn prot_string(prot: u32) -> String {
    let bit = |b: i32, c: char| if prot & b as u32 != 0 { c } else { '-' };
    [
        bit(libc::PROT_READ, 'r'),
        bit(libc::PROT_WRITE, 'w'),
        bit(libc::PROT_EXEC, 'x'),
    ]
    .iter()
    .collect()
}

fn kind_string(k: &RegionKind) -> String {
    match k {
        RegionKind::Anon => "anon".into(),
        RegionKind::File { offset, .. } => format!("file @{offset:#x}"),
        RegionKind::Vdso => "vdso".into(),
        RegionKind::Vvar => "vvar".into(),
        RegionKind::VvarVclock => "vvar_vclock".into(),
    }
}

fn fd_flags(f: &FdState) -> String {
    let flags = f.flags as i32;
    let mut v = vec![match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "rdonly",
        libc::O_WRONLY => "wronly",
        _ => "rdwr",
    }];
    for (bit, name) in [
        (libc::O_APPEND, "append"),
        (libc::O_NONBLOCK, "nonblock"),
        (libc::O_DIRECT, "direct"),
        (libc::O_SYNC, "sync"),
    ] {
        if flags & bit == bit {
            v.push(name);
        }
    }
    if f.cloexec {
        v.push("cloexec");
    }
    v.join(",")
}

fn fd_kind(k: &FdKind) -> String {
    match k {
        FdKind::Regular(RegularFile {
            path, offset, size, ..
        }) => format!("file {path} (offset {offset}, size {size})"),
        FdKind::Directory(Directory { path }) => format!("directory {path}"),
        FdKind::CharDevice(CharDevice { path }) => format!("device {path}"),
        FdKind::Pipe(Pipe { id, read_end, data }) => format!(
            "pipe {id}, {} end, {} buffered",
            if *read_end { "read" } else { "write" },
            human_bytes(data.len() as u64)
        ),
        FdKind::Inherited(Inherited { desc }) => {
            format!("{desc}, outside the program (restore passes on its own descriptor)")
        }
        FdKind::Unsupported(Unsupported { desc }) => {
            format!("NOT RESTORED (reopened as /dev/null): {desc}")
        }
    }
}

fn sa_flags(flags: u64) -> String {
    let flags = flags as i32;
    [
        (libc::SA_SIGINFO, "SIGINFO"),
        (libc::SA_RESTART, "RESTART"),
        (libc::SA_ONSTACK, "ONSTACK"),
        (libc::SA_NODEFER, "NODEFER"),
        (libc::SA_RESETHAND, "RESETHAND"),
        (libc::SA_NOCLDSTOP, "NOCLDSTOP"),
        (libc::SA_NOCLDWAIT, "NOCLDWAIT"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit == *bit)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(",")
}

/// A command line as a shell would need it typed: words with odd characters single-quoted.
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Local time of `ns` since the epoch, with its UTC offset.
fn local_time(ns: u64) -> String {
    let offset = utc_offset(ns);
    let sign = if offset < 0 { '-' } else { '+' };
    format!(
        "{} {sign}{:02}{:02}",
        format_time(ns, offset),
        offset.abs() / 3600,
        offset.abs() / 60 % 60
    )
}

/// The local time zone's offset from UTC at `ns`, in seconds (0 if unknown).
fn utc_offset(ns: u64) -> i64 {
    let t = (ns / 1_000_000_000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone name pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

/// Checks everything the restorer checks about the image itself before it changes anything:
/// header (magic, architecture, version, checksum, layout), metadata (checksum, decoding,
/// consistency), every page run's checksum; then that the mapped files are unchanged. Prints
/// what was checked; the first damage found is the error, in the restorer's words.
pub fn verify(arg: &Path) -> Result<()> {
    let path = snapshim_image::resolve(arg).map_err(|e| Failure::op(e.to_string()))?;
    // A delta is checked with every image it depends on; damage in one of them is named.
    let chain = snapshim_image::Chain::open(&path)
        .map_err(|e| Failure::op(format!("{}: {e}", path.display())))?;
    let img = chain.head();
    let damaged =
        |e: snapshim_image::ImageError| Failure::op(format!("{}: {e}", img.path.display()));
    img.meta.validate().map_err(damaged)?;
    let never = std::sync::atomic::AtomicBool::new(false);
    let checked = chain
        .verify_pages_cancellable(&never)
        .map_err(|e| Failure::op(format!("{}: {e}", img.path.display())))?;
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
        let names: Vec<String> = chain.images[1..]
            .iter()
            .map(|i| {
                i.path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
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

pub fn ls(dir: Option<PathBuf>) -> Result<()> {
    let dir = dir.unwrap_or_else(crate::launch::default_dir);
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

/// Reads and checks only the header page of an image.
fn read_header(path: &Path) -> std::result::Result<Header, String> {
    let mut page = Vec::with_capacity(PAGE_SIZE as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(PAGE_SIZE).read_to_end(&mut page))
        .map_err(|e| e.to_string())?;
    Header::decode(&page).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshim_image::{FileIdentity, PageRun};
    use std::os::unix::fs::MetadataExt;

    fn region(start: u64, end: u64, kind: RegionKind, name: &str) -> Region {
        Region {
            start,
            end,
            prot: 3,
            shared: false,
            kind,
            name: name.into(),
        }
    }

    #[test]
    fn stored_bytes_are_counted_per_region() {
        let m = Metadata {
            process: Default::default(),
            shim: Default::default(),
            threads: vec![],
            regions: vec![
                region(0x1000, 0x3000, RegionKind::Anon, ""),
                region(0x5000, 0x9000, RegionKind::Anon, "[heap]"),
            ],
            runs: vec![
                PageRun {
                    addr: 0x5000,
                    pages: 2,
                    file_off: 4096,
                    crc: 0,
                },
                PageRun {
                    addr: 0x8000,
                    pages: 1,
                    file_off: 3 * 4096,
                    crc: 0,
                },
            ],
            fds: vec![],
            clock_boottime_ns: 0,
            build_ids: vec![],
            vdso: Default::default(),
            parent: None,
            inherited: Vec::new(),
            merged_from: None,
        };
        assert_eq!(stored_per_region(&m), vec![0, 3 * PAGE_SIZE]);
        assert_eq!(region_of(&m.regions, 0x5abc).map(|r| r.start), Some(0x5000));
        assert!(region_of(&m.regions, 0x4000).is_none());
        assert!(region_of(&m.regions, 0x9000).is_none());
    }

    #[test]
    fn small_formatters() {
        assert_eq!(prot_string(5), "r-x");
        assert_eq!(prot_string(0), "---");
        assert_eq!(
            shell_words(&["prog".into(), "a b".into(), "it's".into(), "".into()]),
            r"prog 'a b' 'it'\''s' ''"
        );
        assert_eq!(
            sa_flags((libc::SA_SIGINFO | libc::SA_RESTART | 0x0400_0000/* SA_RESTORER */) as u64),
            "SIGINFO,RESTART"
        );
        let f = FdState {
            fd: 1,
            flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
            cloexec: true,
            kind: FdKind::CharDevice(CharDevice {
                path: "/dev/null".into(),
            }),
        };
        assert_eq!(fd_flags(&f), "wronly,append,cloexec");
    }

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
            process: Default::default(),
            shim: Default::default(),
            threads: vec![],
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
            runs: vec![],
            fds: vec![],
            clock_boottime_ns: 0,
            build_ids: id
                .map(|id| snapshim_image::BuildId {
                    path: path.into(),
                    id: id.to_vec(),
                })
                .into_iter()
                .collect(),
            vdso: Default::default(),
            parent: None,
            inherited: Vec::new(),
            merged_from: None,
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
