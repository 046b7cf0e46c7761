//! `snapshim activate DIR_OR_PID`: wakes a waiting `snapshim-restore --standby` and waits until
//! the program it restores runs again.
//!
//! The standby is reached over its abstract Unix socket (named after the image directory it
//! watches, or after its PID: see `snapshim_image::standby`, which also describes the lines it
//! answers with). Nothing is signalled: a process that is not a waiting standby is never
//! touched, and the answer says which image was used and when the program resumed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::Path;
use std::time::Instant;

use snapshim_image::standby::{
    dir_socket_name, peer, pid_socket_name, watched_dir, ACTIVATE, RESUMED_PREFIX,
};

use crate::cli::ActivateArgs;
use crate::failure::{Failure, Result};

pub fn activate(a: ActivateArgs) -> Result<()> {
    let as_pid = a
        .target
        .to_str()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|_| !a.target.exists());
    let (name, what) = match as_pid {
        Some(pid) => (pid_socket_name(pid), format!("as PID {pid}")),
        None => {
            let dir = watched_dir(&a.target).map_err(|e| Failure::op(e.to_string()))?;
            let what = format!("on {}", dir.display());
            (dir_socket_name(&dir), what)
        }
    };
    let started = Instant::now();
    let addr = SocketAddr::from_abstract_name(&name)
        .map_err(|e| Failure::op(format!("bad socket name: {e}")))?;
    let mut conn = UnixStream::connect_addr(&addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
            Failure::op(format!("no standby is waiting {what}"))
        }
        _ => Failure::op(format!("cannot reach the standby waiting {what}: {e}")),
    })?;
    let lost = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Failure::op(format!(
                "the standby waiting {what} did not resume the program within {:?}",
                a.timeout
            ))
        } else {
            Failure::op(format!("lost the standby waiting {what}: {e}"))
        }
    };
    // Abstract names are open to every user: make sure it is our standby (or root's) that
    // listens, not an impostor that took the name first.
    let (pid, uid) = peer(conn.as_raw_fd())
        .ok_or_else(|| Failure::op(format!("cannot identify the standby waiting {what}")))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me && uid != 0 {
        return Err(Failure::op(format!(
            "the process listening {what} (PID {pid}) belongs to uid {uid}, not to you: not \
             activating it"
        )));
    }
    conn.set_read_timeout(Some(a.timeout)).map_err(lost)?;
    conn.write_all(ACTIVATE).map_err(lost)?;
    let mut image = None;
    let mut lines = BufReader::new(conn).lines();
    let resumed_us: u64 = loop {
        let Some(line) = lines.next() else {
            return Err(Failure::op(format!(
                "the standby {what} ended without resuming the program (its stderr says why)"
            )));
        };
        let line = line.map_err(lost)?;
        if let Some(p) = line.strip_prefix("image ") {
            image = Some(p.to_string());
        } else if let Some(note) = line.strip_prefix("note ") {
            eprintln!("snapshim: standby: {note}");
        } else if let Some(why) = line.strip_prefix("error ") {
            return Err(Failure::op(format!("the standby {what} failed: {why}")));
        } else if let Some(rest) = line.strip_prefix(RESUMED_PREFIX) {
            let us = rest.split(' ').next().and_then(|n| n.parse().ok());
            break us.ok_or_else(|| {
                Failure::op(format!(
                    "the standby {what} sent an unreadable report: {line}"
                ))
            })?;
        }
    };
    let image = image.unwrap_or_else(|| "(unknown image)".into());
    if a.quiet {
        println!("{image}");
    } else {
        println!("{}", Path::new(&image).display());
        println!(
            "resumed {:.3} ms after activation ({:.1} ms from the request to this report)",
            resumed_us as f64 / 1000.0,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(())
}
