//! Reading the process's state while every other thread is parked: memory map, page presence,
//! file descriptors, and the per-process kernel state. Runs in the writer, so it allocates only
//! from the scratch region and reads /proc with raw system calls.
#![allow(unsafe_code)]

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use snapshim_image::layout::{RESERVED_END, RESERVED_START};
use snapshim_image::{
    BuildId, CharDevice, Directory, FdKind, FdState, FileIdentity, Inherited, IntervalTimer,
    MmFields, Pipe, Process, RegularFile, Rlimit, SigAction, Unsupported, VdsoImage, VdsoSymbol,
};

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
    let mut v = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let name = it.next().unwrap_or("").trim_start().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let p = perms.as_bytes();
        let mut prot = 0;
        if p.first() == Some(&b'r') {
            prot |= libc::PROT_READ as u32;
        }
        if p.get(1) == Some(&b'w') {
            prot |= libc::PROT_WRITE as u32;
        }
        if p.get(2) == Some(&b'x') {
            prot |= libc::PROT_EXEC as u32;
        }
        v.push(MapsEntry {
            start,
            end,
            prot,
            shared: p.get(3) == Some(&b's'),
            offset: u64::from_str_radix(off, 16).unwrap_or(0),
            dev: dev
                .split_once(':')
                .and_then(|(ma, mi)| {
                    let (ma, mi) = (
                        u32::from_str_radix(ma, 16).ok()?,
                        u32::from_str_radix(mi, 16).ok()?,
                    );
                    Some(libc::makedev(ma, mi))
                })
                .unwrap_or(0),
            inode: inode.parse().unwrap_or(0),
            name,
            whole: false,
            build_id: Vec::new(),
        });
    }
    v
}

/// Whether a mapping is the shim's own (the reserved range, the uffd engine's copy store) or
/// the kernel's vsyscall page.
pub fn is_excluded(e: &MapsEntry) -> bool {
    (e.start < RESERVED_END && e.end > RESERVED_START)
        || crate::uffd::is_own_mapping(e.start, e.end)
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

fn fstat(fd: i32) -> Option<libc::stat> {
    // SAFETY: zeroed stat is valid.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    sys::check(unsafe { sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat) }).ok()?;
    Some(st)
}

fn cpath(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
    }
    v.push(0);
    v
}

/// The file descriptor table.
pub fn fds() -> Vec<FdState> {
    let mut out = Vec::new();
    let Ok(list) = sys::list_numeric_dir(b"/proc/self/fd\0") else {
        return out;
    };
    let mut info = Vec::new();
    let mut pipes: Vec<(u64, i32, bool)> = Vec::new(); // (inode, fd, read end)
    for fd in list {
        if crate::uffd::is_own_fd(fd) {
            continue;
        }
        let mut nb = [0u8; 20];
        let num = sys::itoa(fd as u64, &mut nb);
        let target = sys::readlink(&cpath(&["/proc/self/fd/", num])).unwrap_or_default();
        let (mut pos, mut flags) = (0u64, 0u32);
        if sys::read_file(&cpath(&["/proc/self/fdinfo/", num]), &mut info).is_ok() {
            for line in String::from_utf8_lossy(&info).lines() {
                if let Some(v) = line.strip_prefix("pos:") {
                    pos = v.trim().parse().unwrap_or(0);
                } else if let Some(v) = line.strip_prefix("flags:") {
                    flags = u32::from_str_radix(v.trim(), 8).unwrap_or(0);
                }
            }
        }
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        let flags = flags & !(libc::O_CLOEXEC as u32);
        let Some(st) = fstat(fd) else { continue };
        let fmt = st.st_mode & libc::S_IFMT;
        let deleted = target.ends_with(" (deleted)");
        let kind = if fmt == libc::S_IFREG && !deleted {
            FdKind::Regular(RegularFile {
                path: target,
                offset: pos,
                size: st.st_size as u64,
                identity: identity_of(&st),
            })
        } else if fmt == libc::S_IFDIR && !deleted {
            FdKind::Directory(Directory { path: target })
        } else if fmt == libc::S_IFCHR {
            if target.starts_with("/dev/pts/")
                || target.starts_with("/dev/tty")
                || target == "/dev/console"
            {
                FdKind::Inherited(Inherited { desc: target })
            } else {
                FdKind::CharDevice(CharDevice { path: target })
            }
        } else if fmt == libc::S_IFIFO && target.starts_with("pipe:") {
            let read_end = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
            pipes.push((st.st_ino, fd, read_end));
            FdKind::Pipe(Pipe {
                id: st.st_ino,
                read_end,
                data: Vec::new(),
            })
        } else if fd <= 2 {
            FdKind::Inherited(Inherited { desc: target })
        } else {
            FdKind::Unsupported(Unsupported { desc: target })
        };
        out.push(FdState {
            fd,
            flags,
            cloexec,
            kind,
        });
    }
    // A pipe is ours only if both ends are here; else it goes to something outside.
    for st in out.iter_mut() {
        if let FdKind::Pipe(Pipe { id, read_end, .. }) = st.kind {
            let other = pipes.iter().find(|p| p.0 == id && p.2 != read_end);
            match other {
                None => {
                    st.kind = FdKind::Inherited(Inherited {
                        desc: alloc::format!("pipe:[{id}]"),
                    })
                }
                Some(&(_, wfd, _)) if read_end => {
                    let data = drain_and_refill(st.fd, wfd);
                    st.kind = FdKind::Pipe(Pipe { id, read_end, data });
                }
                Some(_) => {}
            }
        }
    }
    out
}

