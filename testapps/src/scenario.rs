//! Sessions, running apps, snapshots, and the checks made on them.
//!
//! A [`Session`] is one scenario's private directory (under the system temp dir, named after the
//! test, unique per process and session) holding everything the app touches:
//!
//! ```text
//!   <tmp>/snapshim-test-<pid>-<n>-<test>-<app>/
//!       out.txt             the app's stdout (a regular file: restore reopens it by path)
//!       in.txt, ...         inputs and output files of apps that use files (cwd of the app)
//!       images/<app>/       SNAPSHIM_DIR/SNAPSHIM_NAME: ckpt-NNNNNNNN.snap, latest -> newest
//!       bin/                copies of programs a test may take away (or run as nobody)
//!       damaged/            corrupted copies of images, for the bad-input tests
//! ```
//!
//! It is removed when the scenario's output was verified, and kept (its path printed) when not.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::apps::AppSpec;
use crate::artifacts::{artifacts, Artifacts};
use crate::diff::{diff_summary, AFTER_CHECKPOINT_LINE};
use crate::process::{
    describe_status, is_root, run_captured, timeout, wait_until, with_newline, Captured, Missed,
    Stream,
};
use crate::rng::{base_seed, hash_str, Rng};
use crate::{bail, Context, Failure, Result};

/// uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;
/// The app's stdout, in the session directory.
pub const STDOUT_FILE: &str = "out.txt";
const IMAGES: &str = "images";
/// Variables the harness sets for apps and keeps away from the tools.
const SHIM_VARS: [&str; 3] = ["LD_PRELOAD", "SNAPSHIM_DIR", "SNAPSHIM_NAME"];

/// Starts test apps in fresh sessions.
pub struct App;

impl App {
    /// Starts the app named `name` (see [`AppSpec::named`]) under the shim, in a new session.
    pub fn spawn(name: &str) -> Result<Running> {
        Session::new(AppSpec::named(name)?)?.spawn()
    }

    /// `runs` times, each in a new session: app `name` is checkpointed at a random moment of
    /// its own `runs`-th part of the run (together they cover all of it), killed and restored;
    /// each restore must finish with an uninterrupted run's output.
    pub fn restores_at_moments_spread_over_its_run(name: &str, runs: usize) -> Result<()> {
        for run in 0..runs {
            let app = App::spawn(name)?.wait_ready()?;
            let session = app.session().clone();
            let at = (run as f64 + session.random_unit()) / runs as f64;
            let app = app.pause(session.checkpoint_window()?.mul_f64(at));
            let img = app.checkpoint()?;
            app.kill()?;
            img.restore()?
                .finish()?
                .assert_same_output_as_uninterrupted()
                .map_err(|e| Failure::new(format!("run {} of {runs}: {e}", run + 1)))?;
        }
        Ok(())
    }
}

/// One scenario's directory, app and tools. Shared (`Arc`) by everything started in it.
pub struct Session {
    spec: AppSpec,
    label: String,
    dir: PathBuf,
    program: PathBuf,
    /// Copies of the artifacts that `nobody` can run, for unprivileged sessions.
    own_tools: Option<Artifacts>,
    nobody: bool,
    verified: AtomicBool,
    rng: Mutex<Rng>,
}

impl Session {
    /// A fresh session for `spec`: creates the directory, copies programs if asked, runs the
    /// app's setup.
    pub fn new(spec: AppSpec) -> Result<Arc<Session>> {
        Session::create(spec, None)
    }

