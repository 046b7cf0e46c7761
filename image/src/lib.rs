//! The snapshim image format: one definition, shared by the shim (writer), the restorer and the
//! tools. It depends on none of them.
//!
//! ```text
//!  offset 0            4096                                   meta_off          meta_off+meta_len
//!  +-------------------+--------------------------------------+-----------------+
//!  | header (one page) | page data: runs of whole pages,      | metadata        |
//!  | fixed layout,     | each run page-aligned in the file,   | postcard(Meta), |
//!  | own CRC32         | one CRC32 per run (in the metadata)  | own CRC32       |
//!  +-------------------+--------------------------------------+-----------------+
//! ```
//!
//! The header is readable alone: magic and architecture are checked first, then the version,
//! then the header checksum, and only then is anything else decoded, so a foreign or newer image
//! is reported with what it is instead of as garbage. Page data is page-aligned so the restorer
//! can read it with large aligned reads (and, later, map it straight from the file).
//!
//! Version rules: a reader accepts any image with the same major version and a minor version not
//! newer than its own; new metadata fields are only ever appended (postcard is positional).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod elf;
mod error;
pub mod identity;
pub mod lineage;
pub mod maps;
pub mod objects;
pub mod progress;
pub mod settings;
pub mod standby;
pub mod write;
pub use error::ImageError;
pub use lineage::Lineage;
pub use objects::{
    CharDevice, Credentials, DeletedFile, Directory, Duplicate, Epoll, EpollWatch, Eventfd, FdKind,
    FdState, FileIdentity, Inherited, Inotify, InotifyWatch, IntervalTimer, Memfd, MmFields,
    PageRun, PageSpan, Pipe, Process, Region, RegionKind, RegularFile, Rlimit, SigAction, Signalfd,
    SockOpt, Socket, SocketRole, TcpRepair, ThreadState, Timerfd, Unsupported,
};

/// Addresses shared by the shim and the restorer.
///
/// The shim keeps `RESERVED` mapped `PROT_NONE` in every program it is loaded into, so the
/// program never puts anything there and no image ever contains it. The restorer's phase 2
/// (after the old address space is gone) runs entirely inside it:
///
/// ```text
/// 0x6e00_0000  restorer blob: text, data, bss (linked here)   | shim: (nothing)
/// 0x7000_0000                                                 | shim: writer scratch heap
/// 0x7400_0000  restorer plan arena                            |
/// 0x7c00_0000  restorer phase-2 stack                         | shim: writer stack
/// 0x7d00_0000  vDSO parking space while it is being moved     |
/// 0x7e00_0000  end
/// ```
pub mod layout {
    pub const RESERVED_START: u64 = 0x6e00_0000;
    pub const RESERVED_END: u64 = 0x7e00_0000;
    pub const BLOB_BASE: u64 = 0x6e00_0000;
    pub const SCRATCH_START: u64 = 0x7000_0000;
    pub const SCRATCH_END: u64 = 0x7c00_0000;
    pub const ARENA_START: u64 = 0x7400_0000;
    pub const ARENA_END: u64 = 0x7c00_0000;
    pub const STACK_START: u64 = 0x7c00_0000;
    pub const STACK_END: u64 = 0x7d00_0000;
    pub const VDSO_PARK: u64 = 0x7d00_0000;
    /// End of the user address space (4-level page tables; the top page is never mappable).
    pub const USER_END: u64 = 0x7fff_ffff_f000;
}

/// Size of a page, of the header, and the alignment of page data in the file.
pub const PAGE_SIZE: u64 = 4096;
/// First eight bytes of every image.
pub const MAGIC: [u8; 8] = *b"SNAPSHIM";
/// The architecture this build reads and writes, as stored in the header (NUL-padded).
pub const ARCH: [u8; 8] = *b"x86_64\0\0";
pub const VERSION_MAJOR: u16 = 1;
/// 1.1 added [`Metadata::clock_boottime_ns`]; 1.2 added [`Metadata::build_ids`] and
/// [`Metadata::vdso`]; 1.3 added incremental (delta) images: [`Metadata::parent`],
/// [`Metadata::inherited`], [`Metadata::merged_from`] and [`FLAG_DELTA`]. Older images still
/// load (the new fields read as empty; they are full images). 1.4 added the descriptor kinds
/// [`FdKind::Eventfd`], [`FdKind::Timerfd`], [`FdKind::Signalfd`], [`FdKind::Epoll`],
/// [`FdKind::Duplicate`], [`FdKind::Inotify`], [`FdKind::Socket`] and [`FdKind::DeletedFile`]
/// (variants appended: 1.3 metadata decodes unchanged), and after the metadata a record of
/// [`Metadata::lineage`] and [`Metadata::credentials`] (each thread's; empty in older images:
/// the restored program keeps the restorer's credentials, as before).
pub const VERSION_MINOR: u16 = 4;
/// Header flag: a delta image, which stores only the pages written since its parent
/// ([`Metadata::parent`]); restoring it needs the chain of images down to a full one.
pub const FLAG_DELTA: u32 = 1;
/// File name suffix of committed images.
pub const IMAGE_SUFFIX: &str = ".snap";
/// Name of the symlink that points at the newest committed image in an image directory.
pub const LATEST: &str = "latest";

