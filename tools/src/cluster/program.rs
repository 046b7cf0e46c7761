//! The service's program on this node, as the agent starts, watches and stops it: fresh under
//! `snapshim run`, restored by `snapshim-restore`, or kept warm by `snapshim-restore --standby`
//! and woken by `snapshim activate`; checkpointed for the last time by `snapshim checkpoint
//! --kill`. Each is a child process of the agent; the agent never links the shim or the
//! restorer, it runs them as a user would.
//!
//! Every child gets a process group of its own, so that the agent's terminal signals do not
//! reach it, and dies with the agent (`PR_SET_PDEATHSIG`); [`kill_tree`] kills a child and all
//! its descendants (a restored program lives in a PID namespace under its supervising
//! restorer).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use snapshim_image::lineage::{Record, LOCK_FILE};

use super::keys::{Image, Spec};
use snapshim_image::settings::RunSettings;

use crate::launch::{companion, ld_preload, RESTORER, SHIM_LIB};

/// The newest image of `dir` that opens (header and metadata checked), if any.
pub fn newest_image(dir: &Path) -> Option<Image> {
    let list = snapshim_image::list_images(dir).ok()?;
    list.iter().rev().find_map(|p| describe(p))
}

/// The cluster's description of the image at `path`.
pub fn describe(path: &Path) -> Option<Image> {
    let img = snapshim_image::Image::open(path).ok()?;
    let name = path.file_name()?.to_str()?;
    let seq = name
        .strip_prefix("ckpt-")?
        .strip_suffix(snapshim_image::IMAGE_SUFFIX)?
        .parse()
        .ok()?;
    Some(Image {
        id: img.header.image_id,
        seq,
        generation: img.meta.lineage.as_ref().map_or(0, |l| l.generation),
        time_ms: img.header.created_ns / 1_000_000,
    })
}

/// The generation of the instance that holds (or last held) `dir`, from its lock record.
pub fn holder_generation(dir: &Path) -> Option<u32> {
    let text = std::fs::read(dir.join(LOCK_FILE)).ok()?;
    let text = String::from_utf8_lossy(&text);
    Record::parse(text.trim_end_matches('\0')).map(|r| r.lineage.generation)
}

fn snapshim_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot locate the snapshim executable: {e}"))
}

fn restorer() -> Result<PathBuf, String> {
    companion(RESTORER, "SNAPSHIM_RESTORE").map_err(|f| f.message)
}

/// A command in a process group of its own, stdin from /dev/null, no descriptor but 0, 1 and 2
/// inherited, killed (SIGKILL) when the
/// agent dies: a program whose agent is gone has no fence, and another node will start it
/// once the lease expires. (A restored program's supervisor passes this on: its PID
/// namespace's init dies with it.)
fn detached(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).process_group(0);
    let agent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only prctl, getppid and close_range,
    // which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died before the prctl: nothing would kill us later.
            if libc::getppid() != agent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // Whatever the agent inherited stays out of the program (and of its images): marked
            // close-on-exec, not closed, since std's pipe that reports a failed exec must stay.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        })
    };
    cmd
}

/// Starts the program afresh under the shim (as `snapshim run --dir STORE --name NAME
/// --interval I` would, without its announcement, which would land in the program's output),
/// its stdout and stderr to the spec's output file (truncated: this is the start of its
/// output).
pub fn start_fresh(spec: &Spec, store: &Path) -> Result<Child, String> {
    let lib = companion(SHIM_LIB, "SNAPSHIM_LIB").map_err(|f| f.message)?;
    let (prog, args) = spec
        .command
        .split_first()
        .ok_or("the service has no command")?;
    let settings = RunSettings {
        dir: Some(store.to_path_buf()),
        name: Some(spec.name.clone()),
        interval: Some(spec.interval.clone()),
        incremental: spec.incremental.then(|| "on".to_string()),
        ..RunSettings::default()
    };
    let mut cmd = detached(Path::new(prog));
    cmd.args(args)
        .env(
            "LD_PRELOAD",
            ld_preload(&lib, std::env::var_os("LD_PRELOAD").as_deref()),
        )
        .envs(settings.env());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(out) = &spec.output {
        // Appending: stdout and stderr are restored as two opens of the file, each with its
        // own offset; with O_APPEND both still write at its end, in order.
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(out)
            .and_then(|f| f.set_len(0).map(|()| f))
            .map_err(|e| format!("cannot open the output file {}: {e}", out.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("cannot duplicate {}: {e}", out.display()))?;
        cmd.stdout(file).stderr(err);
    }
    cmd.spawn().map_err(|e| format!("cannot start {prog}: {e}"))
}

/// Restores the newest image of `dir` (`snapshim-restore DIR`); the restorer supervises the
/// program and exits with its status. Its own messages go to our stderr.
pub fn start_restore(dir: &Path) -> Result<Child, String> {
    detached(&restorer()?)
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start snapshim-restore: {e}"))
}

/// Keeps a warm standby on `dir` (`snapshim-restore --standby DIR`).
pub fn start_standby(dir: &Path) -> Result<Child, String> {
    detached(&restorer()?)
        .arg("--standby")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start snapshim-restore --standby: {e}"))
}

/// Wakes the warm standby waiting on `dir` and waits until the program runs
/// (`snapshim activate`).
pub fn activate(dir: &Path, timeout: Duration) -> Result<String, String> {
    run_tool(&["activate", "--timeout", &secs(timeout)], dir)
}

/// The program's last checkpoint: `snapshim checkpoint --kill PID` (the image is committed,
/// then the program is killed). Returns the tool's report.
pub fn checkpoint_and_kill(pid: u32, timeout: Duration) -> Result<String, String> {
    run_tool(
        &["checkpoint", "--kill", "--timeout", &secs(timeout)],
        Path::new(&pid.to_string()),
    )
}

fn secs(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Runs `snapshim ARGS LAST` and returns its stdout, or its stderr as the error.
fn run_tool(args: &[&str], last: &Path) -> Result<String, String> {
    let out = Command::new(snapshim_exe()?)
        .args(args)
        .arg(last)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run snapshim {}: {e}", args[0]))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().replace('\n', "; ");
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// SIGKILLs `pid` and every descendant, until none is left (a process forked meanwhile is found
/// on the next round).
pub fn kill_tree(pid: u32) {
    for _ in 0..20 {
        let mut all = vec![pid as i32];
        let mut i = 0;
        while i < all.len() {
            let kids = crate::proc::children(all[i]);
            all.extend(kids);
            i += 1;
        }
        let alive: Vec<i32> = all
            .into_iter()
            .filter(|&p| !crate::proc::is_gone(p))
            .collect();
        if alive.is_empty() {
            return;
        }
        for p in alive {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
