//! Phase 2 of the restorer: a freestanding blob linked at a fixed address inside the range every
//! snapshim process keeps free. `snapshim-restore` (phase 1) validates the image, opens every
//! file, writes a [`Plan`] into the arena, loads this blob and jumps here on a stack of its own.
//!
//! Rules that do not hold elsewhere: there is no libc, no allocator, no TLS and no way back.
//! After step 1 the process has nothing but this blob, its plan and stack, and the kernel's
//! vDSO; every failure writes a fixed message and exits with status 127.
//!
//! Algorithm:
//! 1. unmap everything outside the reserved range and the kernel's vvar/vDSO;
//! 2. move vvar/vDSO by one delta to where the image had them (via a parking spot, in case the
//!    old and new places overlap): glibc in the image caches pointers into the vDSO; or, when
//!    this kernel's vDSO is not the image's, to the free place phase 1 chose, and map the proxy
//!    (`Plan::proxy_*`) at the image's vDSO address;
//! 3. map every region at its address with its kind; then put its stored pages in: runs phase 1
//!    marked `RUN_MAP` are mapped straight from the image (`MAP_PRIVATE | MAP_FIXED` over the
//!    region: a copy-on-write view of the file, so this step costs per run, not per byte; pages
//!    come in on first touch, or now, as `Plan::prefetch` says), the others are read into it;
//!    then set each region's protection;
//! 4. set the mm fields (brk, stack, arg/env, auxv) with prctl(PR_SET_MM_MAP);
//! 5. signal dispositions, resource limits, interval timers; close the plan's descriptors;
//! 6. start every other thread with clone() on its saved stack pointer and thread pointer,
//!    jumping into the shim's `snapshim_resume` (with clone3 and `set_tid` when the plan gives
//!    its saved TID: in a fresh PID namespace the number is free); this thread becomes the main
//!    thread last.
#![no_std]
#![no_main]
// The whole blob is one unsafe program talking to the kernel directly: inside an `unsafe fn`
// the operations are not wrapped again (edition 2021's default).
#![allow(unsafe_op_in_unsafe_fn)]

use core::arch::asm;

// Phase 1 uses every constant of the plan; the blob needs only the ones it acts on.
#[allow(dead_code)]
#[path = "../src/plan.rs"]
mod plan;
use plan::*;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail(b"internal error")
}

/// A raw system call with up to six arguments; returns the kernel's result (-errno on error).
///
/// # Safety
/// The call must be sound for its arguments: pointers valid for what the kernel does with
/// them, and no mapping unmapped or changed that the blob still uses.
#[inline(always)]
unsafe fn sc6(nr: u64, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> i64 {
    let r: i64;
    asm!("syscall", inlateout("rax") nr as i64 => r, in("rdi") a, in("rsi") b, in("rdx") c,
         in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _, options(nostack));
    r
}

const SYS_WRITE: u64 = 1;
const SYS_CLOSE: u64 = 3;
const SYS_MMAP: u64 = 9;
const SYS_MPROTECT: u64 = 10;
const SYS_MUNMAP: u64 = 11;
const SYS_RT_SIGACTION: u64 = 13;
const SYS_PREAD64: u64 = 17;
const SYS_MADVISE: u64 = 28;
const SYS_MREMAP: u64 = 25;
const SYS_SETITIMER: u64 = 38;
const SYS_CLONE: u64 = 56;
const SYS_CLONE3: u64 = 435;
const SYS_EXIT_GROUP: u64 = 231;
const SYS_PRCTL: u64 = 157;
const SYS_ARCH_PRCTL: u64 = 158;
const SYS_PRLIMIT64: u64 = 302;
const SYS_SET_ROBUST_LIST: u64 = 273;
const SYS_SET_TID_ADDRESS: u64 = 218;
const SYS_CLOCK_GETTIME: u64 = 228;

const MAP_PRIVATE: u64 = 0x02;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const MADV_WILLNEED: u64 = 3;
const MADV_POPULATE_READ: u64 = 22;
const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
const PROT_RW: u64 = 3;
const PROT_READ: u64 = 1;
const PROT_EXEC: u64 = 4;
const ARCH_SET_FS: u64 = 0x1002;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const TASK_END: u64 = 0x7fff_ffff_f000;
const CLONE_THREAD_FLAGS: u64 = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000 | 0x80000;

fn write_to(fd: u64, parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writing a static or stack buffer.
        unsafe { sc6(SYS_WRITE, fd, p.as_ptr() as u64, p.len() as u64, 0, 0, 0) };
    }
}

