//! `snapshim inspect IMAGE`: everything an image records, for a person to read. Reads the image
//! through `snapshim-image` only; never loads the shim.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use snapshim_image::{
    CharDevice, Directory, FdKind, FdState, Image, Inherited, Metadata, Pipe, Region, RegionKind,
    RegularFile, SigAction, Socket, SocketRole, Unsupported,
};

use crate::failure::{Failure, Result};
use crate::parse::{format_ms, format_time, human_bytes, signal_name};

/// Resolves and opens an image, with errors in the tool's one-line form.
fn open(arg: &Path) -> Result<Image> {
    let path = snapshim_image::resolve(arg).map_err(|e| Failure::op(e.to_string()))?;
    Image::open(&path).map_err(|e| Failure::op(format!("{}: {e}", path.display())))
}

pub fn inspect(arg: &Path, json: bool) -> Result<()> {
    let img = open(arg)?;
    if json {
        return crate::json::print_ok(document(&img));
    }
    print!("{}", describe(&img));
    Ok(())
}

/// The `--json` document: what [`describe`] shows, with numbers as numbers.
fn document(img: &Image) -> serde_json::Value {
    let (h, m, p) = (&img.header, &img.meta, &img.meta.process);
    let stored = stored_per_region(m);
    let regions: Vec<_> = m
        .regions
        .iter()
        .zip(&stored)
        .map(|(r, bytes)| {
            json!({
                "start": r.start, "end": r.end, "prot": prot_string(r.prot), "shared": r.shared,
                "kind": kind_string(&r.kind), "stored_bytes": bytes, "name": r.name,
            })
        })
        .collect();
    let threads: Vec<_> = m
        .threads
        .iter()
        .map(|t| json!({ "tid": t.tid, "name": t.name, "helper": t.helper }))
        .collect();
    let fds: Vec<_> = m
        .fds
        .iter()
        .map(|f| {
            json!({
                "fd": f.fd, "flags": fd_flags(f), "kind": f.kind.name(), "what": fd_kind(&f.kind),
            })
        })
        .collect();
    let handlers: Vec<_> = p
        .sigactions
        .iter()
        .filter(|s| s.handler != 0)
        .map(|s| {
            json!({
                "signal": signal_name(s.signo as i32),
                "handler": if s.handler == 1 { json!("ignored") } else { json!(s.handler) },
                "flags": sa_flags(s.flags),
            })
        })
        .collect();
    let build_ids: Vec<_> = m
        .build_ids
        .iter()
        .map(|b| json!({ "path": b.path, "id": snapshim_image::elf::hex(&b.id) }))
        .collect();
    json!({
        "image": img.path,
        "format": format!("{}.{}", h.major, h.minor),
        "file_bytes": img.file_len,
        "id": format!("{:016x}", h.image_id),
        "delta": m.parent.is_some(),
        "parent": m.parent.as_ref().map(|r| json!({
            "id": format!("{:016x}", r.image_id), "file": r.file,
            "inherited_pages": m.inherited.iter().map(|s| s.pages).sum::<u64>(),
        })),
        "merged_from": m.merged_from.as_ref().map(|mf| json!({ "files": mf.files })),
        "lineage": lineage_document(m),
        "created_ns": h.created_ns,
        "program": { "name": p.name, "pid": p.pid, "exe": p.exe, "cmdline": p.cmdline, "cwd": p.cwd },
        "stored_bytes": img.stored_bytes(),
        "resident_bytes": p.resident_bytes,
        "pause_us": (p.pause_ns != 0).then_some(p.pause_ns / 1000),
        "shim": m.shim.path,
        "regions": regions,
        "build_ids": build_ids,
        "threads": threads,
        "fds": fds,
        "signal_handlers": handlers,
    })
}

/// Who wrote the image (format 1.4; null in older images).
pub fn lineage_document(m: &snapshim_image::Metadata) -> serde_json::Value {
    let Some(l) = &m.lineage else {
        return serde_json::Value::Null;
    };
    json!({
        "id": format!("{:016x}", l.id),
        "generation": l.generation,
        "instance": format!("{:016x}", l.instance),
        "restored_from": l.origin.as_ref().map(|o| json!({
            "image": o.file,
            "id": format!("{:016x}", o.image_id),
            "lineage": format!("{:016x}", o.lineage),
            "generation": o.generation,
        })),
    })
}

