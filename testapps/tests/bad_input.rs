//! Bad input: damaged images and a failing environment. Each must be refused with one clear
//! line on stderr and a non-zero exit status, nothing may crash, and the good image must still
//! restore to the right output afterwards.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use snapshim_image::{encode_metadata, Header, Image, Metadata, PAGE_SIZE};
use snapshim_testapps::{
    bail, expect_clean_refusal, App, AppSpec, Context, Failure, Result, Session, Snapshot,
};

/// Byte offsets in the image header (layout: image/src/lib.rs). The major version is the u16
/// at 16; the image id at 24 is covered by the header checksum and checked by nothing else.
const HEADER_MAJOR: usize = 16;
const HEADER_IMAGE_ID: usize = 24;

fn checkpointed_and_killed(name: &str) -> Result<Snapshot> {
    let app = App::spawn(name)?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    Ok(img)
}

fn still_restores(img: &Snapshot) -> Result<()> {
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
        .map_err(|e| Failure::new(format!("the undamaged image no longer restores: {e}")))
}

/// A file offset in the middle of the largest run of stored pages.
fn middle_of_page_data(image: &Path) -> Result<usize> {
    let img = snapshim_image::Image::open(image)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", image.display())))?;
    let run = img
        .meta
        .runs
        .iter()
        .max_by_key(|r| r.pages)
        .ok_or_else(|| Failure::new(format!("{} stores no pages", image.display())))?;
    Ok((run.file_off + run.len() / 2) as usize)
}

#[test]
fn truncated_image_is_refused() -> Result<()> {
    let img = checkpointed_and_killed("single")?;
    let s = img.session();
    let bad = s.damaged_copy(img.path(), "truncated", |b| b.truncate(b.len() / 2))?;
    s.expect_restore_refused(&bad, &["truncat", "short", "incomplete"])?;
    s.expect_verify_fails(&bad)?;
    still_restores(&img)
}

#[test]
fn flipped_byte_in_page_data_is_refused() -> Result<()> {
    let img = checkpointed_and_killed("single")?;
    let s = img.session();
    s.expect_verify_ok(img.path())?;
    let at = middle_of_page_data(img.path())?;
    let bad = s.damaged_copy(img.path(), "page-data-flip", |b| b[at] ^= 0xff)?;
    s.expect_restore_refused(&bad, &["corrupt", "checksum", "crc"])?;
    s.expect_verify_fails(&bad)?;
    still_restores(&img)
}

#[test]
fn flipped_byte_in_header_is_refused() -> Result<()> {
    let img = checkpointed_and_killed("single")?;
    let s = img.session();
    let bad = s.damaged_copy(img.path(), "header-flip", |b| b[HEADER_IMAGE_ID] ^= 0x5a)?;
    s.expect_restore_refused(&bad, &["corrupt", "checksum", "crc", "header"])?;
    s.expect_verify_fails(&bad)?;
    still_restores(&img)
}

#[test]
fn unknown_format_version_is_refused_and_named() -> Result<()> {
    let img = checkpointed_and_killed("single")?;
    let s = img.session();
    let bad = s.damaged_copy(img.path(), "version-99", |b| {
        b[HEADER_MAJOR..HEADER_MAJOR + 2].copy_from_slice(&99u16.to_le_bytes())
    })?;
    let msg = s.expect_restore_refused(&bad, &["version"])?;
    if !msg.contains("99") {
        bail!("the message should name the image's version 99: {msg:?}");
    }
    s.expect_verify_fails(&bad)?;
    still_restores(&img)
}

/// Damage a writer could do: the header changed by `change` and, with `meta`, the metadata
/// replaced; both checksums recomputed, so they pass.
fn resealed(
    mut h: Header,
    meta: Option<Vec<u8>>,
    change: fn(&mut Header),
) -> impl FnOnce(&mut Vec<u8>) {
    move |b| {
        if let Some(meta) = meta {
            b.truncate(h.meta_off as usize);
            b.extend_from_slice(&meta);
            h.meta_len = meta.len() as u64;
            h.meta_crc = crc32fast::hash(&meta);
        }
        change(&mut h);
        b[..PAGE_SIZE as usize].copy_from_slice(&h.encode());
    }
}

