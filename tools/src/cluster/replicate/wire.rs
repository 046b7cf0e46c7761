//! The authenticated stream between a sender and a receiver: the handshake that proves the key
//! both ways, then frames, each with a MAC under a session key and a frame counter.
//!
//! ```text
//! handshake (plain):
//!   client → server   "SNAPREPL" version:u16 nonce_c[32]
//!   server → client   "SNAPREPL" version:u16 nonce_s[32] proof_s[32]
//!   client → server   proof_c[32]
//!   proof_R = keyed_blake3(key, "snapshim-replicate proof " R || nonce_c || nonce_s)
//!
//! then frames, each direction with its own session key and counter (from 0):
//!   kind:u8  len:u32le  payload[len]  tag[32]
//!   tag = keyed_blake3(session_key, counter:u64le || kind || len || payload)
//!   session_key(dir) = keyed_blake3(key, "snapshim-replicate session " dir || nonce_c || nonce_s)
//! ```
//!
//! The client checks the server's proof before it proves anything itself, so a receiver without
//! the key learns no proof it could replay; a client without the key is dropped by the server
//! after its proof. Fresh nonces on both sides make every session's keys new, so no frame of
//! another session verifies; the counter, never sent, makes a replayed, dropped or reordered
//! frame fail its MAC. The stream is authenticated, not encrypted: an eavesdropper on the link
//! sees the images.

use std::io::{IoSlice, Read, Write};

/// First bytes of both hellos.
pub const MAGIC: [u8; 8] = *b"SNAPREPL";
/// Protocol version; a peer of another version is refused at the hello.
pub const VERSION: u16 = 1;
pub const NONCE_LEN: usize = 32;
pub const TAG_LEN: usize = 32;
/// Bytes of frame header: kind and payload length.
pub const HEAD_LEN: usize = 5;
/// Page data travels in frames of this many payload bytes (the last one of a file shorter).
pub const DATA_CHUNK: usize = 1 << 20;
/// The largest payload a reader accepts (a control message listing many images fits).
pub const MAX_PAYLOAD: usize = 4 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A control message (JSON, see `proto.rs`).
    Control = 1,
    /// Bytes of the image file being sent.
    Data = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Control),
            2 => Some(Kind::Data),
            _ => None,
        }
    }
}

/// Why the stream failed. One line each.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer is not a snapshim replication peer (bad hello)")]
    NotPeer,
    #[error("the peer speaks replication protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    #[error("the peer does not hold the same key (its proof of the key is wrong)")]
    BadProof,
    #[error("a frame fails its MAC (tampered, replayed, reordered or another key)")]
    BadTag,
    #[error("a frame announces {0} bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLong(usize),
    #[error("a frame has unknown kind {0}")]
    BadKind(u8),
    #[error("the peer closed the connection")]
    Closed,
}

/// The roles, as the strings the proofs and session keys are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
}

fn keyed(key: &[u8; 32], parts: &[&[u8]]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn proof(key: &[u8; 32], role: Role, nc: &[u8], ns: &[u8]) -> blake3::Hash {
    keyed(key, &[b"snapshim-replicate proof ", role.label(), nc, ns])
}

fn session_key(key: &[u8; 32], sender: Role, nc: &[u8], ns: &[u8]) -> [u8; 32] {
    *keyed(
        key,
        &[b"snapshim-replicate session ", sender.label(), nc, ns],
    )
    .as_bytes()
}

/// 32 bytes from the kernel's random generator.
pub fn random32() -> std::io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: writes at most `len - got` bytes into our own buffer from offset `got`.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        got += n as usize;
    }
    Ok(b)
}

fn hello(nonce: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 2 + NONCE_LEN);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(nonce);
    v
}

fn read_hello<S: Read>(s: &mut S) -> Result<[u8; 32], WireError> {
    let mut b = [0u8; 8 + 2 + NONCE_LEN];
    read_exact(s, &mut b)?;
    if b[..8] != MAGIC {
        return Err(WireError::NotPeer);
    }
    let v = u16::from_le_bytes([b[8], b[9]]);
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    Ok(b[10..].try_into().expect("32 bytes"))
}

