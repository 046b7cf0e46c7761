//! The sending side: `push` sends a directory's newest image to a receiver with every image it
//! depends on that the receiver lacks, parents first, and reports what the receiver holds on
//! disk afterwards.
//!
//! Only committed images are read (`list_images`: `ckpt-N.snap`, never the shim's hidden
//! temporary names), and each is read through the descriptor opened when it was chosen, so a
//! retention or merge that removes or replaces the name meanwhile does not change what is sent.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use snapshim_image::Image;

use super::key::MacKey;
use super::proto::{self, HeldRef, Msg, Offer};
use super::receive::unexpected;
use super::store::{self, Held};
use super::wire::{Channel, Kind, DATA_CHUNK};
use super::ReplicateError;

/// An image sent and acknowledged.
#[derive(Debug, Clone)]
pub struct SentImage {
    pub file: String,
    pub id: u64,
    pub bytes: u64,
    /// From the offer to the acknowledgement (data sent, checked, fsynced, committed).
    pub elapsed: Duration,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The newest image, which the receiver now holds.
    pub newest: Held,
    /// Images sent, oldest first.
    pub sent: Vec<SentImage>,
    /// Images of the chain the receiver had already.
    pub already: Vec<HeldRef>,
    /// Every image of the newest image's chain, which the receiver has acknowledged on disk
    /// (sent now or before), oldest first.
    pub acknowledged: Vec<u64>,
}

/// Sends the newest complete image of `dir` (with the images it depends on that the receiver
/// lacks) to the receiver at `addr`, as service `service`. `timeout` bounds the connect and
/// each read or write, not the whole push.
pub fn push(
    addr: SocketAddr,
    key: &MacKey,
    service: &str,
    dir: &Path,
    timeout: Duration,
) -> Result<PushReport, ReplicateError> {
    store::check_service(service)?;
    let chain =
        store::newest_chain(dir).ok_or_else(|| ReplicateError::NoImage(dir.to_path_buf()))?;
    send_images(addr, key, service, &chain.images, timeout)
}

/// Offers exactly the image at `path`, not the images it depends on: for the tests of a
/// receiver's refusals (a delta whose parent it lacks).
pub fn push_only(
    addr: SocketAddr,
    key: &MacKey,
    service: &str,
    path: &Path,
    timeout: Duration,
) -> Result<PushReport, ReplicateError> {
    store::check_service(service)?;
    let img = Image::open(path).map_err(|e| ReplicateError::Image {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    send_images(addr, key, service, &[img], timeout)
}

/// Sends `images` (newest first, each one's parent after it) that the receiver lacks, oldest
/// first.
fn send_images(
    addr: SocketAddr,
    key: &MacKey,
    service: &str,
    images: &[Image],
    timeout: Duration,
) -> Result<PushReport, ReplicateError> {
    let peer = |source| ReplicateError::Peer { addr, source };
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| ReplicateError::Connect { addr, source })?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut ch = Channel::client(s, &key.bytes).map_err(peer)?;
    proto::send(
        &mut ch,
        &Msg::Hello {
            service: service.into(),
        },
    )
    .map_err(peer)?;
    let holding = match proto::recv(&mut ch)? {
        Msg::Holding { images } => images,
        Msg::Refuse { why } => {
            return Err(ReplicateError::Refused {
                file: service.into(),
                why,
            })
        }
        m => return Err(unexpected(&m, "holding")),
    };
    let mut report = PushReport {
        newest: store::held(&images[0]),
        sent: Vec::new(),
        already: Vec::new(),
        acknowledged: Vec::new(),
    };
    for img in images.iter().rev() {
        let h = store::held(img);
        let here = HeldRef {
            file: h.file.clone(),
            id: h.id,
        };
        if holding.contains(&here) {
            report.already.push(here);
        } else if let Some(sent) = offer(&mut ch, service, img, &h)? {
            report.sent.push(sent);
        } else {
            report.already.push(here);
        }
        report.acknowledged.push(h.id);
    }
    let _ = proto::send(&mut ch, &Msg::Bye);
    Ok(report)
}

/// Offers one image; sends it if the receiver takes it. `None`: the receiver had it.
fn offer(
    ch: &mut Channel<TcpStream>,
    service: &str,
    img: &Image,
    h: &Held,
) -> Result<Option<SentImage>, ReplicateError> {
    let addr = ch.get_ref().peer_addr().ok();
    let peer = |source| match addr {
        Some(addr) => ReplicateError::Peer { addr, source },
        None => ReplicateError::Wire(source),
    };
    let t0 = Instant::now();
    let o = Offer {
        service: service.into(),
        file: h.file.clone(),
        id: h.id,
        parent_id: h.parent_id,
        parent_file: img.meta.parent.as_ref().map(|p| p.file.clone()),
        lineage: h.lineage,
        generation: h.generation,
        size: img.file_len,
        created_ns: h.created_ns,
    };
    proto::send(ch, &Msg::Offer(o)).map_err(peer)?;
    match proto::recv(ch)? {
        Msg::Accept => {}
        Msg::Have => return Ok(None),
        Msg::Refuse { why } => {
            return Err(ReplicateError::Refused {
                file: h.file.clone(),
                why,
            })
        }
        m => return Err(unexpected(&m, "accept, have or refuse")),
    }
    send_data(ch, img).map_err(|e| match e {
        ReplicateError::Wire(w) => peer(w),
        e => e,
    })?;
    match proto::recv(ch)? {
        Msg::Ack { id } if id == h.id => Ok(Some(SentImage {
            file: h.file.clone(),
            id: h.id,
            bytes: img.file_len,
            elapsed: t0.elapsed(),
        })),
        Msg::Failed { why } => Err(ReplicateError::Refused {
            file: h.file.clone(),
            why,
        }),
        m => Err(unexpected(&m, "ack or failed")),
    }
}

/// The image file, in frames of [`DATA_CHUNK`] bytes sent from a read-only mapping of it (no
/// copy into a buffer; the MAC reads the page cache directly).
fn send_data(ch: &mut Channel<TcpStream>, img: &Image) -> Result<(), ReplicateError> {
    // SAFETY: a committed image is never changed or cut short in place (writers rename a new
    // file over its name, and the descriptor keeps the old one), so the mapping's pages stay
    // what was read and touching them cannot raise SIGBUS.
    let map = unsafe { memmap2::Mmap::map(&img.file) }
        .map_err(|e| ReplicateError::io("map", &img.path, e))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    for chunk in map.chunks(DATA_CHUNK) {
        ch.send(Kind::Data, chunk)?;
    }
    Ok(())
}
