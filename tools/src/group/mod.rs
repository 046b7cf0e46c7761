//! Consistency groups: programs started separately with the same `SNAPSHIM_GROUP` (`snapshim
//! run --group NAME`) are checkpointed at one instant (`snapshim checkpoint --group NAME`) and
//! restored together (`snapshim restore --group`, `restore.rs`).
//!
//! Protocol (the member's half is shim/src/pipeline/group.rs):
//!
//! ```text
//!  snapshim checkpoint --group NAME                    each member (its shim's helper)
//!  --------------------------------                    -------------------------------
//!  members: processes with libsnapshim.so mapped and SNAPSHIM_GROUP=NAME in /proc/PID/environ
//!  each: handles its quiesce signal? its shim exports snapshim_joins_group_checkpoints?
//!  listen on the abstract socket @snapshim-group:<random token>; a pidfd per member
//!  sigqueue(member, quiesce signal,  ───────────────►  a group record in the wake pipe
//!           GROUP_BIT | token << 32)                    quiesce: every thread parked
//!  accept; SO_PEERCRED names the member  ◄───────────  connect, "parked\n"
//!  ... every member parked: the instant ...
//!  "go\n" to every member                ───────────►  capture, resume, flush, commit
//!                                        ◄───────────  "ok path=... paused_at_ns=... released_at_ns=...\n"
//!  every member ok: commit DIR/NAME.group/set-N.json, repoint latest (set.rs)
//! ```
//!
//! Before `go`, a member that fails, exits (its pidfd) or is late makes us close every
//! connection: the members still parked call their checkpoint off and commit nothing, and the
//! previous set stays current. After `go`, a member whose checkpoint fails makes the set
//! uncommitted (the others' images are committed in their own directories, but no set names
//! them). The whole group is stopped from the first member's pause to the moment the last
//! member is told `go`, plus each one's capture: the members report their pause's start and
//! end (`CLOCK_REALTIME`, which every namespace shares) and the group's pause is from the
//! earliest start to the latest end.

mod rendezvous;
pub mod restore;
pub mod set;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use snapshim_image::settings::{self, group_socket_name, GROUP_BIT, GROUP_SYMBOL};

use crate::checkpoint as single;
use crate::cli::CheckpointArgs;
use crate::failure::{Failure, Result};
use crate::parse::{self, Reply};
use crate::proc;

pub use restore::restore;

/// One member's committed image, from its reply.
struct Committed {
    program: String,
    pid: i32,
    image: PathBuf,
    pause_us: u64,
    /// Its pause's start and end (`CLOCK_REALTIME` ns), when the shim said.
    paused_at: Option<u64>,
    released_at: Option<u64>,
}

pub fn checkpoint(a: CheckpointArgs) -> Result<()> {
    let name = a.group.clone().unwrap_or_default();
    let pids = members(&name);
    if pids.is_empty() {
        return Err(Failure::op(format!(
            "no member of group {name} is running (no process with libsnapshim.so loaded has \
             SNAPSHIM_GROUP={name})"
        )));
    }
    let signals = pids
        .iter()
        .map(|&pid| request_signal(pid))
        .collect::<Result<Vec<i32>>>()?;
    let group_dir = set::group_dir(&base_dir(a.dir.as_deref(), pids[0])?, &name);
    require_previous_members(&name, &group_dir, &pids)?;
    let failed =
        |f: Failure| Failure::op(format!("group checkpoint of {name} failed: {}", f.message));
    let committed = take(&pids, &signals, Instant::now() + a.timeout).map_err(failed)?;
    let mut s = set_of(&name, committed)?;
    let path = set::commit(&group_dir, &mut s)?;
    report(&s, &path, a.json)
}

/// Asks every member in `pids` (each with its request signal) for its part of one group
/// checkpoint and follows the protocol until `deadline`; returns each member's committed image
/// and the group's pause.
fn take(pids: &[i32], signals: &[i32], deadline: Instant) -> Result<(Vec<Committed>, u64)> {
    let (listener, token) = listen()?;
    let mut peers = Vec::new();
    for &pid in pids {
        let program = proc::comm(pid).unwrap_or_else(|| "?".into());
        peers.push(rendezvous::Peer::new(
            pid,
            program,
            single::pidfd_open(pid)?,
        ));
    }
    let value = GROUP_BIT as u64 | (token as u64) << 32;
    for (p, &signo) in peers.iter().zip(signals) {
        single::sigqueue(p.pid, signo, value)?;
    }
    let outcome = rendezvous::run(&listener, &mut peers, deadline)?;
    drop(listener);
    let committed = peers
        .iter()
        .zip(&outcome.replies)
        .map(|(p, line)| committed(p, line))
        .collect::<Result<Vec<_>>>()?;
    let pause = group_pause_us(&committed, &outcome);
    Ok((committed, pause))
}

