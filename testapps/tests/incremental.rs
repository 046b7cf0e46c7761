//! Incremental checkpoints (`SNAPSHIM_INCREMENTAL`): delta images, chains, policy, retention
//! and background merging.
//!
//! The app is `incr` (testapps/c/incr.c): about 40 pages of 64 MiB rewritten per millisecond,
//! pages filled by the kernel through read(), runs of pages discarded with MADV_DONTNEED, a
//! region moved with mremap; it checks every page against what it wrote, so a page taken from
//! the wrong image of a chain makes it print FAIL.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use snapshim_image::{Chain, Image, FLAG_DELTA, PAGE_SIZE};
use snapshim_testapps::process::{
    children_of, command_name, run_captured, timeout, wait_for_exit_of,
};
use snapshim_testapps::scenario::NOBODY;
use snapshim_testapps::{
    bail, is_root, needs, AppSpec, Context, Failure, Result, Running, Session, Snapshot,
};

fn incr(env: &[(&str, &str)]) -> Result<AppSpec> {
    let mut spec = AppSpec::named("incr")?;
    for (k, v) in env {
        spec = spec.env(*k, *v);
    }
    Ok(spec)
}

/// Whether the image at `path` is a delta.
fn is_delta(path: &Path) -> Result<bool> {
    let img = Image::open(path).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    Ok(img.header.flags & FLAG_DELTA != 0)
}

/// `n` checkpoints, the first after a random pause, the others back to back.
fn checkpoints(app: &Running, n: usize) -> Result<Vec<Snapshot>> {
    (0..n).map(|_| app.checkpoint()).collect()
}

/// Every page with data of the process the image (or chain) at `path` restores, as a hash per
/// page (zero pages left out, as images leave them out), plus its regions and threads.
fn memory_of(path: &Path) -> Result<(String, std::collections::BTreeMap<u64, u64>)> {
    let chain = Chain::open(path).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    let mut pages = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for r in chain.sources() {
        let file = &chain.images[r.image].file;
        for p in 0..r.pages {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut buf, r.file_off + p * PAGE_SIZE)
                .context("read page data")?;
            if buf.iter().any(|&b| b != 0) {
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                for &b in &buf {
                    h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                }
                pages.insert(r.addr + p * PAGE_SIZE, h);
            }
        }
    }
    let m = &chain.head().meta;
    Ok((
        format!("{:?}\n{:?}\n{:?}", m.regions, m.threads, m.fds),
        pages,
    ))
}

/// A chain of deltas holds exactly the memory of a full image taken at the same instant
/// (`SNAPSHIM_TWIN_FULL` has the forked writer of each delta write one beside it), and the
/// program restored from the chain finishes exactly as an uninterrupted run.
#[test]
fn chain_of_deltas_equals_a_full_image_of_the_same_instant() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "on"),
        ("SNAPSHIM_TWIN_FULL", "1"),
        ("SNAPSHIM_FULL_EVERY", "100"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "10"),
    ])?)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let imgs = checkpoints(&app, 4)?;
    app.kill()?;
    if is_delta(imgs[0].path())? {
        bail!("the first image is a delta");
    }
    for img in &imgs[1..] {
        if !is_delta(img.path())? {
            bail!("{} is a full image, expected a delta", img.path().display());
        }
    }
    for img in &imgs[1..] {
        let twin = img.path().with_extension("twin");
        let (meta_chain, chain) = memory_of(img.path())?;
        let (meta_full, full) = memory_of(&twin)?;
        if meta_chain != meta_full {
            bail!(
                "{}: regions, threads or descriptors differ from {}",
                img.path().display(),
                twin.display()
            );
        }
        let differ: Vec<String> = chain
            .keys()
            .chain(full.keys())
            .filter(|a| chain.get(a) != full.get(a))
            .take(5)
            .map(|a| format!("{a:#x}"))
            .collect();
        if !differ.is_empty() {
            bail!(
                "{} restores other memory than the full image {} of the same instant: pages {} \
                 ({} pages from the chain, {} from the full image)",
                img.path().display(),
                twin.display(),
                differ.join(", "),
                chain.len(),
                full.len()
            );
        }
        let delta_bytes = fs::metadata(img.path()).context("stat")?.len();
        let full_bytes = fs::metadata(&twin).context("stat")?.len();
        eprintln!(
            "{}: delta {delta_bytes} bytes, full {full_bytes} bytes, same memory",
            img.path().display()
        );
    }
    imgs[3]
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// Full image every N checkpoints; retention keeps the newest K images and what they need.
#[test]
fn policy_takes_a_full_image_every_n_and_retention_keeps_what_deltas_need() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "on"),
        ("SNAPSHIM_FULL_EVERY", "3"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "2"),
    ])?)?;
    let app = session.spawn()?.wait_ready()?;
    let dir = session.image_dir();
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = snapshim_image::list_images(dir)
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.file_name().unwrap().to_string_lossy()[5..13]
                    .trim_start_matches('0')
                    .to_string()
            })
            .collect();
        v.sort();
        v
    };
    // kind of each image, and the images on disk after it (by sequence number).
    let want: [(bool, &[&str]); 5] = [
        (false, &["1"]),
        (true, &["1", "2"]),
        (true, &["1", "2", "3"]), // 2 and 3 kept, and 1 which they need
        (false, &["1", "2", "3", "4"]), // 3 and 4 kept: 3 needs 2 and 1
        (true, &["4", "5"]),      // 4 and 5 kept: nothing older is needed
    ];
    for (i, (delta, files)) in want.iter().enumerate() {
        let img = app.checkpoint()?;
        if is_delta(img.path())? != *delta {
            bail!(
                "checkpoint {}: expected a {} image",
                i + 1,
                if *delta { "delta" } else { "full" }
            );
        }
        let have = names(&dir);
        if have != *files {
            bail!(
                "after checkpoint {}: images {have:?} on disk, expected {files:?}",
                i + 1
            );
        }
    }
    let last = app.checkpoint()?; // 6, a delta of 4
    app.kill()?;
    last.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// Runs `snapshim merge` on `path` with the crash hook `crash` ("" for none).
