//! Every checkpoint request gets an answer (issue 13): requests that arrive while a checkpoint is
//! being taken join it (each caller is told the same committed image) or make the next one;
//! none waits until its timeout.
//!
//! - `eight_concurrent_requests_twenty_times`: the `ids` app (five threads) computes, then holds;
//!   twenty times, eight `snapshim checkpoint --timeout 60` are started at once (threads released
//!   together). Each must exit 0 and print a committed image that exists, and newer than every
//!   image of the round before (no one is answered with an image taken before it asked); how
//!   many distinct images each round made is printed. Then the app is killed once it holds and
//!   the `latest` image restored; the restored app answers eight concurrent requests of its own
//!   (sent from inside its PID namespace), then, told to exit, must leave the output of the
//!   original run.
//! - `requests_in_a_running_program_restore_to_identical_output`: eight concurrent requests at
//!   a random moment of `single`'s run; kill; `latest` restores to byte-identical output.
//! - `a_request_on_the_checkpoint_signal_is_still_answered`: a request as an older `snapshim
//!   checkpoint` sends it (the checkpoint signal, queued with the reply pipe's descriptor alone)
//!   gets the shim's reply.
//!
//! The tests take a lock and run one at a time (see [`one_at_a_time`]).
//!
//! Needs `cargo build --release --workspace` first.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::Instant;

use snapshim_testapps::process::{run_captured, timeout};
use snapshim_testapps::{
    bail, diff_summary, AppSpec, Captured, Context, Failure, Result, Session, Snapshot,
};

const ROUNDS: usize = 20;
const REQUESTS: usize = 8;
/// `snapshim checkpoint --timeout`: far above a checkpoint of these apps (well under a second
/// here), far below the tool's default of 600 s that a lost request used to wait for.
const TOOL_TIMEOUT: &str = "60";

/// One test at a time: random checkpoint moments are drawn from the length of a reference run,
/// which another test's app and eight tools competing for the two cores here would stretch, so
/// the requests could come after the app has ended.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `snapshim checkpoint -q --timeout 60 PID`, run by `n` threads released at once; what each
/// run did.
fn concurrent_checkpoints(session: &Session, pid: u32, n: usize) -> Result<Vec<Captured>> {
    let tool = session.tools()?.tool;
    let start = Arc::new(Barrier::new(n));
    let runs: Vec<_> = (0..n)
        .map(|_| {
            let (tool, start) = (tool.clone(), Arc::clone(&start));
            std::thread::spawn(move || {
                let mut cmd = Command::new(&tool);
                cmd.env_remove("LD_PRELOAD")
                    .args(["checkpoint", "-q", "--timeout", TOOL_TIMEOUT])
                    .arg(pid.to_string());
                start.wait();
                run_captured(&mut cmd, timeout())
            })
        })
        .collect();
    runs.into_iter()
        .map(|r| r.join().expect("a request thread panicked"))
        .collect()
}

/// The committed images the runs printed, each checked: exit 0, one path, an image that exists.
fn answered_images(runs: &[Captured]) -> Result<BTreeSet<PathBuf>> {
    let mut images = BTreeSet::new();
    for c in runs {
        let path = PathBuf::from(c.stdout.trim());
        if !c.status.success() || !path.is_absolute() || c.stdout.lines().count() != 1 {
            bail!("a request was not answered with an image\n{}", c.report());
        }
        let path = fs::canonicalize(&path)
            .map_err(|e| Failure::new(format!("{}: {e}\n{}", path.display(), c.report())))?;
        images.insert(path);
    }
    Ok(images)
}

