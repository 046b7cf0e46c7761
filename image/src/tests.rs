//! Every rejection path corrupts one thing and checks the precise error.
use super::*;
use std::io::Write;

pub(crate) fn sample_meta(runs: Vec<PageRun>) -> Metadata {
    Metadata {
        process: Process {
            pid: 42,
            name: "t".into(),
            ..Default::default()
        },
        shim: ShimInfo::default(),
        threads: vec![],
        regions: vec![Region {
            start: 0x10000,
            end: 0x14000,
            prot: 3,
            shared: false,
            kind: RegionKind::Anon,
            name: String::new(),
        }],
        runs,
        fds: vec![],
        clock_boottime_ns: 0x1234_5678_9abc,
        build_ids: vec![],
        vdso: Default::default(),
        parent: None,
        inherited: Vec::new(),
        merged_from: None,
        lineage: None,
        credentials: Vec::new(),
    }
}

/// Writes a valid image with two pages of data and returns its bytes.
fn sample_image() -> Vec<u8> {
    sample_image_with(encode_metadata, VERSION_MINOR)
}

/// The same image, its metadata encoded by `encode` and its header saying `1.minor`.
fn sample_image_with(encode: impl Fn(&Metadata) -> (Vec<u8>, u32), minor: u16) -> Vec<u8> {
    let data: Vec<u8> = (0..2 * PAGE_SIZE as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let run = PageRun {
        addr: 0x11000,
        pages: 2,
        file_off: PAGE_SIZE,
        crc: crc32fast::hash(&data),
    };
    image_bytes(&sample_meta(vec![run]), &data, encode, minor)
}

/// A whole image file: header page saying `1.minor`, `data`, then `meta` encoded by `encode`.
pub(crate) fn image_bytes(
    meta: &Metadata,
    data: &[u8],
    encode: impl Fn(&Metadata) -> (Vec<u8>, u32),
    minor: u16,
) -> Vec<u8> {
    let (meta, meta_crc) = encode(meta);
    let mut h = Header::new(7, 1);
    h.minor = minor;
    h.data_len = data.len() as u64;
    h.meta_off = PAGE_SIZE + h.data_len;
    h.meta_len = meta.len() as u64;
    h.meta_crc = meta_crc;
    let mut out = h.encode();
    out.extend_from_slice(data);
    out.extend_from_slice(&meta);
    out
}

fn open_bytes(bytes: &[u8]) -> Result<Image, ImageError> {
    let dir = std::env::temp_dir().join(format!("snapshim-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!(
        "{:x}.snap",
        crc32fast::hash(bytes) ^ bytes.len() as u32
    ));
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    let r = Image::open(&p).and_then(|img| img.verify_pages().map(|_| img));
    let _ = std::fs::remove_file(&p);
    r
}

#[test]
fn valid_image_round_trips() {
    let img = open_bytes(&sample_image()).unwrap();
    assert_eq!(img.meta.process.pid, 42);
    assert_eq!(img.stored_bytes(), 2 * PAGE_SIZE);
}

#[test]
fn bad_magic_is_refused() {
    let mut b = sample_image();
    b[0] = b'X';
    assert!(matches!(open_bytes(&b), Err(ImageError::BadMagic)));
}

#[test]
fn foreign_architecture_is_named() {
    let mut b = sample_image();
    b[8..16].copy_from_slice(b"aarch64\0");
    let e = open_bytes(&b).unwrap_err();
    assert_eq!(
        e.to_string(),
        "image was taken on aarch64; this machine is x86_64"
    );
}

#[test]
fn newer_version_is_refused_with_its_number() {
    for (major, minor) in [(VERSION_MAJOR + 1, 0), (VERSION_MAJOR, VERSION_MINOR + 1)] {
        let mut b = sample_image();
        b[16..18].copy_from_slice(&major.to_le_bytes());
        b[18..20].copy_from_slice(&minor.to_le_bytes());
        let e = open_bytes(&b).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedVersion { .. }), "{e}");
        assert!(e.to_string().contains(&format!("{major}.{minor}")), "{e}");
    }
}

