//! Mutation tests of the image reader: realistic images, damaged systematically and at random,
//! must be refused with the error for their kind of damage (or accepted when the damage is
//! genuinely harmless), and never make the reader panic, hang or allocate what a header claims.
//!
//! What every mutant goes through is what the restorer does before it changes anything:
//! [`Image::open`], [`Metadata::validate`], [`Image::verify_pages`]. When that accepts a mutant,
//! an independent, deliberately naive re-statement of the invariants ([`assert_restorable`])
//! must agree, so a check that lets damage through fails here even when nothing panics.
//!
//! The random part is a seeded loop (stable Rust has no cargo-fuzz): `SNAPSHIM_FUZZ_SEED`
//! picks another seed, `SNAPSHIM_FUZZ_ITERS` more iterations. A failing case prints its seed,
//! iteration and the mutations applied.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use snapshim_image::layout::{RESERVED_END, RESERVED_START, USER_END};
use snapshim_image::{
    encode_metadata, CharDevice, FdKind, FdState, FileIdentity, Header, Image, ImageError,
    Inherited, IntervalTimer, Metadata, MmFields, PageRun, Pipe, Process, Region, RegionKind,
    RegularFile, Rlimit, ShimInfo, ThreadState, Unsupported, PAGE_SIZE, VERSION_MINOR,
};

// --- memory accounting -------------------------------------------------------------------------

/// Counts the bytes each thread holds, so a check can bound what the reader allocates.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(grow: usize, shrink: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(grow).wrapping_sub(shrink);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            track(l.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            track(l.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) };
        track(0, l.size());
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            track(new, l.size());
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the most it had allocated (net) at any moment.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get).saturating_sub(base))
}

/// What the reader may hold beyond the file itself: its 4 MiB read buffer and change.
const MEMORY_BOUND: usize = 16 << 20;

// --- randomness --------------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A value that breaks arithmetic more often than a uniform one does.
    fn nasty(&mut self, near: u64) -> u64 {
        let v = [
            0,
            1,
            PAGE_SIZE - 1,
            PAGE_SIZE,
            PAGE_SIZE + 1,
            near,
            near.wrapping_add(1),
            near.wrapping_sub(1),
            near.wrapping_add(PAGE_SIZE),
            near.wrapping_sub(PAGE_SIZE),
            near.wrapping_mul(2),
            1 << 32,
            1 << 40,
            1 << 52,
            u64::MAX / PAGE_SIZE + 1,
            i64::MAX as u64,
            u64::MAX - PAGE_SIZE + 1,
            u64::MAX,
        ];
        if self.chance(80) {
            v[self.index(v.len())]
        } else {
            self.next()
        }
    }
}

fn seed() -> u64 {
    std::env::var("SNAPSHIM_FUZZ_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or(0x5eed_f022_1a7e)
}

fn iterations() -> u64 {
    std::env::var("SNAPSHIM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2000)
}

/// Prints what was being tried if the test fails (panics) while it is alive.
struct Case(String);

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failing case: {}", self.0);
            eprintln!(
                "reproduce: SNAPSHIM_FUZZ_SEED={:#x} (and the test name)",
                seed()
            );
        }
    }
}

// --- realistic images --------------------------------------------------------------------------

/// A valid image and where its parts are.
#[derive(Clone)]
struct Sample {
    bytes: Vec<u8>,
    header: Header,
    meta: Metadata,
    /// File ranges of page data that no run uses (padding a writer may leave).
    unused: Vec<(u64, u64)>,
}

fn anon(start: u64, pages: u64, prot: u32, name: &str) -> Region {
    Region {
        start,
        end: start + pages * PAGE_SIZE,
        prot,
        shared: false,
        kind: RegionKind::Anon,
        name: name.into(),
    }
}

fn file_region(start: u64, pages: u64, prot: u32, shared: bool, path: &str, off: u64) -> Region {
    Region {
        start,
        end: start + pages * PAGE_SIZE,
        prot,
        shared,
        kind: RegionKind::File {
            path: path.into(),
            offset: off * PAGE_SIZE,
            identity: FileIdentity {
                size: 123_456,
                mtime_ns: 1_700_000_000_123_456_789,
                inode: 77,
            },
        },
        name: path.into(),
    }
}