/// The fixed header at offset 0. Encoded by hand (little endian) so its layout never depends on
/// a serializer: see [`Header::encode`] for the byte offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub flags: u32,
    /// Random identity of this image; a delta image names its parent by it. A full image made
    /// by merging a chain keeps the identity of the chain's newest image.
    pub image_id: u64,
    /// A delta image's parent's `image_id` (also in [`Metadata::parent`]); 0 for a full image.
    pub parent_id: u64,
    /// Wall-clock time of the snapshot, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub data_off: u64,
    pub data_len: u64,
    pub meta_off: u64,
    pub meta_len: u64,
    pub meta_crc: u32,
}

// Byte offsets inside the header page.
const H_MAGIC: usize = 0;
const H_ARCH: usize = 8;
const H_MAJOR: usize = 16;
const H_MINOR: usize = 18;
const H_FLAGS: usize = 20;
const H_ID: usize = 24;
const H_PARENT: usize = 32;
const H_CREATED: usize = 40;
const H_DATA_OFF: usize = 48;
const H_DATA_LEN: usize = 56;
const H_META_OFF: usize = 64;
const H_META_LEN: usize = 72;
const H_META_CRC: usize = 80;
/// CRC32 of bytes `0..H_CRC`.
const H_CRC: usize = 84;
const H_END: usize = 88;

impl Header {
    pub fn new(image_id: u64, created_ns: u64) -> Header {
        Header {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            flags: 0,
            image_id,
            parent_id: 0,
            created_ns,
            data_off: PAGE_SIZE,
            data_len: 0,
            meta_off: 0,
            meta_len: 0,
            meta_crc: 0,
        }
    }

    /// The header page as stored in the file.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_SIZE as usize];
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        b[H_ARCH..H_ARCH + 8].copy_from_slice(&ARCH);
        b[H_MAJOR..H_MAJOR + 2].copy_from_slice(&self.major.to_le_bytes());
        b[H_MINOR..H_MINOR + 2].copy_from_slice(&self.minor.to_le_bytes());
        b[H_FLAGS..H_FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        for (off, v) in [
            (H_ID, self.image_id),
            (H_PARENT, self.parent_id),
            (H_CREATED, self.created_ns),
            (H_DATA_OFF, self.data_off),
            (H_DATA_LEN, self.data_len),
            (H_META_OFF, self.meta_off),
            (H_META_LEN, self.meta_len),
        ] {
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[H_META_CRC..H_META_CRC + 4].copy_from_slice(&self.meta_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..H_CRC]);
        b[H_CRC..H_END].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header page: magic, architecture, version, then checksum, in that
    /// order, so that each kind of foreign file gets its own precise error. `b` is the start of
    /// the file, at most one page; fewer than [`PAGE_SIZE`] bytes are enough to read the fields
    /// (a reader of the whole image also requires the whole page: see [`Image::open`]).
    pub fn decode(b: &[u8]) -> Result<Header, ImageError> {
        // A file too short for the magic is still "not an image" unless it is a prefix of one.
        let m = b.len().min(MAGIC.len());
        if b[..m] != MAGIC[..m] {
            return Err(ImageError::BadMagic);
        }
        let Some(b) = b.get(..H_END) else {
            return Err(ImageError::Truncated {
                what: "header",
                offset: 0,
                len: PAGE_SIZE,
                have: b.len() as u64,
            });
        };
        if b[H_ARCH..H_ARCH + 8] != ARCH {
            return Err(ImageError::ForeignArch {
                arch: printable(&b[H_ARCH..H_ARCH + 8]),
            });
        }
        let field = |o: usize, n: usize| {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&b[o..o + n]);
            u64::from_le_bytes(v)
        };
        let (u16_at, u32_at, u64_at) = (
            |o| field(o, 2) as u16,
            |o| field(o, 4) as u32,
            |o| field(o, 8),
        );
        let (major, minor) = (u16_at(H_MAJOR), u16_at(H_MINOR));
        if major != VERSION_MAJOR || minor > VERSION_MINOR {
            return Err(ImageError::UnsupportedVersion { major, minor });
        }
        if crc32fast::hash(&b[..H_CRC]) != u32_at(H_CRC) {
            return Err(ImageError::HeaderChecksum);
        }
        Ok(Header {
            major,
            minor,
            flags: u32_at(H_FLAGS),
            image_id: u64_at(H_ID),
            parent_id: u64_at(H_PARENT),
            created_ns: u64_at(H_CREATED),
            data_off: u64_at(H_DATA_OFF),
            data_len: u64_at(H_DATA_LEN),
            meta_off: u64_at(H_META_OFF),
            meta_len: u64_at(H_META_LEN),
            meta_crc: u32_at(H_META_CRC),
        })
    }

