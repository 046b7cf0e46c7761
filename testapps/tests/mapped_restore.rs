//! Restores that map the image instead of reading it (the default): the restored process's
//! memory is a copy-on-write view of the image file, so its next checkpoint must store those
//! pages itself, and every restore mode must give the same program.
//!
//! The app is `pattern` (c/pattern.c): 256 MiB of which it rewrites only 2000 pages per
//! generation, so most of its memory stays an untouched view of the image for the whole run, and
//! it checks every page against what it wrote, so a page lost or zeroed on the way prints FAIL.
//!
//! The tests take a lock and run one at a time (a 256 MiB app per core is enough here).
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use procfs::process::{MMapPath, MemoryMap, Process};
use snapshim_image::{Image, RegionKind};
use snapshim_testapps::process::children_of;
use snapshim_testapps::{bail, AppSpec, Context, Failure, Result, Session};

/// Long enough (about 5 s here) for a checkpoint of the restored process after PHASE 2 to be
/// committed before the program ends.
const GENERATIONS: &str = "1024";

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The memory mappings of process `pid`, from /proc/PID/maps.
fn maps_of(pid: u32) -> Result<Vec<MemoryMap>> {
    Ok(Process::new(pid as i32)
        .and_then(|p| p.maps())
        .context(format!("read /proc/{pid}/maps"))?
        .0)
}

/// Whether `m` maps the file at `path`.
fn maps_file(m: &MemoryMap, path: &Path) -> bool {
    matches!(&m.pathname, MMapPath::Path(p) if p == path)
}

/// The restored program: `snapshim-restore` itself, or, when it restored into new namespaces,
/// the descendant that has the shim loaded (the restorer supervises a reaper, whose child is the
/// program).
fn program_pid(restorer: u32) -> Result<u32> {
    let shim = Some(std::ffi::OsStr::new("libsnapshim.so"));
    let is_shim = |m: &MemoryMap| matches!(&m.pathname, MMapPath::Path(p) if p.file_name() == shim);
    let mut queue = vec![restorer];
    while let Some(pid) = queue.pop() {
        if maps_of(pid)?.iter().any(is_shim) {
            return Ok(pid);
        }
        queue.extend(children_of(pid));
    }
    bail!("neither snapshim-restore (pid {restorer}) nor a descendant has libsnapshim.so loaded")
}

/// How many mappings of the program restored by `restorer` map `image` (by path; " (deleted)"
/// follows it once it is unlinked).
fn mappings_of(restorer: u32, image: &Path) -> Result<usize> {
    let maps = maps_of(program_pid(restorer)?)?;
    Ok(maps.iter().filter(|m| maps_file(m, image)).count())
}

/// From `snapshim-restore --stats`: "...; R bytes of pages read, M mapped (prefetch P); ...".
fn mapped_and_prefetch(stderr: &str) -> Option<(u64, String)> {
    let line = stderr.lines().find(|l| l.contains("resuming after"))?;
    let (before, after) = line.split_once(" mapped (prefetch ")?;
    let mapped = before.rsplit(' ').next()?.parse().ok()?;
    let mode = after.split(')').next()?.to_string();
    Some((mapped, mode))
}

/// Restore (mapped) → the image is deleted while the restored process runs → checkpoint it
/// again → restore that: the second image must hold every page itself and name no image file,
/// and the program must finish with the uninterrupted output.
#[test]
fn mapped_restore_checkpointed_again_restores_after_its_image_is_deleted() -> Result<()> {
    let _one = one_at_a_time();
    let session = Session::new(AppSpec::named("pattern")?.arg(GENERATIONS))?;
    let app = session.spawn()?.wait_ready()?;
    let first = app.checkpoint()?;
    app.kill()?;

    let mut restored = first.restore()?;
    restored.wait_for("PHASE 2")?;
    let views = mappings_of(restored.pid(), first.path())?;
    if views == 0 {
        bail!(
            "the restored process maps nothing from {}: the restore did not map the image",
            first.path().display()
        );
    }
    fs::remove_file(first.path()).context(format!("delete {}", first.path().display()))?;
    eprintln!(
        "[mapped] restored process maps {views} ranges of {}, now deleted",
        first.path().display()
    );

    let second = restored.checkpoint()?;
    restored.kill()?;
    let img = Image::open(second.path())
        .map_err(|e| Failure::new(format!("{}: {e}", second.path().display())))?;
    for r in &img.meta.regions {
        if let RegionKind::File { path, .. } = &r.kind {
            if Image::open(Path::new(path)).is_ok() || path.ends_with(".snap") {
                bail!(
                    "the second image maps {:#x}-{:#x} from the image file {path}",
                    r.start,
                    r.end
                );
            }
        }
    }
    session
        .restore_from(&session.image_dir())?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// One image, restored with each way of bringing pages in: all give the uninterrupted output,
/// and --stats shows each did what it says (nothing mapped with --copy, the mode named).
#[test]
fn every_restore_mode_gives_the_same_program() -> Result<()> {
    let _one = one_at_a_time();
    let session = Session::new(AppSpec::named("pattern")?.arg(GENERATIONS))?;
    let app = session.spawn()?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    for (options, want_mode) in [
        (&["--copy"][..], None),
        (&["--prefetch=none"][..], Some("none")),
        (&["--prefetch=background"][..], Some("background")),
        (&["--prefetch=eager"][..], Some("eager")),
        (&[][..], Some("background")),
    ] {
        let mut with_stats = vec!["--stats"];
        with_stats.extend_from_slice(options);
        let fin = img.restore_with(&with_stats)?.finish()?;
        let (mapped, mode) = mapped_and_prefetch(&fin.stderr).ok_or_else(|| {
            Failure::new(format!(
                "snapshim-restore {with_stats:?} printed no statistics line\n{}",
                fin.stderr
            ))
        })?;
        match want_mode {
            None if mapped != 0 => bail!("{options:?} mapped {mapped} bytes\n{}", fin.stderr),
            Some(_) if mapped == 0 => bail!("{options:?} mapped nothing\n{}", fin.stderr),
            Some(m) if mode != m => {
                bail!(
                    "{options:?} ran with prefetch {mode}, not {m}\n{}",
                    fin.stderr
                )
            }
            _ => {}
        }
        fin.assert_same_output_as_uninterrupted()
            .map_err(|e| Failure::new(format!("restored with {options:?}: {e}")))?;
    }
    Ok(())
}

/// A mode that does not exist is refused before anything happens.
#[test]
fn an_unknown_prefetch_mode_is_refused() -> Result<()> {
    let tools = snapshim_testapps::artifacts()?;
    let out = std::process::Command::new(&tools.restorer)
        .args(["--prefetch=sometimes", "/nonexistent"])
        .output()
        .context("run snapshim-restore")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) || !stderr.contains("prefetch mode \"sometimes\"") {
        bail!(
            "expected exit status 2 and a message naming the mode, got {:?}\n{stderr}",
            out.status
        );
    }
    Ok(())
}
