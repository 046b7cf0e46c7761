//! The image's temporary file: created before the pause (creating a file costs 0.1-0.5 ms on
//! ext4 here, which the program need not wait for), written by the flush, renamed into place
//! by the commit, or given up.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use snapshim_image as image;

use crate::config::Config;
use crate::sys;

pub(super) fn errmsg(what: &str, path: &std::path::Path, e: i32) -> String {
    alloc::format!(
        "cannot {what} {}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(e)
    )
}

/// The temporary file an image is written to, and where it goes when committed.
pub struct Target {
    pub dir: PathBuf,
    pub tmp: PathBuf,
    pub path: PathBuf,
    pub fd: i32,
}

pub fn create_target(cfg: &Config, seq: u64) -> Result<Target, String> {
    create_named_target(cfg, &image::image_file_name(seq))
}

/// A target named `name` in the image directory.
pub fn create_named_target(cfg: &Config, name: &str) -> Result<Target, String> {
    let dir = crate::owner::dir(cfg);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            let hint = crate::owner::access_hint(e.raw_os_error().unwrap_or(0), &dir);
            alloc::format!("cannot create image directory {}: {e}{hint}", dir.display())
        })?;
    let path = dir.join(name);
    let tmp = dir.join(alloc::format!(".{name}.tmp"));
    let fd = sys::open(
        &cpath(&tmp),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
        0o600,
    )
    .map_err(|e| errmsg("create image file", &tmp, e) + &crate::owner::access_hint(e, &dir))?;
    Ok(Target { dir, tmp, path, fd })
}

pub(super) fn cpath(p: &std::path::Path) -> Vec<u8> {
    let mut c = p.as_os_str().as_encoded_bytes().to_vec();
    c.push(0);
    c
}

/// Gives up a target: the temporary file goes, the previous image stays as it was.
pub fn abandon(t: &Target) {
    sys::close(t.fd);
    let _ = std::fs::remove_file(&t.tmp);
}