    /// Checks that the sections the header describes can be a file: page data page-aligned
    /// after the header page, metadata after the page data, no sum overflowing, metadata of a
    /// size a reader may hold in memory. Says nothing about the file's actual length.
    pub fn check_layout(&self) -> Result<(), ImageError> {
        let bad = |why: String| Err(ImageError::BadLayout(why));
        let (d, dl, m, ml) = (self.data_off, self.data_len, self.meta_off, self.meta_len);
        if d < PAGE_SIZE || d % PAGE_SIZE != 0 {
            return bad(format!(
                "page data starts at offset {d}, not on a page boundary after the header"
            ));
        }
        if dl % PAGE_SIZE != 0 {
            return bad(format!(
                "page data is {dl} bytes, not a whole number of pages"
            ));
        }
        match d.checked_add(dl) {
            Some(data_end) if data_end <= m => {}
            _ => {
                return bad(format!(
                    "page data ({dl} bytes at offset {d}) runs into the metadata at offset {m}"
                ))
            }
        }
        if m.checked_add(ml).is_none() {
            return bad(format!(
                "metadata ({ml} bytes at offset {m}) ends past the largest possible file"
            ));
        }
        if ml == 0 {
            return bad("metadata is empty".into());
        }
        if ml > MAX_METADATA {
            return bad(format!(
                "metadata is {ml} bytes, more than the {MAX_METADATA} a reader accepts"
            ));
        }
        Ok(())
    }
}

/// The largest metadata a reader loads into memory (a process with every possible mapping and
/// full pipes needs a few MiB).
pub const MAX_METADATA: u64 = 1 << 30;

/// `b` as text for a message: printable ASCII as is, trailing NULs dropped, other bytes escaped.
fn printable(b: &[u8]) -> String {
    let end = b.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    b[..end].escape_ascii().to_string()
}

/// Everything about the process except page contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Metadata {
    pub process: Process,
    pub shim: ShimInfo,
    pub threads: Vec<ThreadState>,
    pub regions: Vec<Region>,
    pub runs: Vec<PageRun>,
    pub fds: Vec<FdState>,
    /// CLOCK_BOOTTIME at the checkpoint, read with [`Process::clock_monotonic_ns`] (format 1.1;
    /// 0 in older images). The restorer's time namespace continues both clocks from there.
    pub clock_boottime_ns: u64,

    // --- Format 1.2: what another machine must match or stand in for. Empty in older images.
    /// GNU build-ids of the mapped files that have one (binaries, libraries), by path: a file
    /// with the same build-id and size is accepted even if its modification time changed
    /// (see [`identity`]).
    pub build_ids: Vec<BuildId>,
    /// The vDSO the program was using: if this kernel's differs, the restorer puts a proxy
    /// that jumps into the new one at its address.
    pub vdso: VdsoImage,
    // --- End of format 1.2.
    // ---- format 1.3: incremental images (empty/None in older images) ----------------------
    /// A delta image's parent (the header has [`FLAG_DELTA`]); `None` for a full image.
    pub parent: Option<ParentRef>,
    /// A delta image's pages that were not written since the parent's snapshot, sorted and
    /// disjoint: their content is the parent's at the same address (recursively, down the
    /// chain). A page of a delta image is either in a page run (its data is here), or
    /// inherited, or neither: zero (anonymous memory) or the file's (private file mapping),
    /// exactly as in a full image.
    pub inherited: Vec<PageSpan>,
    /// Set in a full image made by merging a chain (`snapshim merge`), which keeps the
    /// `image_id` of the chain's newest image and replaces it.
    pub merged_from: Option<MergedFrom>,
    // ---- end of format 1.3 ------------------------------------------------------------------
    // ---- format 1.4: encoded after the fields above by [`encode_metadata`], as one record of
    // their own, so that the fields above keep format 1.3's encoding; empty in older images.
    /// The lineage, generation and instance that wrote the image.
    #[serde(skip)]
    pub lineage: Option<Lineage>,
    /// Each thread's credentials, by TID (threads of the shim included).
    #[serde(skip)]
    pub credentials: Vec<Credentials>,
    // ---- end of format 1.4 ------------------------------------------------------------------
}

