//! The two things snapshim reads out of ELF files, in one place for the shim (which records
//! them), the restorer and the tools (which compare them):
//!
//! - the GNU build-id (`NT_GNU_BUILD_ID` note) of a mapped binary or library: the identity of
//!   the linker's output, kept when a file is copied, reinstalled or touched;
//! - the exported functions of a vDSO (name and offset from its first byte), to build a proxy
//!   when another kernel's vDSO stands in for the one an image was taken with.
//!
//! Only 64-bit little-endian ELF is understood (the only kind an x86_64 image maps). Every read
//! is bounds-checked: the input may be any file, or a crafted image.

use std::borrow::Cow;

use field::*;

/// Fixed-width little-endian fields of a byte slice, `None` past its end.
mod field {
    pub fn u16_at(b: &[u8], o: usize) -> Option<u16> {
        Some(u16::from_le_bytes(
            b.get(o..o.checked_add(2)?)?.try_into().ok()?,
        ))
    }
    pub fn u32_at(b: &[u8], o: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            b.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    }
    pub fn u64_at(b: &[u8], o: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            b.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    }
}

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const SHDR_LEN: usize = 64;
const SYM_LEN: usize = 24;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const SHT_DYNSYM: u32 = 11;
const NT_GNU_BUILD_ID: u32 = 3;
/// More program headers than any real file has: a larger count is damage.
const MAX_PHDRS: u16 = 512;
/// Notes are small; a PT_NOTE segment is read up to this many bytes.
const MAX_NOTES: u64 = 64 << 10;
/// A build-id is 20 bytes (SHA-1) or 16 (MD5/UUID) in practice; longer is not one.
const MAX_BUILD_ID: usize = 64;

/// The ELF header of a 64-bit little-endian file, or `None`.
fn ehdr(head: &[u8]) -> Option<&[u8]> {
    let h = head.get(..EHDR_LEN)?;
    (h[..4] == *b"\x7fELF" && h[4] == 2 && h[5] == 1).then_some(h)
}

/// The GNU build-id of an ELF file, read through `read(offset, buf)`, which fills `buf` from
/// that file offset completely or returns false. `None`: not a 64-bit ELF file, or no
/// build-id note.
///
/// Reads the ELF header, the program headers and each `PT_NOTE` segment: in a linked file the
/// build-id note sits in the first page, so a caller that already holds the first page
/// (see [`build_id_of_head`]) seldom reads anything more.
pub fn build_id(read: &mut dyn FnMut(u64, &mut [u8]) -> bool) -> Option<Vec<u8>> {
    build_id_from(&mut |off, len| {
        let mut v = vec![0u8; len];
        read(off, &mut v).then_some(Cow::Owned(v))
    })
}

/// [`build_id`] of a file whose first bytes are `head` (any length), reading the rest, if
/// needed, with `read_more`. What lies inside `head` is parsed in place, without copies or
/// allocation (the shim calls this during the pause).
pub fn build_id_of_head(
    head: &[u8],
    read_more: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Option<Vec<u8>> {
    ehdr(head)?;
    build_id_from(&mut |off, len| {
        let inside = usize::try_from(off)
            .ok()
            .and_then(|o| head.get(o..o.checked_add(len)?));
        match inside {
            Some(b) => Some(Cow::Borrowed(b)),
            None => {
                let mut v = vec![0u8; len];
                read_more(off, &mut v).then_some(Cow::Owned(v))
            }
        }
    })
}

/// [`build_id`] over `get(offset, len)`, which gives exactly `len` bytes of the file at
/// `offset`, or `None`.
fn build_id_from<'a>(get: &mut dyn FnMut(u64, usize) -> Option<Cow<'a, [u8]>>) -> Option<Vec<u8>> {
    let h = get(0, EHDR_LEN)?;
    let h = ehdr(&h)?;
    let (phoff, phentsize, phnum) = (u64_at(h, 32)?, u16_at(h, 54)?, u16_at(h, 58)?);
    if phnum > MAX_PHDRS || (phentsize as usize) < PHDR_LEN {
        return None;
    }
    let ph = get(phoff, phnum as usize * phentsize as usize)?;
    for p in ph.chunks_exact(phentsize as usize) {
        if u32_at(p, 0)? != PT_NOTE {
            continue;
        }
        let (off, len) = (u64_at(p, 8)?, u64_at(p, 32)?.min(MAX_NOTES));
        if let Some(id) = get(off, len as usize).and_then(|n| gnu_build_id_note(&n)) {
            return Some(id);
        }
    }
    None
}

