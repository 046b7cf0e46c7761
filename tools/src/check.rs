//! `snapshim check`: which kernel features snapshim can use here, as this user, and what each
//! one enables. Every feature is probed (opened, asked, tried in a throw-away child), not
//! inferred from the kernel version: a distribution may build a feature out or a sysctl may
//! forbid it.
//!
//! Exit status 0 when checkpoint and restore will work here (with whatever engine and restore
//! mode the features allow), 1 when something they need is missing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use serde::Serialize;

use crate::cli::CheckArgs;
use crate::failure::{Failure, Result};

/// One probed feature.
#[derive(Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub available: bool,
    /// What was found: a version, a value, or why it is missing.
    pub detail: String,
    /// What snapshim does with it, or without it.
    pub enables: &'static str,
    /// Checkpoint or restore cannot work without it.
    pub required: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    schema: u32,
    /// Checkpoint and restore will work here.
    ok: bool,
    features: &'a [Feature],
}

pub fn check(a: CheckArgs) -> Result<()> {
    let features = probe_all();
    let ok = features.iter().all(|f| f.available || !f.required);
    if a.json {
        let report = Report {
            schema: crate::json::SCHEMA,
            ok,
            features: &features,
        };
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::op(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", table(&features, ok));
    }
    if ok {
        Ok(())
    } else {
        // The table (or the JSON) already says what is missing; the error line sums it up.
        let missing: Vec<&str> = features
            .iter()
            .filter(|f| f.required && !f.available)
            .map(|f| f.name)
            .collect();
        Err(Failure::op(format!(
            "checkpoint or restore cannot work here: missing {}",
            missing.join(", ")
        )))
    }
}

/// The report for people: one line per feature, then the verdict.
fn table(features: &[Feature], ok: bool) -> String {
    let width = features.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in features {
        let mark = match (f.available, f.required) {
            (true, _) => "yes",
            (false, true) => "NO ",
            (false, false) => "no ",
        };
        out.push_str(&format!(
            "{mark}  {:width$}  {}\n     {:width$}  -> {}\n",
            f.name, f.detail, "", f.enables
        ));
    }
    out.push_str(if ok {
        "checkpoint and restore will work here\n"
    } else {
        "checkpoint or restore will NOT work here\n"
    });
    out
}

fn probe_all() -> Vec<Feature> {
    let (shim, restorer) = (
        crate::companions::companion(crate::companions::SHIM_LIB, "SNAPSHIM_LIB"),
        crate::companions::companion("snapshim-restore", "SNAPSHIM_RESTORE"),
    );
    vec![
        Feature {
            name: "libsnapshim.so",
            available: shim.is_ok(),
            detail: shim.map_or_else(|e| e.message, |p| p.display().to_string()),
            enables: "checkpoints (loaded into the program with LD_PRELOAD)",
            required: true,
        },
        Feature {
            name: "snapshim-restore",
            available: restorer.is_ok(),
            detail: restorer.map_or_else(|e| e.message, |p| p.display().to_string()),
            enables: "restores",
            required: true,
        },
        proc_fs(),
        userfaultfd_wp(),
        wp_async(),
        pagemap_scan(),
        namespace(
            "user namespaces",
            CloneFlags::CLONE_NEWUSER,
            "unprivileged restores with the saved PID and thread IDs (with PID namespaces)",
        ),
        namespace(
            "PID namespaces",
            CloneFlags::CLONE_NEWPID,
            "restores with the saved PID and thread IDs; without them, new IDs after one warning",
        ),
        namespace(
            "time namespaces",
            CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
            "CLOCK_MONOTONIC and CLOCK_BOOTTIME going on from the checkpoint after a restore",
        ),
        set_mm_map(),
        kcmp(),
        timerfd_ticks(),
        tcp_repair(),
    ]
}

/// Whether this user may put a TCP socket in repair mode (CAP_NET_ADMIN).
fn tcp_repair() -> Feature {
    const TCP_REPAIR: libc::c_int = 19;
    // SAFETY: a plain socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let on: libc::c_int = 1;
    // SAFETY: an int option passed by pointer with its size, on our socket (or -1: EBADF).
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_REPAIR,
            (&on as *const libc::c_int).cast(),
            4,
        )
    };
    let err = std::io::Error::last_os_error();
    if fd >= 0 {
        // SAFETY: our probe socket.
        unsafe { libc::close(fd) };
    }
    Feature {
        name: "TCP_REPAIR",
        available: r == 0,
        detail: if r == 0 {
            "usable by this user (CAP_NET_ADMIN)".into()
        } else {
            format!("{err} (needs CAP_NET_ADMIN)")
        },
        enables: "live TCP connections: SNAPSHIM_TCP_ESTABLISHED, snapshim-restore \
                  --tcp-established (without it they come back reset)",
        required: false,
    }
}

