use std::path::PathBuf;

/// Why an image cannot be read. Each message says what was being done and to which file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O step failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is shorter than its header says.
    #[error("image is truncated: {what} needs {need} bytes, the file has {have}")]
    Truncated {
        what: &'static str,
        need: u64,
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
        "image format version {major}.{minor} is not supported (this build reads {}.0 to {}.{})",
        crate::VERSION_MAJOR,
        crate::VERSION_MAJOR,
        crate::VERSION_MINOR
    )]
    UnsupportedVersion { major: u16, minor: u16 },
    /// The header's checksum does not match.
    #[error("image header is corrupted (checksum mismatch)")]
    HeaderChecksum,
    /// The metadata's checksum does not match.
    #[error("image metadata is corrupted (checksum mismatch)")]
    MetadataChecksum,
    /// A page run's checksum does not match.
    #[error("image page data is corrupted: run {index} (memory at {addr:#x}) fails its checksum")]
    RunChecksum { index: usize, addr: u64 },
    /// The metadata decodes to something inconsistent.
    #[error("image is corrupted: {0}")]
    Corrupt(String),
    /// A directory without any committed image.
    #[error("no snapshim image in {0}")]
    NoImage(PathBuf),
}
