//! libsnapshim.so — loaded with `LD_PRELOAD` into an unmodified program, it takes snapshots of
//! the whole process on a signal, an interval or `snapshim checkpoint PID`, and makes the
//! process resumable from them by `snapshim-restore`.
//!
//! Start-up (`.init_array`, before `main`):
//! 1. read the settings from the environment (never again afterwards: `config.rs`);
//! 2. reserve the restorer's address range (`PROT_NONE`) so the program never maps there;
//! 3. install the trigger and quiesce handlers, with every signal masked while they run;
//! 4. start the helper thread, which waits on a pipe and does all the work (`pipeline/`);
//! 5. under `snapshim run`, take the image directory and say where the images go
//!    (`owner.rs`; otherwise the first checkpoint takes it).
//!
//! The modules, top to bottom (each imports only from those below it):
//! - `interpose/`: the libc functions the shim exports in place of glibc's;
//! - `pipeline/`: the helper thread and the checkpoint's stages, trigger to commit;
//! - `engine/`: the copy-on-write engines (stop, fork, uffd) and the one place one is chosen;
//! - `incremental/`: dirty-page tracking, the delta-or-full policy, the background merger;
//! - `objects/`: the capture side of each kind of kernel object (memory, files, threads...);
//! - `config.rs`, `state.rs`: the settings, and the values set at start-up that lower layers
//!   read; `owner.rs`: the image directory this instance owns (lock, lineage, numbering);
//! - `sys/`: raw system calls, kernel ABI definitions, the shim's own allocator.
//!
//! What may run where: signal handlers use atomics and raw system calls only
//! (`pipeline/park.rs`, `pipeline/trigger.rs`); the writer runs while every other thread is
//! parked and so never calls the program's malloc or takes a lock the program might hold.
#![allow(unsafe_code)]
// Unit tests leave out the constructor, so most of the crate is unreachable from them.
#![cfg_attr(test, allow(dead_code))]

extern crate alloc;

mod config;
mod engine;
mod incremental;
mod interpose;
mod objects;
mod owner;
mod pipeline;
mod state;
mod sys;

use core::sync::atomic::Ordering::*;

use snapshim_image::layout::{RESERVED_END, RESERVED_START};

// Unit tests run with the standard allocator: the test harness is not the program.
#[cfg_attr(not(test), global_allocator)]
static GLOBAL: sys::alloc::ShimAlloc = sys::alloc::ShimAlloc;

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

fn warn(msg: &str) {
    let _ = sys::write_all(2, alloc::format!("snapshim: {msg}\n").as_bytes());
}

