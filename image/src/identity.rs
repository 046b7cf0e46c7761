//! Whether a file the program had mapped is still the file it mapped: one rule for the
//! restorer (which refuses) and `snapshim verify` (which reports), in the same words.
//!
//! The restorer maps every file region again from its path, and the pages the image does not
//! hold (clean pages of binaries and libraries, most of them) come from the file. Code and data
//! of a different file there would not match the return addresses, function pointers and
//! relocated data saved in the image. The rule:
//!
//! 1. size and modification time as recorded: the same file (nothing more is read);
//! 2. otherwise, if the image recorded the file's GNU build-id: the same build-id and the same
//!    size is the same linker output (a package reinstalled, a copy on a standby machine that did
//!    not keep modification times): accepted, and said so; a different build-id, none any more,
//!    or the same build-id with another size (stripped, or patched with patchelf) is refused;
//! 3. otherwise (no build-id: data files, unusual binaries) a different size or modification
//!    time is refused.
//!
//! The inode is not compared: a copy on another machine always has another.

use std::os::unix::fs::MetadataExt;

use crate::elf;
use crate::FileIdentity;

/// What [`check_mapped_file`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Size and modification time are the recorded ones.
    Unchanged,
    /// Same build-id and size, another modification time: accepted. The text says what
    /// differs.
    SameBuild(String),
    /// Refused: the text is the whole message, naming the file and what differs.
    Changed {
        message: String,
        /// Whether the difference could be harmless (no build-id to tell; or the same build-id
        /// and another size): the message to the user may then mention the override.
        could_be_same_content: bool,
    },
    /// The file cannot be examined: the text is the whole message.
    Missing(String),
}

/// Checks the file at `path` against what the image recorded (`build_id`: `None` when it had
/// none or the image predates build-ids).
pub fn check_mapped_file(path: &str, recorded: &FileIdentity, build_id: Option<&[u8]>) -> Verdict {
    let st = match std::fs::metadata(path) {
        Ok(st) => st,
        Err(e) => return Verdict::Missing(format!("mapped file {path} is not available: {e}")),
    };
    let mtime_ns = st.mtime() as i128 * 1_000_000_000 + st.mtime_nsec() as i128;
    let (size_same, mtime_same) = (
        st.len() == recorded.size,
        mtime_ns == recorded.mtime_ns as i128,
    );
    if size_same && mtime_same {
        return Verdict::Unchanged;
    }
    let size = format!("size {} is now {}", recorded.size, st.len());
    let mtime = format!(
        "modification time {} is now {}",
        utc(recorded.mtime_ns as i128),
        utc(mtime_ns)
    );
    let changed = |what: String, could_be_same_content| Verdict::Changed {
        message: format!("mapped file {path} has changed since the checkpoint: {what}"),
        could_be_same_content,
    };
    let Some(old) = build_id else {
        let what = match (size_same, mtime_same) {
            (false, false) => format!("{size}, {mtime}"),
            (false, true) => size,
            _ => mtime,
        };
        return changed(what, true);
    };
    match elf::build_id_of_file(std::path::Path::new(path)) {
        Err(e) => Verdict::Missing(format!("mapped file {path} cannot be read: {e}")),
        Ok(None) => changed(
            format!(
                "build-id {} is now none (not the same kind of file)",
                elf::hex(old)
            ),
            false,
        ),
        Ok(Some(new)) if new != old => changed(
            format!(
                "build-id {} is now {} (another build)",
                elf::hex(old),
                elf::hex(&new)
            ),
            false,
        ),
        Ok(Some(_)) if !size_same => changed(
            format!("{size} with the same build-id (stripped or patched since)"),
            true,
        ),
        Ok(Some(new)) => Verdict::SameBuild(format!(
            "mapped file {path}: {mtime}, same build-id {}",
            elf::hex(&new)
        )),
    }
}

/// `ns` since the epoch as `YYYY-MM-DD hh:mm:ss.nnnnnnnnn UTC` (before 1970: raw nanoseconds).
pub fn utc(ns: i128) -> String {
    if ns < 0 {
        return format!("{ns} ns");
    }
    let secs = (ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:09} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000000000 UTC");
        assert_eq!(
            utc(1_709_251_199_000_000_001),
            "2024-02-29 23:59:59.000000001 UTC"
        );
        assert_eq!(utc(-5), "-5 ns");
    }

    fn identity_of(path: &std::path::Path) -> FileIdentity {
        let st = std::fs::metadata(path).unwrap();
        FileIdentity {
            size: st.len(),
            mtime_ns: st.mtime() * 1_000_000_000 + st.mtime_nsec(),
            inode: st.ino(),
        }
    }

    #[test]
    fn the_rule() {
        let exe = std::env::current_exe().unwrap();
        let id = elf::build_id_of_file(&exe).unwrap().unwrap();
        let p = exe.to_str().unwrap();
        let now = identity_of(&exe);
        let touched = FileIdentity {
            mtime_ns: now.mtime_ns - 1,
            inode: 1,
            ..now
        };
        let resized = FileIdentity {
            size: now.size + 1,
            ..touched.clone()
        };
        assert_eq!(check_mapped_file(p, &now, Some(&id)), Verdict::Unchanged);
        // Another inode alone is not a change.
        let moved = FileIdentity {
            inode: 1,
            ..now.clone()
        };
        assert_eq!(check_mapped_file(p, &moved, None), Verdict::Unchanged);
        match check_mapped_file(p, &touched, Some(&id)) {
            Verdict::SameBuild(t) => assert!(t.contains("same build-id"), "{t}"),
            v => panic!("{v:?}"),
        }
        let other = [0xaa; 20];
        match check_mapped_file(p, &touched, Some(&other)) {
            Verdict::Changed {
                message,
                could_be_same_content: false,
            } => assert!(
                message.contains(&format!(
                    "build-id {} is now {}",
                    "aa".repeat(20),
                    elf::hex(&id)
                )),
                "{message}"
            ),
            v => panic!("{v:?}"),
        }
        match check_mapped_file(p, &resized, Some(&id)) {
            Verdict::Changed {
                message,
                could_be_same_content: true,
            } => assert!(message.contains("same build-id (stripped"), "{message}"),
            v => panic!("{v:?}"),
        }
        match check_mapped_file(p, &touched, None) {
            Verdict::Changed { message, .. } => assert_eq!(
                message,
                format!(
                    "mapped file {p} has changed since the checkpoint: modification time {} is \
                     now {}",
                    utc(touched.mtime_ns as i128),
                    utc(now.mtime_ns as i128)
                )
            ),
            v => panic!("{v:?}"),
        }
        match check_mapped_file("/no/such/lib.so", &now, Some(&id)) {
            Verdict::Missing(m) => assert!(m.contains("/no/such/lib.so is not available"), "{m}"),
            v => panic!("{v:?}"),
        }
    }
}