/// What a merged image replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergedFrom {
    /// The metadata checksum of the delta it replaced, so deltas that name that one as their
    /// parent still find their parent in it.
    pub meta_crc: u32,
    /// File names of the older images of the merged chain, which the merge deletes once this
    /// image is committed (a merge that was interrupted finishes that when run again).
    pub files: Vec<String>,
}

/// How a delta image names its parent: the parent's identity and metadata checksum (which
/// covers every page-run checksum of the parent, so it fingerprints the whole image), and its
/// file name in the same directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    pub image_id: u64,
    pub meta_crc: u32,
    pub file: String,
}

/// The build-id of one mapped file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildId {
    pub path: String,
    pub id: Vec<u8>,
}

/// The vDSO as it was mapped at the checkpoint (format 1.2; empty if the program had none).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct VdsoImage {
    /// Its exported functions (offsets from the `[vdso]` region's start). glibc holds pointers
    /// to them.
    pub symbols: Vec<VdsoSymbol>,
    /// Its bytes, the whole `[vdso]` region: the proxy starts as a copy, so that glibc's view
    /// of the vDSO as a loaded object (its ELF headers, symbols, unwind tables) stays valid.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VdsoSymbol {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

impl Metadata {
    /// The build-id recorded for the mapped file `path`, if any.
    pub fn build_id_of(&self, path: &str) -> Option<&[u8]> {
        self.build_ids
            .iter()
            .find(|b| b.path == path)
            .map(|b| b.id.as_slice())
    }
}

/// [`Metadata`] as format 1.1 wrote it (see [`MetadataV1_0`]).
#[derive(Deserialize)]
struct MetadataV1_1 {
    process: Process,
    shim: ShimInfo,
    threads: Vec<ThreadState>,
    regions: Vec<Region>,
    runs: Vec<PageRun>,
    fds: Vec<FdState>,
    clock_boottime_ns: u64,
}

/// [`Metadata`] as format 1.0 wrote it: postcard is positional, so an image of an older minor
/// version decodes with the field list of its time and the appended fields take their defaults.
#[derive(Deserialize)]
struct MetadataV1_0 {
    process: Process,
    shim: ShimInfo,
    threads: Vec<ThreadState>,
    regions: Vec<Region>,
    runs: Vec<PageRun>,
    fds: Vec<FdState>,
}

/// [`Metadata`] as format 1.2 wrote it (see [`MetadataV1_0`]).
#[derive(Deserialize)]
struct MetadataV1_2 {
    process: Process,
    shim: ShimInfo,
    threads: Vec<ThreadState>,
    regions: Vec<Region>,
    runs: Vec<PageRun>,
    fds: Vec<FdState>,
    clock_boottime_ns: u64,
    build_ids: Vec<BuildId>,
    vdso: VdsoImage,
}

/// Decodes metadata written by format version 1.`minor`: every byte must belong to it.
fn decode_metadata(bytes: &[u8], minor: u16) -> Result<Metadata, ImageError> {
    fn whole<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ImageError> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((v, [])) => Ok(v),
            Ok((_, rest)) => Err(ImageError::MetadataDecode(format!(
                "{} bytes left over after the metadata",
                rest.len()
            ))),
            Err(e) => Err(ImageError::MetadataDecode(e.to_string())),
        }
    }
    if minor == 3 {
        return whole(bytes);
    }
    if minor >= 4 {
        let (mut m, rest) = postcard::take_from_bytes::<Metadata>(bytes)
            .map_err(|e| ImageError::MetadataDecode(e.to_string()))?;
        (m.lineage, m.credentials) = whole(rest)?;
        return Ok(m);
    }
    let (m, build_ids, vdso) = match minor {
        0 => {
            let m: MetadataV1_0 = whole(bytes)?;
            let m = MetadataV1_1 {
                process: m.process,
                shim: m.shim,
                threads: m.threads,
                regions: m.regions,
                runs: m.runs,
                fds: m.fds,
                clock_boottime_ns: 0,
            };
            (m, Vec::new(), VdsoImage::default())
        }
        1 => (
            whole::<MetadataV1_1>(bytes)?,
            Vec::new(),
            VdsoImage::default(),
        ),
        _ => {
            let m: MetadataV1_2 = whole(bytes)?;
            let v = MetadataV1_1 {
                process: m.process,
                shim: m.shim,
                threads: m.threads,
                regions: m.regions,
                runs: m.runs,
                fds: m.fds,
                clock_boottime_ns: m.clock_boottime_ns,
            };
            (v, m.build_ids, m.vdso)
        }
    };
    Ok(Metadata {
        process: m.process,
        shim: m.shim,
        threads: m.threads,
        regions: m.regions,
        runs: m.runs,
        fds: m.fds,
        clock_boottime_ns: m.clock_boottime_ns,
        build_ids,
        vdso,
        parent: None,
        inherited: Vec::new(),
        merged_from: None,
        lineage: None,
        credentials: Vec::new(),
    })
}