/// Regions as a process has them: program, heap, libraries (one shared), the shim, a stack,
/// vvar and vDSO; sizes, gaps and which pages are stored vary with `rng`.
fn generate(rng: &mut Rng) -> Sample {
    const R: u32 = 1;
    const RW: u32 = 3;
    const RX: u32 = 5;
    let pages = |rng: &mut Rng| 1 + rng.below(6);
    let mut regions = Vec::new();
    let mut at = 0x5555_5555_4000u64;
    // Places a region of n pages at `at`, leaving a random gap (or none) after it.
    let next = |at: &mut u64, rng: &mut Rng, n: u64| {
        let start = *at;
        *at += (n + rng.below(3)) * PAGE_SIZE;
        start
    };
    let n = pages(rng);
    regions.push(file_region(
        next(&mut at, rng, n),
        n,
        R,
        false,
        "/usr/bin/app",
        0,
    ));
    let n = pages(rng);
    regions.push(file_region(
        next(&mut at, rng, n),
        n,
        RX,
        false,
        "/usr/bin/app",
        1,
    ));
    let n = pages(rng) + 2;
    regions.push(anon(next(&mut at, rng, n), n, RW, "[heap]"));
    at = 0x7f12_3400_0000;
    for lib in 0..rng.below(3) {
        let n = pages(rng);
        let path = format!("/usr/lib/libx{lib}.so");
        regions.push(file_region(next(&mut at, rng, n), n, RX, false, &path, 0));
        let n = pages(rng);
        regions.push(file_region(next(&mut at, rng, n), n, RW, false, &path, 4));
    }
    let n = pages(rng);
    regions.push(file_region(
        next(&mut at, rng, n),
        n,
        RW,
        true,
        "/dev/shm/shared",
        0,
    ));
    let n = pages(rng);
    let shim = regions.len();
    regions.push(file_region(
        next(&mut at, rng, n),
        n,
        RX,
        false,
        "/opt/snapshim/libsnapshim.so",
        0,
    ));
    if rng.chance(50) {
        let n = pages(rng);
        regions.push(anon(next(&mut at, rng, n), n, 0, ""));
    }
    at = 0x7ffc_0000_0000;
    let n = pages(rng) + 2;
    let stack = regions.len();
    regions.push(anon(next(&mut at, rng, n), n, RW, "[stack]"));
    let mut vvar = anon(next(&mut at, rng, 4), 4, R, "[vvar]");
    vvar.kind = RegionKind::Vvar;
    regions.push(vvar);
    let mut vdso = anon(next(&mut at, rng, 2), 2, RX, "[vdso]");
    vdso.kind = RegionKind::Vdso;
    regions.push(vdso);

    // Runs: groups of stored pages in the regions whose content the image holds.
    let mut runs: Vec<PageRun> = Vec::new();
    for r in &regions {
        let stored = match r.kind {
            RegionKind::Anon => true,
            RegionKind::File { .. } => !r.shared,
            _ => false,
        };
        if !stored {
            continue;
        }
        let mut addr = r.start;
        while addr < r.end {
            if rng.chance(40) {
                addr += PAGE_SIZE;
                continue;
            }
            let left = (r.end - addr) / PAGE_SIZE;
            let pages = 1 + rng.below(left);
            runs.push(PageRun {
                addr,
                pages,
                file_off: 0,
                crc: 0,
            });
            addr += pages * PAGE_SIZE;
        }
    }
    if runs.is_empty() {
        let r = &regions[stack];
        runs.push(PageRun {
            addr: r.start,
            pages: 1,
            file_off: 0,
            crc: 0,
        });
    }
    // File order: memory order as the shim writes it, or shuffled; now and then a page of
    // padding between two runs.
    let mut order: Vec<usize> = (0..runs.len()).collect();
    if rng.chance(30) {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.index(i + 1));
        }
    }
    let mut data = Vec::new();
    let mut unused = Vec::new();
    for &i in &order {
        if rng.chance(15) {
            let off = PAGE_SIZE + data.len() as u64;
            unused.push((off, off + PAGE_SIZE));
            data.extend(rng.bytes(PAGE_SIZE as usize));
        }
        let run = &mut runs[i];
        run.file_off = PAGE_SIZE + data.len() as u64;
        let pages = rng.bytes(run.len() as usize);
        run.crc = crc32fast::hash(&pages);
        data.extend(pages);
    }

    let in_stack = |rng: &mut Rng| {
        let r = &regions[stack];
        (r.start + rng.below(r.end - r.start)) & !15
    };
    let nthreads = 1 + rng.below(4);
    let threads = (0..nthreads)
        .map(|i| ThreadState {
            tid: 1000 + i as i32,
            fs_base: 0x7f00_0000_0000 + i * 0x1000,
            ctx_rsp: in_stack(rng),
            robust_head: 0x7f00_0000_0100,
            robust_len: 24,
            altstack_sp: 0,
            altstack_flags: 2,
            altstack_size: 0,
            sigmask: rng.next(),
            name: format!("t{i}"),
            helper: i + 1 == nthreads,
        })
        .collect();
    let mut fds = vec![
        FdState {
            fd: 0,
            flags: 0,
            cloexec: false,
            kind: FdKind::CharDevice(CharDevice {
                path: "/dev/null".into(),
            }),
        },
        FdState {
            fd: 1,
            flags: 0o2001,
            cloexec: false,
            kind: FdKind::RegularFile(RegularFile {
                path: "/home/u/out.txt".into(),
                offset: 120,
                size: 120,
                identity: FileIdentity::default(),
            }),
        },
        FdState {
            fd: 2,
            flags: 2,
            cloexec: false,
            kind: FdKind::Inherited(Inherited {
                desc: "/dev/pts/0".into(),
            }),
        },
    ];
    if rng.chance(60) {
        let n = rng.index(200);
        let data = rng.bytes(n);
        for (fd, read_end) in [(5, true), (6, false)] {
            fds.push(FdState {
                fd,
                flags: 0,
                cloexec: true,
                kind: FdKind::Pipe(Pipe {
                    id: 9,
                    read_end,
                    data: data.clone(),
                }),
            });
        }
    }
    if rng.chance(30) {
        fds.push(FdState {
            fd: 9,
            flags: 2,
            cloexec: false,
            kind: FdKind::Unsupported(Unsupported {
                desc: "socket:[1234]".into(),
            }),
        });
    }
    let shim_rx = &regions[shim];
    let meta = Metadata {
        process: Process {
            pid: 1000,
            name: "app".into(),
            exe: "/usr/bin/app".into(),
            cmdline: vec!["app".into(), "--in".into(), "x y".into()],
            cwd: "/home/u".into(),
            umask: 0o22,
            rlimits: vec![Rlimit {
                resource: 7,
                soft: 1024,
                hard: 4096,
            }],
            mm: MmFields {
                start_brk: regions[2].start,
                brk: regions[2].end,
                ..Default::default()
            },
            auxv: vec![6, 4096, 0, 0],
            itimers: vec![IntervalTimer::default(); 3],
            xsave_features: 7,
            ..Default::default()
        },
        shim: ShimInfo {
            path: "/opt/snapshim/libsnapshim.so".into(),
            resume_addr: shim_rx.start + rng.below(shim_rx.end - shim_rx.start),
            reserved_start: RESERVED_START,
            reserved_end: RESERVED_END,
        },
        threads,
        regions,
        runs,
        fds,
        clock_boottime_ns: 1_000_000_000,
        build_ids: vec![],
        vdso: Default::default(),
        parent: None,
        inherited: Vec::new(),
        merged_from: None,
        lineage: None,
        credentials: Vec::new(),
    };
    let (meta_bytes, meta_crc) = encode_metadata(&meta);
    let mut header = Header::new(rng.next(), rng.next());
    header.data_len = data.len() as u64;
    header.meta_off = PAGE_SIZE + header.data_len;
    header.meta_len = meta_bytes.len() as u64;
    header.meta_crc = meta_crc;
    let mut bytes = header.encode();
    bytes.extend(data);
    bytes.extend(meta_bytes);
    Sample {
        bytes,
        header,
        meta,
        unused,
    }
}

