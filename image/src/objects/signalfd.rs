//! A signalfd (`signalfd(2)`): reads the signals of a mask instead of running handlers.

use serde::{Deserialize, Serialize};

/// The signals it accepts (fdinfo's `sigmask`: bit `n - 1` for signal `n`). Pending signals
/// are the process's, not the descriptor's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Signalfd {
    pub mask: u64,
}
