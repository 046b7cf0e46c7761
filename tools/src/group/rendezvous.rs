//! The coordinator's half of a group checkpoint (the member's is shim/src/pipeline/group.rs):
//! waits until every member is ready (prepared, still running) and says `stop` to all, waits
//! until every member is parked and says `go` to all, and collects their outcomes.
//! One thread, one `poll` over the listening socket, every connection and every member's pidfd.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use snapshim_image::settings::{GROUP_GO, GROUP_PARKED, GROUP_READY, GROUP_STOP};
use snapshim_image::standby::peer;

use crate::failure::{Failure, Result};

/// Longest line a member may send.
const MAX_LINE: usize = 64 * 1024;

/// Where a member is in the protocol.
#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Signalled; not connected, or connected and not ready yet.
    Asked,
    /// Prepared, still running; waits for `stop`.
    Ready,
    /// Stopped; waits for `go`.
    Parked,
    /// Its outcome line.
    Replied(String),
}

/// One member, as the coordinator follows it.
pub struct Peer {
    pub pid: i32,
    pub program: String,
    /// Readable once the process has ended.
    pub pidfd: OwnedFd,
    conn: Option<UnixStream>,
    buf: Vec<u8>,
    stage: Stage,
}

impl Peer {
    pub fn new(pid: i32, program: String, pidfd: OwnedFd) -> Peer {
        Peer {
            pid,
            program,
            pidfd,
            conn: None,
            buf: Vec::new(),
            stage: Stage::Asked,
        }
    }

    fn who(&self) -> String {
        format!("member {} (PID {})", self.program, self.pid)
    }
}

/// What the rendezvous saw: each member's outcome line, in member order, and when the first
/// member said it was parked and when `go` was sent.
pub struct Outcome {
    pub replies: Vec<String>,
    pub first_parked: Instant,
    pub go: Instant,
}

/// Runs the protocol with `peers` (already signalled) on `listener` until every one has
/// answered, or fails naming the member that did not, and why. Returning drops every
/// connection, which calls off the checkpoint of members still waiting for `go`.
pub fn run(listener: &UnixListener, peers: &mut [Peer], deadline: Instant) -> Result<Outcome> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Failure::op(format!("cannot set up the group socket: {e}")))?;
    let mut first_parked = None;
    let mut stop = false;
    let mut go = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(late(peers, go.is_some()));
        }
        wait(listener, peers, deadline - now)?;
        accept(listener, peers);
        for p in peers.iter_mut() {
            read(p)?;
            if p.stage == Stage::Parked && first_parked.is_none() {
                first_parked = Some(Instant::now());
            }
        }
        lost(peers, go.is_some())?;
        if !stop && peers.iter().all(|p| p.stage == Stage::Ready) {
            // Every member is prepared: their pauses start together.
            tell_all(peers, GROUP_STOP)?;
            stop = true;
        }
        if go.is_none() && peers.iter().all(|p| p.stage == Stage::Parked) {
            // The instant: every member is stopped; each captures once it reads this.
            tell_all(peers, GROUP_GO)?;
            go = Some(Instant::now());
        }
        if peers.iter().all(|p| matches!(p.stage, Stage::Replied(_))) {
            let replies = peers
                .iter()
                .map(|p| match &p.stage {
                    Stage::Replied(l) => l.clone(),
                    _ => String::new(),
                })
                .collect();
            let go = go.unwrap_or_else(Instant::now);
            return Ok(Outcome {
                replies,
                first_parked: first_parked.unwrap_or(go),
                go,
            });
        }
    }
}

/// Fails when a member that has not answered has ended, or when one answered before `go`
/// (`went`): it called its checkpoint off.
fn lost(peers: &[Peer], went: bool) -> Result<()> {
    for p in peers {
        match &p.stage {
            Stage::Replied(line) if !went => {
                return Err(Failure::op(format!("{} gave up: {line}", p.who())))
            }
            Stage::Replied(_) => {}
            _ => {
                if let Some(why) = ended(p, 0) {
                    return Err(Failure::op(why));
                }
            }
        }
    }
    Ok(())
}

/// Writes `line` to every member.
fn tell_all(peers: &mut [Peer], line: &[u8]) -> Result<()> {
    for p in peers.iter_mut() {
        if p.conn.as_mut().is_none_or(|c| c.write_all(line).is_err()) {
            return Err(Failure::op(format!(
                "lost {} before telling it {:?}",
                p.who(),
                String::from_utf8_lossy(line).trim_end()
            )));
        }
    }
    Ok(())
}

/// Waits until something happens: a connection, data, a member's end, or a slice of time.
fn wait(listener: &UnixListener, peers: &[Peer], left: Duration) -> Result<()> {
    let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    for p in peers {
        if let Some(c) = &p.conn {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        if !matches!(p.stage, Stage::Replied(_)) {
            fds.push(PollFd::new(p.pidfd.as_fd(), PollFlags::POLLIN));
        }
    }
    let ms = left.as_millis().clamp(1, 200) as u16;
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(Failure::op(format!(
            "group checkpoint: poll: {}",
            std::io::Error::from(e)
        ))),
    }
}

