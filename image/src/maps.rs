//! `/proc/PID/maps`, one line at a time, without allocating: a [`MapsLine`] borrows its name
//! from the text. The shim reads its own map with it during the pause, when every allocation
//! comes from scratch memory.
//!
//! ```text
//! start-end        perms offset   dev   inode      name
//! 7f12a000-7f12c000 rw-p 0001f000 08:01 1048602    /usr/lib/x86_64-linux-gnu/libc.so.6
//! ```

/// One line of a maps file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    /// `PROT_READ | PROT_WRITE | PROT_EXEC`, as the permissions say.
    pub prot: u32,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// Offset in the mapped file (hexadecimal in the text; 0 if unreadable).
    pub offset: u64,
    /// Device of the mapped file, as `makedev(major, minor)` (0 if unreadable).
    pub dev: u64,
    /// Inode of the mapped file, 0 for anonymous memory.
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`...), possibly with ` (deleted)`;
    /// empty for anonymous memory.
    pub name: &'a str,
}

/// Parses one line; None for a line without the five leading fields or with an unreadable
/// address range.
pub fn parse_line(line: &str) -> Option<MapsLine<'_>> {
    let mut it = line.splitn(6, ' ');
    let (Some(range), Some(perms), Some(off), Some(dev), Some(inode)) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return None;
    };
    let name = it.next().unwrap_or("").trim_start();
    let (a, b) = range.split_once('-')?;
    let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
        return None;
    };
    let p = perms.as_bytes();
    let mut prot = 0;
    if p.first() == Some(&b'r') {
        prot |= libc::PROT_READ as u32;
    }
    if p.get(1) == Some(&b'w') {
        prot |= libc::PROT_WRITE as u32;
    }
    if p.get(2) == Some(&b'x') {
        prot |= libc::PROT_EXEC as u32;
    }
    Some(MapsLine {
        start,
        end,
        prot,
        shared: p.get(3) == Some(&b's'),
        offset: u64::from_str_radix(off, 16).unwrap_or(0),
        dev: dev
            .split_once(':')
            .and_then(|(ma, mi)| {
                let (ma, mi) = (
                    u32::from_str_radix(ma, 16).ok()?,
                    u32::from_str_radix(mi, 16).ok()?,
                );
                Some(libc::makedev(ma, mi))
            })
            .unwrap_or(0),
        inode: inode.parse().unwrap_or(0),
        name,
    })
}

/// The lines of a maps file that parse, in order.
pub fn lines(text: &str) -> impl Iterator<Item = MapsLine<'_>> {
    text.lines().filter_map(parse_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 1048602                    /usr/bin/cat
7f12a000-7f12c000 rw-s 0001f000 fd:1a 77   /dev/shm/x (deleted)
7ffd1b5e4000-7ffd1b605000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 ---p 00000000 00:00 0 
not a maps line
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_field() {
        let v: Vec<MapsLine> = lines(TEXT).collect();
        assert_eq!(v.len(), 5);
        assert_eq!(
            v[0],
            MapsLine {
                start: 0x55d0c0a00000,
                end: 0x55d0c0a02000,
                prot: libc::PROT_READ as u32,
                shared: false,
                offset: 0,
                dev: libc::makedev(8, 1),
                inode: 1048602,
                name: "/usr/bin/cat",
            }
        );
        let shm = v[1];
        assert_eq!(shm.prot, (libc::PROT_READ | libc::PROT_WRITE) as u32);
        assert!(shm.shared);
        assert_eq!(shm.offset, 0x1f000);
        assert_eq!(shm.dev, libc::makedev(0xfd, 0x1a));
        assert_eq!(shm.inode, 77);
        assert_eq!(shm.name, "/dev/shm/x (deleted)");
        assert_eq!(v[2].name, "[stack]");
        assert_eq!((v[3].prot, v[3].name, v[3].inode), (0, "", 0));
        assert_eq!(v[4].prot, libc::PROT_EXEC as u32);
        assert_eq!(v[4].end, 0xffffffffff601000);
    }

    #[test]
    fn refuses_lines_without_a_range() {
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("1000-2000 rw-p 0 00:00"), None);
        assert_eq!(parse_line("x-2000 rw-p 0 00:00 0"), None);
        assert_eq!(parse_line("10002000 rw-p 0 00:00 0"), None);
    }

    #[test]
    fn unreadable_fields_default_to_zero() {
        let l = parse_line("1000-2000 r?x? zz q 9x name").unwrap();
        assert_eq!((l.offset, l.dev, l.inode), (0, 0, 0));
        assert_eq!(l.prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
        assert!(!l.shared);
        assert_eq!(l.name, "name");
    }

    #[test]
    fn reads_this_process_map() {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let n = text.lines().count();
        let v: Vec<MapsLine> = lines(&text).collect();
        assert_eq!(v.len(), n);
        assert!(v.windows(2).all(|w| w[0].end <= w[1].start));
        assert!(v.iter().any(|l| l.name == "[stack]"));
    }
}
