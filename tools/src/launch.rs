//! `snapshim run` and `snapshim restore`: both end in `exec`, so the program (or the restorer)
//! takes over this process and its PID.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use snapshim_image::settings::RunSettings;

use crate::cli::{RestoreArgs, RunArgs};
use crate::companions::{absolute, companion, default_dir, ld_preload, RESTORER, SHIM_LIB};
use crate::failure::{Failure, Result};

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
        group: a.group.clone(),
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
    if let Some(set) = &a.group {
        return crate::group::restore(set, a.json);
    }
    let restorer = companion(RESTORER, "SNAPSHIM_RESTORE")?;
    let err = Command::new(&restorer).args(&a.args).exec();
    Err(Failure::op(format!(
        "cannot run {}: {err}",
        restorer.display()
    )))
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
    fn programs_are_found_like_execvp() {
        assert!(find_program(OsStr::new("sh")).is_ok());
        assert!(find_program(OsStr::new("/bin/sh")).is_ok());
        assert!(find_program(OsStr::new("no-such-program-here")).is_err());
        assert!(find_program(OsStr::new("/etc/passwd")).is_err());
        assert!(find_program(OsStr::new("./no/such")).is_err());
    }
}
