//! `snapshim restore --group DIR_OR_SET`: every member of a group set restored together.
//!
//! 1. Read the set (`set.rs`; a group directory gives its `latest`) and find each member's
//!    image by its id.
//! 2. Start one `snapshim-restore --standby IMAGE` per member (an image given as a file is not
//!    watched: exactly that image is restored). Each checks and stages its image ahead, then
//!    says on stderr that it waits for activation. One that fails instead makes us kill the
//!    others and fail with one line naming it.
//! 3. Activate them all at once, one thread each, over each standby's PID socket (the
//!    standby's protocol: `snapshim_image::standby`): every member resumes within milliseconds
//!    of the others.
//! 4. Wait for every member. Their stderr, which they inherit from the restorers, reaches ours
//!    through a pipe each (the restorers' own lines before the activation are kept back).
//!    Exit status 0 when every member exits 0; else the first failing member's, named on
//!    stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use snapshim_image::standby::{pid_socket_name, ACTIVATE, RESUMED_PREFIX};

use super::set;
use crate::failure::{Failure, Result};

/// What a standby says once its image is staged.
const WAITING: &str = "waiting for activation";
/// How long an activation may take until the program runs.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(600);

/// One member being restored.
struct Standby {
    program: String,
    image: PathBuf,
    child: Child,
}

pub fn restore(target: &Path, json: bool) -> Result<()> {
    let (s, set_path) = set::read(target)?;
    let images = s
        .members
        .iter()
        .map(|m| set::locate(m, &set_path))
        .collect::<Result<Vec<_>>>()?;
    let restorer = crate::companions::companion(crate::companions::RESTORER, "SNAPSHIM_RESTORE")?;
    let (events, ready) = mpsc::channel();
    let mut standbys = Vec::new();
    for (i, (m, image)) in s.members.iter().zip(&images).enumerate() {
        match start(&restorer, image, i, events.clone()) {
            Ok(child) => standbys.push(Standby {
                program: m.program.clone(),
                image: image.clone(),
                child,
            }),
            Err(f) => {
                kill_all(&mut standbys);
                return Err(f);
            }
        }
    }
    drop(events);
    if let Err(f) = wait_staged(&standbys, &ready) {
        kill_all(&mut standbys);
        return Err(f);
    }
    let started = Instant::now();
    let activated = activate_all(&standbys);
    let spread_us = started.elapsed().as_micros() as u64;
    if let Err(f) = activated {
        kill_all(&mut standbys);
        return Err(f);
    }
    if json {
        crate::json::print_ok(serde_json::json!({
            "group": s.group,
            "set": set_path,
            "members": standbys.iter().map(|sb| serde_json::json!({
                "program": sb.program,
                "image": sb.image,
                "restorer_pid": sb.child.id(),
            })).collect::<Vec<_>>(),
            "activation_us": spread_us,
        }))?;
    } else {
        eprintln!(
            "snapshim: group {}: {} members restored from {}, resumed within {} of each other",
            s.group,
            standbys.len(),
            set_path.display(),
            crate::parse::format_ms(spread_us)
        );
    }
    wait_all(&mut standbys, &ready)
}

/// What the stderr readers report: member `i` staged its image, or ended (with its last line).
enum Event {
    Staged(usize),
    Ended(usize, String),
}

/// Starts `snapshim-restore --standby IMAGE`, stderr to a reader that reports on `events`.
fn start(restorer: &Path, image: &Path, i: usize, events: mpsc::Sender<Event>) -> Result<Child> {
    let mut child = Command::new(restorer)
        .arg("--standby")
        .arg(image)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::op(format!("cannot run {}: {e}", restorer.display())))?;
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || relay(stderr, i, &events));
    Ok(child)
}

/// Reads a standby's stderr: keeps its lines back until it is staged, then passes everything
/// on to ours.
fn relay(stderr: impl Read, i: usize, events: &mpsc::Sender<Event>) {
    let mut lines = BufReader::new(stderr);
    let mut last = String::new();
    loop {
        let mut line = String::new();
        match lines.read_line(&mut line) {
            Ok(1..) => {}
            _ => {
                let _ = events.send(Event::Ended(i, last));
                return;
            }
        }
        if line.trim_end().ends_with(WAITING) {
            let _ = events.send(Event::Staged(i));
            break;
        }
        last = line.trim_end().to_string();
    }
    // Whole lines, each in one write, so that two members' lines never mix.
    let mut line = Vec::new();
    while let Ok(1..) = lines.read_until(b'\n', &mut line) {
        let _ = std::io::stderr().write_all(&line);
        line.clear();
    }
    let _ = events.send(Event::Ended(i, String::new()));
}

