//! The restorer's one error type. Its messages are the ones users and tests know: each says
//! what was being done and to which file.

use std::path::PathBuf;

use snapshim_image::verify::VerifyError;
use snapshim_image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No image where the user pointed (an empty directory, a missing file...).
    #[error(transparent)]
    Find(ImageError),
    /// The image (or one it depends on) cannot be read, is damaged, or describes a process
    /// that cannot be rebuilt (`Metadata::validate`).
    #[error("{}: {source}", .path.display())]
    Image { path: PathBuf, source: ImageError },
    /// A page run's data fails its checksum, or cannot be read.
    #[error("{}: {source}", .path.display())]
    Pages { path: PathBuf, source: VerifyError },
    /// Another step failed or was refused (this machine, the program's files, descriptors,
    /// namespaces, the plan...): the message says which and why.
    #[error("{0}")]
    Step(String),
}

impl From<String> for RestoreError {
    fn from(s: String) -> RestoreError {
        RestoreError::Step(s)
    }
}

impl From<&str> for RestoreError {
    fn from(s: &str) -> RestoreError {
        RestoreError::Step(s.to_string())
    }
}
