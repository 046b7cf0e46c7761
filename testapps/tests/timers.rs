//! POSIX timers (`timer_create`) and pending signals across checkpoints and restores. The
//! `timers` app has four timers (CLOCK_MONOTONIC and CLOCK_REALTIME; SIGEV_SIGNAL with a value,
//! SIGEV_THREAD_ID, SIGEV_NONE; one-shot and periodic; IDs printed) and signals blocked and
//! pending for the process and for a thread (SIGUSR1, SIGUSR2, real-time ones with sigqueue
//! values), checks every tick's siginfo, and at the end that the timers are armed as set, that
//! every pending signal is still there with its siginfo, and that every timer deletes cleanly.
//! ruby keeps a POSIX timer of its own (SIGVTALRM), which it deletes at exit.
//! Needs `cargo build --release --workspace` first.

use snapshim_testapps::{needs, AppSpec, Failure, Finished, Result, Session};

/// The restored program said nothing about timers it could not make, and ran as the
/// uninterrupted one did.
fn assert_restored_cleanly(done: Finished) -> Result<()> {
    if done.stderr.contains("POSIX timer") {
        return Err(Failure::new(format!(
            "the restore complained about a timer:\n{}",
            done.stderr
        )));
    }
    done.assert_same_output_as_uninterrupted()
}

/// Three checkpoints at random moments of one run, no restore: the running program keeps its
/// pending signals (dequeued to be read, queued again before it resumes) and its timers.
#[test]
fn timers_and_pending_signals_survive_checkpoints() -> Result<()> {
    const CHECKPOINTS: u32 = 3;
    let session = Session::new(AppSpec::named("timers")?)?;
    let mut app = session.spawn()?.wait_ready()?;
    for _ in 0..CHECKPOINTS {
        let d = session.checkpoint_window()? / CHECKPOINTS;
        app = app.pause(d.mul_f64(session.random_unit()));
        app.checkpoint()?;
    }
    app.finish()?.assert_same_output_as_uninterrupted()
}

/// Checkpoint at a random moment of the first half, SIGKILL, restore: the same timer IDs, clocks, notifications,
/// intervals and time left, and the pending signals with their siginfo; then the restored
/// program is checkpointed again after PHASE 2, killed and restored once more.
#[test]
fn timers_and_pending_signals_come_back_after_restores() -> Result<()> {
    let session = Session::new(AppSpec::named("timers")?)?;
    // Before PHASE 2 (halfway), which the restored program is waited for.
    let before_phase2 = session
        .checkpoint_window()?
        .mul_f64(0.4 * session.random_unit());
    let app = session.spawn()?.wait_ready()?.pause(before_phase2);
    assert_restored_cleanly(app.two_cycles()?)
}

/// A plain ruby script (ruby's timer thread uses a POSIX timer): checkpointed, killed,
/// restored, it exits 0 with the output of an uninterrupted run.
#[test]
fn a_ruby_script_restores_and_exits_cleanly() -> Result<()> {
    const RUBY: &str = "/usr/bin/ruby";
    if !needs::program(RUBY, "ruby")? {
        return Ok(());
    }
    let script = r##"
        $stderr.puts "READY"
        x = 1
        300.times do |i|
          20000.times { |j| x = (x * 6364136223846793005 + j) % 18446744073709551557 }
          $stderr.puts "PHASE 2" if i == 150
          puts "#{i} #{x}" if i % 20 == 0
        end
        t = Thread.new { 3.times.map { |k| k * x % 1000 } }
        puts t.value.inspect
        puts "PASS"
    "##;
    let session = Session::new(AppSpec::new("ruby", RUBY.into(), &["-e", script]))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    assert_restored_cleanly(img.restore()?.finish()?)
}
