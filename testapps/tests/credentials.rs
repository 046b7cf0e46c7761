//! Programs that change their credentials while threads run. glibc's `setuid`, `setgid` and
//! `setgroups` make the change in every thread by sending each one SIGSETXID and waiting until
//! it has handled it, the shim's helper thread included: the program must not hang, at start
//! or at a checkpoint. Checkpointed after the change, killed and restored, every thread has the
//! credentials it had (the `creds` app compares them with its own raw system calls the whole
//! time and prints them, with /proc/thread-self/status, at the end), and the output is the same
//! as an uninterrupted run's. Needs root, and `cargo build --release --workspace` first.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use snapshim_testapps::process::{run_captured, timeout, Stream};
use snapshim_testapps::scenario::NOBODY;
use snapshim_testapps::{
    artifacts, bail, expect_clean_refusal, needs, AppSpec, Context, Failure, Result, Session,
    PYTHON,
};

/// A session of the `creds` app whose image directory its new user (nobody) may write: the
/// shim writes images with the program's credentials of the moment.
fn creds_session(spec: AppSpec) -> Result<Arc<Session>> {
    let session = Session::new(spec)?;
    let dir = session.snapshim_dir();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))
        .context(format!("chown {}", dir.display()))?;
    Ok(session)
}

/// Root drops to nobody through glibc with four threads running; checkpoint right after the
/// drop (READY), SIGKILL, restore; the restored program is checkpointed again after PHASE 2,
/// killed and restored once more.
#[test]
fn dropping_privileges_survives_a_checkpoint_and_two_restores() -> Result<()> {
    if !needs::root("to change credentials")? {
        return Ok(());
    }
    let session = creds_session(AppSpec::named("creds")?)?;
    session
        .spawn()?
        .wait_ready()?
        .two_cycles()?
        .assert_same_output_as_uninterrupted()
}

/// Root drops to nobody, whose image directory is root's: the checkpoint fails with one line
/// that says why and what to do, and the program goes on untouched; once the directory is
/// nobody's, the next checkpoint is taken and restores as usual.
#[test]
fn a_program_that_dropped_root_is_told_its_image_directory_is_not_its_own() -> Result<()> {
    if !needs::root("to change credentials")? {
        return Ok(());
    }
    let session = Session::new(AppSpec::named("creds")?.arg("6000"))?;
    let app = session.spawn()?.wait_ready()?;
    let c = app.try_checkpoint()?;
    let line = expect_clean_refusal(&c, &["Permission denied", "runs as uid 65534 now"])?;
    if !line.contains("uid 0's") || !line.contains("--dir") {
        bail!("the refusal does not say whose the directory is and what to do: {line:?}");
    }
    let dir = session.snapshim_dir();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))
        .context(format!("chown {}", dir.display()))?;
    let img = app.checkpoint()?;
    app.kill()?;
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// Started through `snapshim run` as root (the image directory is taken at start, as root's),
/// the program drops to nobody for good: the directory is handed to nobody before the change,
/// so its checkpoints are taken as nobody's and restore as usual; twice.
#[test]
fn a_program_that_drops_root_under_snapshim_run_keeps_its_image_directory() -> Result<()> {
    if !needs::root("to change credentials")? {
        return Ok(());
    }
    let session = Session::new(AppSpec::named("creds")?.through_run())?;
    session
        .spawn()?
        .wait_ready()?
        .two_cycles()?
        .assert_same_output_as_uninterrupted()
}

/// One thread alone drops to nobody with raw system calls while the others stay root: each
/// thread is restored with its own credentials.
#[test]
fn threads_with_different_credentials_are_restored_each_with_its_own() -> Result<()> {
    if !needs::root("to change credentials")? {
        return Ok(());
    }
    let session = creds_session(AppSpec::named("creds")?.arg("3000").arg("mixed"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let fin = img.restore()?.finish()?;
    fin.assert_same_output_as_uninterrupted()?;

    // Restoring as nobody cannot give the root threads back their identity: one line.
    let dir = session.dir().join("as-nobody");
    std::fs::create_dir_all(&dir).context("create as-nobody")?;
    let copy = dir.join("image.snap");
    std::fs::copy(img.path(), &copy).context("copy the image")?;
    let restorer = dir.join("snapshim-restore");
    std::fs::copy(&artifacts()?.restorer, &restorer).context("copy the restorer")?;
    for p in [&dir, &copy, &restorer] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY))
            .context(format!("chown {}", p.display()))?;
    }
    let mut cmd = Command::new(&restorer);
    cmd.arg(&copy).current_dir("/").uid(NOBODY).gid(NOBODY);
    let c = run_captured(&mut cmd, timeout())?;
    expect_clean_refusal(&c, &["only root can restore it"])?;
    session.passed();
    Ok(())
}

