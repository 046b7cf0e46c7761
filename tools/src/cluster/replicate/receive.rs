//! The receiving side: a thread accepting connections, a thread per session. An image is
//! written under a hidden temporary name beside its final one, checked completely (header,
//! metadata, every page checksum, the offer, the parent of a delta), fsynced, renamed into
//! place without replacing anything, the directory fsynced, and only then acknowledged. A bad
//! image is deleted and answered with why; the images already there are never touched, except
//! by retention after a commit.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshim_image::{Chain, Image, PAGE_SIZE};

use super::key::MacKey;
use super::proto::{self, Msg, Offer};
use super::store::{self, id_at, seq_of};
use super::wire::{Channel, Kind, WireError};
use super::ReplicateError;

/// Decides whether an offered image may enter the store (e.g. refuses a stale generation);
/// `Err(why)` is sent back to the sender.
pub type Gate = Arc<dyn Fn(&Offer) -> Result<(), String> + Send + Sync>;
/// Told of each image committed, after its acknowledgement was sent (the session goes on only
/// when it returns).
pub type OnCommit = Arc<dyn Fn(&Offer, &Path) + Send + Sync>;

/// How a receiver keeps its store.
#[derive(Clone)]
pub struct Options {
    /// Images kept per service: the newest `keep` and every image they depend on (0: all).
    pub keep: usize,
    /// A session silent for this long is dropped.
    pub idle: Duration,
    pub on_commit: Option<OnCommit>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            keep: 3,
            idle: Duration::from_secs(60),
            on_commit: None,
        }
    }
}

struct Shared {
    key: MacKey,
    store: PathBuf,
    gate: Gate,
    opts: Options,
    /// Held from the rename of an image to the end of the retention that follows it.
    commit: Mutex<()>,
    /// Sessions under way (a connection beyond [`MAX_SESSIONS`] is closed at once).
    sessions: AtomicUsize,
}

