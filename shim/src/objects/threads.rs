//! Threads, capture side: what the kernel keeps about a thread outside memory (TID, fs base,
//! robust list, alternate signal stack, signal mask, name, rseq registration, credentials).
//! Each thread
//! records its own into a [`Slot`] as it parks (signal context: atomics and raw system calls
//! only); the capture turns the slots into the image's [`ThreadState`]s; a restored thread
//! redoes its kernel state from its slot ([`restore_thread`]).
#![allow(unsafe_code)]

use alloc::string::String;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

use snapshim_image::{Credentials, ThreadState};

use crate::sys::{self, sc};

pub const MAX_THREADS: usize = 4096;
/// Supplementary groups a thread may have for a checkpoint (the slot holds them).
pub const MAX_GROUPS: usize = 32;

/// What one parked thread left for the writer. Written by the thread itself before it parks,
/// read by the writer after it has seen `PARKED` count it.
#[derive(Default)]
pub struct Slot {
    pub tid: AtomicI32,
    pub ctx_rsp: AtomicU64,
    pub fs_base: AtomicU64,
    pub robust_head: AtomicU64,
    pub robust_len: AtomicU64,
    pub altstack_sp: AtomicU64,
    pub altstack_flags: AtomicI32,
    pub altstack_size: AtomicU64,
    pub sigmask: AtomicU64,
    pub name: [AtomicU64; 2],
    /// Real, effective, saved user and group IDs.
    pub uid: [AtomicU32; 3],
    pub gid: [AtomicU32; 3],
    /// Number of supplementary groups (more than [`MAX_GROUPS`]: -1), and the groups.
    pub ngroups: AtomicI32,
    pub groups: [AtomicU32; MAX_GROUPS],
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT_INIT: Slot = Slot {
    tid: AtomicI32::new(0),
    ctx_rsp: AtomicU64::new(0),
    fs_base: AtomicU64::new(0),
    robust_head: AtomicU64::new(0),
    robust_len: AtomicU64::new(0),
    altstack_sp: AtomicU64::new(0),
    altstack_flags: AtomicI32::new(0),
    altstack_size: AtomicU64::new(0),
    sigmask: AtomicU64::new(0),
    name: [AtomicU64::new(0), AtomicU64::new(0)],
    uid: [const { AtomicU32::new(0) }; 3],
    gid: [const { AtomicU32::new(0) }; 3],
    ngroups: AtomicI32::new(0),
    groups: [const { AtomicU32::new(0) }; MAX_GROUPS],
};
pub static SLOTS: [Slot; MAX_THREADS] = [SLOT_INIT; MAX_THREADS];
/// The helper's own slot (it parks through the same mechanism, on the writer stack).
pub static HELPER_SLOT: Slot = SLOT_INIT;

/// Next free slot index.
pub static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
/// Offset of glibc's cached TID (`struct pthread.tid`) from the thread pointer, or -1.
pub static TID_OFFSET: AtomicI32 = AtomicI32::new(-1);
/// glibc's rseq area offset from the thread pointer and its registered size (0: none).
pub static RSEQ_OFFSET: core::sync::atomic::AtomicI64 = core::sync::atomic::AtomicI64::new(0);
pub static RSEQ_SIZE: AtomicU32 = AtomicU32::new(0);

const RSEQ_SIG: u32 = 0x5305_3053;
/// The kernel's rseq ABI area is 32 bytes; glibc's `__rseq_size` (20 on 2.35+) is the used part.
const RSEQ_LEN: u32 = 32;

/// Records the calling thread's kernel-side state into `slot`.
pub fn record_thread(slot: &Slot) {
    slot.tid.store(sys::gettid(), Relaxed);
    slot.fs_base.store(sys::get_fs_base(), Relaxed);
    let (mut head, mut len) = (0u64, 0u64);
    // SAFETY: get_robust_list(0) writes one pointer and one size_t.
    unsafe {
        sc!(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut u64,
            &mut len as *mut u64
        )
    };
    slot.robust_head.store(head, Relaxed);
    slot.robust_len.store(len, Relaxed);
    let mut ss: libc::stack_t = libc::stack_t {
        ss_sp: core::ptr::null_mut(),
        ss_flags: 0,
        ss_size: 0,
    };
    // SAFETY: sigaltstack(NULL, &ss) only writes ss.
    unsafe { sc!(libc::SYS_sigaltstack, 0, &mut ss as *mut libc::stack_t) };
    slot.altstack_sp.store(ss.ss_sp as u64, Relaxed);
    slot.altstack_flags
        .store(ss.ss_flags & !libc::SS_ONSTACK, Relaxed);
    slot.altstack_size.store(ss.ss_size as u64, Relaxed);
    let mut mask = 0u64;
    // SAFETY: rt_sigprocmask with a null new set only writes the 8-byte old set.
    unsafe {
        sc!(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            0,
            &mut mask as *mut u64,
            8
        )
    };
    slot.sigmask.store(mask, Relaxed);
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes.
    unsafe { sc!(libc::SYS_prctl, libc::PR_GET_NAME, name.as_mut_ptr()) };
    slot.name[0].store(u64::from_le_bytes(name[..8].try_into().unwrap()), Relaxed);
    slot.name[1].store(u64::from_le_bytes(name[8..].try_into().unwrap()), Relaxed);
    record_credentials(slot);
}

/// This thread's credentials (the kernel's, per thread), into `slot`.
fn record_credentials(slot: &Slot) {
    let (u, g) = (sys::getresuid(), sys::getresgid());
    for i in 0..3 {
        slot.uid[i].store(u[i], Relaxed);
        slot.gid[i].store(g[i], Relaxed);
    }
    let mut groups = [0u32; MAX_GROUPS];
    let n = sys::getgroups(&mut groups).map_or(-1, |n| n as i32);
    slot.ngroups.store(n, Relaxed);
    for (d, s) in slot.groups.iter().zip(&groups[..n.max(0) as usize]) {
        d.store(*s, Relaxed);
    }
}

/// Gives a restored thread the credentials it had (it starts with the restorer's). The groups
/// only when it starts as root: an unprivileged restorer cannot set them (and its user
/// namespace shows groups it does not map as 65534), and it refuses images whose user and
/// group IDs it cannot give back (`restorer/src/objects/threads.rs`). Failing here leaves a
/// thread with the wrong identity: one line, and the process ends.
fn restore_credentials(slot: &Slot) {
    let load = |a: &[AtomicU32; 3]| [a[0].load(Relaxed), a[1].load(Relaxed), a[2].load(Relaxed)];
    let (uid, gid) = (load(&slot.uid), load(&slot.gid));
    let n = slot.ngroups.load(Relaxed).clamp(0, MAX_GROUPS as i32) as usize;
    let mut groups = [0u32; MAX_GROUPS];
    for (d, s) in groups.iter_mut().zip(&slot.groups[..n]) {
        *d = s.load(Relaxed);
    }
    let mut now = [0u32; MAX_GROUPS];
    let same_groups = sys::getgroups(&mut now).is_ok_and(|m| now[..m] == groups[..n]);
    let mut r = Ok(());
    if sys::getresuid()[1] == 0 && !same_groups {
        r = sys::setgroups(&groups[..n]);
    }
    if r.is_ok() && sys::getresgid() != gid {
        r = sys::setresgid(gid);
    }
    if r.is_ok() && sys::getresuid() != uid {
        r = sys::setresuid(uid);
    }
    if r.is_err() {
        let _ = sys::write_all(
            2,
            b"snapshim: a restored thread cannot take back the user, group or supplementary \
              group IDs it had at the checkpoint; the process ends\n",
        );
        sys::exit_group(1);
    }
}

/// Registers (or, with `unregister`, unregisters) glibc's rseq area of the calling thread.
///
/// The kernel rewrites a registered area (cpu_id, mm_cid) whenever the thread returns to user
/// space after being preempted or migrated: the writer's own thread unregisters while it copies
/// memory, or its TLS page would change under the copy.
pub fn rseq(unregister: bool) {
    let fs = sys::get_fs_base();
    if fs == 0 || RSEQ_SIZE.load(Relaxed) == 0 {
        return;
    }
    let area = (fs as i64 + RSEQ_OFFSET.load(Relaxed)) as u64;
    // SAFETY: glibc's rseq area of this thread, with the length and signature it registered.
    unsafe { sc!(libc::SYS_rseq, area, RSEQ_LEN, unregister as u32, RSEQ_SIG) };
}

/// Redoes, in a restored thread, the per-thread state the kernel does not keep in memory.
pub fn restore_thread(slot: &Slot) {
    let fs = slot.fs_base.load(Relaxed);
    let off = TID_OFFSET.load(Relaxed);
    if fs != 0 && off >= 0 {
        let tid_ptr = (fs + off as u64) as *mut i32;
        // set_tid_address makes thread exit clear glibc's tid and wake joiners, as clone's
        // CLONE_CHILD_CLEARTID did for the original; it returns our new TID, which glibc caches.
        // SAFETY: tid_ptr is this thread's struct pthread.tid (offset verified at start-up).
        unsafe {
            let tid = sc!(libc::SYS_set_tid_address, tid_ptr);
            core::ptr::write_volatile(tid_ptr, tid as i32);
        }
    }
    let head = slot.robust_head.load(Relaxed);
    if head != 0 {
        // SAFETY: the head lives in this thread's restored struct pthread.
        unsafe {
            sc!(
                libc::SYS_set_robust_list,
                head,
                slot.robust_len.load(Relaxed)
            )
        };
    }
    rseq(false);
    let ss = libc::stack_t {
        ss_sp: slot.altstack_sp.load(Relaxed) as *mut libc::c_void,
        ss_flags: slot.altstack_flags.load(Relaxed),
        ss_size: slot.altstack_size.load(Relaxed) as usize,
    };
    // SAFETY: installs the alternate stack the thread had (or none); its memory is restored.
    unsafe { sc!(libc::SYS_sigaltstack, &ss as *const libc::stack_t, 0) };
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(&slot.name[0].load(Relaxed).to_le_bytes());
    name[8..].copy_from_slice(&slot.name[1].load(Relaxed).to_le_bytes());
    name[15] = 0;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { sc!(libc::SYS_prctl, libc::PR_SET_NAME, name.as_ptr()) };
    // Last: giving up root may take away what the steps above need.
    restore_credentials(slot);
}

/// Offsets (from the thread pointer) of 32-bit words equal to the calling thread's TID, within
/// glibc's `struct pthread`. One of them is the cached TID; a second thread picks it out.
pub fn tid_candidates() -> alloc::vec::Vec<i32> {
    let fs = sys::get_fs_base();
    let tid = sys::gettid();
    let mut v = alloc::vec::Vec::new();
    if fs == 0 {
        return v;
    }
    for off in (0..0x1000u64).step_by(4) {
        // SAFETY: the first 4 KiB after the thread pointer are glibc's struct pthread.
        if unsafe { core::ptr::read_volatile((fs + off) as *const i32) } == tid {
            v.push(off as i32);
        }
    }
    v
}

/// Whether the calling thread's TID is at `off` from its thread pointer.
pub fn tid_at(off: i32) -> bool {
    let fs = sys::get_fs_base();
    // SAFETY: as in tid_candidates; off < 4 KiB.
    fs != 0 && unsafe { core::ptr::read_volatile((fs + off as u64) as *const i32) } == sys::gettid()
}

/// The helper's own per-thread fix-ups in a restored process.
pub fn record_restored_helper() {
    restore_thread(&HELPER_SLOT);
}

/// The image's record of the credentials of the thread that parked in `s`; an error if it has
/// more supplementary groups than a slot holds.
pub fn credentials(s: &Slot) -> Result<Credentials, String> {
    let n = s.ngroups.load(Relaxed);
    if n < 0 {
        return Err(alloc::format!(
            "thread {} has more than {MAX_GROUPS} supplementary groups",
            s.tid.load(Relaxed)
        ));
    }
    let load = |a: &[AtomicU32; 3]| [a[0].load(Relaxed), a[1].load(Relaxed), a[2].load(Relaxed)];
    Ok(Credentials {
        tid: s.tid.load(Relaxed),
        uid: load(&s.uid),
        gid: load(&s.gid),
        groups: s.groups[..n as usize]
            .iter()
            .map(|g| g.load(Relaxed))
            .collect(),
    })
}

/// The image's record of the thread that parked in `s`.
pub fn thread_state(s: &Slot, helper: bool) -> ThreadState {
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(&s.name[0].load(Relaxed).to_le_bytes());
    name[8..].copy_from_slice(&s.name[1].load(Relaxed).to_le_bytes());
    let len = name.iter().position(|&c| c == 0).unwrap_or(16);
    ThreadState {
        tid: s.tid.load(Relaxed),
        fs_base: s.fs_base.load(Relaxed),
        ctx_rsp: s.ctx_rsp.load(Relaxed),
        robust_head: s.robust_head.load(Relaxed),
        robust_len: s.robust_len.load(Relaxed),
        altstack_sp: s.altstack_sp.load(Relaxed),
        altstack_flags: s.altstack_flags.load(Relaxed),
        altstack_size: s.altstack_size.load(Relaxed),
        sigmask: s.sigmask.load(Relaxed),
        name: String::from_utf8_lossy(&name[..len]).into_owned(),
        helper,
    }
}
