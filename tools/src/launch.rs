//! `snapshim run` and `snapshim restore`: both end in `exec`, so the program (or the restorer)
//! takes over this process and its PID.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use snapshim_image::settings::RunSettings;

use crate::{Failure, RestoreArgs, Result, RunArgs};

/// File name of the shim, looked for next to the `snapshim` executable.
pub const SHIM_LIB: &str = "libsnapshim.so";
/// File name of the restorer, looked for next to the `snapshim` executable.
pub const RESTORER: &str = "snapshim-restore";
/// Image directory when neither `--dir` nor `SNAPSHIM_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "snapshim-images";

pub fn run(a: RunArgs) -> Result<()> {
    let lib = companion(SHIM_LIB, "SNAPSHIM_LIB")?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => default_dir(),
    };
    let dir = absolute(&dir)?;
    let (prog, args) = a
        .command
        .split_first()
        .ok_or_else(|| Failure::usage("no program to run"))?;
    find_program(prog)
        .and_then(|exe| crate::enterable::check(&exe))
        .map_err(|why| Failure::op(format!("cannot run {}: {why}", Path::new(prog).display())))?;

    let settings = RunSettings {
        dir: Some(dir.clone()),
        name: a.name.clone(),
        interval: a.interval.clone(),
        signal: a.signal.clone(),
        keep: a.keep.map(u64::from),
        incremental: a.incremental.clone(),
        full_every: a.full_every.map(u64::from),
        full_fraction: a.full_fraction,
        keep_store: a.keep_store.then_some(true),
        tcp_established: a.tcp_established,
        // The shim says where its images go (it alone knows: the executable's name after
        // symlinks, and a directory beside if that one is in use).
        announce: Some(std::process::id()),
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env(
            "LD_PRELOAD",
            ld_preload(&lib, std::env::var_os("LD_PRELOAD").as_deref()),
        )
        .envs(settings.env());
    let err = cmd.exec();
    Err(Failure::op(format!(
        "cannot run {}: {err}",
        Path::new(prog).display()
    )))
}

pub fn restore(a: RestoreArgs) -> Result<()> {
    let restorer = companion(RESTORER, "SNAPSHIM_RESTORE")?;
    let err = Command::new(&restorer).args(&a.args).exec();
    Err(Failure::op(format!(
        "cannot run {}: {err}",
        restorer.display()
    )))
}

/// `$SNAPSHIM_DIR` if set, else `./snapshim-images`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("SNAPSHIM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// `path` made absolute against the current directory, without requiring it to exist.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Failure::op(format!("cannot resolve {}: {e}", path.display())))
}

/// A file installed next to the `snapshim` executable (as cargo builds them into
/// target/release/), or the path in `env_var` if that is set.
pub fn companion(file: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = absolute(Path::new(&p))?;
        if !p.is_file() {
            return Err(Failure::op(format!(
                "cannot find {file}: {env_var} names {}, which is not a file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Failure::op(format!("cannot find {file}: cannot locate snapshim: {e}")))?;
    let p = exe.with_file_name(file);
    if !p.is_file() {
        return Err(Failure::op(format!(
            "cannot find {file}: {} does not exist (build the workspace with \
             `cargo build --release`, or set {env_var})",
            p.display()
        )));
    }
    Ok(p)
}

/// The new `LD_PRELOAD`: the shim first, then what was there (unless it already names the
/// shim).
pub fn ld_preload(lib: &Path, existing: Option<&OsStr>) -> OsString {
    let mut v = OsString::from(lib);
    if let Some(old) = existing.filter(|o| !o.is_empty()) {
        let already = old
            .as_bytes()
            .split(|&b| b == b':' || b == b' ')
            .any(|entry| entry == lib.as_os_str().as_bytes());
        if already {
            return old.to_os_string();
        }
        v.push(":");
        v.push(old);
    }
    v
}

/// Where `exec` will find `prog`: a path if it contains a slash, else the first executable
/// file of that name in `$PATH` (as execvp searches).
fn find_program(prog: &OsStr) -> std::result::Result<PathBuf, String> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.as_bytes().contains(&b'/') {
        let p = PathBuf::from(prog);
        return match std::fs::metadata(&p) {
            Err(e) => Err(e.to_string()),
            Ok(_) if !is_exec(&p) => Err("not an executable file".into()),
            Ok(_) => Ok(p),
        };
    }
    if prog.is_empty() {
        return Err("empty program name".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| is_exec(p))
        .ok_or_else(|| "not found in PATH".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_goes_first_in_ld_preload() {
        let lib = Path::new("/opt/s/libsnapshim.so");
        assert_eq!(ld_preload(lib, None), "/opt/s/libsnapshim.so");
        assert_eq!(
            ld_preload(lib, Some(OsStr::new(""))),
            "/opt/s/libsnapshim.so"
        );
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/x/a.so:b.so"))),
            "/opt/s/libsnapshim.so:/x/a.so:b.so"
        );
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/x/a.so /opt/s/libsnapshim.so"))),
            "/x/a.so /opt/s/libsnapshim.so"
        );
    }

    #[test]
    fn programs_are_found_like_execvp() {
        assert!(find_program(OsStr::new("sh")).is_ok());
        assert!(find_program(OsStr::new("/bin/sh")).is_ok());
        assert!(find_program(OsStr::new("no-such-program-here")).is_err());
        assert!(find_program(OsStr::new("/etc/passwd")).is_err());
        assert!(find_program(OsStr::new("./no/such")).is_err());
    }
}