/// `read_exact`, with end of stream as [`WireError::Closed`].
fn read_exact<S: Read>(s: &mut S, b: &mut [u8]) -> Result<(), WireError> {
    s.read_exact(b).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

/// One direction's MAC state.
struct Mac {
    key: [u8; 32],
    counter: u64,
}

impl Mac {
    fn tag(&self, kind: u8, payload: &[u8]) -> blake3::Hash {
        let len = (payload.len() as u32).to_le_bytes();
        keyed(
            &self.key,
            &[&self.counter.to_le_bytes(), &[kind], &len, payload],
        )
    }
}

/// An authenticated stream: frames out under one session key, frames in under the other.
pub struct Channel<S> {
    stream: S,
    out: Mac,
    inn: Mac,
    /// The frame being read: payload then tag.
    rbuf: Vec<u8>,
}

impl<S: Read + Write> Channel<S> {
    /// The client's side of the handshake: fails with [`WireError::BadProof`] before proving
    /// anything when the server does not hold `key`.
    pub fn client(mut stream: S, key: &[u8; 32]) -> Result<Channel<S>, WireError> {
        let nc = random32()?;
        stream.write_all(&hello(&nc))?;
        let ns = read_hello(&mut stream)?;
        let mut p = [0u8; TAG_LEN];
        read_exact(&mut stream, &mut p)?;
        if blake3::Hash::from(p) != proof(key, Role::Server, &nc, &ns) {
            return Err(WireError::BadProof);
        }
        stream.write_all(proof(key, Role::Client, &nc, &ns).as_bytes())?;
        Ok(Channel::new(stream, key, Role::Client, &nc, &ns))
    }

    /// The server's side: fails with [`WireError::BadProof`] when the client does not hold
    /// `key` (the caller closes the connection).
    pub fn server(mut stream: S, key: &[u8; 32]) -> Result<Channel<S>, WireError> {
        let nc = read_hello(&mut stream)?;
        let ns = random32()?;
        let mut out = hello(&ns);
        out.extend_from_slice(proof(key, Role::Server, &nc, &ns).as_bytes());
        stream.write_all(&out)?;
        let mut p = [0u8; TAG_LEN];
        read_exact(&mut stream, &mut p)?;
        if blake3::Hash::from(p) != proof(key, Role::Client, &nc, &ns) {
            return Err(WireError::BadProof);
        }
        Ok(Channel::new(stream, key, Role::Server, &nc, &ns))
    }

    fn new(stream: S, key: &[u8; 32], me: Role, nc: &[u8], ns: &[u8]) -> Channel<S> {
        let peer = match me {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        };
        Channel {
            stream,
            out: Mac {
                key: session_key(key, me, nc, ns),
                counter: 0,
            },
            inn: Mac {
                key: session_key(key, peer, nc, ns),
                counter: 0,
            },
            rbuf: Vec::new(),
        }
    }

    /// Sends one frame: header, payload and tag in one `writev`, the payload not copied.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        let tag = self.out.tag(kind as u8, payload);
        let mut head = [0u8; HEAD_LEN];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        write_all_parts(&mut self.stream, [&head[..], payload, tag.as_bytes()])?;
        self.out.counter += 1;
        Ok(())
    }

    /// Reads and checks the next frame: its kind and payload (valid until the next call).
    pub fn recv(&mut self) -> Result<(Kind, &[u8]), WireError> {
        let mut head = [0u8; HEAD_LEN];
        read_exact(&mut self.stream, &mut head)?;
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLong(len));
        }
        self.rbuf.resize(len + TAG_LEN, 0);
        read_exact(&mut self.stream, &mut self.rbuf)?;
        let (payload, tag) = self.rbuf.split_at(len);
        let tag: [u8; TAG_LEN] = tag.try_into().expect("TAG_LEN bytes");
        if blake3::Hash::from(tag) != self.inn.tag(head[0], payload) {
            return Err(WireError::BadTag);
        }
        self.inn.counter += 1;
        let kind = Kind::from_byte(head[0]).ok_or(WireError::BadKind(head[0]))?;
        Ok((kind, &self.rbuf[..len]))
    }

    /// [`Channel::recv`], handing over the buffer that holds the payload (truncated to it)
    /// and keeping `spare` to read the next frame into: the payload is never copied.
    pub fn recv_owned(&mut self, spare: Vec<u8>) -> Result<(Kind, Vec<u8>), WireError> {
        let (kind, len) = {
            let (kind, payload) = self.recv()?;
            (kind, payload.len())
        };
        let mut full = std::mem::replace(&mut self.rbuf, spare);
        full.truncate(len);
        Ok((kind, full))
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

/// `write_all` of several slices, with as few `writev` calls as the socket allows.
fn write_all_parts<S: Write>(s: &mut S, parts: [&[u8]; 3]) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.into_iter().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let io: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut n = match s.write_vectored(&io) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            if n >= parts[0].len() {
                n -= parts[0].len();
                parts.remove(0);
            } else {
                parts[0] = &parts[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(
        kc: [u8; 32],
        ks: [u8; 32],
    ) -> (
        Result<Channel<UnixStream>, WireError>,
        Result<Channel<UnixStream>, WireError>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || Channel::server(b, &ks));
        // A client that refused drops its end, which ends the server's read.
        let client = Channel::client(a, &kc);
        (client, server.join().unwrap())
    }

    #[test]
    fn frames_pass_between_holders_of_the_key() {
        let (c, s) = pair([7; 32], [7; 32]);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.send(Kind::Control, b"hello").unwrap();
        c.send(Kind::Data, &[1, 2, 3]).unwrap();
        assert_eq!(s.recv().unwrap(), (Kind::Control, &b"hello"[..]));
        assert_eq!(s.recv().unwrap(), (Kind::Data, &[1u8, 2, 3][..]));
        s.send(Kind::Control, b"back").unwrap();
        assert_eq!(c.recv().unwrap(), (Kind::Control, &b"back"[..]));
    }

    #[test]
    fn a_wrong_key_is_refused_both_ways() {
        let (c, s) = pair([1; 32], [2; 32]);
        assert!(matches!(c, Err(WireError::BadProof)), "client accepted");
        // The client never proved anything: the server saw the connection end.
        assert!(matches!(s, Err(WireError::Closed)), "server: {:?}", s.err());
    }

    #[test]
    fn a_client_with_a_wrong_key_is_refused_by_the_server() {
        // A client that skips the check of the server's proof and answers with a proof made
        // under its own (wrong) key.
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || Channel::server(b, &[5; 32]).err());
        let nc = [9u8; 32];
        a.write_all(&hello(&nc)).unwrap();
        let ns = read_hello(&mut a).unwrap();
        let mut p = [0u8; 32];
        a.read_exact(&mut p).unwrap();
        a.write_all(proof(&[6; 32], Role::Client, &nc, &ns).as_bytes())
            .unwrap();
        assert!(matches!(server.join().unwrap(), Some(WireError::BadProof)));
    }

    /// Runs a session where `tamper` changes the client's bytes on their way to the server.
    fn tampered(tamper: impl Fn(&mut Vec<u8>) + Send + 'static) -> WireError {
        let (a, b) = UnixStream::pair().unwrap();
        let (mid_a, mid_b) = UnixStream::pair().unwrap();
        // client (a) ↔ relay (b, mid_a) ↔ server (mid_b)
        let relay = std::thread::spawn(move || {
            let (mut b2, mut m2) = (b.try_clone().unwrap(), mid_a.try_clone().unwrap());
            let back = std::thread::spawn(move || std::io::copy(&mut m2, &mut b2));
            let mut b = b;
            let mut mid_a = mid_a;
            let mut hs = [0u8; 42 + 32];
            b.read_exact(&mut hs[..42]).unwrap();
            mid_a.write_all(&hs[..42]).unwrap();
            // The proof, then the frames: collected and changed.
            let mut rest = Vec::new();
            b.read_to_end(&mut rest).unwrap();
            let (p, frames) = rest.split_at(32);
            let mut frames = frames.to_vec();
            tamper(&mut frames);
            mid_a.write_all(p).unwrap();
            mid_a.write_all(&frames).unwrap();
            // End of the client's stream (the copy thread still holds a clone).
            mid_a.shutdown(std::net::Shutdown::Write).unwrap();
            // Its outcome is not the test's: a server that stops early resets the copy.
            let _ = back.join();
        });
        let server = std::thread::spawn(move || {
            let mut s = Channel::server(mid_b, &[3; 32]).unwrap();
            loop {
                if let Err(e) = s.recv() {
                    return e;
                }
            }
        });
        let mut c = Channel::client(a, &[3; 32]).unwrap();
        c.send(Kind::Control, b"first").unwrap();
        c.send(Kind::Data, b"second frame").unwrap();
        drop(c);
        relay.join().unwrap();
        server.join().unwrap()
    }

    const F1: usize = HEAD_LEN + 5 + TAG_LEN;

    #[test]
    fn an_untouched_stream_ends_cleanly() {
        assert!(matches!(tampered(|_| {}), WireError::Closed));
    }

    #[test]
    fn a_flipped_payload_byte_fails_the_mac() {
        assert!(matches!(
            tampered(|f| f[HEAD_LEN + 1] ^= 1),
            WireError::BadTag
        ));
    }

    #[test]
    fn a_changed_kind_fails_the_mac() {
        assert!(matches!(tampered(|f| f[F1] = 1), WireError::BadTag));
    }

    #[test]
    fn reordered_frames_fail_the_mac() {
        assert!(matches!(
            tampered(|f| {
                let first = f[..F1].to_vec();
                f.drain(..F1);
                f.extend_from_slice(&first);
            }),
            WireError::BadTag
        ));
    }

    #[test]
    fn a_replayed_frame_fails_the_mac() {
        assert!(matches!(
            tampered(|f| {
                let first = f[..F1].to_vec();
                f.splice(F1..F1, first);
            }),
            WireError::BadTag
        ));
    }

    #[test]
    fn a_dropped_frame_fails_the_mac() {
        assert!(matches!(
            tampered(|f| drop(f.drain(..F1))),
            WireError::BadTag
        ));
    }
}