/// Waits until every standby has staged its image; Err names the first that ended instead.
fn wait_staged(standbys: &[Standby], events: &mpsc::Receiver<Event>) -> Result<()> {
    let mut staged = vec![false; standbys.len()];
    while staged.iter().any(|s| !s) {
        match events.recv() {
            Ok(Event::Staged(i)) => staged[i] = true,
            Ok(Event::Ended(i, last)) => {
                let sb = &standbys[i];
                let why = last
                    .strip_prefix("snapshim-restore: ")
                    .unwrap_or(&last)
                    .to_string();
                return Err(Failure::op(format!(
                    "member {} cannot be restored from {}: {}",
                    sb.program,
                    sb.image.display(),
                    if why.is_empty() {
                        "its restorer ended"
                    } else {
                        &why
                    }
                )));
            }
            Err(_) => return Err(Failure::op("lost every restorer")),
        }
    }
    Ok(())
}

/// Activates every standby at once, one thread each; Err names the first that failed.
fn activate_all(standbys: &[Standby]) -> Result<()> {
    let results: Vec<std::result::Result<(), String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = standbys
            .iter()
            .map(|sb| scope.spawn(move || activate(sb.child.id())))
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("activation thread failed".into()))
            })
            .collect()
    });
    for (sb, r) in standbys.iter().zip(results) {
        if let Err(why) = r {
            return Err(Failure::op(format!(
                "member {} ({}) did not resume: {why}; stopped the group",
                sb.program,
                sb.image.display()
            )));
        }
    }
    Ok(())
}

/// Activates the standby with PID `pid` and waits until its program runs.
fn activate(pid: u32) -> std::result::Result<(), String> {
    let addr = SocketAddr::from_abstract_name(pid_socket_name(pid)).map_err(|e| e.to_string())?;
    let mut conn = UnixStream::connect_addr(&addr).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(ACTIVATION_TIMEOUT))
        .map_err(|e| e.to_string())?;
    conn.write_all(ACTIVATE).map_err(|e| e.to_string())?;
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.starts_with(RESUMED_PREFIX) {
            return Ok(());
        }
        if let Some(why) = line.strip_prefix("error ") {
            return Err(why.to_string());
        }
    }
    Err("the standby ended without resuming the program".into())
}

/// Waits for every member; the first that fails gives the exit status.
fn wait_all(standbys: &mut [Standby], events: &mpsc::Receiver<Event>) -> Result<()> {
    let mut first_failure: Option<Failure> = None;
    let mut left: Vec<usize> = (0..standbys.len()).collect();
    while !left.is_empty() {
        let mut still = Vec::new();
        for i in left {
            let sb = &mut standbys[i];
            match sb.child.try_wait() {
                Ok(Some(status)) => {
                    if first_failure.is_none() && !status.success() {
                        first_failure = Some(failed(sb, status));
                    }
                }
                Ok(None) => still.push(i),
                Err(e) => {
                    first_failure.get_or_insert(Failure::op(format!(
                        "cannot wait for member {}: {e}",
                        sb.program
                    )));
                }
            }
        }
        left = still;
        if !left.is_empty() {
            // A member's stderr closing is the usual sign that it ended; else look again soon.
            let _ = events.recv_timeout(Duration::from_millis(50));
        }
    }
    // Let the readers pass on what is left of the members' stderr.
    while events.recv_timeout(Duration::from_millis(200)).is_ok() {}
    first_failure.map_or(Ok(()), Err)
}

/// The failure for a member that ended with `status`: its exit code (128 + the signal).
fn failed(sb: &Standby, status: ExitStatus) -> Failure {
    let (code, how) = match (status.code(), status.signal()) {
        (Some(c), _) => (c, format!("exited with status {c}")),
        (None, Some(sig)) => (128 + sig, format!("was killed by signal {sig}")),
        _ => (1, "ended".to_string()),
    };
    Failure {
        code: code.clamp(1, 255) as u8,
        message: format!("member {} ({}) {how}", sb.program, sb.image.display()),
    }
}

/// Kills and reaps every standby (a failed group restore leaves nothing running).
fn kill_all(standbys: &mut [Standby]) {
    for sb in standbys.iter_mut() {
        let _ = sb.child.kill();
        let _ = sb.child.wait();
    }
}