#[test]
fn header_bit_flip_is_caught() {
    let mut b = sample_image();
    b[50] ^= 1;
    assert!(matches!(open_bytes(&b), Err(ImageError::HeaderChecksum)));
}

#[test]
fn truncated_image_is_caught() {
    let b = sample_image();
    for len in [0, 100, PAGE_SIZE as usize, b.len() - 1] {
        let e = open_bytes(&b[..len]).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "len {len}: {e}");
    }
}

#[test]
fn metadata_bit_flip_is_caught() {
    let mut b = sample_image();
    let n = b.len();
    b[n - 3] ^= 0x40;
    assert!(matches!(open_bytes(&b), Err(ImageError::MetadataChecksum)));
}

#[test]
fn page_bit_flip_is_caught() {
    let mut b = sample_image();
    b[PAGE_SIZE as usize + 5000] ^= 0x01;
    assert!(matches!(
        open_bytes(&b),
        Err(ImageError::RunChecksum {
            index: 0,
            addr: 0x11000,
            ..
        })
    ));
}

#[test]
fn every_single_byte_flip_is_refused_or_harmless() {
    // No flip may panic; a flip in the header, data or metadata must be reported.
    let b = sample_image();
    for i in (0..b.len()).step_by(7) {
        let mut c = b.clone();
        c[i] ^= 0x10;
        let inside_header_padding = (H_END..PAGE_SIZE as usize).contains(&i);
        if open_bytes(&c).is_ok() {
            assert!(inside_header_padding, "flip at {i} went unnoticed");
        }
    }
}

/// Format 1.0 had no `clock_boottime_ns`: such an image still opens, the field reading 0.
#[test]
fn older_minor_version_still_loads() {
    #[derive(Serialize)]
    struct V1_0<'a> {
        process: &'a Process,
        shim: &'a ShimInfo,
        threads: &'a Vec<ThreadState>,
        regions: &'a Vec<Region>,
        runs: &'a Vec<PageRun>,
        fds: &'a Vec<FdState>,
    }
    let old = |m: &Metadata| {
        let bytes = postcard::to_allocvec(&V1_0 {
            process: &m.process,
            shim: &m.shim,
            threads: &m.threads,
            regions: &m.regions,
            runs: &m.runs,
            fds: &m.fds,
        })
        .unwrap();
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    };
    let img = open_bytes(&sample_image_with(old, 0)).unwrap();
    assert_eq!(img.header.minor, 0);
    assert_eq!(img.meta.process.pid, 42);
    assert_eq!(img.meta.clock_boottime_ns, 0);
    assert_eq!(img.stored_bytes(), 2 * PAGE_SIZE);
    let new = open_bytes(&sample_image()).unwrap();
    assert_eq!(new.meta.clock_boottime_ns, 0x1234_5678_9abc);
}

/// Format 1.1 had no build-ids and no vDSO record: such an image still opens, with both empty;
/// a 1.2 image keeps them.
#[test]
fn format_1_1_still_loads() {
    #[derive(Serialize)]
    struct V1_1<'a> {
        process: &'a Process,
        shim: &'a ShimInfo,
        threads: &'a Vec<ThreadState>,
        regions: &'a Vec<Region>,
        runs: &'a Vec<PageRun>,
        fds: &'a Vec<FdState>,
        clock_boottime_ns: u64,
    }
    let old = |m: &Metadata| {
        let bytes = postcard::to_allocvec(&V1_1 {
            process: &m.process,
            shim: &m.shim,
            threads: &m.threads,
            regions: &m.regions,
            runs: &m.runs,
            fds: &m.fds,
            clock_boottime_ns: m.clock_boottime_ns,
        })
        .unwrap();
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    };
    let img = open_bytes(&sample_image_with(old, 1)).unwrap();
    assert_eq!(img.header.minor, 1);
    assert_eq!(img.meta.clock_boottime_ns, 0x1234_5678_9abc);
    assert!(img.meta.build_ids.is_empty() && img.meta.vdso == VdsoImage::default());
    // The 1.1 shape is not accepted as 1.2: the fields it lacks are missing.
    assert!(open_bytes(&sample_image_with(old, 2)).is_err());
    let with = |m: &Metadata| {
        let mut m = m.clone();
        m.build_ids.push(BuildId {
            path: "/lib/x.so".into(),
            id: vec![1, 2, 3],
        });
        encode_metadata(&m)
    };
    let img = open_bytes(&sample_image_with(with, VERSION_MINOR)).unwrap();
    assert_eq!(img.meta.build_id_of("/lib/x.so"), Some(&[1u8, 2, 3][..]));
    assert_eq!(img.meta.build_id_of("/lib/y.so"), None);
}

