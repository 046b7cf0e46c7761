//! The control messages of a replication session (JSON in [`Kind::Control`] frames).
//!
//! ```text
//! sender                               receiver
//! Hello{service}                 ──▶
//!                                ◀──   Holding{images}        (committed: file, id)
//! Offer{...}                     ──▶                          (for each image it lacks,
//!                                ◀──   Accept | Have | Refuse  parents first)
//! Data × ceil(size / 1 MiB)      ──▶   (after Accept)
//!                                ◀──   Ack{id} | Failed{why}   (Ack: committed and fsynced)
//! Bye                            ──▶
//! ```

use serde::{Deserialize, Serialize};

use super::wire::{Channel, Kind, WireError};
use super::ReplicateError;

/// An image a sender proposes: what the receiver's gate decides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The service (the image directory's name in the store).
    pub service: String,
    /// The image's file name (`ckpt-N.snap`).
    pub file: String,
    pub id: u64,
    /// The parent's image id for a delta, 0 for a full image.
    pub parent_id: u64,
    /// The parent's file name for a delta.
    pub parent_file: Option<String>,
    /// The lineage and generation that wrote the image (0 in images older than format 1.4).
    pub lineage: u64,
    pub generation: u32,
    /// Bytes of the file.
    pub size: u64,
    /// When the snapshot was taken, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// A committed image a receiver holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRef {
    pub file: String,
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    Hello { service: String },
    Holding { images: Vec<HeldRef> },
    Offer(Offer),
    Accept,
    Have,
    Refuse { why: String },
    Ack { id: u64 },
    Failed { why: String },
    Bye,
}

impl Msg {
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Holding { .. } => "holding",
            Msg::Offer(_) => "offer",
            Msg::Accept => "accept",
            Msg::Have => "have",
            Msg::Refuse { .. } => "refuse",
            Msg::Ack { .. } => "ack",
            Msg::Failed { .. } => "failed",
            Msg::Bye => "bye",
        }
    }
}

pub fn send<S: std::io::Read + std::io::Write>(
    ch: &mut Channel<S>,
    m: &Msg,
) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(m).expect("messages always serialize");
    ch.send(Kind::Control, &bytes)
}

/// The next frame, which must be a control message.
pub fn recv<S: std::io::Read + std::io::Write>(ch: &mut Channel<S>) -> Result<Msg, ReplicateError> {
    match ch.recv()? {
        (Kind::Control, b) => serde_json::from_slice(b).map_err(|e| {
            ReplicateError::Protocol(format!("a control message does not decode: {e}"))
        }),
        (Kind::Data, _) => Err(ReplicateError::Protocol(
            "image data came where a control message was expected".into(),
        )),
    }
}
