//! Memory, capture side: the memory map (`/proc/self/maps`, the truth about memory), which of
//! its regions an image describes and which pages it stores — the ONE description, used by
//! every engine and by the flush — page presence from `/proc/self/pagemap`, the mapped files'
//! identities and build-ids, the vDSO, and the memory a restored process still maps from its
//! image. Runs in the writer (scratch allocation, raw system calls) unless said otherwise.
#![allow(unsafe_code)]

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use snapshim_image::layout::{RESERVED_END, RESERVED_START};
use snapshim_image::{BuildId, FileIdentity, Region, RegionKind, VdsoImage, VdsoSymbol};

use crate::state;
use crate::sys::{self, sc};

/// One line of /proc/self/maps.
#[derive(Debug, Clone)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub offset: u64,
    /// Device of the mapped file, as `makedev(major, minor)`.
    pub dev: u64,
    pub inode: u64,
    pub name: String,
    /// Every page holds data that nothing outside the image can give back (see
    /// [`mark_unmappable_files`]): store each page that is not zero, present or not.
    pub whole: bool,
    /// The mapped file's GNU build-id (empty: none, or not examined): see
    /// [`mark_unmappable_files`].
    pub build_id: Vec<u8>,
}

pub fn parse_maps(text: &str) -> Vec<MapsEntry> {
    snapshim_image::maps::lines(text)
        .map(|l| MapsEntry {
            start: l.start,
            end: l.end,
            prot: l.prot,
            shared: l.shared,
            offset: l.offset,
            dev: l.dev,
            inode: l.inode,
            name: l.name.to_string(),
            whole: false,
            build_id: Vec::new(),
        })
        .collect()
}

/// Whether a mapping is the shim's own (the reserved range, the uffd engine's copy store) or
/// the kernel's vsyscall page.
pub fn is_excluded(e: &MapsEntry) -> bool {
    (e.start < RESERVED_END && e.end > RESERVED_START)
        || is_own_mapping(e.start, e.end)
        || e.name == "[vsyscall]"
        || e.end > 0x7fff_ffff_f000
}

/// Private file mappings whose file cannot stand for their content in an image, turned into
/// anonymous memory whose every page is stored ([`MapsEntry::whole`]; `inode` set to 0 so the
/// writer takes them as anonymous):
///
/// - mappings of a snapshim image: a restored process has its memory mapped copy-on-write from
///   the image it came from (the restorer maps page runs instead of reading them). Pages it has
///   not written are still the image file's, and pagemap shows them as "the file's own page"
///   or not present at all, which for an ordinary file means "not worth storing". But that
///   image is rotated away by retention, or stays on another machine: the new image must not
///   refer to it, and must hold every page.
/// - mappings of a file that is deleted, replaced (another inode at its path now) or no longer
///   openable: the restorer could not map it again either.
///
/// An image is recognised by its header magic, read once per distinct file, rather than by its
/// name: an image can be restored from any path (a copy on a second machine, a renamed file),
/// and the magic is the one thing every image has.
///
/// The same read gives each mapped file's GNU build-id ([`MapsEntry::build_id`]), which lets a
/// restore accept a copy of the file whose modification time differs. It costs nothing more
/// than the magic did: one read of the file's first page instead of its first 8 bytes (the
/// build-id note of a linked file is in that page), during the pause. Not cached: a cache would
/// have to outlive the writer's scratch memory, and the open and read were being paid anyway.
pub fn mark_unmappable_files(maps: &[MapsEntry]) -> Vec<MapsEntry> {
    let mut verdicts: Vec<((u64, u64), bool, Vec<u8>)> = Vec::new();
    let mut out = maps.to_vec();
    for e in out.iter_mut() {
        if e.shared || e.inode == 0 || !e.name.starts_with('/') {
            continue;
        }
        let key = (e.dev, e.inode);
        let i = match verdicts.iter().position(|v| v.0 == key) {
            Some(i) => i,
            None => {
                let v = match examine_if_same(e) {
                    Some(f) if !e.name.ends_with(" (deleted)") && !f.is_image => {
                        (key, false, f.build_id.unwrap_or_default())
                    }
                    _ => (key, true, Vec::new()),
                };
                verdicts.push(v);
                verdicts.len() - 1
            }
        };
        if verdicts[i].1 {
            e.inode = 0;
            e.whole = true;
        } else {
            e.build_id = verdicts[i].2.clone();
        }
    }
    out
}

