//! Image replication: moving a service's images from the node that runs it to the stores of
//! the others, as CRIU's page server moves CRIU's pages.
//!
//! - `key.rs`: the key every node holds ([`MacKey`]).
//! - `wire.rs`: the authenticated stream (handshake proving the key both ways, MAC'd frames).
//! - `proto.rs`: the control messages of a session ([`Offer`] and the rest).
//! - `receive.rs`: [`Receiver`], which checks, commits and acknowledges images.
//! - `send.rs`: [`push`], which sends a directory's newest image and its parents.
//! - `store.rs`: what a store holds ([`newest`]) and how an image enters one.
//! - `cli.rs`: the hidden `snapshim replicate` commands (tests, benchmark).
//!
//! The stream is authenticated, not encrypted.

// The API is the node agent's (`cluster/agent`); the hidden CLI uses only part of it.
#![allow(dead_code, unused_imports)]

mod cli;
mod key;
mod proto;
mod receive;
mod send;
mod store;
#[cfg(test)]
mod tests;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use cli::{run, ReplicateArgs};
pub use key::MacKey;
pub use proto::{HeldRef, Offer};
pub use receive::{Gate, OnCommit, Options, Receiver};
pub use send::{push, push_only, PushReport, SentImage};
pub use store::{newest, Held};
pub use wire::WireError;

/// Why replication failed: one line, saying what and why.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("key file {}: {why}", .path.display())]
    Key { path: PathBuf, why: String },
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("replication with {addr}: {source}")]
    Peer { addr: SocketAddr, source: WireError },
    #[error("replication: {0}")]
    Wire(#[from] WireError),
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("the receiver refused {file}: {why}")]
    Refused { file: String, why: String },
    #[error("{}: {why}", .path.display())]
    Image { path: PathBuf, why: String },
    #[error("{} holds no complete image to send", .0.display())]
    NoImage(PathBuf),
}

impl ReplicateError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> ReplicateError {
        ReplicateError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<ReplicateError> for crate::Failure {
    fn from(e: ReplicateError) -> crate::Failure {
        crate::Failure::op(e.to_string())
    }
}
