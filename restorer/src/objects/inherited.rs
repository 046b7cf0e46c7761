//! Descriptors that led outside the program (a terminal, the shell's pipe), and those that
//! cannot be restored (refused, or left closed when the user asks).

use snapshim_image::{FdState, Inherited, Unsupported};

use super::{move_high, Prepare, Prepared};

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

/// A descriptor no kind rebuilds: refused ([`refusal`]), or with `leave_closed` (after a
/// warning) an `O_PATH` descriptor of `/dev/null` on its number. Every call the program makes
/// on it (`read`, `write`, `ioctl`, `select`, `epoll_ctl`...) then fails with `EBADF` as on a
/// closed descriptor, `poll` reports `POLLNVAL`, and the number is not handed out again by
/// the program's next `open`. Never a stand-in that looks ready.
pub fn prepare_unsupported(
    cx: &Prepare,
    f: &FdState,
    u: &Unsupported,
    leave_closed: bool,
) -> Result<Prepared, String> {
    if !leave_closed {
        return Err(refusal(f, u));
    }
    eprintln!(
        "snapshim-restore: warning: descriptor {} ({}) cannot be restored ({}); it is closed \
         (--unrestorable=closed): the program's calls on it fail with EBADF",
        f.fd,
        u.desc,
        why(u)
    );
    // SAFETY: opens a new descriptor from a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(super::os_error(f, "cannot open /dev/null (O_PATH)"));
    }
    move_high(fd, cx.high_base).map(Prepared::Closed)
}

/// The one line a restore that cannot rebuild `f` fails with.
pub fn refusal(f: &FdState, u: &Unsupported) -> String {
    format!(
        "cannot restore descriptor {} ({}): {}; --unrestorable=closed restores the program \
         with that descriptor closed",
        f.fd,
        u.desc,
        why(u)
    )
}

/// Why such a descriptor cannot be rebuilt, from what the kernel called it.
fn why(u: &Unsupported) -> &'static str {
    let d = u.desc.as_str();
    if d.starts_with("anon_inode:[eventpoll]") {
        "an epoll instance watching a file the program no longer holds a descriptor of"
    } else if d.starts_with("socket:") {
        "this kind of socket, or its state, is not restored (see docs/limits.md, Sockets)"
    } else if d.starts_with("anon_inode:inotify") {
        "the path of one of its watches is unknown (only watches added through \
         inotify_add_watch under the shim are restored)"
    } else if d.contains(" (deleted)") {
        "a deleted file whose content the image does not hold (see docs/limits.md, Deleted files)"
    } else {
        "snapshim does not restore this kind of descriptor"
    }
}
