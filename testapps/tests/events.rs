//! Event objects survive checkpoint → kill -9 → restore: the `events` app (c/events.c) runs an
//! event loop on epoll over eventfds, timerfds, a signalfd and pipes (edge-triggered, one-shot,
//! exclusive, nested, a registration whose number was closed since), prints every round what the
//! kernel says of each object (counts, masks, clocks, flags, registrations with their data
//! words) and checks the rest at the end (expirations not read, time left, signals through the
//! signalfd). A restored run must print exactly what an uninterrupted one does.
//!
//! Inotify watches come back under their numbers and masks, with one `IN_Q_OVERFLOW` per
//! restore telling the program that events may have been lost.
//!
//! A descriptor the restorer cannot rebuild (a pidfd) fails the restore with one line naming
//! it; with `--unrestorable=closed` the program resumes and a read on it fails with EBADF.
//!
//! Needs `cargo build --release --workspace` first.

use snapshim_testapps::{bail, App, AppSpec, Result, Session};

/// Five checkpoints, each at a random moment of its own fifth of the run.
#[test]
fn event_loop_restores_at_moments_spread_over_its_run() -> Result<()> {
    App::restores_at_moments_spread_over_its_run("events", 5)
}

/// The same as an unprivileged user (as `nobody` when the tests run as root): kcmp, the timer
/// ticks ioctl and the inotify overflow need no privilege.
#[test]
fn event_loop_with_inotify_restores_unprivileged() -> Result<()> {
    let spec = AppSpec::named("events")?
        .arg("2500")
        .arg("inotify")
        .unprivileged();
    Session::new(spec)?.restores_from_a_random_moment()
}

/// Under the fork engine (the default for unprivileged users): capture is the same, the image
/// is written by a child.
#[test]
fn event_loop_restores_under_the_fork_engine() -> Result<()> {
    let spec = AppSpec::named("events")?.env("SNAPSHIM_COW", "fork");
    Session::new(spec)?.restores_from_a_random_moment()
}

/// A restored event loop is checkpointed again: what the restorer made is captured as well.
#[test]
fn event_loop_survives_two_cycles() -> Result<()> {
    App::spawn("events")?
        .wait_ready()?
        .two_cycles()?
        .assert_same_output_as_uninterrupted()
}

/// Inotify watches (numbers, masks, paths given relative to the working directory) survive two
/// cycles; each restore gives the program exactly one IN_Q_OVERFLOW, which it answers by
/// looking again, so its output is that of an uninterrupted run.
#[test]
fn inotify_watches_survive_two_cycles_with_an_overflow_each() -> Result<()> {
    let session = Session::new(AppSpec::named("events")?.arg("2500").arg("inotify"))?;
    let done = session.spawn()?.wait_ready()?.two_cycles()?;
    done.assert_same_output_as_uninterrupted()?;
    if !done.stderr.contains("INOTIFY overflows 2") {
        bail!(
            "the program should have seen one IN_Q_OVERFLOW per restore:\n{}",
            done.stderr
        );
    }
    Ok(())
}

/// A pidfd is not restored: the restore stops in one line naming it, before the program runs;
/// with `--unrestorable=closed` it runs on, and its read on that descriptor fails with EBADF,
/// while everything else ends as an uninterrupted run.
#[test]
fn unrestorable_descriptor_fails_the_restore_or_stays_closed() -> Result<()> {
    let session = Session::new(AppSpec::named("events")?.arg("2500").arg("pidfd"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let line = session.expect_restore_refused(img.path(), &["pidfd"])?;
    if !line.contains("descriptor") || !line.contains("--unrestorable=closed") {
        bail!("the refusal does not name the descriptor and the way on: {line:?}");
    }
    let done = img.restore_with(&["--unrestorable=closed"])?.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    for want in ["PIDFD EBADF", "cannot be restored", "fail with EBADF"] {
        if !done.stderr.contains(want) {
            bail!("the restored run's stderr lacks {want:?}:\n{}", done.stderr);
        }
    }
    Ok(())
}