fn names(images: &BTreeSet<PathBuf>) -> Vec<String> {
    images
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Whether the program had installed a SIGUSR1 handler when `image` was taken (`ids` does so
/// just before it prints WAITING and holds).
fn handles_usr1(image: &Path) -> Result<bool> {
    let img = snapshim_image::Image::open(image)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", image.display())))?;
    Ok(img
        .meta
        .process
        .sigactions
        .iter()
        .any(|a| a.signo == libc::SIGUSR1 as u32 && a.handler != libc::SIG_DFL as u64))
}

#[test]
fn eight_concurrent_requests_twenty_times() -> Result<()> {
    let _one = one_at_a_time();
    // Enough rounds of work that the first requests come while the five threads compute; the
    // rest come while it holds (it never ends by itself). Every image of the test is kept.
    let spec = AppSpec::named("ids")?
        .arg("400")
        .arg("hold")
        .env("SNAPSHIM_KEEP", "1000");
    let session = Session::new(spec)?;
    let mut app = session.spawn_without_reference()?.wait_ready()?;
    let mut newest: Option<PathBuf> = None;
    let mut total = BTreeSet::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let runs = concurrent_checkpoints(&session, app.pid(), REQUESTS)?;
        let images = answered_images(&runs)?;
        eprintln!(
            "[round {round}] {REQUESTS} requests answered in {:?} with {} distinct image(s): {}",
            started.elapsed(),
            images.len(),
            names(&images).join(" ")
        );
        // Image names carry the sequence number with leading zeros: they sort in time order.
        if let (Some(before), Some(first)) = (&newest, images.first()) {
            if first.file_name() <= before.file_name() {
                bail!(
                    "round {round} was answered with {}, not newer than {} of the round before: \
                     a request got an image taken before it was sent",
                    first.display(),
                    before.display()
                );
            }
        }
        newest = images.last().cloned();
        total.extend(images);
    }
    eprintln!(
        "{} requests, {} images in all",
        ROUNDS * REQUESTS,
        total.len()
    );
    let latest_link = session.image_dir().join(snapshim_image::LATEST);
    let latest = fs::canonicalize(&latest_link).context(latest_link.display())?;
    if Some(&latest) != newest.as_ref() {
        bail!(
            "latest is {}, not the newest image answered ({newest:?})",
            latest.display()
        );
    }

    // The original's whole output, then kill it and restore `latest`.
    app.wait_for("WAITING")?;
    let expected = fs::read(session.stdout_path()).context("read out.txt")?;
    app.kill()?;
    let holding = handles_usr1(&latest)?;
    let mut restored = Snapshot::at(&session, latest.clone()).restore_with(&["--stats"])?;
    // The restorer's last words: from here on every signal the program gets waits until its
    // threads run again, which they do with the program's handlers.
    restored.wait_for("CLOCK_MONOTONIC")?;
    if !holding {
        // Taken while it computed: SIGUSR1 would kill it until it holds.
        restored.wait_for("WAITING")?;
    }
    // The restored program answers requests of its own (through its restorer's PID, from
    // inside its PID namespace), with images newer than the one it came from.
    let runs = concurrent_checkpoints(&session, restored.pid(), REQUESTS)?;
    let images = answered_images(&runs)?;
    eprintln!(
        "restored: {REQUESTS} requests answered with {} distinct image(s): {}",
        images.len(),
        names(&images).join(" ")
    );
    if images.first().map(|p| p.file_name()) <= Some(latest.file_name()) {
        bail!(
            "the restored program answered with {:?}, not newer than {}",
            names(&images),
            latest.display()
        );
    }
    restored.signal(libc::SIGUSR1)?;
    let fin = restored.finish()?;
    fin.assert_exit_code(42)?;
    let out = fs::read(session.stdout_path()).context("read out.txt")?;
    if out != expected {
        bail!(
            "restored from {} ({}), out.txt differs from the original run: {}",
            latest.display(),
            if holding {
                "taken while the app held"
            } else {
                "taken while the app computed"
            },
            diff_summary(&expected, &out)
        );
    }
    session.passed();
    Ok(())
}

#[test]
fn requests_in_a_running_program_restore_to_identical_output() -> Result<()> {
    let _one = one_at_a_time();
    for _ in 0..3 {
        let session = Session::new(AppSpec::named("single")?.arg("144"))?;
        let app = session.spawn()?.wait_ready()?.pause_randomly()?;
        let runs = concurrent_checkpoints(&session, app.pid(), REQUESTS)?;
        let images = answered_images(&runs)?;
        eprintln!(
            "{REQUESTS} requests answered with {} distinct image(s): {}",
            images.len(),
            names(&images).join(" ")
        );
        app.kill()?;
        let latest_link = session.image_dir().join(snapshim_image::LATEST);
        let latest = fs::canonicalize(&latest_link).context(latest_link.display())?;
        if images.last() != Some(&latest) {
            bail!(
                "latest is {}, not the newest image answered",
                latest.display()
            );
        }
        Snapshot::at(&session, latest)
            .restore()?
            .finish()?
            .assert_same_output_as_uninterrupted()?;
    }
    Ok(())
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(fs::File, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned here only.
    Ok(unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[test]
fn a_request_on_the_checkpoint_signal_is_still_answered() -> Result<()> {
    let _one = one_at_a_time();
    let session = Session::new(AppSpec::named("ids")?.arg("40").arg("hold"))?;
    let mut app = session.spawn_without_reference()?.wait_ready()?;
    app.wait_for("WAITING")?;
    // As an older `snapshim checkpoint` asks: the checkpoint signal queued with the descriptor
    // alone.
    let (mut r, w) = pipe()?;
    let value = libc::sigval {
        sival_ptr: w.as_raw_fd() as usize as *mut libc::c_void,
    };
    let trigger = snapshim_image::settings::default_signal();
    // SAFETY: plain values; the pointer is never dereferenced.
    if unsafe { libc::sigqueue(app.pid() as i32, trigger, value) } != 0 {
        bail!("sigqueue: {}", std::io::Error::last_os_error());
    }
    // The reply is one line, written at once.
    let mut pfd = libc::pollfd {
        fd: r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout().as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
        bail!("no reply within {:?}", timeout());
    }
    let mut buf = [0u8; 4096];
    let n = r.read(&mut buf).context("read the reply")?;
    drop(w);
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    let path = line
        .strip_prefix("ok path=")
        .and_then(|rest| rest.split(" bytes=").next())
        .ok_or_else(|| Failure::new(format!("unexpected reply {line:?}")))?;
    if !Path::new(path).is_file() {
        bail!("the reply names {path}, which does not exist: {line:?}");
    }
    app.kill()?;
    session.passed();
    Ok(())
}