/// A recorded vDSO must fit its one [vdso] region.
#[test]
fn recorded_vdso_must_fit_its_region() {
    let mut m = sample_meta(vec![]);
    m.threads.push(ThreadState {
        tid: 1,
        fs_base: 0,
        ctx_rsp: 0x10008,
        robust_head: 0,
        robust_len: 0,
        altstack_sp: 0,
        altstack_flags: 0,
        altstack_size: 0,
        sigmask: 0,
        name: String::new(),
        helper: false,
    });
    m.regions[0].prot = 7;
    m.shim.resume_addr = 0x10000;
    m.regions.push(Region {
        start: 0x20000,
        end: 0x22000,
        prot: 5,
        shared: false,
        kind: RegionKind::Vdso,
        name: "[vdso]".into(),
    });
    m.vdso.bytes = vec![0; 0x2000];
    m.vdso.symbols.push(VdsoSymbol {
        name: "__vdso_time".into(),
        offset: 0x1ff0,
        size: 0x10,
    });
    m.validate().unwrap();
    let mut far = m.clone();
    far.vdso.symbols[0].offset = u64::MAX;
    let e = far.validate().unwrap_err().to_string();
    assert!(e.contains("vDSO symbol __vdso_time"), "{e}");
    let mut big = m.clone();
    big.vdso.bytes.push(0);
    let e = big.validate().unwrap_err().to_string();
    assert!(e.contains("recorded vDSO is 8193 bytes"), "{e}");
    let mut none = m.clone();
    none.regions.pop();
    let e = none.validate().unwrap_err().to_string();
    assert!(e.contains("not exactly one [vdso] region"), "{e}");
}

/// An image value for chain logic only (its file is /dev/null).
fn chain_member(runs: Vec<PageRun>, inherited: Vec<PageSpan>) -> Image {
    let mut meta = sample_meta(runs);
    meta.regions[0].end = 0x30000;
    meta.inherited = inherited;
    Image {
        path: PathBuf::from("x"),
        file: File::open("/dev/null").unwrap(),
        file_len: 0,
        header: Header::new(1, 0),
        meta,
    }
}

fn run(addr: u64, pages: u64, file_off: u64) -> PageRun {
    PageRun {
        addr,
        pages,
        file_off,
        crc: 0,
    }
}

