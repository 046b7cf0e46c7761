//! Real servers from their Debian packages, checkpointed while clients use them, killed with
//! SIGKILL and restored from a copy of the image in another directory (only 127.0.0.1):
//!
//! - redis-server (linked with jemalloc) holding 100,000 keys, two cycles;
//! - nginx as a single process (`master_process off; daemon off;`), two cycles;
//! - memcached with four threads (libevent), started as root with `-u nobody` when the tests run
//!   as root;
//! - `python3 -m http.server`;
//! - a python3 asyncio TCP server (`py/asyncio_echo.py`);
//! - node with an HTTP server answering from a timer (`js/http_timers.js`).
//!
//! Each server is first run without the shim: it is asked the same questions and stopped the
//! same way, which gives the answers and the exit status the restored one must give. Under the
//! shim, at each cycle: a client that has connected and waits is held across the checkpoint,
//! and another asks the server again and again while the checkpoint is taken (every answer must
//! be the uninterrupted run's); the server is killed and restored from a copy of the image in
//! another directory; the held client sees its connection end (end of file or a reset) and a
//! new connection gets the same answers on the same port. At the end the restored server is
//! stopped and must exit with the uninterrupted run's status.
//!
//! Needs `cargo build --release --workspace` first, and the Debian packages redis-server,
//! redis-tools, nginx-light (or nginx), memcached, nodejs (`scripts/test.sh` installs them).

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use snapshim_testapps::process::describe_status;
use snapshim_testapps::{
    bail, is_root, needs, AppSpec, Context, Failure, Result, Running, Session, Snapshot, PYTHON,
};

/// A bound on every client read, so a broken server fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The last line `snapshim-restore --stats` writes, from phase 2, once every descriptor of the
/// program is in place (its listening sockets included) and just before the program resumes.
const RESUMING: &str = "CLOCK_MONOTONIC";

/// How a server is stopped at the end of a run.
enum Stop {
    /// A request on a new connection (its answer is not checked: the server may close first).
    Request(Vec<u8>),
    /// A signal to the server's process.
    Signal(i32),
}

/// One server under test: how to start it, what to ask it, how to stop it.
struct Server {
    spec: AppSpec,
    /// What the server prints on stderr once it listens.
    ready: String,
    port: u16,
    /// Files the server needs in its session directory (a configuration, a page).
    files: Vec<(String, String)>,
    /// Sent once after start (on its own connection), with the reply it must get: the data.
    load: Option<(Vec<u8>, Vec<u8>)>,
    /// The question asked before, during and after each checkpoint: sent on a new connection,
    /// after which the server closes it; the reply is read to end of file.
    question: Vec<u8>,
    /// The part of a reply that must be the same every time (an HTTP reply's body).
    answer: fn(&[u8]) -> Result<Vec<u8>>,
    stop: Stop,
    /// It drops to `nobody` by itself (memcached `-u`), and then writes its images as nobody.
    becomes_nobody: bool,
}

/// A port nobody listens on now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local address")?.port())
}

/// Sends `request` on a new connection to 127.0.0.1:`port` and reads the reply to end of file
/// (each request ends with what makes the server close: redis's `QUIT`, HTTP/1.0, ...).
fn exchange(port: u16, request: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context(format!("connect to {port}"))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))
        .context("timeout")?;
    s.write_all(request).context("send a request")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).context("read a reply")?;
    Ok(reply)
}

impl Server {
    fn ask(&self) -> Result<Vec<u8>> {
        (self.answer)(&exchange(self.port, &self.question)?)
    }

