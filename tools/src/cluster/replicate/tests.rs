//! The API in one process, on loopback, with small images made here (the end-to-end tests with
//! images of real programs are in testapps/tests/replicate.rs): what a push sends, what a
//! receiver keeps, what its gate and `newest` see.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshim_image::{
    image_file_name, Lineage, Metadata, PageRun, ParentRef, Process, Region, RegionKind, PAGE_SIZE,
};

use super::*;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("snapshim-repl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `dir/ckpt-SEQ.snap`: one page of data (a function of `id`), a delta of `parent`
/// when given; returns its metadata checksum.
fn write_image(dir: &Path, seq: u64, id: u64, parent: Option<(u64, u32)>, generation: u32) -> u32 {
    let data = vec![(id % 251) as u8 + 1; PAGE_SIZE as usize];
    let meta = Metadata {
        process: Process {
            pid: 42,
            name: "t".into(),
            ..Default::default()
        },
        regions: vec![Region {
            start: 0x10000,
            end: 0x14000,
            prot: 3,
            shared: false,
            kind: RegionKind::Anon,
            name: String::new(),
        }],
        runs: vec![PageRun {
            addr: 0x10000,
            pages: 1,
            file_off: PAGE_SIZE,
            crc: crc32fast::hash(&data),
        }],
        parent: parent.map(|(pid, crc)| ParentRef {
            image_id: pid,
            meta_crc: crc,
            file: image_file_name(seq - 1),
        }),
        lineage: Some(Lineage {
            id: 0x11,
            generation,
            instance: 0x22,
            origin: None,
        }),
        ..Default::default()
    };
    let t = snapshim_image::write::tail(&meta, id, 1000 + seq, PAGE_SIZE + PAGE_SIZE);
    let mut bytes = t.header.clone();
    bytes.extend_from_slice(&data);
    bytes.extend_from_slice(&t.meta);
    std::fs::write(dir.join(image_file_name(seq)), bytes).unwrap();
    snapshim_image::Header::decode(&t.header).unwrap().meta_crc
}

fn key() -> MacKey {
    MacKey { bytes: [9; 32] }
}

fn names(dir: &Path) -> Vec<String> {
    snapshim_image::list_images(dir)
        .unwrap_or_default()
        .iter()
        .map(|p| store::file_name(p))
        .collect()
}

fn start(store: &Path, gate: Gate, keep: usize) -> (Receiver, Arc<Mutex<Vec<Offer>>>) {
    let committed = Arc::new(Mutex::new(Vec::new()));
    let c = committed.clone();
    let opts = Options {
        keep,
        on_commit: Some(Arc::new(move |o: &Offer, _: &Path| {
            c.lock().unwrap().push(o.clone())
        })),
        ..Options::default()
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = Receiver::serve_with(l, key(), store.to_path_buf(), gate, opts).unwrap();
    (r, committed)
}

const T: Duration = Duration::from_secs(30);

/// Waits until the receiver's sessions have ended (a push returns when its last image is
/// acknowledged; the receiver tells `on_commit` after the acknowledgement).
fn settle(rx: &Receiver) {
    let deadline = std::time::Instant::now() + T;
    while rx.sessions() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a session never ended"
        );
        std::thread::yield_now();
    }
}

fn sent(r: &PushReport) -> Vec<String> {
    r.sent.iter().map(|s| s.file.clone()).collect()
}

