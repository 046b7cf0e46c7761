//! Deleted-but-open files survive checkpoint → kill -9 → restore: the `deleted` app
//! (c/deleted.c) keeps a file opened three times and dup'ed, then unlinked, an `O_TMPFILE` file,
//! a sealed memfd and a deleted file mapped `MAP_SHARED`, and uses them all through its run.
//! The restored run must print exactly what an uninterrupted one does (contents, offsets,
//! open flags, the memfd's name and seals), and sqlite3 with its temporary database in a
//! deleted file must finish its queries with the same output.
//!
//! Needs `cargo build --release --workspace` first.

use std::path::Path;

use snapshim_image::{FdKind, Image, FLAG_DELTA};
use snapshim_testapps::{bail, needs, App, AppSpec, Failure, Result, Session};

/// The deleted files of the image at `path`: (plain files holding content, memfds, those
/// sharing another's content).
fn deleted_files(path: &Path) -> Result<(usize, usize, usize)> {
    let img = Image::open(path).map_err(|e| Failure::new(e.to_string()))?;
    let mut n = (0, 0, 0);
    for f in &img.meta.fds {
        if let FdKind::DeletedFile(d) = &f.kind {
            match (&d.memfd, d.same_as) {
                (_, Some(_)) => n.2 += 1,
                (Some(_), None) => n.1 += 1,
                (None, None) => n.0 += 1,
            }
        }
    }
    Ok(n)
}

