//! Restores in new PID and time namespaces: the program keeps its PID and thread IDs and its
//! clocks go on from the checkpoint; signals and the exit status pass through the restorer and
//! the namespace's reaper; where namespaces are refused the restore goes on without them after
//! one warning. The `ids` app checks all of it from inside (getpid, gettid of five threads,
//! CLOCK_MONOTONIC and CLOCK_BOOTTIME never below an earlier reading, /proc/self) and prints
//! FAIL otherwise, so an identical output proves it.
//!
//! Needs `cargo build --release --workspace` first.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use snapshim_testapps::{bail, expect_clean_refusal, needs, AppSpec, Failure, Result, Session};

/// The restorer's own warning when it goes on without namespaces.
const FALLBACK_WARNING: &str = "warning: restoring without namespaces";

fn no_fallback_warning(stderr: &str) -> Result<()> {
    if let Some(l) = stderr.lines().find(|l| l.contains(FALLBACK_WARNING)) {
        bail!("the restore went on without namespaces: {l}");
    }
    Ok(())
}

/// Checkpoint at a random moment, kill, restore: identical output, so the IDs never changed.
fn ids_survive(spec: AppSpec) -> Result<()> {
    let session = Session::new(spec)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let fin = img.restore()?.finish()?;
    no_fallback_warning(&fin.stderr)?;
    fin.assert_same_output_as_uninterrupted()
}

#[test]
fn pid_and_thread_ids_survive_a_restore() -> Result<()> {
    ids_survive(AppSpec::named("ids")?)
}

/// The same without any privilege: the restorer makes a user namespace first.
#[test]
fn pid_and_thread_ids_survive_a_restore_as_nobody() -> Result<()> {
    ids_survive(AppSpec::named("ids")?.unprivileged())
}

