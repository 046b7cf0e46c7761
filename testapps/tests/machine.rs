//! Another machine's differences: a vDSO of another layout (stood in for by a proxy that jumps
//! into this kernel's vDSO), and mapped files that changed (accepted by build-id when only their
//! modification time did, refused otherwise, unless the user names them).
//!
//! A kernel cannot be swapped in a test, so the vDSO tests rewrite a real image's record of
//! the vDSO's surroundings (the sizes of `[vvar]` and `[vdso]`) while keeping its functions
//! where they really were: glibc in the image holds pointers to them. The restorer then sees a
//! layout unlike this kernel's and must take the proxy path, and the program, which reads its
//! clocks through the vDSO all the time, must finish with the output of an uninterrupted run.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use snapshim_image::{encode_metadata, Image, Metadata, RegionKind, PAGE_SIZE};
use snapshim_testapps::{bail, App, AppSpec, Context, Failure, Result, Session, Snapshot};

/// A copy of `img` whose metadata `change` rewrote, resealed so that it passes every checksum.
fn rewritten(img: &Snapshot, label: &str, change: impl FnOnce(&mut Metadata)) -> Result<PathBuf> {
    let image = Image::open(img.path()).context(format!("open {}", img.path().display()))?;
    let mut meta = image.meta.clone();
    change(&mut meta);
    let (bytes, crc) = encode_metadata(&meta);
    let mut h = image.header.clone();
    img.session().damaged_copy(img.path(), label, move |b| {
        b.truncate(h.meta_off as usize);
        b.extend_from_slice(&bytes);
        h.meta_len = bytes.len() as u64;
        h.meta_crc = crc;
        b[..PAGE_SIZE as usize].copy_from_slice(&h.encode());
    })
}

/// The image's `[vvar]` (or `[vvar_vclock]`) and `[vdso]` regions, as indexes.
fn kernel_regions(m: &Metadata) -> Result<(usize, usize)> {
    let find = |kind: RegionKind| m.regions.iter().position(|r| r.kind == kind);
    let vvar = find(RegionKind::Vvar).or_else(|| find(RegionKind::VvarVclock));
    match (vvar, find(RegionKind::Vdso)) {
        (Some(v), Some(d)) => Ok((v, d)),
        _ => bail!("the image records no [vvar] and [vdso]: {:#?}", m.regions),
    }
}

/// The ids app reads CLOCK_MONOTONIC and CLOCK_BOOTTIME through the vDSO in five threads, all
/// the time, and checks they never go back.
fn ids_checkpointed_and_killed() -> Result<Snapshot> {
    let app = App::spawn("ids")?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let meta = Image::open(img.path()).context("open the image")?.meta;
    if meta.vdso.symbols.is_empty() || meta.vdso.bytes.is_empty() {
        bail!(
            "the image records no vDSO functions: {:?}",
            meta.vdso.symbols
        );
    }
    Ok(img)
}

const PROXY_NOTE: &str = "vDSO differs from the image's";

/// `[vvar]` one page smaller than this kernel's (and `[vdso]` one page larger where the image
/// has room after it; here the kernel often puts the vDSO right below ld.so): the restorer
/// moves this kernel's mappings to a free place and puts a proxy at the old vDSO address; the
/// program's cached vDSO pointers land in the proxy and jump on.
#[test]
fn vdso_of_another_layout_is_stood_in_for_by_a_proxy() -> Result<()> {
    let img = ids_checkpointed_and_killed()?;
    let meta = Image::open(img.path()).context("open the image")?.meta;
    let (vvar, vdso) = kernel_regions(&meta)?;
    let vvar_kib = (meta.regions[vvar].end - meta.regions[vvar].start - PAGE_SIZE) / 1024;
    let vdso_end = meta.regions[vdso].end;
    let grow = meta
        .regions
        .get(vdso + 1)
        .is_none_or(|next| next.start >= vdso_end + PAGE_SIZE);
    let other = rewritten(&img, "other-vdso-layout", |m| {
        m.regions[vvar].start += PAGE_SIZE;
        if grow {
            m.regions[vdso].end += PAGE_SIZE;
        }
    })?;
    let done = img.session().restore_from(&other)?.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    let note = done
        .stderr
        .lines()
        .find(|l| l.contains(PROXY_NOTE))
        .ok_or_else(|| {
            Failure::new(format!(
                "the restorer did not say it used a vDSO proxy:\n{}",
                done.stderr
            ))
        })?;
    let at = format!("at {:#x} jump", meta.regions[vdso].start);
    let sizes = format!("{} {vvar_kib} KiB", meta.regions[vvar].name);
    if !note.contains(&at) || !note.contains(&sizes) {
        bail!("the note does not name the old vDSO ({at}) and the sizes ({sizes}): {note}");
    }
    // The same image as it was takes the fast path: no proxy.
    let done = img.restore()?.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    if done.stderr.contains(PROXY_NOTE) {
        bail!("an unchanged vDSO layout was proxied:\n{}", done.stderr);
    }
    Ok(())
}

