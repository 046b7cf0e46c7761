//! Consistency groups: programs started separately with the same SNAPSHIM_GROUP are
//! checkpointed at one instant (`snapshim checkpoint --group`), killed with SIGKILL, and
//! restored together (`snapshim restore --group`) with byte-identical output; twice in a row,
//! from a copy of the image directories in another directory; a member that is gone makes
//! the group checkpoint fail in one line and leaves the previous set current.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshim_testapps::process::{
    children_of, run_captured, send_signal, timeout, wait_for_exit_of, wait_until, Missed, Stream,
};
use snapshim_testapps::{
    artifacts, bail, expect_clean_refusal, reference, AppSpec, Context, Failure, Finished, Result,
    Running, Session,
};

/// The apps of every group here: one with a large heap, one with many threads.
const MEMBERS: [&str; 2] = ["single", "threads"];

/// A group name no other test (or test process) uses.
fn group_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh directory for the group's sets (and copies), removed when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "snapshim-group-{}-{label}-{}",
            std::process::id(),
            group_name()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).context(format!("create {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn passed(self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Starts every member of group `group` (through `snapshim run`, SNAPSHIM_GROUP set), each in
/// its own session, and waits until each is READY.
/// Every member's uninterrupted reference run comes first, so that none is near its end
/// when the last one starts.
fn start_group(group: &str) -> Result<Vec<Running>> {
    start_group_with(group, [None, None])
}

/// [`start_group`], each member with its work size (rounds, batches) if given.
fn start_group_with(group: &str, sizes: [Option<&str>; 2]) -> Result<Vec<Running>> {
    let specs = MEMBERS
        .iter()
        .zip(sizes)
        .map(|(name, size)| {
            let mut spec = AppSpec::named(name)?
                .through_run()
                .env("SNAPSHIM_GROUP", group);
            if let Some(size) = size {
                spec = spec.arg(size);
            }
            reference(&spec)?;
            Ok(spec)
        })
        .collect::<Result<Vec<_>>>()?;
    specs
        .into_iter()
        .map(|spec| Session::new(spec)?.spawn()?.wait_ready())
        .collect()
}

/// `snapshim ARGS...` to completion, output captured (no shim variables for the tool).
fn snapshim(args: &[&str]) -> Result<snapshim_testapps::Captured> {
    let mut cmd = Command::new(&artifacts()?.tool);
    for v in [
        "LD_PRELOAD",
        "SNAPSHIM_DIR",
        "SNAPSHIM_NAME",
        "SNAPSHIM_GROUP",
    ] {
        cmd.env_remove(v);
    }
    cmd.args(args);
    run_captured(&mut cmd, timeout())
}

/// A committed group set: its file and each member's image, in member order.
struct Set {
    path: PathBuf,
    images: Vec<PathBuf>,
}

/// `snapshim checkpoint --group GROUP --dir BASE --json`: must commit a set naming one image per
/// member, which `BASE/GROUP.group/latest` must point at.
fn checkpoint_group(group: &str, base: &Path) -> Result<Set> {
    let c = snapshim(&[
        "checkpoint",
        "--group",
        group,
        "--dir",
        &base.to_string_lossy(),
        "--json",
    ])?;
    if !c.status.success() {
        bail!("group checkpoint of {group} failed\n{}", c.report());
    }
    let doc: serde_json::Value = serde_json::from_str(&c.stdout)
        .map_err(|e| Failure::new(format!("not JSON ({e})\n{}", c.report())))?;
    let path = PathBuf::from(doc["set"].as_str().unwrap_or_default());
    let members = doc["members"].as_array().cloned().unwrap_or_default();
    let mut images = Vec::new();
    for name in MEMBERS {
        let m = members
            .iter()
            .find(|m| m["program"] == name)
            .ok_or_else(|| Failure::new(format!("the set names no {name}\n{}", c.report())))?;
        images.push(PathBuf::from(m["image"].as_str().unwrap_or_default()));
    }
    let latest = base.join(format!("{group}.group")).join("latest");
    let current = fs::canonicalize(&latest).context(format!("resolve {}", latest.display()))?;
    if current != path {
        bail!(
            "{} points at {}, not at the new set {}",
            latest.display(),
            current.display(),
            path.display()
        );
    }
    eprintln!(
        "[{group}] set {} committed, group pause {} us",
        path.display(),
        doc["group_pause_us"]
    );
    Ok(Set { path, images })
}

/// Copies `from` (a directory of files) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).context(format!("create {}", to.display()))?;
    for e in fs::read_dir(from).context(format!("list {}", from.display()))? {
        let e = e.context("list")?;
        let target = to.join(e.file_name());
        let kind = e.file_type().context("stat")?;
        if kind.is_symlink() {
            let link = fs::read_link(e.path()).context("readlink")?;
            std::os::unix::fs::symlink(link, &target).context("symlink")?;
        } else if kind.is_file() {
            fs::copy(e.path(), &target).context(format!("copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Copies the group directory of `set` and every member's image directory side by side into
/// `base`, the layout `snapshim restore --group` looks in first; returns the copy's group
/// directory.
fn copy_group(set: &Set, base: &Path) -> Result<PathBuf> {
    let group_dir = set.path.parent().expect("a set is in its group directory");
    let copy = base.join(group_dir.file_name().expect("named"));
    copy_dir(group_dir, &copy)?;
    for image in &set.images {
        let dir = image.parent().expect("an image is in its directory");
        copy_dir(dir, &base.join(dir.file_name().expect("named")))?;
    }
    Ok(copy)
}

/// A running `snapshim restore --group`: the restored members' stderr comes through its own.
struct GroupRestore {
    child: Child,
    stderr: Stream,
    /// The image each member resumed from, in member order, as the copy has them.
    images: Vec<PathBuf>,
}

impl GroupRestore {
    /// Starts it on `target` and waits until it says every member has resumed.
    fn start(target: &Path, images: Vec<PathBuf>) -> Result<GroupRestore> {
        let mut child = Command::new(&artifacts()?.tool)
            .args(["restore", "--group"])
            .arg(target)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start snapshim restore --group")?;
        let stderr = Stream::spawn(child.stderr.take().expect("piped"));
        let mut g = GroupRestore {
            child,
            stderr,
            images,
        };
        match g
            .stderr
            .wait_for_line("of each other", Instant::now() + timeout())
        {
            Ok(()) => Ok(g),
            Err(Missed::Eof) | Err(Missed::Timeout) => {
                let _ = g.child.kill();
                let _ = g.child.wait();
                bail!(
                    "snapshim restore --group {} did not resume its members\n--- stderr ---\n{}",
                    target.display(),
                    g.stderr.text()
                )
            }
        }
    }

    /// SIGKILL to every member's restorer (its program dies with it), and the end of the group
    /// command; then the output each would have written after the checkpoint.
    fn kill(mut self, sessions: &[Arc<Session>]) -> Result<()> {
        let restorers = children_of(self.child.id());
        for &pid in &restorers {
            let _ = send_signal(pid, libc::SIGKILL);
        }
        for &pid in &restorers {
            if !wait_for_exit_of(pid, Instant::now() + timeout()).context("wait")? {
                bail!("restorer {pid} survived SIGKILL");
            }
        }
        self.finish()?;
        for s in sessions {
            s.write_past_checkpoint()?;
        }
        Ok(())
    }

    /// Waits for the group command to end: its exit status and stderr.
    fn finish(&mut self) -> Result<(ExitStatus, String)> {
        let status = wait_until(&mut self.child, Instant::now() + timeout())
            .context("wait for snapshim restore --group")?;
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!(
                "snapshim restore --group did not end\n--- stderr ---\n{}",
                self.stderr.text()
            );
        };
        let text = self.stderr.finish(Instant::now() + Duration::from_secs(10));
        Ok((status, text))
    }

    /// Waits for the end and checks every member's output against an uninterrupted run.
    fn assert_same_output_as_uninterrupted(mut self, sessions: &[Arc<Session>]) -> Result<()> {
        let (status, stderr) = self.finish()?;
        for (s, image) in sessions.iter().zip(&self.images) {
            Finished::group_member(s, status, stderr.clone(), image.clone())
                .assert_same_output_as_uninterrupted()?;
        }
        Ok(())
    }
}

/// Every member's image of `set` where the copy in `base` has it.
fn copied_images(set: &Set, base: &Path) -> Vec<PathBuf> {
    set.images
        .iter()
        .map(|i| {
            let dir = i.parent().and_then(|d| d.file_name()).expect("named");
            base.join(dir).join(i.file_name().expect("named"))
        })
        .collect()
}

fn kill_all(members: Vec<Running>) -> Result<Vec<Arc<Session>>> {
    let sessions = members.iter().map(|m| Arc::clone(m.session())).collect();
    for m in members {
        m.kill()?;
    }
    Ok(sessions)
}

/// Group checkpoint at a random moment, SIGKILL to all, restore together from a copy in
/// another directory; the restored group checkpointed again, killed, restored again: each
/// member's output identical to an uninterrupted run.
#[test]
fn a_group_restores_together_twice_from_a_copy() -> Result<()> {
    let group = group_name();
    let scratch = Scratch::new("cycles")?;
    let (sets, copy) = (scratch.0.join("sets"), scratch.0.join("copy"));
    let mut members = start_group(&group)?;
    // Within the shortest member's window: every member is still at work.
    let mut window = members[0].session().checkpoint_window()?;
    for m in &members {
        window = window.min(m.session().checkpoint_window()?);
    }
    let wait = window.mul_f64(members[0].session().random_unit());
    eprintln!("[{group}] group checkpoint {wait:?} after READY");
    std::thread::sleep(wait);
    let first = checkpoint_group(&group, &sets)?;
    for m in &mut members {
        if !m.is_running()? {
            bail!("a member ended during the group checkpoint");
        }
    }
    let sessions = kill_all(members)?;
    let copy_dir = copy_group(&first, &copy)?;
    let restored = GroupRestore::start(&copy_dir, copied_images(&first, &copy))?;
    // The restored members, still in their group, checkpointed together again.
    let second = checkpoint_group(&group, &copy)?;
    if second.images.iter().any(|i| !i.starts_with(&copy)) {
        bail!(
            "the restored members wrote their images outside the copy: {:?}",
            second.images
        );
    }
    restored.kill(&sessions)?;
    GroupRestore::start(&copy.join(format!("{group}.group")), second.images.clone())?
        .assert_same_output_as_uninterrupted(&sessions)?;
    scratch.passed();
    Ok(())
}

/// A member that is gone: the group checkpoint fails in one line naming it, the previous set
/// stays current, and it restores.
#[test]
fn a_missing_member_keeps_the_previous_set() -> Result<()> {
    let group = group_name();
    let scratch = Scratch::new("missing")?;
    // The member that stays runs four times as long as by default: it is surely still there
    // when the checkpoint is refused.
    let mut members = start_group_with(&group, [Some("288"), None])?;
    let sessions: Vec<Arc<Session>> = members.iter().map(|m| Arc::clone(m.session())).collect();
    let first = checkpoint_group(&group, &scratch.0)?;
    members.pop().expect("two members").kill()?;
    let c = snapshim(&[
        "checkpoint",
        "--group",
        &group,
        "--dir",
        &scratch.0.to_string_lossy(),
    ])?;
    let line = expect_clean_refusal(&c, &["not running"])?;
    if !line.contains(MEMBERS[1]) {
        bail!("the refusal does not name the missing member: {line}");
    }
    let group_dir = scratch.0.join(format!("{group}.group"));
    let current = fs::canonicalize(group_dir.join("latest")).context("resolve latest")?;
    if current != first.path {
        bail!(
            "latest moved to {} after a refused checkpoint",
            current.display()
        );
    }
    kill_all(members)?;
    GroupRestore::start(&group_dir, first.images.clone())?
        .assert_same_output_as_uninterrupted(&sessions)?;
    scratch.passed();
    Ok(())
}

/// An unknown group, and a group set that is not there: one line each.
#[test]
fn unknown_groups_are_refused_in_one_line() -> Result<()> {
    let c = snapshim(&["checkpoint", "--group", &group_name()])?;
    expect_clean_refusal(&c, &["no member of group"])?;
    let c = snapshim(&["restore", "--group", "/nonexistent/x.group"])?;
    expect_clean_refusal(&c, &["/nonexistent/x.group"])?;
    // A set whose member's image is gone: refused before anything starts.
    let scratch = Scratch::new("gone")?;
    let set = scratch.0.join("g.group").join("set-1.json");
    fs::create_dir_all(set.parent().expect("a directory")).context("create")?;
    let doc = serde_json::json!({
        "group": "g", "set": 1, "time_ns": 0, "group_pause_us": 0,
        "members": [{"program": "p", "pid": 1, "image": "/nonexistent/p/ckpt-00000001.snap",
                     "image_id": "0000000000000001", "pause_us": 0}],
    });
    fs::write(&set, doc.to_string()).context("write the set")?;
    let c = snapshim(&["restore", "--group", &set.to_string_lossy()])?;
    expect_clean_refusal(&c, &["not found"])?;
    scratch.passed();
    Ok(())
}

/// A member that cannot stop (SIGSTOP'ed): the group checkpoint gives up at its timeout and
/// names it; the other member, ready and waiting, calls its checkpoint off and commits nothing;
/// both run on (the stopped one, continued, finds the request it got while stopped called off)
/// to the same output as uninterrupted runs.
#[test]
fn a_member_that_does_not_stop_calls_the_group_checkpoint_off() -> Result<()> {
    let group = group_name();
    let scratch = Scratch::new("stopped")?;
    // The member that stays ready runs long enough to be asked.
    let mut members = start_group_with(&group, [Some("288"), None])?;
    let stuck = members.pop().expect("two members");
    stuck.signal(libc::SIGSTOP)?;
    let c = snapshim(&[
        "checkpoint",
        "--group",
        &group,
        "--dir",
        &scratch.0.to_string_lossy(),
        "--timeout",
        "1",
    ]);
    stuck.signal(libc::SIGCONT)?;
    let line = expect_clean_refusal(&c?, &["did not stop"])?;
    if !line.contains(MEMBERS[1]) {
        bail!("the failure does not name the stopped member: {line}");
    }
    let other = members.pop().expect("two members");
    let images = |r: &Running| {
        fs::read_dir(r.session().image_dir())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                    .count()
            })
            .unwrap_or(0)
    };
    if images(&other) != 0 {
        bail!("the member that was ready committed an image of a called-off group checkpoint");
    }
    if scratch.0.join(format!("{group}.group")).exists() {
        bail!("a called-off group checkpoint left a group directory");
    }
    for m in [other, stuck] {
        m.finish()?.assert_same_output_as_uninterrupted()?;
    }
    scratch.passed();
    Ok(())
}