/// At a random moment: the image holds the log, the tmpfile and the memfd with their content,
/// the log's other two opens as sharing it (its dup is a duplicate), and the restored run ends
/// as an uninterrupted one.
#[test]
fn deleted_files_and_memfd_restore_with_their_content() -> Result<()> {
    let app = App::spawn("deleted")?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let found = deleted_files(img.path())?;
    if found != (2, 1, 2) {
        bail!("the image holds (files, memfds, shared) = {found:?} deleted files, not (2, 1, 2)");
    }
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// Under the fork engine (the content is read during the pause either way). Without the shared
/// mapping: the fork engine's child sees `MAP_SHARED` memory live, not as it was at the
/// snapshot (docs/limits.md).
#[test]
fn deleted_files_restore_under_the_fork_engine() -> Result<()> {
    let spec = AppSpec::named("deleted")?
        .arg("480")
        .arg("private")
        .env("SNAPSHIM_COW", "fork");
    Session::new(spec)?.restores_from_a_random_moment()
}

/// What the restorer re-created (unlinked files, a memfd) is captured again by the restored
/// program's next checkpoint.
#[test]
fn deleted_files_survive_two_cycles() -> Result<()> {
    App::spawn("deleted")?
        .wait_ready()?
        .two_cycles()?
        .assert_same_output_as_uninterrupted()
}

/// A delta image (incremental checkpoints) holds the deleted files whole too: restored from a
/// chain of a full image and a delta. Without the shared mapping, as under the fork engine
/// (incremental checkpoints use fork or stop).
#[test]
fn deleted_files_restore_from_a_delta_image() -> Result<()> {
    let spec = AppSpec::named("deleted")?
        .arg("480")
        .arg("private")
        .env("SNAPSHIM_INCREMENTAL", "on")
        .env("SNAPSHIM_FULL_EVERY", "100")
        .env("SNAPSHIM_FULL_FRACTION", "100");
    let app = Session::new(spec)?.spawn()?.wait_ready()?;
    let full = app.checkpoint()?;
    let delta = app.checkpoint()?;
    app.kill()?;
    for (img, want_delta) in [(&full, false), (&delta, true)] {
        let image = Image::open(img.path()).map_err(|e| Failure::new(e.to_string()))?;
        if (image.header.flags & FLAG_DELTA != 0) != want_delta {
            bail!("{} is not the kind of image expected", img.path().display());
        }
    }
    let found = deleted_files(delta.path())?;
    if found != (2, 1, 2) {
        bail!("the delta holds (files, memfds, shared) = {found:?} deleted files, not (2, 1, 2)");
    }
    delta
        .restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// The directory the files were deleted from is gone at the restore (as on another machine):
/// they are re-created in the image's directory instead.
#[test]
fn deleted_files_restore_when_their_directory_is_gone() -> Result<()> {
    let session = Session::new(AppSpec::named("deleted")?.arg("480").arg("sub"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let sub = session.dir().join("sub");
    std::fs::remove_dir_all(&sub)
        .map_err(|e| Failure::new(format!("remove {}: {e}", sub.display())))?;
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// A deleted file larger than an image keeps (64 MiB) is refused at the restore in one line
/// naming it, and with `--unrestorable=closed` the program goes on without it.
#[test]
fn deleted_file_too_large_is_refused_in_one_line() -> Result<()> {
    let session = Session::new(AppSpec::named("deleted")?.arg("480").arg("big"))?;
    let app = session.spawn()?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let line = session.expect_restore_refused(img.path(), &["deleted-big (deleted)", "64 MiB"])?;
    if !line.contains("--unrestorable=closed") {
        bail!("the refusal does not give the way on: {line:?}");
    }
    img.restore_with(&["--unrestorable=closed"])?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

const SQLITE3: &str = "/usr/bin/sqlite3";

/// sqlite3 keeping a 12 MB temporary table in a temporary file it unlinked at once
/// (`temp_store=FILE`, a small cache so it spills, `SQLITE_TMPDIR` the working directory):
/// READY once the table is filled, then sorts, an update and an index over it.
fn sqlite_spec() -> AppSpec {
    let statements = [
        "PRAGMA temp_store=FILE;",
        "PRAGMA temp.cache_size=64;",
        "CREATE TEMP TABLE t(k INTEGER, v TEXT);",
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<150000) \
         INSERT INTO t SELECT (i*7919)%150001, printf('%016x%016x%016x%016x', \
         i*2654435761%4294967291, i*40503%65521, i*i%1000003, i*97%8191) FROM c;",
        ".output /dev/stderr",
        ".print READY",
        ".output",
        "SELECT count(*), sum(k), min(v), max(v) FROM t;",
        "SELECT k, v FROM t ORDER BY substr(v,9), k LIMIT 3 OFFSET 70000;",
        "UPDATE t SET v = substr(v,17) || substr(v,1,16) WHERE k % 3 = 0;",
        "SELECT k, v FROM t ORDER BY v DESC, k LIMIT 3 OFFSET 1000;",
        ".output /dev/stderr",
        ".print PHASE 2",
        ".output",
        "CREATE INDEX temp.tv ON t(substr(v,5,20));",
        "SELECT count(DISTINCT substr(v,1,3)), total(k) FROM t;",
        "SELECT k, v FROM t ORDER BY substr(v,5,20), k LIMIT 3 OFFSET 120000;",
        "SELECT k % 97 AS g, count(*), sum(length(v)) FROM t GROUP BY g ORDER BY 3 DESC, 1 \
         LIMIT 4;",
        ".print PASS",
    ];
    let mut args = vec![":memory:"];
    args.extend(statements);
    AppSpec::new("sqlite-temp", SQLITE3.into(), &args).env("SQLITE_TMPDIR", ".")
}

/// sqlite3 checkpointed while it sorts and updates its temporary table: the image holds the
/// temporary file's content, and the restored sqlite3 prints the same results.
#[test]
fn sqlite_with_a_temporary_file_restores() -> Result<()> {
    if !needs::program(SQLITE3, "sqlite3")? {
        return Ok(());
    }
    let app = Session::new(sqlite_spec())?
        .spawn()?
        .wait_ready()?
        .pause_randomly()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let found = deleted_files(img.path())?;
    if found.0 == 0 {
        bail!("the image of sqlite3 holds no deleted file: {found:?}");
    }
    img.restore()?
        .finish()?
        .assert_same_output_as_uninterrupted()
}