/// Each page comes from the newest image that stores it; inherited pages that no ancestor
/// stores are absent; pages neither stored nor inherited never look further down.
#[test]
fn chain_sources_take_each_page_from_the_newest_image_storing_it() {
    let span = |addr, pages| PageSpan { addr, pages };
    // Full image: pages 0x10000..0x18000 (8 pages) at file offset 4096.
    let full = chain_member(vec![run(0x10000, 8, 4096)], vec![]);
    // Delta 1: rewrote 0x12000 (1 page); inherits 0x10000..0x12000 and 0x13000..0x16000;
    // 0x16000..0x18000 was discarded (neither).
    let d1 = chain_member(
        vec![run(0x12000, 1, 4096)],
        vec![span(0x10000, 2), span(0x13000, 3)],
    );
    // Delta 2 (head): rewrote 0x11000; inherits 0x10000 and 0x12000..0x18000.
    let d2 = chain_member(
        vec![run(0x11000, 1, 4096)],
        vec![span(0x10000, 1), span(0x12000, 6)],
    );
    let chain = Chain {
        images: vec![d2, d1, full],
    };
    let got: Vec<(usize, u64, u64, u64)> = chain
        .sources()
        .iter()
        .map(|r| (r.image, r.addr, r.pages, r.file_off))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, 0x10000, 1, 4096),
            (0, 0x11000, 1, 4096),
            (1, 0x12000, 1, 4096),
            (2, 0x13000, 3, 4096 + 3 * 4096),
        ]
    );
}

/// An image of `meta` (its runs must hold no data) with `flags` and `parent_id` in the header.
fn image_of(meta: &Metadata, flags: u32, parent_id: u64) -> Vec<u8> {
    let (bytes, crc) = encode_metadata(meta);
    let mut h = Header::new(9, 1);
    h.flags = flags;
    h.parent_id = parent_id;
    h.meta_off = PAGE_SIZE;
    h.meta_len = bytes.len() as u64;
    h.meta_crc = crc;
    let mut out = h.encode();
    out.extend_from_slice(&bytes);
    out
}

/// Format 1.1 and 1.2 images (metadata up to `clock_boottime_ns`) load as full images.
#[test]
fn format_1_1_image_loads_as_a_full_image() {
    #[derive(Serialize)]
    struct V1_1<'a> {
        process: &'a Process,
        shim: &'a ShimInfo,
        threads: &'a Vec<ThreadState>,
        regions: &'a Vec<Region>,
        runs: &'a Vec<PageRun>,
        fds: &'a Vec<FdState>,
        clock_boottime_ns: u64,
    }
    let old = |m: &Metadata| {
        let bytes = postcard::to_allocvec(&V1_1 {
            process: &m.process,
            shim: &m.shim,
            threads: &m.threads,
            regions: &m.regions,
            runs: &m.runs,
            fds: &m.fds,
            clock_boottime_ns: m.clock_boottime_ns,
        })
        .unwrap();
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    };
    let img = open_bytes(&sample_image_with(old, 1)).unwrap();
    assert_eq!(img.meta.clock_boottime_ns, 0x1234_5678_9abc);
    assert!(img.meta.parent.is_none() && img.meta.inherited.is_empty());
    assert!(img.meta.merged_from.is_none());
}

/// A format 1.3 image (metadata up to `merged_from`) loads, with no credentials recorded;
/// credentials round-trip in this format.
#[test]
fn format_1_3_image_loads_without_credentials() {
    #[derive(Serialize)]
    struct V1_3<'a> {
        process: &'a Process,
        shim: &'a ShimInfo,
        threads: &'a Vec<ThreadState>,
        regions: &'a Vec<Region>,
        runs: &'a Vec<PageRun>,
        fds: &'a Vec<FdState>,
        clock_boottime_ns: u64,
        build_ids: &'a Vec<BuildId>,
        vdso: &'a VdsoImage,
        parent: &'a Option<ParentRef>,
        inherited: &'a Vec<PageSpan>,
        merged_from: &'a Option<MergedFrom>,
    }
    let old = |m: &Metadata| {
        let bytes = postcard::to_allocvec(&V1_3 {
            process: &m.process,
            shim: &m.shim,
            threads: &m.threads,
            regions: &m.regions,
            runs: &m.runs,
            fds: &m.fds,
            clock_boottime_ns: m.clock_boottime_ns,
            build_ids: &m.build_ids,
            vdso: &m.vdso,
            parent: &m.parent,
            inherited: &m.inherited,
            merged_from: &m.merged_from,
        })
        .unwrap();
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    };
    let img = open_bytes(&sample_image_with(old, 3)).unwrap();
    assert_eq!(img.header.minor, 3);
    assert_eq!(img.meta.clock_boottime_ns, 0x1234_5678_9abc);
    assert!(img.meta.credentials.is_empty());

    let creds = Credentials {
        tid: 42,
        uid: [65534, 65534, 0],
        gid: [65534; 3],
        groups: vec![65534, 27],
    };
    let with = |m: &Metadata| {
        let mut m = m.clone();
        m.credentials = vec![creds.clone()];
        encode_metadata(&m)
    };
    let img = open_bytes(&sample_image_with(with, VERSION_MINOR)).unwrap();
    assert_eq!(img.meta.credentials, vec![creds.clone()]);
}