/// Replaces the header page by `header` (checksum recomputed): damage a writer could make.
fn reseal_header(bytes: &mut [u8], header: &Header) {
    bytes[..PAGE_SIZE as usize].copy_from_slice(&header.encode());
}

/// Replaces the metadata by `meta_bytes` and points a resealed header at it.
fn reseal_meta(s: &Sample, meta_bytes: &[u8]) -> Vec<u8> {
    let mut h = s.header.clone();
    let mut bytes = s.bytes[..h.meta_off as usize].to_vec();
    bytes.extend_from_slice(meta_bytes);
    h.meta_len = meta_bytes.len() as u64;
    h.meta_crc = crc32fast::hash(meta_bytes);
    reseal_header(&mut bytes, &h);
    bytes
}

fn with_meta(s: &Sample, change: impl FnOnce(&mut Metadata)) -> Vec<u8> {
    let mut m = s.meta.clone();
    change(&mut m);
    reseal_meta(s, &encode_metadata(&m).0)
}

// --- running the reader ------------------------------------------------------------------------

fn scratch_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "mutant-{}-{}.snap",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// What the restorer checks before it touches memory, on a file holding `bytes`.
fn check_file(path: &Path) -> Result<Image, ImageError> {
    let img = Image::open(path)?;
    img.meta.validate()?;
    img.verify_pages()?;
    Ok(img)
}

/// Writes `bytes` to a file and checks it; an accepted image must be restorable by the naive
/// statement of the rules, and no check may allocate much more than the file.
fn check(bytes: &[u8]) -> Result<Image, ImageError> {
    let path = scratch_path();
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let (r, peak) = peak_of(|| check_file(&path));
    let _ = std::fs::remove_file(&path);
    assert!(
        peak <= MEMORY_BOUND + bytes.len(),
        "reading a {}-byte image allocated {peak} bytes",
        bytes.len()
    );
    if let Ok(img) = &r {
        assert_restorable(bytes, img);
    }
    r
}

/// The kind of an error, for comparing expectations.
fn kind(e: &ImageError) -> String {
    match e {
        ImageError::Io { .. } => "io".into(),
        ImageError::Truncated { what, .. } => format!("truncated {what}"),
        ImageError::BadMagic => "magic".into(),
        ImageError::ForeignArch { .. } => "arch".into(),
        ImageError::UnsupportedVersion { .. } => "version".into(),
        ImageError::HeaderChecksum => "header checksum".into(),
        ImageError::BadLayout(_) => "layout".into(),
        ImageError::MetadataChecksum => "metadata checksum".into(),
        ImageError::MetadataDecode(_) => "decode".into(),
        ImageError::Inconsistent(_) => "inconsistent".into(),
        ImageError::RunChecksum { index, .. } => format!("run {index} checksum"),
        ImageError::NoImage(_) => "no image".into(),
        ImageError::Ancestor { .. } => "ancestor".into(),
        ImageError::BrokenChain { .. } => "broken chain".into(),
    }
}

#[track_caller]
fn expect_kind(bytes: &[u8], want: &str) -> ImageError {
    match check(bytes) {
        Ok(_) => panic!("accepted, expected {want}"),
        Err(e) => {
            assert_eq!(kind(&e), want, "wrong error: {e}");
            e
        }
    }
}

#[track_caller]
fn expect_inconsistent(bytes: &[u8], mentions: &[&str]) -> String {
    let e = expect_kind(bytes, "inconsistent").to_string();
    assert!(
        mentions.iter().any(|m| e.contains(m)),
        "expected a mention of one of {mentions:?}: {e}"
    );
    e
}

