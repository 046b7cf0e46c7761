//! A snapshot is exact, with either engine: the image holds every byte as it was at one instant,
//! although the program keeps rewriting its memory while the image is written (`fork`) or is
//! parked for the whole write (`stop`).
//!
//! The `pattern` app (c/pattern.c) rewrites 2000 of its 65536 pages per generation, records each
//! page's generation in `gen[]`, reads pipe data into a ring the kernel writes, remaps an 8 MiB
//! region and writes pages from short-lived threads; it checks each page against `gen[]` before
//! rewriting it, and all of them every 32 generations and at the end. A restored process whose
//! image mixed pages from different instants finds a page that disagrees with `gen[]`, prints
//! FAIL and exits 1, so its output differs from an uninterrupted run.
//!
//! - `fork_engine_snapshots_are_exact`, `stop_engine_snapshots_are_exact`: five random
//!   checkpoints each (`SNAPSHIM_COW`), kill -9, restore, byte-identical output.
//! - `uffd_engine_huge_page_snapshots_are_exact`: the same with the app's memory in huge pages
//!   (`SNAPSHIM_HUGEPAGES=1`), some of which the flush splits to serve writes quickly.
//! - `three_checkpoints_in_a_row_each_restore` (`fork`) and
//!   `uffd_three_checkpoints_in_a_row_each_restore` (keeping the copy store between them,
//!   `SNAPSHIM_KEEP_STORE=1`): the last and the first of three images of one process both
//!   restore to the same output.
//! - `pattern_verifier_detects_a_torn_page` (no shim) and
//!   `a_torn_image_makes_the_restored_app_fail` (an image spliced from two instants): the app's
//!   verification does fail when it should, so the tests above can fail too.
//!
//! The tests take a lock and run one at a time (see [`one_at_a_time`]).
//!
//! The `uffd` tests need a userfaultfd that catches kernel faults (root, or
//! `vm.unprivileged_userfaultfd=1`): without one they fail under CI and are skipped, saying so,
//! elsewhere (see `snapshim_testapps::needs`).
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use snapshim_image::{Image, PageRun, RegionKind, PAGE_SIZE};
use snapshim_testapps::{bail, needs, AppSpec, Context, Failure, Result, Session, Snapshot};

const APP: &str = "pattern";
const RUNS_PER_ENGINE: usize = 5;

/// Generations for the `fork` runs. A `fork` checkpoint lets the program run on until the image
/// is committed (about 1 s for this app's 265 MiB here: the writer runs on the core the
/// program leaves free), and `snapshim checkpoint` fails if the program exits first, so
/// the program must outlive the latest checkpoint (half its run, see
/// `Session::checkpoint_window`) by that much: 768 generations, about 4 s. A `stop` checkpoint
/// parks the program until the image is written: the default 384 (about 2 s) do.
const FORK_GENERATIONS: &str = "768";

/// One 256 MiB app at a time. Random checkpoint moments are drawn from the length of a reference
/// run; with two apps competing for the two cores here that length varies by a factor of two
/// (and a `fork` writer shares a core with them), so a checkpoint could come after the app
/// already ended.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn pattern(engine: &str, env: &[(&str, &str)]) -> Result<AppSpec> {
    let mut spec = AppSpec::named(APP)?.env("SNAPSHIM_COW", engine);
    for &(k, v) in env {
        spec = spec.env(k, v);
    }
    Ok(if engine != "stop" {
        spec.arg(FORK_GENERATIONS)
    } else {
        spec
    })
}

/// The image's statistics (`ckpt-N.json`, written by the shim beside it) must name `engine`: the
/// test proves nothing about an engine that did not write the image. Returns them.
fn check_engine(img: &Snapshot, engine: &str) -> Result<String> {
    let stats = img.path().with_extension("json");
    let text = fs::read_to_string(&stats).context(format!(
        "read {} (the shim's statistics for {})",
        stats.display(),
        img.path().display()
    ))?;
    if !text.contains(&format!("\"engine\": \"{engine}\"")) {
        bail!(
            "{} was written by another engine than SNAPSHIM_COW={engine}: {}",
            img.path().display(),
            text.trim()
        );
    }
    eprintln!("[{APP}/{engine}] {}", text.trim());
    Ok(text)
}