/// What the start of a mapped file says about it.
struct FileHead {
    is_image: bool,
    build_id: Option<Vec<u8>>,
}

/// [`examine_file`] of the file at `e`'s path, if it is the mapped one (same device and inode).
fn examine_if_same(e: &MapsEntry) -> Option<FileHead> {
    let st = stat_path(&e.name)?;
    if st.st_ino != e.inode || st.st_dev != e.dev {
        return None;
    }
    examine_file(&e.name)
}

/// Reads the first page of the file at `path`: whether it is a snapshim image, and its
/// build-id (reading further only if the note lies past the first page).
fn examine_file(path: &str) -> Option<FileHead> {
    let mut c = path.as_bytes().to_vec();
    c.push(0);
    let fd = sys::open(&c, libc::O_RDONLY | libc::O_CLOEXEC, 0).ok()?;
    let mut head = [0u8; 4096];
    let n = sys::pread(fd, &mut head, 0).unwrap_or(0);
    let head = &head[..n];
    let is_image = head.starts_with(&snapshim_image::MAGIC);
    let build_id = if is_image {
        None
    } else {
        snapshim_image::elf::build_id_of_head(head, &mut |off, buf| {
            sys::pread(fd, buf, off) == Ok(buf.len())
        })
    };
    sys::close(fd);
    Some(FileHead { is_image, build_id })
}

/// The build-ids of the mapped files that have one, one entry per path.
pub fn build_ids(maps: &[MapsEntry]) -> Vec<BuildId> {
    let mut out: Vec<BuildId> = Vec::new();
    for e in maps
        .iter()
        .filter(|e| !e.build_id.is_empty() && !is_excluded(e))
    {
        if !out.iter().any(|b| b.path == e.name) {
            out.push(BuildId {
                path: e.name.clone(),
                id: e.build_id.clone(),
            });
        }
    }
    out
}

