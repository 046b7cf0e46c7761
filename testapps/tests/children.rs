//! A program with child processes: snapshim does not checkpoint process trees yet, so a
//! checkpoint of it is refused with one line naming the children, nothing is committed, and
//! the program runs on unharmed (the refusal comes after the uffd engine has protected its
//! memory, which must be given back).
//!
//! Needs `cargo build --release --workspace` first.

use snapshim_testapps::process::{children_of, command_name, send_signal};
use snapshim_testapps::{bail, AppSpec, Context, Failure, Result, Session};

#[test]
fn a_checkpoint_of_a_program_with_children_is_refused_and_the_program_runs_on() -> Result<()> {
    // `sleep` and the `{ ...; cat; }` group are children of bash when "started" is printed.
    let script = "sleep 1000 | { echo started >&2; cat; }; echo after";
    let spec = AppSpec::new("pipeline", "/bin/bash".into(), &["-c", script]);
    let session = Session::new(spec)?;
    let mut app = session.spawn_without_reference()?;
    app.wait_for("started")?;
    let c = app.try_checkpoint()?;
    if c.status.success() {
        bail!(
            "the checkpoint of a program with children succeeded\n{}",
            c.report()
        );
    }
    let line = c.stderr.trim_end();
    if line.lines().count() != 1
        || !line.contains("child processes")
        || !line.contains("sleep")
        || !line.contains("process trees")
    {
        bail!(
            "the refusal is not one line naming the children\n{}",
            c.report()
        );
    }
    let images = snapshim_image::list_images(&session.image_dir()).unwrap_or_default();
    if !images.is_empty() {
        bail!("a refused checkpoint left images: {images:?}");
    }
    // The program goes on: end its `sleep`, and the pipeline and the script finish.
    let sleep = children_of(app.pid())
        .into_iter()
        .find(|&c| command_name(c).as_deref() == Some("sleep"))
        .ok_or_else(|| Failure::new("the script's sleep is gone".to_string()))?;
    send_signal(sleep, libc::SIGTERM).context("end the script's sleep")?;
    let done = app.finish()?;
    done.assert_exit_code(0)?;
    let out = std::fs::read_to_string(session.stdout_path()).context("read out.txt")?;
    if out != "after\n" {
        bail!("the script printed {out:?}, not \"after\\n\"");
    }
    session.passed();
    Ok(())
}