/// A number field of the statistics.
fn stat(stats: &str, field: &str) -> u64 {
    let key = format!("\"{field}\": ");
    stats
        .find(&key)
        .map(|i| &stats[i + key.len()..])
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// Checkpoints at random moments, each in its own fifth of the checkpoint window (together they
/// cover all of it), kill -9, restore: the restored process must pass its own checks of every
/// page and print exactly what an uninterrupted run prints.
fn snapshots_are_exact(engine: &str) -> Result<()> {
    snapshots_are_exact_with(engine, &[]).map(|_| ())
}

/// [`snapshots_are_exact`] with more settings; returns each image's statistics.
fn snapshots_are_exact_with(engine: &str, env: &[(&str, &str)]) -> Result<Vec<String>> {
    let _alone = one_at_a_time();
    let mut stats = Vec::new();
    for run in 0..RUNS_PER_ENGINE {
        let app = Session::new(pattern(engine, env)?)?.spawn()?.wait_ready()?;
        let session = app.session().clone();
        let at = (run as f64 + session.random_unit()) / RUNS_PER_ENGINE as f64;
        let app = app.pause(session.checkpoint_window()?.mul_f64(at));
        let outcome = (|| {
            let img = app.checkpoint()?;
            stats.push(check_engine(&img, engine)?);
            app.kill()?;
            img.restore()?
                .finish()?
                .assert_same_output_as_uninterrupted()
        })();
        outcome.map_err(|e| {
            Failure::new(format!(
                "SNAPSHIM_COW={engine} {env:?}, run {} of {RUNS_PER_ENGINE}: {e}",
                run + 1
            ))
        })?;
    }
    Ok(stats)
}

#[test]
fn fork_engine_snapshots_are_exact() -> Result<()> {
    snapshots_are_exact("fork")
}

#[test]
fn stop_engine_snapshots_are_exact() -> Result<()> {
    snapshots_are_exact("stop")
}

/// Needs userfaultfd (see `needs::userfaultfd`); were the shim to fall back to fork anyway,
/// check_engine would fail the test.
#[test]
fn uffd_engine_snapshots_are_exact() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    snapshots_are_exact("uffd")
}

/// The uffd engine's fault server saving one page per fault (by default it saves whole blocks
/// around a fault once faults come often).
#[test]
fn uffd_engine_page_at_a_time_snapshots_are_exact() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    snapshots_are_exact_with("uffd", &[("SNAPSHIM_FAULT_AROUND", "4")]).map(|_| ())
}

/// The writer copying blocks ahead of the program from the far end of memory while the device
/// writes (by default only when the program writes all over unsaved memory; here always). The
/// statistics must show it did, or this test proves nothing about that path.
#[test]
fn uffd_engine_copying_ahead_snapshots_are_exact() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    let stats = snapshots_are_exact_with("uffd", &[("SNAPSHIM_COPY_AHEAD", "always")])?;
    if stats.iter().all(|s| stat(s, "pages_copied_ahead") == 0) {
        bail!("no run had the writer copy ahead of the program: {stats:#?}");
    }
    Ok(())
}

/// The app's memory advised to use transparent huge pages (`SNAPSHIM_HUGEPAGES=1`: its 256 MiB
/// region). The fault server saves such memory a whole 2 MiB huge page per fault, but serves the
/// first writes after the pause with small blocks, splitting those huge pages (and makes them
/// whole again after the flush). The statistics must show a split, or this test proves nothing
/// about that path. Needs transparent huge pages (`madvise` or `always`) besides userfaultfd.
#[test]
fn uffd_engine_huge_page_snapshots_are_exact() -> Result<()> {
    if !needs::userfaultfd()? || !needs::transparent_huge_pages()? {
        return Ok(());
    }
    let stats = snapshots_are_exact_with("uffd", &[("SNAPSHIM_HUGEPAGES", "1")])?;
    if stats.iter().all(|s| stat(s, "huge_pages_split") == 0) {
        bail!("no run split a huge page to serve a write: {stats:#?}");
    }
    Ok(())
}

/// Three checkpoints in a row of one running process (each waits for its commit, so with `fork`
/// the program runs on between the instants and while the images are written), then kill -9.
/// The last image must restore to the uninterrupted output; then the first one, set aside (a hard
/// link: images are written under a temporary name and renamed, never rewritten) before the
/// later checkpoints could rotate it away, must too, from its own earlier instant: the restorer
/// cuts out.txt back to the first image's length and the program redoes everything after it.
#[test]
fn three_checkpoints_in_a_row_each_restore() -> Result<()> {
    three_checkpoints_in_a_row("fork", &[])
}

