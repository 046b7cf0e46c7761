//! A crash at any instant of a checkpoint loses nothing (DESIGN §3, commit; issue 13).
//!
//! - `killed_at_random_instants_during_checkpoints`: the `single` app takes one checkpoint, then
//!   a second is started with the checkpoint signal and the app is killed with SIGKILL at a
//!   random instant within about one and a half checkpoint durations (so in the pause, the
//!   flush, the commit, or just after), 50 times over the three engines. Each time the newest
//!   committed image (`latest`) restores and the run ends with byte-identical output.
//! - `a_killed_writer_fails_the_checkpoint_and_loses_nothing`: with the fork engine, the writer
//!   process is killed at a random instant of its life: `snapshim checkpoint` says so in one
//!   line, the program runs on, a next checkpoint succeeds, and its image restores.
//! - `a_full_disk_fails_the_checkpoint_and_loses_nothing` (as root): the image directory is a
//!   tmpfs that holds the first image but not a second; with each engine the second checkpoint
//!   fails with one line naming the lack of space, the program runs on, `latest` is still the
//!   first image, and it restores.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshim_testapps::{bail, needs, AppSpec, Context, Result, Session, Snapshot};

const APP: &str = "single";
const ENGINES: [&str; 3] = ["uffd", "fork", "stop"];
const KILLS: usize = 50;

fn spec(engine: &str) -> Result<AppSpec> {
    // Twice the default 72 rounds (about 3 s), so the app outlives two checkpoints with any
    // engine.
    Ok(AppSpec::named(APP)?.env("SNAPSHIM_COW", engine).arg("144"))
}

/// The committed image `latest` points at.
fn latest(session: &Arc<Session>) -> Result<Snapshot> {
    let link = session.image_dir().join(snapshim_image::LATEST);
    let path = fs::canonicalize(&link).context(format!("resolve {}", link.display()))?;
    Ok(Snapshot::at(session, path))
}

/// `total_us` of an image's statistics (`ckpt-N.json`): signal to commit.
fn checkpoint_duration(img: &Snapshot) -> Result<Duration> {
    let stats = img.path().with_extension("json");
    let text = fs::read_to_string(&stats).context(format!("read {}", stats.display()))?;
    let us = text
        .split("\"total_us\": ")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| snapshim_testapps::Failure::new(format!("no total_us in {text}")))?;
    Ok(Duration::from_micros(us))
}

#[test]
fn killed_at_random_instants_during_checkpoints() -> Result<()> {
    for i in 0..KILLS {
        let engine = ENGINES[i % ENGINES.len()];
        let session = Session::new(spec(engine)?)?;
        let app = session.spawn()?.wait_ready()?;
        let first = app.checkpoint()?;
        let took = checkpoint_duration(&first)?;
        let at = took.mul_f64(1.5 * session.random_unit());
        eprintln!("[{i}] {engine}: a checkpoint takes {took:?}; killing {at:?} into the next");
        app.signal(snapshim_image::settings::default_signal())?;
        let app = app.pause(at);
        app.kill()?;
        latest(&session)?
            .restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()?;
    }
    Ok(())
}

/// The children of every thread of `pid` (the fork engine's writer is one).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.children().ok())
        .flatten()
        .collect()
}

#[test]
fn a_killed_writer_fails_the_checkpoint_and_loses_nothing() -> Result<()> {
    for round in 0..5 {
        let session = Session::new(spec("fork")?)?;
        let mut app = session.spawn()?.wait_ready()?;
        app.checkpoint()?;
        let tool = session.tools()?.tool;
        let pid = app.pid();
        // The request runs in a thread of ours; the writer appears as the app's child.
        let waiter = std::thread::spawn(move || {
            Command::new(&tool)
                .arg("checkpoint")
                .arg(pid.to_string())
                .output()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let writer = loop {
            if let Some(&w) = children(app.pid()).first() {
                break w;
            }
            if Instant::now() > deadline {
                bail!("no writer process appeared within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // A random instant of the writer's life (it lives for tens of milliseconds).
        std::thread::sleep(Duration::from_millis(40).mul_f64(session.random_unit()));
        let killed = snapshim_testapps::process::send_signal(writer, libc::SIGKILL).is_ok();
        let out = waiter
            .join()
            .expect("checkpoint thread")
            .context("snapshim checkpoint")?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // The writer had committed before the signal arrived: nothing to check this round.
            eprintln!("[{round}] the writer finished first (killed: {killed})");
        } else {
            if stderr.lines().count() != 1 || !stderr.contains("died of signal 9") {
                bail!("a killed writer should fail the checkpoint in one line, got: {stderr}");
            }
            eprintln!("[{round}] {}", stderr.trim_end());
        }
        if !app.is_running()? {
            bail!("the program did not survive its writer's death");
        }
        // The directory still works: a new checkpoint, which restores.
        let next = app.checkpoint()?;
        app.kill()?;
        next.restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()?;
    }
    Ok(())
}

/// A tmpfs mounted on a directory for as long as it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs> {
        fs::create_dir_all(dir).context(format!("create {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir))?;
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, bytes: u64) -> Result<()> {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.0))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().context(format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn a_full_disk_fails_the_checkpoint_and_loses_nothing() -> Result<()> {
    if !needs::root("to mount a small tmpfs as the image directory")? {
        return Ok(());
    }
    for engine in ENGINES {
        let session = Session::new(spec(engine)?)?;
        let disk = Tmpfs::mount(&session.snapshim_dir(), 1 << 30)?;
        let mut app = session.spawn()?.wait_ready()?;
        let first = app.checkpoint()?;
        let used: u64 = fs::read_dir(session.image_dir())
            .context("list the image directory")?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        // Room for what is there and half an image more.
        disk.resize(used + used / 2)?;
        let c = app.try_checkpoint()?;
        if c.status.success() {
            bail!(
                "{engine}: a checkpoint into a full tmpfs succeeded:\n{}",
                c.report()
            );
        }
        let err = c.stderr.trim_end();
        if err.lines().count() != 1 || !err.contains("No space left on device") {
            bail!(
                "{engine}: want one line naming the lack of space, got:\n{}",
                c.report()
            );
        }
        eprintln!("[{engine}] {err}");
        if !app.is_running()? {
            bail!("{engine}: the program did not survive a full disk");
        }
        if latest(&session)?.path() != first.path() {
            bail!("{engine}: latest no longer points at the last good image");
        }
        app.kill()?;
        first
            .restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()?;
        drop(disk);
    }
    Ok(())
}