/// The rules an accepted image must follow, stated the slow obvious way (no sorting, no
/// binary search, 128-bit arithmetic), independently of the reader's code.
fn assert_restorable(bytes: &[u8], img: &Image) {
    let (h, m) = (&img.header, &img.meta);
    let p = PAGE_SIZE as u128;
    let span = |a: u64, len: u64| (a as u128, a as u128 + len as u128);
    let overlap = |a: (u128, u128), b: (u128, u128)| a.0 < b.1 && b.0 < a.1;
    let aligned = |x: u128| x & (p - 1) == 0;
    let file = bytes.len() as u128;
    let data = span(h.data_off, h.data_len);
    let meta = span(h.meta_off, h.meta_len);
    assert!(
        data.0 >= p && data.1 <= meta.0 && meta.1 <= file,
        "sections {h:?}"
    );
    for (i, r) in m.regions.iter().enumerate() {
        let mem = span(r.start, r.end.wrapping_sub(r.start));
        assert!(r.start < r.end && aligned(r.start as u128) && aligned(r.end as u128));
        assert!(r.start >= PAGE_SIZE && r.end <= USER_END, "region {i}");
        assert!(!overlap(
            mem,
            (RESERVED_START as u128, RESERVED_END as u128)
        ));
        assert_eq!(r.prot & !7, 0);
        for (j, o) in m.regions.iter().enumerate().skip(i + 1) {
            assert!(
                r.end <= o.start,
                "regions {i} and {j} out of order or overlapping"
            );
        }
    }
    for (i, run) in m.runs.iter().enumerate() {
        let len = run.pages as u128 * p;
        let mem = (run.addr as u128, run.addr as u128 + len);
        let fil = (run.file_off as u128, run.file_off as u128 + len);
        assert!(len > 0 && aligned(mem.0) && aligned(fil.0), "run {i}");
        assert!(
            fil.0 >= data.0 && fil.1 <= data.1,
            "run {i} outside the page data"
        );
        let holder = m
            .regions
            .iter()
            .find(|r| mem.0 >= r.start as u128 && mem.1 <= r.end as u128)
            .unwrap_or_else(|| panic!("run {i} in no region"));
        assert!(
            matches!(holder.kind, RegionKind::Anon)
                || matches!(holder.kind, RegionKind::File { .. }) && !holder.shared,
            "run {i} in a region never stored"
        );
        let stored = &bytes[fil.0 as usize..fil.1 as usize];
        assert_eq!(crc32fast::hash(stored), run.crc, "run {i} checksum");
        for (j, o) in m.runs.iter().enumerate().skip(i + 1) {
            let olen = o.pages as u128 * p;
            assert!(
                !overlap(mem, (o.addr as u128, o.addr as u128 + olen)),
                "runs {i} {j}"
            );
            assert!(!overlap(
                fil,
                (o.file_off as u128, o.file_off as u128 + olen)
            ));
        }
    }
    let in_region = |a: u64, prot: u32| {
        m.regions
            .iter()
            .any(|r| r.start <= a && a < r.end && r.prot & prot != 0)
    };
    assert!(!m.threads.is_empty());
    assert!(in_region(m.shim.resume_addr, 4), "resume address");
    for t in &m.threads {
        assert!(in_region(t.ctx_rsp, 2), "thread {} stack", t.tid);
    }
    for (i, f) in m.fds.iter().enumerate() {
        assert!(f.fd >= 0 && f.fd < i32::MAX);
        assert!(m.fds[i + 1..].iter().all(|g| g.fd != f.fd));
    }
}

/// A few realistic images from the default seed.
fn samples(n: u64) -> Vec<Sample> {
    let mut rng = Rng(seed());
    (0..n).map(|_| generate(&mut rng)).collect()
}

// Byte offsets of header fields (layout: image/src/lib.rs), checked by `header_offsets`.
const H_ARCH: usize = 8;
const H_MAJOR: usize = 16;
const H_FLAGS: usize = 20;
const H_DATA_OFF: usize = 48;
const H_META_LEN: usize = 72;
const H_END: usize = 88;

// --- the tests ---------------------------------------------------------------------------------

/// The harness itself: generated images are accepted, and a known mutation is caught (if this
/// fails, every other test here proves nothing).
#[test]
fn sanity_valid_images_pass_and_a_known_flip_is_caught() {
    for s in samples(20) {
        let img = check(&s.bytes).unwrap_or_else(|e| panic!("a valid image is refused: {e}"));
        assert_eq!(img.meta, s.meta);
        assert!(s.meta.regions.len() >= 8 && !s.meta.runs.is_empty());
        let mut bad = s.bytes.clone();
        let run = s.meta.runs[s.meta.runs.len() - 1];
        bad[(run.file_off + run.len() - 1) as usize] ^= 0x80;
        let e = expect_kind(&bad, &format!("run {} checksum", s.meta.runs.len() - 1));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{:#x}-{:#x}", run.addr, run.end())),
            "the message names the run's memory: {msg}"
        );
    }
}

#[test]
fn header_offsets() {
    let mut h = Header::new(1, 2);
    h.data_off = 0x1122_3344_5566_7788;
    h.meta_len = 0x99aa_bbcc_ddee_ff00;
    h.flags = 0xdead_beef;
    let b = h.encode();
    assert_eq!(&b[H_ARCH..H_ARCH + 6], b"x86_64");
    assert_eq!(b[H_MAJOR..H_MAJOR + 2], 1u16.to_le_bytes());
    assert_eq!(b[H_FLAGS..H_FLAGS + 4], 0xdead_beefu32.to_le_bytes());
    assert_eq!(b[H_DATA_OFF..H_DATA_OFF + 8], h.data_off.to_le_bytes());
    assert_eq!(b[H_META_LEN..H_META_LEN + 8], h.meta_len.to_le_bytes());
    assert!(b[H_END..].iter().all(|&x| x == 0));
}

/// Cut at every boundary that matters, and every few bytes in between: the error names the
/// section the cut falls in.
#[test]
fn truncation_names_the_section_cut() {
    for s in samples(4) {
        let (h, n) = (&s.header, s.bytes.len() as u64);
        let mut cuts = vec![0, 1, 7, 8, 15, 16, H_END as u64 - 1, H_END as u64];
        cuts.extend([PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1]);
        for r in &s.meta.runs {
            cuts.extend([r.file_off, r.file_off + 1, r.file_off + r.len() - 1]);
        }
        cuts.extend([h.meta_off - 1, h.meta_off, h.meta_off + 1, n - 1]);
        cuts.extend((0..n).step_by(509));
        for cut in cuts {
            let _case = Case(format!("truncated to {cut} of {n} bytes"));
            let want = if cut < PAGE_SIZE {
                "truncated header"
            } else if cut < h.meta_off {
                "truncated page data"
            } else {
                "truncated metadata"
            };
            let e = expect_kind(&s.bytes[..cut as usize], want);
            let msg = e.to_string();
            assert!(msg.contains(&format!("the file has {cut}")), "{msg}");
        }
        // Bytes after the metadata are harmless.
        let mut longer = s.bytes.clone();
        longer.extend([0u8; 100]);
        check(&longer).expect("trailing bytes are harmless");
    }
}