fn proc_fs() -> Feature {
    let ok = std::fs::metadata("/proc/self/pagemap").is_ok()
        && std::fs::metadata("/proc/self/maps").is_ok();
    Feature {
        name: "/proc",
        available: ok,
        detail: if ok {
            "mounted".into()
        } else {
            "/proc/self/maps or /proc/self/pagemap missing".into()
        },
        enables: "reading the process's memory map and page flags at each checkpoint",
        required: true,
    }
}

// linux/userfaultfd.h
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFD_USER_MODE_ONLY: libc::c_long = 1;
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_EVENT_REMAP: u64 = 1 << 2;
const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const FEATURE_WP_ASYNC: u64 = 1 << 15;
// linux/fs.h
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_PRESENT: u64 = 1 << 3;

/// Opens a userfaultfd with `flags` and asks for `features`; the error says which step failed.
fn uffd_with(flags: libc::c_long, features: u64) -> std::result::Result<(), String> {
    // SAFETY: userfaultfd takes only flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as libc::c_long | flags,
        )
    };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the system call returned a new descriptor that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [UFFD_API, features, 0u64];
    // SAFETY: UFFDIO_API takes a struct uffdio_api (three u64), which `api` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) } != 0 {
        return Err(format!(
            "the kernel lacks the features {features:#x} ({})",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn unprivileged_uffd_sysctl() -> String {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| format!("vm.unprivileged_userfaultfd={}", s.trim()))
        .unwrap_or_default()
}

fn userfaultfd_wp() -> Feature {
    let features = FEATURE_PAGEFAULT_FLAG_WP
        | FEATURE_EVENT_REMAP
        | FEATURE_EVENT_REMOVE
        | FEATURE_EVENT_UNMAP;
    let r = uffd_with(0, features);
    Feature {
        name: "userfaultfd write-protect",
        available: r.is_ok(),
        detail: match r {
            Ok(()) => "usable by this user".into(),
            Err(e) => format!("{e}; {}", unprivileged_uffd_sysctl()),
        },
        enables: "the uffd engine: a pause of milliseconds (without it: the fork engine)",
        required: false,
    }
}

fn wp_async() -> Feature {
    let r = uffd_with(0, FEATURE_WP_ASYNC)
        .or_else(|_| uffd_with(UFFD_USER_MODE_ONLY, FEATURE_WP_ASYNC));
    Feature {
        name: "userfaultfd WP_ASYNC",
        available: r.is_ok(),
        detail: r.map_or_else(|e| e, |()| "usable by this user".into()),
        enables: "incremental checkpoints (dirty-page tracking; with PAGEMAP_SCAN)",
        required: false,
    }
}

fn pagemap_scan() -> Feature {
    let r = (|| -> std::result::Result<(), String> {
        let pm = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| format!("cannot open /proc/self/pagemap: {e}"))?;
        let probe = [1u8; 1];
        let at = probe.as_ptr() as u64 & !4095;
        let mut vec = [[0u64; 3]; 4];
        // struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len, max_pages,
        // category_inverted, category_mask, category_anyof_mask, return_mask.
        let mut arg = [
            96,
            0,
            at,
            at + 4096,
            0,
            vec.as_mut_ptr() as u64,
            vec.len() as u64,
            0,
            0,
            0,
            PAGE_IS_PRESENT,
            PAGE_IS_PRESENT,
        ];
        // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg (twelve u64), which `arg` is; its
        // output vector `vec` outlives the call.
        if unsafe { libc::ioctl(pm.as_raw_fd(), PAGEMAP_SCAN, arg.as_mut_ptr()) } < 0 {
            return Err(format!(
                "no PAGEMAP_SCAN ioctl ({})",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    })();
    Feature {
        name: "PAGEMAP_SCAN",
        available: r.is_ok(),
        detail: r.map_or_else(|e| e, |()| "present (Linux 6.7 or later)".into()),
        enables:
            "finding written pages quickly: incremental checkpoints and the uffd engine's pause",
        required: false,
    }
}

/// Tries `unshare(flags)` in a throw-away child (inside a new user namespace too when we are
/// not root, as the restorer does).
fn namespace(name: &'static str, flag: CloneFlags, enables: &'static str) -> Feature {
    let root = nix::unistd::geteuid().is_root();
    let flags = if root || flag == CloneFlags::CLONE_NEWUSER {
        flag
    } else {
        flag | CloneFlags::CLONE_NEWUSER
    };
    let r = in_child(|| nix::sched::unshare(flags).is_ok());
    Feature {
        name,
        available: r.is_ok(),
        detail: match r {
            Ok(()) => "can be created by this user".into(),
            Err(e) => {
                let sysctl = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
                    .map(|s| format!("; user.max_user_namespaces={}", s.trim()))
                    .unwrap_or_default();
                format!("{e}{sysctl}")
            }
        },
        enables,
        required: false,
    }
}

/// Runs `f` in a forked child and says whether it returned true.
fn in_child(f: impl FnOnce() -> bool) -> std::result::Result<(), String> {
    // SAFETY: the child only makes system calls and exits; this tool is single-threaded.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = if f() { 0 } else { 1 };
            // SAFETY: leaves the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(_) => Err("refused".into()),
            Err(e) => Err(format!("cannot wait for the probe: {e}")),
        },
        Err(e) => Err(format!("cannot fork a probe: {e}")),
    }
}

fn kcmp() -> Feature {
    const KCMP_FILE: libc::c_long = 0;
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp compares two descriptors of this process (stdin with itself, whatever it is;
    // a closed one gives EBADF, which still shows the system call exists).
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, 0, 0) };
    let err = std::io::Error::last_os_error();
    let ok = r >= 0 || err.raw_os_error() == Some(libc::EBADF);
    Feature {
        name: "kcmp",
        available: ok,
        detail: if ok {
            "present (CONFIG_KCMP)".into()
        } else {
            format!("{err}")
        },
        enables: "epoll registrations made under a number closed since, and eventfd, timerfd, \
                  signalfd, epoll and inotify descriptors open under several numbers (dup); \
                  without it each number is taken as registered and as its own object",
        required: false,
    }
}

