//! The test apps and how to run each one. Every app follows one contract (testapps/README.md):
//! distinctive state, `READY` on stderr, 1–3 s of work with deterministic progress on stdout
//! (through a userspace buffer), `PHASE 2` on stderr halfway, a final self-check, `PASS` on stdout
//! or `FAIL: reason` and exit status 1.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::artifacts::{c_app, c_app_linked, profile_dir};
use crate::{Failure, Result};

/// The exact interpreter the Python app runs under (not whatever `python3` is first on PATH).
pub const PYTHON: &str = "/usr/bin/python3";

/// Every app, by the name [`AppSpec::named`] takes.
pub const APP_NAMES: &[&str] = &[
    "single",
    "single-rs",
    "threads",
    "fpu",
    "signals",
    "files",
    "threads-py",
    "pattern",
    "ids",
    "incr",
    "allocs",
    "events",
    "creds",
    "waits",
    "usr2",
    "deleted",
    "timers",
];

/// Prepares an app's working directory (input files) before it starts.
pub type Setup = fn(&Path) -> std::io::Result<()>;

/// How to run one test app.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// Short name: also `SNAPSHIM_NAME`, so images go to `$SNAPSHIM_DIR/<name>/`.
    pub name: String,
    pub program: PathBuf,
    /// Arguments. Relative paths in them are relative to the working directory, which is the
    /// session directory.
    pub args: Vec<String>,
    /// Files (relative to the working directory) the app writes, compared like stdout.
    pub output_files: Vec<String>,
    pub setup: Option<Setup>,
    /// Run a copy of `program` placed in the session directory (so a test can take it away).
    pub run_from_copy: bool,
    /// When the tests run as root, run the app and the tools as `nobody` (root ignores file
    /// permissions, so permission failures cannot be provoked as root).
    pub unprivileged: bool,
    /// Extra environment variables for the app (not for the tools), set after the ones the
    /// test process passes through, so they override them (`SNAPSHIM_COW`, say).
    pub env: Vec<(String, String)>,
    /// Libraries preloaded after the shim (`LD_PRELOAD=libsnapshim.so LIB...`), and alone in
    /// runs without the shim: an allocator such as `libjemalloc.so.2`.
    pub preload: Vec<String>,
    /// Start the app under the shim through `snapshim run` (which takes the image directory
    /// at start), not with `LD_PRELOAD` alone (the directory is taken at the first checkpoint).
    pub through_run: bool,
}

impl AppSpec {
    /// `program` with `args`, named `name`, with the defaults for everything else: for programs
    /// that are not test apps (a server, say).
    pub fn new(name: &str, program: PathBuf, args: &[&str]) -> AppSpec {
        AppSpec {
            name: name.to_string(),
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            output_files: Vec::new(),
            setup: None,
            run_from_copy: false,
            unprivileged: false,
            env: Vec::new(),
            preload: Vec::new(),
            through_run: false,
        }
    }

    /// The `allocs` app linked with `-lLIB` (`jemalloc`, `tcmalloc`, `mimalloc`), named
    /// `allocs-LIB`. Built on first use (see [`c_app_linked`]); the caller checks first that the
    /// library is there (`needs::c_library`).
    pub fn allocs_linked_with(lib: &str) -> Result<AppSpec> {
        let name = format!("allocs-{lib}");
        Ok(AppSpec::new(&name, c_app_linked("allocs", lib)?, &[]))
    }