fn write_err(parts: &[&[u8]]) {
    write_to(2, parts)
}

fn hex(mut v: u64, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in (2..18).rev() {
        let d = (v & 15) as u8;
        buf[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        v >>= 4;
    }
    &buf[..]
}

fn dec(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

fn fail(what: &[u8]) -> ! {
    write_err(&[b"snapshim-restore: restore failed after the old process image was dropped: ", what, b"\n"]);
    // exit_group never returns; the loop only tells the compiler so.
    loop {
        // SAFETY: ends the process; no memory is involved.
        unsafe { sc6(SYS_EXIT_GROUP, 127, 0, 0, 0, 0, 0) };
    }
}

fn fail_at(what: &[u8], addr: u64, err: i64) -> ! {
    let mut a = [0u8; 18];
    let mut e = [0u8; 18];
    write_err(&[b"snapshim-restore: ", what, b" at ", hex(addr, &mut a), b" failed, errno ",
        hex((-err) as u64, &mut e), b"\n"]);
    fail(b"see above")
}

/// The plan's array of `n` items at `addr`.
///
/// # Safety
/// `addr` points at `n` initialised `T` in the arena, which lives as long as the blob.
unsafe fn slice<'a, T>(addr: u64, n: u64) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        core::slice::from_raw_parts(addr as *const T, n as usize)
    }
}