    /// A session for this server with its files in place.
    fn session(&self) -> Result<Arc<Session>> {
        let session = Session::new(self.spec.clone())?;
        for (name, text) in &self.files {
            let path = session.dir().join(name);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).context(format!("create {}", dir.display()))?;
            }
            fs::write(&path, text).context(format!("write {}", path.display()))?;
        }
        Ok(session)
    }

    /// Waits until it listens, then loads its data.
    fn started(&self, mut app: Running) -> Result<Running> {
        app.wait_for(&self.ready)?;
        if let Some((request, want)) = &self.load {
            let got = exchange(self.port, request)?;
            if &got != want {
                bail!(
                    "loading {}: got {:?} instead of {:?}",
                    self.spec.name,
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(want)
                );
            }
        }
        Ok(app)
    }

    fn stop(&self, app: Running) -> Result<ExitStatus> {
        match &self.stop {
            Stop::Request(r) => {
                let _ = exchange(self.port, r);
            }
            Stop::Signal(sig) => app.signal(*sig)?,
        }
        Ok(app.finish()?.status)
    }

    /// The answer it must give, and its exit status, from a run without the shim.
    fn uninterrupted(&self) -> Result<(Vec<u8>, ExitStatus)> {
        let session = self.session()?;
        let app = self.started(session.spawn_without_shim()?)?;
        let answer = self.ask()?;
        let status = self.stop(app)?;
        session.passed();
        Ok((answer, status))
    }
}

/// A client asking the server again and again on new connections, from when it got its first
/// answer until it is told to stop; every answer must be `want`.
struct Busy {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64>>,
}

impl Busy {
    /// Returns once the client has had its first answer.
    fn start(server: &Arc<Server>, want: &[u8]) -> Result<Busy> {
        let stop = Arc::new(AtomicBool::new(false));
        let (first, answered) = mpsc::channel();
        let (server, want, flag) = (Arc::clone(server), want.to_vec(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut asked = 0u64;
            loop {
                let got = server.ask()?;
                if got != want {
                    bail!(
                        "a client using {} during the checkpoint got {} bytes that differ from \
                         the uninterrupted run's {}",
                        server.spec.name,
                        got.len(),
                        want.len()
                    );
                }
                asked += 1;
                if asked == 1 {
                    let _ = first.send(());
                }
                if flag.load(Ordering::Relaxed) {
                    return Ok(asked);
                }
            }
        });
        if answered.recv().is_err() {
            return Err(Busy::join(thread)
                .err()
                .unwrap_or_else(|| Failure::new("the busy client ended before its first answer")));
        }
        Ok(Busy { stop, thread })
    }

    fn join(thread: JoinHandle<Result<u64>>) -> Result<u64> {
        thread
            .join()
            .map_err(|_| Failure::new("the busy client panicked"))?
    }

    /// How many answers it had.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        Busy::join(self.thread)
    }
}

fn copy_elsewhere(img: &Snapshot, cycle: u32) -> Result<Snapshot> {
    let elsewhere = img.session().dir().join(format!("elsewhere-{cycle}"));
    fs::create_dir_all(&elsewhere).context(format!("create {}", elsewhere.display()))?;
    let copy = elsewhere.join(img.path().file_name().expect("an image has a name"));
    fs::copy(img.path(), &copy).context(format!("copy {}", img.path().display()))?;
    Ok(Snapshot::at(img.session(), copy))
}

/// A client connected at the checkpoint: after the restore its connection has ended (end of
/// file or a reset), whatever it sends.
fn expect_ended(mut held: TcpStream, server: &Server) -> Result<()> {
    let _ = held.write_all(&server.question);
    let mut rest = Vec::new();
    if held.read_to_end(&mut rest).is_ok() && !rest.is_empty() {
        bail!(
            "a client of {} connected at the checkpoint got an answer after the restore: {} bytes",
            server.spec.name,
            rest.len()
        );
    }
    Ok(())
}