/// The same with `uffd`, keeping the copy store between checkpoints (`SNAPSHIM_KEEP_STORE=1`;
/// by default each flush maps a new one): the second and third flushes copy into the store the
/// first one left (pages given back lazily, slots reused), which must not leak one flush's
/// copies into another.
#[test]
fn uffd_three_checkpoints_in_a_row_each_restore() -> Result<()> {
    if !needs::userfaultfd()? {
        return Ok(());
    }
    three_checkpoints_in_a_row("uffd", &[("SNAPSHIM_KEEP_STORE", "1")])
}

fn three_checkpoints_in_a_row(engine: &str, env: &[(&str, &str)]) -> Result<()> {
    let _alone = one_at_a_time();
    let app = Session::new(pattern(engine, env)?)?.spawn()?.wait_ready()?;
    let session = app.session().clone();
    let app = app.pause(Duration::from_millis(
        (100.0 + 200.0 * session.random_unit()) as u64,
    ));
    let first = app.checkpoint()?;
    check_engine(&first, engine)?;
    let aside_dir = session.dir().join("aside");
    fs::create_dir(&aside_dir).context(format!("create {}", aside_dir.display()))?;
    let aside = aside_dir.join(first.path().file_name().expect("an image has a name"));
    fs::hard_link(first.path(), &aside)
        .or_else(|_| fs::copy(first.path(), &aside).map(|_| ()))
        .context(format!("set {} aside", first.path().display()))?;
    let second = app.checkpoint()?;
    let third = app.checkpoint()?;
    check_engine(&third, engine)?;
    app.kill()?;
    if first.path() == second.path() || second.path() == third.path() {
        bail!(
            "three checkpoints did not write three images: {}, {}, {}",
            first.path().display(),
            second.path().display(),
            third.path().display()
        );
    }
    eprintln!(
        "[{APP}] the first image is {} in the image directory after the third checkpoint",
        if first.path().exists() {
            "still"
        } else {
            "no longer"
        }
    );
    third
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
        .map_err(|e| Failure::new(format!("restoring the third image: {e}")))?;
    Snapshot::at(&session, aside)
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
        .map_err(|e| Failure::new(format!("restoring the first image afterwards: {e}")))
}

