//! Warm standby: `snapshim-restore --standby DIR` checks the newest image ahead and waits;
//! `snapshim activate` or SIGUSR1 resumes the program, from the newest good image committed
//! by then, with byte-identical output to an uninterrupted run.
//!
//! Which image was used is checked by the program's own output too: the apps print PHASE 2 on
//! stderr halfway, so a program restored from an image taken before PHASE 2 prints it again,
//! one restored from an image taken after it does not.
//!
//! Needs `cargo build --release --workspace` first. Every wait is on a line the standby or the
//! app prints, never a sleep.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use snapshim_testapps::process::{run_captured, timeout};
use snapshim_testapps::{
    bail, expect_clean_refusal, App, Captured, Context, Result, Running, Session,
};

/// The line a standby ends with once it has an image staged and waits.
const WAITING: &str = "waiting for activation";

/// Starts `snapshim-restore --standby TARGET` and waits until it says it is waiting.
fn standby(session: &Arc<Session>, target: &Path) -> Result<Running> {
    let mut sb = session.restore_with(target, &["--standby"])?;
    sb.wait_for(WAITING)?;
    Ok(sb)
}

/// Runs `snapshim activate TARGET`.
fn activate(session: &Session, target: impl AsRef<std::ffi::OsStr>) -> Result<Captured> {
    if session.runs_as_nobody() {
        bail!("these scenarios run the tools as the test's own user");
    }
    let mut cmd = Command::new(session.tools()?.tool);
    cmd.arg("activate").arg(target);
    run_captured(&mut cmd, timeout())
}

/// `snapshim activate` must succeed and name `image`; returns its report.
fn expect_activated_with(c: &Captured, image: &Path) -> Result<String> {
    if !c.status.success() {
        bail!("snapshim activate failed\n{}", c.report());
    }
    let first = c.stdout.lines().next().unwrap_or("");
    if Path::new(first) != image {
        bail!(
            "snapshim activate used {first:?}, expected {}\n{}",
            image.display(),
            c.report()
        );
    }
    if !c.stdout.contains("ms after activation") {
        bail!("snapshim activate reported no resume time\n{}", c.report());
    }
    eprintln!(
        "activate: {}{}",
        c.stdout.trim_end().replace('\n', "; "),
        c.stderr.trim_end().replace('\n', "; ")
    );
    Ok(c.stdout.clone())
}

/// How many lines exactly `PHASE 2` the restored program printed (its stderr is the
/// standby's, after the activation line).
fn phase2_lines_after_activation(stderr: &str) -> Result<usize> {
    let Some(at) = stderr.find("standby: activated by") else {
        bail!("the standby never said it was activated\n--- its stderr ---\n{stderr}");
    };
    Ok(stderr[at..]
        .lines()
        .filter(|l| l.trim_end() == "PHASE 2")
        .count())
}

/// Damages one byte of the first page run of `image`, in place (page data only: header and
/// metadata stay readable).
fn damage_page_data(image: &Path) -> Result<()> {
    let img = snapshim_image::Image::open(image).context(format!("open {}", image.display()))?;
    let run = img.meta.runs.first().ok_or("the image has no page runs")?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .context(format!("open {} for writing", image.display()))?;
    let mut b = [0u8; 1];
    img.file
        .read_exact_at(&mut b, run.file_off + 100)
        .context("read a page byte")?;
    f.write_all_at(&[!b[0]], run.file_off + 100)
        .context("damage a page byte")?;
    Ok(())
}

/// The basic scenario: checkpoint, kill -9, standby on the image directory, `snapshim activate
/// DIR`: the program finishes with identical output, and the report names the image.
#[test]
fn activation_by_snapshim_activate_gives_identical_output() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let session = img.session().clone();
    let sb = standby(&session, &session.image_dir())?;
    let c = activate(&session, session.image_dir())?;
    expect_activated_with(&c, img.path())?;
    sb.finish()?.assert_same_output_as_uninterrupted()
}

/// An image committed while the standby waits is the one activated: the first image is taken
/// before PHASE 2 and staged, the second after PHASE 2, and the activation comes at once (the
/// second may still be under its checks then: the activation waits for them).
#[test]
fn a_newer_image_committed_while_waiting_is_the_one_activated() -> Result<()> {
    let mut app = App::spawn("threads")?.wait_ready()?;
    let first = app.checkpoint()?;
    let session = first.session().clone();
    let sb = standby(&session, &session.image_dir())?;
    app.wait_for("PHASE 2")?;
    let second = app.checkpoint()?;
    app.kill()?;
    let c = activate(&session, session.image_dir())?;
    expect_activated_with(&c, second.path())?;
    let done = sb.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    // Restored from the second image, past PHASE 2: the program must not print it again.
    let n = phase2_lines_after_activation(&done.stderr)?;
    if n != 0 {
        bail!(
            "the restored program printed PHASE 2 {n} time(s): it was restored from the older \
             image\n--- standby stderr ---\n{}",
            done.stderr
        );
    }
    Ok(())
}

/// SIGUSR1 activates too, and the resume time is reported on stderr.
#[test]
fn activation_by_signal() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let session = img.session().clone();
    let sb = standby(&session, &session.image_dir())?;
    sb.signal(libc::SIGUSR1)?;
    let done = sb.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    for want in [
        "standby: activated by a signal",
        "snapshim-restore: resuming after ",
    ] {
        if !done.stderr.contains(want) {
            bail!(
                "no {want:?} on the standby's stderr\n--- its stderr ---\n{}",
                done.stderr
            );
        }
    }
    Ok(())
}

