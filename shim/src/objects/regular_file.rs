//! Regular files, capture side: path, offset, and the size and identity the file had (the
//! restorer puts the file back to that length, so output is never duplicated or torn).

use alloc::string::String;

use snapshim_image::{FdKind, RegularFile};

use super::memory::identity_of;

/// A descriptor of a regular file that still exists under `path`, at offset `pos`.
pub fn capture(path: String, pos: u64, st: &libc::stat) -> FdKind {
    FdKind::RegularFile(RegularFile {
        path,
        offset: pos,
        size: st.st_size as u64,
        identity: identity_of(st),
    })
}
