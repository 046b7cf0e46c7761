//! Signal dispositions, capture side: the kernel's sigaction of every catchable signal (the
//! shim's own two included: the restored process must have the shim's handlers again).
#![allow(unsafe_code)]

use alloc::vec::Vec;

use snapshim_image::SigAction;

use crate::sys::{self, sc};

/// Every signal's disposition, as the kernel holds it.
pub fn sigactions() -> Vec<SigAction> {
    let mut out = Vec::new();
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let mut k = [0u64; 4]; // handler, flags, restorer, mask
                               // SAFETY: rt_sigaction with a null new action writes the 32-byte kernel sigaction.
        if sys::check(unsafe { sc!(libc::SYS_rt_sigaction, sig, 0, k.as_mut_ptr(), 8) }).is_ok() {
            out.push(SigAction {
                signo: sig,
                handler: k[0],
                flags: k[1],
                restorer: k[2],
                mask: k[3],
            });
        }
    }
    out
}
