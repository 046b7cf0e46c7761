//! Eventfds, capture side: the counter and the semaphore mode, from fdinfo.

use snapshim_image::{Eventfd, FdKind};

use super::{fdinfo_field, Fdinfo};

/// `info` is the descriptor's fdinfo: `eventfd-count` (hex) and, on recent kernels (6.18
/// here), `eventfd-semaphore`. Older ones show the mode nowhere (it is not among the file
/// flags), and it is taken as off.
pub fn capture(info: &Fdinfo) -> FdKind {
    let count = fdinfo_field(info, "eventfd-count:")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0);
    let semaphore = fdinfo_field(info, "eventfd-semaphore:") == Some("1");
    FdKind::Eventfd(Eventfd { count, semaphore })
}