/// Takes every waiting connection; one from a process that is not a member (or a member that
/// is already connected) is closed.
fn accept(listener: &UnixListener, peers: &mut [Peer]) {
    while let Ok((conn, _)) = listener.accept() {
        let Some((pid, _)) = peer(conn.as_raw_fd()) else {
            continue;
        };
        let Some(p) = peers.iter_mut().find(|p| p.pid == pid && p.conn.is_none()) else {
            continue;
        };
        if conn.set_nonblocking(true).is_ok() {
            p.conn = Some(conn);
        }
    }
}

/// Reads what `p` sent and moves it on: `ready`, `parked`, then its outcome line. Fails on anything
/// else, and on a connection closed before the outcome.
fn read(p: &mut Peer) -> Result<()> {
    let Some(conn) = p.conn.as_mut() else {
        return Ok(());
    };
    let mut chunk = [0u8; 4096];
    let mut closed = false;
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(Failure::op(format!("lost {}: {e}", p.who()))),
        }
    }
    while let Some(line) = crate::checkpoint::take_line(&mut p.buf) {
        let line = line.trim_end().to_string();
        match p.stage {
            Stage::Asked if format!("{line}\n").as_bytes() == GROUP_READY => p.stage = Stage::Ready,
            Stage::Ready if format!("{line}\n").as_bytes() == GROUP_PARKED => {
                p.stage = Stage::Parked
            }
            Stage::Asked | Stage::Ready if line.starts_with("err") => {
                let why = line.strip_prefix("err").unwrap_or("").trim();
                return Err(Failure::op(format!("{} failed: {why}", p.who())));
            }
            Stage::Parked => p.stage = Stage::Replied(line),
            _ => {
                return Err(Failure::op(format!(
                    "{} sent something unexpected: {line:?}",
                    p.who()
                )))
            }
        }
    }
    if p.buf.len() > MAX_LINE {
        return Err(Failure::op(format!("{} sent an endless line", p.who())));
    }
    if closed && !matches!(p.stage, Stage::Replied(_)) {
        // An exiting process closes its descriptors just before its pidfd says it ended.
        if let Some(why) = ended(p, 100) {
            return Err(Failure::op(why));
        }
        return Err(Failure::op(format!(
            "{} closed the connection before reporting its checkpoint",
            p.who()
        )));
    }
    if closed {
        p.conn = None;
    }
    Ok(())
}

/// Why `p` can no longer answer, if it has ended (waiting up to `ms` for it to).
fn ended(p: &Peer, ms: u16) -> Option<String> {
    let mut fds = [PollFd::new(p.pidfd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(1..) => Some(format!("{} exited during the group checkpoint", p.who())),
        _ => None,
    }
}

/// The failure when the deadline passed, naming the member furthest behind (the others wait
/// for it).
fn late(peers: &[Peer], went: bool) -> Failure {
    let rank = |s: &Stage| match s {
        Stage::Asked => 0,
        Stage::Ready => 1,
        Stage::Parked => 2,
        Stage::Replied(_) => 3,
    };
    let behind = peers
        .iter()
        .filter(|p| rank(&p.stage) < 3)
        .min_by_key(|p| rank(&p.stage));
    match behind {
        Some(p) if !went => Failure::op(format!(
            "{} did not stop within the timeout (--timeout); the group checkpoint was called off",
            p.who()
        )),
        Some(p) => Failure::op(format!(
            "{} did not report its checkpoint within the timeout (--timeout)",
            p.who()
        )),
        None => Failure::op("the group checkpoint did not complete within the timeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(program: &str, stage: Stage) -> Peer {
        let me = std::process::id() as i32;
        let mut p = Peer::new(
            me,
            program.into(),
            crate::checkpoint::pidfd_open(me).unwrap(),
        );
        p.stage = stage;
        p
    }

    #[test]
    fn the_member_furthest_behind_is_named() {
        let peers = [
            peer("ready", Stage::Ready),
            peer("asked", Stage::Asked),
            peer("parked", Stage::Parked),
        ];
        let f = late(&peers, false);
        assert!(f.message.contains("member asked") && f.message.contains("did not stop"));
        let peers = [
            peer("done", Stage::Replied("ok".into())),
            peer("parked", Stage::Parked),
        ];
        let f = late(&peers, true);
        assert!(f.message.contains("member parked") && f.message.contains("did not report"));
    }

    #[test]
    fn an_answer_before_go_is_a_member_giving_up() {
        let peers = [peer("a", Stage::Replied("err disk full".into()))];
        let f = lost(&peers, false).unwrap_err();
        assert!(f.message.contains("member a") && f.message.contains("disk full"));
        assert!(lost(&peers, true).is_ok());
        // We are alive: nothing ended.
        assert!(lost(&[peer("b", Stage::Ready)], false).is_ok());
    }
}
