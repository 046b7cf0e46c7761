//! Whether the shim can enter a program at all, before `snapshim run` execs it.
//!
//! The shim is loaded by the dynamic loader from `LD_PRELOAD`. A program the loader never runs
//! for (a statically linked executable), or runs in secure-execution mode (set-user-ID or
//! set-group-ID of another user, file capabilities: `AT_SECURE`, which makes it ignore
//! `LD_PRELOAD`), would start without the shim, and a checkpoint asked for later would fail or,
//! with a signal, kill it. A script is judged by its interpreter (`#!`), through `env`.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

/// How many `#!` interpreters are followed (the kernel itself follows 4).
const MAX_INTERPRETERS: usize = 4;

/// `Err(why)` when the shim could not be loaded into `exe` (already found on disk). The reason
/// names the file it is about: the program, or the interpreter that would run it.
pub fn check(exe: &Path) -> Result<(), String> {
    check_nested(exe, 0)
}

fn check_nested(p: &Path, depth: usize) -> Result<(), String> {
    check_credentials(p)?;
    match interpreter_of(&read_head(p)?) {
        Some(_) if depth == MAX_INTERPRETERS => Err(format!(
            "{}: more than {MAX_INTERPRETERS} nested #! interpreters",
            p.display()
        )),
        Some(words) => check_nested(&resolve_interpreter(&words)?, depth + 1),
        None => check_elf(p),
    }
}

/// The first bytes of a file, enough for a `#!` line.
fn read_head(p: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(256);
    File::open(p)
        .and_then(|f| f.take(256).read_to_end(&mut head))
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(head)
}

/// The interpreter named by a `#!` line: its path and, for `env`, the program `env` runs.
fn interpreter_of(head: &[u8]) -> Option<Vec<String>> {
    let line = head.strip_prefix(b"#!")?;
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let words: Vec<String> = String::from_utf8_lossy(&line[..end])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!words.is_empty()).then_some(words)
}

/// The file that will run a `#!` script: the interpreter, or what `env` finds in `PATH`.
fn resolve_interpreter(words: &[String]) -> Result<PathBuf, String> {
    let interp = PathBuf::from(&words[0]);
    if interp.file_name().is_some_and(|n| n == "env") {
        // `#!/usr/bin/env [-S] prog args`: env is itself loaded with the shim, then execs prog.
        if let Some(prog) = words[1..].iter().find(|w| !w.starts_with('-')) {
            let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
            return std::env::split_paths(&path)
                .map(|d| d.join(prog))
                .find(|p| p.is_file())
                .ok_or_else(|| format!("its interpreter {prog} is not found in PATH"));
        }
    }
    Ok(interp)
}

/// Set-user-ID or set-group-ID of someone else, or file capabilities: secure execution.
fn check_credentials(p: &Path) -> Result<(), String> {
    let m = std::fs::metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if m.mode() & libc::S_ISUID != 0 && m.uid() != euid {
        return Err(format!(
            "{} is set-user-ID (user {}): the dynamic loader ignores LD_PRELOAD for it, so \
             snapshim cannot enter it",
            p.display(),
            m.uid()
        ));
    }
    if m.mode() & libc::S_ISGID != 0 && m.gid() != egid {
        return Err(format!(
            "{} is set-group-ID (group {}): the dynamic loader ignores LD_PRELOAD for it, so \
             snapshim cannot enter it",
            p.display(),
            m.gid()
        ));
    }
    if has_file_capabilities(p) {
        return Err(format!(
            "{} has file capabilities: the dynamic loader ignores LD_PRELOAD for it, so \
             snapshim cannot enter it",
            p.display()
        ));
    }
    Ok(())
}

fn has_file_capabilities(p: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 asks only for the size.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// An ELF executable the loader runs for: one with a program interpreter (`PT_INTERP`).
fn check_elf(p: &Path) -> Result<(), String> {
    let file = File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    // SAFETY: a read-only private mapping; if the file is truncated meanwhile, goblin reads
    // only within the length checked at mapping time and a shorter file gives SIGBUS at worst
    // in this short-lived tool, not silent corruption.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let elf = match Elf::parse(&map) {
        Ok(elf) => elf,
        // Not ELF and no #!: exec will say what it is.
        Err(_) => return Ok(()),
    };
    if elf.interpreter.is_none() {
        return Err(format!(
            "{} is statically linked: no dynamic loader runs for it to load the shim \
             (LD_PRELOAD), so snapshim cannot enter it",
            p.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_lines_are_split_into_words() {
        assert_eq!(
            interpreter_of(b"#!/usr/bin/env -S python3 -u\nprint(1)"),
            Some(vec![
                "/usr/bin/env".into(),
                "-S".into(),
                "python3".into(),
                "-u".into()
            ])
        );
        assert_eq!(interpreter_of(b"#!/bin/sh"), Some(vec!["/bin/sh".into()]));
        assert_eq!(interpreter_of(b"\x7fELF"), None);
        assert_eq!(interpreter_of(b"#!\n"), None);
    }

    #[test]
    fn env_finds_the_program_in_path() {
        let sh = resolve_interpreter(&["/usr/bin/env".into(), "sh".into()]).unwrap();
        assert!(sh.ends_with("sh") && sh.is_file(), "{}", sh.display());
        let e = resolve_interpreter(&["/usr/bin/env".into(), "no-such-interpreter".into()])
            .unwrap_err();
        assert!(e.contains("no-such-interpreter is not found"), "{e}");
    }

    #[test]
    fn dynamic_programs_are_enterable() {
        check(Path::new("/bin/sh")).unwrap();
        check(&std::env::current_exe().unwrap()).unwrap();
    }
}
