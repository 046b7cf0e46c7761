//! Raw system calls for paths that must not enter interposed or allocating libc code: signal
//! handlers, the writer while every other thread is parked (maybe holding malloc's or stdio's
//! lock), and the first moments of a restored thread.
//!
//! Every function here is async-signal-safe. Errors are returned as a positive errno and
//! decoded in exactly one place, [`check`]; `errno` itself is never touched.
#![allow(unsafe_code)]

pub mod alloc;
pub mod kapi;

use core::arch::asm;

pub type Result<T> = core::result::Result<T, i32>;

/// `syscall(nr, a1..a6)`.
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers readable/writable as it needs).
#[inline(always)]
pub unsafe fn syscall6(nr: i64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> i64 {
    let ret: i64;
    // SAFETY: the x86_64 syscall convention; rcx and r11 are clobbered by the instruction, the
    // caller vouches for the arguments.
    unsafe {
        asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             in("r10") a4, in("r8") a5, in("r9") a6, lateout("rcx") _, lateout("r11") _,
             options(nostack));
    }
    ret
}

/// Turns a raw return value into `Ok(value)` or `Err(errno)`.
#[inline(always)]
pub fn check(r: i64) -> Result<i64> {
    if (-4095..0).contains(&r) {
        Err(-r as i32)
    } else {
        Ok(r)
    }
}

macro_rules! sc {
    ($nr:expr) => {
        $crate::sys::syscall6($nr as i64, 0, 0, 0, 0, 0, 0)
    };
    ($nr:expr, $a:expr) => {
        $crate::sys::syscall6($nr as i64, $a as u64, 0, 0, 0, 0, 0)
    };
    ($nr:expr, $a:expr, $b:expr) => {
        $crate::sys::syscall6($nr as i64, $a as u64, $b as u64, 0, 0, 0, 0)
    };
    ($nr:expr, $a:expr, $b:expr, $c:expr) => {
        $crate::sys::syscall6($nr as i64, $a as u64, $b as u64, $c as u64, 0, 0, 0)
    };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr) => {
        $crate::sys::syscall6($nr as i64, $a as u64, $b as u64, $c as u64, $d as u64, 0, 0)
    };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr) => {
        $crate::sys::syscall6(
            $nr as i64, $a as u64, $b as u64, $c as u64, $d as u64, $e as u64, 0,
        )
    };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr) => {
        $crate::sys::syscall6(
            $nr as i64, $a as u64, $b as u64, $c as u64, $d as u64, $e as u64, $f as u64,
        )
    };
}
pub(crate) use sc;

pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments.
    unsafe { sc!(libc::SYS_gettid) as i32 }
}

pub fn getpid() -> i32 {
    // SAFETY: getpid takes no arguments.
    unsafe { sc!(libc::SYS_getpid) as i32 }
}

pub fn tgkill(pid: i32, tid: i32, sig: i32) -> Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { sc!(libc::SYS_tgkill, pid, tid, sig) }).map(|_| ())
}

/// Blocks every signal in this thread; returns the mask to give back to [`restore_signals`].
pub fn block_all_signals() -> u64 {
    let all: u64 = !0;
    let mut old: u64 = 0;
    // SAFETY: rt_sigprocmask with valid 8-byte masks (the kernel's sigset size on x86_64).
    unsafe {
        sc!(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &all as *const u64,
            &mut old as *mut u64,
            8
        )
    };
    old
}

/// `getresuid` of the calling thread: real, effective, saved.
pub fn getresuid() -> [u32; 3] {
    let mut ids = [0u32; 3];
    let p = ids.as_mut_ptr();
    // SAFETY: three writable u32s.
    unsafe { sc!(libc::SYS_getresuid, p, p.wrapping_add(1), p.wrapping_add(2)) };
    ids
}

/// `getresgid` of the calling thread.
pub fn getresgid() -> [u32; 3] {
    let mut ids = [0u32; 3];
    let p = ids.as_mut_ptr();
    // SAFETY: three writable u32s.
    unsafe { sc!(libc::SYS_getresgid, p, p.wrapping_add(1), p.wrapping_add(2)) };
    ids
}