/// The `[vdso]` mapping's bytes and exported functions (empty if there is none, or it cannot
/// be parsed: the restorer then needs this kernel's vDSO to have the image's layout).
pub fn vdso(maps: &[MapsEntry]) -> VdsoImage {
    let Some(e) = maps.iter().find(|e| e.name == "[vdso]") else {
        return VdsoImage::default();
    };
    if e.prot & libc::PROT_READ as u32 == 0 || e.end - e.start > 1 << 20 {
        return VdsoImage::default();
    }
    // SAFETY: the kernel's vDSO is mapped readable for its whole length (checked just above,
    // from the map read during this pause) and never unmapped by the program while it is
    // parked.
    let bytes =
        unsafe { core::slice::from_raw_parts(e.start as *const u8, (e.end - e.start) as usize) };
    let symbols = snapshim_image::elf::vdso_exports(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(|x| VdsoSymbol {
            name: x.name,
            offset: x.offset,
            size: x.size,
        })
        .collect();
    VdsoImage {
        symbols,
        bytes: bytes.to_vec(),
    }
}

/// The file at `path` starts with a snapshim image's magic.
pub fn is_image_file(path: &str) -> bool {
    let mut c = path.as_bytes().to_vec();
    c.push(0);
    let Ok(fd) = sys::open(&c, libc::O_RDONLY | libc::O_CLOEXEC, 0) else {
        return false;
    };
    let mut magic = [0u8; 8];
    let n = sys::pread(fd, &mut magic, 0);
    sys::close(fd);
    n == Ok(magic.len()) && magic == snapshim_image::MAGIC
}

/// The memory map, read now.
pub fn read_maps() -> sys::Result<Vec<MapsEntry>> {
    let mut text = Vec::new();
    sys::read_file(b"/proc/self/maps\0", &mut text)?;
    Ok(parse_maps(&String::from_utf8_lossy(&text)))
}

/// [`pagemap`] for a mapping; for a [`MapsEntry::whole`] one every page counts as present.
pub fn pagemap_of(fd: i32, e: &MapsEntry, out: &mut Vec<u64>) -> sys::Result<()> {
    pagemap(fd, e.start, e.end, out)?;
    if e.whole {
        for f in out.iter_mut() {
            *f |= PM_PRESENT;
        }
    }
    Ok(())
}

/// Page flags from /proc/self/pagemap.
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

/// Reads pagemap entries for `[start, end)` into `out`.
pub fn pagemap(fd: i32, start: u64, end: u64, out: &mut Vec<u64>) -> sys::Result<()> {
    let n = ((end - start) / 4096) as usize;
    out.clear();
    out.resize(n, 0);
    // SAFETY: viewing the u64 buffer as bytes for reading into it.
    let bytes = unsafe { core::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * 8) };
    let mut done = 0;
    while done < bytes.len() {
        match sys::pread(fd, &mut bytes[done..], (start / 4096) * 8 + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `[start, end)` overlaps the copy store (not the program's memory).
pub fn is_own_mapping(start: u64, end: u64) -> bool {
    let s = state::COPY_STORE.load(Acquire);
    s != 0 && start < s + state::COPY_STORE_PAGES.load(Relaxed) * 4096 && end > s
}

pub fn identity_of(st: &libc::stat) -> FileIdentity {
    FileIdentity {
        size: st.st_size as u64,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        inode: st.st_ino,
    }
}

pub fn stat_path(path: &str) -> Option<libc::stat> {
    let mut c = path.as_bytes().to_vec();
    c.push(0);
    // SAFETY: zeroed stat is valid; c is NUL-terminated.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    sys::check(unsafe { sc!(libc::SYS_stat, c.as_ptr(), &mut st as *mut libc::stat) }).ok()?;
    Some(st)
}

/// What a region of the map is, and whether its pages go into the image.
pub fn classify(e: &MapsEntry) -> (RegionKind, bool) {
    let kind = match e.name.as_str() {
        "[vdso]" => RegionKind::Vdso,
        "[vvar]" => RegionKind::Vvar,
        "[vvar_vclock]" => RegionKind::VvarVclock,
        n if maps_file(e) => {
            let identity = stat_path(n).map(|st| identity_of(&st)).unwrap_or_default();
            RegionKind::File {
                path: n.into(),
                offset: e.offset,
                identity,
            }
        }
        _ => RegionKind::Anon,
    };
    (kind, stores(e))
}

/// Whether `e` maps a file that can be found again by its path.
fn maps_file(e: &MapsEntry) -> bool {
    e.inode != 0 && e.name.starts_with('/') && !e.name.ends_with(" (deleted)")
}

/// Whether an image stores pages of `e`: anonymous memory and private file mappings, not the
/// kernel's vDSO and vvar pages.
fn stores(e: &MapsEntry) -> bool {
    match e.name.as_str() {
        "[vdso]" | "[vvar]" | "[vvar_vclock]" => false,
        _ => !maps_file(e) || !e.shared,
    }
}

pub fn region(e: &MapsEntry, kind: RegionKind) -> Region {
    Region {
        start: e.start,
        end: e.end,
        prot: e.prot,
        shared: e.shared,
        kind,
        name: e.name.clone(),
    }
}

/// The image's regions and, for each stored one, its index in the map and whether it is backed
/// by a file (where pages equal to the file's are not stored).
pub struct Layout {
    pub regions: Vec<Region>,
    pub wanted: Vec<Wanted>,
}

pub fn layout(maps: &[MapsEntry]) -> Layout {
    let mut regions = Vec::new();
    let mut wanted = Vec::new();
    for (i, e) in maps.iter().enumerate() {
        if is_excluded(e) {
            continue;
        }
        let (kind, store) = classify(e);
        if store {
            wanted.push(Wanted {
                entry: i,
                file_backed: matches!(kind, RegionKind::File { .. }),
            });
        }
        regions.push(region(e, kind));
    }
    Layout { regions, wanted }
}

/// The regions of `maps` whose pages an image would store (as [`layout`] finds them).
pub fn wanted(maps: &[MapsEntry]) -> Vec<Wanted> {
    maps.iter()
        .enumerate()
        .filter(|(_, e)| !is_excluded(e))
        .filter(|(_, e)| stores(e))
        .map(|(i, e)| Wanted {
            entry: i,
            file_backed: maps_file(e),
        })
        .collect()
}

/// What a region of the captured map needs: stored, and if so whether it can be registered.
pub struct Wanted {
    pub entry: usize,
    pub file_backed: bool,
}

/// Address ranges a restored process had mapped from its image when it resumed (at most these;
/// they only shrink as the program replaces that memory), `[start, end)` pairs, 0 = unused.
static IMAGE_RANGES: [[AtomicUsize; 2]; 64] =
    [const { [AtomicUsize::new(0), AtomicUsize::new(0)] }; 64];
/// The image files those ranges map, as (device, inode): an image may be deleted meanwhile.
/// (A restore from a chain of delta images maps pages from each image of the chain: room for
/// chains of up to 16.)
static IMAGE_FILES: [[AtomicU64; 2]; 16] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; 16];

fn is_noted_image(dev: u64, inode: u64) -> bool {
    IMAGE_FILES
        .iter()
        .any(|f| f[1].load(Relaxed) == inode && inode != 0 && f[0].load(Relaxed) == dev)
}

/// In a restored process: notes the memory mapped from its image. That memory was anonymous in
/// the original process, where discarding a page gave zeros; a private file mapping gives the
/// file's page back instead (see [`anonymize_image_pages`]). Restored threads wait in their
/// quiesce handler until this is done (`pipeline::park::NOTED`).
pub fn note_image_mappings() {
    let Ok(maps) = read_maps() else {
        return;
    };
    let mut images: Vec<((u64, u64), bool)> = Vec::new();
    let mut n = 0;
    for e in maps.iter().filter(|e| !e.shared && e.inode != 0) {
        let key = (e.dev, e.inode);
        let image = match images.iter().find(|v| v.0 == key) {
            Some(v) => v.1,
            None => {
                let v = is_image_file(e.name.trim_end_matches(" (deleted)"));
                images.push((key, v));
                v
            }
        };
        if image && !is_noted_image(e.dev, e.inode) {
            if let Some(f) = IMAGE_FILES.iter().find(|f| f[1].load(Relaxed) == 0) {
                f[0].store(e.dev, Relaxed);
                f[1].store(e.inode, Relaxed);
            }
        }
        if image && n < IMAGE_RANGES.len() {
            IMAGE_RANGES[n][0].store(e.start as usize, Relaxed);
            IMAGE_RANGES[n][1].store(e.end as usize, Relaxed);
            n += 1;
        } else if image {
            // More ranges than slots: one slot covers the rest (a hint; the map decides).
            IMAGE_RANGES[n - 1][1].store(e.end as usize, Relaxed);
        }
    }
    for r in &IMAGE_RANGES[n..] {
        r[0].store(0, Relaxed);
        r[1].store(0, Relaxed);
    }
    if n == 0 {
        for f in &IMAGE_FILES {
            f[1].store(0, Relaxed);
        }
    }
}

/// Before pages of `[addr, addr + len)` are discarded: parts still mapped from the image a
/// process was restored from become fresh anonymous memory with the same protection, so they
/// read as zeros afterwards, as they did before the checkpoint.
pub fn anonymize_image_pages(addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    let hit = IMAGE_RANGES.iter().any(|r| {
        let (s, e) = (r[0].load(Relaxed) as u64, r[1].load(Relaxed) as u64);
        s < e && s < end && e > addr
    });
    if !hit {
        return;
    }
    let Ok(maps) = read_maps() else {
        return;
    };
    for e in maps
        .iter()
        .filter(|e| !e.shared && e.start < end && e.end > addr && is_noted_image(e.dev, e.inode))
    {
        let (s, t) = (e.start.max(addr & !4095), e.end.min((end + 4095) & !4095));
        // SAFETY: replaces part of a private mapping of the image with anonymous memory at the
        // same place; the program asked for this memory to be discarded.
        unsafe {
            sc!(
                libc::SYS_mmap,
                s,
                t - s,
                e.prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1i64,
                0
            )
        };
    }
}

/// This process's resident and shared (file-backed or shmem) pages, from /proc/self/statm.
pub fn statm() -> Option<(u64, u64)> {
    let mut buf = Vec::new();
    sys::read_file(b"/proc/self/statm\0", &mut buf).ok()?;
    let t = String::from_utf8_lossy(&buf);
    let mut f = t.split_whitespace().skip(1).map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64, perms: &str, inode: u64, name: &str) -> MapsEntry {
        let line = alloc::format!("{start:x}-{end:x} {perms} 00002000 08:01 {inode} {name}");
        let v = parse_maps(&line);
        assert_eq!(v.len(), 1, "{line}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn maps_lines_become_entries() {
        let v = parse_maps(
            "400000-401000 r-xp 00000000 08:01 1234   /bin/prog\n\
             garbage\n\
             7f00-8f00 rw-s 00001000 00:05 9 /dev/zero (deleted)\n",
        );
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].start, v[0].end, v[0].inode),
            (0x400000, 0x401000, 1234)
        );
        assert_eq!(v[0].prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert_eq!(v[0].dev, libc::makedev(8, 1));
        assert_eq!(v[0].name, "/bin/prog");
        assert!(!v[0].whole && v[0].build_id.is_empty());
        assert!(v[1].shared);
        assert_eq!(v[1].offset, 0x1000);
        assert_eq!(v[1].name, "/dev/zero (deleted)");
    }

    #[test]
    fn regions_are_classified_once_for_every_user() {
        let anon = entry(0x10000, 0x20000, "rw-p", 0, "");
        let heap = entry(0x20000, 0x30000, "rw-p", 0, "[heap]");
        let lib = entry(0x30000, 0x31000, "r--p", 7, "/nonexistent/lib.so");
        let shared_file = entry(0x31000, 0x32000, "rw-s", 8, "/nonexistent/shm");
        let deleted = entry(0x32000, 0x33000, "rw-s", 9, "/gone (deleted)");
        let vdso = entry(0x40000, 0x42000, "r-xp", 0, "[vdso]");
        let vvar = entry(0x42000, 0x44000, "r--p", 0, "[vvar]");
        let reserved = entry(RESERVED_START, RESERVED_START + 0x1000, "---p", 0, "");
        let vsyscall = entry(
            0xffffffffff600000,
            0xffffffffff601000,
            "--xp",
            0,
            "[vsyscall]",
        );

        assert_eq!(classify(&anon), (RegionKind::Anon, true));
        assert_eq!(classify(&heap), (RegionKind::Anon, true));
        let (kind, store) = classify(&lib);
        assert!(store, "private file mappings store their changed pages");
        assert!(
            matches!(&kind, RegionKind::File { path, offset, .. } if path == "/nonexistent/lib.so" && *offset == 0x2000)
        );
        let (kind, store) = classify(&shared_file);
        assert!(!store, "a shared file mapping is the file");
        assert!(matches!(kind, RegionKind::File { .. }));
        assert_eq!(classify(&deleted), (RegionKind::Anon, true));
        assert_eq!(classify(&vdso), (RegionKind::Vdso, false));
        assert_eq!(classify(&vvar), (RegionKind::Vvar, false));
        assert!(is_excluded(&reserved) && is_excluded(&vsyscall));
        assert!(!is_excluded(&anon) && !is_excluded(&vdso));

        let maps = [anon, reserved, lib, shared_file, vdso, heap];
        let l = layout(&maps);
        let starts: Vec<u64> = l.regions.iter().map(|r| r.start).collect();
        assert_eq!(starts, [0x10000, 0x30000, 0x31000, 0x40000, 0x20000]);
        let stored: Vec<(usize, bool)> =
            l.wanted.iter().map(|w| (w.entry, w.file_backed)).collect();
        assert_eq!(stored, [(0, false), (2, true), (5, false)]);
        let w: Vec<(usize, bool)> = wanted(&maps)
            .iter()
            .map(|w| (w.entry, w.file_backed))
            .collect();
        assert_eq!(w, stored, "wanted and layout agree");
    }
}
