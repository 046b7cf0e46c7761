//! A directory open in the process (`opendir`, `O_DIRECTORY`, `O_PATH`).

use serde::{Deserialize, Serialize};

/// Reopened by path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Directory {
    pub path: String,
}
