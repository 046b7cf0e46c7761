//! The operator's command line (issue 13): `snapshim ps`, `--json` on `verify` and `ps`,
//! `-v`/`--log` of a checkpoint and of a restore, and no progress lines when stderr is not a
//! terminal.
//!
//! Needs `cargo build --release --workspace` first.

use std::process::Command;

use snapshim_testapps::process::{run_captured, timeout};
use snapshim_testapps::{bail, App, Context, Result};

/// `snapshim ps` lists a program under the shim with its directory, generation and last
/// checkpoint, as text and as JSON; a restored one as the next generation.
#[test]
fn ps_lists_programs_with_their_directory_and_last_checkpoint() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let session = app.session().clone();
    let tool = session.tools()?.tool;
    let img = app.checkpoint()?;
    let ps = |json: bool| -> Result<String> {
        let mut cmd = Command::new(&tool);
        cmd.arg("ps");
        if json {
            cmd.arg("--json");
        }
        let c = run_captured(&mut cmd, timeout())?;
        if !c.status.success() {
            bail!("snapshim ps failed\n{}", c.report());
        }
        Ok(c.stdout)
    };
    let doc: serde_json::Value = serde_json::from_str(&ps(true)?).context("ps --json")?;
    let me = doc["programs"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pid"] == app.pid()))
        .cloned()
        .unwrap_or_default();
    let dir = session.image_dir();
    if me["image_dir"] != dir.to_str().unwrap_or_default()
        || me["generation"] != 1
        || me["last_checkpoint"]["image"] != img.path().to_str().unwrap_or_default()
        || me["checkpointing"] != false
    {
        bail!("ps --json says of PID {}: {me:#}", app.pid());
    }
    let text = ps(false)?;
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&app.pid().to_string()))
        .unwrap_or_default();
    if !(line.contains("ckpt-") && line.contains(dir.to_str().unwrap_or_default())) {
        bail!("ps does not show PID {} with its image:\n{text}", app.pid());
    }
    app.kill()?;
    let mut restored = img.restore_with(&["--stats"])?;
    restored.wait_for("CLOCK_MONOTONIC")?;
    let again = restored.checkpoint()?;
    let doc: serde_json::Value = serde_json::from_str(&ps(true)?).context("ps --json")?;
    let gen2 = doc["programs"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p["last_checkpoint"]["image"] == again.path().to_str().unwrap_or(""))
        })
        .cloned()
        .unwrap_or_default();
    if gen2["generation"] != 2 || gen2["restored_from"] != img.path().to_str().unwrap_or("") {
        bail!("ps --json of the restored program: {gen2:#}\n{doc:#}");
    }
    restored.kill()?;
    session.passed();
    Ok(())
}

/// `verify --json`, `checkpoint -v --log`, `snapshim-restore --log`; no progress line when stderr
/// is a pipe.
#[test]
fn json_verbose_and_log_say_what_was_done() -> Result<()> {
    let app = App::spawn("single")?.wait_ready()?;
    let session = app.session().clone();
    let tools = session.tools()?;
    let log = session.dir().join("ops.log");
    let c = run_captured(
        Command::new(&tools.tool)
            .args(["checkpoint", "-v", "--log"])
            .arg(&log)
            .arg(app.pid().to_string()),
        timeout(),
    )?;
    if !c.status.success() || !c.stdout.contains("pause") || !c.stdout.contains("quiesce") {
        bail!(
            "checkpoint -v does not show the pause's phases\n{}",
            c.report()
        );
    }
    let logged = std::fs::read_to_string(&log).context("read the log")?;
    let pid_line = format!("checkpoint of PID {}: image ", app.pid());
    if !logged.contains(&pid_line) || !logged.contains("quiesce") {
        bail!("the checkpoint log holds:\n{logged}");
    }
    let img = session.image_dir().join(snapshim_image::LATEST);
    let c = run_captured(
        Command::new(&tools.tool)
            .args(["verify", "--json"])
            .arg(&img),
        timeout(),
    )?;
    let doc: serde_json::Value = serde_json::from_str(&c.stdout).context("verify --json")?;
    if !c.status.success()
        || doc["ok"] != true
        || doc["page_bytes_checked"].as_u64().unwrap_or(0) == 0
        || doc["lineage"]["generation"] != 1
        || !c.stderr.is_empty()
    {
        bail!("verify --json\n{}", c.report());
    }
    let c = run_captured(Command::new(&tools.tool).arg("verify").arg(&img), timeout())?;
    if !c.status.success() || !c.stderr.is_empty() {
        bail!(
            "verify wrote on stderr, which is not a terminal\n{}",
            c.report()
        );
    }
    app.kill()?;
    let restore_log = session.dir().join("restore.log");
    let mut restored = session.restore_with(
        &img,
        &["--stats", &format!("--log={}", restore_log.display())],
    )?;
    restored.wait_for("CLOCK_MONOTONIC")?;
    let logged = std::fs::read_to_string(&restore_log).context("read the restore log")?;
    for step in [
        "opened",
        "page checksums",
        "generation 2",
        "descriptors",
        "jumping",
    ] {
        if !logged.contains(step) {
            bail!("the restore log has no {step:?} line:\n{logged}");
        }
    }
    restored.finish()?.assert_same_output_as_uninterrupted()
}
