//! Descriptors that led outside the program (a terminal, the shell's pipe), and those that
//! cannot be restored yet.

use snapshim_image::{FdState, Inherited, Unsupported};

use super::{Prepare, Prepared};

/// Standard input, output and error take this process's own where it has them open: the
/// restored program talks to whoever started the restore. Anything else becomes `/dev/null`,
/// with a warning.
pub fn prepare(cx: &Prepare, f: &FdState, i: &Inherited) -> Result<Prepared, String> {
    // SAFETY: F_GETFD only checks that the number is open here.
    if f.fd <= 2 && unsafe { libc::fcntl(f.fd, libc::F_GETFD) } >= 0 {
        return Ok(Prepared::Inherit);
    }
    eprintln!(
        "snapshim-restore: warning: descriptor {} ({}) led outside the program; it is /dev/null now",
        f.fd, i.desc
    );
    cx.reopen(f, "/dev/null", 0).map(Prepared::At)
}

/// `/dev/null` in its place, with a warning.
pub fn prepare_unsupported(cx: &Prepare, f: &FdState, u: &Unsupported) -> Result<Prepared, String> {
    eprintln!(
        "snapshim-restore: warning: descriptor {} ({}) cannot be restored yet; it is /dev/null now",
        f.fd, u.desc
    );
    cx.reopen(f, "/dev/null", 0).map(Prepared::At)
}
