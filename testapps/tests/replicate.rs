//! Image replication between nodes (issue 16): `snapshim replicate serve` receives a service's
//! images into a store, `snapshim replicate push` sends a directory's newest image with the
//! images it depends on that the receiver lacks. Both on loopback here; the benchmark
//! (scripts/bench_replication.py) runs them between network namespaces.
//!
//! - `full_image_and_deltas_replicate_and_restore_byte_identical`: `incr` with incremental
//!   checkpoints: a full image pushed, then two deltas; the store holds the same bytes; a
//!   re-push sends nothing and changes nothing; the program is killed (SIGKILL) and restored
//!   from the store, and finishes as an uninterrupted run.
//! - `a_standby_on_the_store_resumes_from_the_newest_replicated_image`: a warm standby on the
//!   store stages the replicated full image; two deltas pushed while it waits; activated, it
//!   resumes from the newest delta and the program finishes as an uninterrupted run.
//! - `a_wrong_key_is_refused_both_ways`: a sender whose key differs is refused in one line
//!   (the receiver cannot prove the key); a client that cannot prove the key is dropped by the
//!   receiver; nothing is written to the store either way.
//! - `a_corrupted_image_is_refused_and_the_previous_images_stay`: a byte flipped in a delta's
//!   page data on the sender's side: the receiver refuses it naming the checksum, deletes what
//!   it received, and keeps its previous images intact and restorable.
//! - `a_delta_without_its_parent_is_refused`: a delta offered alone to a store without its
//!   parent is refused, naming the parent.
//! - `the_gate_refuses_an_image_of_an_older_generation`: the receiver's gate (here
//!   `--min-generation 2`) refuses a generation-1 image before any data moves.
//! - `serve_on_a_busy_port_says_so_in_one_line`.
//!
//! Needs `cargo build --release --workspace` first. No sleeps: `serve` is waited for by its
//! `listening on ADDR` line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use snapshim_image::Image;
use snapshim_testapps::process::{run_captured, timeout};
use snapshim_testapps::{
    bail, expect_clean_refusal, AppSpec, Captured, Context, Result, Session, Snapshot,
};

const SERVICE: &str = "incr";

/// `incr` with delta images between full ones (never a second full image here).
fn incremental_session() -> Result<Arc<Session>> {
    Session::new(
        AppSpec::named("incr")?
            .env("SNAPSHIM_INCREMENTAL", "on")
            .env("SNAPSHIM_FULL_EVERY", "100")
            .env("SNAPSHIM_FULL_FRACTION", "100")
            .env("SNAPSHIM_KEEP", "10"),
    )
}

/// A running `snapshim replicate serve`, killed when dropped.
struct Serve {
    child: Child,
    addr: String,
    store: PathBuf,
    log: PathBuf,
}

impl Serve {
    /// Starts a receiver on a free loopback port with the key `key`, into `store`.
    fn start(session: &Session, key: &Path, store: &Path) -> Result<Serve> {
        Serve::start_with(session, key, store, &[])
    }

