//! What this node holds for the cluster: the context every step needs ([`Ctx`]) and, per
//! service, what it keeps here ([`Service`]: its directory, lease, warm standby and what it
//! last saw and published). What the node *is* for a service (its role) is the leader's
//! `Role`, kept beside it by the agent's loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::etcd::Etcd;
use super::events::Log;
use super::lease::Lease;
use super::replicate::MacKey;

/// What every step needs.
pub struct Ctx {
    pub etcd: Etcd,
    pub node: String,
    /// Where this node's receiver listens, as other nodes reach it.
    pub address: String,
    pub store: PathBuf,
    pub key: Arc<MacKey>,
    pub log: Log,
    /// Per service, the generation of the leader key: older images are refused.
    pub gate: Arc<Mutex<HashMap<String, u32>>>,
}

/// One service on this node.
pub struct Service {
    pub name: String,
    /// `STORE/NAME`: where its images are, received or written by the program here.
    pub dir: PathBuf,
    /// The service lease: the leader key when leading, the standby key otherwise.
    pub lease: Option<Arc<Lease>>,
    /// The warm standby (`snapshim-restore --standby`), while a standby.
    pub standby: Option<Child>,
    pub standby_started: Option<Instant>,
    /// The generation of the newest image when the warm standby started: what it staged.
    pub standby_generation: u32,
    /// The standby key as last written (with the lease it was written on).
    pub published: String,
    /// The leader key was there at the last look (with this generation).
    pub leader_seen: Option<u32>,
    /// Since when the leader key has been missing.
    pub absent_since: Option<Instant>,
    /// That no live node holds the acknowledged image was said (sync mode).
    pub no_holder_noted: bool,
}

impl Service {
    pub fn new(store: &Path, name: &str) -> Service {
        Service {
            name: name.to_string(),
            dir: store.join(name),
            lease: None,
            standby: None,
            standby_started: None,
            standby_generation: 0,
            published: String::new(),
            leader_seen: None,
            absent_since: None,
            no_holder_noted: false,
        }
    }

    /// The service lease, granted anew when there is none or it was lost.
    pub fn lease(&mut self, ctx: &Ctx, ttl: Duration) -> Result<Arc<Lease>, String> {
        if let Some(l) = &self.lease {
            if !l.lost() {
                return Ok(l.clone());
            }
            let _ = ctx.etcd.revoke(l.id());
        }
        self.lease = None;
        let l = Lease::grant(&ctx.etcd, ttl)?;
        self.lease = Some(l.clone());
        Ok(l)
    }
}

/// Raises the gate of `service` to `generation`.
pub fn raise(gate: &mut HashMap<String, u32>, service: &str, generation: u32) {
    let g = gate.entry(service.to_string()).or_insert(0);
    *g = (*g).max(generation);
}
