//! The kinds of process state an image holds, one module per kind of kernel object.
//!
//! The rule that keeps the code in shape: **a new kind of kernel object is one module here
//! (its image type, and for a descriptor one variant of [`FdKind`]), one module of the same
//! name in `shim/src/objects/` (capture) and one in `restorer/src/objects/` (restore)**, plus
//! one arm in each side's dispatch. CRIU keeps one set of dump and restore operations per file
//! type the same way.
//!
//! Encoding: postcard is positional, so a newtype variant `Kind(KindState { a, b })` encodes
//! exactly as the struct variant `Kind { a, b }` did in format 1.0-1.3. Fields are only ever
//! appended, in a new minor version.

use serde::{Deserialize, Serialize};

pub mod char_device;
pub mod directory;
pub mod inherited;
pub mod memory;
pub mod pipe;
pub mod process;
pub mod regular_file;
pub mod signals;
pub mod threads;
pub mod timers;

pub use char_device::CharDevice;
pub use directory::Directory;
pub use inherited::{Inherited, Unsupported};
pub use memory::{FileIdentity, PageRun, PageSpan, Region, RegionKind};
pub use pipe::Pipe;
pub use process::{MmFields, Process, Rlimit};
pub use regular_file::RegularFile;
pub use signals::SigAction;
pub use threads::{Credentials, ThreadState};
pub use timers::IntervalTimer;

/// One open descriptor of the process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdState {
    pub fd: i32,
    /// O_* status flags from fdinfo (access mode, O_APPEND, O_NONBLOCK, ...).
    pub flags: u32,
    pub cloexec: bool,
    pub kind: FdKind,
}

/// What a descriptor refers to: one variant per kind, its state in the kind's own module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FdKind {
    RegularFile(RegularFile),
    Directory(Directory),
    CharDevice(CharDevice),
    Pipe(Pipe),
    Inherited(Inherited),
    Unsupported(Unsupported),
}

impl FdKind {
    /// A short name of the kind, for messages and listings.
    pub fn name(&self) -> &'static str {
        match self {
            FdKind::RegularFile(_) => "file",
            FdKind::Directory(_) => "directory",
            FdKind::CharDevice(_) => "character device",
            FdKind::Pipe(_) => "pipe",
            FdKind::Inherited(_) => "inherited",
            FdKind::Unsupported(_) => "unsupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FdKind` as formats 1.0-1.3 declared it, with struct variants.
    #[derive(Serialize)]
    enum FdKindV1_3 {
        Regular {
            path: String,
            offset: u64,
            size: u64,
            identity: FileIdentity,
        },
        Directory {
            path: String,
        },
        CharDevice {
            path: String,
        },
        Pipe {
            id: u64,
            read_end: bool,
            data: Vec<u8>,
        },
        Inherited {
            desc: String,
        },
        Unsupported {
            desc: String,
        },
    }

    #[test]
    fn newtype_variants_encode_as_the_struct_variants_of_format_1_3() {
        let identity = FileIdentity {
            size: 7,
            mtime_ns: -3,
            inode: 99,
        };
        let pairs = [
            (
                FdKind::RegularFile(RegularFile {
                    path: "/tmp/out".into(),
                    offset: 5,
                    size: 7,
                    identity: identity.clone(),
                }),
                FdKindV1_3::Regular {
                    path: "/tmp/out".into(),
                    offset: 5,
                    size: 7,
                    identity,
                },
            ),
            (
                FdKind::Directory(Directory { path: "/".into() }),
                FdKindV1_3::Directory { path: "/".into() },
            ),
            (
                FdKind::CharDevice(CharDevice {
                    path: "/dev/null".into(),
                }),
                FdKindV1_3::CharDevice {
                    path: "/dev/null".into(),
                },
            ),
            (
                FdKind::Pipe(Pipe {
                    id: 4,
                    read_end: true,
                    data: vec![1, 2, 3],
                }),
                FdKindV1_3::Pipe {
                    id: 4,
                    read_end: true,
                    data: vec![1, 2, 3],
                },
            ),
            (
                FdKind::Inherited(Inherited { desc: "tty".into() }),
                FdKindV1_3::Inherited { desc: "tty".into() },
            ),
            (
                FdKind::Unsupported(Unsupported {
                    desc: "socket".into(),
                }),
                FdKindV1_3::Unsupported {
                    desc: "socket".into(),
                },
            ),
        ];
        for (new, old) in pairs {
            assert_eq!(
                postcard::to_allocvec(&new).unwrap(),
                postcard::to_allocvec(&old).unwrap(),
                "{}",
                new.name()
            );
        }
    }
}