    fn create(spec: AppSpec, purpose: Option<&str>) -> Result<Arc<Session>> {
        static SESSIONS: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static IN_THIS_TEST: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        let test: String = std::thread::current()
            .name()
            .unwrap_or("main")
            .rsplit("::")
            .next()
            .unwrap_or("main")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let label = match purpose {
            Some(p) => format!("{test}-{}-{p}", spec.name),
            None => format!("{test}-{}", spec.name),
        };
        let dir =
            std::env::temp_dir().join(format!("snapshim-test-{}-{n}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join(IMAGES)).context(format!("create {}", dir.display()))?;

        // Delays are drawn from a seed derived from the test's name and the session's number
        // within the test (reference runs, which may or may not happen depending on what ran
        // before, do not count), so SNAPSHIM_TEST_SEED replays them.
        let nth = IN_THIS_TEST.with(|c| {
            if purpose.is_none() {
                c.set(c.get() + 1);
            }
            c.get()
        });
        let seed = base_seed() ^ hash_str(&test) ^ nth.wrapping_mul(0x9e37_79b9_7f4a_7c15);

        let nobody = spec.unprivileged && is_root();
        let mut program = spec.program.clone();
        let mut own_tools = None;
        if spec.run_from_copy || nobody {
            let bin = dir.join("bin");
            fs::create_dir_all(&bin).context(format!("create {}", bin.display()))?;
            program = copy_executable(&spec.program, &bin)?;
            if nobody {
                // The build tree may not be reachable for nobody (e.g. under /root).
                let a = artifacts()?;
                own_tools = Some(Artifacts {
                    shim: copy_executable(&a.shim, &bin)?,
                    restorer: copy_executable(&a.restorer, &bin)?,
                    tool: copy_executable(&a.tool, &bin)?,
                });
            }
        }
        if let Some(setup) = spec.setup {
            setup(&dir).context(format!("set up {} in {}", spec.name, dir.display()))?;
        }
        if nobody {
            chown_tree(&dir, NOBODY)?;
        }
        eprintln!(
            "[{label}] session {} (SNAPSHIM_TEST_SEED={} repeats its random delays){}",
            dir.display(),
            base_seed(),
            if nobody {
                "; app and tools run as nobody"
            } else {
                ""
            }
        );
        Ok(Arc::new(Session {
            spec,
            label,
            dir,
            program,
            own_tools,
            nobody,
            verified: AtomicBool::new(false),
            rng: Mutex::new(Rng::new(seed)),
        }))
    }

    /// Starts the app under the shim, checkpoints it at a random moment, kills it (SIGKILL) and
    /// restores it: the restored run must finish with an uninterrupted run's output.
    pub fn restores_from_a_random_moment(self: &Arc<Self>) -> Result<()> {
        let app = self.spawn()?.wait_ready()?.pause_randomly()?;
        let img = app.checkpoint()?;
        app.kill()?;
        img.restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()
    }

    pub fn spec(&self) -> &AppSpec {
        &self.spec
    }

    /// The session directory: the app's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The program the app runs (a copy in `bin/` for [`AppSpec::run_from_copy`]).
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// `SNAPSHIM_DIR` of this session.
    pub fn snapshim_dir(&self) -> PathBuf {
        self.dir.join(IMAGES)
    }

    /// `$SNAPSHIM_DIR/$SNAPSHIM_NAME`: where the app's images go.
    pub fn image_dir(&self) -> PathBuf {
        self.snapshim_dir().join(&self.spec.name)
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join(STDOUT_FILE)
    }

    /// Whether the app and tools run as `nobody` (see [`AppSpec::unprivileged`]).
    pub fn runs_as_nobody(&self) -> bool {
        self.nobody
    }

    /// A uniform random number in `[0, 1)` from this session's seed.
    pub fn random_unit(&self) -> f64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).unit()
    }

    /// Checkpoints at a random moment fall within this long after READY: half the time an
    /// uninterrupted run under the shim took from READY to exit, so the app is surely still
    /// working when the checkpoint is taken.
    pub fn checkpoint_window(&self) -> Result<Duration> {
        Ok(reference(&self.spec)?.ready_to_exit.mul_f64(0.5))
    }

    /// The artifacts this session runs.
    pub fn tools(&self) -> Result<Artifacts> {
        match &self.own_tools {
            Some(t) => Ok(t.clone()),
            None => artifacts().cloned(),
        }
    }