/// The set naming each member's image (its id read from the image).
fn set_of(name: &str, (committed, group_pause_us): (Vec<Committed>, u64)) -> Result<set::Set> {
    let member = |c: &Committed| {
        let image_id = set::image_id(&c.image).ok_or_else(|| {
            Failure::op(format!(
                "group checkpoint of {name}: cannot read the image {} of member {} (PID {})",
                c.image.display(),
                c.program,
                c.pid
            ))
        })?;
        Ok(set::Member {
            program: c.program.clone(),
            pid: c.pid,
            image: c.image.clone(),
            image_id,
            pause_us: c.pause_us,
        })
    };
    Ok(set::Set {
        group: name.to_string(),
        set: 0,
        time_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        group_pause_us,
        members: committed.iter().map(member).collect::<Result<Vec<_>>>()?,
    })
}

/// Prints the committed set: the members, their images, the group's pause.
fn report(s: &set::Set, path: &Path, json: bool) -> Result<()> {
    if json {
        return crate::json::print_ok(serde_json::json!({
            "group": s.group,
            "set": path,
            "group_pause_us": s.group_pause_us,
            "members": s.members,
        }));
    }
    println!("group {} checkpointed: {}", s.group, path.display());
    for m in &s.members {
        println!(
            "  {} (PID {}): {}, pause {}",
            m.program,
            m.pid,
            m.image.display(),
            parse::format_ms(m.pause_us)
        );
    }
    println!(
        "  {} members, group pause {} (first member stopped to last resumed)",
        s.members.len(),
        parse::format_ms(s.group_pause_us)
    );
    Ok(())
}

/// The processes of group `name`: libsnapshim.so mapped, `SNAPSHIM_GROUP=name` in their
/// environment; not this process, and not a child a member forked (it shares its parent's
/// environment, and is its parent's checkpoint's business, which refuses children).
fn members(name: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            proc::environ_var(pid, settings::GROUP)
                .ok()
                .flatten()
                .is_some_and(|g| g == name)
        })
        .filter(|&pid| single::has_shim(pid) && !proc::is_gone(pid))
        .collect();
    found.sort_unstable();
    let all = found.clone();
    found.retain(|&pid| {
        proc::status(pid)
            .ok()
            .is_none_or(|s| !all.contains(&s.ppid))
    });
    found
}

/// The signal to send `pid` its request with, after checking that it can take part.
fn request_signal(pid: i32) -> Result<i32> {
    let who = || {
        format!(
            "member {} (PID {pid})",
            proc::comm(pid).unwrap_or_else(|| "?".into())
        )
    };
    single::require_shim(pid)?;
    if !single::shim_exports(pid, GROUP_SYMBOL) {
        return Err(Failure::op(format!(
            "{} runs a libsnapshim.so without group checkpoints (an older one); restart it \
             under this snapshim",
            who()
        )));
    }
    let signo = settings::quiesce_signal(single::trigger_signal(pid)?);
    single::require_handler(pid, signo)?;
    Ok(signo)
}

/// A listening socket on a fresh abstract name; its token.
fn listen() -> Result<(UnixListener, u32)> {
    for _ in 0..16 {
        let token = random_u32();
        let name = group_socket_name(token);
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Failure::op(format!("bad socket name: {e}")))?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return Ok((l, token)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => {
                return Err(Failure::op(format!(
                    "cannot listen on the group socket @{name}: {e}"
                )))
            }
        }
    }
    Err(Failure::op("cannot find a free group socket name"))
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom fills the 4-byte buffer it is given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n != 4 {
        // Unique enough for a socket name that is retried when taken.
        return std::process::id() ^ Instant::now().elapsed().subsec_nanos();
    }
    u32::from_le_bytes(b)
}

