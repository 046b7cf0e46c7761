//! A regular file open in the process.

use serde::{Deserialize, Serialize};

use super::FileIdentity;

/// Reopened by path at `offset`; if it was open for writing, it is cut back to `size` so that
/// output written after the checkpoint is neither duplicated nor torn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegularFile {
    pub path: String,
    pub offset: u64,
    pub size: u64,
    pub identity: FileIdentity,
}