/// Entry point (the ELF entry), called with the plan on the blob's own stack.
///
/// # Safety
/// `p` is a complete plan written by phase 1, the blob is loaded at its link address, and
/// this is the only thread.
#[no_mangle]
pub unsafe extern "C" fn blob_main(p: &Plan) -> ! {
    if p.magic != PLAN_MAGIC {
        fail(b"bad plan");
    }
    // The restorer's glibc pointed these into memory about to go away.
    sc6(SYS_SET_ROBUST_LIST, 0, 24, 0, 0, 0, 0);
    sc6(SYS_SET_TID_ADDRESS, 0, 0, 0, 0, 0, 0);
    // 1. Drop the old address space. Keep [reserved] and [kern_lo, kern_hi).
    let (mut kern_lo, mut kern_hi) = (u64::MAX, 0);
    for k in &p.kern[..p.n_kern as usize] {
        kern_lo = kern_lo.min(k.start);
        kern_hi = kern_hi.max(k.start + k.len);
    }
    let mut keep = [(p.reserved_start, p.reserved_end), (kern_lo, kern_hi)];
    if p.n_kern == 0 {
        keep[1] = (p.reserved_start, p.reserved_end);
    }
    if keep[1].0 < keep[0].0 {
        keep.swap(0, 1);
    }
    let mut from = 0x1000u64;
    for &(lo, hi) in keep.iter().chain(core::iter::once(&(TASK_END, TASK_END))) {
        if lo > from {
            sc6(SYS_MUNMAP, from, lo - from, 0, 0, 0, 0);
        }
        from = from.max(hi);
    }

    // 2. Move vvar/vDSO: first to the parking spot, then to their place in the image.
    for pass in 0..2 {
        for k in &p.kern[..p.n_kern as usize] {
            let rel = k.start - kern_lo;
            let (src, dst) = if pass == 0 {
                (k.start, p.park + rel)
            } else {
                (p.park + rel, (kern_lo as i64 + p.kern_delta) as u64 + rel)
            };
            if src != dst {
                let r = sc6(SYS_MREMAP, src, k.len, k.len, MREMAP_MAYMOVE | MREMAP_FIXED, dst, 0);
                if r < 0 {
                    fail_at(b"moving the vDSO", dst, r);
                }
            }
        }
    }

    // 2b. Another kernel's vDSO: the proxy at the image's vDSO address (the kernel's mappings
    // have left it by now).
    if p.proxy_len != 0 {
        let a = sc6(SYS_MMAP, p.proxy_addr, p.proxy_len, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, u64::MAX, 0);
        if a != p.proxy_addr as i64 {
            fail_at(b"mapping the vDSO proxy", p.proxy_addr, a);
        }
        memcpy(p.proxy_addr as *mut u8, p.proxy_bytes as *const u8, p.proxy_len as usize);
        let e = sc6(SYS_MPROTECT, p.proxy_addr, p.proxy_len, PROT_READ | PROT_EXEC, 0, 0, 0);
        if e < 0 {
            fail_at(b"protecting the vDSO proxy", p.proxy_addr, e);
        }
    }

    // 3. Memory.
    let regions: &[PRegion] = slice(p.regions, p.n_regions);
    for r in regions {
        let prot = if r.fill != 0 { PROT_RW | r.prot as u64 } else { r.prot as u64 };
        let fd = if r.fd >= 0 { r.fd as i64 as u64 } else { u64::MAX };
        let a = sc6(SYS_MMAP, r.start, r.end - r.start, prot, r.flags as u64 | MAP_FIXED, fd, r.offset);
        if a != r.start as i64 {
            fail_at(b"mapping a region", r.start, a);
        }
    }
    let (mut bytes_read, mut bytes_mapped) = (0u64, 0u64);
    for run in slice::<PRun>(p.runs, p.n_runs) {
        let prot = PROT_RW | run.prot as u64;
        if run.how == RUN_MAP {
            let a = sc6(SYS_MMAP, run.addr, run.len, prot, MAP_PRIVATE | MAP_FIXED, run.fd as u64, run.file_off);
            if a == run.addr as i64 {
                // Prefetch is advice: where the kernel declines, pages still come on first touch.
                match p.prefetch {
                    PREFETCH_BACKGROUND => sc6(SYS_MADVISE, run.addr, run.len, MADV_WILLNEED, 0, 0, 0),
                    PREFETCH_EAGER => sc6(SYS_MADVISE, run.addr, run.len, MADV_POPULATE_READ, 0, 0, 0),
                    _ => 0,
                };
                bytes_mapped += run.len;
                continue;
            }
            // The kernel would not map it (a MAP_FIXED failure may have left a hole): fresh
            // anonymous memory over exactly the run, which the read below fills completely.
            let a = sc6(SYS_MMAP, run.addr, run.len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, u64::MAX, 0);
            if a != run.addr as i64 {
                fail_at(b"mapping a page run", run.addr, a);
            }
        }
        let mut done = 0u64;
        while done < run.len {
            let n = sc6(SYS_PREAD64, run.fd as u64, run.addr + done, run.len - done, run.file_off + done, 0, 0);
            if n == -4 {
                continue;
            }
            if n <= 0 {
                fail_at(b"reading pages from the image", run.addr + done, if n == 0 { -5 } else { n });
            }
            done += n as u64;
        }
        bytes_read += run.len;
    }
    for r in regions {
        if r.fill != 0 && r.prot as u64 != PROT_RW | r.prot as u64 {
            let e = sc6(SYS_MPROTECT, r.start, r.end - r.start, r.prot as u64, 0, 0, 0);
            if e < 0 {
                fail_at(b"protecting a region", r.start, e);
            }
        }
    }

    // 4. mm fields. struct prctl_mm_map: 11 u64, auxv pointer, auxv size (u32), exe_fd (u32).
    let mut map = [0u64; 14];
    map[..11].copy_from_slice(&p.mm);
    map[11] = p.auxv;
    map[12] = (p.auxv_bytes & 0xffff_ffff) | (0xffff_ffffu64 << 32);
    let e = sc6(SYS_PRCTL, PR_SET_MM, PR_SET_MM_MAP, map.as_ptr() as u64, 104, 0, 0);
    if e < 0 {
        write_err(&[b"snapshim-restore: warning: prctl(PR_SET_MM_MAP) refused; brk and /proc/PID/cmdline keep the restorer's values\n"]);
    }

    // 5. Signals, limits, timers, descriptors.
    for s in slice::<PSig>(p.sigactions, p.n_sigactions) {
        let k = [s.handler, s.flags, s.restorer, s.mask];
        sc6(SYS_RT_SIGACTION, s.signo, k.as_ptr() as u64, 0, 8, 0, 0);
    }
    for l in slice::<PRlimit>(p.rlimits, p.n_rlimits) {
        let v = [l.cur, l.max];
        sc6(SYS_PRLIMIT64, 0, l.resource, v.as_ptr() as u64, 0, 0, 0);
    }
    for (which, t) in p.itimers.iter().enumerate() {
        if t.iter().any(|&v| v != 0) {
            sc6(SYS_SETITIMER, which as u64, t.as_ptr() as u64, 0, 0, 0, 0);
        }
    }
    if p.stats_fd >= 0 {
        let mut ts = [0i64; 2];
        sc6(SYS_CLOCK_GETTIME, 1, ts.as_mut_ptr() as u64, 0, 0, 0, 0);
        let now = ts[0] as u64 * 1_000_000_000 + ts[1] as u64;
        let (mut a, mut b, mut c, mut d, mut e) = ([0u8; 20], [0u8; 20], [0u8; 20], [0u8; 20], [0u8; 20]);
        let prefetch: &[u8] = match p.prefetch {
            PREFETCH_BACKGROUND => b"background",
            PREFETCH_EAGER => b"eager",
            _ => b"none",
        };
        write_to(p.stats_fd as u64, &[b"snapshim-restore: resuming after ", dec((now - p.start_ns) / 1000, &mut a),
            b" us; ", dec(bytes_read, &mut b), b" bytes of pages read, ", dec(bytes_mapped, &mut c),
            b" mapped (prefetch ", prefetch, b"); ", dec(p.n_threads, &mut d), b" threads; started at ",
            dec(p.start_ns / 1000, &mut e), b" us CLOCK_MONOTONIC\n"]);
    }

    for &fd in slice::<i32>(p.close_fds, p.n_close_fds) {
        sc6(SYS_CLOSE, fd as u64, 0, 0, 0, 0, 0);
    }

    // 6. Threads.
    let threads: &[PThread] = slice(p.threads, p.n_threads);
    for (i, t) in threads.iter().enumerate() {
        if i as u64 == p.main_thread {
            continue;
        }
        let r: i64;
        // The child starts on the thread's saved stack with its thread pointer and jumps to the
        // shim; r9 survives the system call. The parent goes on.
        if t.tid != 0 {
            // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
            // stack_size (the child's rsp is stack + stack_size), tls, set_tid, set_tid_size.
            let set_tid = [t.tid];
            let args: [u64; 10] = [CLONE_THREAD_FLAGS, 0, 0, 0, 0, t.ctx_rsp - 16, 16, t.fs_base,
                set_tid.as_ptr() as u64, 1];
            asm!("syscall", "test rax, rax", "jnz 2f", "jmp r9", "2:",
                 inlateout("rax") SYS_CLONE3 as i64 => r, in("rdi") args.as_ptr(),
                 in("rsi") core::mem::size_of_val(&args), in("r9") p.resume_addr,
                 lateout("rcx") _, lateout("r11") _);
        } else {
            asm!("syscall", "test rax, rax", "jnz 2f", "jmp r9", "2:",
                 inlateout("rax") SYS_CLONE as i64 => r, in("rdi") CLONE_THREAD_FLAGS, in("rsi") t.ctx_rsp,
                 in("rdx") 0u64, in("r10") 0u64, in("r8") t.fs_base, in("r9") p.resume_addr,
                 lateout("rcx") _, lateout("r11") _);
        }
        if r < 0 {
            fail_at(if t.tid != 0 { b"creating a thread with its saved TID" } else { b"creating a thread" },
                t.ctx_rsp, r);
        }
    }
    let main = &threads[p.main_thread as usize];
    sc6(SYS_ARCH_PRCTL, ARCH_SET_FS, main.fs_base, 0, 0, 0, 0);
    asm!("mov rsp, {sp}", "jmp {to}", sp = in(reg) main.ctx_rsp, to = in(reg) p.resume_addr, options(noreturn));
}

// The compiler may emit calls to these; there is no libc here. `rep` string instructions
// cannot be turned back into calls to themselves.

/// # Safety
/// As C's `memcpy`: `n` bytes valid at `d` (writable) and `s`, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack));
    d
}
/// # Safety
/// As C's `memmove`: `n` bytes valid at `d` (writable) and `s`.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize + n) {
        return memcpy(d, s, n);
    }
    asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") d.add(n - 1) => _,
         inout("rsi") s.add(n - 1) => _, options(nostack));
    d
}
/// # Safety
/// As C's `memset`: `n` writable bytes at `d`.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack));
    d
}
/// # Safety
/// As C's `memcmp`: `n` readable bytes at `a` and at `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}
/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// core's precompiled objects name a personality routine; with panic=abort nothing unwinds, so
/// it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