/// `p`'s image, from its outcome `line`; Err names it and why it failed.
fn committed(p: &rendezvous::Peer, line: &str) -> Result<Committed> {
    let who = format!("member {} (PID {})", p.program, p.pid);
    match parse::parse_reply(line) {
        Ok(Reply::Committed(c)) => {
            let image = PathBuf::from(&c.path);
            let image = if image.is_absolute() {
                image
            } else {
                std::fs::read_link(format!("/proc/{}/cwd", p.pid))
                    .map(|cwd| cwd.join(&image))
                    .unwrap_or(image)
            };
            Ok(Committed {
                program: p.program.clone(),
                pid: p.pid,
                image,
                pause_us: c.pause_us,
                paused_at: field(line, "paused_at_ns"),
                released_at: field(line, "released_at_ns"),
            })
        }
        Ok(Reply::Failed(msg)) => Err(Failure::op(format!("{who} failed: {msg}"))),
        Err(why) => Err(Failure::op(format!("{who}: {why}"))),
    }
}

/// The number after ` key=` in `line`.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The group's pause: from the earliest member's pause start to the latest one's end, as they
/// reported them; else (a member did not say) the coordinator's view from the first `parked` to
/// `go`, plus the longest member pause.
fn group_pause_us(c: &[Committed], o: &rendezvous::Outcome) -> u64 {
    let starts: Option<Vec<u64>> = c.iter().map(|m| m.paused_at).collect();
    let ends: Option<Vec<u64>> = c.iter().map(|m| m.released_at).collect();
    match (starts, ends) {
        (Some(s), Some(e)) if !s.is_empty() => {
            let (first, last) = (s.iter().min().copied(), e.iter().max().copied());
            last.unwrap_or(0).saturating_sub(first.unwrap_or(0)) / 1000
        }
        _ => {
            let barrier = o.go.saturating_duration_since(o.first_parked).as_micros() as u64;
            barrier + c.iter().map(|m| m.pause_us).max().unwrap_or(0)
        }
    }
}

/// Where the group's sets go: `--dir`, else the first member's `SNAPSHIM_DIR` (against its
/// working directory when relative), else `./snapshim-images` in its working directory.
fn base_dir(dir: Option<&Path>, first: i32) -> Result<PathBuf> {
    if let Some(d) = dir {
        return std::path::absolute(d)
            .map_err(|e| Failure::op(format!("cannot resolve {}: {e}", d.display())));
    }
    let theirs = proc::environ_var(first, settings::DIR)
        .ok()
        .flatten()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| crate::companions::DEFAULT_DIR.to_string());
    let cwd = std::fs::read_link(format!("/proc/{first}/cwd")).map_err(|e| {
        Failure::op(format!(
            "cannot tell the working directory of process {first} (give --dir): {e}"
        ))
    })?;
    Ok(cwd.join(theirs))
}

/// Fails when a program of the group's current set is not among the running members `pids`
/// (by program name, as many times as the set has it): a set without it would not be the
/// group, and the current set must stay current. A group without a set yet takes whoever runs.
fn require_previous_members(name: &str, group_dir: &Path, pids: &[i32]) -> Result<()> {
    let Ok((previous, path)) = set::read(group_dir) else {
        return Ok(());
    };
    let mut running: Vec<String> = pids.iter().filter_map(|&p| proc::comm(p)).collect();
    for m in &previous.members {
        match running.iter().position(|r| *r == m.program) {
            Some(i) => {
                running.swap_remove(i);
            }
            None => {
                return Err(Failure::op(format!(
                    "group checkpoint of {name} refused: member {} (PID {} in {}) is not \
                     running; that set stays the group's current one",
                    m.program,
                    m.pid,
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fields_are_read_by_name() {
        let line = "ok path=/a/b.snap bytes=1 paused_at_ns=12 released_at_ns=34";
        assert_eq!(field(line, "paused_at_ns"), Some(12));
        assert_eq!(field(line, "released_at_ns"), Some(34));
        assert_eq!(field(line, "at_ns"), None);
    }

    #[test]
    fn the_set_goes_to_dir_else_into_the_first_members_snapshim_dir() {
        let me = std::process::id() as i32;
        assert_eq!(
            base_dir(Some(Path::new("/ckpt")), me).unwrap(),
            PathBuf::from("/ckpt")
        );
        let here = std::env::current_dir().unwrap();
        let theirs = std::env::var("SNAPSHIM_DIR").unwrap_or_default();
        let want = if theirs.is_empty() {
            here.join("snapshim-images")
        } else {
            here.join(theirs)
        };
        assert_eq!(base_dir(None, me).unwrap(), want);
    }

    #[test]
    fn an_unknown_group_has_no_members() {
        assert!(members("no-such-group-here").is_empty());
    }
}