/// The build-id of the file at `path` now. `Ok(None)`: it has none (not ELF, or no note).
pub fn build_id_of_file(path: &std::path::Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 4096];
    let mut n = 0;
    while n < head.len() {
        match f.read_at(&mut head[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    Ok(build_id_of_head(&head, &mut |off, buf| {
        f.read_exact_at(buf, off).is_ok()
    }))
}

/// The descriptor of the first `NT_GNU_BUILD_ID` note named "GNU" in a run of notes.
fn gnu_build_id_note(notes: &[u8]) -> Option<Vec<u8>> {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut o = 0usize;
    while o + 12 <= notes.len() {
        let (namesz, descsz, kind) = (
            u32_at(notes, o)? as usize,
            u32_at(notes, o + 4)? as usize,
            u32_at(notes, o + 8)?,
        );
        let name_at = o + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        if next > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID
            && &notes[name_at..name_at + namesz] == b"GNU\0"
            && (1..=MAX_BUILD_ID).contains(&descsz)
        {
            return Some(notes[desc_at..desc_at + descsz].to_vec());
        }
        o = next;
    }
    None
}

/// `id` as lowercase hex, the way `file` and `readelf -n` show a build-id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// One function a vDSO exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    /// From the vDSO's first byte (its mapping's start).
    pub offset: u64,
    pub size: u64,
}

/// The functions exported by a vDSO, given its whole image as mapped (`[vdso]` in
/// /proc/self/maps: the kernel maps the ELF file from its first byte, section headers
/// included). `None` if `elf` is not such an image.
///
/// Symbols are taken from the `.dynsym` section: defined, global or weak functions. Their
/// values are link-time addresses, turned into offsets through the `PT_LOAD` segment that
/// holds them.
pub fn vdso_exports(elf: &[u8]) -> Option<Vec<Export>> {
    let h = ehdr(elf)?;
    let (phoff, phentsize, phnum) = (u64_at(h, 32)? as usize, u16_at(h, 54)?, u16_at(h, 56)?);
    let (shoff, shentsize, shnum) = (u64_at(h, 40)? as usize, u16_at(h, 58)?, u16_at(h, 60)?);
    if (phentsize as usize) < PHDR_LEN || (shentsize as usize) < SHDR_LEN {
        return None;
    }
    let loads: Vec<(u64, u64, u64)> = (0..phnum as usize)
        .filter_map(|i| {
            let p = elf.get(phoff.checked_add(i * phentsize as usize)?..)?;
            (u32_at(p, 0)? == PT_LOAD).then_some((u64_at(p, 16)?, u64_at(p, 40)?, u64_at(p, 8)?))
        })
        .collect();
    let shdr = |i: usize| elf.get(shoff.checked_add(i.checked_mul(shentsize as usize)?)?..);
    let section = |s: &[u8]| -> Option<&[u8]> {
        let (off, size) = (u64_at(s, 24)? as usize, u64_at(s, 32)? as usize);
        elf.get(off..off.checked_add(size)?)
    };
    for i in 0..shnum as usize {
        let s = shdr(i)?;
        if u32_at(s, 4)? != SHT_DYNSYM {
            continue;
        }
        let syms = section(s)?;
        let strtab = section(shdr(u32_at(s, 40)? as usize)?)?;
        let mut out = Vec::new();
        for sym in syms.chunks_exact(SYM_LEN) {
            let (name, info, shndx) = (u32_at(sym, 0)? as usize, sym[4], u16_at(sym, 6)?);
            let (value, size) = (u64_at(sym, 8)?, u64_at(sym, 16)?);
            let (bind, kind) = (info >> 4, info & 0xf);
            // STT_FUNC, STB_GLOBAL or STB_WEAK, defined (not SHN_UNDEF or SHN_ABS).
            if kind != 2 || !(bind == 1 || bind == 2) || shndx == 0 || shndx == 0xfff1 {
                continue;
            }
            let name = strtab.get(name..)?;
            let name = &name[..name.iter().position(|&c| c == 0)?];
            let (vaddr, _, off) = loads
                .iter()
                .copied()
                .find(|&(v, m, _)| value >= v && value - v < m)?;
            out.push(Export {
                name: String::from_utf8_lossy(name).into_owned(),
                offset: value - vaddr + off,
                size,
            });
        }
        return Some(out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A note section holding `notes` (name, type, descriptor).
    fn notes(list: &[(&[u8], u32, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, kind, desc) in list {
            v.extend((name.len() as u32).to_le_bytes());
            v.extend((desc.len() as u32).to_le_bytes());
            v.extend(kind.to_le_bytes());
            v.extend(*name);
            v.resize(v.len().next_multiple_of(4), 0);
            v.extend(*desc);
            v.resize(v.len().next_multiple_of(4), 0);
        }
        v
    }

    #[test]
    fn build_id_note_is_found_among_others() {
        let n = notes(&[(b"GNU\0", 1, &[0; 16]), (b"GNU\0", 3, &[0xab, 0xcd, 0xef])]);
        assert_eq!(gnu_build_id_note(&n), Some(vec![0xab, 0xcd, 0xef]));
        let n = notes(&[(b"Go\0\0", 3, &[1, 2, 3])]);
        assert_eq!(gnu_build_id_note(&n), None);
        // A descriptor size past the end is not read.
        let mut n = notes(&[(b"GNU\0", 3, &[1, 2, 3, 4])]);
        n[4] = 200;
        assert_eq!(gnu_build_id_note(&n), None);
    }

    #[test]
    fn build_id_of_this_test_binary_matches_readelf() {
        let exe = std::env::current_exe().unwrap();
        let Some(id) = build_id_of_file(&exe).unwrap() else {
            // Rust test binaries are linked with a build-id by default on Linux.
            panic!("{} has no build-id", exe.display());
        };
        let out = std::process::Command::new("readelf")
            .arg("-n")
            .arg(&exe)
            .output();
        if let Some(out) = out.ok().filter(|o| o.status.success()) {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("Build ID: {}", hex(&id))), "{text}");
        }
        assert!(build_id_of_file(std::path::Path::new("/proc/self/status"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn this_process_vdso_exports_clock_gettime() {
        // SAFETY: getauxval has no preconditions.
        let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        if base == 0 {
            return; // no vDSO (vdso=0 on the kernel command line)
        }
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.ends_with("[vdso]")).unwrap();
        let (a, b) = line
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        assert_eq!(a, base);
        // SAFETY: the [vdso] mapping is readable for its whole length.
        let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, (b - a) as usize) };
        let ex = vdso_exports(bytes).unwrap();
        let cg = ex
            .iter()
            .find(|e| e.name == "__vdso_clock_gettime")
            .unwrap();
        assert!(cg.offset > 0 && cg.offset + cg.size <= b - a, "{cg:?}");
        // glibc resolved clock_gettime to exactly that address.
        let sym = c"__vdso_clock_gettime";
        let ver = c"LINUX_2.6";
        // SAFETY: plain lookups in the vDSO's link map; the strings are NUL-terminated.
        let p = unsafe {
            let h = libc::dlopen(
                c"linux-vdso.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_NOLOAD,
            );
            if h.is_null() {
                return;
            }
            libc::dlvsym(h, sym.as_ptr(), ver.as_ptr())
        };
        assert_eq!(p as u64, a + cg.offset);
    }
}
