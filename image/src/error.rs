use std::path::PathBuf;

/// Why an image cannot be read. Each message says what was being done and to which file; each
/// kind of damage has its own variant, so a damaged image is reported as what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O step failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file ends before a section the header describes (or before the header itself).
    #[error(
        "image is truncated: the {what} needs {len} bytes at offset {offset}, the file has {have}"
    )]
    Truncated {
        what: &'static str,
        offset: u64,
        len: u64,
        have: u64,
    },
    /// Not a snapshim image at all.
    #[error("not a snapshim image (bad magic number)")]
    BadMagic,
    /// A snapshim image of another architecture.
    #[error("image was taken on {arch}; this machine is x86_64")]
    ForeignArch { arch: String },
    /// A format version this build cannot read.
    #[error(
        "image format version {major}.{minor} is {} than this build reads ({}.0 to {}.{})",
        newer_or_older(.major, .minor),
        crate::VERSION_MAJOR,
        crate::VERSION_MAJOR,
        crate::VERSION_MINOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    /// The header's checksum does not match.
    #[error("image header is corrupted (checksum mismatch)")]
    HeaderChecksum,
    /// The header passes its checksum but its section offsets describe no possible image.
    #[error("image header is inconsistent: {0}")]
    BadLayout(String),
    /// The metadata's checksum does not match.
    #[error("image metadata is corrupted (checksum mismatch)")]
    MetadataChecksum,
    /// The metadata passes its checksum but does not decode.
    #[error("image metadata does not decode: {0}")]
    MetadataDecode(String),
    /// The metadata decodes to something impossible: overlapping regions, page runs outside
    /// their region or the page data, memory where no program can have any, no threads...
    #[error("image metadata is inconsistent: {0}")]
    Inconsistent(String),
    /// A page run's checksum does not match.
    #[error(
        "image page data is corrupted: run {index} (memory {addr:#x}-{end:#x}, file offset \
         {file_off}) fails its checksum"
    )]
    RunChecksum {
        index: usize,
        addr: u64,
        end: u64,
        file_off: u64,
    },
    /// An older image of a delta chain, needed to restore the one named, is missing or damaged.
    #[error("{}, an older image that {} depends on, {what}: {source}", .path.display(), .head.display())]
    Ancestor {
        path: PathBuf,
        head: PathBuf,
        what: &'static str,
        source: Box<ImageError>,
    },
    /// The file a delta image names as its parent is not that image.
    #[error("{}, named as the parent of {}, is not the image it names ({why}): the chain is broken", .path.display(), .child.display())]
    BrokenChain {
        path: PathBuf,
        child: PathBuf,
        why: String,
    },
    /// A directory without any committed image.
    #[error("no snapshim image in {0}")]
    NoImage(PathBuf),
}

fn newer_or_older(major: &u16, minor: &u16) -> &'static str {
    if (*major, *minor) > (crate::VERSION_MAJOR, crate::VERSION_MINOR) {
        "newer"
    } else {
        "older"
    }
}
