//! Where the programs under test are: the workspace's build artifacts next to the running test
//! binary (`target/<profile>/`), and the C apps in this crate's OUT_DIR.
//!
//! The end-to-end tests run what `cargo build --release --workspace` produced; `cargo test`
//! alone does not rebuild the shim, the restorer or the tool (they are not dependencies of this
//! crate), so a missing or stale artifact is reported as such instead of being tested.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::{Failure, Result};

/// The artifacts the end-to-end tests run.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `libsnapshim.so`, for LD_PRELOAD.
    pub shim: PathBuf,
    /// `snapshim-restore`.
    pub restorer: PathBuf,
    /// `snapshim`, the CLI.
    pub tool: PathBuf,
}

/// `target/<profile>`: the directory holding the running test binary, or its parent when the
/// binary is in `deps/` (integration and unit tests are).
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the running test binary: {e}")))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Failure::new(format!("{} has no parent directory", exe.display())))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.to_path_buf())
}

/// A C test app built by build.rs.
pub fn c_app(name: &str) -> PathBuf {
    Path::new(env!("OUT_DIR")).join(name)
}

/// The flags build.rs compiles the C apps with.
pub const C_FLAGS: &[&str] = &["-O2", "-g", "-pthread", "-Wall", "-Wextra"];

/// The C app `name` (`c/NAME.c`) linked with `-lLIB`, built once per test process into
/// `target/<profile>/c-linked/NAME-LIB` with build.rs's flags (`$CC`, else `cc`). For libraries
/// not every machine has (an allocator), so build.rs cannot build it.
pub fn c_app_linked(name: &str, lib: &str) -> Result<PathBuf> {
    type Built = std::sync::Mutex<std::collections::HashMap<String, PathBuf>>;
    static BUILT: OnceLock<Built> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = format!("{name}-{lib}");
    if let Some(p) = built.get(&key) {
        return Ok(p.clone());
    }
    let dir = profile_dir()?.join("c-linked");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    let out = dir.join(&key);
    // Built under a private name, then renamed: another test process may be running the file.
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("c/{name}.c"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let res = std::process::Command::new(&cc)
        .args(C_FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .arg(format!("-l{lib}"))
        .output()
        .map_err(|e| Failure::new(format!("cannot run the C compiler {cc:?}: {e}")))?;
    if !res.status.success() {
        return Err(Failure::new(format!(
            "compiling {} with -l{lib} failed ({}):\n{}",
            src.display(),
            res.status,
            String::from_utf8_lossy(&res.stderr)
        )));
    }
    std::fs::rename(&tmp, &out)
        .map_err(|e| Failure::new(format!("cannot rename {}: {e}", tmp.display())))?;
    built.insert(key, out.clone());
    Ok(out)
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The artifacts of this build, checked once per test process: they must exist and be newer
/// than the sources they are built from.
pub fn artifacts() -> Result<&'static Artifacts> {
    static CELL: OnceLock<std::result::Result<Artifacts, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = profile_dir().map_err(|e| e.to_string())?;
        locate(&dir, Some(&workspace_root()))
    })
    .as_ref()
    .map_err(|e| Failure::new(e.clone()))
}

/// Finds the three artifacts in `dir`; with `root`, also rejects any older than its sources.
pub fn locate(dir: &Path, root: Option<&Path>) -> std::result::Result<Artifacts, String> {
    let build = if dir.file_name().is_some_and(|n| n == "release") {
        "cargo build --release --workspace"
    } else {
        "cargo build --workspace"
    };
    // (artifact, crates whose sources it is built from)
    let wanted: [(&str, &[&str]); 3] = [
        ("libsnapshim.so", &["shim", "image"]),
        ("snapshim-restore", &["restorer", "image"]),
        ("snapshim", &["tools", "image"]),
    ];
    let mut found = Vec::new();
    for (name, crates) in wanted {
        let path = dir.join(name);
        let built = match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(_) => {
                return Err(format!(
                    "{} is missing: run `{build}` first (cargo test does not build it)",
                    path.display()
                ))
            }
        };
        if let Some(root) = root {
            if let Some((newest, source)) = newest_source(root, crates) {
                if newest > built {
                    return Err(format!(
                        "{} is older than {}: run `{build}` first (cargo test does not rebuild it)",
                        path.display(),
                        source.display()
                    ));
                }
            }
        }
        found.push(path);
    }
    let tool = found.pop().expect("three");
    let restorer = found.pop().expect("three");
    let shim = found.pop().expect("three");
    Ok(Artifacts {
        shim,
        restorer,
        tool,
    })
}

/// The most recently modified source file (`src/**`, `build.rs`, `Cargo.toml`) of `crates`.
fn newest_source(root: &Path, crates: &[&str]) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut consider = |p: PathBuf| {
        if let Ok(t) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            let newer = match &newest {
                Some((n, _)) => t > *n,
                None => true,
            };
            if newer {
                newest = Some((t, p));
            }
        }
    };
    for krate in crates {
        let base = root.join(krate);
        consider(base.join("Cargo.toml"));
        consider(base.join("build.rs"));
        let mut stack = vec![base.join("src")];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    // Unit-test modules do not go into the built artifacts.
                    Ok(_) if p.file_name() == Some("tests.rs".as_ref()) => {}
                    Ok(_) => consider(p),
                    Err(_) => {}
                }
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "snapshim-artifacts-{}-{name}/release",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn missing_artifact_says_how_to_build_it() {
        let dir = scratch("missing");
        std::fs::write(dir.join("libsnapshim.so"), b"").unwrap();
        let e = locate(&dir, None).unwrap_err();
        assert!(e.contains("snapshim-restore is missing"), "{e}");
        assert!(e.contains("cargo build --release --workspace"), "{e}");
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn stale_artifact_is_rejected() {
        let dir = scratch("stale");
        let root = dir.parent().unwrap().join("ws");
        for n in ["libsnapshim.so", "snapshim-restore", "snapshim"] {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        assert!(locate(&dir, Some(&root)).is_ok());
        std::fs::create_dir_all(root.join("restorer/src")).unwrap();
        let src = root.join("restorer/src/main.rs");
        std::fs::write(&src, b"fn main() {}").unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let e = locate(&dir, Some(&root)).unwrap_err();
        assert!(e.contains("snapshim-restore is older than"), "{e}");
        assert!(e.contains("main.rs"), "{e}");
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn profile_dir_is_above_deps() {
        let d = profile_dir().unwrap();
        assert_ne!(d.file_name().unwrap(), "deps");
    }
}