/// Every kind of damage, on one real image: `snapshim-restore` refuses it with one line and a
/// non-zero exit status, without crashing, and `snapshim verify` says the same words.
#[test]
fn each_kind_of_damage_is_refused_in_the_same_words() -> Result<()> {
    let img = checkpointed_and_killed("single")?;
    let s = img.session();
    let image = Image::open(img.path()).context("open the image")?;
    let (h, meta) = (image.header.clone(), image.meta.clone());
    let without_threads = Metadata {
        threads: vec![],
        ..meta.clone()
    };
    let mut run_nowhere = meta.clone();
    run_nowhere.runs[0].addr = u64::MAX - PAGE_SIZE + 1;
    let in_data = middle_of_page_data(img.path())?;
    let meta_off = h.meta_off as usize;
    type Damage = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, &str, Damage)> = vec![
        ("empty", "the header needs", Box::new(|b| b.clear())),
        (
            "cut-header",
            "the header needs",
            Box::new(|b| b.truncate(100)),
        ),
        (
            "cut-data",
            "the page data needs",
            Box::new(move |b| b.truncate(in_data)),
        ),
        (
            "cut-meta",
            "the metadata needs",
            Box::new(|b| b.truncate(b.len() - 1)),
        ),
        (
            "magic",
            "not a snapshim image",
            Box::new(|b| b[..4].copy_from_slice(b"\x7fELF")),
        ),
        (
            "arch",
            "taken on aarch64",
            Box::new(|b| b[8..16].copy_from_slice(b"aarch64\0")),
        ),
        (
            "version",
            "is newer than this build reads",
            Box::new(|b| b[HEADER_MAJOR] = 9),
        ),
        (
            "header-crc",
            "header is corrupted",
            Box::new(|b| b[HEADER_IMAGE_ID] ^= 1),
        ),
        (
            "layout",
            "header is inconsistent",
            Box::new(resealed(h.clone(), None, |h| h.data_off = 100)),
        ),
        (
            "meta-crc",
            "metadata is corrupted",
            Box::new(move |b| b[meta_off + 1] ^= 1),
        ),
        (
            "undecodable",
            "does not decode",
            Box::new(resealed(h.clone(), Some(vec![0xff; 64]), |_| ())),
        ),
        (
            "no-threads",
            "no threads to resume",
            Box::new(resealed(
                h.clone(),
                Some(encode_metadata(&without_threads).0),
                |_| (),
            )),
        ),
        (
            "run-nowhere",
            "not inside one region",
            Box::new(resealed(
                h.clone(),
                Some(encode_metadata(&run_nowhere).0),
                |_| (),
            )),
        ),
        (
            "run-crc",
            "fails its checksum",
            Box::new(move |b| b[in_data] ^= 0xff),
        ),
    ];
    for (label, mention, damage) in cases {
        let bad = s.damaged_copy(img.path(), label, damage)?;
        let refused = s.expect_restore_refused(&bad, &[mention])?;
        let verified = s.verify(&bad)?;
        let said = expect_clean_refusal(&verified, &[mention])
            .map_err(|e| Failure::new(format!("snapshim verify {}: {e}", bad.display())))?;
        let (r, v) = (
            refused.strip_prefix("snapshim-restore: "),
            said.strip_prefix("snapshim: "),
        );
        if r.is_none() || r != v {
            bail!("{label}: the restorer and verify disagree:\n  {refused}\n  {said}");
        }
    }
    still_restores(&img)
}

/// The program runs from a copy; the copy is taken away before the restore, which must refuse
/// and name the missing file, then succeed once it is back.
#[test]
fn missing_program_file_is_refused_and_named() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?.from_copy())?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let exe = session.program().to_path_buf();
    let away = exe.with_extension("moved-away");
    fs::rename(&exe, &away).context(format!("move {} away", exe.display()))?;
    let refused = session.expect_restore_refused(img.path(), &[&exe.to_string_lossy()]);
    fs::rename(&away, &exe).context(format!("put {} back", exe.display()))?;
    refused?;
    still_restores(&img)
}

/// Names, sizes and link targets in a directory.
fn listing(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).context(format!("list {}", dir.display()))? {
        let p = e.context("list")?.path();
        let m = fs::symlink_metadata(&p).context(format!("stat {}", p.display()))?;
        let link = fs::read_link(&p)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        v.push(format!("{} {} {link}", p.display(), m.len()));
    }
    v.sort();
    Ok(v)
}

/// A checkpoint into a directory the app may not write fails with one line and a non-zero exit
/// status; the app keeps running to the right output, and the image taken before is untouched
/// and still restores. Root ignores permissions: as root, the app and tools run as nobody.
#[test]
fn unwritable_image_directory_fails_the_checkpoint_not_the_app() -> Result<()> {
    // Longer than the default run, so the app surely outlives two checkpoints.
    let session = Session::new(AppSpec::named("single")?.arg("150").unprivileged())?;
    let mut app = session.spawn()?.wait_ready()?;
    let first = app.checkpoint()?;
    let image_dir = session.image_dir();
    let before = (
        listing(&image_dir)?,
        fs::read(first.path()).context("read the image")?,
    );

    fs::set_permissions(&image_dir, fs::Permissions::from_mode(0o500)).context("chmod 0500")?;
    let attempt = app.try_checkpoint();
    let running = app.is_running();
    fs::set_permissions(&image_dir, fs::Permissions::from_mode(0o700)).context("chmod 0700")?;
    let (attempt, running) = (attempt?, running?);

    if !running {
        bail!(
            "the app is gone after the failed checkpoint (it must keep running)\n{}",
            attempt.report()
        );
    }
    let why = [
        "permission",
        "denied",
        "read-only",
        "not writable",
        "unwritable",
    ];
    let msg = expect_clean_refusal(&attempt, &why).map_err(|e| {
        Failure::new(format!(
            "snapshim checkpoint into a read-only directory: {e}"
        ))
    })?;
    eprintln!("checkpoint refused as expected: {msg}");
    if (
        listing(&image_dir)?,
        fs::read(first.path()).context("read the image")?,
    ) != before
    {
        bail!("the failed checkpoint changed the image directory or the previous image");
    }
    app.finish()?
        .assert_same_output_as_uninterrupted()
        .map_err(|e| Failure::new(format!("the app after the failed checkpoint: {e}")))?;
    still_restores(&first)
}
