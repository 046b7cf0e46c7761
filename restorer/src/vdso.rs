//! Where this kernel's vvar/vDSO go in the restored process, and what stands at the image's
//! vDSO address when this kernel's vDSO is not the image's.
//!
//! glibc looks the vDSO's functions up once, at start, and keeps their addresses
//! (`clock_gettime`, `gettimeofday`, `time`, `getcpu`...): after a restore they must still work.
//!
//! - **Same vDSO** (same sizes and arrangement of `[vvar]`, `[vvar_vclock]`, `[vdso]`, and every
//!   function the image recorded at the same offset here): the three mappings move by one delta
//!   to the image's addresses, and glibc's pointers are right as they are.
//! - **Another vDSO** (another kernel: other sizes, another vvar arrangement, or functions at
//!   other offsets): this kernel's mappings move together, keeping their arrangement (the vDSO's
//!   code finds its data in vvar at a fixed distance), to a free place outside the image's
//!   memory; at the image's vDSO address goes a *proxy*: a copy of the old vDSO (so glibc's view
//!   of it as a loaded object, its ELF and program headers, symbols and unwind tables, stays
//!   true) in which every exported function starts with `jmp [rip+0]` and the address of the
//!   same-named function of this kernel's vDSO:
//!
//! ```text
//!   image's address space              restored process
//!   [vvar][vvar_vclock][vdso] ──────▶  [    (free)     ][proxy: old vDSO, entries patched ]
//!                                                           │ jmp [rip+0]; .quad new
//!   (free, after the old vDSO)          [vvar'][vvar_vclock'][vdso'] ◀──┘  this kernel's
//! ```
//!
//! The kernel keeps following its own vDSO when it is moved (`mremap` updates it), which is
//! what matters for it: x86_64 signal frames return through glibc's `__restore_rt`, in libc,
//! never through the vDSO. The image's old `[vvar]` range stays unmapped: only the old vDSO's
//! code read it.

use snapshim_image::elf::{self, Export};
use snapshim_image::layout::{RESERVED_END, RESERVED_START, USER_END};
use snapshim_image::{Metadata, RegionKind, PAGE_SIZE};

use crate::plan::KernPiece;

/// One of this process's kernel mappings: name (`[vvar]`, `[vvar_vclock]`, `[vdso]`), start, end.
pub type KernMap = (String, u64, u64);

/// `jmp qword ptr [rip+0]` followed by the 8-byte target: 14 bytes, reaches anywhere.
const JUMP_LEN: u64 = 14;

/// What phase 2 does with the kernel's mappings.
pub struct VdsoPlan {
    /// This process's vvar/vDSO mappings, moved by `delta`.
    pub pieces: Vec<KernPiece>,
    pub delta: i64,
    pub proxy: Option<Proxy>,
}

/// Anonymous executable memory at the image's vDSO address.
pub struct Proxy {
    pub addr: u64,
    /// Exactly the image's `[vdso]` region's length.
    pub bytes: Vec<u8>,
    /// Where this kernel's vDSO will be.
    pub new_vdso: u64,
    /// Why the proxy is needed, for the note to the user.
    pub why: String,
    pub functions: usize,
}