/// A program restored with a proxy is checkpointed again: the new image stores the proxy as
/// the program's memory and records this kernel's vDSO where it now is, so restoring it here
/// takes the fast path, and the program's cached pointers still go through the (restored)
/// proxy into the vDSO: the signals app reads CLOCK_MONOTONIC through it after PHASE 2.
#[test]
fn a_proxied_program_checkpoints_and_restores_again() -> Result<()> {
    let app = App::spawn("signals")?.wait_ready()?;
    // Right after READY: well before PHASE 2, which the restored process must then print.
    let first = app.checkpoint()?;
    app.kill()?;
    let meta = Image::open(first.path()).context("open the image")?.meta;
    let (vvar, _) = kernel_regions(&meta)?;
    let other = rewritten(&first, "other-vdso-layout", |m| {
        m.regions[vvar].start += PAGE_SIZE;
    })?;
    let mut restored = first.session().restore_from(&other)?;
    restored.wait_for("PHASE 2")?;
    if !restored.stderr_so_far().contains(PROXY_NOTE) {
        bail!(
            "the first restore did not use a proxy:\n{}",
            restored.stderr_so_far()
        );
    }
    let second = restored.checkpoint()?;
    restored.kill()?;
    let done = second.restore()?.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    if done.stderr.contains(PROXY_NOTE) {
        bail!(
            "the second image, taken on this kernel, was proxied again:\n{}",
            done.stderr
        );
    }
    Ok(())
}

/// A vDSO function the program may have looked up that this kernel's vDSO does not export
/// cannot be stood in for: refused in one line naming it.
#[test]
fn a_vdso_function_this_kernel_lacks_is_refused() -> Result<()> {
    let img = ids_checkpointed_and_killed()?;
    let meta = Image::open(img.path()).context("open the image")?.meta;
    let (vvar, _) = kernel_regions(&meta)?;
    let bad = rewritten(&img, "vdso-function-missing", |m| {
        m.regions[vvar].start += PAGE_SIZE;
        m.vdso.symbols[0].name = "__vdso_from_the_future".into();
    })?;
    img.session()
        .expect_restore_refused(&bad, &["__vdso_from_the_future"])?;
    // An image without a vDSO record (format 1.1) under another layout: refused too.
    let old = rewritten(&img, "vdso-not-recorded", |m| {
        m.regions[vvar].start += PAGE_SIZE;
        m.vdso = Default::default();
    })?;
    img.session()
        .expect_restore_refused(&old, &["does not record the old vDSO"])?;
    Ok(())
}

/// Sets the modification time of `path`, as a copy that did not keep it would have.
fn set_mtime(path: &Path, t: SystemTime) -> Result<()> {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .context(format!("set the modification time of {}", path.display()))
}

/// The program runs from a copy, which is then given another modification time (a reinstall,
/// a copy to a standby machine): its build-id and size are the same, so `snapshim verify` and
/// the restore accept it, saying so.
#[test]
fn program_with_another_mtime_is_accepted_by_build_id() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?.from_copy())?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let exe = session.program().to_path_buf();
    set_mtime(&exe, SystemTime::now() + Duration::from_secs(3600))?;
    let v = session.verify(img.path())?;
    if !v.status.success() || !v.stdout.contains("the same build-id and size") {
        bail!(
            "snapshim verify does not accept the touched program by build-id\n{}",
            v.report()
        );
    }
    let done = img.restore()?.finish()?;
    done.assert_same_output_as_uninterrupted()?;
    let exe = exe.to_string_lossy();
    if !done
        .stderr
        .lines()
        .any(|l| l.contains("accepted by their build-id") && l.contains(&*exe))
    {
        bail!(
            "the restorer did not say it accepted {exe} by build-id:\n{}",
            done.stderr
        );
    }
    Ok(())
}

/// A program file that really changed is refused, in the same words by the restorer and by
/// `snapshim verify`: another build by its build-id; the same build-id with another size
/// (stripped or patched) with a hint at `--allow-changed-file`, which then restores it with a
/// warning (here the content the program maps is in fact the same: one byte was appended).
#[test]
fn changed_program_is_refused_unless_named() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?.from_copy())?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let exe = session.program().to_path_buf();
    let original = fs::read(&exe).context(format!("read {}", exe.display()))?;

    // Another build: another program's binary in its place.
    let other = AppSpec::named("fpu")?.program;
    fs::copy(&other, &exe).context(format!("copy {} over {}", other.display(), exe.display()))?;
    let msg = session.expect_restore_refused(img.path(), &["(another build)"])?;
    if msg.contains("--allow-changed-file") {
        bail!("another build must not be suggested for the override: {msg}");
    }

    // The same build with a byte appended.
    let mut longer = original.clone();
    longer.push(0);
    fs::write(&exe, &longer).context(format!("write {}", exe.display()))?;
    let msg = session.expect_restore_refused(img.path(), &["--allow-changed-file"])?;
    let v = session.verify(img.path())?;
    let first = msg
        .trim_start_matches("snapshim-restore: ")
        .split("; if its content")
        .next()
        .unwrap_or_default()
        .to_string();
    if v.status.success() || !v.stderr.contains(&first) {
        bail!("snapshim verify does not report {first:?}\n{}", v.report());
    }
    let exe_arg = exe.to_string_lossy().into_owned();
    let done = img
        .restore_with(&["--allow-changed-file", &exe_arg])?
        .finish()?;
    done.assert_same_output_as_uninterrupted()?;
    if !done
        .stderr
        .lines()
        .any(|l| l.contains("WARNING") && l.contains(&exe_arg))
    {
        bail!("no warning for the overridden file:\n{}", done.stderr);
    }
    // Naming a file the image does not map is a mistake, refused.
    session
        .try_restore_with(img.path(), &["--allow-changed-file", "/no/such/file"], &[])
        .and_then(|c| {
            snapshim_testapps::expect_clean_refusal(&c, &["/no/such/file: the image maps no"])
        })?;
    Ok(())
}