extern "C" fn init() {
    if std::env::var_os("SNAPSHIM_DISABLE").is_some() {
        return;
    }
    state::ACTIVE.store(true, Relaxed);
    let exe = sys::readlink(b"/proc/self/exe\0").unwrap_or_default();
    let mut cmd = Vec::new();
    let _ = sys::read_file(b"/proc/self/cmdline\0", &mut cmd);
    let cmdline: Vec<String> = cmd
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let settings = match config::Settings::parse(|k| std::env::var(k).ok()) {
        Ok((s, warnings)) => {
            for w in warnings {
                warn(&w);
            }
            s
        }
        Err(why) => {
            warn(&why);
            return;
        }
    };
    if let Some(bytes) = settings.fault_around {
        engine::uffd::set_fault_around(bytes);
    }
    if let Some(c) = settings.copy_ahead {
        engine::uffd::set_copy_ahead(c);
    }
    engine::uffd::set_keep_store(settings.keep_store);
    state::HUGEPAGES.store(settings.hugepages, Relaxed);
    let cfg = config::init(config::Config::new(&settings, exe, cmdline, shim_path()));

    // The restorer's range: refuse to start checkpointing if something is already there.
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let r = unsafe {
        libc::mmap(
            RESERVED_START as *mut libc::c_void,
            (RESERVED_END - RESERVED_START) as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if r as u64 != RESERVED_START {
        warn(&format!(
            "address range {RESERVED_START:#x}-{RESERVED_END:#x} is in use; checkpoints are off"
        ));
        return;
    }
    state::RESERVED.store(true, Relaxed);

    // rseq: glibc 2.35+ registers an area per thread at a fixed offset from the thread pointer.
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc exports both as constants set before any constructor runs.
    unsafe {
        objects::threads::RSEQ_OFFSET.store(__rseq_offset as i64, Relaxed);
        objects::threads::RSEQ_SIZE.store(__rseq_size, Relaxed);
    }

    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        warn("cannot create the wake-up pipe; checkpoints are off");
        return;
    }
    pipeline::trigger::WAKE_R.store(fds[0], Relaxed);
    pipeline::trigger::WAKE_W.store(fds[1], Relaxed);

    state::TRIGGER_SIG.store(cfg.trigger_signal, Relaxed);
    state::QUIESCE_SIG.store(cfg.quiesce_signal, Relaxed);
    install(cfg.quiesce_signal, pipeline::park::quiesce_handler);
    install(cfg.trigger_signal, pipeline::trigger::trigger_handler);

    extern "C" fn in_child() {
        pipeline::trigger::DISABLED.store(1, Relaxed);
        // The image directory is the parent's: this process must not keep it locked.
        let lock = owner::LOCK_FD.swap(-1, Relaxed);
        if lock >= 0 {
            sys::close(lock);
        }
    }
    // SAFETY: registers a plain function; no state is captured.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };

    let candidates = objects::threads::tid_candidates();
    // The helper must never run a handler of the program's: it inherits a fully blocked mask
    // from its first instruction (a signal could otherwise reach it before it blocks them).
    let (all, mut old) = (u64::MAX, 0u64);
    // SAFETY: rt_sigprocmask with 8-byte sets; the raw call bypasses our own filter.
    unsafe {
        sys::syscall6(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as u64,
            &all as *const u64 as u64,
            &mut old as *mut u64 as u64,
            8,
            0,
            0,
        )
    };
    let spawned = std::thread::Builder::new()
        .name("snapshim".into())
        .stack_size(512 << 10)
        .spawn(move || pipeline::helper_main(cfg, candidates));
    // SAFETY: puts back this thread's own mask.
    unsafe {
        sys::syscall6(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as u64,
            &old as *const u64 as u64,
            0,
            8,
            0,
            0,
        )
    };
    if let Err(e) = spawned {
        warn(&format!(
            "cannot start the helper thread: {e}; checkpoints are off"
        ));
        return;
    }
    // Last: once this is said, `snapshim checkpoint` may be sent at once.
    if cfg.announce {
        announce(cfg);
    }
}

/// `SNAPSHIM_ANNOUNCE` (`snapshim run`, whose PID this process has): takes the image
/// directory now and says where the images go, or refuses to start the program when the
/// directory the user named is in use. A script says it again as its interpreter, with the
/// same PID: the directories the earlier stages took go if they are still empty.
fn announce(cfg: &config::Config) {
    match owner::acquire(cfg) {
        Ok(dir) => {
            owner::remove_earlier_stages(&dir);
            warn(&format!(
                "PID {} ({}), images in {}/",
                std::process::id(),
                cfg.name,
                dir.display()
            ))
        }
        Err(why) => {
            warn(&format!("cannot start {}: {why}", cfg.name));
            // SAFETY: ends the process before the program's main; nothing of it ran.
            unsafe { libc::_exit(1) };
        }
    }
}

fn install(sig: i32, handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void)) {
    // SAFETY: a zeroed sigaction is valid; the fields are set below.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: act.sa_mask is a valid sigset.
    unsafe { libc::sigfillset(&mut act.sa_mask) };
    interpose::real_sigaction(sig, &act, core::ptr::null_mut());
}

/// Path of this library, from the loader.
fn shim_path() -> String {
    // SAFETY: dladdr on an address inside this library; info is a valid out-pointer.
    unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(init as *const libc::c_void, &mut info) != 0 && !info.dli_fname.is_null() {
            return std::ffi::CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned();
        }
    }
    String::new()
}
