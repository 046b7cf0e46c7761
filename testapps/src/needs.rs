//! What a test needs of the machine (root, userfaultfd, transparent huge pages, a library or a
//! program from a Debian package) and what happens when it is not there.
//!
//! A test that cannot run here must not pass as if it had: under CI (`CI` set) it fails with
//! one line naming what it needs; elsewhere (a developer's machine) it is skipped loudly, with a
//! line on the terminal saying what was skipped and why. The line is written to the process's
//! stderr directly, past the test harness's output capture, so it shows in a passing run.
//!
//! ```no_run
//! # use snapshim_testapps::{needs, Result};
//! # fn main() -> Result<()> {
//! if !needs::root("`unshare --time` for the first machine")? {
//!     return Ok(()); // skipped, and said so
//! }
//! # Ok(())
//! # }
//! ```
#![allow(unsafe_code)] // the userfaultfd probe and close, each with its SAFETY note.

use std::fmt::Display;
use std::io::Write;

use crate::process::is_root;
use crate::{Failure, Result};

/// Whether the tests run under CI: `CI` set to anything but empty, `0` or `false`.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether the running test may go on. `Ok(true)` when `available`; otherwise an error saying
/// the test needs `what` under CI, and `Ok(false)` after a line on stderr elsewhere (the test
/// then returns at once without checking anything).
pub fn check(what: impl Display, available: bool) -> Result<bool> {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    decide(&test, what, available, under_ci(), &mut std::io::stderr())
}

/// [`check`] with the test's name, the CI flag and where the skip line goes made explicit.
fn decide(
    test: &str,
    what: impl Display,
    available: bool,
    ci: bool,
    terminal: &mut impl Write,
) -> Result<bool> {
    if available {
        return Ok(true);
    }
    if ci {
        return Err(Failure::new(format!(
            "{test} needs {what}, which this CI machine does not give it"
        )));
    }
    // Straight to stderr, past the harness's capture (which takes only the print macros), so
    // the line shows in a passing run.
    let _ = writeln!(
        terminal,
        "SKIPPED {test}: needs {what} (under CI it fails instead)"
    );
    Ok(false)
}

/// [`check`] for root, needed `for_what`.
pub fn root(for_what: &str) -> Result<bool> {
    check(format_args!("root ({for_what})"), is_root())
}

/// [`check`] for a userfaultfd that catches kernel-mode faults too, as the `uffd` copy-on-write
/// engine needs: root (CAP_SYS_PTRACE), or `vm.unprivileged_userfaultfd=1`. Probed by opening
/// one in this process, which runs the apps as the same user.
pub fn userfaultfd() -> Result<bool> {
    check(
        "a userfaultfd for kernel faults (root, or sysctl vm.unprivileged_userfaultfd=1) for the \
         uffd engine",
        userfaultfd_opens(),
    )
}

/// [`check`] for transparent huge pages in `always` or `madvise` mode.
pub fn transparent_huge_pages() -> Result<bool> {
    let thp = "/sys/kernel/mm/transparent_hugepage/enabled";
    let mode = std::fs::read_to_string(thp).unwrap_or_default();
    check(
        format_args!("transparent huge pages ({thp} says {:?})", mode.trim()),
        mode.contains("[always]") || mode.contains("[madvise]"),
    )
}

/// [`check`] for a C library the C compiler links with `-lLIB`, from the Debian package
/// `package` (which `scripts/test.sh` installs).
pub fn c_library(lib: &str, package: &str) -> Result<bool> {
    check(
        format_args!("-l{lib} (Debian package {package})"),
        c_library_found(lib),
    )
}

/// [`check`] for a program at an absolute path, from the Debian package `package` (which
/// `scripts/test.sh` installs).
pub fn program(path: &str, package: &str) -> Result<bool> {
    check(
        format_args!("{path} (Debian package {package})"),
        std::path::Path::new(path).is_file(),
    )
}

/// Whether the C compiler finds `libLIB.so`: `cc -print-file-name` answers with a path only for
/// a file it finds, with the bare name otherwise.
pub fn c_library_found(lib: &str) -> bool {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    std::process::Command::new(cc)
        .arg(format!("-print-file-name=lib{lib}.so"))
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains('/'))
}

/// `userfaultfd(O_CLOEXEC | O_NONBLOCK)` succeeds (without `UFFD_USER_MODE_ONLY`).
pub fn userfaultfd_opens() -> bool {
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is the descriptor just opened, owned by nothing else.
    unsafe { libc::close(fd as i32) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_goes_on_silently_with_or_without_ci() {
        for ci in [false, true] {
            let mut said = Vec::new();
            assert!(decide("t", "root", true, ci, &mut said).unwrap());
            assert!(said.is_empty());
        }
    }

    #[test]
    fn missing_fails_under_ci_naming_the_test_and_the_need() {
        let mut said = Vec::new();
        let e = decide(
            "ns::clocks",
            "root (unshare --time)",
            false,
            true,
            &mut said,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ns::clocks needs root (unshare --time), which this CI machine does not give it"
        );
        assert!(said.is_empty());
    }

    #[test]
    fn missing_is_skipped_loudly_elsewhere() {
        let mut said = Vec::new();
        assert!(!decide(
            "ns::clocks",
            "root (unshare --time)",
            false,
            false,
            &mut said
        )
        .unwrap());
        assert_eq!(
            String::from_utf8(said).unwrap(),
            "SKIPPED ns::clocks: needs root (unshare --time) (under CI it fails instead)\n"
        );
    }
}