/// `os.setgroups([])` in a single-threaded python3 (multi-threaded under the shim: its helper)
/// returns.
#[test]
fn python_setgroups_does_not_hang_under_the_shim() -> Result<()> {
    if !needs::root("to call setgroups")? {
        return Ok(());
    }
    let a = artifacts()?;
    let dir = std::env::temp_dir().join(format!("snapshim-test-{}-setgroups", std::process::id()));
    std::fs::create_dir_all(&dir).context("create the image directory")?;
    let mut cmd = Command::new(PYTHON);
    cmd.args([
        "-I",
        "-c",
        "import os; os.setgroups([]); print(os.getgroups())",
    ])
    .env("LD_PRELOAD", &a.shim)
    .env("SNAPSHIM_DIR", &dir);
    let c = run_captured(&mut cmd, timeout())?;
    let _ = std::fs::remove_dir_all(&dir);
    if !c.status.success() || c.stdout != "[]\n" {
        bail!("python3 setgroups under the shim:\n{}", c.report());
    }
    Ok(())
}

/// memcached started as root with `-u nobody` (threads, then setgroups/setgid/setuid) starts
/// under the shim, answers, is checkpointed, and still answers.
#[test]
fn memcached_dropping_to_nobody_runs_and_checkpoints() -> Result<()> {
    const MEMCACHED: &str = "/usr/bin/memcached";
    if !needs::root("for memcached -u")?
        || !needs::check(
            "memcached (Debian package memcached)",
            Path::new(MEMCACHED).exists(),
        )?
    {
        return Ok(());
    }
    let a = artifacts()?;
    let dir = std::env::temp_dir().join(format!("snapshim-test-{}-memcached", std::process::id()));
    std::fs::create_dir_all(&dir).context("create the image directory")?;
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).context("chown")?;
    let port = free_port()?;
    let mut child = Command::new(MEMCACHED)
        .args([
            "-u",
            "nobody",
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-t",
            "4",
            "-vv",
        ])
        .arg("-p")
        .arg(port.to_string())
        .env("LD_PRELOAD", &a.shim)
        .env("SNAPSHIM_DIR", &dir)
        .env("SNAPSHIM_NAME", "memcached")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start memcached")?;
    let mut stderr = Stream::spawn(child.stderr.take().expect("piped"));
    let result = (|| {
        // With -vv it says so once it listens.
        if let Err(why) = stderr.wait_for_line("server listening (auto-negotiate)", deadline()) {
            bail!("memcached did not start listening ({why:?})");
        }
        let mut conn = TcpStream::connect(("127.0.0.1", port)).context("connect to memcached")?;
        conn.set_read_timeout(Some(timeout()))
            .context("set_read_timeout")?;
        expect_reply(&mut conn, "set k 0 0 5\r\nhello\r\n", "STORED\r\n")?;
        let mut cmd = Command::new(&a.tool);
        cmd.arg("checkpoint").arg(child.id().to_string());
        let c = run_captured(&mut cmd, timeout())?;
        if !c.status.success() {
            bail!("snapshim checkpoint of memcached:\n{}", c.report());
        }
        expect_reply(&mut conn, "get k\r\n", "VALUE k 0 5\r\nhello\r\nEND\r\n")?;
        let stats = request(&mut conn, "stats\r\n", "END\r\n")?;
        if !stats.contains(&format!("STAT pid {}\r\n", child.id())) {
            bail!("memcached's stats do not name its pid: {stats:?}");
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .context("read memcached's status")?;
        if !status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("\t65534\t65534"))
        {
            bail!("memcached did not become nobody:\n{status}");
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let err = stderr.finish(deadline());
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| Failure::new(format!("{e:?}\n--- memcached's stderr ---\n{err}")))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local_addr")?.port())
}

fn deadline() -> Instant {
    Instant::now() + timeout()
}

/// Sends `req` and reads lines until one equals `last` (memcached's text protocol).
fn request(conn: &mut TcpStream, req: &str, last: &str) -> Result<String> {
    conn.write_all(req.as_bytes())
        .context("send to memcached")?;
    let mut r = BufReader::new(conn.try_clone().context("clone the connection")?);
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).context("read from memcached")? == 0 {
            bail!("memcached closed the connection after {all:?}");
        }
        all += &line;
        if line == last || line.starts_with("ERROR") {
            return Ok(all);
        }
    }
}

fn expect_reply(conn: &mut TcpStream, req: &str, want: &str) -> Result<()> {
    let last = want.lines().last().unwrap_or("").to_string() + "\r\n";
    let got = request(conn, req, &last)?;
    if got != want {
        bail!("memcached answered {req:?} with {got:?}, not {want:?}");
    }
    Ok(())
}