fn merge(
    session: &Arc<Session>,
    path: &Path,
    crash: &str,
) -> Result<snapshim_testapps::process::Captured> {
    let mut cmd = Command::new(session.tools()?.tool);
    cmd.arg("merge")
        .arg(path)
        .env("SNAPSHIM_MERGE_CRASH", crash);
    for v in ["LD_PRELOAD", "SNAPSHIM_DIR", "SNAPSHIM_NAME"] {
        cmd.env_remove(v);
    }
    run_captured(&mut cmd, timeout())
}

/// A merger killed after writing its temporary image, or after renaming it over the newest
/// delta, leaves a chain that restores exactly; a complete merge leaves one full image and
/// deletes the chain it replaced.
#[test]
fn crash_during_a_merge_leaves_a_restorable_chain() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "on"),
        ("SNAPSHIM_FULL_EVERY", "100"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "10"),
    ])?)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let imgs = checkpoints(&app, 3)?;
    app.kill()?;
    let head = imgs[2].path().to_path_buf();
    let dir = session.image_dir();
    for crash in ["after-write", "after-rename"] {
        let c = merge(&session, &head, crash)?;
        if c.status.signal() != Some(libc::SIGKILL) {
            bail!(
                "merge with SNAPSHIM_MERGE_CRASH={crash} did not stop at the hook\n{}",
                c.report()
            );
        }
        let on_disk = snapshim_image::list_images(&dir).map_err(|e| Failure::new(e.to_string()))?;
        if on_disk.len() != 3 {
            bail!("after a merge killed {crash}: {on_disk:?} on disk, expected the three images");
        }
        let merged = !is_delta(&head)?;
        if merged != (crash == "after-rename") {
            bail!(
                "after a merge killed {crash}, the newest image is {}",
                if merged { "full" } else { "a delta" }
            );
        }
        imgs[2]
            .restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()?;
    }
    let c = merge(&session, &head, "")?;
    if !c.status.success() {
        bail!("merge failed\n{}", c.report());
    }
    let on_disk = snapshim_image::list_images(&dir).map_err(|e| Failure::new(e.to_string()))?;
    if on_disk != [head.clone()] || is_delta(&head)? {
        bail!(
            "after the merge: {on_disk:?} on disk, expected only {} as a full image",
            head.display()
        );
    }
    imgs[2]
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// A delta in the middle of a chain that is damaged, missing or replaced by another image is
/// named when the newest image is restored or verified.
#[test]
fn damaged_delta_in_the_middle_of_a_chain_is_named() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "on"),
        ("SNAPSHIM_FULL_EVERY", "100"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "10"),
    ])?)?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let imgs = checkpoints(&app, 4)?;
    app.kill()?;
    session.passed();
    let middle = imgs[2].path().to_path_buf();
    let name = middle.file_name().unwrap().to_string_lossy().into_owned();
    let head = imgs[3].path();
    let original = fs::read(&middle).context("read the middle delta")?;
    let img = Image::open(&middle).map_err(|e| Failure::new(e.to_string()))?;
    let run = *img
        .meta
        .runs
        .first()
        .ok_or_else(|| Failure::new("the middle delta stores no pages"))?;
    drop(img);

    // A flipped byte of page data.
    let mut bytes = original.clone();
    bytes[run.file_off as usize + 100] ^= 0x40;
    fs::write(&middle, &bytes).context("damage the middle delta")?;
    session.expect_restore_refused(head, &[&name, "damaged", "checksum"])?;
    session.expect_verify_fails(head)?;
    let v = session.verify(head)?;
    if !v.stderr.contains(&name) {
        bail!(
            "snapshim verify does not name the damaged {name}\n{}",
            v.report()
        );
    }
    // Missing.
    fs::remove_file(&middle).context("remove the middle delta")?;
    session.expect_restore_refused(head, &[&name])?;
    // Another image in its place (the first one, a full image).
    fs::copy(imgs[0].path(), &middle).context("copy")?;
    session.expect_restore_refused(head, &[&name, "not the image it names"])?;
    fs::write(&middle, &original).context("put the middle delta back")?;
    session.expect_verify_ok(head)
}

