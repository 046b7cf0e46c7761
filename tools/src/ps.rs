//! `snapshim ps`: the programs running under the shim, found by the `libsnapshim.so` mapped in
//! them, with what the lock of their image directory says (`snapshim_image::lineage`): the
//! directory, lineage and generation, the last checkpoint and whether one is being taken.
//! A program that has taken no checkpoint yet holds no directory (the shim takes it at the
//! first checkpoint, or at start-up under `snapshim run`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use snapshim_image::lineage::{Record, LOCK_FILE};

use crate::companions::SHIM_LIB;
use crate::failure::Result;
use crate::parse::human_bytes;

/// One program under the shim.
struct Row {
    pid: i32,
    program: String,
    dir: Option<PathBuf>,
    record: Option<Record>,
}

pub fn ps(json: bool) -> Result<()> {
    let rows = programs();
    if json {
        return crate::json::print_ok(json!({
            "programs": rows.iter().map(document).collect::<Vec<_>>()
        }));
    }
    if rows.is_empty() {
        println!("no program is running under snapshim (that this user may see)");
        return Ok(());
    }
    let now = unix_ms();
    println!(
        "{:>7}  {:<16} {:>3}  {:<22} {:>8}  {:<6} {:<13} IMAGE DIRECTORY",
        "PID", "PROGRAM", "GEN", "LAST CHECKPOINT", "AGE", "ENGINE", "STATE"
    );
    for r in &rows {
        let rec = r.record.as_ref();
        let last = rec.filter(|r| !r.last.is_empty());
        let state = match rec {
            Some(r) if r.checkpointing => "checkpointing".to_string(),
            Some(r) if r.store_kept_bytes > 0 => {
                format!("store {}", human_bytes(r.store_kept_bytes))
            }
            Some(_) => "idle".into(),
            None => "no image yet".into(),
        };
        println!(
            "{:>7}  {:<16} {:>3}  {:<22} {:>8}  {:<6} {:<13} {}",
            r.pid,
            r.program,
            rec.map_or("-".into(), |r| r.lineage.generation.to_string()),
            last.map_or("-".into(), |r| file_name(&r.last)),
            last.map_or("-".into(), |r| age(now.saturating_sub(r.last_unix_ms))),
            last.map_or("-", |r| r.engine.as_str()),
            state,
            r.dir
                .as_ref()
                .map_or("-".into(), |d| d.display().to_string()),
        );
    }
    Ok(())
}

/// Every process this user may see with the shim loaded, by PID.
fn programs() -> Vec<Row> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    pids.into_iter()
        .filter(|&pid| crate::proc::maps_file(pid, SHIM_LIB).unwrap_or(false))
        .map(|pid| {
            let (dir, record) = match lock_of(pid) {
                Some((dir, record)) => (Some(dir), record),
                None => (None, None),
            };
            Row {
                pid,
                program: crate::proc::comm(pid).unwrap_or_default(),
                dir,
                record,
            }
        })
        .collect()
}

/// The image directory whose lock `pid` holds open, and its record.
fn lock_of(pid: i32) -> Option<(PathBuf, Option<Record>)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            if target.file_name()? != LOCK_FILE {
                return None;
            }
            let text = std::fs::read_to_string(e.path()).ok();
            Some((
                target.parent()?.to_path_buf(),
                text.as_deref().and_then(Record::parse),
            ))
        })
}

fn document(r: &Row) -> Value {
    let rec = r.record.as_ref();
    json!({
        "pid": r.pid,
        "program": r.program,
        "image_dir": r.dir,
        "lineage": rec.map(|r| format!("{:016x}", r.lineage.id)),
        "generation": rec.map(|r| r.lineage.generation),
        "instance": rec.map(|r| format!("{:016x}", r.lineage.instance)),
        "restored_from": rec.and_then(|r| r.lineage.origin.as_ref()).map(|o| &o.file),
        "last_checkpoint": rec.filter(|r| !r.last.is_empty()).map(|r| json!({
            "image": r.last,
            "unix_ms": r.last_unix_ms,
            "engine": r.engine,
        })),
        "checkpointing": rec.is_some_and(|r| r.checkpointing),
        "copy_store_kept_bytes": rec.map_or(0, |r| r.store_kept_bytes),
    })
}

fn file_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// "4 s ago", "12 min ago", "3 h ago".
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}
