//! The setuid family. A server started as root gives up root's privileges for its own user once
//! its ports are bound (mosquitto, memcached `-u`, dnsmasq), and from then on writes its images
//! as that user, into the image directory root made for it. So before a change that leaves no
//! uid 0 among the real, effective and saved ones (a change for good: `seteuid` alone, which
//! can be undone, hands nothing over), the directory the shim holds goes to the new user
//! (`owner::hand_over`). Raw system calls are not seen: see docs/limits.md.
#![allow(unsafe_code)]

use libc::{c_int, uid_t};

use crate::state;
use crate::sys;

type SetUid = unsafe extern "C" fn(uid_t) -> c_int;
type SetReUid = unsafe extern "C" fn(uid_t, uid_t) -> c_int;
type SetResUid = unsafe extern "C" fn(uid_t, uid_t, uid_t) -> c_int;

/// "Unchanged", in the calls' arguments.
const SAME: uid_t = uid_t::MAX;

/// The real, effective and saved uids after the change, or what `pick` leaves as they are.
fn after(pick: [uid_t; 3]) -> [uid_t; 3] {
    let now = sys::getresuid();
    core::array::from_fn(|i| if pick[i] == SAME { now[i] } else { pick[i] })
}

/// Before a change to `ids`: hands the image directory over if root leaves for good.
fn before(ids: [uid_t; 3]) {
    let root_now = sys::getresuid()[1] == 0;
    let active = state::ACTIVE.load(core::sync::atomic::Ordering::Relaxed);
    if active && root_now && ids.iter().all(|&u| u != 0) {
        crate::owner::hand_over(ids[1]);
    }
}

/// # Safety
/// As `setuid(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn setuid(uid: uid_t) -> c_int {
    // From root, setuid sets all three.
    if sys::getresuid()[1] == 0 {
        before([uid; 3]);
    }
    let f = real!(setuid: SetUid);
    // SAFETY: forwarded with the caller's contract.
    unsafe { f(uid) }
}

/// # Safety
/// As `setreuid(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn setreuid(ruid: uid_t, euid: uid_t) -> c_int {
    let mut ids = after([ruid, euid, SAME]);
    // The saved uid follows the effective one when the real one is set, or the effective
    // one is set to another than the real one.
    if ruid != SAME || (euid != SAME && euid != sys::getresuid()[0]) {
        ids[2] = ids[1];
    }
    before(ids);
    let f = real!(setreuid: SetReUid);
    // SAFETY: forwarded with the caller's contract.
    unsafe { f(ruid, euid) }
}

/// # Safety
/// As `setresuid(2)`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn setresuid(ruid: uid_t, euid: uid_t, suid: uid_t) -> c_int {
    before(after([ruid, euid, suid]));
    let f = real!(setresuid: SetResUid);
    // SAFETY: forwarded with the caller's contract.
    unsafe { f(ruid, euid, suid) }
}