/// The newest image is damaged: the standby says so, stages the previous one (taken before
/// PHASE 2) and resumes from it.
#[test]
fn a_damaged_newest_image_falls_back_to_the_previous_good_one() -> Result<()> {
    let mut app = App::spawn("threads")?.wait_ready()?;
    let first = app.checkpoint()?;
    app.wait_for("PHASE 2")?;
    let second = app.checkpoint()?;
    app.kill()?;
    damage_page_data(second.path())?;
    let session = first.session().clone();
    let sb = standby(&session, &session.image_dir())?;
    let said = sb.stderr_so_far();
    let second_name = second.path().file_name().unwrap().to_string_lossy();
    if !said
        .lines()
        .any(|l| l.contains("damaged") && l.contains(&*second_name))
    {
        bail!("the standby did not report the damaged {second_name}\n--- its stderr ---\n{said}");
    }
    let c = activate(&session, session.image_dir())?;
    expect_activated_with(&c, first.path())?;
    let done = sb.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    if phase2_lines_after_activation(&done.stderr)? != 1 {
        bail!(
            "restored from the image taken before PHASE 2, the program must print it once\n\
             --- standby stderr ---\n{}",
            done.stderr
        );
    }
    Ok(())
}

/// A damaged image committed while the standby waits is reported, and the staged one is used.
#[test]
fn a_damaged_image_arriving_while_waiting_is_reported_and_skipped() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let session = img.session().clone();
    let mut sb = standby(&session, &session.image_dir())?;
    // A damaged copy committed the way the shim commits: written aside, renamed into place.
    let name = next_image_name(img.path())?;
    let damaged = session.damaged_copy(img.path(), "newer", |_| {})?;
    damage_page_data(&damaged)?;
    std::fs::rename(&damaged, session.image_dir().join(&name))
        .context("commit the damaged image")?;
    // The standby's next line: the verdict on the new image.
    sb.wait_for(WAITING)?;
    let said = sb.stderr_so_far();
    if !said
        .lines()
        .any(|l| l.contains("not usable") && l.contains(&name))
    {
        bail!("the standby did not report the damaged {name}\n--- its stderr ---\n{said}");
    }
    let c = activate(&session, session.image_dir())?;
    expect_activated_with(&c, img.path())?;
    sb.finish()?.assert_same_output_as_uninterrupted()
}

/// Clear one-line errors: no standby to activate, a second standby on the same directory, a
/// directory without images, only damaged images. Activation by PID works.
#[test]
fn refusals_are_one_clear_line() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let session = img.session().clone();
    let dir = session.image_dir();

    let c = activate(&session, &dir)?;
    expect_clean_refusal(&c, &["no standby is waiting"])?;

    let empty = session.dir().join("empty");
    std::fs::create_dir(&empty).context("create an empty directory")?;
    let c = session.try_restore_with(&empty, &["--standby"], &[])?;
    expect_clean_refusal(&c, &["no snapshim image", "no image"])?;

    let only_damaged = session.dir().join("only-damaged");
    std::fs::create_dir(&only_damaged).context("create a directory")?;
    let copy = only_damaged.join(file_name(img.path()));
    std::fs::copy(img.path(), &copy).context("copy the image")?;
    damage_page_data(&copy)?;
    let c = session.try_restore_with(&only_damaged, &["--standby"], &[])?;
    expect_clean_refusal(&c, &["no usable image"])?;

    let sb = standby(&session, &dir)?;
    let c = session.try_restore_with(&dir, &["--standby"], &[])?;
    let line = expect_clean_refusal(&c, &["already waiting"])?;
    if !line.contains(&sb.pid().to_string()) {
        bail!(
            "the refusal does not name the waiting standby (PID {}): {line}",
            sb.pid()
        );
    }
    let c = activate(&session, std::process::id().to_string())?;
    expect_clean_refusal(&c, &["no standby is waiting as PID"])?;
    let c = activate(&session, sb.pid().to_string())?;
    expect_activated_with(&c, img.path())?;
    sb.finish()?.assert_same_output_as_uninterrupted()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// The name the shim would give the image after `image`.
fn next_image_name(image: &Path) -> Result<String> {
    let name = file_name(image);
    let seq: u64 = name
        .strip_prefix("ckpt-")
        .and_then(|s| s.strip_suffix(snapshim_image::IMAGE_SUFFIX))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected image name {name}"))?;
    Ok(snapshim_image::image_file_name(seq + 1))
}

/// Fencing ground: an image of an older generation of its lineage than the newest the
/// directory's lock file records (written before a later restore: a late copy from a stale
/// primary) is never staged, even numbered after every other image; the standby takes the
/// newest image of the current generation.
#[test]
fn an_image_of_a_stale_generation_is_not_staged() -> Result<()> {
    let app = App::spawn("threads")?.wait_ready()?;
    let first = app.checkpoint()?;
    app.kill()?;
    let session = first.session().clone();
    let mut restored = first.restore_with(&["--stats"])?;
    restored.wait_for("CLOCK_MONOTONIC")?;
    let second = restored.checkpoint()?;
    restored.kill()?;
    let stale = session.image_dir().join("ckpt-00000099.snap");
    std::fs::copy(first.path(), &stale).context("copy the first image")?;
    let sb = standby(&session, &session.image_dir())?;
    let c = activate(&session, session.image_dir())?;
    expect_activated_with(&c, second.path())?;
    let done = sb.finish()?;
    if !done.stderr.contains("generation 2 has run since") {
        bail!(
            "the standby did not say why it left the stale image\n--- its stderr ---\n{}",
            done.stderr
        );
    }
    done.assert_same_output_as_uninterrupted()
}