/// The calling thread's supplementary groups into `out`; their number (EINVAL: more than fit).
pub fn getgroups(out: &mut [u32]) -> Result<usize> {
    // SAFETY: out is writable for out.len() gids.
    check(unsafe { sc!(libc::SYS_getgroups, out.len(), out.as_mut_ptr()) }).map(|n| n as usize)
}

/// Raw `setgroups`, `setresgid`, `setresuid`: the calling thread only (glibc's wrappers make
/// the change in every thread).
pub fn setgroups(groups: &[u32]) -> Result<()> {
    // SAFETY: groups is readable for its length.
    check(unsafe { sc!(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(|_| ())
}

pub fn setresgid(g: [u32; 3]) -> Result<()> {
    // SAFETY: plain integers.
    check(unsafe { sc!(libc::SYS_setresgid, g[0], g[1], g[2]) }).map(|_| ())
}

pub fn setresuid(u: [u32; 3]) -> Result<()> {
    // SAFETY: plain integers.
    check(unsafe { sc!(libc::SYS_setresuid, u[0], u[1], u[2]) }).map(|_| ())
}

/// Ends the whole process at once.
pub fn exit_group(code: i32) -> ! {
    // SAFETY: exit_group does not return.
    unsafe { sc!(libc::SYS_exit_group, code) };
    unreachable!()
}

/// glibc's internal signal for credential changes: `setuid`, `setgroups`... send it to every
/// other thread of the process and wait until each has run glibc's handler (which makes the
/// same change in that thread). A thread of the shim that glibc knows of (a `pthread`: the
/// helper) must let it through when it may be waited for, or the program hangs. (glibc's
/// other internal signal, SIGCANCEL (32), stays blocked: only `pthread_cancel` of a thread
/// sends it, and nothing may cancel the helper.)
pub const SIGSETXID: i32 = 33;

/// The mask bit of a (1-based) signal number.
pub const fn sig_bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// Lets [`SIGSETXID`] through in this thread (`allow`), or blocks it again.
pub fn allow_setxid(allow: bool) {
    let set = sig_bit(SIGSETXID);
    let how = if allow {
        libc::SIG_UNBLOCK
    } else {
        libc::SIG_BLOCK
    };
    // SAFETY: rt_sigprocmask with a valid 8-byte set and no old set.
    unsafe { sc!(libc::SYS_rt_sigprocmask, how, &set as *const u64, 0u64, 8) };
}

pub fn restore_signals(old: &u64) {
    // SAFETY: rt_sigprocmask with a valid 8-byte mask.
    unsafe {
        sc!(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            old as *const u64,
            0u64,
            8
        )
    };
}

pub fn write(fd: i32, buf: &[u8]) -> Result<usize> {
    // SAFETY: buf is a valid readable slice.
    check(unsafe { sc!(libc::SYS_write, fd, buf.as_ptr(), buf.len()) }).map(|n| n as usize)
}

/// Writes all of `buf` at the current offset, retrying on EINTR and short writes.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => buf = &buf[n..],
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: buf is a valid writable slice.
    check(unsafe { sc!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) }).map(|n| n as usize)
}

pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> Result<usize> {
    // SAFETY: buf is a valid writable slice.
    check(unsafe { sc!(libc::SYS_pread64, fd, buf.as_mut_ptr(), buf.len(), off) })
        .map(|n| n as usize)
}

/// Reads this process's own memory at `addr` into `buf` (`process_vm_readv` on itself): memory
/// unmapped meanwhile is an error or a short count, never a crash, and it is cheaper than a
/// read of /proc/self/mem (0.9 against 1.5 µs per page here).
pub fn read_mem(buf: &mut [u8], addr: u64) -> Result<usize> {
    let len = buf.len() as u64;
    // SAFETY: the one local range is `buf`, a writable slice nothing else uses meanwhile.
    unsafe { read_mem_v(&[(buf.as_mut_ptr() as u64, len)], &[(addr, len)]) }
}

/// [`read_mem`] of several ranges at once: `remote[i]` (address, length) of this process into
/// `local[i]`, in order; returns the bytes read up to the first range that could not be.
///
/// # Safety
/// Every `local` range must be writable memory of the caller's that nothing else uses.
pub unsafe fn read_mem_v(local: &[(u64, u64)], remote: &[(u64, u64)]) -> Result<usize> {
    // (address, length) pairs have the layout of struct iovec on x86_64.
    const _: () = assert!(core::mem::size_of::<libc::iovec>() == 16);
    // SAFETY: getpid has no arguments; the caller vouches for the local ranges, the kernel
    // checks the remote ones.
    check(unsafe {
        let pid = sc!(libc::SYS_getpid);
        sc!(
            libc::SYS_process_vm_readv,
            pid,
            local.as_ptr(),
            local.len(),
            remote.as_ptr(),
            remote.len(),
            0
        )
    })
    .map(|n| n as usize)
}

pub fn pwrite(fd: i32, buf: &[u8], off: u64) -> Result<usize> {
    // SAFETY: buf is a valid readable slice.
    check(unsafe { sc!(libc::SYS_pwrite64, fd, buf.as_ptr(), buf.len(), off) }).map(|n| n as usize)
}

/// `open(path, flags, mode)`; `path` must end with a NUL byte.
pub fn open(path: &[u8], flags: i32, mode: u32) -> Result<i32> {
    assert!(path.last() == Some(&0));
    // SAFETY: path is NUL-terminated.
    let r = check(unsafe { sc!(libc::SYS_open, path.as_ptr(), flags, mode) }).map(|fd| fd as i32);
    match r {
        Err(libc::EACCES) if path.starts_with(b"/proc/self/") => open_undumpable(path, flags),
        r => r,
    }
}

/// Opens a file of `/proc/self` that a process whose credentials changed may not open: such a
/// process is not dumpable, so the kernel makes root the owner of its `/proc/PID` files, and
/// `pagemap`, `mem` and `auxv` (mode 0400 or 0600) are closed to its own user. For the
/// moment of the `open` the process is made dumpable, which gives them back to it (what
/// `open` checks then is that the opener is this process); then it is put back. Another
/// process of the same user could open them in that moment too: the image, which that user
/// can read anyway, holds the same memory.
fn open_undumpable(path: &[u8], flags: i32) -> Result<i32> {
    // SAFETY: PR_GET_DUMPABLE takes no pointer.
    let was = unsafe { sc!(libc::SYS_prctl, libc::PR_GET_DUMPABLE) };
    if was != 0 {
        return Err(libc::EACCES);
    }
    // SAFETY: PR_SET_DUMPABLE takes plain integers; path is NUL-terminated (checked above).
    unsafe {
        sc!(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 1);
        let r = check(sc!(libc::SYS_open, path.as_ptr(), flags, 0)).map(|fd| fd as i32);
        sc!(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 0);
        r
    }
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor number has no memory effects.
    unsafe { sc!(libc::SYS_close, fd) };
}

/// Reads a whole (small, /proc) file into `buf`, returning the length used.
pub fn read_file(path: &[u8], buf: &mut ::alloc::vec::Vec<u8>) -> Result<usize> {
    let fd = open(path, libc::O_RDONLY | libc::O_CLOEXEC, 0)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let r = loop {
        match read(fd, &mut chunk) {
            Ok(0) => break Ok(buf.len()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(libc::EINTR) => {}
            Err(e) => break Err(e),
        }
    };
    close(fd);
    r
}

/// Reads up to `buf.len()` bytes of a small (/proc) file into `buf`, without allocating (for
/// signal handlers); returns the length read, 0 if the file cannot be read.
pub fn read_small_file(path: &[u8], buf: &mut [u8]) -> usize {
    let Ok(fd) = open(path, libc::O_RDONLY | libc::O_CLOEXEC, 0) else {
        return 0;
    };
    let mut len = 0;
    while len < buf.len() {
        match read(fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(k) => len += k,
            Err(libc::EINTR) => {}
            Err(_) => break,
        }
    }
    close(fd);
    len
}

/// `readlink(path)` into a String (path NUL-terminated).
pub fn readlink(path: &[u8]) -> Result<::alloc::string::String> {
    assert!(path.last() == Some(&0));
    let mut buf = [0u8; 4096];
    // SAFETY: path is NUL-terminated, buf writable for its length.
    let n = check(unsafe {
        sc!(
            libc::SYS_readlink,
            path.as_ptr(),
            buf.as_mut_ptr(),
            buf.len()
        )
    })?;
    Ok(::alloc::string::String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

pub fn futex_wait(word: &core::sync::atomic::AtomicU32, val: u32, timeout_ns: Option<u64>) {
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    });
    let tsp = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: word is a live aligned u32; tsp is null or points to a live timespec.
    unsafe {
        sc!(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            tsp
        )
    };
}

pub fn futex_wake(word: &core::sync::atomic::AtomicU32) {
    // SAFETY: word is a live aligned u32.
    unsafe {
        sc!(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX
        )
    };
}

pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn clock_ns(clock: i32) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe {
        sc!(
            libc::SYS_clock_gettime,
            clock,
            &mut ts as *mut libc::timespec
        )
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub const ARCH_GET_FS: i32 = 0x1003;

pub fn get_fs_base() -> u64 {
    let mut v = 0u64;
    // SAFETY: ARCH_GET_FS writes one u64 to the given address.
    unsafe { sc!(libc::SYS_arch_prctl, ARCH_GET_FS, &mut v as *mut u64) };
    v
}

/// Anonymous mapping at a fixed address (replacing what is there).
pub fn mmap_fixed(addr: u64, len: u64, prot: i32, extra: i32) -> Result<u64> {
    // SAFETY: MAP_FIXED over a range this crate owns (the reserved range); callers ensure that.
    check(unsafe {
        sc!(
            libc::SYS_mmap,
            addr,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | extra,
            -1i64,
            0
        )
    })
    .map(|a| a as u64)
}

/// Concatenates parts into buf without allocating (usable anywhere).
pub fn format_into<'a>(buf: &'a mut [u8], parts: &[&str]) -> &'a [u8] {
    let mut n = 0;
    for p in parts {
        let k = p.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&p.as_bytes()[..k]);
        n += k;
    }
    &buf[..n]
}

