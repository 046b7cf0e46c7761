//! No EINTR the program would not see without snapshim: the `waits` app keeps a thread
//! blocked in each call a signal handler interrupts for good (epoll_wait, epoll_pwait, poll,
//! ppoll, select, pselect, nanosleep, clock_nanosleep, usleep, sigtimedwait, sem_timedwait,
//! pthread_cond_timedwait, pause, sigsuspend; with and without timeouts) and prints FAIL if
//! one returns EINTR, while its own SIGUSR1 must still interrupt pause and sigsuspend. The
//! shim's quiesce signal reaches each of those threads at every checkpoint, and a restored
//! thread resumes by returning from it. Needs `cargo build --release --workspace` first.

use snapshim_testapps::{AppSpec, Result, Session};

/// Five checkpoints at random moments of one run (each within a fifth of the checkpoint
/// window, so all fall before the end): output identical to an uninterrupted run. The run is
/// eight times the default (24000 rounds, a few seconds): five checkpoints of up to 0.7 s each
/// on a loaded machine did not always fit in the default's 0.8 s.
#[test]
fn blocked_calls_see_no_eintr_at_checkpoints() -> Result<()> {
    const CHECKPOINTS: u32 = 5;
    let session = Session::new(AppSpec::named("waits")?.arg("24000"))?;
    let mut app = session.spawn()?.wait_ready()?;
    for _ in 0..CHECKPOINTS {
        let d = session.checkpoint_window()? / CHECKPOINTS;
        app = app.pause(d.mul_f64(session.random_unit()));
        app.checkpoint()?;
    }
    app.finish()?.assert_same_output_as_uninterrupted()
}

/// Three checkpoints right after READY, SIGKILL, restore; the restored program checkpointed
/// again after PHASE 2, killed and restored once more, epoll waiters included. The run is long
/// (24000 rounds, about 4.5 s) so that the
/// three checkpoints are taken before PHASE 2 (half-way) even on a loaded machine: at 3000
/// rounds, three checkpoints of 0.1-0.5 s each on a busy CI machine passed it.
#[test]
fn blocked_calls_see_no_eintr_after_restores() -> Result<()> {
    let spec = AppSpec::named("waits")?.arg("24000");
    let session = Session::new(spec)?;
    let app = session.spawn()?.wait_ready()?;
    app.checkpoint()?;
    app.checkpoint()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let mut restored = img.restore()?;
    restored.wait_for("PHASE 2")?;
    let img2 = restored.checkpoint()?;
    restored.kill()?;
    img2.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// The program's own SIGUSR2 handler (HotSpot and ruby have one) runs: snapshim's checkpoint
/// signal is SIGRTMAX by default. Three checkpoints by `snapshim checkpoint`, output identical
/// (the app checks every raise reached its handler, and that sigaction reports it).
#[test]
fn the_programs_sigusr2_handler_runs() -> Result<()> {
    const CHECKPOINTS: u32 = 3;
    let session = Session::new(AppSpec::named("usr2")?)?;
    let mut app = session.spawn()?.wait_ready()?;
    for _ in 0..CHECKPOINTS {
        let d = session.checkpoint_window()? / CHECKPOINTS;
        app = app.pause(d.mul_f64(session.random_unit()));
        app.checkpoint()?;
    }
    app.finish()?.assert_same_output_as_uninterrupted()
}