/// Every bit of the header's fields: each field's damage has its own error; the padding after
/// the fields is not part of the format.
#[test]
fn header_bit_flips() {
    let s = &samples(1)[0];
    for byte in 0..PAGE_SIZE as usize {
        for bit in 0..8 {
            if byte >= H_END && (byte % 97 != 0 || bit != 0) {
                continue; // the padding: a sample is enough
            }
            let _case = Case(format!("header byte {byte} bit {bit}"));
            let mut b = s.bytes.clone();
            b[byte] ^= 1 << bit;
            let r = check(&b);
            match byte {
                0..8 => assert_eq!(kind(&r.unwrap_err()), "magic"),
                8..16 => assert_eq!(kind(&r.unwrap_err()), "arch"),
                // A flip that leaves an older minor version this build still reads is caught
                // by the header checksum instead.
                18..20 if u16::from_le_bytes([b[18], b[19]]) <= VERSION_MINOR => {
                    assert_eq!(kind(&r.unwrap_err()), "header checksum")
                }
                16..20 => assert_eq!(kind(&r.unwrap_err()), "version"),
                20..H_END => assert_eq!(kind(&r.unwrap_err()), "header checksum"),
                _ => {
                    r.expect("a flip in the header padding is harmless");
                }
            }
        }
    }
}

/// Flipped bytes in page data name their run; in unused padding they are harmless; in the
/// metadata they fail its checksum.
#[test]
fn page_data_and_metadata_flips() {
    for s in samples(6) {
        let mut rng = Rng(s.header.image_id);
        for (i, run) in s.meta.runs.iter().enumerate() {
            for at in [
                run.file_off,
                run.file_off + rng.below(run.len()),
                run.file_off + run.len() - 1,
            ] {
                let _case = Case(format!("page data byte {at} (run {i})"));
                let mut b = s.bytes.clone();
                b[at as usize] ^= 1 << rng.below(8);
                expect_kind(&b, &format!("run {i} checksum"));
            }
        }
        for &(start, end) in &s.unused {
            let mut b = s.bytes.clone();
            b[(start + rng.below(end - start)) as usize] ^= 0xff;
            check(&b).expect("a flip in unused padding is harmless");
        }
        for at in (s.header.meta_off..s.bytes.len() as u64).step_by(3) {
            let _case = Case(format!("metadata byte {at}"));
            let mut b = s.bytes.clone();
            b[at as usize] ^= 1 << rng.below(8);
            expect_kind(&b, "metadata checksum");
        }
    }
}

/// Headers with a valid checksum whose offsets and lengths are wrong: each is refused before
/// anything is allocated for it.
#[test]
fn resealed_header_fields() {
    let s = &samples(1)[0];
    let h = &s.header;
    let n = s.bytes.len() as u64;
    type Set = fn(&mut Header, u64);
    let fields: [(&str, Set, u64); 5] = [
        ("data_off", |h, v| h.data_off = v, h.data_off),
        ("data_len", |h, v| h.data_len = v, h.data_len),
        ("meta_off", |h, v| h.meta_off = v, h.meta_off),
        ("meta_len", |h, v| h.meta_len = v, h.meta_len),
        ("meta_crc", |h, v| h.meta_crc = v as u32, h.meta_crc as u64),
    ];
    let mut rng = Rng(seed());
    for (name, set, old) in fields {
        let mut values = vec![0, 1, PAGE_SIZE - 1, PAGE_SIZE, n, n + 1, n + PAGE_SIZE];
        values.extend([
            old ^ 1,
            old + PAGE_SIZE,
            old.wrapping_sub(PAGE_SIZE),
            1 << 40,
        ]);
        values.extend([u64::MAX, u64::MAX - PAGE_SIZE + 1, i64::MAX as u64]);
        values.extend((0..20).map(|_| rng.nasty(old)));
        for v in values {
            let _case = Case(format!("header {name} = {v:#x} (was {old:#x})"));
            let mut hh = h.clone();
            set(&mut hh, v);
            let mut b = s.bytes.clone();
            reseal_header(&mut b, &hh);
            // Harmless only if it changes nothing that matters: check() holds any accepted
            // image to the rules.
            let _ = check(&b);
        }
    }
    // Precise errors for the classic cases.
    let cases: [(Set, u64, &str); 9] = [
        (|h, v| h.data_off = v, 100, "layout"),
        (|h, v| h.data_off = v, 0, "layout"),
        (|h, v| h.data_len = v, 1, "layout"),
        (|h, v| h.data_len = v, u64::MAX - PAGE_SIZE + 1, "layout"),
        (|h, v| h.meta_off = v, u64::MAX, "layout"),
        (|h, v| h.meta_len = v, 1 << 40, "layout"),
        (|h, v| h.meta_len = v, 1 << 20, "truncated metadata"),
        (|h, v| h.meta_len = v, 0, "layout"),
        (
            |h, v| h.meta_crc = v as u32,
            0x1234_5678,
            "metadata checksum",
        ),
    ];
    for (set, v, want) in cases {
        let _case = Case(format!("resealed header, value {v:#x}"));
        let mut hh = h.clone();
        set(&mut hh, v);
        let mut b = s.bytes.clone();
        reseal_header(&mut b, &hh);
        expect_kind(&b, want);
    }
    // Page data said to end past the file: the page data is what is truncated.
    let mut hh = h.clone();
    hh.data_len = n.next_multiple_of(PAGE_SIZE);
    hh.meta_off = hh.data_off + hh.data_len;
    let mut b = s.bytes.clone();
    reseal_header(&mut b, &hh);
    expect_kind(&b, "truncated page data");
}

/// A file claiming a metadata section of hundreds of MiB, which it has (sparse): the reader
/// checksums it in chunks and refuses it without holding it.
#[test]
fn huge_metadata_claim_is_not_allocated() {
    let s = &samples(1)[0];
    let mut h = s.header.clone();
    h.meta_len = 300 << 20;
    let path = scratch_path();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&h.encode()).unwrap();
    f.write_all(&s.bytes[PAGE_SIZE as usize..]).unwrap();
    f.set_len(h.meta_off + h.meta_len).unwrap();
    drop(f);
    let (r, peak) = peak_of(|| Image::open(&path).map(|_| ()));
    let _ = std::fs::remove_file(&path);
    assert_eq!(kind(&r.unwrap_err()), "metadata checksum");
    assert!(peak <= MEMORY_BOUND, "allocated {peak} bytes");
    // More metadata than any reader accepts: refused from the header alone.
    h.meta_len = snapshim_image::MAX_METADATA + 1;
    let path = scratch_path();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&h.encode()).unwrap();
    f.set_len(h.meta_off + h.meta_len).unwrap();
    drop(f);
    let r = Image::open(&path);
    let _ = std::fs::remove_file(&path);
    let e = r.unwrap_err();
    assert_eq!(kind(&e), "layout", "{e}");
}

