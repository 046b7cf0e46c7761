//! Where snapshim's own files are: the shim library and the restorer installed beside the
//! `snapshim` executable, the default image directory, and the `LD_PRELOAD` that loads the
//! shim. Shared by every command that starts or looks at a program under the shim.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::failure::{Failure, Result};

/// File name of the shim, looked for next to the `snapshim` executable.
pub const SHIM_LIB: &str = "libsnapshim.so";
/// File name of the restorer, looked for next to the `snapshim` executable.
pub const RESTORER: &str = "snapshim-restore";
/// Image directory when neither `--dir` nor `SNAPSHIM_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "snapshim-images";

/// `$SNAPSHIM_DIR` if set, else `./snapshim-images`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("SNAPSHIM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// `path` made absolute against the current directory, without requiring it to exist.
pub fn absolute(path: &Path) -> Result<PathBuf> {
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
}