/// Takes the bytes buffered in a pipe (both ends are ours, every other thread is parked) and
/// puts them straight back, keeping a copy for the image.
fn drain_and_refill(rfd: i32, wfd: i32) -> Vec<u8> {
    let mut avail: i32 = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { sc!(libc::SYS_ioctl, rfd, libc::FIONREAD, &mut avail as *mut i32) };
    if avail <= 0 {
        return Vec::new();
    }
    let mut data = alloc::vec![0u8; avail as usize];
    let mut got = 0;
    while got < data.len() {
        match sys::read(rfd, &mut data[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    data.truncate(got);
    let _ = sys::write_all(wfd, &data);
    data
}

/// Per-process kernel state.
pub fn process(cfg: &crate::config::Config) -> Process {
    let mut p = Process {
        pid: sys::getpid(),
        name: cfg.name.clone(),
        exe: cfg.exe.clone(),
        cmdline: cfg.cmdline.clone(),
        cwd: sys::readlink(b"/proc/self/cwd\0").unwrap_or_default(),
        ..Default::default()
    };
    // SAFETY: umask has no memory effects; set back at once (every other thread is parked).
    unsafe {
        let old = sc!(libc::SYS_umask, 0o22);
        sc!(libc::SYS_umask, old);
        p.umask = old as u32;
        p.personality = sc!(libc::SYS_personality, 0xffff_ffffu32) as u32;
    }
    for res in 0..16u32 {
        let mut lim = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a null new limit writes the old one.
        if sys::check(unsafe {
            sc!(
                libc::SYS_prlimit64,
                0,
                res,
                0,
                &mut lim as *mut libc::rlimit64
            )
        })
        .is_ok()
        {
            p.rlimits.push(Rlimit {
                resource: res,
                soft: lim.rlim_cur,
                hard: lim.rlim_max,
            });
        }
    }
    let mut buf = Vec::new();
    if sys::read_file(b"/proc/self/stat\0", &mut buf).is_ok() {
        let text = String::from_utf8_lossy(&buf);
        if let Some(i) = text.rfind(')') {
            let f: Vec<u64> = text[i + 1..]
                .split_whitespace()
                .map(|t| t.parse().unwrap_or(0))
                .collect();
            let g = |field: usize| f.get(field - 3).copied().unwrap_or(0);
            p.mm = MmFields {
                start_code: g(26),
                end_code: g(27),
                start_stack: g(28),
                start_data: g(45),
                end_data: g(46),
                start_brk: g(47),
                arg_start: g(48),
                arg_end: g(49),
                env_start: g(50),
                env_end: g(51),
                // SAFETY: brk(0) only reports the current break.
                brk: unsafe { sc!(libc::SYS_brk, 0) } as u64,
            };
        }
    }
    if sys::read_file(b"/proc/self/auxv\0", &mut buf).is_ok() {
        p.auxv = buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
    }
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let mut k = [0u64; 4]; // handler, flags, restorer, mask
                               // SAFETY: rt_sigaction with a null new action writes the 32-byte kernel sigaction.
        if sys::check(unsafe { sc!(libc::SYS_rt_sigaction, sig, 0, k.as_mut_ptr(), 8) }).is_ok() {
            p.sigactions.push(SigAction {
                signo: sig,
                handler: k[0],
                flags: k[1],
                restorer: k[2],
                mask: k[3],
            });
        }
    }
    for which in 0..3 {
        let mut v = [0i64; 4];
        // SAFETY: getitimer writes a struct itimerval (4 longs).
        unsafe { sc!(libc::SYS_getitimer, which, v.as_mut_ptr()) };
        p.itimers.push(IntervalTimer {
            interval_us: (v[0] * 1_000_000 + v[1]) as u64,
            value_us: (v[2] * 1_000_000 + v[3]) as u64,
        });
    }
    p.xsave_features = snapshim_image::xsave_features();
    p.clock_monotonic_ns = sys::monotonic_ns();
    p.clock_realtime_ns = sys::clock_ns(libc::CLOCK_REALTIME);
    p.resident_bytes = statm().map_or(0, |(resident, _)| resident * 4096);
    p
}

/// This process's resident and shared (file-backed or shmem) pages, from /proc/self/statm.
pub fn statm() -> Option<(u64, u64)> {
    let mut buf = Vec::new();
    sys::read_file(b"/proc/self/statm\0", &mut buf).ok()?;
    let t = String::from_utf8_lossy(&buf);
    let mut f = t.split_whitespace().skip(1).map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}