/// Files that are no image, or an image of another kind.
#[test]
fn foreign_files() {
    let s = &samples(1)[0];
    expect_kind(&[], "truncated header");
    expect_kind(b"SNAP", "truncated header");
    expect_kind(b"\x7fELF\x02\x01\x01", "magic");
    let mut rng = Rng(seed());
    for len in [1, 8, 100, 4096, 10_000] {
        let mut garbage = rng.bytes(len);
        garbage[0] = 0x7f; // not a prefix of the magic, whatever the seed
        expect_kind(&garbage, "magic");
        let mut magic = b"SNAPSHIM".to_vec();
        magic.extend(&garbage);
        let e = check(&magic).unwrap_err();
        assert!(
            ["arch", "truncated header"].contains(&kind(&e).as_str()),
            "{e}"
        );
    }
    let mut b = s.bytes.clone();
    b[H_ARCH..H_ARCH + 8].copy_from_slice(b"aarch64\0");
    let e = expect_kind(&b, "arch");
    assert_eq!(
        e.to_string(),
        "image was taken on aarch64; this machine is x86_64"
    );
    b[H_ARCH..H_ARCH + 8].copy_from_slice(b"\xff\x01x\0\0\0\0\0");
    let e = expect_kind(&b, "arch");
    assert_eq!(
        e.to_string(),
        "image was taken on \\xff\\x01x; this machine is x86_64"
    );
    for (major, minor, word) in [
        (9, 0, "newer"),
        (1, VERSION_MINOR + 1, "newer"),
        (0, 9, "older"),
    ] {
        let mut b = s.bytes.clone();
        b[H_MAJOR..H_MAJOR + 2].copy_from_slice(&u16::to_le_bytes(major));
        b[H_MAJOR + 2..H_MAJOR + 4].copy_from_slice(&u16::to_le_bytes(minor));
        let e = expect_kind(&b, "version").to_string();
        assert!(
            e.contains(&format!(
                "version {major}.{minor} is {word} than this build reads (1.0"
            )),
            "{e}"
        );
    }
}