    /// [`Serve::start`] with more options.
    fn start_with(session: &Session, key: &Path, store: &Path, extra: &[&str]) -> Result<Serve> {
        let log = store.with_extension("log");
        let err = std::fs::File::create(&log).context("create the receiver's log")?;
        let mut child = Command::new(session.tools()?.tool)
            .args(["replicate", "serve", "--listen", "127.0.0.1:0", "--key"])
            .arg(key)
            .arg("--store")
            .arg(store)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .context("start snapshim replicate serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("read the receiver's first line")?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "snapshim replicate serve printed {line:?}, not `listening on ADDR`; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Serve {
            addr: addr.to_string(),
            child,
            store: store.to_path_buf(),
            log,
        })
    }

    fn dir(&self) -> PathBuf {
        self.store.join(SERVICE)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new key, `key` in the session directory.
fn new_key(session: &Session) -> Result<PathBuf> {
    let key = session.dir().join("key");
    keygen(session, &key)?;
    Ok(key)
}

fn keygen(session: &Session, path: &Path) -> Result<()> {
    let c = run_captured(
        Command::new(session.tools()?.tool)
            .args(["replicate", "keygen"])
            .arg(path),
        timeout(),
    )?;
    if !c.status.success() {
        bail!("keygen failed\n{}", c.report());
    }
    Ok(())
}

/// `snapshim replicate push` of the session's image directory (`extra` before it).
fn push(session: &Session, serve: &Serve, key: &Path, extra: &[&str]) -> Result<Captured> {
    run_captured(
        Command::new(session.tools()?.tool)
            .args(["replicate", "push", "--to", &serve.addr, "--key"])
            .arg(key)
            .args(["--service", SERVICE])
            .args(extra)
            .arg(session.image_dir()),
        timeout(),
    )
}

fn expect_pushed(c: &Captured) -> Result<()> {
    if !c.status.success() {
        bail!("push failed\n{}", c.report());
    }
    Ok(())
}

/// The file names in a push's `sent ...` lines.
fn sent(c: &Captured) -> Vec<String> {
    c.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("sent "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn name(s: &Snapshot) -> String {
    s.path()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Every file in `dir` (hidden ones too) with its content.
fn contents(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).context(format!("list {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into();
            v.push((
                name,
                std::fs::read(&p).context(format!("read {}", p.display()))?,
            ));
        }
    }
    v.sort();
    Ok(v)
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    files.iter().map(|(n, _)| n.as_str()).collect()
}

/// Each of `images` is in the store, byte for byte.
fn expect_same_bytes(serve: &Serve, images: &[&Snapshot]) -> Result<()> {
    for img in images {
        let there = serve.dir().join(name(img));
        let a = std::fs::read(img.path()).context(format!("read {}", img.path().display()))?;
        let b = std::fs::read(&there).context(format!("read {}", there.display()))?;
        if a != b {
            bail!("{} differs from {}", there.display(), img.path().display());
        }
    }
    Ok(())
}

#[test]
fn full_image_and_deltas_replicate_and_restore_byte_identical() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let serve = Serve::start(&session, &key, &session.dir().join("store"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    let full = app.checkpoint()?;
    let c = push(&session, &serve, &key, &[])?;
    expect_pushed(&c)?;
    if sent(&c) != [name(&full)] {
        bail!(
            "the first push sent {:?}, expected the full image\n{}",
            sent(&c),
            c.report()
        );
    }
    let d1 = app.checkpoint()?;
    let d2 = app.checkpoint()?;
    app.kill()?;
    let c = push(&session, &serve, &key, &[])?;
    expect_pushed(&c)?;
    if sent(&c) != [name(&d1), name(&d2)] {
        bail!(
            "the second push sent {:?}, expected the two deltas, parent first\n{}",
            sent(&c),
            c.report()
        );
    }
    expect_same_bytes(&serve, &[&full, &d1, &d2])?;
    // A push of what the receiver holds is a no-op (and says so in JSON too).
    let before = contents(&serve.dir())?;
    let c = push(&session, &serve, &key, &["--json"])?;
    expect_pushed(&c)?;
    let v: serde_json::Value = serde_json::from_str(&c.stdout).context("parse push --json")?;
    let count = |k: &str| v[k].as_array().map(|a| a.len());
    if (count("sent"), count("already"), count("acknowledged")) != (Some(0), Some(3), Some(3))
        || v["newest"] != name(&d2).as_str()
        || contents(&serve.dir())? != before
    {
        bail!(
            "a second push of the same images was not a no-op\n{}",
            c.report()
        );
    }
    if names(&before).iter().any(|n| n.starts_with('.')) {
        bail!("the store kept temporary files: {:?}", names(&before));
    }
    eprintln!("receiver's log:\n{}", serve.log());
    session
        .restore_from(&serve.dir())?
        .finish()?
        .assert_same_output_as_uninterrupted()
}

/// A warm standby on the receiving store (`snapshim-restore --standby STORE/NAME`) stages the
/// replicated full image, and on activation after two deltas arrived resumes from the newest
/// one, with the output of an uninterrupted run.
#[test]
fn a_standby_on_the_store_resumes_from_the_newest_replicated_image() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let serve = Serve::start(&session, &key, &session.dir().join("store"))?;
    let app = session.spawn()?.wait_ready()?.pause_randomly()?;
    app.checkpoint()?;
    expect_pushed(&push(&session, &serve, &key, &[])?)?;
    let mut sb = session.restore_with(&serve.dir(), &["--standby"])?;
    sb.wait_for("waiting for activation")?;
    app.checkpoint()?;
    let newest = app.checkpoint()?;
    app.kill()?;
    expect_pushed(&push(&session, &serve, &key, &[])?)?;
    let c = run_captured(
        Command::new(session.tools()?.tool)
            .arg("activate")
            .arg(serve.dir()),
        timeout(),
    )?;
    if !c.status.success() {
        bail!("snapshim activate failed\n{}", c.report());
    }
    let used = serve.dir().join(name(&newest));
    if c.stdout.lines().next().map(Path::new) != Some(used.as_path()) {
        bail!(
            "the standby did not resume from {}\n{}",
            used.display(),
            c.report()
        );
    }
    sb.finish()?.assert_same_output_as_uninterrupted()
}

#[test]
fn a_wrong_key_is_refused_both_ways() -> Result<()> {
    let session = incremental_session()?;
    let (key, other) = (session.dir().join("key"), session.dir().join("other"));
    keygen(&session, &key)?;
    keygen(&session, &other)?;
    let serve = Serve::start(&session, &key, &session.dir().join("store"))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    app.checkpoint()?;
    app.kill()?;
    // The sender checks the receiver's proof first: a receiver with another key is refused.
    let c = push(&session, &serve, &other, &[])?;
    let msg = expect_clean_refusal(&c, &["does not hold the same key"])?;
    eprintln!("refused as expected: {msg}");
    // A client that answers the receiver's challenge without the key is dropped after its
    // proof, before it can ask anything.
    let mut s = TcpStream::connect(&serve.addr).context("connect to the receiver")?;
    let mut hello = b"SNAPREPL\x01\x00".to_vec();
    hello.extend_from_slice(&[0x5a; 32]);
    s.write_all(&hello).context("send a hello")?;
    let mut answer = [0u8; 10 + 32 + 32];
    s.read_exact(&mut answer)
        .context("read the receiver's hello")?;
    s.write_all(&[0xa5; 32]).context("send a wrong proof")?;
    // A Hello frame would follow; the receiver closes instead of reading it.
    let _ = s.write_all(&[1, 2, 0, 0, 0, b'{', b'}']);
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    if n != 0 {
        bail!("the receiver answered a client without the key with {n} bytes");
    }
    let log = serve.log();
    if !log.contains("does not hold the same key") {
        bail!("the receiver's log does not say why it dropped the client:\n{log}");
    }
    let stored: Vec<_> = std::fs::read_dir(&serve.store)
        .context("list the store")?
        .collect();
    if !stored.is_empty() {
        bail!("the store is not empty after refused sessions: {stored:?}");
    }
    session.passed();
    Ok(())
}

#[test]
fn a_corrupted_image_is_refused_and_the_previous_images_stay() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let serve = Serve::start(&session, &key, &session.dir().join("store"))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let full = app.checkpoint()?;
    let d1 = app.checkpoint()?;
    expect_pushed(&push(&session, &serve, &key, &[])?)?;
    let d2 = app.checkpoint()?;
    app.kill()?;
    let before = contents(&serve.dir())?;
    // One byte in the middle of the newest delta's page data.
    let img = Image::open(d2.path()).context("open the newest delta")?;
    let at = img.header.data_off + img.header.data_len / 2;
    drop(img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d2.path())
        .context("open the delta to damage it")?;
    let mut b = [0u8];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut b, at).context("read a byte")?;
    f.write_all_at(&[b[0] ^ 0x40], at).context("flip a byte")?;
    let c = push(&session, &serve, &key, &[])?;
    let msg = expect_clean_refusal(&c, &["checksum"])?;
    if !msg.contains(&name(&d2)) {
        bail!("the refusal does not name {}: {msg}", name(&d2));
    }
    eprintln!("refused as expected: {msg}");
    if contents(&serve.dir())? != before {
        bail!(
            "the refused image changed the store: {:?} before, {:?} after",
            names(&before),
            names(&contents(&serve.dir())?)
        );
    }
    expect_same_bytes(&serve, &[&full, &d1])?;
    session.expect_verify_ok(&serve.dir())?;
    session.passed();
    Ok(())
}

#[test]
fn a_delta_without_its_parent_is_refused() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let serve = Serve::start(&session, &key, &session.dir().join("store"))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let full = app.checkpoint()?;
    let delta = app.checkpoint()?;
    app.kill()?;
    let c = push(&session, &serve, &key, &["--only", &name(&delta)])?;
    let msg = expect_clean_refusal(&c, &["accepted only after its parent"])?;
    if !msg.contains(&name(&full)) {
        bail!(
            "the refusal does not name the parent {}: {msg}",
            name(&full)
        );
    }
    eprintln!("refused as expected: {msg}");
    if serve.dir().exists() && !contents(&serve.dir())?.is_empty() {
        bail!(
            "the store holds {:?} after the refusal",
            names(&contents(&serve.dir())?)
        );
    }
    // With its parent, the same delta is taken.
    let c = push(&session, &serve, &key, &[])?;
    expect_pushed(&c)?;
    expect_same_bytes(&serve, &[&full, &delta])?;
    session.passed();
    Ok(())
}