/// The whole scenario (see the module comment) with `cycles` checkpoints.
fn serves_across_restores(server: Server, cycles: u32) -> Result<()> {
    let (want, status) = server.uninterrupted()?;
    let server = Arc::new(server);
    let session = server.session()?;
    if server.becomes_nobody {
        give_images_to_nobody(&session)?;
    }
    let mut app = server.started(session.spawn_without_reference()?)?;
    check_answer(&server, &want, "under the shim")?;
    for cycle in 1..=cycles {
        let held = TcpStream::connect(("127.0.0.1", server.port)).context("connect")?;
        held.set_read_timeout(Some(CLIENT_TIMEOUT))
            .context("timeout")?;
        let busy = Busy::start(&server, &want)?;
        let img = app.checkpoint()?;
        let asked = busy.finish()?;
        eprintln!(
            "[{}] {asked} answers during checkpoint {cycle}",
            server.spec.name
        );
        app.kill()?;
        let copy = copy_elsewhere(&img, cycle)?;
        app = session.restore_with(copy.path(), &["--stats"])?;
        app.wait_for(RESUMING)?;
        expect_ended(held, &server)?;
        check_answer(&server, &want, &format!("after restore {cycle}"))?;
    }
    let restored = server.stop(app)?;
    if restored != status {
        bail!(
            "the restored {} ended with {}, the uninterrupted one with {}",
            server.spec.name,
            describe_status(restored),
            describe_status(status)
        );
    }
    session.passed();
    Ok(())
}

fn check_answer(server: &Server, want: &[u8], when: &str) -> Result<()> {
    let got = server.ask()?;
    if got != want {
        bail!(
            "{} {when} answered {:?}, the uninterrupted run {:?}",
            server.spec.name,
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
    }
    Ok(())
}

/// memcached run as root with `-u nobody` writes its images as nobody: its image directory must
/// be nobody's.
fn give_images_to_nobody(session: &Session) -> Result<()> {
    let dir = session.image_dir();
    fs::create_dir_all(&dir).context(format!("create {}", dir.display()))?;
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))
        .context(format!("give {} to nobody", dir.display()))
}

const NOBODY: u32 = 65534;

/// The whole reply.
fn whole(reply: &[u8]) -> Result<Vec<u8>> {
    Ok(reply.to_vec())
}

/// An HTTP reply's body; a status other than 200 is an error.
fn http_body(reply: &[u8]) -> Result<Vec<u8>> {
    let text = String::from_utf8_lossy(reply);
    let status = text.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("HTTP status {status:?}, reply {text:?}");
    }
    match reply.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => Ok(reply[end + 4..].to_vec()),
        None => bail!("an HTTP reply without a header end: {text:?}"),
    }
}

fn http_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

