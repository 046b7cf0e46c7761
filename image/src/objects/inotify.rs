//! An inotify descriptor (`inotify_init(2)`) and its watches.

use serde::{Deserialize, Serialize};

/// Every watch. Events queued but not read at the checkpoint are not kept: the restored
/// descriptor starts with an `IN_Q_OVERFLOW` event, which tells the program that events may
/// have been lost (programs rescan what they watch).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inotify {
    pub watches: Vec<InotifyWatch>,
}

/// One watch: `inotify_add_watch(fd, path, mask)` returned `wd`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    pub wd: i32,
    /// As the kernel keeps it (fdinfo's `mask`): events and flags such as `IN_ONESHOT` and
    /// `IN_EXCL_UNLINK`.
    pub mask: u32,
    /// The absolute path the program gave when it added the watch (noted by the shim).
    pub path: String,
}