/// The receiver's gate sees each offer before any data moves: one that refuses generations
/// older than 2 (as a standby refuses images older than the leader key's generation) refuses
/// the original run's images, in one line, and nothing is written.
#[test]
fn the_gate_refuses_an_image_of_an_older_generation() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let store = session.dir().join("store");
    let serve = Serve::start_with(&session, &key, &store, &["--min-generation", "2"])?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let c = push(&session, &serve, &key, &[])?;
    let msg = expect_clean_refusal(&c, &["generation 1, older than generation 2"])?;
    if !msg.contains(&name(&img)) {
        bail!("the refusal does not name {}: {msg}", name(&img));
    }
    eprintln!("refused as expected: {msg}");
    if serve.dir().exists() && !contents(&serve.dir())?.is_empty() {
        bail!(
            "the store holds {:?} after the refusal",
            names(&contents(&serve.dir())?)
        );
    }
    session.passed();
    Ok(())
}

#[test]
fn serve_on_a_busy_port_says_so_in_one_line() -> Result<()> {
    let session = incremental_session()?;
    let key = new_key(&session)?;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").context("bind a port")?;
    let addr = busy.local_addr().context("its address")?.to_string();
    let c = run_captured(
        Command::new(session.tools()?.tool)
            .args(["replicate", "serve", "--listen", &addr, "--key"])
            .arg(&key)
            .arg("--store")
            .arg(session.dir().join("store")),
        timeout(),
    )?;
    let msg = expect_clean_refusal(&c, &["address already in use"])?;
    if !msg.contains(&addr) {
        bail!("the refusal does not name {addr}: {msg}");
    }
    session.passed();
    Ok(())
}