impl Metadata {
    /// Checks that the image describes a process the restorer can rebuild, beyond the
    /// structure [`Image::open`] checks: every region lies in the user address space and
    /// outside the range snapshim keeps for the restorer ([`layout::RESERVED_START`]), has only
    /// `PROT_READ|WRITE|EXEC` and, for a file, a page-aligned offset; page data is stored only
    /// for regions whose content the image holds; there is a thread to resume, the shim's
    /// resume address is in executable memory and every thread's saved stack pointer in
    /// writable memory; descriptor numbers are valid and distinct; a recorded vDSO (format 1.2)
    /// fits its one `[vdso]` region.
    ///
    /// The restorer calls this before it changes anything: past that point a mistake costs the
    /// process (phase 2 cannot report more than an address and an errno).
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |why: String| Err(ImageError::Inconsistent(why));
        let prot_rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32;
        for (i, r) in self.regions.iter().enumerate() {
            if r.start < PAGE_SIZE || r.end > layout::USER_END {
                return bad(format!(
                    "region {i} ({:#x}-{:#x}) is outside the user address space",
                    r.start, r.end
                ));
            }
            if r.start < layout::RESERVED_END && r.end > layout::RESERVED_START {
                return bad(format!(
                    "region {i} ({:#x}-{:#x}) is inside the range {:#x}-{:#x} snapshim keeps \
                     for the restorer",
                    r.start,
                    r.end,
                    layout::RESERVED_START,
                    layout::RESERVED_END
                ));
            }
            if r.prot & !prot_rwx != 0 {
                return bad(format!(
                    "region {i} ({:#x}-{:#x}) has unknown protection bits {:#x}",
                    r.start, r.end, r.prot
                ));
            }
            if let RegionKind::File { path, offset, .. } = &r.kind {
                if offset % PAGE_SIZE != 0 || !path.starts_with('/') {
                    return bad(format!(
                        "region {i} ({:#x}-{:#x}) maps {path:?} at offset {offset}: not an \
                         absolute path at a page boundary",
                        r.start, r.end
                    ));
                }
            }
        }
        for (i, run) in self.runs.iter().enumerate() {
            // Image::open put every run inside one region.
            let Some(r) = self.region_at(run.addr) else {
                return bad(format!("page run {i} at {:#x} is in no region", run.addr));
            };
            let stored = match r.kind {
                RegionKind::Anon => true,
                RegionKind::File { .. } => !r.shared,
                RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => false,
            };
            if !stored {
                return bad(format!(
                    "page run {i} at {:#x} holds pages of region {:#x}-{:#x} ({}), whose \
                     content is never stored",
                    run.addr, r.start, r.end, r.name
                ));
            }
        }
        if self.threads.is_empty() {
            return bad("the image has no threads to resume".into());
        }
        let memory = |addr: u64, prot: i32| {
            self.region_at(addr)
                .is_some_and(|r| r.prot & prot as u32 != 0)
        };
        if !memory(self.shim.resume_addr, libc::PROT_EXEC) {
            return bad(format!(
                "the shim's resume address {:#x} is not in executable memory of the image",
                self.shim.resume_addr
            ));
        }
        for t in &self.threads {
            if !memory(t.ctx_rsp, libc::PROT_WRITE) {
                return bad(format!(
                    "thread {}: its saved stack pointer {:#x} is not in writable memory of the \
                     image",
                    t.tid, t.ctx_rsp
                ));
            }
        }
        let mut fds: Vec<i32> = self.fds.iter().map(|f| f.fd).collect();
        fds.sort_unstable();
        if let Some(&fd) = fds.iter().find(|&&fd| !(0..i32::MAX).contains(&fd)) {
            return bad(format!("descriptor number {fd} is out of range"));
        }
        if let Some(w) = fds.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("descriptor {} appears twice", w[0]));
        }
        let vdso = &self.vdso;
        if !vdso.symbols.is_empty() || !vdso.bytes.is_empty() {
            let mut regions = self.regions.iter().filter(|r| r.kind == RegionKind::Vdso);
            let (Some(r), None) = (regions.next(), regions.next()) else {
                return bad(
                    "the image records a vDSO but has not exactly one [vdso] region".into(),
                );
            };
            let len = r.end - r.start;
            if vdso.bytes.len() as u64 > len {
                return bad(format!(
                    "the recorded vDSO is {} bytes, more than its region {:#x}-{:#x}",
                    vdso.bytes.len(),
                    r.start,
                    r.end
                ));
            }
            for s in &vdso.symbols {
                if s.offset.checked_add(s.size).is_none_or(|e| e > len) {
                    return bad(format!(
                        "vDSO symbol {} ({} bytes at offset {:#x}) lies outside the [vdso] \
                         region {:#x}-{:#x}",
                        s.name, s.size, s.offset, r.start, r.end
                    ));
                }
            }
        }
        Ok(())
    }

    /// The region containing `addr`, if any (regions are sorted and disjoint: [`Image::open`]).
    pub fn region_at(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.end <= addr);
        self.regions.get(i).filter(|r| r.start <= addr)
    }
}

