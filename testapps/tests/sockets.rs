//! Sockets across a checkpoint, SIGKILL and a restore from a copy of the image in another
//! directory (only 127.0.0.1 and ::1):
//!
//! - `sockserv` (`c/sockserv.c`: TCP and UDP over IPv4 and IPv6, Unix listeners by path and
//!   abstract name, Unix datagram sockets bound and unbound, socket pairs with data queued in
//!   each direction, a datagram socket connected outside, a netlink socket) answers the same
//!   clients the same way after the restore, on the same ports; a client connected at the
//!   checkpoint sees end of file or a reset and reconnects; the program checks every socket's
//!   address, options and queued data itself, and its stdout is byte for byte that of an
//!   uninterrupted run driven by the same client;
//! - a port taken by someone else in between makes the restore fail with one line naming the
//!   port, and the port's owner keeps it; once it is free the same image restores;
//! - `python3 -m http.server` serves the same file on the same port after a restore;
//! - a descriptor in flight in a Unix socket pair is left to the program by the checkpoint and
//!   makes the restore fail in one line naming the socket;
//! - a UDP client's port taken meanwhile is replaced, with one warning;
//! - socket pairs with large queues (many stream pieces, datagrams of many sizes) keep them.
//!
//! Needs `cargo build --release --workspace` first.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapshim_testapps::artifacts::c_app;
use snapshim_testapps::{
    bail, expect_clean_refusal, needs, AppSpec, Context, Failure, Result, Running, Session,
    Snapshot, PYTHON,
};

/// A bound on every client read, so a broken server fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The last line `snapshim-restore --stats` writes, from phase 2, once every descriptor of the
/// program is in place (its listening sockets included) and just before the program resumes.
const RESUMING: &str = "CLOCK_MONOTONIC";

#[derive(Clone, Copy)]
struct Ports {
    tcp4: u16,
    tcp6: u16,
    udp4: u16,
    udp6: u16,
}

/// Four ports the kernel just gave out (held together, so they are distinct, then released).
fn free_ports() -> Result<Ports> {
    let t4 = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let t6 = TcpListener::bind("[::1]:0").context("bind [::1]:0")?;
    let u4 = UdpSocket::bind("127.0.0.1:0").context("bind udp 127.0.0.1:0")?;
    let u6 = UdpSocket::bind("[::1]:0").context("bind udp [::1]:0")?;
    let port = |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.port()).context("port");
    Ok(Ports {
        tcp4: port(t4.local_addr())?,
        tcp6: port(t6.local_addr())?,
        udp4: port(u4.local_addr())?,
        udp6: port(u6.local_addr())?,
    })
}

fn ipv6_loopback() -> Result<bool> {
    needs::check(
        "the IPv6 loopback address ::1",
        TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok(),
    )
}

/// The outside end of `sockserv`'s connected datagram socket, in a directory of its own.
struct Outside {
    dir: PathBuf,
    socket: UnixDatagram,
}