/// Metadata that passes its checksum (a buggy writer, a crafted file) but describes something
/// impossible: each is refused with a message naming what is wrong.
#[test]
fn inconsistent_metadata() {
    for s in samples(5) {
        let m = &s.meta;
        let (r0, r1) = (m.regions[0].clone(), m.regions[1].clone());
        let run0 = m.runs[0];
        let last_end = m.regions[m.regions.len() - 1].end;
        let stack = m.regions.iter().position(|r| r.name == "[stack]").unwrap();
        let vdso = m.regions.iter().position(|r| r.name == "[vdso]").unwrap();
        let shared = m.regions.iter().position(|r| r.shared).unwrap();
        let data_end = s.header.data_off + s.header.data_len;
        type Change = Box<dyn Fn(&mut Metadata)>;
        let cases: Vec<(&str, Change, &[&str])> = vec![
            (
                "regions overlap",
                Box::new(move |m| m.regions[1].start = r0.start),
                &["overlaps"],
            ),
            (
                "regions out of order",
                Box::new(move |m| m.regions.swap(0, 1)),
                &["precedes"],
            ),
            (
                "region unaligned",
                Box::new(move |m| m.regions[1].end = r1.end + 8),
                &["page-aligned"],
            ),
            (
                "region empty",
                Box::new(move |m| m.regions[1].end = r1.start),
                &["empty"],
            ),
            (
                "region backwards",
                Box::new(move |m| m.regions[1].end = r1.start - PAGE_SIZE),
                &["empty"],
            ),
            (
                "run past every region",
                Box::new(move |m| m.runs[0].addr = last_end + 16 * PAGE_SIZE),
                &["not inside one region"],
            ),
            (
                "run at the top of memory",
                Box::new(|m| m.runs[0].addr = u64::MAX - PAGE_SIZE + 1),
                &["not inside one region"],
            ),
            (
                "run unaligned",
                Box::new(move |m| m.runs[0].addr = run0.addr + 8),
                &["not page-aligned"],
            ),
            (
                "run file offset unaligned",
                Box::new(move |m| m.runs[0].file_off = run0.file_off + 1),
                &["not page-aligned"],
            ),
            (
                "run before the page data",
                Box::new(|m| m.runs[0].file_off = 0),
                &["outside the page data"],
            ),
            (
                "run after the page data",
                Box::new(move |m| m.runs[0].file_off = data_end),
                &["outside the page data"],
            ),
            (
                "run file offset overflows",
                Box::new(|m| m.runs[0].file_off = u64::MAX - PAGE_SIZE + 1),
                &["outside the page data"],
            ),
            (
                "run of 0 pages",
                Box::new(|m| m.runs[0].pages = 0),
                &["impossible size"],
            ),
            (
                "run size overflows",
                Box::new(|m| m.runs[0].pages = u64::MAX / PAGE_SIZE + 1),
                &["impossible size"],
            ),
            (
                "run of 2^52 pages",
                Box::new(|m| m.runs[0].pages = 1 << 51),
                &["outside the page data"],
            ),
            (
                "run stored twice",
                Box::new(move |m| m.runs.push(run0)),
                &["both hold the memory"],
            ),
            (
                "runs share file bytes",
                Box::new(move |m| {
                    let other = m
                        .runs
                        .iter()
                        .position(|r| r.addr != run0.addr && r.pages >= run0.pages);
                    match other {
                        Some(i) => m.runs[i].file_off = run0.file_off,
                        // Only one run: a second one elsewhere in memory, on the same file bytes.
                        None => m.runs.push(PageRun {
                            addr: m.regions[stack].end - PAGE_SIZE,
                            ..run0
                        }),
                    }
                }),
                &[
                    "both hold the file bytes",
                    "both hold the memory",
                    "outside the page data",
                ],
            ),
            (
                "region in the reserved range",
                Box::new(|m| {
                    let i = m.regions.partition_point(|r| r.end <= RESERVED_START);
                    m.regions
                        .insert(i, anon(RESERVED_START + PAGE_SIZE, 1, 3, ""));
                }),
                &["snapshim keeps for the restorer"],
            ),
            (
                "region at address 0",
                Box::new(|m| m.regions.insert(0, anon(0, 1, 3, ""))),
                &["outside the user address space"],
            ),
            (
                "region past user space",
                Box::new(|m| m.regions.push(anon(USER_END, 1, 3, ""))),
                &["outside the user address space"],
            ),
            (
                "unknown protection",
                Box::new(|m| m.regions[0].prot |= 0x10),
                &["unknown protection bits"],
            ),
            (
                "file offset unaligned",
                Box::new(|m| {
                    if let RegionKind::File { offset, .. } = &mut m.regions[0].kind {
                        *offset += 1
                    }
                }),
                &["page boundary"],
            ),
            (
                "pages stored for the vDSO",
                Box::new(move |m| {
                    let r = m.regions[vdso].clone();
                    m.runs[0].addr = r.start;
                    m.runs[0].pages = 1;
                }),
                &["never stored", "both hold the memory"],
            ),
            (
                "pages stored for a shared file",
                Box::new(move |m| {
                    let r = m.regions[shared].clone();
                    m.runs[0].addr = r.start;
                    m.runs[0].pages = 1;
                }),
                &["never stored", "both hold the memory"],
            ),
            (
                "no threads",
                Box::new(|m| m.threads.clear()),
                &["no threads"],
            ),
            (
                "resume address 0",
                Box::new(|m| m.shim.resume_addr = 0),
                &["resume address"],
            ),
            (
                "resume address in data",
                Box::new(move |m| m.shim.resume_addr = m.regions[stack].start),
                &["resume address"],
            ),
            (
                "stack pointer nowhere",
                Box::new(|m| m.threads[0].ctx_rsp = 8),
                &["saved stack pointer"],
            ),
            (
                "stack pointer in code",
                Box::new(move |m| m.threads[0].ctx_rsp = m.shim.resume_addr),
                &["saved stack pointer"],
            ),
            (
                "negative descriptor",
                Box::new(|m| m.fds[0].fd = -1),
                &["out of range"],
            ),
            (
                "descriptor i32::MAX",
                Box::new(|m| m.fds[0].fd = i32::MAX),
                &["out of range"],
            ),
            (
                "descriptor twice",
                Box::new(|m| m.fds[1].fd = 0),
                &["appears twice"],
            ),
        ];
        for (what, change, mentions) in cases {
            let _case = Case(format!("inconsistent metadata: {what}"));
            expect_inconsistent(&with_meta(&s, change), mentions);
        }
        // A run's checksum in the metadata, resealed: the page data no longer matches.
        let b = with_meta(&s, |m| m.runs[0].crc ^= 1);
        expect_kind(&b, "run 0 checksum");
        // Metadata that passes its checksum but does not decode, or has bytes left over.
        let (mb, _) = encode_metadata(&s.meta);
        for bad in [&mb[..mb.len() / 2], &mb[..1], &[0xffu8; 40][..]] {
            expect_kind(&reseal_meta(&s, bad), "decode");
        }
        let mut longer = mb.clone();
        longer.push(0);
        let e = expect_kind(&reseal_meta(&s, &longer), "decode").to_string();
        assert!(e.contains("1 bytes left over"), "{e}");
    }
}

/// Every kind of damage reads differently: the words of a kind's message (before its first
/// number) are its own.
#[test]
fn each_kind_of_damage_has_its_own_message() {
    let s = &samples(1)[0];
    let flip = |at: usize| {
        let mut b = s.bytes.clone();
        b[at] ^= 0x20;
        b
    };
    let mut layout = s.header.clone();
    layout.data_off = 100;
    let mut bad_layout = s.bytes.clone();
    reseal_header(&mut bad_layout, &layout);
    let run = s.meta.runs[0];
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("truncated header", vec![]),
        ("truncated header", s.bytes[..100].to_vec()),
        (
            "truncated page data",
            s.bytes[..PAGE_SIZE as usize + 10].to_vec(),
        ),
        ("truncated metadata", s.bytes[..s.bytes.len() - 1].to_vec()),
        ("magic", flip(0)),
        ("arch", flip(H_ARCH)),
        ("version", flip(H_MAJOR)),
        ("header checksum", flip(30)),
        ("layout", bad_layout),
        ("metadata checksum", flip(s.header.meta_off as usize)),
        ("decode", reseal_meta(s, &[1, 2, 3])),
        ("inconsistent", with_meta(s, |m| m.threads.clear())),
        ("run 0 checksum", flip(run.file_off as usize)),
    ];
    let mut seen: Vec<(&str, String)> = Vec::new();
    for (want, b) in damaged {
        let msg = expect_kind(&b, want).to_string();
        eprintln!("{want:>20}: {msg}");
        let head: String = msg.chars().take_while(|c| !c.is_ascii_digit()).collect();
        for (other, h) in &seen {
            assert!(
                *other == want || *h != head,
                "{want} reads like {other}: {msg}"
            );
        }
        seen.push((want, head));
    }
}

