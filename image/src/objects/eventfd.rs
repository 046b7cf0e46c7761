//! An eventfd (`eventfd(2)`): a 64-bit counter.

use serde::{Deserialize, Serialize};

/// The counter at the checkpoint (fdinfo's `eventfd-count`) and whether reads take one at a
/// time (`EFD_SEMAPHORE`, fdinfo's `eventfd-semaphore`). `O_NONBLOCK` is in the descriptor's
/// flags.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Eventfd {
    pub count: u64,
    pub semaphore: bool,
}