    /// A command running `program` as this session's user, with none of the shim's variables.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for v in SHIM_VARS {
            cmd.env_remove(v);
        }
        if self.nobody {
            // Like `setpriv --reuid=65534 --regid=65534 --clear-groups`, done by std between fork
            // and exec (it drops supplementary groups when root sets a uid), so no intermediate
            // program gets LD_PRELOAD or stands between us and the app's pid.
            cmd.uid(NOBODY).gid(NOBODY);
        }
        cmd
    }

    /// Marks the scenario as passed, so its directory is removed when the session is dropped.
    /// ([`Finished::assert_same_output_as_uninterrupted`] does this itself.)
    pub fn passed(&self) {
        self.verified.store(true, Ordering::Relaxed);
    }

    /// Starts the app without the shim (no checkpoint possible): for runs that only check the
    /// app itself.
    pub fn spawn_without_shim(self: &Arc<Self>) -> Result<Running> {
        self.start(false)
    }

    /// Starts the app under the shim. The uninterrupted reference is computed first (once per
    /// test process and app), because its timing decides when random checkpoints are taken.
    pub fn spawn(self: &Arc<Self>) -> Result<Running> {
        self.tools()?;
        reference(&self.spec)?;
        self.start(true)
    }

    /// Starts the app under the shim without computing its reference first: for apps that do
    /// not end by themselves, whose output is not compared.
    pub fn spawn_without_reference(self: &Arc<Self>) -> Result<Running> {
        self.tools()?;
        self.start(true)
    }

    /// Starts the app, stdout to `out.txt` (created empty), stderr to a pipe we read.
    fn start(self: &Arc<Self>, with_shim: bool) -> Result<Running> {
        let out_path = self.stdout_path();
        let out = fs::File::create(&out_path).context(format!("create {}", out_path.display()))?;
        if self.nobody {
            std::os::unix::fs::chown(&out_path, Some(NOBODY), Some(NOBODY))
                .context(format!("chown {}", out_path.display()))?;
        }
        let mut cmd = if with_shim && self.spec.through_run {
            let mut c = self.command(&self.tools()?.tool);
            c.arg("run").arg("--").arg(&self.program);
            c
        } else {
            self.command(&self.program)
        };
        cmd.args(&self.spec.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let mut preload = Vec::new();
        if with_shim {
            let tools = self.tools()?;
            preload.push(tools.shim.to_string_lossy().into_owned());
            cmd.env("SNAPSHIM_DIR", self.snapshim_dir())
                .env("SNAPSHIM_NAME", &self.spec.name);
        }
        preload.extend(self.spec.preload.iter().cloned());
        if !preload.is_empty() {
            cmd.env("LD_PRELOAD", preload.join(" "));
        }
        let what = format!(
            "{} ({})",
            self.spec.name,
            if with_shim {
                "original, under the shim"
            } else {
                "original, without the shim"
            }
        );
        let mut child = cmd
            .spawn()
            .context(format!("start {}", self.program.display()))?;
        let stderr = Stream::spawn(child.stderr.take().expect("piped"));
        Ok(Running {
            session: Arc::clone(self),
            child,
            status: None,
            what,
            stderr,
            stdout: None,
            restored_from: None,
        })
    }

    fn restore_command(&self, image: &Path) -> Result<Command> {
        self.restore_command_with(image, &[], &[])
    }

    /// `WRAPPER... snapshim-restore OPTIONS... IMAGE` (the wrapper, if any, must end by running
    /// its arguments).
    fn restore_command_with(
        &self,
        image: &Path,
        options: &[&str],
        wrapper: &[&str],
    ) -> Result<Command> {
        let restorer = self.tools()?.restorer;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.command(Path::new(program));
                c.args(args).arg(&restorer);
                c
            }
            None => self.command(&restorer),
        };
        // From "/": the restored process must get its own working directory back.
        cmd.args(options).arg(image).current_dir("/");
        Ok(cmd)
    }

    /// Starts `snapshim-restore PATH` (an image or an image directory). Its stdout and stderr
    /// are pipes we read; the restored app's stdout is out.txt again, reopened by the restorer.
    pub fn restore_from(self: &Arc<Self>, path: &Path) -> Result<Running> {
        self.restore_from_with(path, &[], &[])
    }

    /// `snapshim-restore OPTIONS... PATH`, as [`Session::restore_from`].
    pub fn restore_with(self: &Arc<Self>, path: &Path, options: &[&str]) -> Result<Running> {
        self.restore_from_with(path, options, &[])
    }

    /// [`Session::restore_from`] with restorer options, run through a wrapper command (see
    /// `restore_command_with`).
    pub fn restore_from_with(
        self: &Arc<Self>,
        path: &Path,
        options: &[&str],
        wrapper: &[&str],
    ) -> Result<Running> {
        let image = snapshim_image::resolve(path).unwrap_or_else(|_| path.to_path_buf());
        let mut cmd = self.restore_command_with(path, options, wrapper)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context(format!("start snapshim-restore {}", path.display()))?;
        let stderr = Stream::spawn(child.stderr.take().expect("piped"));
        let stdout = Stream::spawn(child.stdout.take().expect("piped"));
        let what = format!(
            "{} (restored from {})",
            self.spec.name,
            image.file_name().unwrap_or_default().to_string_lossy()
        );
        eprintln!(
            "[{}] restoring: snapshim-restore {}{}",
            self.label,
            options.iter().map(|o| format!("{o} ")).collect::<String>(),
            path.display()
        );
        Ok(Running {
            session: Arc::clone(self),
            child,
            status: None,
            what,
            stderr,
            stdout: Some(stdout),
            restored_from: Some(image),
        })
    }

    /// Runs `snapshim-restore PATH` to completion, output captured: for images that must be
    /// refused.
    pub fn try_restore(&self, path: &Path) -> Result<Captured> {
        run_captured(&mut self.restore_command(path)?, timeout())
    }

    /// [`Session::try_restore`] with restorer options and a wrapper.
    pub fn try_restore_with(
        &self,
        path: &Path,
        options: &[&str],
        wrapper: &[&str],
    ) -> Result<Captured> {
        run_captured(
            &mut self.restore_command_with(path, options, wrapper)?,
            timeout(),
        )
    }

    /// `snapshim-restore PATH` must refuse the image: see [`expect_clean_refusal`].
    pub fn expect_restore_refused(&self, path: &Path, mentions: &[&str]) -> Result<String> {
        let c = self.try_restore(path)?;
        let msg = expect_clean_refusal(&c, mentions)
            .map_err(|e| Failure::new(format!("restoring {}: {e}", path.display())))?;
        eprintln!("[{}] refused as expected: {msg}", self.label);
        Ok(msg)
    }

    /// Runs `snapshim verify PATH`.
    pub fn verify(&self, path: &Path) -> Result<Captured> {
        let mut cmd = self.command(&self.tools()?.tool);
        cmd.arg("verify").arg(path);
        run_captured(&mut cmd, timeout())
    }

    /// `snapshim verify PATH` must report the damage: non-zero exit, no crash, a message.
    pub fn expect_verify_fails(&self, path: &Path) -> Result<()> {
        let c = self.verify(path)?;
        if c.status.signal().is_some() || c.status.success() {
            bail!(
                "snapshim verify should have failed on the damaged image {}\n{}",
                path.display(),
                c.report()
            );
        }
        if c.stdout.trim().is_empty() && c.stderr.trim().is_empty() {
            bail!("snapshim verify failed without saying why\n{}", c.report());
        }
        Ok(())
    }

    /// `snapshim verify PATH` must pass.
    pub fn expect_verify_ok(&self, path: &Path) -> Result<()> {
        let c = self.verify(path)?;
        if !c.status.success() {
            bail!(
                "snapshim verify rejects a good image {}\n{}",
                path.display(),
                c.report()
            );
        }
        Ok(())
    }

    /// Writes a copy of the image `src` to `damaged/<label>.snap`, changed by `damage`.
    pub fn damaged_copy(
        &self,
        src: &Path,
        label: &str,
        damage: impl FnOnce(&mut Vec<u8>),
    ) -> Result<PathBuf> {
        let mut bytes = fs::read(src).context(format!("read {}", src.display()))?;
        damage(&mut bytes);
        let dir = self.dir.join("damaged");
        fs::create_dir_all(&dir).context(format!("create {}", dir.display()))?;
        let path = dir.join(format!("{label}.snap"));
        fs::write(&path, &bytes).context(format!("write {}", path.display()))?;
        if self.nobody {
            chown_tree(&dir, NOBODY)?;
        }
        Ok(path)
    }

    /// Stands in for output the original wrote after the checkpoint and before it died: appends
    /// a marker to out.txt and every output file that exists. A restore cuts each file back to
    /// its checkpoint-time length; a restore that does not leaves the marker in the output.
    pub fn write_past_checkpoint(&self) -> Result<()> {
        let mut files = vec![self.stdout_path()];
        files.extend(self.spec.output_files.iter().map(|f| self.dir.join(f)));
        for f in files.into_iter().filter(|f| f.exists()) {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&f)
                .context(format!("open {} to append", f.display()))?;
            // ~8 KiB: more than any stdio buffer, so it outlasts the end of the output even
            // when the app is killed just before it finishes.
            let text = AFTER_CHECKPOINT_LINE.repeat(100);
            std::io::Write::write_all(&mut file, text.as_bytes())
                .context(format!("append to {}", f.display()))?;
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let keep = std::env::var_os("SNAPSHIM_TEST_KEEP").is_some();
        if self.verified.load(Ordering::Relaxed) && !std::thread::panicking() && !keep {
            // A test may have left the image directory read-only.
            let _ = fs::set_permissions(self.image_dir(), fs::Permissions::from_mode(0o700));
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("[{}] keeping {}", self.label, self.dir.display());
        }
    }
}