/// Random damage, one to three mutations at a time, on random realistic images. The seed and
/// iteration of a failure are printed.
#[test]
fn random_mutations_never_crash_or_pass_damage() {
    let seed = seed();
    let iters = iterations();
    eprintln!("random mutations: seed {seed:#x}, {iters} iterations");
    let mut rng = Rng(seed);
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    for it in 0..iters {
        let s = generate(&mut rng);
        let mut b = s.bytes.clone();
        let mut log = Vec::new();
        for _ in 0..1 + rng.below(3) {
            log.push(mutate(&mut rng, &s, &mut b));
        }
        let _case = Case(format!("seed {seed:#x} iteration {it}: {}", log.join("; ")));
        let k = match check(&b) {
            Ok(_) => "accepted".to_string(),
            Err(e) => kind(&e),
        };
        let k = if k.starts_with("run ") {
            "run checksum".into()
        } else {
            k
        };
        *outcomes.entry(k).or_default() += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    // The loop reached every layer of the reader, not just the first check.
    for k in [
        "magic",
        "header checksum",
        "metadata checksum",
        "run checksum",
        "inconsistent",
    ] {
        assert!(
            outcomes.contains_key(k),
            "no mutant reached {k}: {outcomes:?}"
        );
    }
}

/// One random mutation of `b` (which started as `s.bytes`); returns what it did.
fn mutate(rng: &mut Rng, s: &Sample, b: &mut Vec<u8>) -> String {
    let len = b.len().max(1);
    match rng.below(12) {
        0 if !b.is_empty() => {
            // Often in the header's fields: they are few bytes of a large file.
            let span = if rng.chance(50) {
                b.len().min(H_END)
            } else {
                b.len()
            };
            let (at, bit) = (rng.index(span), rng.below(8));
            b[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        1 if !b.is_empty() => {
            let at = rng.index(b.len());
            b[at] = rng.next() as u8;
            format!("set byte {at}")
        }
        2 => {
            let to = rng.index(len);
            b.truncate(to);
            format!("truncate to {to}")
        }
        3 => {
            let n = rng.index(5000);
            b.extend(rng.bytes(n));
            format!("append {n} bytes")
        }
        4 if !b.is_empty() => {
            let at = rng.index(b.len());
            let n = rng.index(len - at).min(64);
            b.drain(at..at + n);
            format!("delete {n} bytes at {at}")
        }
        5 => {
            let at = rng.index(len);
            let n = 1 + rng.index(64);
            let ins = rng.bytes(n);
            b.splice(at.min(b.len())..at.min(b.len()), ins);
            format!("insert {n} bytes at {at}")
        }
        6 if b.len() > 16 => {
            let at = rng.index(b.len() - 8);
            let v = rng.nasty(0);
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            format!("write {v:#x} at {at}")
        }
        7 | 8 if b.len() >= PAGE_SIZE as usize => {
            // A header with a valid checksum and one field changed.
            let mut h =
                Header::decode(&b[..PAGE_SIZE as usize]).unwrap_or_else(|_| s.header.clone());
            let (name, v) = match rng.below(6) {
                0 => ("data_off", h.data_off),
                1 => ("data_len", h.data_len),
                2 => ("meta_off", h.meta_off),
                3 => ("meta_len", h.meta_len),
                4 => ("meta_crc", h.meta_crc as u64),
                _ => ("flags", h.flags as u64),
            };
            let v = rng.nasty(v);
            match name {
                "data_off" => h.data_off = v,
                "data_len" => h.data_len = v,
                "meta_off" => h.meta_off = v,
                "meta_len" => h.meta_len = v,
                "meta_crc" => h.meta_crc = v as u32,
                _ => h.flags = v as u32,
            }
            reseal_header(&mut b[..], &h);
            format!("resealed header {name} = {v:#x}")
        }
        9 | 10 => {
            // Metadata bytes edited and resealed: what a buggy writer produces.
            let (mut mb, _) = encode_metadata(&s.meta);
            let edits = 1 + rng.below(4);
            for _ in 0..edits {
                let at = rng.index(mb.len());
                match rng.below(3) {
                    0 => mb[at] ^= 1 << rng.below(8),
                    1 => mb[at] = rng.nasty(0) as u8,
                    _ => mb[at] = 0xff,
                }
            }
            *b = reseal_meta(s, &mb);
            format!("{edits} resealed metadata edits")
        }
        _ => {
            // One numeric field of the metadata set to a nasty value, resealed.
            let mut m = s.meta.clone();
            let what = match rng.below(8) {
                0 => {
                    let i = rng.index(m.runs.len());
                    m.runs[i].pages = rng.nasty(m.runs[i].pages);
                    "run pages"
                }
                1 => {
                    let i = rng.index(m.runs.len());
                    m.runs[i].addr = rng.nasty(m.runs[i].addr);
                    "run addr"
                }
                2 => {
                    let i = rng.index(m.runs.len());
                    m.runs[i].file_off = rng.nasty(m.runs[i].file_off);
                    "run file_off"
                }
                3 => {
                    let i = rng.index(m.regions.len());
                    m.regions[i].start = rng.nasty(m.regions[i].start);
                    "region start"
                }
                4 => {
                    let i = rng.index(m.regions.len());
                    m.regions[i].end = rng.nasty(m.regions[i].end);
                    "region end"
                }
                5 => {
                    let i = rng.index(m.threads.len());
                    m.threads[i].ctx_rsp = rng.nasty(m.threads[i].ctx_rsp);
                    "thread ctx_rsp"
                }
                6 => {
                    m.shim.resume_addr = rng.nasty(m.shim.resume_addr);
                    "resume_addr"
                }
                _ => {
                    let i = rng.index(m.fds.len());
                    m.fds[i].fd = rng.nasty(m.fds[i].fd as u64) as i32;
                    "fd"
                }
            };
            *b = reseal_meta(s, &encode_metadata(&m).0);
            format!("resealed metadata with a nasty {what}")
        }
    }
}
