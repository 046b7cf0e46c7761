//! Threads: phase 2 creates each one on its saved stack pointer and thread pointer (with its
//! saved TID in new namespaces), jumping into the shim, which restores the rest of its state
//! from the signal frame on its stack.

use snapshim_image::Metadata;

use crate::plan::PThread;

/// Every thread's register state includes the XSAVE features of the CPU that took the image:
/// this CPU must have them all.
pub fn check_cpu(meta: &Metadata) -> Result<(), String> {
    let have = snapshim_image::xsave_features();
    let need = meta.process.xsave_features;
    if need & !have != 0 {
        return Err(format!(
            "the image uses CPU register state this CPU lacks (XSAVE features {need:#x}, this CPU has {have:#x})"
        ));
    }
    Ok(())
}

/// Each restored thread takes back the credentials it had (the shim does it, see
/// `shim/src/objects/threads.rs`), which only root can do in general: any other user must be
/// the one every thread of the program ran as (supplementary groups are then left as they
/// are: an unprivileged user namespace cannot set them).
pub fn check_credentials(meta: &Metadata) -> Result<(), String> {
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        return Ok(());
    }
    match meta
        .credentials
        .iter()
        .find(|c| c.uid != [uid; 3] || c.gid != [gid; 3])
    {
        None => Ok(()),
        Some(c) => Err(format!(
            "thread {} of the program ran as uid {:?}, gid {:?} (real, effective, saved): only \
             root can restore it (this restore runs as uid {uid}, gid {gid})",
            c.tid, c.uid, c.gid
        )),
    }
}

/// The plan's threads, and which of them is the main thread (the one whose TID is the PID,
/// else the first that is not the shim's helper). `exact_tids`: each is created with its
/// saved TID.
pub fn plan(meta: &Metadata, exact_tids: bool) -> (Vec<PThread>, u64) {
    let threads = meta
        .threads
        .iter()
        .map(|t| PThread {
            ctx_rsp: t.ctx_rsp,
            fs_base: t.fs_base,
            tid: if exact_tids { t.tid } else { 0 },
        })
        .collect();
    let main_thread = meta
        .threads
        .iter()
        .position(|t| t.tid == meta.process.pid)
        .or_else(|| meta.threads.iter().position(|t| !t.helper))
        .unwrap_or(0) as u64;
    (threads, main_thread)
}
