//! Memory: the regions of the address space and the runs of stored pages.

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub kind: RegionKind,
    /// The name /proc/self/maps shows (path, `[heap]`, `[stack]`, ...).
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum RegionKind {
    /// Anonymous memory; stored pages are in the image, the rest are zero.
    Anon,
    /// A mapping of a file. Private: pages not in the image are the file's. Shared: the file
    /// holds the content and nothing is stored.
    File {
        path: String,
        offset: u64,
        identity: FileIdentity,
    },
    /// Kernel-provided mappings that are moved, not stored.
    Vdso,
    Vvar,
    VvarVclock,
}

/// What a referenced file was when the image was taken, to detect that it changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct FileIdentity {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

/// A run of whole pages stored contiguously in the file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u64,
    pub file_off: u64,
    pub crc: u32,
}

impl PageRun {
    /// Bytes of page data (saturating: only [`Image::open`]-checked runs are meaningful).
    pub fn len(&self) -> u64 {
        self.pages.saturating_mul(PAGE_SIZE)
    }
    /// The address after the run's last byte (saturating, as [`PageRun::len`]).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len())
    }
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// `pages` pages from `addr`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageSpan {
    pub addr: u64,
    pub pages: u64,
}

impl PageSpan {
    /// The address after the span (saturating: only checked spans are meaningful).
    pub fn end(&self) -> u64 {
        self.addr
            .saturating_add(self.pages.saturating_mul(PAGE_SIZE))
    }
}