impl Outside {
    fn new(tag: &str) -> Result<Outside> {
        let dir =
            std::env::temp_dir().join(format!("snapshim-outside-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).context(format!("create {}", dir.display()))?;
        let socket = UnixDatagram::bind(dir.join("outside.sock")).context("bind outside.sock")?;
        // Reachable by an app running as nobody.
        for path in [dir.clone(), dir.join("outside.sock")] {
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .context(format!("chmod {}", path.display()))?;
        }
        socket
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .context("timeout")?;
        Ok(Outside { dir, socket })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("outside.sock")
    }

    /// The one datagram `sockserv` sends at its end.
    fn expect_hello(&self) -> Result<()> {
        let mut buf = [0u8; 64];
        let n = self
            .socket
            .recv(&mut buf)
            .context("receive on outside.sock")?;
        if &buf[..n] != b"hello outside" {
            bail!(
                "outside.sock received {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        Ok(())
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sockserv(p: Ports, outside: &Path) -> AppSpec {
    AppSpec {
        name: "sockserv".into(),
        program: c_app("sockserv"),
        args: [p.tcp4, p.tcp6, p.udp4, p.udp6]
            .iter()
            .map(|n| n.to_string())
            .chain([outside.to_string_lossy().into_owned()])
            .collect(),
        output_files: Vec::new(),
        setup: None,
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    }
}

/// Where a request goes.
enum Via<'a> {
    Tcp4,
    Tcp6,
    Udp4,
    Udp6,
    Unix(&'a Path),
    Abstract,
}

/// Sends `word` and returns the answer line (a fresh connection per request).
fn ask(p: Ports, via: Via, word: &str) -> Result<String> {
    let udp = |bind: &str, to: (&str, u16)| -> Result<String> {
        let s = UdpSocket::bind(bind).context("bind a client")?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .context("timeout")?;
        s.send_to(word.as_bytes(), to).context("send a datagram")?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).context("receive the answer datagram")?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    };
    match via {
        Via::Tcp4 => line_exchange(
            TcpStream::connect(("127.0.0.1", p.tcp4)).context("connect tcp4")?,
            word,
        ),
        Via::Tcp6 => line_exchange(
            TcpStream::connect(("::1", p.tcp6)).context("connect tcp6")?,
            word,
        ),
        Via::Udp4 => udp("127.0.0.1:0", ("127.0.0.1", p.udp4)),
        Via::Udp6 => udp("[::1]:0", ("::1", p.udp6)),
        Via::Unix(path) => {
            line_exchange(UnixStream::connect(path).context("connect srv.sock")?, word)
        }
        Via::Abstract => {
            let name = format!("sockserv-{}", p.tcp4);
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).context("abstract name")?;
            line_exchange(
                UnixStream::connect_addr(&addr).context("connect abstract")?,
                word,
            )
        }
    }
}

/// Writes `word` and a newline, reads one line back (empty at end of file).
fn line_exchange<S: Read + Write>(mut s: S, word: &str) -> Result<String> {
    s.write_all(format!("{word}\n").as_bytes())
        .context("send a request")?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("read the answer")?;
    Ok(line.trim_end().to_string())
}

/// One request through every kind of listener; the answers.
fn ask_everyone(p: Ports, dir: &Path) -> Result<Vec<String>> {
    let srv = dir.join("srv.sock");
    let mut answers = Vec::new();
    for (via, word) in [
        (Via::Tcp4, "alpha"),
        (Via::Tcp6, "bravo"),
        (Via::Udp4, "charlie"),
        (Via::Udp6, "delta"),
        (Via::Unix(&srv), "echo"),
        (Via::Abstract, "foxtrot"),
    ] {
        answers.push(ask(p, via, word)?);
    }
    Ok(answers)
}

/// Checkpoints `app`, kills it, and restores it from a copy of the image in another
/// directory; returns once the restored program is about to resume (its sockets are ready).
fn checkpoint_kill_restore(app: Running) -> Result<(Running, Snapshot)> {
    let session = app.session().clone();
    let img = app.checkpoint()?;
    app.kill()?;
    let copy = copy_elsewhere(&img)?;
    let mut restored = session.restore_with(copy.path(), &["--stats"])?;
    restored.wait_for(RESUMING)?;
    Ok((restored, copy))
}

/// A copy of `img` in a directory of its own (a restored program writes its images into the
/// directory it was restored from, so each copy gets a new one).
fn copy_elsewhere(img: &Snapshot) -> Result<Snapshot> {
    let name = img.path().file_name().expect("an image has a name");
    let elsewhere = img
        .session()
        .dir()
        .join(format!("elsewhere-{}", name.to_string_lossy()));
    fs::create_dir_all(&elsewhere).context(format!("create {}", elsewhere.display()))?;
    let copy = elsewhere.join(name);
    fs::copy(img.path(), &copy).context(format!("copy {}", img.path().display()))?;
    Ok(Snapshot::at(img.session(), copy))
}

/// The whole client script against `sockserv`, with `cycles` (0 to 2) checkpoints, each
/// followed by SIGKILL and a restore, between its rounds of requests; returns the program's
/// stdout.
fn serve_clients(p: Ports, outside: &Outside, cycles: u32) -> Result<Vec<u8>> {
    let cycle = cycles > 0;
    let session = Session::new(sockserv(p, &outside.path()))?;
    let app = if cycle {
        session.spawn_without_reference()?
    } else {
        session.spawn_without_shim()?
    };
    let app = app.wait_ready()?;
    let before = ask_everyone(p, session.dir())?;
    let mut held = TcpStream::connect(("::1", p.tcp6)).context("connect the held client")?;
    held.set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("timeout")?;
    let golf = line_exchange(&mut held, "golf")?;
    if golf != "tcp6 flog" {
        bail!("the held client got {golf:?}");
    }
    let app = if cycle {
        checkpoint_kill_restore(app)?.0
    } else {
        app
    };
    // The held connection: after a restore it ends (end of file or a reset), and the client
    // reconnects; without one it goes on.
    let hotel = line_exchange(&mut held, "hotel").unwrap_or_default();
    match (cycle, hotel.as_str()) {
        (false, "tcp6 letoh") | (true, "") => {}
        _ => bail!("the client held across the checkpoint got {hotel:?} (restored: {cycle})"),
    }
    if cycle && ask(p, Via::Tcp6, "hotel")? != "tcp6 letoh" {
        bail!("the client could not reconnect");
    }
    let after = ask_everyone(p, session.dir())?;
    if after != before {
        bail!("answers before {before:?}, after {after:?}");
    }
    let app = if cycles == 2 {
        checkpoint_kill_restore(app)?.0
    } else {
        app
    };
    let again = ask_everyone(p, session.dir())?;
    if again != before {
        bail!("answers before {before:?}, after a second restore {again:?}");
    }
    let bye = ask(p, Via::Tcp4, "QUIT")?;
    let fin = app.finish()?;
    fin.assert_exit_code(0)?;
    if bye != "bye" {
        bail!("QUIT answered {bye:?}");
    }
    outside.expect_hello()?;
    let out = fs::read(session.stdout_path()).context("read out.txt")?;
    if !out.ends_with(b"every socket checked\nPASS\n") {
        bail!("sockserv did not pass:\n{}", String::from_utf8_lossy(&out));
    }
    session.passed();
    Ok(out)
}

/// Every kind of socket comes back, over two checkpoint/restore cycles: the same ports and
/// names answer the same, the queued data and options are there, a client held across the
/// first checkpoint is dropped and reconnects, and stdout is byte for byte an uninterrupted
/// run's.
#[test]
fn servers_answer_on_the_same_ports_after_a_restore() -> Result<()> {
    if !ipv6_loopback()? {
        return Ok(());
    }
    let p = free_ports()?;
    let outside = Outside::new("serve")?;
    let uninterrupted = serve_clients(p, &outside, 0)?;
    let restored = serve_clients(p, &outside, 2)?;
    if restored != uninterrupted {
        bail!(
            "stdout differs from an uninterrupted run: {}",
            snapshim_testapps::diff_summary(&uninterrupted, &restored)
        );
    }
    Ok(())
}

/// A port taken by another program between the checkpoint and the restore: one line naming
/// the port, a non-zero exit, and the other program keeps its port and its clients. Once the
/// port is free again the same image restores.
#[test]
fn a_busy_port_is_refused_in_one_line() -> Result<()> {
    busy_port(false)
}

/// The same as nobody, whose restore runs in a user namespace of its own.
#[test]
fn a_busy_port_is_refused_in_one_line_as_nobody() -> Result<()> {
    busy_port(true)
}

fn busy_port(unprivileged: bool) -> Result<()> {
    if !ipv6_loopback()? {
        return Ok(());
    }
    let p = free_ports()?;
    let outside = Outside::new(if unprivileged { "busy-nobody" } else { "busy" })?;
    let mut spec = sockserv(p, &outside.path());
    if unprivileged {
        spec = spec.unprivileged();
    }
    let session = Session::new(spec)?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let img = app.checkpoint()?;
    app.kill()?;
    let squatter = TcpListener::bind(("127.0.0.1", p.tcp4)).context("take the port")?;
    let refused = session.try_restore(img.path())?;
    let msg = expect_clean_refusal(&refused, &[&format!("port {}", p.tcp4)])?;
    eprintln!("refused: {msg}");
    let mut client =
        TcpStream::connect(("127.0.0.1", p.tcp4)).context("connect to the squatter")?;
    let (mut served, _) = squatter.accept().context("the squatter accepts")?;
    client.write_all(b"still mine").context("write")?;
    let mut got = [0u8; 10];
    served.read_exact(&mut got).context("read")?;
    if &got != b"still mine" {
        bail!("the port's owner read {got:?}");
    }
    drop((client, served, squatter));
    let mut restored = session.restore_with(img.path(), &["--stats"])?;
    restored.wait_for(RESUMING)?;
    if ask(p, Via::Tcp4, "QUIT")? != "bye" {
        bail!("the restored server did not answer");
    }
    restored.finish()?.assert_exit_code(0)?;
    outside.expect_hello()?;
    session.passed();
    Ok(())
}

/// `python3 -m http.server` in the session directory, on a free port, checkpointed with a client connected that has not
/// sent its request yet: after SIGKILL and a restore, that client's connection ends, and new
/// clients get the same file from the same port.
#[test]
fn python_http_server_serves_the_same_file_after_a_restore() -> Result<()> {
    if !needs::check(PYTHON, Path::new(PYTHON).exists())? {
        return Ok(());
    }
    let port = free_ports()?.tcp4;
    let spec = AppSpec {
        name: "http-server".into(),
        // Its "Serving HTTP on ..." line goes to stdout: sent to stderr, where the harness
        // waits for it.
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!("exec {PYTHON} -u -m http.server --bind 127.0.0.1 {port} 1>&2"),
        ],
        output_files: Vec::new(),
        setup: Some(|dir: &Path| fs::write(dir.join("page.txt"), "the same page\n".repeat(1000))),
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    };
    let session = Session::new(spec)?;
    let mut app = session.spawn_without_reference()?;
    app.wait_for(&format!("(http://127.0.0.1:{port}/) ..."))?;
    let page = http_get(port, "/page.txt")?;
    if page != "the same page\n".repeat(1000) {
        bail!("the server did not serve page.txt: {} bytes", page.len());
    }
    let mut held = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    held.set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("timeout")?;
    let (restored, _img) = checkpoint_kill_restore(app)?;
    let _ = held.write_all(b"GET /page.txt HTTP/1.0\r\n\r\n");
    let mut rest = Vec::new();
    if held.read_to_end(&mut rest).is_ok() && !rest.is_empty() {
        bail!(
            "the client held across the checkpoint got an answer: {} bytes",
            rest.len()
        );
    }
    let again = http_get(port, "/page.txt")?;
    if again != page {
        bail!("the page served after the restore differs");
    }
    drop(restored);
    session.passed();
    Ok(())
}

/// `GET path` with Python's `urllib` (a status other than 200 is an error); the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let fetch = "import sys, urllib.request\n\
        sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=60).read().decode())";
    let mut cmd = std::process::Command::new(PYTHON);
    cmd.args(["-I", "-c", fetch, &url]);
    let got = snapshim_testapps::process::run_captured(&mut cmd, CLIENT_TIMEOUT)?;
    if !got.status.success() {
        bail!("GET {url} failed:\n{}", got.report());
    }
    Ok(got.stdout)
}