/// Where the shim that wrote the image lives, and what the restorer needs to re-enter it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ShimInfo {
    pub path: String,
    /// Address of `snapshim_resume`: each restored thread jumps there with `rsp = ctx_rsp`.
    pub resume_addr: u64,
    /// The range the shim keeps free for the restorer (never part of an image).
    pub reserved_start: u64,
    pub reserved_end: u64,
}

/// An opened, header- and metadata-checked image.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub file: File,
    pub file_len: u64,
    pub header: Header,
    pub meta: Metadata,
}

impl Image {
    /// Opens `path` and checks what every reader relies on: the header, the section layout
    /// against the file's length, the metadata checksum, the metadata's decoding, and the
    /// structure of regions and page runs (see [`check_structure`]). Page data is not read:
    /// see [`Image::verify_pages`]; whether the image can be restored: [`Metadata::validate`].
    ///
    /// Memory use is bounded by the file, not by what its header claims: the metadata is
    /// checksummed in chunks before it is read into memory.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let io = |op: &'static str| {
            let p = path.to_path_buf();
            move |source| ImageError::Io {
                op,
                path: p,
                source,
            }
        };
        let mut file = File::open(path).map_err(io("open"))?;
        let file_len = file.metadata().map_err(io("stat"))?.len();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let n = read_up_to(&mut file, &mut page).map_err(io("read header of"))?;
        let header = Header::decode(&page[..n])?;
        if (n as u64) < PAGE_SIZE {
            return Err(ImageError::Truncated {
                what: "header",
                offset: 0,
                len: PAGE_SIZE,
                have: file_len,
            });
        }
        header.check_layout()?;
        for (what, offset, len) in [
            ("page data", header.data_off, header.data_len),
            ("metadata", header.meta_off, header.meta_len),
        ] {
            // No overflow: check_layout.
            if file_len < offset + len {
                return Err(ImageError::Truncated {
                    what,
                    offset,
                    len,
                    have: file_len,
                });
            }
        }
        // Large metadata is checksummed before it is held: a file (sparse, say) with a
        // plausible header must not make a reader allocate what the header claims.
        if header.meta_len > CHUNK as u64
            && crc_of(&file, header.meta_off, header.meta_len).map_err(io("read metadata of"))?
                != header.meta_crc
        {
            return Err(ImageError::MetadataChecksum);
        }
        let mut meta_bytes = vec![0u8; header.meta_len as usize];
        file.read_exact_at(&mut meta_bytes, header.meta_off)
            .map_err(io("read metadata of"))?;
        if crc32fast::hash(&meta_bytes) != header.meta_crc {
            return Err(ImageError::MetadataChecksum);
        }
        let meta = decode_metadata(&meta_bytes, header.minor)?;
        check_structure(&header, &meta)?;
        Ok(Image {
            path: path.to_path_buf(),
            file,
            file_len,
            header,
            meta,
        })
    }

    /// Bytes of page data stored.
    pub fn stored_bytes(&self) -> u64 {
        self.meta.runs.iter().map(|r| r.len()).sum()
    }
}

