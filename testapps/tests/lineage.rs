//! Every running instance owns its images (issue 13): lineages, generations and the lock of an
//! image directory.
//!
//! - `programs_with_the_same_name_get_directories_of_their_own`: two `snapshim run` of the same
//!   program: the second is told in one line that its images go to `DIR.2`; each checkpoint
//!   lands in its own directory; a third with `--name` naming the busy directory is refused with
//!   one line, and the first's images are untouched.
//! - `a_restored_program_is_the_next_generation`: `single` checkpointing every 300 ms (keep 2)
//!   is killed and restored, the restored one is checkpointed, killed and restored again, and
//!   finishes with the output of an uninterrupted run. Each generation numbers its images after
//!   every image before it, never removes an image of an earlier generation, and carries its
//!   lineage, generation and origin.
//! - `one_image_restored_twice_at_once`: while a restore of an image runs, a second restore of
//!   it is refused with one line; with `--new-lineage` it runs beside the first, its images in a
//!   lineage and directory of their own.
//!
//! Needs `cargo build --release --workspace` first.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use snapshim_image::{Image, Lineage};
use snapshim_testapps::process::{run_captured, timeout};
use snapshim_testapps::scenario::parse_image_path;
use snapshim_testapps::{
    bail, expect_clean_refusal, AppSpec, Context, Result, Running, Session, Snapshot,
};

/// The lineage an image carries (format 1.4), and its id.
fn lineage_of(path: &Path) -> Result<(Lineage, u64)> {
    let img = Image::open(path).context(format!("open {}", path.display()))?;
    let l = img.meta.lineage.clone().ok_or_else(|| {
        snapshim_testapps::Failure::new(format!("{} has no lineage", path.display()))
    })?;
    Ok((l, img.header.image_id))
}

/// The images in `dir` by number.
fn images(dir: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).context(format!("list {}", dir.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(n) = name
            .strip_prefix("ckpt-")
            .and_then(|r| r.strip_suffix(snapshim_image::IMAGE_SUFFIX))
        {
            if let Ok(n) = n.parse() {
                out.insert(n, p);
            }
        }
    }
    Ok(out)
}

/// A program under `snapshim run`, killed when dropped.
struct Run {
    child: Child,
    /// The first line it wrote on stderr (what the shim announced).
    lines: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `snapshim run --dir DIR [ARGS] -- sleep 600`, until the shim has said where its images go
/// (`lines` lines of stderr).
fn run_sleep(tool: &Path, dir: &Path, extra: &[&str], lines: usize) -> Result<Run> {
    let mut child = Command::new(tool)
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .args(["--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start snapshim run")?;
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let mut got = Vec::new();
    for _ in 0..lines {
        let mut l = String::new();
        err.read_line(&mut l)?;
        got.push(l.trim_end().to_string());
    }
    Ok(Run { child, lines: got })
}

/// Restores `snap` with `options` and returns once the program runs again (the restorer's
/// `--stats` line is written as the threads resume).
fn restore_running(snap: &Snapshot, options: &[&str]) -> Result<Running> {
    let mut r = snap.restore_with(&[options, &["--stats"]].concat())?;
    r.wait_for("CLOCK_MONOTONIC")?;
    Ok(r)
}

fn checkpoint(tool: &Path, pid: u32) -> Result<PathBuf> {
    let c = run_captured(
        Command::new(tool).arg("checkpoint").arg(pid.to_string()),
        timeout(),
    )?;
    if !c.status.success() {
        bail!("checkpoint failed\n{}", c.report());
    }
    parse_image_path(&c.stdout)
        .ok_or_else(|| snapshim_testapps::Failure::new(format!("no image path\n{}", c.report())))
}

#[test]
fn programs_with_the_same_name_get_directories_of_their_own() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?)?;
    let tool = session.tools()?.tool;
    let dir = session.dir().join("same-name");
    let first = run_sleep(&tool, &dir, &[], 1)?;
    let home = dir.join("sleep");
    if !first.lines[0].contains(&format!("images in {}/", home.display())) {
        bail!("the first run announced {:?}", first.lines);
    }
    let second = run_sleep(&tool, &dir, &[], 2)?;
    let beside = dir.join("sleep.2");
    let told = &second.lines[0];
    if !(told.contains("in use") && told.contains(&format!("{}/", beside.display()))) {
        bail!(
            "the second run was not told where its images go: {:?}",
            second.lines
        );
    }
    let a = checkpoint(&tool, first.child.id())?;
    let b = checkpoint(&tool, second.child.id())?;
    if a.parent() != Some(&home) || b.parent() != Some(&beside) {
        bail!(
            "images in the wrong directories: {} and {}",
            a.display(),
            b.display()
        );
    }
    let (la, _) = lineage_of(&a)?;
    let (lb, _) = lineage_of(&b)?;
    if la.id == lb.id || la.generation != 1 || lb.generation != 1 {
        bail!("two original runs must be two lineages of generation 1: {la:?} {lb:?}");
    }
    // Naming the busy directory is refused, before the program runs; nothing changes.
    let before = images(&home)?;
    let c = run_captured(
        Command::new(&tool)
            .arg("run")
            .arg("--dir")
            .arg(&dir)
            .args(["--name", "sleep", "--", "sleep", "600"]),
        timeout(),
    )?;
    expect_clean_refusal(&c, &["in use"])?;
    if images(&home)? != before || !dir.join("sleep").join("latest").exists() {
        bail!("a refused run changed {}", home.display());
    }
    drop((first, second));
    session.passed();
    Ok(())
}

