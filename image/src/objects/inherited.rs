//! Descriptors that lead outside the process, and those not restorable yet.

use serde::{Deserialize, Serialize};

/// Connected to something outside the process (a terminal, a pipe from the shell): on restore
/// the restorer's own descriptor of the same number is used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inherited {
    pub desc: String,
}

/// Not restorable yet (eventfd, epoll, ...): reopened as /dev/null, and said so.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unsupported {
    pub desc: String,
}