fn timerfd_ticks() -> Feature {
    /// `_IOW('T', 0, __u64)`.
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    let r = (|| -> std::result::Result<(), String> {
        // SAFETY: timerfd_create makes a new descriptor, owned at once.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "timerfd_create: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ticks: u64 = 1;
        // SAFETY: the ioctl reads one u64.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks as *const u64) } < 0 {
            return Err(format!(
                "no TFD_IOC_SET_TICKS ({})",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    })();
    Feature {
        name: "TFD_IOC_SET_TICKS",
        available: r.is_ok(),
        detail: r.map_or_else(|e| e, |()| "present (CONFIG_CHECKPOINT_RESTORE)".into()),
        enables: "timerfd expirations not read at the checkpoint given back on restore; \
                  without it, restoring a timerfd with unread expirations fails",
        required: false,
    }
}

fn set_mm_map() -> Feature {
    let mut size: libc::c_uint = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes the size of struct prctl_mm_map into `size`.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut libc::c_uint,
            0,
            0,
        )
    };
    Feature {
        name: "PR_SET_MM_MAP",
        available: r == 0,
        detail: if r == 0 {
            "present (CONFIG_CHECKPOINT_RESTORE)".into()
        } else {
            format!("{}", std::io::Error::last_os_error())
        },
        enables: "restoring brk, the argument and environment areas and auxv exactly",
        required: false,
    }
}
