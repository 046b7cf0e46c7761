//! Checkpoint → kill -9 → restore finishes with byte-identical output (stdout and output files)
//! to an uninterrupted run: for every app, at random moments, twice in a row, and from a copy of
//! the image after the original image directory is gone.
//!
//! Needs `cargo build --release --workspace` first (the shim, restorer and tool are not
//! dependencies of this crate, so `cargo test` does not build them).

use std::fs;

use snapshim_testapps::{bail, App, Context, Result, Snapshot};

/// The basic scenario: checkpoint at a random moment while the app works, kill it, restore.
fn restores_at_a_random_moment(name: &str) -> Result<()> {
    let app = App::spawn(name)?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// `snapshim checkpoint --kill` (the program's last checkpoint): the threads stay parked from
/// the pause to the commit, the program is gone when the command returns, and the image
/// restores.
#[test]
fn threads_restore_after_their_last_checkpoint() -> Result<()> {
    let mut app = App::spawn("threads")?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint_with(&["--kill"])?;
    if app.is_running()? {
        bail!("the program still runs after snapshim checkpoint --kill returned");
    }
    app.kill()?;
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// 64 MiB rewritten every round, malloc churn on the brk heap.
#[test]
fn single_restores() -> Result<()> {
    restores_at_a_random_moment("single")
}

/// The same in Rust: Vec, HashMap of Strings, BufWriter.
#[test]
fn single_rs_restores() -> Result<()> {
    restores_at_a_random_moment("single-rs")
}

/// ymm0-15, x87 st(0-7), MXCSR and the x87 control word are live across the checkpoint.
#[test]
fn fpu_registers_survive() -> Result<()> {
    restores_at_a_random_moment("fpu")
}

/// Handlers, flags and handler masks, the blocked mask, the alternate stack and the 1 ms
/// ITIMER_REAL all survive, and the timer still ticks afterwards.
#[test]
fn signal_state_survives() -> Result<()> {
    restores_at_a_random_moment("signals")
}

/// Input reopened at its offset, output cut back to its checkpoint-time length and continued,
/// relative paths still resolving (working directory restored).
#[test]
fn files_are_reopened_at_their_offsets() -> Result<()> {
    restores_at_a_random_moment("files")
}

/// CPython with six threads, a queue.Queue and a Lock.
#[test]
fn python_threads_restore() -> Result<()> {
    restores_at_a_random_moment("threads-py")
}

/// Sixteen threads computing, blocked in read() and nanosleep, waiting on condvars, holding
/// locks, being created and joined: twenty checkpoints, each at a random moment in its own
/// twentieth of the run, so together they cover all of it.
#[test]
fn threads_survive_twenty_random_checkpoints() -> Result<()> {
    App::restores_at_moments_spread_over_its_run("threads", 20)
}

/// A restored process is checkpointed again, killed, and restored again (from the image
/// directory, whose `latest` must now be the second image).
#[test]
fn two_checkpoint_restore_cycles_in_a_row() -> Result<()> {
    // Right after READY: well before PHASE 2, which the restored process must then print.
    let second = App::spawn("threads")?.wait_ready()?.two_images()?;
    let session = second.session().clone();
    session
        .restore_from(&session.image_dir())?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// The second machine: only a copy of the image (in a fresh directory) and the program's own
/// files remain; the original image directory is deleted before the restore.
#[test]
fn restores_from_a_copy_after_the_image_directory_is_gone() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let session = img.session().clone();
    let latest =
        fs::canonicalize(session.image_dir().join("latest")).context("resolve the latest link")?;
    let elsewhere = session.dir().join("second-machine");
    fs::create_dir(&elsewhere).context("create the second machine's directory")?;
    let copy = elsewhere.join(latest.file_name().expect("an image has a name"));
    fs::copy(&latest, &copy).context(format!("copy {}", latest.display()))?;
    fs::remove_dir_all(session.image_dir()).context("remove the image directory")?;
    Snapshot::at(&session, copy)
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}
