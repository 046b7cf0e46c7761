//! Placeholder with the replication API's shape, until the `replicate` branch is merged.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplicateError(String);

pub struct MacKey;
impl MacKey {
    pub fn generate(_: &Path) -> Result<MacKey, ReplicateError> {
        Err(ReplicateError("not merged".into()))
    }
    pub fn load(_: &Path) -> Result<MacKey, ReplicateError> {
        Ok(MacKey)
    }
}

pub struct Offer {
    pub service: String,
    pub file: String,
    pub generation: u32,
}

pub type Gate = Arc<dyn Fn(&Offer) -> Result<(), String> + Send + Sync>;

pub struct Receiver;
impl Receiver {
    pub fn serve(
        _: TcpListener,
        _: MacKey,
        _: PathBuf,
        _: Gate,
    ) -> Result<Receiver, ReplicateError> {
        Ok(Receiver)
    }
    pub fn stop(self) {}
}

pub struct Held {
    pub id: u64,
    pub seq: u64,
}

pub struct PushReport {
    pub newest: Held,
    pub acknowledged: Vec<u64>,
}

pub fn push(
    _: SocketAddr,
    _: &MacKey,
    _: &str,
    _: &Path,
    _: Duration,
) -> Result<PushReport, ReplicateError> {
    Err(ReplicateError("not merged".into()))
}