/// Size of the chunks in which page data and large metadata are read.
const CHUNK: usize = 4 << 20;

/// CRC32 of `len` bytes of `file` at `off`, read in chunks.
fn crc_of(file: &File, off: u64, len: u64) -> std::io::Result<u32> {
    crc_with(file, off, len, &mut Vec::new())
}

/// [`crc_of`] with a reusable buffer (grown to at most [`CHUNK`] bytes).
fn crc_with(file: &File, off: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<u32> {
    let want = len.min(CHUNK as u64) as usize;
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut h = crc32fast::Hasher::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize())
}

/// What every reader of an image relies on, checked by [`Image::open`]: regions are non-empty,
/// page-aligned, sorted and disjoint; each page run is non-empty, page-aligned, inside the page
/// data section and inside one region; no two runs hold the same memory or the same file
/// bytes (so reading every run reads at most the page data once).
fn check_structure(h: &Header, m: &Metadata) -> Result<(), ImageError> {
    let bad = |why: String| Err(ImageError::Inconsistent(why));
    for (i, r) in m.regions.iter().enumerate() {
        if r.start >= r.end || r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 {
            return bad(format!(
                "region {i} ({:#x}-{:#x}) is empty or not page-aligned",
                r.start, r.end
            ));
        }
        if let Some(prev) = i.checked_sub(1).and_then(|p| m.regions.get(p)) {
            if prev.end > r.start {
                return bad(format!(
                    "region {i} ({:#x}-{:#x}) overlaps or precedes region {} ({:#x}-{:#x})",
                    r.start,
                    r.end,
                    i - 1,
                    prev.start,
                    prev.end
                ));
            }
        }
    }
    // No overflow: Header::check_layout.
    let data_end = h.data_off + h.data_len;
    for (i, run) in m.runs.iter().enumerate() {
        let Some(len) = run.pages.checked_mul(PAGE_SIZE).filter(|&l| l > 0) else {
            return bad(format!(
                "page run {i} has an impossible size of {} pages",
                run.pages
            ));
        };
        if run.addr % PAGE_SIZE != 0 || run.file_off % PAGE_SIZE != 0 {
            return bad(format!(
                "page run {i} (memory {:#x}, file offset {}) is not page-aligned",
                run.addr, run.file_off
            ));
        }
        let file_end = run.file_off.checked_add(len).filter(|&e| e <= data_end);
        if run.file_off < h.data_off || file_end.is_none() {
            return bad(format!(
                "page run {i} ({len} bytes at file offset {}) lies outside the page data                  (offsets {}..{data_end})",
                run.file_off, h.data_off
            ));
        }
        let end = run.addr.checked_add(len);
        let region = m.regions.partition_point(|r| r.end <= run.addr);
        let inside = m
            .regions
            .get(region)
            .is_some_and(|r| r.start <= run.addr && end.is_some_and(|e| e <= r.end));
        if !inside {
            return bad(format!(
                "page run {i} ({} pages at {:#x}) is not inside one region",
                run.pages, run.addr
            ));
        }
    }
    check_delta(h, m)?;
    // Neighbours in memory order, then in file order, must not overlap.
    let mut order: Vec<usize> = (0..m.runs.len()).collect();
    for (key, what) in [
        ((|r: &PageRun| r.addr) as fn(&PageRun) -> u64, "memory"),
        (|r: &PageRun| r.file_off, "file bytes"),
    ] {
        order.sort_by_key(|&i| key(&m.runs[i]));
        for w in order.windows(2) {
            let (a, b) = (&m.runs[w[0]], &m.runs[w[1]]);
            // Sizes were checked above: no overflow.
            if key(a) + a.len() > key(b) {
                let (i, j) = (w[0].min(w[1]), w[0].max(w[1]));
                return bad(format!(
                    "page runs {i} and {j} both hold the {what} at {:#x}",
                    key(b)
                ));
            }
        }
    }
    Ok(())
}

