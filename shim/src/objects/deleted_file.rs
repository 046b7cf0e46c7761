//! Deleted-but-open files and memfds, capture side: a regular file whose path the kernel shows
//! as "PATH (deleted)" (unlinked after it was opened, `O_TMPFILE`, `tmpfile()`, a memfd) has no
//! name the restorer could reopen, so its whole content goes into the image.
//!
//! The content is read during the pause, into the writer's scratch heap, and travels in the
//! metadata: [`BUDGET`] bounds what one checkpoint takes of it (a larger deleted file is
//! recorded as unsupported, and the restore refuses it with one line).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use snapshim_image::{DeletedFile, FdKind, Memfd, Unsupported};

use crate::sys::{self, sc};

/// The most content of deleted files one checkpoint stores (the writer's scratch heap is
/// 192 MiB and holds the rest of the metadata too).
pub const BUDGET: u64 = 64 << 20;

/// `fcntl(F_GET_SEALS)`.
const F_GET_SEALS: i32 = 1034;

/// What the capture of one checkpoint's deleted files shares: the budget left, and the inodes
/// seen so far as ((device, inode), descriptor holding the content).
pub struct Seen {
    pub budget: u64,
    pub inodes: Vec<((u64, u64), i32)>,
}

impl Seen {
    pub fn new() -> Seen {
        Seen {
            budget: BUDGET,
            inodes: Vec::new(),
        }
    }
}

/// Descriptor `fd` of a deleted regular file the kernel names `target`, at offset `pos`.
pub fn capture(fd: i32, target: String, pos: u64, st: &libc::stat, seen: &mut Seen) -> FdKind {
    let path = String::from(target.trim_end_matches(" (deleted)"));
    let memfd = path.strip_prefix("/memfd:").map(|name| Memfd {
        name: String::from(name),
        seals: seals(fd),
    });
    let mut file = DeletedFile {
        path,
        offset: pos,
        mode: st.st_mode & 0o7777,
        content: Vec::new(),
        same_as: None,
        memfd,
    };
    let key = (st.st_dev, st.st_ino);
    if let Some(&(_, first)) = seen.inodes.iter().find(|s| s.0 == key) {
        file.same_as = Some(first);
        return FdKind::DeletedFile(file);
    }
    let size = st.st_size as u64;
    if size > seen.budget {
        return unsupported(
            target,
            "larger than what is left of the 64 MiB an image keeps",
        );
    }
    match read_all(fd, size) {
        Some(content) => file.content = content,
        None => return unsupported(target, "its content could not be read"),
    }
    seen.budget -= size;
    seen.inodes.push((key, fd));
    FdKind::DeletedFile(file)
}

/// The seals of a memfd (0 if it has none or they cannot be read).
fn seals(fd: i32) -> u32 {
    // SAFETY: F_GET_SEALS takes no pointer.
    sys::check(unsafe { sc!(libc::SYS_fcntl, fd, F_GET_SEALS) }).map_or(0, |s| s as u32)
}

/// The whole file behind `fd`, `size` bytes, read through a descriptor of its own (`fd` may be
/// write-only, and its offset is the program's).
fn read_all(fd: i32, size: u64) -> Option<Vec<u8>> {
    let mut nb = [0u8; 20];
    let num = sys::itoa(fd as u64, &mut nb);
    let path = super::cpath(&["/proc/self/fd/", num]);
    let own = sys::open(&path, libc::O_RDONLY | libc::O_CLOEXEC, 0).ok()?;
    let mut content = alloc::vec![0u8; size as usize];
    let mut got = 0;
    while got < content.len() {
        match sys::pread(own, &mut content[got..], got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    sys::close(own);
    (got == content.len()).then_some(content)
}

/// A deleted file that stays out of the image: the restore refuses it (see
/// `restorer/src/objects/inherited.rs`, `why`).
fn unsupported(target: String, why: &str) -> FdKind {
    FdKind::Unsupported(Unsupported {
        desc: alloc::format!("{target}: {why}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(fd: i32) -> libc::stat {
        super::super::fstat(fd).expect("fstat")
    }

    /// A file opened twice, unlinked, written: the first descriptor keeps the whole content,
    /// the second names the first; a memfd keeps its name and seals; a file beyond the budget
    /// is unsupported, with the reason.
    #[test]
    fn captures_content_sharing_memfds_and_the_budget() {
        let dir = std::env::temp_dir().join(alloc::format!("snapshim-del-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gone");
        let a = std::fs::File::create(&path).unwrap();
        let b = std::fs::File::open(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::io::Write::write_all(&mut &a, b"deleted but open").unwrap();
        use std::os::fd::AsRawFd;
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let mut seen = Seen::new();
        let target = alloc::format!("{} (deleted)", path.display());
        let FdKind::DeletedFile(first) = capture(fa, target.clone(), 16, &stat_of(fa), &mut seen)
        else {
            panic!("not a deleted file");
        };
        assert_eq!(first.content, b"deleted but open");
        assert_eq!((first.offset, first.same_as), (16, None));
        assert_eq!(first.path, path.to_str().unwrap());
        let FdKind::DeletedFile(second) = capture(fb, target.clone(), 0, &stat_of(fb), &mut seen)
        else {
            panic!("not a deleted file");
        };
        assert_eq!((second.same_as, second.content.len()), (Some(fa), 0));

        // SAFETY: a new memfd from a NUL-terminated name; closed below.
        let m = unsafe { libc::memfd_create(c"cache".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(m >= 0);
        // SAFETY: plain integer arguments on our descriptor.
        let sealed = unsafe { libc::fcntl(m, libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
        assert_eq!(sealed, 0);
        let FdKind::DeletedFile(mem) = capture(
            m,
            "/memfd:cache (deleted)".into(),
            0,
            &stat_of(m),
            &mut seen,
        ) else {
            panic!("not a deleted file");
        };
        let memfd = mem.memfd.expect("a memfd");
        assert_eq!(
            (memfd.name.as_str(), memfd.seals),
            ("cache", libc::F_SEAL_GROW as u32)
        );

        seen.budget = 3;
        let mut st = stat_of(m);
        st.st_ino ^= 1;
        let FdKind::Unsupported(u) = capture(fa, target, 0, &st_with_size(&mut st, 4), &mut seen)
        else {
            panic!("a file beyond the budget is kept");
        };
        assert!(u.desc.ends_with("64 MiB an image keeps"), "{}", u.desc);
        sys::close(m);
    }

    fn st_with_size(st: &mut libc::stat, size: i64) -> libc::stat {
        st.st_size = size;
        *st
    }
}
