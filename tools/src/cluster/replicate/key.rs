//! The replication key: 32 random bytes that every node of a cluster holds, written as 64 hex
//! digits (and a newline) in a file only its owner can read.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::ReplicateError;

/// The key every sender and receiver of a cluster proves it holds.
#[derive(Clone)]
pub struct MacKey {
    pub(super) bytes: [u8; 32],
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

fn key_err(path: &Path, why: impl Into<String>) -> ReplicateError {
    ReplicateError::Key {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

impl MacKey {
    /// Makes a new key (from `getrandom`) and writes it to `path`, mode 0600; refuses to
    /// replace an existing file.
    pub fn generate(path: &Path) -> Result<MacKey, ReplicateError> {
        let bytes = super::wire::random32().map_err(|e| key_err(path, e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    key_err(path, "the file exists already (a key is never replaced)")
                }
                _ => key_err(path, format!("cannot create it: {e}")),
            })?;
        let text = format!("{}\n", hex(&bytes));
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| key_err(path, format!("cannot write it: {e}")))?;
        Ok(MacKey { bytes })
    }

    /// Reads the key at `path`: refused when missing, readable by group or others, or not
    /// 64 hex digits.
    pub fn load(path: &Path) -> Result<MacKey, ReplicateError> {
        let meta =
            std::fs::metadata(path).map_err(|e| key_err(path, format!("cannot read it: {e}")))?;
        if meta.mode() & 0o077 != 0 {
            return Err(key_err(
                path,
                format!(
                    "its mode is {:04o}: a key must be readable by its owner only (chmod 600)",
                    meta.mode() & 0o7777
                ),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| key_err(path, format!("cannot read it: {e}")))?;
        let digits = text.trim_end_matches('\n');
        let bytes = unhex(digits).ok_or_else(|| {
            key_err(
                path,
                format!(
                    "it holds {} characters; a key is 64 hex digits (make one with `snapshim \
                     replicate keygen FILE`)",
                    digits.len()
                ),
            )
        })?;
        Ok(MacKey { bytes })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("snapshim-key-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_generated_key_loads_and_is_never_replaced() {
        let d = tmpdir("gen");
        let p = d.join("key");
        let k = MacKey::generate(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(MacKey::load(&p).unwrap().bytes, k.bytes);
        let e = MacKey::generate(&p).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
        assert_eq!(MacKey::load(&p).unwrap().bytes, k.bytes);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_reason() {
        let d = tmpdir("bad");
        let p = d.join("key");
        assert!(MacKey::load(&p)
            .unwrap_err()
            .to_string()
            .contains("cannot read it"));
        std::fs::write(&p, "abcd\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = MacKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("holds 4 characters"), "{e}");
        std::fs::write(&p, format!("{}\n", "a".repeat(64))).unwrap();
        assert!(MacKey::load(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = MacKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode is 0640"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