/// A process started by the harness: the app under the shim, or a restorer (which becomes the
/// restored app). Killed if dropped while still running.
pub struct Running {
    session: Arc<Session>,
    child: Child,
    status: Option<ExitStatus>,
    what: String,
    stderr: Stream,
    stdout: Option<Stream>,
    restored_from: Option<PathBuf>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Blocks until the app prints READY on stderr.
    pub fn wait_ready(mut self) -> Result<Running> {
        self.wait_for("READY")?;
        Ok(self)
    }

    /// Blocks until the process prints a line ending in `marker` on stderr.
    pub fn wait_for(&mut self, marker: &str) -> Result<()> {
        let limit = timeout();
        match self.stderr.wait_for_line(marker, Instant::now() + limit) {
            Ok(()) => Ok(()),
            Err(Missed::Eof) => {
                let status =
                    match wait_until(&mut self.child, Instant::now() + Duration::from_secs(10)) {
                        Ok(Some(s)) => {
                            self.status = Some(s);
                            describe_status(s)
                        }
                        _ => "closed its stderr".to_string(),
                    };
                bail!(
                    "{} ended ({status}) before printing {marker:?}\n--- its stderr ---\n{}",
                    self.what,
                    with_newline(&self.stderr.text())
                )
            }
            Err(Missed::Timeout) => bail!(
                "{} did not print {marker:?} within {limit:?}\n--- its stderr ---\n{}",
                self.what,
                with_newline(&self.stderr.text())
            ),
        }
    }

