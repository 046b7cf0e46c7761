//! A character device opened by path (`/dev/null`, `/dev/zero`, `/dev/urandom`, ...).

use serde::{Deserialize, Serialize};

/// Reopened by path with the saved flags.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CharDevice {
    pub path: String,
}