#[test]
fn a_restored_program_is_the_next_generation() -> Result<()> {
    let spec = AppSpec::named("single")?
        .env("SNAPSHIM_INTERVAL", "300ms")
        .env("SNAPSHIM_KEEP", "2");
    let session = Session::new(spec)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let first = app.checkpoint()?;
    app.kill()?;
    let (l1, id1) = lineage_of(first.path())?;
    let gen1 = images(&session.image_dir())?;

    let restored = restore_running(&first, &[])?;
    let second = restored.checkpoint()?;
    let (l2, id2) = lineage_of(second.path())?;
    restored.kill()?;
    let gen2 = images(&session.image_dir())?;

    let again = restore_running(&second, &[])?;
    let third = again.checkpoint()?;
    let (l3, _) = lineage_of(third.path())?;
    again.finish()?.assert_same_output_as_uninterrupted()?;
    let all = images(&session.image_dir())?;

    // No generation removed or replaced an image of an earlier one.
    for (n, p) in gen1.iter().chain(gen2.iter()) {
        if all.get(n) != Some(p) {
            bail!("image {} of an earlier generation is gone", p.display());
        }
    }
    let origin = |l: &Lineage| l.origin.as_ref().map(|o| (o.image_id, o.generation));
    if l1.generation != 1 || l1.origin.is_some() {
        bail!("the original run: {l1:?}");
    }
    if (l2.id, l2.generation, origin(&l2)) != (l1.id, 2, Some((id1, 1))) {
        bail!(
            "the first restore: {l2:?}, expected generation 2 of {:x} from image {id1:x}",
            l1.id
        );
    }
    if (l3.id, l3.generation, origin(&l3)) != (l1.id, 3, Some((id2, 2))) {
        bail!("the second restore: {l3:?}, expected generation 3 from image {id2:x}");
    }
    // Each generation numbers after every image before it; retention keeps 2 per generation.
    for (older, newer, generation) in [(&gen1, &gen2, 2), (&gen2, &all, 3)] {
        let max_before = older.keys().max().copied().unwrap_or(0);
        let own: Vec<u64> = newer
            .iter()
            .filter(|(_, p)| lineage_of(p).is_ok_and(|(l, _)| l.generation == generation))
            .map(|(n, _)| *n)
            .collect();
        if own.is_empty() || own.iter().any(|&n| n <= max_before) || own.len() > 2 {
            bail!("generation {generation}'s images {own:?} (the images before it end at {max_before})");
        }
    }
    Ok(())
}

#[test]
fn one_image_restored_twice_at_once() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let running = restore_running(&img, &[])?;
    // Once it answers a checkpoint, the restored program holds its directory.
    running.checkpoint()?;
    let c = session.try_restore(img.path())?;
    expect_clean_refusal(&c, &["in use"])?;
    if !c.stderr.contains("--new-lineage") {
        bail!(
            "the refusal does not say how to restore a copy beside it\n{}",
            c.report()
        );
    }
    let beside = restore_running(&img, &["--new-lineage"])?;
    let copy = checkpoint(&session.tools()?.tool, beside.pid())?;
    let dir = session.image_dir();
    let mut expected = dir.clone().into_os_string();
    expected.push(".2");
    if copy.parent() != Some(Path::new(&expected)) {
        bail!(
            "the new lineage's image is {}, not in {expected:?}",
            copy.display()
        );
    }
    let (l0, id0) = lineage_of(img.path())?;
    let (lc, _) = lineage_of(&copy)?;
    let from = lc.origin.as_ref().map(|o| o.image_id);
    if lc.id == l0.id || lc.generation != 1 || from != Some(id0) {
        bail!("the copy's lineage {lc:?} (the image's: {l0:?}, id {id0:x})");
    }
    beside.kill()?;
    running.kill()?;
    session.passed();
    Ok(())
}