#[test]
fn pushes_send_what_is_missing_and_retention_keeps_what_deltas_need() {
    let (src, store) = (tmpdir("src"), tmpdir("store"));
    let (rx, committed) = start(&store, Arc::new(|_: &Offer| Ok(())), 2);
    let to = rx.local_addr();
    let dst = store.join("svc");
    let c1 = write_image(&src, 1, 0x101, None, 1);
    let r = push(to, &key(), "svc", &src, T).unwrap();
    assert_eq!(sent(&r), ["ckpt-00000001.snap"]);
    let held = newest(&dst).unwrap();
    assert_eq!((held.seq, held.id, held.generation), (1, 0x101, 1));
    let c2 = write_image(&src, 2, 0x102, Some((0x101, c1)), 1);
    write_image(&src, 3, 0x103, Some((0x102, c2)), 1);
    let r = push(to, &key(), "svc", &src, T).unwrap();
    assert_eq!(sent(&r), ["ckpt-00000002.snap", "ckpt-00000003.snap"]);
    assert_eq!(r.acknowledged, [0x101, 0x102, 0x103]);
    // Keep 2: 2 and 3, and 1, which they need.
    assert_eq!(names(&dst).len(), 3);
    write_image(&src, 4, 0x104, None, 1);
    assert_eq!(
        sent(&push(to, &key(), "svc", &src, T).unwrap()),
        ["ckpt-00000004.snap"]
    );
    assert_eq!(names(&dst).len(), 4, "3 still needs 2 and 1");
    write_image(&src, 5, 0x105, None, 1);
    let r = push(to, &key(), "svc", &src, T).unwrap();
    assert_eq!(sent(&r), ["ckpt-00000005.snap"]);
    assert_eq!(names(&dst), ["ckpt-00000004.snap", "ckpt-00000005.snap"]);
    let latest = std::fs::read_link(dst.join("latest")).unwrap();
    assert_eq!(latest, Path::new("ckpt-00000005.snap"));
    // A re-push sends nothing.
    let r = push(to, &key(), "svc", &src, T).unwrap();
    assert!(r.sent.is_empty() && r.already.len() == 1);
    settle(&rx);
    let ids: Vec<u64> = committed.lock().unwrap().iter().map(|o| o.id).collect();
    assert_eq!(ids, [0x101, 0x102, 0x103, 0x104, 0x105]);
    assert_eq!(newest(&dst).unwrap().id, 0x105);
    rx.stop();
    assert!(std::net::TcpStream::connect(to).is_err(), "still accepting");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn retention_keeps_the_image_received_over_later_numbers_of_an_older_generation() {
    // A leader fenced after its last push wrote images 5..7 of generation 1 here; the new
    // leader (generation 2) restored image 3 elsewhere and pushes its image 4.
    let (src, store) = (tmpdir("src-gen"), tmpdir("store-gen"));
    let (rx, _) = start(&store, Arc::new(|_: &Offer| Ok(())), 3);
    let dst = store.join("svc");
    std::fs::create_dir_all(&dst).unwrap();
    for seq in 5..=7 {
        write_image(&dst, seq, 0x100 + seq, None, 1);
    }
    write_image(&src, 4, 0x204, None, 2);
    let r = push(rx.local_addr(), &key(), "svc", &src, T).unwrap();
    assert_eq!(r.acknowledged, [0x204]);
    // Kept: the image received, then the newest of generation 1.
    let held = names(&dst);
    assert!(held.contains(&"ckpt-00000004.snap".to_string()), "{held:?}");
    assert_eq!(held.len(), 3, "{held:?}");
    assert!(
        !held.contains(&"ckpt-00000005.snap".to_string()),
        "{held:?}"
    );
    rx.stop();
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn the_gate_sees_the_offer_and_its_refusal_reaches_the_sender() {
    let (src, store) = (tmpdir("gsrc"), tmpdir("gstore"));
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let gate: Gate = Arc::new(move |o: &Offer| {
        *s.lock().unwrap() = Some(o.clone());
        Err("stale generation".into())
    });
    let (rx, committed) = start(&store, gate, 3);
    write_image(&src, 7, 0x707, None, 4);
    let e = push(rx.local_addr(), &key(), "svc", &src, T).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the receiver refused ckpt-00000007.snap: stale generation"
    );
    let o = seen.lock().unwrap().clone().unwrap();
    assert_eq!(
        (
            o.service.as_str(),
            o.file.as_str(),
            o.id,
            o.parent_id,
            o.lineage,
            o.generation
        ),
        ("svc", "ckpt-00000007.snap", 0x707, 0, 0x11, 4)
    );
    let len = std::fs::metadata(src.join("ckpt-00000007.snap"))
        .unwrap()
        .len();
    assert_eq!(o.size, len);
    settle(&rx);
    assert!(committed.lock().unwrap().is_empty());
    assert!(names(&store.join("svc")).is_empty());
    rx.stop();
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn a_directory_without_images_and_a_bad_service_name_are_refused_before_connecting() {
    let src = tmpdir("empty");
    let to = "127.0.0.1:9".parse().unwrap();
    let e = push(to, &key(), "svc", &src, T).unwrap_err().to_string();
    assert!(e.ends_with("holds no complete image to send"), "{e}");
    let e = push(to, &key(), "../x", &src, T).unwrap_err().to_string();
    assert!(e.contains("cannot be a service name"), "{e}");
    assert!(newest(&src).is_none());
    let _ = std::fs::remove_dir_all(&src);
}

/// Every file in `dir`, hidden ones too.
fn all_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_sender_that_stops_halfway_leaves_nothing_behind() {
    let (src, store) = (tmpdir("half"), tmpdir("hstore"));
    let (rx, committed) = start(&store, Arc::new(|_: &Offer| Ok(())), 3);
    write_image(&src, 1, 0x1, None, 1);
    push(rx.local_addr(), &key(), "svc", &src, T).unwrap();
    write_image(&src, 2, 0x2, None, 1);
    let img = snapshim_image::Image::open(&src.join("ckpt-00000002.snap")).unwrap();
    let held = store::held(&img);
    let before = all_files(&store.join("svc"));
    // A sender that offers image 2, sends its first page and goes away.
    let s = std::net::TcpStream::connect(rx.local_addr()).unwrap();
    let mut ch = wire::Channel::client(&s, &key().bytes).unwrap();
    let hello = proto::Msg::Hello {
        service: "svc".into(),
    };
    proto::send(&mut ch, &hello).unwrap();
    assert!(matches!(
        proto::recv(&mut ch).unwrap(),
        proto::Msg::Holding { .. }
    ));
    let offer = Offer {
        service: "svc".into(),
        file: held.file.clone(),
        id: held.id,
        parent_id: 0,
        parent_file: None,
        lineage: held.lineage,
        generation: held.generation,
        size: img.file_len,
        created_ns: held.created_ns,
    };
    proto::send(&mut ch, &proto::Msg::Offer(offer)).unwrap();
    assert_eq!(proto::recv(&mut ch).unwrap(), proto::Msg::Accept);
    ch.send(wire::Kind::Data, &[0u8; PAGE_SIZE as usize])
        .unwrap();
    drop(ch);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    // The receiver ends the session once it sees the connection closed, and deletes what it
    // received of the image.
    settle(&rx);
    assert_eq!(all_files(&store.join("svc")), before);
    let r = push(rx.local_addr(), &key(), "svc", &src, T).unwrap();
    assert_eq!(sent(&r), ["ckpt-00000002.snap"]);
    let after = all_files(&store.join("svc"));
    assert!(
        after.iter().all(|f| !f.starts_with(".ckpt")),
        "a temporary file stayed: {after:?}"
    );
    assert_eq!(before.len() + 1, after.len(), "{before:?} then {after:?}");
    settle(&rx);
    assert_eq!(committed.lock().unwrap().len(), 2);
    rx.stop();
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&store);
}
