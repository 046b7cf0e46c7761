//! A pipe whose both ends are in the process.

use serde::{Deserialize, Serialize};

/// One end of a pipe; the two ends share `id`. `data` was buffered in the pipe at the
/// checkpoint (recorded on the read end) and is written back into the new pipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pipe {
    pub id: u64,
    pub read_end: bool,
    pub data: Vec<u8>,
}
