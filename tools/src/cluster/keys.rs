//! The keys the cluster keeps in etcd and the JSON document stored at each.
//!
//! ```text
//! /snapshim/nodes/NODE                  NodeInfo      on the node's lease
//! /snapshim/services/NAME/spec          Spec          no lease (`service add`, `remove`)
//! /snapshim/services/NAME/leader        Leader        on the leader's service lease
//! /snapshim/services/NAME/checkpoint    Checkpoint    on the leader's service lease
//! /snapshim/services/NAME/standbys/NODE Standby       on the standby's node lease
//! /snapshim/services/NAME/committed     Image         no lease (sync mode's acknowledged image)
//! /snapshim/services/NAME/switchover    Switchover    no lease (a request, deleted when done)
//! /snapshim/services/NAME/finished      Finished      no lease (the program ended by itself)
//! ```

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub fn node(name: &str) -> String {
    format!("/snapshim/nodes/{name}")
}

pub fn nodes() -> String {
    "/snapshim/nodes/".into()
}

pub fn services() -> String {
    "/snapshim/services/".into()
}

/// `/snapshim/services/NAME/` + `what`.
pub fn service(name: &str, what: &str) -> String {
    format!("/snapshim/services/{name}/{what}")
}

pub fn standby(service_name: &str, node_name: &str) -> String {
    format!("/snapshim/services/{service_name}/standbys/{node_name}")
}

/// Replication mode of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Async,
    Sync,
}

/// A service as `snapshim service add` defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub command: Vec<String>,
    /// Checkpoint interval, as `snapshim run --interval` takes it.
    pub interval: String,
    pub incremental: bool,
    /// How many standbys receive the images (sync mode: how many must hold one for it to count
    /// as committed).
    pub standbys: u32,
    pub prefer: Option<String>,
    pub mode: Mode,
    /// The leader lease's TTL, in milliseconds (etcd grants whole seconds, rounded up).
    pub ttl_ms: u64,
    /// Where the program's stdout and stderr go (the same path on every node).
    pub output: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
}

/// A node agent, as it registers itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where its image receiver listens (`HOST:PORT`).
    pub address: String,
    pub health: String,
    pub pid: u32,
    pub since_ms: u64,
}

/// The leader key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    pub node: String,
    /// The generation of the program instance this leader runs (images it writes carry it).
    pub generation: u32,
    pub address: String,
}

/// One image, as the cluster names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The image's random identity (`Header::image_id`).
    pub id: u64,
    /// Its number in the image directory (`ckpt-SEQ.snap`).
    pub seq: u64,
    pub generation: u32,
    /// When the snapshot was taken (Unix ms).
    pub time_ms: u64,
}

/// The leader's last committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub image: Image,
    pub node: String,
}

/// What a standby holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standby {
    pub node: String,
    /// `warm` (a warm standby waits on the image), `empty` (no image yet), `cold` (images but
    /// no warm standby running).
    pub state: String,
    pub image: Option<Image>,
    /// The standby's service lease: the leader hands the key over onto it in a switchover.
    pub lease: i64,
    pub time_ms: u64,
}

/// A request to move the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    pub to: String,
}

/// The program ended by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub node: String,
    pub generation: u32,
    pub status: i32,
    pub time_ms: u64,
}

/// Wall-clock now, Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `value` as JSON text (our own types always encode).
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Decodes a stored document; a damaged one is reported with its key.
pub fn from_json<T: for<'a> Deserialize<'a>>(key: &str, text: &[u8]) -> Result<T, String> {
    serde_json::from_slice(text).map_err(|e| format!("{key} holds an unreadable value: {e}"))
}