/// Decides how this kernel's mappings `kern` (with the exports of its vDSO, `here`) stand in
/// for the ones of the image.
pub fn plan(meta: &Metadata, kern: &[KernMap], here: &[Export]) -> Result<VdsoPlan, String> {
    let saved: Vec<(&str, u64, u64)> = meta
        .regions
        .iter()
        .filter_map(|r| match r.kind {
            RegionKind::Vdso => Some(("[vdso]", r.start, r.end)),
            RegionKind::Vvar => Some(("[vvar]", r.start, r.end)),
            RegionKind::VvarVclock => Some(("[vvar_vclock]", r.start, r.end)),
            _ => None,
        })
        .collect();
    let Some(&(_, saved_vdso, saved_vdso_end)) = saved.iter().find(|s| s.0 == "[vdso]") else {
        return Ok(VdsoPlan {
            pieces: Vec::new(),
            delta: 0,
            proxy: None,
        });
    };
    let Some((_, cur_vdso, _)) = kern.iter().find(|k| k.0 == "[vdso]") else {
        return Err("this kernel gives the process no vDSO".into());
    };
    let pieces: Vec<KernPiece> = kern
        .iter()
        .map(|(_, s, e)| KernPiece {
            start: *s,
            len: e - s,
        })
        .collect();
    let delta = saved_vdso as i64 - *cur_vdso as i64;
    let same_layout = saved.len() == kern.len()
        && saved.iter().all(|&(n, s, e)| {
            kern.iter()
                .any(|(kn, ks, ke)| kn == n && (*ks as i64 + delta) as u64 == s && ke - ks == e - s)
        });
    let moved: Vec<&str> = meta
        .vdso
        .symbols
        .iter()
        .filter(|s| {
            !here
                .iter()
                .any(|h| h.name == s.name && h.offset == s.offset)
        })
        .map(|s| s.name.as_str())
        .collect();
    if same_layout && moved.is_empty() {
        return Ok(VdsoPlan {
            pieces,
            delta,
            proxy: None,
        });
    }
    let why = if same_layout {
        format!(
            "its functions are at other offsets ({} first)",
            moved.first().unwrap_or(&"?")
        )
    } else {
        format!(
            "{} at the checkpoint, {} here",
            describe(saved.iter().map(|&(n, s, e)| (n, e - s))),
            describe(kern.iter().map(|(n, s, e)| (n.as_str(), e - s)))
        )
    };
    if meta.vdso.symbols.is_empty() {
        return Err(format!(
            "this kernel's vDSO differs from the one the image was taken under ({why}), and the \
             image (format 1.{}) does not record the old vDSO's functions to stand in for it",
            if meta.vdso.bytes.is_empty() {
                "1 or older"
            } else {
                "2"
            }
        ));
    }

    // This kernel's mappings, kept together, go to a free place.
    let (kern_lo, kern_hi) = kern
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), k| (lo.min(k.1), hi.max(k.2)));
    let base = free_place(meta, saved_vdso_end, kern_hi - kern_lo).ok_or_else(|| {
        format!(
            "this kernel's vDSO differs from the image's ({why}) and there is no free place for \
             it ({} KiB) in the program's address space",
            (kern_hi - kern_lo) / 1024
        )
    })?;
    let new_vdso = base + (cur_vdso - kern_lo);
    let bytes = proxy_bytes(meta, saved_vdso_end - saved_vdso, new_vdso, here)?;
    let functions = {
        let mut offsets: Vec<u64> = meta.vdso.symbols.iter().map(|s| s.offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        offsets.len()
    };
    Ok(VdsoPlan {
        pieces,
        delta: base as i64 - kern_lo as i64,
        proxy: Some(Proxy {
            addr: saved_vdso,
            bytes,
            new_vdso,
            why,
            functions,
        }),
    })
}

