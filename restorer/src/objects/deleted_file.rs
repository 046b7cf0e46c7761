//! A deleted-but-open file or a memfd: re-created unlinked, with the content, mode and seals it
//! had, and opened as the program had it (access mode, status flags) at its offset.
//!
//! Where a deleted file is re-created, the first that works of: its own directory (it may not
//! exist on this machine), the image's directory, `/tmp`; in each, `O_TMPFILE` if the file
//! system has it, else a new file unlinked at once. A memfd is made with `memfd_create` under
//! its name, sealed again once its content is written.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use snapshim_image::{DeletedFile, FdState, Memfd};

use super::{access_mode, move_high, status_flags, Prepare, Prepared};

/// `memfd_create` flag and seal constants (linux/memfd.h, linux/fcntl.h).
const MFD_ALLOW_SEALING: u32 = 2;
const F_ADD_SEALS: i32 = 1033;
const F_SEAL_SEAL: u32 = 1;

pub fn prepare(
    cx: &Prepare,
    f: &FdState,
    d: &DeletedFile,
    moves: &[(RawFd, RawFd, bool)],
) -> Result<Prepared, String> {
    let Some(of) = d.same_as else {
        return fresh(cx, f, d);
    };
    let Some(&(_, backing, _)) = moves.iter().find(|m| m.0 == of) else {
        return Err(format!(
            "descriptor {} is the deleted file {} of descriptor {of}, which the image does not \
             rebuild",
            f.fd, d.path
        ));
    };
    reopen(cx, f, d, backing).map(Prepared::At)
}

/// A new unlinked file (or memfd) with `d`'s content, opened as `f` was.
fn fresh(cx: &Prepare, f: &FdState, d: &DeletedFile) -> Result<Prepared, String> {
    let file = match &d.memfd {
        Some(m) => memfd(m),
        None => unlinked_file(&d.path, &cx.image_dir),
    }
    .map_err(|e| {
        format!(
            "cannot re-create the deleted file {} (descriptor {} of the program): {e}",
            d.path, f.fd
        )
    })?;
    let fill = |mut file: &File| -> std::io::Result<()> {
        file.write_all(&d.content)?;
        if d.memfd.is_none() {
            file.set_permissions(std::fs::Permissions::from_mode(d.mode))?;
        }
        Ok(())
    };
    fill(&file).map_err(|e| {
        format!(
            "cannot write the content of the deleted file {} (descriptor {} of the program): {e}",
            d.path, f.fd
        )
    })?;
    if let Some(m) = &d.memfd {
        seal(&file, m).map_err(|e| {
            format!(
                "cannot seal the memfd {} (descriptor {} of the program) again: {e}",
                m.name, f.fd
            )
        })?;
    }
    let backing = move_high(file.into_raw_fd(), cx.high_base)?;
    let fd = reopen(cx, f, d, backing);
    // SAFETY: our own descriptor; the reopened one keeps the file.
    unsafe { libc::close(backing) };
    fd.map(Prepared::At)
}

/// Opens the file behind our descriptor `backing` as `f` was opened, at `d.offset`: through
/// `/proc/self/fd`, without the flags that only meant something when the program opened it by
/// name (`O_TMPFILE`; `O_NOFOLLOW`, with which sqlite opens its temporary files, would refuse
/// the `/proc` link).
fn reopen(cx: &Prepare, f: &FdState, d: &DeletedFile, backing: RawFd) -> Result<RawFd, String> {
    let acc = access_mode(f);
    let path = format!("/proc/self/fd/{backing}");
    let file = std::fs::OpenOptions::new()
        .read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .custom_flags(status_flags(f) & !(libc::O_TMPFILE | libc::O_NOFOLLOW))
        .open(&path)
        .map_err(|e| {
            format!(
                "cannot reopen the re-created deleted file {} (descriptor {} of the program): {e}",
                d.path, f.fd
            )
        })?;
    let fd = move_high(file.into_raw_fd(), cx.high_base)?;
    // SAFETY: lseek on our descriptor.
    unsafe { libc::lseek(fd, d.offset as i64, libc::SEEK_SET) };
    Ok(fd)
}

/// A memfd named as `m` was, allowing seals unless it had only `F_SEAL_SEAL` (what a memfd made
/// without `MFD_ALLOW_SEALING` reports).
fn memfd(m: &Memfd) -> std::io::Result<File> {
    let name = std::ffi::CString::new(m.name.as_str()).map_err(std::io::Error::other)?;
    let flags = libc::MFD_CLOEXEC
        | if m.seals == F_SEAL_SEAL {
            0
        } else {
            MFD_ALLOW_SEALING
        };
    // SAFETY: name is NUL-terminated; the result is a new descriptor we own.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Puts `m`'s seals back on a memfd whose content is written.
fn seal(file: &File, m: &Memfd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if m.seals == F_SEAL_SEAL || m.seals == 0 {
        return Ok(());
    }
    // SAFETY: F_ADD_SEALS takes an integer.
    if unsafe { libc::fcntl(file.as_raw_fd(), F_ADD_SEALS, m.seals as libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new file without a name: in the directory of `path`, else in `image_dir`, else in /tmp.
fn unlinked_file(path: &str, image_dir: &Path) -> std::io::Result<File> {
    let own = Path::new(path).parent().filter(|p| p.is_absolute());
    let mut last = None;
    for dir in own.into_iter().chain([image_dir, Path::new("/tmp")]) {
        match unlinked_in(dir) {
            Ok(file) => return Ok(file),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT)))
}

/// `O_TMPFILE` in `dir`, or where the file system does not have it, a file created there and
/// unlinked at once.
fn unlinked_in(dir: &Path) -> std::io::Result<File> {
    let tmp = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(dir);
    match tmp {
        Ok(file) => return Ok(file),
        Err(e)
            if e.raw_os_error() != Some(libc::EOPNOTSUPP)
                && e.raw_os_error() != Some(libc::EISDIR) =>
        {
            return Err(e)
        }
        Err(_) => {}
    }
    for n in 0..100u32 {
        let name = dir.join(format!(".snapshim-deleted-{}-{n}", std::process::id()));
        let made = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .mode(0o600)
            .open(&name);
        match made {
            Ok(file) => {
                std::fs::remove_file(&name)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EEXIST))
}
