//! Phase 2 as phase 1 sees it: the freestanding blob (`blob/main.rs`, built by build.rs) is
//! embedded in this executable, loaded at its link address in the reserved range, given its
//! plan in the arena ([`Arena`]) and jumped to on a stack of its own ([`jump`]).

use snapshim_image::layout::{ARENA_END, ARENA_START, RESERVED_START, STACK_END};

static BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blob"));

/// Maps `len` bytes of fresh read-write memory at `start`, which must be free.
pub fn map_fixed(start: u64, len: u64) -> Result<(), String> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping: the range was free, or this fails.
    let a = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if a as u64 != start {
        return Err(format!(
            "cannot map {start:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A bump writer over the arena (mapped by [`Arena::map`]); its first page is the plan's
/// header.
pub struct Arena {
    next: u64,
}

impl Arena {
    /// Maps the arena; the first page stays for the plan itself.
    pub fn map() -> Result<Arena, String> {
        map_fixed(ARENA_START, ARENA_END - ARENA_START)?;
        Ok(Arena {
            next: ARENA_START + 4096,
        })
    }

    /// Copies `items` into the arena; returns their address.
    pub fn put<T: Copy>(&mut self, items: &[T]) -> Result<u64, String> {
        let align = std::mem::align_of::<T>().max(8) as u64;
        let at = (self.next + align - 1) & !(align - 1);
        let bytes = std::mem::size_of_val(items) as u64;
        if at + bytes > ARENA_END {
            return Err(
                "the image has too many regions or page runs for the restorer's arena".into(),
            );
        }
        // SAFETY: [at, at+bytes) is inside the mapped arena; T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                items.as_ptr() as *const u8,
                at as *mut u8,
                bytes as usize,
            )
        };
        self.next = at + bytes;
        Ok(at)
    }

    /// Writes the plan into the first page; returns its address.
    pub fn finish(self, plan: crate::plan::Plan) -> u64 {
        const _: () = assert!(std::mem::size_of::<crate::plan::Plan>() <= 4096);
        // SAFETY: the first arena page is mapped and reserved for the plan header.
        unsafe { std::ptr::write(ARENA_START as *mut crate::plan::Plan, plan) };
        ARENA_START
    }
}

/// Maps the blob's PT_LOAD segments at their link addresses; returns its entry point.
pub fn load() -> Result<u64, String> {
    let b = BLOB;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("the embedded restorer blob is damaged".into());
    }
    let (entry, phoff, phentsize, phnum) = (
        u64_at(0x18),
        u64_at(0x20) as usize,
        u16_at(0x36),
        u16_at(0x38),
    );
    let segs: Vec<(u32, u64, u64, u64, u64)> = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&o| u32_at(o) == 1) // PT_LOAD
        .map(|o| {
            (
                u32_at(o + 4),
                u64_at(o + 8),
                u64_at(o + 16),
                u64_at(o + 32),
                u64_at(o + 40),
            )
        })
        .collect();
    let lo = segs.iter().map(|s| s.2 & !4095).min().unwrap_or(0);
    let hi = segs
        .iter()
        .map(|s| (s.2 + s.4 + 4095) & !4095)
        .max()
        .unwrap_or(0);
    if lo < RESERVED_START || hi > ARENA_START {
        return Err("the embedded restorer blob is not linked inside the reserved range".into());
    }
    map_fixed(lo, hi - lo)?;
    for &(_, off, vaddr, filesz, _) in &segs {
        // SAFETY: the destination was just mapped writable; the source is inside the blob.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b[off as usize..].as_ptr(),
                vaddr as *mut u8,
                filesz as usize,
            )
        };
    }
    for &(flags, _, vaddr, _, memsz) in &segs {
        let prot = (if flags & 4 != 0 { libc::PROT_READ } else { 0 })
            | (if flags & 2 != 0 { libc::PROT_WRITE } else { 0 })
            | (if flags & 1 != 0 { libc::PROT_EXEC } else { 0 });
        let start = vaddr & !4095;
        // SAFETY: changes protection of the blob's own pages only.
        unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                ((vaddr + memsz + 4095) & !4095) as usize - start as usize,
                prot,
            )
        };
    }
    Ok(entry)
}

/// glibc registered an rseq area in this thread's TLS; the kernel writes it on every return to
/// user space, so it must go before phase 2 unmaps that memory (else: SIGSEGV).
pub fn unregister_rseq() {
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    // SAFETY: glibc's exported constants; RSEQ_FLAG_UNREGISTER with the registered area, length
    // (32, the kernel ABI size glibc registers) and signature.
    unsafe {
        if __rseq_size == 0 {
            return;
        }
        let mut tp: u64;
        core::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly));
        tp = (tp as i64 + __rseq_offset as i64) as u64;
        libc::syscall(libc::SYS_rseq, tp, 32u32, 1i32, 0x5305_3053u32);
    }
}

/// Switches to the blob's stack and calls its entry with the plan. Never returns.
///
/// # Safety
/// `entry` is the loaded blob's entry point, `plan` a complete plan in the arena, and the
/// blob's stack is mapped.
pub unsafe fn jump(entry: u64, plan: u64) -> ! {
    // SAFETY: the stack range is mapped; the blob takes the plan in rdi and never returns.
    unsafe {
        core::arch::asm!("mov rsp, {sp}", "xor ebp, ebp", "call {entry}", "ud2",
            sp = in(reg) STACK_END - 64, entry = in(reg) entry, in("rdi") plan, options(noreturn))
    }
}