/// The 1.3 fields: a delta (header flag) has a parent and the header names the same one; a full
/// image inherits nothing; inherited spans are sorted, disjoint, each inside one region and
/// outside every page run.
fn check_delta(h: &Header, m: &Metadata) -> Result<(), ImageError> {
    let bad = |why: String| Err(ImageError::Inconsistent(why));
    let delta = h.flags & FLAG_DELTA != 0;
    match &m.parent {
        Some(p) if !delta || p.image_id != h.parent_id => {
            return bad(format!(
                "the metadata names parent image {:016x} but the header {}",
                p.image_id,
                if delta {
                    format!("names {:016x}", h.parent_id)
                } else {
                    "says it is a full image".into()
                }
            ))
        }
        None if delta => return bad("a delta image without a parent".into()),
        None if !m.inherited.is_empty() => return bad("a full image with inherited pages".into()),
        _ => {}
    }
    if let Some(p) = &m.parent {
        if p.file.is_empty() || p.file.contains('/') || p.file.starts_with('.') {
            return bad(format!(
                "parent file name {:?} is not a plain file name",
                p.file
            ));
        }
    }
    let mut prev_end = 0u64;
    let mut runs: Vec<&PageRun> = m.runs.iter().collect();
    runs.sort_by_key(|r| r.addr);
    for (i, s) in m.inherited.iter().enumerate() {
        let end = s
            .pages
            .checked_mul(PAGE_SIZE)
            .and_then(|l| s.addr.checked_add(l))
            .filter(|_| s.pages > 0 && s.addr % PAGE_SIZE == 0);
        let Some(end) = end else {
            return bad(format!(
                "inherited span {i} at {:#x} is empty or not page-aligned",
                s.addr
            ));
        };
        if s.addr < prev_end {
            return bad(format!(
                "inherited span {i} at {:#x} is out of order",
                s.addr
            ));
        }
        prev_end = end;
        let r = m.regions.partition_point(|r| r.end <= s.addr);
        if !m
            .regions
            .get(r)
            .is_some_and(|r| r.start <= s.addr && end <= r.end)
        {
            return bad(format!(
                "inherited span {i} at {:#x} is not inside one region",
                s.addr
            ));
        }
        let k = runs.partition_point(|r| r.end() <= s.addr);
        if runs.get(k).is_some_and(|r| r.addr < end) {
            return bad(format!(
                "inherited span {i} at {:#x} overlaps a page run stored in the image",
                s.addr
            ));
        }
    }
    Ok(())
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Encodes metadata for the file. Returns the bytes and their checksum.
///
/// The bytes are allocated once, at their exact size: the shim encodes in its writer, whose
/// scratch heap never frees, and metadata holding deleted files' content can be tens of MiB
/// (a growing vector would take about twice that again).
pub fn encode_metadata(m: &Metadata) -> (Vec<u8>, u32) {
    let v1_4 = (&m.lineage, &m.credentials);
    let main = postcard::experimental::serialized_size(m).expect("metadata always serializes");
    let tail = postcard::experimental::serialized_size(&v1_4)
        .expect("format 1.4's record always serializes");
    let mut bytes = vec![0u8; main + tail];
    let (head, rest) = bytes.split_at_mut(main);
    postcard::to_slice(m, head).expect("metadata fits its own size");
    postcard::to_slice(&v1_4, rest).expect("format 1.4's record fits its own size");
    let crc = crc32fast::hash(&bytes);
    (bytes, crc)
}

/// Resolves what a user names: an image file, or an image directory (its `latest` link, else
/// its newest committed image), or a directory holding one image directory.
pub fn resolve(path: &Path) -> Result<PathBuf, ImageError> {
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Io {
        op: "find",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST);
    if latest.exists() {
        return Ok(std::fs::canonicalize(&latest).unwrap_or(latest));
    }
    let mut images = list_images(path)?;
    if images.is_empty() {
        // A base directory with exactly one program directory in it.
        let subdirs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| ImageError::Io {
                op: "list",
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        if let [only] = subdirs.as_slice() {
            return resolve(only);
        }
        return Err(ImageError::NoImage(path.to_path_buf()));
    }
    Ok(images.pop().unwrap())
}

/// The committed images in a directory, oldest first (names sort by sequence number).
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        op: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(IMAGE_SUFFIX) && !name.starts_with('.')
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The XSAVE features this CPU has enabled (XCR0): what every signal frame taken here contains,
/// and the value recorded in [`Process::xsave_features`]. 0 when the OS has not enabled XSAVE.
pub fn xsave_features() -> u64 {
    let c = core::arch::x86_64::__cpuid(1);
    if c.ecx & (1 << 27) == 0 {
        return 0; // no OSXSAVE
    }
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv(0) is allowed when OSXSAVE is set (checked above).
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}

/// File name of the image with sequence number `seq`; sorts by sequence.
pub fn image_file_name(seq: u64) -> String {
    format!("ckpt-{seq:08}{IMAGE_SUFFIX}")
}

mod chain;
pub use chain::{retain, retain_among, Chain, SourcedRun};
pub mod verify;

#[cfg(test)]
mod tests;