    /// Sends `sig` to the process (for a restore: to snapshim-restore).
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.status.is_some() {
            bail!("cannot send signal {sig} to {}: it has ended", self.what);
        }
        crate::process::send_signal(self.pid(), sig)
            .map_err(|e| Failure::new(format!("cannot send signal {sig} to {}: {e}", self.what)))
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.text()
    }

    /// Sleeps `d` (the app keeps running).
    pub fn pause(self, d: Duration) -> Running {
        eprintln!("[{}] checkpoint {d:?} after READY", self.session.label);
        std::thread::sleep(d);
        self
    }

    /// Sleeps for a random part of [`Session::checkpoint_window`].
    pub fn pause_randomly(self) -> Result<Running> {
        let d = self
            .session
            .checkpoint_window()?
            .mul_f64(self.session.random_unit());
        Ok(self.pause(d))
    }

    /// Runs `snapshim checkpoint PID` and returns whatever it did.
    pub fn try_checkpoint(&self) -> Result<Captured> {
        self.try_checkpoint_with(&[])
    }

    /// Runs `snapshim checkpoint OPTIONS... PID` and returns whatever it did.
    pub fn try_checkpoint_with(&self, options: &[&str]) -> Result<Captured> {
        let mut cmd = self.session.command(&self.session.tools()?.tool);
        cmd.arg("checkpoint")
            .args(options)
            .arg(self.pid().to_string());
        run_captured(&mut cmd, timeout())
    }

    /// `snapshim checkpoint PID`: must succeed and print the path of the committed image, which
    /// `latest` must point at: the session's image directory's, or for a restored program the
    /// directory of the image it was restored from (its images go there).
    pub fn checkpoint(&self) -> Result<Snapshot> {
        self.checkpoint_with(&[])
    }

    /// [`Running::checkpoint`] with options (`--kill`: the program is gone when it returns;
    /// reap it with [`Running::kill`]).
    pub fn checkpoint_with(&self, options: &[&str]) -> Result<Snapshot> {
        let started = Instant::now();
        let c = self.try_checkpoint_with(options)?;
        let fail = |why: String| {
            Failure::new(format!(
                "checkpoint of {} (pid {}): {why}\n{}\n--- app stderr so far ---\n{}",
                self.what,
                self.pid(),
                c.report(),
                with_newline(&self.stderr.text())
            ))
        };
        if !c.status.success() {
            return Err(fail("snapshim checkpoint failed".into()));
        }
        let printed = parse_image_path(&c.stdout)
            .ok_or_else(|| fail("no image path in the output".into()))?;
        let path = fs::canonicalize(&printed)
            .map_err(|e| fail(format!("printed {} but: {e}", printed.display())))?;
        let dir = match self.restored_from.as_ref().and_then(|p| p.parent()) {
            Some(d) => d.to_path_buf(),
            None => self.session.image_dir(),
        };
        let latest = dir.join(snapshim_image::LATEST);
        match fs::canonicalize(&latest) {
            Ok(target) if target == path => {}
            Ok(target) => {
                return Err(fail(format!(
                    "{} points at {}, not at the new image",
                    latest.display(),
                    target.display()
                )))
            }
            Err(e) => return Err(fail(format!("{}: {e}", latest.display()))),
        }
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "[{}] checkpoint of {} took {:?}: {} ({size} bytes)",
            self.session.label,
            self.what,
            started.elapsed(),
            path.display()
        );
        Ok(Snapshot {
            session: Arc::clone(&self.session),
            path,
        })
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> Result<bool> {
        if self.status.is_some() {
            return Ok(false);
        }
        match self.child.try_wait().context("waitpid")? {
            Some(s) => {
                self.status = Some(s);
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// kill -9 and reap, then append text to every output file the way output written after the
    /// checkpoint would be there (see [`Session::write_past_checkpoint`]).
    pub fn kill(mut self) -> Result<()> {
        if self.status.is_none() {
            let _ = self.child.kill();
            let status = wait_until(&mut self.child, Instant::now() + timeout())
                .context("wait for a killed process")?
                .ok_or_else(|| Failure::new(format!("{} survived SIGKILL", self.what)))?;
            self.status = Some(status);
        }
        let status = self.status.expect("reaped");
        let len = fs::metadata(self.session.stdout_path())
            .map(|m| m.len())
            .unwrap_or(0);
        eprintln!(
            "[{}] {} {} with {len} bytes in out.txt",
            self.session.label,
            self.what,
            if status.signal() == Some(libc::SIGKILL) {
                "killed".to_string()
            } else {
                format!("had already ended ({})", describe_status(status))
            }
        );
        self.session.write_past_checkpoint()
    }

    /// Two cycles from here: [`Running::two_images`], then a restore of the second image, and
    /// that run's end.
    pub fn two_cycles(self) -> Result<Finished> {
        self.two_images()?.restore()?.finish()
    }

    /// Checkpoint, SIGKILL, restore; once the restored run prints PHASE 2, checkpoint it and
    /// SIGKILL it: the second image, which must have a name of its own. Take the first
    /// checkpoint well before PHASE 2.
    pub fn two_images(self) -> Result<Snapshot> {
        let first = self.checkpoint()?;
        self.kill()?;
        let mut restored = first.restore()?;
        restored.wait_for("PHASE 2")?;
        let second = restored.checkpoint()?;
        restored.kill()?;
        if second.path() == first.path() {
            bail!(
                "the second checkpoint reused the first image's name {}",
                first.path().display()
            );
        }
        Ok(second)
    }

    /// Waits for the process to exit (a hang is killed and reported).
    pub fn finish(mut self) -> Result<Finished> {
        let limit = timeout();
        let status = match self.status {
            Some(s) => s,
            None => match wait_until(&mut self.child, Instant::now() + limit).context("waitpid")? {
                Some(s) => s,
                None => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    self.status = Some(ExitStatus::from_raw(libc::SIGKILL));
                    bail!(
                        "{} did not exit within {limit:?}; killed it\n--- its stderr ---\n{}",
                        self.what,
                        with_newline(&self.stderr.text())
                    )
                }
            },
        };
        self.status = Some(status);
        let grace = Instant::now() + Duration::from_secs(10);
        Ok(Finished {
            session: Arc::clone(&self.session),
            what: self.what.clone(),
            status,
            stderr: self.stderr.finish(grace),
            stdout: self
                .stdout
                .as_mut()
                .map(|s| s.finish(grace))
                .unwrap_or_default(),
            restored_from: self.restored_from.clone(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A committed image.
pub struct Snapshot {
    session: Arc<Session>,
    path: PathBuf,
}

impl Snapshot {
    /// An image at `path` (a copy, say), in `session`.
    pub fn at(session: &Arc<Session>, path: PathBuf) -> Snapshot {
        Snapshot {
            session: Arc::clone(session),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// `snapshim-restore IMAGE`.
    pub fn restore(&self) -> Result<Running> {
        self.session.restore_from(&self.path)
    }

    /// `snapshim-restore OPTIONS... IMAGE`.
    pub fn restore_with(&self, options: &[&str]) -> Result<Running> {
        self.session.restore_with(&self.path, options)
    }

    /// How long out.txt was when the image was taken, as the image records it.
    pub fn stdout_length_at_checkpoint(&self) -> Result<u64> {
        stdout_length_at_checkpoint(&self.path)
    }
}

/// How long the file on fd 1 was at checkpoint time, from the image's metadata (read with the
/// shared format crate).
pub fn stdout_length_at_checkpoint(image: &Path) -> Result<u64> {
    let img = snapshim_image::Image::open(image)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", image.display())))?;
    match img.meta.fds.iter().find(|f| f.fd == 1).map(|f| &f.kind) {
        Some(snapshim_image::FdKind::RegularFile(snapshim_image::RegularFile { size, .. })) => {
            Ok(*size)
        }
        Some(other) => bail!(
            "{} records stdout (fd 1) as {other:?}, not as the regular file out.txt",
            image.display()
        ),
        None => bail!("{} records no fd 1", image.display()),
    }
}

/// A process that exited.
pub struct Finished {
    session: Arc<Session>,
    pub what: String,
    pub status: ExitStatus,
    pub stderr: String,
    /// The restorer's stdout (empty for the original, whose stdout is out.txt).
    pub stdout: String,
    restored_from: Option<PathBuf>,
}

impl Finished {
    /// A member of a group restored together (`snapshim restore --group`) from `image`: the
    /// group's command ended with `status` (0 only if every member exited 0) and `stderr`.
    pub fn group_member(
        session: &Arc<Session>,
        status: ExitStatus,
        stderr: String,
        image: PathBuf,
    ) -> Finished {
        Finished {
            session: Arc::clone(session),
            what: format!(
                "{} (restored with its group from {})",
                session.spec.name,
                image.file_name().unwrap_or_default().to_string_lossy()
            ),
            status,
            stderr,
            stdout: String::new(),
            restored_from: Some(image),
        }
    }

    pub fn assert_exit_code(&self, code: i32) -> Result<()> {
        if self.status.code() == Some(code) {
            return Ok(());
        }
        bail!(
            "{}: {}, expected exit status {code}\n--- its stderr ---\n{}{}",
            self.what,
            describe_status(self.status),
            with_newline(&self.stderr),
            if self.stdout.is_empty() {
                String::new()
            } else {
                format!("--- its stdout ---\n{}", with_newline(&self.stdout))
            }
        )
    }

    /// Exit status 0, and out.txt and every output file byte-identical to an uninterrupted run.
    /// For a restored process also: the image must have been taken before the app had written
    /// all of its stdout, or the restore proved nothing.
    pub fn assert_same_output_as_uninterrupted(&self) -> Result<()> {
        self.assert_exit_code(0)?;
        let reference = reference(&self.session.spec)?;
        let mut problems = Vec::new();
        let out_path = self.session.stdout_path();
        let out = fs::read(&out_path).context(format!("read {}", out_path.display()))?;
        if out != reference.stdout {
            problems.push(format!(
                "stdout (out.txt) differs from an uninterrupted run: {}",
                diff_summary(&reference.stdout, &out)
            ));
        }
        for (name, want) in &reference.files {
            let path = self.session.dir.join(name);
            match fs::read(&path) {
                Ok(got) if got == *want => {}
                Ok(got) => problems.push(format!(
                    "{name} differs from an uninterrupted run: {}",
                    diff_summary(want, &got)
                )),
                Err(e) => problems.push(format!("cannot read {}: {e}", path.display())),
            }
        }
        let mut at_checkpoint = None;
        if let Some(image) = &self.restored_from {
            match stdout_length_at_checkpoint(image) {
                Ok(n) => {
                    at_checkpoint = Some(n);
                    if problems.is_empty() && n >= reference.stdout.len() as u64 {
                        problems.push(format!(
                            "the image was taken after the app had written all {n} bytes of its \
                             output, so this restore proved nothing (checkpoint too late?)"
                        ));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            bail!(
                "{}: {}\n{}--- stderr of {} ---\n{}",
                self.what,
                problems.join("\n"),
                match at_checkpoint {
                    Some(n) => format!("(out.txt was {n} bytes long at checkpoint time)\n"),
                    None => String::new(),
                },
                self.what,
                with_newline(&self.stderr)
            );
        }
        self.session.verified.store(true, Ordering::Relaxed);
        eprintln!(
            "[{}] {}: output identical to an uninterrupted run ({} bytes{})",
            self.session.label,
            self.what,
            out.len(),
            match at_checkpoint {
                Some(n) => format!(", {n} of them written before the checkpoint"),
                None => String::new(),
            }
        );
        Ok(())
    }
}

/// A refusal must be clean: a non-zero exit status (not death by a signal), and exactly one
/// non-empty line on stderr mentioning at least one of `mentions` (case-insensitive; no check
/// when empty). Returns the line.
pub fn expect_clean_refusal(c: &Captured, mentions: &[&str]) -> Result<String> {
    if let Some(sig) = c.status.signal() {
        bail!(
            "crashed (signal {sig}) instead of refusing cleanly\n{}",
            c.report()
        );
    }
    if c.status.success() {
        bail!("succeeded, but should have been refused\n{}", c.report());
    }
    let msg = c.stderr.trim();
    if msg.is_empty() {
        bail!("refused without a message on stderr\n{}", c.report());
    }
    if msg.lines().count() != 1 {
        bail!(
            "refused with {} lines on stderr instead of one\n{}",
            msg.lines().count(),
            c.report()
        );
    }
    let lower = msg.to_lowercase();
    if !mentions.is_empty() && !mentions.iter().any(|m| lower.contains(&m.to_lowercase())) {
        bail!(
            "the message does not mention the problem (expected one of {mentions:?}): {msg:?}\n{}",
            c.report()
        );
    }
    Ok(msg.to_string())
}

/// The image path in `snapshim checkpoint`'s output: the first token naming a `.snap` file,
/// else the first absolute path of an existing file.
pub fn parse_image_path(stdout: &str) -> Option<PathBuf> {
    let tokens = || {
        stdout.split_whitespace().map(|t| {
            t.trim_start_matches(|c: char| "\"'`([<{".contains(c))
                .trim_end_matches(|c: char| "\"'`,;:.)]>}".contains(c))
        })
    };
    tokens()
        .find(|t| t.starts_with('/') && t.ends_with(snapshim_image::IMAGE_SUFFIX))
        .or_else(|| tokens().find(|t| t.starts_with('/') && Path::new(t).is_file()))
        .map(PathBuf::from)
}

/// What an uninterrupted run printed and wrote.
#[derive(Debug)]
pub struct RunOutput {
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// Output files by name, in [`AppSpec::output_files`] order.
    pub files: Vec<(String, Vec<u8>)>,
    /// From READY to exit.
    pub ready_to_exit: Duration,
}

/// Runs the app from start to end, with or without the shim, and checks the contract: READY,
/// then PHASE 2 on stderr, exit status 0, stdout ending in PASS.
pub fn uninterrupted_run(spec: &AppSpec, with_shim: bool) -> Result<RunOutput> {
    let spec = AppSpec {
        run_from_copy: false,
        unprivileged: false,
        ..spec.clone()
    };
    let session = Session::create(spec, Some(if with_shim { "ref-shim" } else { "ref-plain" }))?;
    let mut app = session.start(with_shim)?;
    app.wait_for("READY")?;
    let ready = Instant::now();
    app.wait_for("PHASE 2")?;
    let fin = app.finish()?;
    let ready_to_exit = ready.elapsed();
    fin.assert_exit_code(0)?;
    let stdout = fs::read(session.stdout_path()).context("read out.txt")?;
    if !stdout.ends_with(b"\nPASS\n") {
        bail!(
            "{}: stdout does not end with PASS\n--- stderr ---\n{}",
            fin.what,
            with_newline(&fin.stderr)
        );
    }
    let mut files = Vec::new();
    for name in &session.spec.output_files {
        let path = session.dir.join(name);
        files.push((
            name.clone(),
            fs::read(&path).context(format!("read {}", path.display()))?,
        ));
    }
    session.verified.store(true, Ordering::Relaxed);
    Ok(RunOutput {
        stdout,
        stderr: fin.stderr,
        files,
        ready_to_exit,
    })
}

/// The expected output of an app: from an uninterrupted run under the shim, which must match a
/// run without it byte for byte.
#[derive(Debug)]
pub struct Reference {
    pub stdout: Vec<u8>,
    pub files: Vec<(String, Vec<u8>)>,
    pub ready_to_exit: Duration,
}

/// The reference for `spec`, computed once per test process (concurrent callers wait for the
/// first).
pub fn reference(spec: &AppSpec) -> Result<Arc<Reference>> {
    type Cell = Arc<OnceLock<std::result::Result<Arc<Reference>, String>>>;
    static CACHE: OnceLock<Mutex<HashMap<String, Cell>>> = OnceLock::new();
    let cell: Cell = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(spec.key())
        .or_default()
        .clone();
    cell.get_or_init(|| compute_reference(spec).map_err(|e| e.to_string()))
        .clone()
        .map_err(Failure::new)
}

fn compute_reference(spec: &AppSpec) -> Result<Arc<Reference>> {
    let plain = uninterrupted_run(spec, false)
        .map_err(|e| Failure::new(format!("uninterrupted run without the shim: {e}")))?;
    let shim = uninterrupted_run(spec, true)
        .map_err(|e| Failure::new(format!("uninterrupted run under the shim: {e}")))?;
    if plain.stdout != shim.stdout {
        bail!(
            "{}: stdout under the shim differs from stdout without it: {}",
            spec.name,
            diff_summary(&plain.stdout, &shim.stdout)
        );
    }
    for ((name, a), (_, b)) in plain.files.iter().zip(&shim.files) {
        if a != b {
            bail!(
                "{}: {name} under the shim differs from {name} without it: {}",
                spec.name,
                diff_summary(a, b)
            );
        }
    }
    eprintln!(
        "[reference] {}: {} bytes of stdout, {:?} from READY to exit under the shim",
        spec.key(),
        shim.stdout.len(),
        shim.ready_to_exit
    );
    Ok(Arc::new(Reference {
        stdout: shim.stdout,
        files: shim.files,
        ready_to_exit: shim.ready_to_exit,
    }))
}

/// Copies an executable into `dir`, keeping its name, mode 0755.
fn copy_executable(src: &Path, dir: &Path) -> Result<PathBuf> {
    let name = src
        .file_name()
        .ok_or_else(|| Failure::new(format!("{} has no file name", src.display())))?;
    let dst = dir.join(name);
    fs::copy(src, &dst).context(format!("copy {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
        .context(format!("chmod {}", dst.display()))?;
    Ok(dst)
}

/// chown -R, not following symlinks.
fn chown_tree(path: &Path, id: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(id), Some(id))
        .context(format!("chown {}", path.display()))?;
    if fs::symlink_metadata(path)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        for e in fs::read_dir(path).context(format!("list {}", path.display()))? {
            chown_tree(&e.context("list")?.path(), id)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(script: &str) -> Captured {
        run_captured(
            Command::new("/bin/sh").arg("-c").arg(script),
            Duration::from_secs(20),
        )
        .unwrap()
    }

    #[test]
    fn image_path_is_found_in_free_text() {
        assert_eq!(
            parse_image_path(
                "checkpoint committed: /tmp/x/images/a/ckpt-00000001.snap (12 MiB, pause 3 ms)\n"
            ),
            Some(PathBuf::from("/tmp/x/images/a/ckpt-00000001.snap"))
        );
        assert_eq!(
            parse_image_path("\"/d/ckpt-00000002.snap\".\n"),
            Some(PathBuf::from("/d/ckpt-00000002.snap"))
        );
        assert_eq!(parse_image_path("done in 3 ms\n"), None);
        assert_eq!(parse_image_path(""), None);
        // Without the suffix, only an existing file counts.
        assert_eq!(parse_image_path("wrote /nonexistent/file"), None);
        assert_eq!(
            parse_image_path("wrote /bin/sh"),
            Some(PathBuf::from("/bin/sh"))
        );
    }

    #[test]
    fn clean_refusal_is_one_line_non_zero_and_on_topic() {
        let ok = captured("echo 'image is truncated: needs 9 bytes' >&2; exit 1");
        assert!(expect_clean_refusal(&ok, &["truncat"]).is_ok());
        assert!(expect_clean_refusal(&ok, &[]).is_ok());
        let off_topic = expect_clean_refusal(&ok, &["checksum"]).unwrap_err();
        assert!(off_topic.to_string().contains("does not mention"));
        let two_lines = captured("printf 'a\\nb\\n' >&2; exit 1");
        assert!(expect_clean_refusal(&two_lines, &[])
            .unwrap_err()
            .to_string()
            .contains("2 lines"));
        let silent = captured("exit 2");
        assert!(expect_clean_refusal(&silent, &[]).is_err());
        let accepted = captured("echo fine >&2");
        assert!(expect_clean_refusal(&accepted, &[])
            .unwrap_err()
            .to_string()
            .contains("should have been refused"));
        let crashed = captured("echo boom >&2; kill -SEGV $$");
        assert!(expect_clean_refusal(&crashed, &[])
            .unwrap_err()
            .to_string()
            .contains("crashed"));
    }
}