fn script(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(relative)
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// The servers

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const NGINX: &str = "/usr/sbin/nginx";
const MEMCACHED: &str = "/usr/bin/memcached";
const NODE: &str = "/usr/bin/node";

/// redis-server holding 100,000 keys (`DEBUG POPULATE`), asked their number, their digest and
/// one of them; stopped with `SHUTDOWN NOSAVE`.
fn redis(port: u16) -> Server {
    let port_arg = port.to_string();
    #[rustfmt::skip]
    let args = [
        "--port", &port_arg, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", ".", "--logfile", "/dev/stderr", "--daemonize", "no",
        "--enable-debug-command", "local",
    ];
    Server {
        spec: AppSpec::new("redis", REDIS_SERVER.into(), &args),
        ready: "Ready to accept connections".into(),
        port,
        files: Vec::new(),
        load: Some((
            b"DEBUG POPULATE 100000\r\nQUIT\r\n".to_vec(),
            b"+OK\r\n+OK\r\n".to_vec(),
        )),
        question: b"DBSIZE\r\nDEBUG DIGEST\r\nGET key:99999\r\nGET key:0\r\nQUIT\r\n".to_vec(),
        answer: whole,
        stop: Stop::Request(b"SHUTDOWN NOSAVE\r\n".to_vec()),
        becomes_nobody: false,
    }
}

#[test]
fn redis_holding_100000_keys_serves_them_after_two_restores() -> Result<()> {
    if !needs::program(REDIS_SERVER, "redis-server")? {
        return Ok(());
    }
    serves_across_restores(redis(free_port()?), 2)
}

/// nginx as one process serving a static page from the session directory, its log on stderr;
/// stopped with SIGQUIT (graceful shutdown).
fn nginx(port: u16) -> Result<Server> {
    let conf = format!(
        "master_process off;\ndaemon off;\nerror_log stderr notice;\npid nginx.pid;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path tmp;\n  proxy_temp_path tmp;\n  \
         fastcgi_temp_path tmp;\n  uwsgi_temp_path tmp;\n  scgi_temp_path tmp;\n  \
         server {{ listen 127.0.0.1:{port}; root html; }}\n}}\n"
    );
    let prefix_arg = ".";
    Ok(Server {
        spec: AppSpec::new(
            "nginx",
            NGINX.into(),
            &["-p", prefix_arg, "-c", "nginx.conf", "-e", "stderr"],
        ),
        // Logged once the listening sockets are open, just before the event loop starts.
        ready: format!("getrlimit(RLIMIT_NOFILE): {}", open_files_limit()?),
        port,
        files: vec![
            ("nginx.conf".into(), conf),
            ("html/page.txt".into(), "a page from nginx\n".repeat(2000)),
        ],
        load: None,
        question: http_get("/page.txt"),
        answer: http_body,
        stop: Stop::Signal(libc::SIGQUIT),
        becomes_nobody: false,
    })
}

/// This process's `RLIMIT_NOFILE` (which nginx inherits) as nginx logs it: `SOFT:HARD`.
fn open_files_limit() -> Result<String> {
    let limits = fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| Failure::new("no \"Max open files\" in /proc/self/limits"))?;
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    match fields[..] {
        [soft, hard, ..] => Ok(format!("{soft}:{hard}")),
        _ => bail!("cannot read {line:?}"),
    }
}

#[test]
fn nginx_serves_the_same_page_after_two_restores() -> Result<()> {
    if !needs::program(NGINX, "nginx-light")? {
        return Ok(());
    }
    serves_across_restores(nginx(free_port()?)?, 2)
}

/// memcached with four worker threads holding 100 items; as root it drops to nobody (`-u`),
/// which makes glibc broadcast the credential change to every thread; stopped with SIGTERM.
fn memcached(port: u16) -> Server {
    let port_arg = port.to_string();
    let mut args = vec![
        "-l",
        "127.0.0.1",
        "-p",
        &port_arg,
        "-U",
        "0",
        "-t",
        "4",
        "-vv",
    ];
    if is_root() {
        args.extend(["-u", "nobody"]);
    }
    let items = 0..100;
    let mut load = Vec::new();
    for i in items.clone() {
        let value = format!("value {i} {}", "m".repeat(i));
        load.extend(format!("set item:{i} 0 0 {}\r\n{value}\r\n", value.len()).bytes());
    }
    load.extend(b"quit\r\n");
    let keys: Vec<String> = items.clone().map(|i| format!("item:{i}")).collect();
    Server {
        spec: AppSpec::new("memcached", MEMCACHED.into(), &args),
        ready: "server listening (auto-negotiate)".into(),
        port,
        files: Vec::new(),
        load: Some((load, b"STORED\r\n".repeat(items.len()))),
        question: format!("get {}\r\nquit\r\n", keys.join(" ")).into_bytes(),
        answer: whole,
        stop: Stop::Signal(libc::SIGTERM),
        becomes_nobody: is_root(),
    }
}

#[test]
fn memcached_with_threads_serves_its_items_after_a_restore() -> Result<()> {
    if !needs::program(MEMCACHED, "memcached")? {
        return Ok(());
    }
    serves_across_restores(memcached(free_port()?), 1)
}