/// The verifier really detects a torn image: with PATTERN_SELFTEST=1 the app gives one page
/// another generation's content without updating gen[] right before a check, as an image mixing
/// two instants would, and must report it with FAIL and exit status 1. Without the shim.
#[test]
fn pattern_verifier_detects_a_torn_page() -> Result<()> {
    let _alone = one_at_a_time();
    let session = Session::new(AppSpec::named(APP)?.env("PATTERN_SELFTEST", "1"))?;
    let fin = session.spawn_without_shim()?.wait_ready()?.finish()?;
    fin.assert_exit_code(1)?;
    let out = fs::read_to_string(session.stdout_path()).context("read out.txt")?;
    let last = out.lines().last().unwrap_or("");
    let want = "page 12345 holds generation";
    if !last.starts_with("FAIL: ") || !last.contains(want) || out.contains("\nPASS\n") {
        bail!(
            "the self-test should end with a FAIL line naming the page ({want:?}); last line: \
             {last:?}\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    if !fin.stderr.contains(last) {
        bail!(
            "the FAIL line is not on stderr too\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    eprintln!("[{APP}] self-test: {last}");
    session.passed();
    Ok(())
}

/// End to end, what the engine tests rely on: an image that mixes two instants makes the restored
/// app fail. Two `fork` images A and B of one run; a copy of B gets 64 pages of the 256 MiB
/// region, spread over all of it, from A (pages that changed in between), with the checksums
/// recomputed so that the image is well-formed. Restored, the app must find them (at its next
/// check, or when it next rewrites one of them) and exit 1 with FAIL.
#[test]
fn a_torn_image_makes_the_restored_app_fail() -> Result<()> {
    let _alone = one_at_a_time();
    let app = Session::new(pattern("fork", &[])?)?.spawn()?.wait_ready()?;
    let session = app.session().clone();
    let app = app.pause(Duration::from_millis(100));
    let a = app.checkpoint()?;
    let b = app.checkpoint()?;
    app.kill()?;
    let torn = session.dir().join("torn.snap");
    let pages = splice_pages(a.path(), b.path(), &torn, 64)?;
    if pages == 0 {
        bail!(
            "no page of the region changed between {} and {}",
            a.path().display(),
            b.path().display()
        );
    }
    session.expect_verify_ok(&torn)?;
    eprintln!(
        "[{APP}] {}: {} with {pages} pages of {}",
        torn.display(),
        b.path().display(),
        a.path().display()
    );
    let fin = Snapshot::at(&session, torn).restore()?.finish()?;
    fin.assert_exit_code(1)?;
    let out = fs::read_to_string(session.stdout_path()).context("read out.txt")?;
    let last = out.lines().last().unwrap_or("");
    // The spliced pages are in the largest anonymous region, where glibc's mappings of the
    // 256 MiB pages, gen[] and the pipe ring merged: any of pattern's content checks may be
    // the first to see one (not a failure of some other kind).
    let content_checks = [
        "gen[] says",
        "disagree with gen[]",
        "ring byte",
        "8 MiB region (pattern",
    ];
    if !last.starts_with("FAIL: ") || !content_checks.iter().any(|c| last.contains(c)) {
        bail!(
            "the torn image should have ended in a FAIL of a content check; last line of \
             out.txt: {last:?}\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    eprintln!("[{APP}] restored from the torn image: {last}");
    session.passed();
    Ok(())
}

/// Writes to `out` a copy of image `b` in which up to `count` pages of the largest anonymous
/// region (the app's 256 MiB), one from each of `count` equal slices of it, hold what image `a`
/// holds there, where that differs; page-run and metadata checksums and the header are updated.
/// Returns how many pages were replaced.
fn splice_pages(a: &Path, b: &Path, out: &Path, count: u64) -> Result<usize> {
    let open = |p: &Path| {
        Image::open(p).map_err(|e| Failure::new(format!("cannot read {}: {e}", p.display())))
    };
    let (ia, ib) = (open(a)?, open(b)?);
    let region = ib
        .meta
        .regions
        .iter()
        .filter(|r| matches!(r.kind, RegionKind::Anon))
        .max_by_key(|r| r.end - r.start)
        .ok_or_else(|| Failure::new(format!("{} has no anonymous region", b.display())))?;
    if region.end - region.start < 256 << 20 {
        bail!(
            "{}: the largest anonymous region is {:#x}..{:#x}, not the app's 256 MiB",
            b.display(),
            region.start,
            region.end
        );
    }
    let mut bytes = fs::read(b).context(format!("read {}", b.display()))?;
    let mut meta = ib.meta.clone();
    let npages = (region.end - region.start) / PAGE_SIZE;
    let mut old = vec![0u8; PAGE_SIZE as usize];
    let (mut replaced, mut changed_runs) = (0, Vec::new());
    for k in 0..count {
        let from = region.start + k * npages / count * PAGE_SIZE;
        let to = region.start + (k + 1) * npages / count * PAGE_SIZE;
        for addr in (from..to).step_by(PAGE_SIZE as usize) {
            let (Some((_, in_a)), Some((run, in_b))) =
                (stored_at(&ia.meta.runs, addr), stored_at(&meta.runs, addr))
            else {
                continue;
            };
            ia.file
                .read_exact_at(&mut old, in_a)
                .context(format!("read {}", a.display()))?;
            let page = &mut bytes[in_b as usize..(in_b + PAGE_SIZE) as usize];
            if *page != *old {
                page.copy_from_slice(&old);
                replaced += 1;
                changed_runs.push(run);
                break;
            }
        }
    }
    changed_runs.sort_unstable();
    changed_runs.dedup();
    for &i in &changed_runs {
        let run = &mut meta.runs[i];
        run.crc =
            crc32fast::hash(&bytes[run.file_off as usize..(run.file_off + run.len()) as usize]);
    }
    let mut header = ib.header.clone();
    let (meta_bytes, meta_crc) = snapshim_image::encode_metadata(&meta);
    bytes.truncate(header.meta_off as usize);
    bytes.extend_from_slice(&meta_bytes);
    header.meta_len = meta_bytes.len() as u64;
    header.meta_crc = meta_crc;
    bytes[..PAGE_SIZE as usize].copy_from_slice(&header.encode());
    fs::write(out, &bytes).context(format!("write {}", out.display()))?;
    Ok(replaced)
}

/// The run holding the page at `addr`: its index and the page's offset in the image file.
fn stored_at(runs: &[PageRun], addr: u64) -> Option<(usize, u64)> {
    runs.iter()
        .position(|r| addr >= r.addr && addr < r.addr + r.len())
        .map(|i| (i, runs[i].file_off + (addr - runs[i].addr)))
}