/// "[vvar] 16 KiB, [vdso] 8 KiB".
fn describe<'a>(m: impl Iterator<Item = (&'a str, u64)>) -> String {
    m.map(|(n, len)| format!("{n} {} KiB", len / 1024))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The proxy: the old vDSO's bytes (zeros past them, up to `len`), each exported function's
/// entry replaced by a jump to the same-named function of this kernel's vDSO at `new_vdso`.
fn proxy_bytes(
    meta: &Metadata,
    len: u64,
    new_vdso: u64,
    here: &[Export],
) -> Result<Vec<u8>, String> {
    let mut bytes = meta.vdso.bytes.clone();
    bytes.resize(len as usize, 0);
    for s in &meta.vdso.symbols {
        let Some(to) = here.iter().find(|h| h.name == s.name) else {
            return Err(format!(
                "the image's vDSO has a function {} that this kernel's vDSO lacks: the program \
                 may call it, so it cannot run on this kernel",
                s.name
            ));
        };
        // Metadata::validate: the symbol lies inside the region.
        if s.size < JUMP_LEN {
            return Err(format!(
                "the image's vDSO function {} is {} bytes, too short to hold a jump to this \
                 kernel's",
                s.name, s.size
            ));
        }
        let at = s.offset as usize;
        let target = new_vdso + to.offset;
        bytes[at..at + 6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        bytes[at + 6..at + 14].copy_from_slice(&target.to_le_bytes());
    }
    Ok(bytes)
}

/// A page-aligned address for `len` bytes that the image does not use, outside the reserved
/// range, with a free page on both sides: right after the image's vDSO (`after`) if that is
/// free, else the highest such hole below it, else the highest anywhere. The space a
/// grows-down stack may still take is not free.
fn free_place(meta: &Metadata, after: u64, len: u64) -> Option<u64> {
    let stack_room = meta
        .process
        .rlimits
        .iter()
        .find(|r| r.resource == libc::RLIMIT_STACK)
        .map_or(8 << 20, |r| r.soft)
        .clamp(8 << 20, 1 << 30);
    let mut taken: Vec<(u64, u64)> = meta
        .regions
        .iter()
        .map(|r| {
            let lo = if r.name == "[stack]" {
                r.start.saturating_sub(stack_room)
            } else {
                r.start
            };
            (lo.saturating_sub(PAGE_SIZE), r.end + PAGE_SIZE)
        })
        .collect();
    taken.push((RESERVED_START - PAGE_SIZE, RESERVED_END + PAGE_SIZE));
    taken.push((0, 1 << 20));
    taken.push((USER_END, u64::MAX));
    let free = |at: u64| {
        at.checked_add(len)
            .is_some_and(|end| taken.iter().all(|&(lo, hi)| end <= lo || at >= hi))
    };
    if free(after + PAGE_SIZE) {
        return Some(after + PAGE_SIZE);
    }
    // Hole candidates: just below each taken range, highest first.
    let mut tops: Vec<u64> = taken.iter().map(|t| t.0).filter(|&lo| lo >= len).collect();
    tops.sort_unstable_by(|a, b| b.cmp(a));
    let below_after = tops
        .iter()
        .filter(|&&t| t <= after)
        .chain(tops.iter().filter(|&&t| t > after));
    below_after
        .map(|&t| (t - len) & !(PAGE_SIZE - 1))
        .find(|&at| free(at))
}

/// This process's `[vvar]`, `[vvar_vclock]` and `[vdso]` mappings, from /proc/self/maps.
pub fn current_kernel_mappings() -> Result<Vec<KernMap>, String> {
    use procfs::process::{MMapPath, Process};
    let maps = Process::myself()
        .and_then(|p| p.maps())
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    Ok(maps
        .into_iter()
        .filter_map(|m| {
            let name = match &m.pathname {
                MMapPath::Vvar => "[vvar]",
                MMapPath::Vdso => "[vdso]",
                // procfs names the pseudo-paths it does not know without their brackets.
                MMapPath::Other(o) if o == "vvar_vclock" => "[vvar_vclock]",
                _ => return None,
            };
            Some((name.to_string(), m.address.0, m.address.1))
        })
        .collect())
}

/// The exports of this process's own vDSO, given its `[vdso]` mapping.
pub fn exports_here(kern: &[KernMap]) -> Vec<Export> {
    let Some((_, start, end)) = kern.iter().find(|k| k.0 == "[vdso]") else {
        return Vec::new();
    };
    // SAFETY: the kernel maps this process's vDSO readable for its whole length, and nothing
    // unmaps it while phase 1 runs.
    let bytes = unsafe { std::slice::from_raw_parts(*start as *const u8, (end - start) as usize) };
    elf::vdso_exports(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshim_image::{Region, VdsoSymbol};

    fn region(start: u64, end: u64, kind: RegionKind, name: &str) -> Region {
        Region {
            start,
            end,
            prot: 5,
            shared: false,
            kind,
            name: name.into(),
        }
    }

    fn exports(list: &[(&str, u64)]) -> Vec<Export> {
        list.iter()
            .map(|&(n, o)| Export {
                name: n.into(),
                offset: o,
                size: 40,
            })
            .collect()
    }

    /// An image whose vvar is 4 pages and vDSO 2, at 0x7ffd_0000_0000, exporting two functions.
    fn meta() -> Metadata {
        let base = 0x7ffd_0000_0000;
        let mut m = Metadata {
            ..Default::default()
        };
        m.regions = vec![
            region(0x40_0000, 0x40_1000, RegionKind::Anon, "[heap]"),
            region(
                base - 0x10_0000,
                base - 0x8_0000,
                RegionKind::Anon,
                "[stack]",
            ),
            region(base, base + 0x4000, RegionKind::Vvar, "[vvar]"),
            region(base + 0x4000, base + 0x6000, RegionKind::Vdso, "[vdso]"),
        ];
        m.vdso.bytes = vec![0xcc; 0x2000];
        m.vdso.symbols = vec![
            VdsoSymbol {
                name: "__vdso_time".into(),
                offset: 0xac0,
                size: 40,
            },
            VdsoSymbol {
                name: "__vdso_clock_gettime".into(),
                offset: 0xaf0,
                size: 902,
            },
        ];
        m
    }

    fn kern(at: u64, vvar: u64, vdso: u64) -> Vec<KernMap> {
        vec![
            ("[vvar]".into(), at, at + vvar),
            ("[vdso]".into(), at + vvar, at + vvar + vdso),
        ]
    }

    /// The kernel's mappings as /proc/self/maps names them, read by hand.
    #[test]
    fn kernel_mappings_are_all_found() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let by_hand: Vec<KernMap> = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let name = *f.get(5)?;
                let (a, b) = f[0].split_once('-')?;
                ["[vvar]", "[vvar_vclock]", "[vdso]"]
                    .contains(&name)
                    .then(|| {
                        (
                            name.to_string(),
                            u64::from_str_radix(a, 16).unwrap(),
                            u64::from_str_radix(b, 16).unwrap(),
                        )
                    })
            })
            .collect();
        assert!(by_hand.iter().any(|k| k.0 == "[vdso]"));
        assert_eq!(current_kernel_mappings().unwrap(), by_hand);
    }

    #[test]
    fn same_vdso_moves_by_one_delta() {
        let m = meta();
        let here = exports(&[("__vdso_time", 0xac0), ("__vdso_clock_gettime", 0xaf0)]);
        let p = plan(&m, &kern(0x7f00_0000_0000, 0x4000, 0x2000), &here).unwrap();
        assert!(p.proxy.is_none());
        assert_eq!(p.delta, 0x7ffd_0000_0000 - 0x7f00_0000_0000);
    }

    #[test]
    fn another_layout_gets_a_proxy_that_jumps_to_the_new_functions() {
        let m = meta();
        let here = exports(&[("__vdso_time", 0x100), ("__vdso_clock_gettime", 0x200)]);
        let p = plan(&m, &kern(0x7f00_0000_0000, 0x3000, 0x3000), &here).unwrap();
        let proxy = p.proxy.unwrap();
        assert_eq!(proxy.addr, 0x7ffd_0000_4000);
        assert_eq!(proxy.bytes.len(), 0x2000);
        assert!(
            proxy
                .why
                .contains("[vvar] 16 KiB, [vdso] 8 KiB at the checkpoint"),
            "{}",
            proxy.why
        );
        // Placed right after the old vDSO, a page apart, keeping vvar before vdso.
        let base = 0x7ffd_0000_7000u64;
        assert_eq!(p.delta, base as i64 - 0x7f00_0000_0000);
        assert_eq!(proxy.new_vdso, base + 0x3000);
        let at = 0xac0;
        assert_eq!(proxy.bytes[at..at + 6], [0xff, 0x25, 0, 0, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(proxy.bytes[at + 6..at + 14].try_into().unwrap()),
            proxy.new_vdso + 0x100
        );
        // Everything else is the old vDSO.
        assert_eq!(proxy.bytes[at + 14], 0xcc);
        assert_eq!(proxy.bytes[0], 0xcc);
    }

    #[test]
    fn same_layout_with_moved_functions_gets_a_proxy() {
        let m = meta();
        let here = exports(&[("__vdso_time", 0xac0), ("__vdso_clock_gettime", 0xb00)]);
        let p = plan(&m, &kern(0x7f00_0000_0000, 0x4000, 0x2000), &here).unwrap();
        let why = p.proxy.unwrap().why;
        assert!(
            why.contains("other offsets (__vdso_clock_gettime first)"),
            "{why}"
        );
    }

    #[test]
    fn a_missing_function_or_no_record_is_refused() {
        let m = meta();
        let here = exports(&[("__vdso_time", 0x100)]);
        let e = plan(&m, &kern(0x7f00_0000_0000, 0x3000, 0x3000), &here)
            .err()
            .unwrap();
        assert!(
            e.contains("function __vdso_clock_gettime that this kernel's vDSO lacks"),
            "{e}"
        );
        let mut old = m.clone();
        old.vdso = Default::default();
        let e = plan(&old, &kern(0x7f00_0000_0000, 0x3000, 0x3000), &here)
            .err()
            .unwrap();
        assert!(
            e.contains("does not record the old vDSO's functions"),
            "{e}"
        );
    }

    #[test]
    fn the_new_place_avoids_the_image_and_the_stack() {
        let mut m = meta();
        // Something right after the old vDSO: the next hole down is taken instead.
        m.regions.push(region(
            0x7ffd_0000_6000,
            0x7ffd_0001_0000,
            RegionKind::Anon,
            "",
        ));
        let at = free_place(&m, 0x7ffd_0000_6000, 0x6000).unwrap();
        for r in &m.regions {
            let lo = if r.name == "[stack]" {
                r.start - (8 << 20)
            } else {
                r.start
            };
            assert!(
                at + 0x6000 <= lo - PAGE_SIZE || at >= r.end + PAGE_SIZE,
                "{at:#x} {r:?}"
            );
        }
        assert!(at < 0x7ffd_0000_0000);
    }
}