/// As nobody, tracking uses a userfaultfd for user-mode faults only: deltas are taken and
/// restore exactly.
#[test]
fn incremental_checkpoints_work_as_nobody() -> Result<()> {
    let session = Session::new(
        incr(&[
            ("SNAPSHIM_INCREMENTAL", "on"),
            ("SNAPSHIM_FULL_EVERY", "100"),
            ("SNAPSHIM_FULL_FRACTION", "100"),
        ])?
        .unprivileged(),
    )?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let imgs = checkpoints(&app, 3)?;
    let stderr = app.stderr_so_far();
    app.kill()?;
    if !is_delta(imgs[2].path())? {
        bail!("as nobody the third image is a full one; the program said:\n{stderr}");
    }
    imgs[2]
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// SNAPSHIM_INCREMENTAL=merge: when the chain is due for a full image, the shim starts
/// `snapshim merge` in the background; the merged image serves as the parent of the next delta.
#[test]
fn background_merge_folds_the_chain_while_the_program_runs() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "merge"),
        ("SNAPSHIM_FULL_EVERY", "3"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "10"),
    ])?)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let imgs = checkpoints(&app, 3)?; // full, delta, delta: the chain is due, a merger starts
    let head = imgs[2].path().to_path_buf();
    // The shim starts the merger before it answers the checkpoint request, as a child of the
    // program that it reaps only before its next checkpoint: it is listed until then, zombie or
    // not, and its pid cannot be reused while we wait for it to end.
    let merger = children_of(app.pid())
        .into_iter()
        .find(|&pid| command_name(pid).as_deref() == Some("snapshim"))
        .ok_or_else(|| {
            Failure::new(format!(
                "no `snapshim merge` among the program's children after the third checkpoint; \
                 the program said:\n{}",
                app.stderr_so_far()
            ))
        })?;
    let ended = wait_for_exit_of(merger, Instant::now() + timeout())
        .context(format!("wait for the merger (pid {merger})"))?;
    let dir = session.image_dir();
    let on_disk = snapshim_image::list_images(&dir).map_err(|e| Failure::new(e.to_string()))?;
    if !ended || is_delta(&head)? || on_disk != [head.clone()] {
        bail!(
            "{}: {on_disk:?} on disk, expected only {} as a full image; the program said:\n{}",
            if ended {
                "after the merger ended".to_string()
            } else {
                format!("the merger did not end within {:?}", timeout())
            },
            head.display(),
            app.stderr_so_far()
        );
    }
    let next = app.checkpoint()?;
    app.kill()?;
    if !is_delta(next.path())? {
        bail!("the checkpoint after the merge is not a delta");
    }
    next.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// The kernel behaves as the tracker assumes (testapps/c/wpasync.c), as nobody and as root
/// (the tracker takes another path with privileges); the root half needs root.
#[test]
fn kernel_reports_written_pages_as_the_tracker_assumes() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let bin = snapshim_testapps::artifacts::c_app("wpasync");
    // As root, nobody runs a copy in the temp directory: the build tree may not be reachable
    // for nobody (e.g. under /root).
    let copy = std::env::temp_dir().join(format!("snapshim-wpasync-{}", std::process::id()));
    let unprivileged = if is_root() {
        fs::copy(&bin, &copy).context("copy wpasync")?;
        let mut cmd = Command::new(&copy);
        cmd.uid(NOBODY).gid(NOBODY);
        cmd
    } else {
        Command::new(&bin)
    };
    let mut runs = vec![(" without privileges", unprivileged)];
    if needs::root("for the privileged half; the unprivileged half ran")? {
        runs.push((" as root", Command::new(&bin)));
    }
    let outcome = runs.into_iter().try_for_each(|(how, mut cmd)| {
        let c = run_captured(&mut cmd, timeout())?;
        if !c.status.success() || !c.stdout.contains("PASS") {
            bail!("wpasync{how}:\n{}", c.report());
        }
        Ok(())
    });
    let _ = fs::remove_file(&copy);
    outcome
}

/// A program restored from a chain starts a new chain (its tracking did not survive): its next
/// image is a full one, the one after a delta, and that restores exactly too.
#[test]
fn restored_program_starts_a_new_chain() -> Result<()> {
    let session = Session::new(incr(&[
        ("SNAPSHIM_INCREMENTAL", "on"),
        ("SNAPSHIM_FULL_EVERY", "100"),
        ("SNAPSHIM_FULL_FRACTION", "100"),
        ("SNAPSHIM_KEEP", "10"),
    ])?)?;
    // Right after READY: well before PHASE 2, which the restored program then prints once it
    // runs again.
    let app = session.spawn()?.wait_ready()?;
    let first = checkpoints(&app, 2)?;
    app.kill()?;
    let mut restored = first[1].restore()?;
    restored.wait_for("PHASE 2")?;
    let again = checkpoints(&restored, 2)?;
    restored.kill()?;
    if is_delta(again[0].path())? || !is_delta(again[1].path())? {
        bail!("after a restore: expected a full image, then a delta");
    }
    again[1]
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}