/// Sessions a receiver serves at once.
const MAX_SESSIONS: usize = 64;
/// A peer must complete the handshake within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running receiver.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Serves `listener` with [`Options::default`].
    pub fn serve(
        listener: TcpListener,
        key: MacKey,
        store: PathBuf,
        gate: Gate,
    ) -> Result<Receiver, ReplicateError> {
        Receiver::serve_with(listener, key, store, gate, Options::default())
    }

    /// Starts the thread that accepts connections on `listener`; each session gets a thread.
    pub fn serve_with(
        listener: TcpListener,
        key: MacKey,
        store: PathBuf,
        gate: Gate,
        opts: Options,
    ) -> Result<Receiver, ReplicateError> {
        let addr = listener
            .local_addr()
            .map_err(|e| ReplicateError::io("find the address of", &store, e))?;
        std::fs::create_dir_all(&store)
            .map_err(|e| ReplicateError::io("create the store", &store, e))?;
        let shared = Arc::new(Shared {
            key,
            store,
            gate,
            opts,
            commit: Mutex::new(()),
            sessions: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, shared2) = (stop.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("replicate-accept".into())
            .spawn(move || accept_loop(listener, shared2, stop2))
            .map_err(|e| ReplicateError::io("start a thread for", Path::new("the receiver"), e))?;
        Ok(Receiver {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sessions under way (connections accepted and not yet ended, their files cleaned up).
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Stops accepting connections (sessions under way finish on their own).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves until the process ends.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(s) => {
                let peer = s.peer_addr().map_or("?".into(), |a| a.to_string());
                if shared.sessions.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
                    shared.sessions.fetch_sub(1, Ordering::SeqCst);
                    log(&format!(
                        "refused {peer}: {MAX_SESSIONS} sessions under way already"
                    ));
                    continue;
                }
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("replicate-session".into())
                    .spawn(move || {
                        // Logged before the connection closes: a peer that sees it closed
                        // finds the reason in the log.
                        if let Err(e) = session(&sh, &s) {
                            log(&format!("session with {peer} ended: {e}"));
                        }
                        drop(s);
                        sh.sessions.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    shared.sessions.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) => {
                log(&format!("accept failed: {e}"));
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn log(line: &str) {
    eprintln!("snapshim: replicate: {line}");
}

fn session(sh: &Shared, s: &TcpStream) -> Result<(), ReplicateError> {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT.min(sh.opts.idle)));
    let _ = s.set_write_timeout(Some(sh.opts.idle));
    let mut ch = Channel::server(s, &sh.key.bytes)?;
    let _ = s.set_read_timeout(Some(sh.opts.idle));
    let service = match proto::recv(&mut ch)? {
        Msg::Hello { service } => service,
        m => return Err(unexpected(&m, "hello")),
    };
    if let Err(e) = store::check_service(&service) {
        proto::send(&mut ch, &Msg::Refuse { why: e.to_string() })?;
        return Err(e);
    }
    let dir = sh.store.join(&service);
    let images = store::holding(&dir);
    proto::send(&mut ch, &Msg::Holding { images })?;
    loop {
        match proto::recv(&mut ch) {
            Ok(Msg::Offer(o)) => offered(sh, &mut ch, &dir, &service, o)?,
            Ok(Msg::Bye) | Err(ReplicateError::Wire(WireError::Closed)) => return Ok(()),
            Ok(m) => return Err(unexpected(&m, "offer or bye")),
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn unexpected(m: &Msg, wanted: &str) -> ReplicateError {
    ReplicateError::Protocol(format!("got a {} message, expected {wanted}", m.name()))
}

/// What to do with an offer before any data moves.
enum Pre {
    Take,
    Have,
}

fn precheck(sh: &Shared, dir: &Path, service: &str, o: &Offer) -> Result<Pre, String> {
    if o.service != service {
        return Err(format!(
            "an offer for service {} in a session for {service}",
            o.service
        ));
    }
    if seq_of(&o.file).is_none() {
        return Err(format!("'{}' is not an image name (ckpt-N.snap)", o.file));
    }
    if o.size < PAGE_SIZE {
        return Err(format!("{} bytes cannot be an image", o.size));
    }
    let path = dir.join(&o.file);
    if path.exists() {
        return match id_at(&path) {
            Some(id) if id == o.id => Ok(Pre::Have),
            Some(id) => Err(format!(
                "{} holds image {id:016x} already, not {:016x}",
                path.display(),
                o.id
            )),
            None => Err(format!(
                "{} exists already and is not a readable image",
                path.display()
            )),
        };
    }
    if o.parent_id != 0 {
        let parent = o.parent_file.as_deref().filter(|f| seq_of(f).is_some());
        let ok = parent.is_some_and(|f| id_at(&dir.join(f)) == Some(o.parent_id));
        if !ok {
            return Err(format!(
                "its parent {} (image {:016x}) is not here: a delta is accepted only after its \
                 parent",
                parent.unwrap_or("?"),
                o.parent_id
            ));
        }
    }
    (sh.gate)(o).map(|()| Pre::Take)
}

fn offered<S: std::io::Read + std::io::Write>(
    sh: &Shared,
    ch: &mut Channel<S>,
    dir: &Path,
    service: &str,
    o: Offer,
) -> Result<(), ReplicateError> {
    match precheck(sh, dir, service, &o) {
        Ok(Pre::Have) => return Ok(proto::send(ch, &Msg::Have)?),
        Err(why) => {
            log(&format!("refused {service}/{}: {why}", o.file));
            return Ok(proto::send(ch, &Msg::Refuse { why })?);
        }
        Ok(Pre::Take) => {}
    }
    let t0 = Instant::now();
    let (tmp, file) = match temp_file(dir, &o.file) {
        Ok(t) => t,
        Err(why) => return Ok(proto::send(ch, &Msg::Refuse { why })?),
    };
    proto::send(ch, &Msg::Accept)?;
    let written = match take(ch, &file, o.size) {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let data = t0.elapsed();
    let outcome = written.and_then(|()| check_and_commit(sh, dir, &tmp, &file, &o));
    drop(file);
    match outcome {
        Ok(t) => {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            log(&format!(
                "received {service}/{} (image {:016x}, {} bytes in {:.0} ms: data {:.0}, checks \
                 {:.0}, fsync and commit {:.0})",
                o.file,
                o.id,
                o.size,
                ms(t0.elapsed()),
                ms(data),
                ms(t.check),
                ms(t.commit),
            ));
            proto::send(ch, &Msg::Ack { id: o.id })?;
            if let Some(f) = &sh.opts.on_commit {
                f(&o, &dir.join(&o.file));
            }
        }
        Err(why) => {
            let _ = std::fs::remove_file(&tmp);
            log(&format!("refused {service}/{}: {why}", o.file));
            proto::send(ch, &Msg::Failed { why })?;
        }
    }
    Ok(())
}

/// A new hidden file beside `dir/name` (never a committed name: it starts with a dot).
fn temp_file(dir: &Path, name: &str) -> Result<(PathBuf, File), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let salt = super::wire::random32().map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(
        ".{name}.recv-{:016x}",
        u64::from_le_bytes(salt[..8].try_into().expect("8"))
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    Ok((tmp, f))
}

/// Reads `size` bytes of data frames into `file`. The outer error ends the session (the stream
/// failed); the inner one is a write that failed (the data is still read to its end, so the
/// sender hears why).
///
/// Two threads: this one reads frames and checks their MACs, a writer writes them to the file
/// (frames pass between them by buffer, not copied; a few in flight).
fn take<S: std::io::Read + std::io::Write>(
    ch: &mut Channel<S>,
    file: &File,
    size: u64,
) -> Result<Result<(), String>, ReplicateError> {
    let (to_writer, frames) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
    let (to_reader, spares) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || write_frames(file, frames, to_reader));
        let read = read_frames(ch, size, &to_writer, &spares);
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err("the writer thread failed".into()));
        read.map(|()| written)
    })
}

/// Frames received and not yet written, at most (each up to [`super::wire::DATA_CHUNK`]).
const IN_FLIGHT: usize = 4;

fn read_frames<S: std::io::Read + std::io::Write>(
    ch: &mut Channel<S>,
    size: u64,
    to_writer: &mpsc::SyncSender<Vec<u8>>,
    spares: &mpsc::Receiver<Vec<u8>>,
) -> Result<(), ReplicateError> {
    let mut got = 0u64;
    while got < size {
        let spare = spares.try_recv().unwrap_or_default();
        let (kind, b) = ch.recv_owned(spare)?;
        if kind != Kind::Data {
            return Err(ReplicateError::Protocol(
                "a control message came in the middle of an image's data".into(),
            ));
        }
        if got + b.len() as u64 > size {
            return Err(ReplicateError::Protocol(
                "more image data than offered".into(),
            ));
        }
        got += b.len() as u64;
        // The writer only stops early if this side hung up.
        let _ = to_writer.send(b);
    }
    Ok(())
}

/// The writer: writes each frame in order, starts its writeback every [`WRITEBACK_STEP`], and
/// gives the buffer back. After a failed write it only gives buffers back.
fn write_frames(
    mut file: &File,
    frames: mpsc::Receiver<Vec<u8>>,
    to_reader: mpsc::Sender<Vec<u8>>,
) -> Result<(), String> {
    let (mut written, mut flushed) = (0u64, 0u64);
    let mut failed = None;
    for b in frames {
        if failed.is_none() {
            match file.write_all(&b) {
                Ok(()) => written += b.len() as u64,
                Err(e) => failed = Some(format!("cannot write the image: {e}")),
            }
            if written - flushed >= WRITEBACK_STEP {
                start_writeback(file, flushed, written - flushed);
                flushed = written;
            }
        }
        let _ = to_reader.send(b);
    }
    failed.map_or(Ok(()), Err)
}

/// Received data is handed to the disk in steps of this many bytes while more arrives, so the
/// fsync before the commit finds little left to write.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing `len` bytes at `off` of `file` to the disk, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); the fsync before the commit is what counts.
fn start_writeback(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a hint on our own open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Time spent after the data arrived.
struct Phases {
    check: Duration,
    commit: Duration,
}

/// Checks the received file completely, then commits it. `Err` says why it was refused.
fn check_and_commit(
    sh: &Shared,
    dir: &Path,
    tmp: &Path,
    file: &File,
    o: &Offer,
) -> Result<Phases, String> {
    let t0 = Instant::now();
    let img = Image::open(tmp).map_err(|e| e.to_string())?;
    let got = store::held(&img);
    let same = got.id == o.id
        && got.parent_id == o.parent_id
        && img.file_len == o.size
        && got.lineage == o.lineage
        && got.generation == o.generation
        && img.meta.parent.as_ref().map(|p| &p.file) == o.parent_file.as_ref();
    if !same {
        return Err(format!(
            "the image is not the one offered (image {:016x}, parent {:016x}, generation {})",
            got.id, got.parent_id, got.generation
        ));
    }
    img.verify_pages().map_err(|e| e.to_string())?;
    if o.parent_id != 0 {
        Chain::open(tmp).map_err(|e| e.to_string())?;
    }
    let check = t0.elapsed();
    file.sync_all()
        .map_err(|e| format!("cannot fsync the image: {e}"))?;
    let _held = sh.commit.lock().unwrap_or_else(|p| p.into_inner());
    let path = dir.join(&o.file);
    match crate::durable::rename_noreplace(tmp, &path) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && id_at(&path) == Some(o.id) => {
            let _ = std::fs::remove_file(tmp);
        }
        Err(e) => return Err(format!("cannot rename it into place: {e}")),
    }
    crate::durable::sync_dir(dir).map_err(|e| format!("cannot fsync {}: {e}", dir.display()))?;
    if let Err(e) = store::repoint_latest(dir) {
        log(&format!("cannot update {}/latest: {e}", dir.display()));
    }
    if sh.opts.keep > 0 {
        if let Ok(images) = snapshim_image::list_images(dir) {
            snapshim_image::retain_among(dir, newest_last(images, &path), sh.opts.keep);
        }
    }
    let _ = crate::durable::sync_dir(dir);
    Ok(Phases {
        check,
        commit: t0.elapsed() - check,
    })
}

/// `images` ordered for retention, the one to keep most last: by generation, then by number,
/// and the image just received after all of them. By number alone, images of an older
/// generation that a fenced leader wrote here after its last push (higher numbers than the new
/// leader's first images) would make retention delete the image just acknowledged.
fn newest_last(images: Vec<PathBuf>, received: &Path) -> Vec<PathBuf> {
    let mut keyed: Vec<(bool, u32, PathBuf)> = images
        .into_iter()
        .map(|p| {
            let generation = Image::open(&p)
                .ok()
                .and_then(|i| i.meta.lineage.map(|l| l.generation))
                .unwrap_or(0);
            (p == received, generation, p)
        })
        .collect();
    keyed.sort(); // the same generation: by name, which is by number
    keyed.into_iter().map(|(_, _, p)| p).collect()
}