/// Each inconsistency of the 1.3 fields is refused with its own reason.
#[test]
fn delta_fields_are_checked() {
    let parent = ParentRef {
        image_id: 5,
        meta_crc: 1,
        file: "ckpt-00000001.snap".into(),
    };
    let delta = |inherited: Vec<PageSpan>, file: &str| {
        let mut m = sample_meta(vec![]);
        m.parent = Some(ParentRef {
            file: file.into(),
            ..parent.clone()
        });
        m.inherited = inherited;
        m
    };
    let span = |addr, pages| PageSpan { addr, pages };
    let ok = delta(vec![span(0x10000, 2)], "ckpt-00000001.snap");
    open_bytes(&image_of(&ok, FLAG_DELTA, 5)).unwrap();
    let refused = |bytes: Vec<u8>, why: &str| match open_bytes(&bytes) {
        Err(ImageError::Inconsistent(m)) if m.contains(why) => {}
        other => panic!("expected {why:?}, got {other:?}"),
    };
    refused(image_of(&ok, 0, 0), "says it is a full image");
    refused(image_of(&ok, FLAG_DELTA, 6), "names 0000000000000006");
    refused(
        image_of(&sample_meta(vec![]), FLAG_DELTA, 5),
        "without a parent",
    );
    refused(
        image_of(&delta(vec![], "../x.snap"), FLAG_DELTA, 5),
        "not a plain file name",
    );
    refused(
        image_of(&delta(vec![span(0x13000, 2)], "p.snap"), FLAG_DELTA, 5),
        "not inside one region",
    );
    refused(
        image_of(
            &delta(vec![span(0x12000, 1), span(0x10000, 1)], "p.snap"),
            FLAG_DELTA,
            5,
        ),
        "out of order",
    );
    let mut full = sample_meta(vec![]);
    full.inherited = vec![span(0x10000, 1)];
    refused(image_of(&full, 0, 0), "full image with inherited pages");
}

/// A 1.3 image (no lineage record) still loads, without a lineage; a 1.4 image carries its
/// lineage; and a lineage record is not accepted in a 1.3 image.
#[test]
fn lineage_is_appended_in_format_1_4() {
    let v1_3 = |m: &Metadata| {
        let bytes = postcard::to_allocvec(m).unwrap();
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    };
    let img = open_bytes(&sample_image_with(v1_3, 3)).unwrap();
    assert_eq!(img.meta.lineage, None);
    let with = |m: &Metadata| {
        let mut m = m.clone();
        m.lineage = Some(crate::lineage::Lineage {
            id: 5,
            generation: 2,
            instance: 9,
            origin: Some(crate::lineage::Origin {
                file: "ckpt-00000001.snap".into(),
                image_id: 77,
                lineage: 5,
                generation: 1,
            }),
        });
        encode_metadata(&m)
    };
    let img = open_bytes(&sample_image_with(with, VERSION_MINOR)).unwrap();
    let l = img.meta.lineage.unwrap();
    assert_eq!((l.id, l.generation, l.instance), (5, 2, 9));
    assert_eq!(l.origin.unwrap().image_id, 77);
    assert!(open_bytes(&sample_image_with(with, 3)).is_err());
}