    /// One of [`APP_NAMES`], with its default arguments.
    pub fn named(name: &str) -> Result<AppSpec> {
        Ok(match name {
            "single" | "threads" | "fpu" | "signals" | "pattern" | "ids" | "incr" | "allocs"
            | "events" | "creds" | "waits" | "usr2" | "deleted" | "timers" => {
                AppSpec::new(name, c_app(name), &[])
            }
            "files" => AppSpec {
                output_files: vec![FILES_OUTPUT.to_string()],
                setup: Some(write_files_input),
                ..AppSpec::new(name, c_app(name), &[FILES_INPUT, FILES_OUTPUT])
            },
            "single-rs" => AppSpec::new(name, profile_dir()?.join("single-rs"), &[]),
            "threads-py" => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/threads.py");
                // -I: isolated from PYTHON* variables (PYTHONUNBUFFERED would make stdout
                // unbuffered) and from user site-packages.
                AppSpec::new(
                    name,
                    PathBuf::from(PYTHON),
                    &["-I", &script.to_string_lossy()],
                )
            }
            _ => {
                return Err(Failure::new(format!(
                    "no test app named {name:?}; the apps are {APP_NAMES:?}"
                )))
            }
        })
    }

    /// Appends an argument.
    pub fn arg(mut self, a: impl Into<String>) -> AppSpec {
        self.args.push(a.into());
        self
    }

    /// Sets an environment variable for the app (see [`AppSpec::env`]).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> AppSpec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Preloads `lib` after the shim (see [`AppSpec::preload`]).
    pub fn preload(mut self, lib: impl Into<String>) -> AppSpec {
        self.preload.push(lib.into());
        self
    }

    /// See [`AppSpec::run_from_copy`].
    pub fn from_copy(mut self) -> AppSpec {
        self.run_from_copy = true;
        self
    }

    /// See [`AppSpec::unprivileged`].
    pub fn unprivileged(mut self) -> AppSpec {
        self.unprivileged = true;
        self
    }

    /// See [`AppSpec::through_run`].
    pub fn through_run(mut self) -> AppSpec {
        self.through_run = true;
        self
    }

    /// What determines the output: runs with equal keys must print the same.
    pub fn key(&self) -> String {
        let mut key = format!("{} {}", self.name, self.args.join(" "));
        for (k, v) in &self.env {
            key += &format!(" [{k}={v}]");
        }
        for lib in &self.preload {
            key += &format!(" [preload {lib}]");
        }
        key
    }
}

/// Input and output of the `files` app, relative to its working directory: the app reopens the
/// output by this relative name at the end, so a restore must restore the working directory too.
pub const FILES_INPUT: &str = "in.txt";
pub const FILES_OUTPUT: &str = "files-out.txt";

/// Writes the `files` app's input: about 2 MiB of deterministic text, numbered lines of 2 to 16
/// words.
pub fn write_files_input(dir: &Path) -> std::io::Result<()> {
    const WORDS: [&str; 20] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
        "tango",
    ];
    let mut rng = crate::rng::Rng::new(0x5eed_f11e);
    let mut text = String::with_capacity(2 << 20 | 4096);
    let mut line = 0u64;
    while text.len() < 2 << 20 {
        text += &format!("{line:07}");
        for _ in 0..2 + rng.next_u64() % 15 {
            text.push(' ');
            text += WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
        }
        text.push('\n');
        line += 1;
    }
    let mut f = std::fs::File::create(dir.join(FILES_INPUT))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_input_is_deterministic_and_about_2_mib() {
        let base = std::env::temp_dir().join(format!("snapshim-input-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        write_files_input(&a).unwrap();
        write_files_input(&b).unwrap();
        let (x, y) = (
            std::fs::read(a.join(FILES_INPUT)).unwrap(),
            std::fs::read(b.join(FILES_INPUT)).unwrap(),
        );
        assert_eq!(x, y);
        assert!((2 << 20..(2 << 20) + 200).contains(&x.len()), "{}", x.len());
        assert!(x.starts_with(b"0000000 "));
        assert!(x.ends_with(b"\n"));
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn every_name_resolves_and_unknown_names_are_refused() {
        for name in APP_NAMES {
            let spec = AppSpec::named(name).unwrap();
            assert_eq!(spec.name, *name);
        }
        let e = AppSpec::named("nope").unwrap_err();
        assert!(e.to_string().contains("no test app named"));
        assert_ne!(
            AppSpec::named("single").unwrap().key(),
            AppSpec::named("single").unwrap().arg("10").key()
        );
    }
}
