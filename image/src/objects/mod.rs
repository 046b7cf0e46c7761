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
pub mod deleted_file;
pub mod directory;
pub mod epoll;
pub mod eventfd;
pub mod inherited;
pub mod inotify;
pub mod memory;
pub mod pipe;
pub mod process;
pub mod regular_file;
pub mod signalfd;
pub mod signals;
pub mod socket;
pub mod threads;
pub mod timerfd;
pub mod timers;

pub use char_device::CharDevice;
pub use deleted_file::{DeletedFile, Memfd};
pub use directory::Directory;
pub use epoll::{Epoll, EpollWatch};
pub use eventfd::Eventfd;
pub use inherited::{Inherited, Unsupported};
pub use inotify::{Inotify, InotifyWatch};
pub use memory::{FileIdentity, PageRun, PageSpan, Region, RegionKind};
pub use pipe::Pipe;
pub use process::{MmFields, Process, Rlimit};
pub use regular_file::RegularFile;
pub use signalfd::Signalfd;
pub use signals::SigAction;
pub use socket::{SockOpt, Socket, SocketRole, TcpRepair};
pub use threads::{Credentials, ThreadState};
pub use timerfd::Timerfd;
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
    // Format 1.4:
    Eventfd(Eventfd),
    Timerfd(Timerfd),
    Signalfd(Signalfd),
    Epoll(Epoll),
    Duplicate(Duplicate),
    Inotify(Inotify),
    Socket(Socket),
    DeletedFile(DeletedFile),
}

/// The same open file as descriptor `of` (a lower number of the process), as `dup` makes:
/// restored as a duplicate of it, sharing its state (a counter, a timer, registrations).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Duplicate {
    pub of: i32,
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
            FdKind::Eventfd(_) => "eventfd",
            FdKind::Timerfd(_) => "timerfd",
            FdKind::Signalfd(_) => "signalfd",
            FdKind::Epoll(_) => "epoll",
            FdKind::Duplicate(_) => "duplicate",
            FdKind::Inotify(_) => "inotify",
            FdKind::Socket(_) => "socket",
            FdKind::DeletedFile(_) => "deleted file",
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

    /// Format 1.4 appended `FdKind::Socket`: it round-trips, and every earlier variant keeps
    /// its number (the test below).
    #[test]
    fn sockets_round_trip() {
        let roles = [
            SocketRole::Unbound,
            SocketRole::Bound,
            SocketRole::Listening { backlog: 128 },
            SocketRole::Connected,
            SocketRole::Pair {
                peer: 7,
                queued: vec![b"d1".to_vec(), Vec::new()],
            },
            SocketRole::Reset,
            SocketRole::Refused {
                why: "descriptors are in flight in it (SCM_RIGHTS)".into(),
            },
            SocketRole::Established {
                repair: TcpRepair {
                    send_seq: 0xfff0_0000,
                    recv_seq: 17,
                    send_queue: b"sent, then unsent".to_vec(),
                    unsent: 6,
                    recv_queue: b"unread".to_vec(),
                    window: [1, 2, 3, 4, 5],
                    mss: 65483,
                    wscale: Some((7, 7)),
                    sack: true,
                    timestamps: true,
                    timestamp: 123_456,
                    realtime_ns: 1_765_000_000_000_000_000,
                },
            },
        ];
        for role in roles {
            let kind = FdKind::Socket(Socket {
                id: 6,
                family: 10,
                sock_type: 1,
                protocol: 6,
                local: vec![10, 0, 0x1f, 0x90],
                peer: Vec::new(),
                options: vec![SockOpt {
                    level: 1,
                    name: 2,
                    value: 1i32.to_ne_bytes().to_vec(),
                }],
                role,
            });
            let bytes = postcard::to_allocvec(&kind).unwrap();
            assert_eq!(bytes[0], 12, "Socket is the thirteenth variant");
            assert_eq!(postcard::from_bytes::<FdKind>(&bytes).unwrap(), kind);
            assert_eq!(kind.name(), "socket");
        }
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

    /// The kinds of format 1.4 come after every older one (postcard numbers variants by
    /// position, so 1.3 images decode unchanged) and survive a round trip.
    #[test]
    fn format_1_4_kinds_are_appended_and_round_trip() {
        let kinds = [
            FdKind::Eventfd(Eventfd {
                count: u64::MAX - 1,
                semaphore: true,
            }),
            FdKind::Timerfd(Timerfd {
                clock: 1,
                settime_flags: 1,
                value_ns: 5,
                interval_ns: 7,
                ticks: 3,
                now_ns: -9,
            }),
            FdKind::Signalfd(Signalfd { mask: 0x4200 }),
            FdKind::Epoll(Epoll {
                watches: vec![EpollWatch {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 0x1122_3344_5566_7788,
                }],
            }),
            FdKind::Duplicate(Duplicate { of: 4 }),
            FdKind::Inotify(Inotify {
                watches: vec![InotifyWatch {
                    wd: 2,
                    mask: 0x8400_0100,
                    path: "/tmp/d".into(),
                }],
            }),
        ];
        for (n, kind) in kinds.into_iter().enumerate() {
            let bytes = postcard::to_allocvec(&kind).unwrap();
            assert_eq!(bytes[0] as usize, 6 + n, "{}", kind.name());
            assert_eq!(postcard::from_bytes::<FdKind>(&bytes).unwrap(), kind);
        }
    }

    /// Format 1.4 appended `FdKind::DeletedFile` after `Socket`: it round-trips, with and
    /// without a memfd.
    #[test]
    fn deleted_files_round_trip() {
        for memfd in [
            None,
            Some(Memfd {
                name: "cache".into(),
                seals: 0x0f,
            }),
        ] {
            let kind = FdKind::DeletedFile(DeletedFile {
                path: "/tmp/#1234".into(),
                offset: 4097,
                mode: 0o600,
                content: vec![7; 5000],
                same_as: Some(3),
                memfd,
            });
            let bytes = postcard::to_allocvec(&kind).unwrap();
            assert_eq!(bytes[0], 13, "DeletedFile is the fourteenth variant");
            assert_eq!(postcard::from_bytes::<FdKind>(&bytes).unwrap(), kind);
            assert_eq!(kind.name(), "deleted file");
        }
    }
}
