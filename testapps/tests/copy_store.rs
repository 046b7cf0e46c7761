//! The uffd engine's copy store (the memory it copies pages into while the image is written)
//! does not stay in the program's resident memory after a checkpoint, unless asked to.
//!
//! - `resident_memory_is_back_after_a_uffd_checkpoint`: by default the store is given back after
//!   the flush: the `single` app's VmRSS right after `snapshim checkpoint` returns is within
//!   [`SLACK`] of its VmRSS right before (the store is as large as the program's anonymous
//!   memory, about 66 MiB here, so a store left behind fails this), the statistics say no store
//!   is kept, and the image restores to identical output.
//! - `a_kept_copy_store_shows_in_the_statistics`: with `SNAPSHIM_KEEP_STORE=1` the store stays
//!   for the next checkpoint and its size is in each checkpoint's statistics
//!   (`copy_store_kept_bytes`); a second checkpoint, which copies into the kept store, restores
//!   to identical output.
//!
//! Both need a userfaultfd that catches kernel faults (root, or `vm.unprivileged_userfaultfd=1`):
//! without one they fail under CI and are skipped, saying so, elsewhere
//! (`snapshim_testapps::needs`). They take a lock and run one at a time.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use snapshim_testapps::{bail, needs, AppSpec, Context, Failure, Result, Session, Snapshot};

const APP: &str = "single";
/// Rounds of `single` (72 by default, about 1.4 s here): about 5 s, so that the checkpoints, the
/// first 0.3 s after READY, are committed long before it ends.
const ROUNDS: &str = "250";
/// How much more resident memory than before a checkpoint the program may have right after it
/// (the shim's own bookkeeping, the program's heap moving meanwhile).
const SLACK: u64 = 8 << 20;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `single` under the uffd engine, `SNAPSHIM_KEEP_STORE` set to `keep_store` (empty counts as
/// unset: the default, whatever the test run's environment says).
fn single(keep_store: &str) -> Result<AppSpec> {
    Ok(AppSpec::named(APP)?
        .arg(ROUNDS)
        .env("SNAPSHIM_COW", "uffd")
        .env("SNAPSHIM_KEEP_STORE", keep_store))
}

/// VmRSS of process `pid`, in bytes.
fn vm_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).context(format!("read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| Failure::new(format!("no VmRSS line in {path}")))
}

/// The statistics beside `img` (`ckpt-N.json`), which must say the uffd engine wrote it.
fn stats_of(img: &Snapshot) -> Result<String> {
    let path = img.path().with_extension("json");
    let text = fs::read_to_string(&path).context(format!("read {}", path.display()))?;
    if !text.contains("\"engine\": \"uffd\"") {
        bail!(
            "{} was not written by the uffd engine: {}",
            img.path().display(),
            text.trim()
        );
    }
    Ok(text)
}

/// A number field of the statistics; an error if it is missing.
fn stat(stats: &str, field: &str) -> Result<u64> {
    let key = format!("\"{field}\": ");
    stats
        .find(&key)
        .map(|i| &stats[i + key.len()..])
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .ok_or_else(|| Failure::new(format!("no number {field:?} in the statistics: {stats}")))
}

const MIB: f64 = (1 << 20) as f64;

#[test]
fn resident_memory_is_back_after_a_uffd_checkpoint() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    let _alone = one_at_a_time();
    let app = Session::new(single("")?)?.spawn()?.wait_ready()?;
    let app = app.pause(Duration::from_millis(300));
    let before = vm_rss(app.pid())?;
    let img = app.checkpoint()?;
    let after = vm_rss(app.pid())?;
    let stats = stats_of(&img)?;
    eprintln!(
        "[{APP}] VmRSS {:.1} MiB before the checkpoint, {:.1} MiB after; {}",
        before as f64 / MIB,
        after as f64 / MIB,
        stats.trim()
    );
    let kept = stat(&stats, "copy_store_kept_bytes")?;
    if kept != 0 {
        bail!("by default no copy store is kept, but the statistics say {kept} bytes are");
    }
    if after > before + SLACK {
        bail!(
            "the program's resident memory grew by {:.1} MiB across the checkpoint ({:.1} MiB \
             before, {:.1} MiB after; at most {} MiB allowed)",
            (after - before) as f64 / MIB,
            before as f64 / MIB,
            after as f64 / MIB,
            SLACK >> 20
        );
    }
    app.kill()?;
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

#[test]
fn a_kept_copy_store_shows_in_the_statistics() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    let _alone = one_at_a_time();
    let app = Session::new(single("1")?)?.spawn()?.wait_ready()?;
    let app = app.pause(Duration::from_millis(300));
    let mut last = None;
    for n in 1..=2 {
        let before = vm_rss(app.pid())?;
        let img = app.checkpoint()?;
        let after = vm_rss(app.pid())?;
        let stats = stats_of(&img)?;
        let kept = stat(&stats, "copy_store_kept_bytes")?;
        eprintln!(
            "[{APP}] checkpoint {n}: VmRSS {:.1} MiB before, {:.1} MiB after, copy store kept \
             {:.1} MiB",
            before as f64 / MIB,
            after as f64 / MIB,
            kept as f64 / MIB
        );
        // The store is filled in to the program's anonymous memory (at least 32 MiB).
        if kept < 32 << 20 {
            bail!(
                "with SNAPSHIM_KEEP_STORE=1 checkpoint {n} should keep a copy store of 32 MiB \
                 or more, but the statistics say {kept} bytes: {}",
                stats.trim()
            );
        }
        last = Some(img);
    }
    app.kill()?;
    // The second flush copied into the store the first one left (its slots reused): the second
    // image must hold its own instant, not copies from the first flush.
    last.expect("two checkpoints")
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
        .map_err(|e| Failure::new(format!("restoring the second image: {e}")))
}