/// "generation 2 of lineage 1a2b..., instance 3c4d..., restored from FILE (generation 1)".
fn lineage_line(l: &snapshim_image::Lineage) -> String {
    let from = match &l.origin {
        Some(o) => format!(", restored from {} (generation {})", o.file, o.generation),
        None => ", an original run".into(),
    };
    format!(
        "generation {} of lineage {:016x}, instance {:016x}{from}",
        l.generation, l.id, l.instance
    )
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
    if let Some(l) = &m.lineage {
        field("lineage", lineage_line(l));
    }
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
        FdKind::RegularFile(RegularFile {
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
            format!("NOT RESTORABLE (the restore refuses it): {desc}")
        }
        FdKind::Eventfd(e) => format!(
            "eventfd, count {}{}",
            e.count,
            if e.semaphore { ", semaphore" } else { "" }
        ),
        FdKind::Timerfd(t) => format!(
            "timerfd, clock {}, settime flags {:#o}, {} ns left, interval {} ns, {} expirations unread",
            t.clock, t.settime_flags, t.value_ns, t.interval_ns, t.ticks
        ),
        FdKind::Signalfd(s) => format!("signalfd, mask {:#x}", s.mask),
        FdKind::Epoll(e) => {
            let w: Vec<String> = e
                .watches
                .iter()
                .map(|w| format!("{} events {:#x} data {:#x}", w.fd, w.events, w.data))
                .collect();
            format!("epoll watching [{}]", w.join("; "))
        }
        FdKind::Duplicate(d) => format!("the same open file as descriptor {}", d.of),
        FdKind::Inotify(i) => {
            let w: Vec<String> = i
                .watches
                .iter()
                .map(|w| format!("{} {} mask {:#x}", w.wd, w.path, w.mask))
                .collect();
            format!("inotify watching [{}]", w.join("; "))
        }
        FdKind::Socket(s) => socket(s),
        FdKind::DeletedFile(d) => deleted_file(d),
    }
}

/// "deleted file /tmp/x (offset 5, 1.0 KiB kept, mode 600)", "memfd cache (...), seals 0xf".
fn deleted_file(d: &snapshim_image::DeletedFile) -> String {
    let what = match &d.memfd {
        Some(m) => format!("memfd {} (seals {:#x})", m.name, m.seals),
        None => format!("deleted file {}", d.path),
    };
    let content = match d.same_as {
        Some(of) => format!("the same file as descriptor {of}"),
        None => format!("{} kept", human_bytes(d.content.len() as u64)),
    };
    format!("{what} (offset {}, {content}, mode {:o})", d.offset, d.mode)
}

/// "TCP 127.0.0.1 port 8080, listening (backlog 128), 21 options".
fn socket(s: &Socket) -> String {
    use snapshim_image::objects::socket::describe;
    let role = match &s.role {
        SocketRole::Unbound => "unbound".to_string(),
        SocketRole::Bound => "bound".to_string(),
        SocketRole::Listening { backlog } => format!("listening (backlog {backlog})"),
        SocketRole::Connected => format!("connected to {}", describe(s, &s.peer)),
        SocketRole::Pair { peer, queued } => format!(
            "pair with socket {peer}, {} queued",
            human_bytes(queued.iter().map(|q| q.len() as u64).sum())
        ),
        SocketRole::Reset => "connection to outside, restored reset".to_string(),
        SocketRole::Refused { why } => format!("NOT RESTORED: {why}"),
        SocketRole::Established { repair } => format!(
            "connection to {}, captured live ({} to send, {} unread; --tcp-established \
             restores it alive)",
            describe(s, &s.peer),
            human_bytes(repair.send_queue.len() as u64),
            human_bytes(repair.recv_queue.len() as u64)
        ),
    };
    format!(
        "socket {} {}, {role}, {} options",
        s.id,
        describe(s, &s.local),
        s.options.len()
    )
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
pub(crate) fn utc_offset(ns: u64) -> i64 {
    let t = (ns / 1_000_000_000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone name pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use snapshim_image::{PageRun, PAGE_SIZE};

    pub(crate) fn region(start: u64, end: u64, kind: RegionKind, name: &str) -> Region {
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
            ..Default::default()
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
}