/// `sockreset` holds connections to the test's listeners: TCP over IPv4 and IPv6, and a Unix
/// stream. Uninterrupted, the test resets the TCP ones (`SO_LINGER` 0) and closes the Unix one;
/// with a checkpoint, SIGKILL and a restore in between, the restored connections must end the
/// same way by themselves: a reset (`ECONNRESET`, then end of file) and an end of file. The
/// program prints how each ended, so both runs print the same.
#[test]
fn established_connections_come_back_reset() -> Result<()> {
    if !ipv6_loopback()? {
        return Ok(());
    }
    let outside = Outside::new("reset")?;
    let t4 = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let t6 = TcpListener::bind("[::1]:0").context("bind")?;
    let unix_path = outside.dir.join("listener.sock");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).context("bind")?;
    let port = |l: &TcpListener| l.local_addr().map(|a| a.port().to_string()).context("port");
    let spec = AppSpec {
        name: "sockreset".into(),
        program: c_app("sockreset"),
        args: vec![
            port(&t4)?,
            port(&t6)?,
            unix_path.to_string_lossy().into_owned(),
        ],
        output_files: Vec::new(),
        setup: None,
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    };
    let mut outputs = Vec::new();
    for cycle in [false, true] {
        let session = Session::new(spec.clone())?;
        let app = if cycle {
            session.spawn_without_reference()?
        } else {
            session.spawn_without_shim()?
        };
        let app = app.wait_ready()?;
        let (c4, _) = t4.accept().context("accept tcp4")?;
        let (c6, _) = t6.accept().context("accept tcp6")?;
        let (cu, _) = unix.accept().context("accept unix")?;
        let app = if cycle {
            checkpoint_kill_restore(app)?.0
        } else {
            for c in [&c4, &c6] {
                set_linger_zero(c)?;
            }
            app
        };
        drop((c4, c6, cu));
        app.finish()?.assert_exit_code(0)?;
        let out = fs::read(session.stdout_path()).context("read out.txt")?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if !text.contains("tcp4: read fails with ECONNRESET\ntcp4: end of file\n") {
            bail!("the connection was not reset (restored: {cycle}):\n{text}");
        }
        session.passed();
        outputs.push(out);
    }
    if outputs[0] != outputs[1] {
        bail!(
            "stdout differs from an uninterrupted run: {}",
            snapshim_testapps::diff_summary(&outputs[0], &outputs[1])
        );
    }
    Ok(())
}

