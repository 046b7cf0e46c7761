//! A regular file unlinked while open ("PATH (deleted)"), or a memfd ("/memfd:NAME (deleted)").

use serde::{Deserialize, Serialize};

/// The content travels in the image (in the metadata, which is checksummed): on another
/// machine, or after a reboot, nothing else holds it. Restored as an unlinked file of the same
/// content, mode and open flags, at `offset` (a memfd as a memfd of the same name and seals).
///
/// Several open files of one inode (the file opened twice before it was unlinked) carry the
/// content once, in the first; the others have `same_as` set to that descriptor's number and
/// are reopened from it, so they share the file again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedFile {
    /// The path the kernel shows, without " (deleted)" (for a memfd, "/memfd:NAME").
    pub path: String,
    pub offset: u64,
    /// Permission bits of the file (`st_mode & 0o7777`).
    pub mode: u32,
    /// The whole file, `st_size` bytes (empty when `same_as` is set).
    pub content: Vec<u8>,
    /// The lower descriptor of the same inode that holds the content.
    pub same_as: Option<i32>,
    /// Set for a memfd.
    pub memfd: Option<Memfd>,
}

/// What `memfd_create` made, besides the content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Memfd {
    /// The name given to `memfd_create` (after "memfd:").
    pub name: String,
    /// `F_GET_SEALS`: `F_SEAL_SEAL` alone for a memfd made without `MFD_ALLOW_SEALING`.
    pub seals: u32,
}