/// A program restored in its namespace is checkpointed again (`snapshim checkpoint` given the
/// restorer's PID reaches it from outside), killed, and restored again from outside: the IDs
/// are still the first run's, and /proc inside matched the namespace at the second checkpoint.
#[test]
fn two_cycles_keep_the_ids_as_nobody() -> Result<()> {
    let session = Session::new(AppSpec::named("ids")?.unprivileged())?;
    let app = session.spawn()?.wait_ready()?;
    let first = app.checkpoint()?;
    app.kill()?;
    let mut restored = first.restore()?;
    restored.wait_for("PHASE 2")?;
    let second = restored.checkpoint()?;
    no_fallback_warning(&restored.stderr_so_far())?;
    restored.kill()?;
    if second.path() == first.path() {
        bail!("the second checkpoint reused the first image's name");
    }
    session
        .restore_from(&session.image_dir())?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// The "first machine" is a time namespace 30 days ahead (as if up for 30 days longer than
/// this one): restored here, the program's clocks must go on from where they were, not jump
/// back by 30 days. The app runs in `may-change` mode so that only the clocks decide, and the
/// same image restored with `--no-namespace` must show the jump: the check can fail.
#[test]
fn clocks_go_on_from_the_checkpoint_on_a_machine_up_for_less_time() -> Result<()> {
    if !needs::root("`unshare --time` for the first machine")? {
        return Ok(());
    }
    let ids = AppSpec::named("ids")?;
    let spec = AppSpec {
        program: PathBuf::from("/usr/bin/unshare"),
        args: vec![
            "--time".into(),
            "--monotonic=2592000".into(),
            "--boottime=2592000".into(),
            ids.program.to_string_lossy().into_owned(),
            "120".into(),
            "may-change".into(),
        ],
        ..ids
    };
    let session = Session::new(spec)?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let fin = img.restore()?.finish()?;
    no_fallback_warning(&fin.stderr)?;
    fin.assert_same_output_as_uninterrupted()?;

    let plain = session
        .restore_from_with(img.path(), &["--no-namespace"], &[])?
        .finish()?;
    if plain.status.code() != Some(1) || !plain.stderr.contains("CLOCK_MONOTONIC went back") {
        bail!(
            "restored without a time namespace, the app should have seen its monotonic clock \
             go back by 30 days and failed; it ended with {:?}\n--- stderr ---\n{}",
            plain.status,
            plain.stderr
        );
    }
    Ok(())
}

/// The restorer passes signals to the program through the namespace's reaper and ends the way
/// the program did: SIGUSR1 makes the app exit with status 42, SIGTERM kills it.
#[test]
fn signals_and_exit_status_pass_through_the_reaper() -> Result<()> {
    let session = Session::new(AppSpec::named("ids")?.arg("40").arg("hold"))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;

    let mut restored = img.restore()?;
    restored.wait_for("WAITING")?;
    restored.signal(libc::SIGUSR1)?;
    let fin = restored.finish()?;
    no_fallback_warning(&fin.stderr)?;
    fin.assert_exit_code(42)?;

    let mut restored = img.restore()?;
    restored.wait_for("WAITING")?;
    restored.signal(libc::SIGTERM)?;
    let fin = restored.finish()?;
    if fin.status.signal() != Some(libc::SIGTERM) {
        bail!(
            "after SIGTERM the restore ended with {:?}, not killed by SIGTERM\n--- stderr ---\n{}",
            fin.status,
            fin.stderr
        );
    }
    session.passed();
    Ok(())
}

/// `--no-namespace`: the restore works as before, the IDs change (the app says so), and no
/// warning is printed since it was asked for.
#[test]
fn no_namespace_restores_with_new_ids_and_no_warning() -> Result<()> {
    let session = Session::new(AppSpec::named("ids")?.arg("120").arg("may-change"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let fin = session
        .restore_from_with(img.path(), &["--no-namespace"], &[])?
        .finish()?;
    if fin.stderr.contains(FALLBACK_WARNING) {
        bail!(
            "--no-namespace printed the fallback warning\n{}",
            fin.stderr
        );
    }
    if !fin.stderr.contains("at the end: changed") {
        bail!(
            "without a namespace the app should report new IDs\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    fin.assert_same_output_as_uninterrupted()
}

/// A system that refuses user namespaces, for real: the restorer runs in a user namespace whose
/// `user.max_user_namespaces` is 0, without capabilities. It restores without namespaces after
/// exactly one warning line; with `--require-exact-pids` it refuses with one line instead.
/// Needs no root: `user.max_user_namespaces` is per user namespace, and the root of the one
/// `unshare --user --map-root-user` makes may set it there.
#[test]
fn refused_namespaces_fall_back_with_one_warning() -> Result<()> {
    let wrapper = [
        "/usr/bin/unshare",
        "--user",
        "--map-root-user",
        "/bin/sh",
        "-c",
        "echo 0 > /proc/sys/user/max_user_namespaces && \
         exec setpriv --bounding-set=-all --inh-caps=-all \"$0\" \"$@\"",
    ];
    let session = Session::new(AppSpec::named("ids")?.arg("120").arg("may-change"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;

    let refused = session.try_restore_with(img.path(), &["--require-exact-pids"], &wrapper)?;
    expect_clean_refusal(&refused, &["PID"]).map_err(|e| {
        Failure::new(format!(
            "--require-exact-pids where namespaces are refused: {e}"
        ))
    })?;

    let fin = session
        .restore_from_with(img.path(), &[], &wrapper)?
        .finish()?;
    let warnings = fin
        .stderr
        .lines()
        .filter(|l| l.contains(FALLBACK_WARNING))
        .count();
    if warnings != 1 {
        bail!(
            "expected one fallback warning, got {warnings}\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    if !fin.stderr.contains("at the end: changed") {
        bail!(
            "the fallback should give new IDs\n--- stderr ---\n{}",
            fin.stderr
        );
    }
    fin.assert_same_output_as_uninterrupted()
}
