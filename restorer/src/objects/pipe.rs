//! A pipe whose both ends were in the program: made again, and the data that was buffered in
//! it at the checkpoint written back in. The first of its two descriptors creates it; the
//! second finds it by its id.

use std::os::fd::{IntoRawFd, RawFd};

use nix::fcntl::OFlag;
use snapshim_image::{FdState, Pipe};

use super::{move_high, status_flags, Prepare, Prepared};

/// The pipes made so far: (id, read end, write end), both on spare numbers.
#[derive(Default)]
pub struct Pipes(Vec<(u64, RawFd, RawFd)>);

impl Pipes {
    /// Closes the ends that no descriptor of the program became (`used`).
    pub fn close_unused(&self, used: impl Fn(RawFd) -> bool) {
        for &(_, r, w) in &self.0 {
            for end in [r, w] {
                if !used(end) {
                    // SAFETY: closing our own descriptor.
                    unsafe { libc::close(end) };
                }
            }
        }
    }
}

pub fn prepare(cx: &mut Prepare, f: &FdState, p: &Pipe) -> Result<Prepared, String> {
    let Pipe { id, read_end, data } = p;
    let pair = match cx.pipes.0.iter().find(|p| p.0 == *id) {
        Some(p) => *p,
        None => {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| format!("cannot create a pipe: {}", std::io::Error::from(e)))?;
            let p = (
                *id,
                move_high(r.into_raw_fd(), cx.high_base)?,
                move_high(w.into_raw_fd(), cx.high_base)?,
            );
            cx.pipes.0.push(p);
            p
        }
    };
    if *read_end && !data.is_empty() {
        // SAFETY: writing the pipe's saved content into its write end (it fits: it came out of
        // a pipe of the default size).
        unsafe { libc::write(pair.2, data.as_ptr() as *const libc::c_void, data.len()) };
    }
    let fd = if *read_end { pair.1 } else { pair.2 };
    // SAFETY: F_SETFL on our descriptor (O_NONBLOCK and friends).
    unsafe { libc::fcntl(fd, libc::F_SETFL, status_flags(f)) };
    Ok(Prepared::At(fd))
}