/// `SO_LINGER` with a zero timeout: closing sends a RST.
fn set_linger_zero(s: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct with its size, on a socket this test owns.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A descriptor in flight in a Unix socket (`SCM_RIGHTS`) cannot be restored: the checkpoint
/// leaves it where it is (the program receives it afterwards), and the restore of that image
/// fails in one line naming the descriptor and why.
#[test]
fn a_descriptor_in_flight_is_refused_in_one_line() -> Result<()> {
    let spec = AppSpec {
        name: "sockfds".into(),
        program: c_app("sockfds"),
        args: Vec::new(),
        output_files: Vec::new(),
        setup: None,
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    };
    let session = Session::new(spec)?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let holder = app
        .stderr_so_far()
        .lines()
        .find_map(|l| {
            l.strip_prefix("in flight on descriptor ")
                .map(str::to_string)
        })
        .ok_or_else(|| Failure::new("sockfds did not say which descriptor holds it"))?;
    let img = app.checkpoint()?;
    app.signal(libc::SIGUSR1)?;
    app.finish()?.assert_exit_code(0)?;
    let refused = session.try_restore(img.path())?;
    let msg = expect_clean_refusal(&refused, &["SCM_RIGHTS"])?;
    if !msg.contains(&format!("descriptor {holder} ")) {
        bail!("the message does not name descriptor {holder}: {msg}");
    }
    session.passed();
    Ok(())
}

/// A connected UDP client's port, one the kernel handed out by itself, taken by someone else
/// between the checkpoint and the restore: the restore goes on with another port and one
/// warning, and the client's next datagram still reaches its peer.
#[test]
fn a_client_port_taken_meanwhile_is_replaced() -> Result<()> {
    let peer = UdpSocket::bind("127.0.0.1:0").context("bind the peer")?;
    peer.set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("timeout")?;
    let peer_port = peer.local_addr().context("port")?.port();
    let script = "import signal, socket, sys\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.connect(('127.0.0.1', int(sys.argv[1])))\n\
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n\
        print('port', s.getsockname()[1], file=sys.stderr)\n\
        print('READY', file=sys.stderr, flush=True)\n\
        signal.sigwait([signal.SIGUSR1])\n\
        s.send(b'still talking')\n\
        print('PASS')\n";
    let spec = AppSpec {
        name: "udp-client".into(),
        program: PYTHON.into(),
        args: vec![
            "-I".into(),
            "-c".into(),
            script.into(),
            peer_port.to_string(),
        ],
        output_files: Vec::new(),
        setup: None,
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    };
    let session = Session::new(spec)?;
    let app = session.spawn_without_reference()?.wait_ready()?;
    let port: u16 = app
        .stderr_so_far()
        .lines()
        .find_map(|l| l.strip_prefix("port ")?.trim().parse().ok())
        .ok_or_else(|| Failure::new("the client did not print its port"))?;
    let img = app.checkpoint()?;
    app.kill()?;
    let _squatter = UdpSocket::bind(("127.0.0.1", port)).context("take the client's port")?;
    let mut restored = session.restore_with(img.path(), &["--stats"])?;
    restored.wait_for(RESUMING)?;
    let warned = restored.stderr_so_far();
    if !warned.contains(&format!("UDP 127.0.0.1 port {port}): the port is taken")) {
        bail!("no warning about the taken port:\n{warned}");
    }
    restored.signal(libc::SIGUSR1)?;
    let mut buf = [0u8; 64];
    let (n, from) = peer
        .recv_from(&mut buf)
        .context("receive from the restored client")?;
    if &buf[..n] != b"still talking" || from.port() == port {
        bail!(
            "received {:?} from {from}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    restored.finish()?.assert_exit_code(0)?;
    session.passed();
    Ok(())
}

/// Socket pairs holding much data: 80,000 bytes queued in a stream pair (written in eight
/// pieces) and ten datagrams of different sizes in a datagram pair (the most this machine's
/// `net.unix.max_dgram_qlen` of 10 lets wait) come back whole, in order, with their boundaries,
/// after a checkpoint, SIGKILL and a restore.
#[test]
fn socket_pairs_keep_large_queues() -> Result<()> {
    let script = "import signal, socket, sys, hashlib\n\
        a, b = socket.socketpair()\n\
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        a.setblocking(False)\n\
        c.setblocking(False)\n\
        data = bytes(i * 7 % 251 for i in range(80000))\n\
        for i in range(0, len(data), 10000): a.sendall(data[i:i + 10000])\n\
        grams = [bytes([n]) * (n * 397 % 9000 + 1) for n in range(10)]\n\
        for g in grams: c.send(g)\n\
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n\
        print('READY', file=sys.stderr, flush=True)\n\
        signal.sigwait([signal.SIGUSR1])\n\
        b.setblocking(False)\n\
        got = b''\n\
        while len(got) < len(data): got += b.recv(1 << 20)\n\
        try:\n    b.recv(1); sys.exit('more stream data than was sent')\n\
        except BlockingIOError: pass\n\
        print('stream', len(got), hashlib.sha256(got).hexdigest()[:16], got == data)\n\
        d.setblocking(False)\n\
        back = [d.recv(65536) for _ in grams]\n\
        print('datagrams', len(back), back == grams)\n\
        print('PASS' if got == data and back == grams else 'FAIL')\n";
    let spec = AppSpec {
        name: "big-pairs".into(),
        program: PYTHON.into(),
        args: vec!["-I".into(), "-c".into(), script.into()],
        output_files: Vec::new(),
        setup: None,
        run_from_copy: false,
        unprivileged: false,
        env: Vec::new(),
        preload: Vec::new(),
        through_run: false,
    };
    let mut outputs = Vec::new();
    for cycle in [false, true] {
        let session = Session::new(spec.clone())?;
        let mut app = if cycle {
            session.spawn_without_reference()?.wait_ready()?
        } else {
            session.spawn_without_shim()?.wait_ready()?
        };
        if cycle {
            app = checkpoint_kill_restore(app)?.0;
        }
        app.signal(libc::SIGUSR1)?;
        app.finish()?.assert_exit_code(0)?;
        let out = fs::read(session.stdout_path()).context("read out.txt")?;
        if !out.ends_with(b"True\nPASS\n") {
            bail!("restored: {cycle}:\n{}", String::from_utf8_lossy(&out));
        }
        session.passed();
        outputs.push(out);
    }
    if outputs[0] != outputs[1] {
        bail!(
            "stdout differs from an uninterrupted run: {}",
            snapshim_testapps::diff_summary(&outputs[0], &outputs[1])
        );
    }
    Ok(())
}