/// `python3 -m http.server` serving a file of the session directory; stopped with SIGINT
/// (its "Keyboard interrupt received, exiting.").
fn python_http_server(port: u16) -> Server {
    // Its "Serving HTTP on ..." line goes to stdout: sent to stderr, where the harness waits.
    let command = format!("exec {PYTHON} -u -m http.server --bind 127.0.0.1 {port} 1>&2");
    Server {
        spec: AppSpec::new("http-server", "/bin/sh".into(), &["-c", &command]),
        ready: format!("(http://127.0.0.1:{port}/) ..."),
        port,
        files: vec![("page.txt".into(), "a page from python\n".repeat(2000))],
        load: None,
        question: http_get("/page.txt"),
        answer: http_body,
        stop: Stop::Signal(libc::SIGINT),
        becomes_nobody: false,
    }
}

#[test]
fn python_http_server_serves_the_same_page_after_a_restore() -> Result<()> {
    if !needs::check(PYTHON, Path::new(PYTHON).exists())? {
        return Ok(());
    }
    serves_across_restores(python_http_server(free_port()?), 1)
}

/// `py/asyncio_echo.py`: lines echoed after an asyncio timer, an empty line ends the
/// connection; stopped by a `stop` line (exit status 4).
fn asyncio_echo(port: u16) -> Server {
    let port_arg = port.to_string();
    let program = script("py/asyncio_echo.py");
    Server {
        spec: AppSpec::new("asyncio-echo", PYTHON.into(), &["-I", &program, &port_arg]),
        ready: "LISTENING".into(),
        port,
        files: Vec::new(),
        load: None,
        question: b"first line\nsecond line\n\n".to_vec(),
        answer: whole,
        stop: Stop::Request(b"stop\n".to_vec()),
        becomes_nobody: false,
    }
}

#[test]
fn python_asyncio_server_echoes_after_a_restore() -> Result<()> {
    if !needs::check(PYTHON, Path::new(PYTHON).exists())? {
        return Ok(());
    }
    serves_across_restores(asyncio_echo(free_port()?), 1)
}

/// `js/http_timers.js`: node answering `/page` from an interval timer; stopped by `/stop`
/// (exit status 3, from a one-shot timer); checkpointed by the engine `cow`.
fn node_http_timers(port: u16, cow: &str) -> Server {
    let port_arg = port.to_string();
    let program = script("js/http_timers.js");
    Server {
        spec: AppSpec::new("node-http", PathBuf::from(NODE), &[&program, &port_arg])
            .env("SNAPSHIM_COW", cow),
        ready: format!("LISTENING {port}"),
        port,
        files: Vec::new(),
        load: None,
        question: http_get("/page"),
        answer: http_body,
        stop: Stop::Request(http_get("/stop")),
        becomes_nobody: false,
    }
}

/// node's JavaScript engine (V8) advises its heap `MADV_DONTFORK`, which the fork engine's
/// writer cannot see: node is checkpointed with the `uffd` engine where it can be, else with
/// `stop` (the fork engine refuses it: next test).
#[test]
fn node_http_server_with_timers_serves_after_a_restore() -> Result<()> {
    if !needs::program(NODE, "nodejs")? {
        return Ok(());
    }
    let cow = if needs::userfaultfd_opens() {
        "uffd"
    } else {
        "stop"
    };
    serves_across_restores(node_http_timers(free_port()?, cow), 1)
}

/// With the fork engine, node's checkpoint fails with one line naming `MADV_DONTFORK` (instead
/// of an image missing V8's heap, whose restore dies of SIGSEGV), and node serves on.
#[test]
fn node_checkpoint_by_the_fork_engine_is_refused_in_one_line() -> Result<()> {
    if !needs::program(NODE, "nodejs")? {
        return Ok(());
    }
    let server = node_http_timers(free_port()?, "fork");
    let session = server.session()?;
    let app = server.started(session.spawn_without_reference()?)?;
    let want = server.ask()?;
    let refused = app.try_checkpoint()?;
    snapshim_testapps::expect_clean_refusal(&refused, &["MADV_DONTFORK"])?;
    check_answer(&server, &want, "after the refused checkpoint")?;
    let status = server.stop(app)?;
    if status.code() != Some(3) {
        bail!("node ended with {}, not status 3", describe_status(status));
    }
    session.passed();
    Ok(())
}
