//! The background merger (`SNAPSHIM_INCREMENTAL=merge`): `snapshim merge IMAGE`, next to the
//! shim, started after a committed delta when the chain is due for a full image, and reaped
//! before the next checkpoint.
#![allow(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};

use super::policy::{chain_too_long, parent, CHAIN_BYTES, CHAIN_LEN, MERGE_FAILED};
use crate::config::Config;
use crate::sys::{self, sc};

/// The running merger's PID (0: none), the sequence number it merges, and the chain counters
/// when it started (what the merge takes off the chain).
static MERGER: AtomicI32 = AtomicI32::new(0);
/// The sequence number of the image being merged.
static MERGE_SEQ: AtomicU64 = AtomicU64::new(0);
static MERGE_LEN: AtomicU64 = AtomicU64::new(0);
static MERGE_BYTES: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static environ: *const *const libc::c_char;
}

/// After a committed delta: if the chain is due for a full image, starts `snapshim merge` on it
/// (unless one runs already). The merger is a child with exit signal 0 (the program never sees
/// it), its output goes to /dev/null, and it does not load the shim.
pub fn maybe_merge(cfg: &Config, path: &str) {
    if MERGER.load(Relaxed) != 0 || MERGE_FAILED.load(Relaxed) != 0 || !chain_too_long(cfg) {
        return;
    }
    let Some((seq, _, _)) = parent() else {
        return;
    };
    let tool = std::path::Path::new(&cfg.shim_path).with_file_name("snapshim");
    let cstr = |b: &[u8]| {
        let mut v = b.to_vec();
        v.push(0);
        v
    };
    let args: Vec<Vec<u8>> = [
        tool.as_os_str().as_encoded_bytes(),
        b"merge",
        b"--quiet",
        path.as_bytes(),
    ]
    .iter()
    .map(|a| cstr(a))
    .collect();
    let mut env: Vec<Vec<u8>> = Vec::new();
    // SAFETY: environ is glibc's NULL-terminated array of C strings; read, not changed.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let s = core::ffi::CStr::from_ptr(*p).to_bytes();
            if !s.starts_with(b"LD_PRELOAD=") {
                env.push(cstr(s));
            }
            p = p.add(1);
        }
    }
    let argv: Vec<*const u8> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([core::ptr::null()])
        .collect();
    let envp: Vec<*const u8> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain([core::ptr::null()])
        .collect();
    let tool_c = &args[0];
    let forked = sys::fork_child(|| {
        // In the child: raw system calls only. Unblock signals (the helper blocks them all),
        // stdout to /dev/null, no descriptor of the program's left open.
        let none = 0u64;
        // SAFETY: an 8-byte empty signal set.
        unsafe {
            sc!(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &none as *const u64,
                0,
                8
            )
        };
        if let Ok(fd) = sys::open(b"/dev/null\0", libc::O_WRONLY, 0) {
            // SAFETY: dup2 onto stdout; close_range of everything above stderr.
            unsafe {
                sc!(libc::SYS_dup2, fd, 1);
                sc!(libc::SYS_close_range, 3, u32::MAX, 0);
            }
        }
        // SAFETY: NUL-terminated path, NULL-terminated argv and envp built before the fork.
        unsafe {
            sc!(
                libc::SYS_execve,
                tool_c.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr()
            )
        };
        127
    });
    if let Ok(pid) = forked {
        MERGER.store(pid, Relaxed);
        MERGE_SEQ.store(seq, Relaxed);
        MERGE_LEN.store(CHAIN_LEN.load(Relaxed), Relaxed);
        MERGE_BYTES.store(CHAIN_BYTES.load(Relaxed), Relaxed);
    }
}

/// PID of the merger while one runs (0 if none): a child of the shim's, not of the program's.
pub fn running() -> i32 {
    MERGER.load(Relaxed)
}

/// Before each checkpoint: collects a finished merger. A merge that succeeded takes the merged
/// deltas off the chain's length and size; the merged image becomes the base.
///
/// The merger was cloned with exit signal 0, but `execve` makes it an ordinary child again
/// (exit signal SIGCHLD): the program gets a SIGCHLD when it ends, and a program that waits
/// for any child may reap it first. So the outcome is read from the image directory: the
/// merge succeeded if the image it merged is a full image now.
pub fn reap_merger(cfg: &Config) {
    let pid = MERGER.load(Relaxed);
    if pid == 0 {
        return;
    }
    let mut status = 0i32;
    // SAFETY: wait4 on our own child (exit signal 0, hence __WCLONE); status is valid.
    let r = unsafe {
        sc!(
            libc::SYS_wait4,
            pid,
            &mut status as *mut i32,
            libc::WNOHANG | libc::__WALL,
            0
        )
    };
    if r == 0 {
        return; // still merging
    }
    MERGER.store(0, Relaxed);
    let merged =
        crate::owner::dir(cfg).join(snapshim_image::image_file_name(MERGE_SEQ.load(Relaxed)));
    let full = std::fs::File::open(&merged).ok().and_then(|f| {
        let mut page = [0u8; 128];
        use std::os::unix::fs::FileExt;
        let n = f.read_at(&mut page, 0).ok()?;
        snapshim_image::Header::decode(&page[..n]).ok()
    });
    if full.is_some_and(|h| h.flags & snapshim_image::FLAG_DELTA == 0) {
        CHAIN_LEN.store(
            CHAIN_LEN
                .load(Relaxed)
                .saturating_sub(MERGE_LEN.load(Relaxed)),
            Relaxed,
        );
        CHAIN_BYTES.store(
            CHAIN_BYTES
                .load(Relaxed)
                .saturating_sub(MERGE_BYTES.load(Relaxed)),
            Relaxed,
        );
    } else {
        // Without merges the chain would grow for ever: full images from now on.
        MERGE_FAILED.store(1, Relaxed);
        let how = if r != pid as i64 {
            alloc::format!("did not merge {}", merged.display())
        } else if libc::WIFEXITED(status) {
            alloc::format!("exited with status {}", libc::WEXITSTATUS(status))
        } else {
            alloc::format!("died of signal {}", libc::WTERMSIG(status))
        };
        let text = alloc::format!(
            "snapshim: the background merge (snapshim merge, next to libsnapshim.so) {how}; \
             the program takes full images itself from now on\n"
        );
        let _ = sys::write_all(2, text.as_bytes());
    }
}
