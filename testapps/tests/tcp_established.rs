//! Live TCP connections across a checkpoint, SIGKILL and a restore (`--tcp-established`), only
//! on 127.0.0.1 and ::1. Root is needed (TCP_REPAIR needs CAP_NET_ADMIN).
//!
//! `tcpcount` (`c/tcpcount.c`) serves one client, this test's own, which keeps one connection
//! for the whole run: rounds of [`BATCH`] requests sent at once, then their answers read and
//! each checked byte for byte. At a random round the client stops after sending its batch
//! (requests wait unread on the server's side, answers fill its send queue), the program is
//! checkpointed with `snapshim checkpoint --kill` (the image must hold the connection alive with
//! both queues non-empty), the client reads on and sends one more request while the program is
//! gone, and the image is restored from a copy in another directory:
//!
//! - with `--tcp-established` the client never sees a reset or an end of file, gets every
//!   answer exactly once and in order, and both sides' outputs are those of an uninterrupted
//!   run (the same client, no checkpoint);
//! - without it (the same kind of image), the client's connection is reset, as before.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use snapshim_image::{FdKind, Image, SocketRole};
use snapshim_testapps::artifacts::c_app;
use snapshim_testapps::{
    bail, expect_clean_refusal, needs, AppSpec, Context, Failure, Result, Running, Session,
    Snapshot,
};

/// Requests per round, and rounds; each answer is [`ANSWER`] bytes: 16 MiB a round, more than
/// the client's receive buffer and the server's send buffer hold together.
const BATCH: u64 = 4096;
const ROUNDS: u64 = 8;
const ANSWER: usize = 4096;
/// A bound on every client read, so a broken restore fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// The last line `snapshim-restore --stats` writes, from phase 2, once every descriptor of the
/// program is in place and just before the program resumes.
const RESUMING: &str = "CLOCK_MONOTONIC";

fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The answer `tcpcount` gives to `n`.
fn answer(n: u64) -> Vec<u8> {
    let mut words = vec![mix64(n)];
    for i in 1..(ANSWER / 8) as u64 {
        words.push(mix64(words[i as usize - 1] ^ i));
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Where the client stops: after sending the batch of round `round`, it says so and waits
/// for `go`. Each round then sends one extra request, answered after the batch.
struct Stop {
    round: u64,
    stopped: Sender<()>,
    go: Receiver<()>,
}

/// The client's whole run over one connection; returns what it saw (the same in every run that
/// goes well) or how the connection failed.
fn client(at: Addr, stop: Option<Stop>) -> std::io::Result<String> {
    let mut s = TcpStream::connect(at.ip_port())?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let (mut answers, mut next, mut extra) = (0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        let batch: Vec<u64> = (next..next + BATCH).collect();
        next += BATCH;
        let bytes: Vec<u8> = batch.iter().flat_map(|n| n.to_le_bytes()).collect();
        s.write_all(&bytes)?;
        let mut expect = batch;
        if let Some(st) = stop.as_ref().filter(|st| st.round == round) {
            let _ = st.stopped.send(());
            let _ = st.go.recv();
        }
        // One more request, sent after the stop: while the program is gone, it must not be
        // lost (every round sends one, so every run sends the same).
        extra = u64::MAX - round;
        s.write_all(&extra.to_le_bytes())?;
        expect.push(extra);
        let mut buf = vec![0u8; ANSWER];
        for n in expect {
            s.read_exact(&mut buf)?;
            if buf != answer(n) {
                return Err(std::io::Error::other(format!(
                    "the answer to request {n} is wrong (answer {answers})"
                )));
            }
            answers += 1;
        }
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(format!(
        "{answers} answers as expected, the last extra request {extra}, then end of file after \
         {} more bytes",
        rest.len()
    ))
}

/// The server's address: 127.0.0.1 or ::1, and a port.
#[derive(Clone, Copy)]
struct Addr {
    v6: bool,
    port: u16,
}

impl Addr {
    /// A port the kernel just gave out on the loopback address of that family.
    fn free(v6: bool) -> Result<Addr> {
        let ip = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
        let l = TcpListener::bind(ip).context(format!("bind {ip}"))?;
        let port = l.local_addr().context("port")?.port();
        Ok(Addr { v6, port })
    }

    fn ip_port(self) -> (&'static str, u16) {
        (if self.v6 { "::1" } else { "127.0.0.1" }, self.port)
    }
}

fn tcpcount(at: Addr) -> AppSpec {
    let family = if at.v6 { "6" } else { "4" };
    AppSpec::new(
        "tcpcount",
        c_app("tcpcount"),
        &[family, &at.port.to_string()],
    )
    .env("SNAPSHIM_TCP_ESTABLISHED", "1")
}

fn ipv6_loopback() -> Result<bool> {
    needs::check(
        "the IPv6 loopback address ::1",
        TcpListener::bind("[::1]:0").is_ok(),
    )
}

/// One run without a checkpoint: the client's account and the program's stdout.
fn uninterrupted(at: Addr) -> Result<(String, Vec<u8>)> {
    let session = Session::new(tcpcount(at))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let seen = client(at, None).context("the client of the uninterrupted run")?;
    app.finish()?.assert_exit_code(0)?;
    let out = fs::read(session.stdout_path()).context("read out.txt")?;
    session.passed();
    Ok((seen, out))
}

/// Starts the program and its client, which stops at a random round; returns once it has.
fn start_and_stop_client(
    at: Addr,
) -> Result<(Running, JoinHandle<std::io::Result<String>>, Sender<()>)> {
    let session = Session::new(tcpcount(at))?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let round = 1 + (session.random_unit() * (ROUNDS - 2) as f64) as u64;
    let (stopped, at_stop) = channel();
    let (go, wait_go) = channel();
    let stop = Stop {
        round,
        stopped,
        go: wait_go,
    };
    let handle = std::thread::spawn(move || client(at, Some(stop)));
    if at_stop.recv().is_err() {
        let e = handle
            .join()
            .map_err(|_| Failure::new("the client panicked"))?;
        bail!("the client ended before its stop: {e:?}");
    }
    eprintln!("client stopped after sending round {round}");
    Ok((app, handle, go))
}

/// `snapshim checkpoint --kill`, the program reaped, the image copied elsewhere; the image must
/// hold the connection alive with data queued both ways.
fn last_checkpoint(app: Running) -> Result<Snapshot> {
    let img = app.checkpoint_with(&["--kill"])?;
    app.kill()?;
    let image = Image::open(img.path()).map_err(|e| Failure::new(e.to_string()))?;
    let live = image.meta.fds.iter().find_map(|f| match &f.kind {
        FdKind::Socket(s) => match &s.role {
            SocketRole::Established { repair } => Some(repair.clone()),
            _ => None,
        },
        _ => None,
    });
    let Some(r) = live else {
        bail!("the image holds no connection captured alive");
    };
    eprintln!(
        "captured: {} bytes to send ({} never sent), {} unread",
        r.send_queue.len(),
        r.unsent,
        r.recv_queue.len()
    );
    if r.send_queue.is_empty() || r.recv_queue.is_empty() {
        bail!(
            "the checkpoint found the queues empty ({} to send, {} unread): the server was not \
             in the middle of a round",
            r.send_queue.len(),
            r.recv_queue.len()
        );
    }
    copy_elsewhere(&img)
}

/// A copy of `img` in a directory of its own.
fn copy_elsewhere(img: &Snapshot) -> Result<Snapshot> {
    let name = img.path().file_name().expect("an image has a name");
    let elsewhere = img.session().dir().join("elsewhere");
    fs::create_dir_all(&elsewhere).context(format!("create {}", elsewhere.display()))?;
    let copy = elsewhere.join(name);
    fs::copy(img.path(), &copy).context(format!("copy {}", img.path().display()))?;
    Ok(Snapshot::at(img.session(), copy))
}

/// The connection goes on across `checkpoint --kill` and `--tcp-established`: the client sees
/// no reset, every answer once and in order, and both outputs are an uninterrupted run's.
#[test]
fn a_live_connection_goes_on_across_a_restore() -> Result<()> {
    if !needs::root("TCP_REPAIR, which needs CAP_NET_ADMIN")? {
        return Ok(());
    }
    live_across_a_restore(Addr::free(false)?)
}

/// The same over IPv6 (::1).
#[test]
fn a_live_ipv6_connection_goes_on_across_a_restore() -> Result<()> {
    if !needs::root("TCP_REPAIR, which needs CAP_NET_ADMIN")? || !ipv6_loopback()? {
        return Ok(());
    }
    live_across_a_restore(Addr::free(true)?)
}

fn live_across_a_restore(at: Addr) -> Result<()> {
    let (seen_before, out_before) = uninterrupted(at)?;
    let (app, client, go) = start_and_stop_client(at)?;
    let session = app.session().clone();
    let copy = last_checkpoint(app)?;
    // The client reads on while the program is gone, and sends a request.
    let _ = go.send(());
    let mut restored = copy.restore_with(&["--tcp-established", "--stats"])?;
    restored.wait_for(RESUMING)?;
    let seen = client
        .join()
        .map_err(|_| Failure::new("the client panicked"))?
        .map_err(|e| {
            let ss = std::process::Command::new("ss")
                .args([
                    "-tnoie",
                    "state",
                    "all",
                    &format!("( sport = :{} or dport = :{} )", at.port, at.port),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            Failure::new(format!("the client's connection failed: {e}\n{ss}"))
        })?;
    restored.finish()?.assert_exit_code(0)?;
    if seen != seen_before {
        bail!("the client saw {seen:?}, uninterrupted {seen_before:?}");
    }
    let out = fs::read(session.stdout_path()).context("read out.txt")?;
    if out != out_before {
        bail!(
            "stdout differs from an uninterrupted run: {}",
            snapshim_testapps::diff_summary(&out_before, &out)
        );
    }
    session.passed();
    Ok(())
}

/// The same kind of image restored without `--tcp-established`: the connection comes back
/// reset on both sides, as it did before the option existed.
#[test]
fn without_the_option_the_client_sees_a_reset() -> Result<()> {
    if !needs::root("TCP_REPAIR, which needs CAP_NET_ADMIN")? {
        return Ok(());
    }
    let (app, client, go) = start_and_stop_client(Addr::free(false)?)?;
    let session = app.session().clone();
    let copy = last_checkpoint(app)?;
    let _ = go.send(());
    let mut restored = copy.restore_with(&["--stats"])?;
    restored.wait_for(RESUMING)?;
    let seen = client
        .join()
        .map_err(|_| Failure::new("the client panicked"))?;
    match seen {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => bail!("the client's connection should have been reset: {other:?}"),
    }
    restored.finish()?.assert_exit_code(0)?;
    let out = fs::read_to_string(session.stdout_path()).context("read out.txt")?;
    if !out.contains("connection ended: ECONNRESET") {
        bail!("the restored server did not see its connection reset:\n{out}");
    }
    session.passed();
    Ok(())
}

/// A client connected to `port` whose first request was answered (so the program has accepted
/// the connection).
fn connected_client(at: Addr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(at.ip_port()).context("connect")?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("timeout")?;
    s.write_all(&7u64.to_le_bytes()).context("send a request")?;
    let mut buf = vec![0u8; ANSWER];
    s.read_exact(&mut buf).context("read the answer")?;
    if buf != answer(7) {
        bail!("the first answer is wrong");
    }
    Ok(s)
}

/// The role the image gives its one TCP connection.
fn connection_role(img: &Snapshot) -> Result<SocketRole> {
    let image = Image::open(img.path()).map_err(|e| Failure::new(e.to_string()))?;
    image
        .meta
        .fds
        .iter()
        .find_map(|f| match &f.kind {
            FdKind::Socket(s) if !s.peer.is_empty() => Some(s.role.clone()),
            _ => None,
        })
        .ok_or_else(|| Failure::new("the image holds no connection"))
}

/// Without CAP_NET_ADMIN: the capture says once on stderr that connections are captured reset
/// (and they are), and a restore with `--tcp-established` of an image holding a live connection
/// is refused in one line before anything changes (root without CAP_NET_ADMIN: `setpriv`).
#[test]
fn without_privilege_each_side_says_so_in_one_line() -> Result<()> {
    if !needs::root("a live connection captured as root, then nobody's capture")?
        || !needs::program("/usr/bin/setpriv", "util-linux")?
    {
        return Ok(());
    }
    // nobody's program: captured as reset, with one line, once.
    let at = Addr::free(false)?;
    let nobody = Session::new(tcpcount(at).unprivileged())?;
    let app = nobody.spawn_without_reference()?.wait_ready()?;
    let held = connected_client(at)?;
    let img = app.checkpoint()?;
    let _ = app.checkpoint()?;
    let role = connection_role(&img)?;
    if role != SocketRole::Reset {
        bail!("without privilege the connection was captured as {role:?}");
    }
    let said = app.stderr_so_far();
    let lines: Vec<&str> = said.lines().filter(|l| l.contains("TCP_REPAIR")).collect();
    if lines.len() != 1 || !lines[0].contains("CAP_NET_ADMIN") {
        bail!("the program's stderr should say once why connections are captured reset:\n{said}");
    }
    drop((app, held));
    nobody.passed();

    // Captured alive as root; restored with --tcp-established without CAP_NET_ADMIN: refused.
    let at = Addr::free(false)?;
    let root = Session::new(tcpcount(at))?;
    let app = root.spawn_without_reference()?.wait_ready()?;
    let held = connected_client(at)?;
    let live = app.checkpoint()?;
    if !matches!(connection_role(&live)?, SocketRole::Established { .. }) {
        bail!("as root the connection was not captured alive");
    }
    let copy = copy_elsewhere(&live)?;
    let without = [
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    ];
    let c = root.try_restore_with(copy.path(), &["--tcp-established"], &without)?;
    let msg = expect_clean_refusal(&c, &["CAP_NET_ADMIN"])?;
    eprintln!("refused as expected: {msg}");
    // Nothing changed: the program and its client go on.
    let mut held = held;
    held.write_all(&8u64.to_le_bytes())
        .context("send a request")?;
    let mut buf = vec![0u8; ANSWER];
    held.read_exact(&mut buf).context("read the answer")?;
    if buf != answer(8) {
        bail!("after the refusal the program answered wrong");
    }
    drop((app, held));
    root.passed();
    Ok(())
}
