//! Directories, capture side: a descriptor of a directory that still exists, by path.

use alloc::string::String;

use snapshim_image::{Directory, FdKind};

pub fn capture(path: String) -> FdKind {
    FdKind::Directory(Directory { path })
}
