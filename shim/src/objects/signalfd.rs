//! Signalfds, capture side: the mask, from fdinfo.

use snapshim_image::{FdKind, Signalfd};

use super::{fdinfo_field, Fdinfo};

/// `info` is the descriptor's fdinfo, whose `sigmask` is the mask in hex.
pub fn capture(info: &Fdinfo) -> FdKind {
    let mask = fdinfo_field(info, "sigmask:")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0);
    FdKind::Signalfd(Signalfd { mask })
}
