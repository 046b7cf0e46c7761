//! How `snapshim activate` finds a waiting `snapshim-restore --standby`: shared by both sides so
//! they cannot disagree.
//!
//! A standby listens on two Unix stream sockets in the *abstract* namespace (no file in the
//! image directory, which may be read-only, and nothing left behind when the standby dies): one
//! named after the image directory it watches, one after its own PID. Binding the first fails
//! while another standby waits on the same directory, which is how a second one is refused.
//!
//! Protocol: the client sends [`ACTIVATE`]; the standby answers with lines: `image PATH` once it
//! has chosen the image, `note TEXT` for anything the user should know (a newer image that was
//! damaged, time spent finishing its checks), then either the restorer's
//! `snapshim-restore: resuming after N us; ...` line, written by the restorer's last phase just
//! before the program runs (N counts from the activation), or `error TEXT`. Then it closes.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// What a client sends to activate a standby.
pub const ACTIVATE: &[u8] = b"activate\n";

/// Start of the line that reports the resume (written by the restorer's phase 2).
pub const RESUMED_PREFIX: &str = "snapshim-restore: resuming after ";

/// The directory a standby on `target` watches: the directory of the image `target` names (see
/// [`crate::resolve`]), canonical, so that every spelling of it gives one socket name.
pub fn watched_dir(target: &Path) -> Result<PathBuf, ImageError> {
    let image = crate::resolve(target)?;
    let dir = image.parent().unwrap_or(Path::new("/"));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::canonicalize(dir).map_err(|source| ImageError::Io {
        op: "find",
        path: dir.to_path_buf(),
        source,
    })
}

/// Longest abstract socket name (`sun_path` is 108 bytes, the first is the NUL).
const MAX_NAME: usize = 107;

/// Abstract socket name (without its leading NUL) of the standby watching `dir` (canonical).
/// A path too long for a socket name is replaced by a hash of it.
///
/// ```
/// use std::path::Path;
/// use snapshim_image::standby::dir_socket_name;
/// assert_eq!(dir_socket_name(Path::new("/ckpt/solver")), b"snapshim-standby:/ckpt/solver");
/// assert!(dir_socket_name(&Path::new("/d").join("x".repeat(200))).len() <= 107);
/// ```
pub fn dir_socket_name(dir: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let path = dir.as_os_str().as_bytes();
    let mut name = b"snapshim-standby:".to_vec();
    if name.len() + path.len() <= MAX_NAME {
        name.extend_from_slice(path);
    } else {
        // FNV-1a, 64 bits: stable across builds (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in path {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        name.extend_from_slice(format!("#{h:016x}").as_bytes());
    }
    name
}

/// Abstract socket name (without its leading NUL) of the standby with process ID `pid`.
pub fn pid_socket_name(pid: u32) -> Vec<u8> {
    format!("snapshim-standby-pid:{pid}").into_bytes()
}

/// PID and uid of the process at the other end of a Unix socket: each side checks the other's
/// user.
pub fn peer(fd: RawFd) -> Option<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a struct ucred of the length given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some((cred.pid, cred.uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_hash_to_distinct_names_of_legal_length() {
        let a = Path::new("/").join("a".repeat(150));
        let b = Path::new("/").join("b".repeat(150));
        let (na, nb) = (dir_socket_name(&a), dir_socket_name(&b));
        assert!(na.len() <= MAX_NAME && nb.len() <= MAX_NAME);
        assert_ne!(na, nb);
        assert_eq!(na, dir_socket_name(&a));
    }

    #[test]
    fn pid_and_dir_names_cannot_collide() {
        assert_ne!(dir_socket_name(Path::new("1")), pid_socket_name(1));
        assert!(pid_socket_name(42).ends_with(b":42"));
    }
}