/// Decimal digits of v, without allocating.
pub fn itoa(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("?")
}

/// Entries of a /proc directory (numbers only), with getdents64: opendir would call malloc.
pub fn list_numeric_dir(path: &[u8]) -> Result<::alloc::vec::Vec<i32>> {
    let fd_of_listing = core::cell::Cell::new(-1);
    let mut out: ::alloc::vec::Vec<i32> = ::alloc::vec::Vec::new();
    list_dir(path, &fd_of_listing, |name| {
        if let Some(v) = core::str::from_utf8(name).ok().and_then(|s| s.parse().ok()) {
            out.push(v);
        }
    })?;
    out.retain(|&v| v != fd_of_listing.get());
    Ok(out)
}

/// The names in a directory, with raw system calls (no libc allocation).
pub fn list_dir_names(path: &[u8]) -> Result<::alloc::vec::Vec<String>> {
    let mut out = ::alloc::vec::Vec::new();
    list_dir(path, &core::cell::Cell::new(-1), |name| {
        out.push(::alloc::string::String::from_utf8_lossy(name).into_owned())
    })?;
    Ok(out)
}

/// Calls `f` with each name in the directory `path` (NUL-terminated); `fd` gets the descriptor
/// used for the listing.
fn list_dir(path: &[u8], fd_out: &core::cell::Cell<i32>, mut f: impl FnMut(&[u8])) -> Result<()> {
    let fd = open(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    fd_out.set(fd);
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { sc!(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        let n = match check(n) {
            Ok(0) => break,
            Ok(n) => n as usize,
            Err(e) => {
                close(fd);
                return Err(e);
            }
        };
        let mut off = 0;
        while off < n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            f(name);
            off += reclen;
        }
    }
    close(fd);
    Ok(())
}

/// Forks the writer child. Returns its PID in the parent; in the child runs `child` and exits.
pub fn fork_child(child: impl FnOnce() -> i32) -> Result<i32> {
    // clone with no flags and exit signal 0: a copy-on-write copy of this process, whose exit
    // nobody is told about but our wait4(__WCLONE).
    // SAFETY: without CLONE_VM the child has its own copy of memory, this stack included.
    let pid = check(unsafe { sc!(libc::SYS_clone, 0, 0, 0, 0, 0) })? as i32;
    if pid == 0 {
        // Ends the child without running any of the program's exit handlers.
        exit_group(child());
    }
    Ok(pid)
}
