//! `snapshim node run|keygen`: the command line of the node agent (`agent.rs`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::agent::{self, Config};
use super::etcd::Etcd;
use super::replicate::MacKey;
use crate::{Failure, Result};

/// Per-request timeout towards etcd, per endpoint.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(2);

/// Run the node agent of this machine, or make a replication key
#[derive(Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand)]
enum NodeCommand {
    Run(RunArgs),
    /// Write a new replication key to FILE (give the same file to every node)
    Keygen {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The agent of one machine: registers the node in etcd, receives images, and for each service
/// is its leader (runs the program) or a standby (a warm standby on the newest image)
///
/// Logs one line per event on stderr; SIGTERM stops it cleanly (a leader takes a last
/// checkpoint, pushes it to the standbys, stops the program and gives up the key).
#[derive(Args)]
#[command(
    after_help = "Example:\n  snapshim node run --etcd http://10.0.0.1:2379 --name a \
                        --listen 10.0.0.11:7070 --store /var/lib/snapshim --key /etc/snapshim/key"
)]
pub struct RunArgs {
    /// etcd endpoints, comma-separated http://HOST:PORT [default: $SNAPSHIM_ETCD]
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// This node's name in the cluster
    #[arg(long, value_name = "NODE", value_parser = node_name)]
    pub name: String,
    /// Address the image receiver listens on, as the other nodes reach it
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// The image store: one directory per service
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// The replication key (`snapshim node keygen`), the same on every node
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Run SCRIPT EVENT SERVICE NODE GENERATION [DETAIL] at each event
    #[arg(long, value_name = "SCRIPT")]
    pub hook: Option<PathBuf>,
    /// Log events as JSON objects, one per line
    #[arg(long)]
    pub json_log: bool,
}

/// A node or service name: letters, digits, `-`, `_`, `.`, not starting with `.`.
pub fn node_name(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a name (letters, digits, '-', '_', '.'; at most 64; not starting with '.')"
        ))
    }
}

/// The etcd client for `--etcd`, else `$SNAPSHIM_ETCD`.
pub fn etcd(arg: &Option<String>) -> Result<Etcd> {
    let urls = arg
        .clone()
        .or_else(|| std::env::var("SNAPSHIM_ETCD").ok())
        .unwrap_or_default();
    Etcd::new(&urls, ETCD_TIMEOUT).map_err(Failure::usage)
}

pub fn run(a: NodeArgs) -> Result<()> {
    match a.command {
        NodeCommand::Keygen { file } => {
            MacKey::generate(&file).map_err(|e| Failure::op(e.to_string()))?;
            println!("wrote a new replication key to {}", file.display());
            Ok(())
        }
        NodeCommand::Run(r) => {
            let store = std::path::absolute(&r.store)
                .map_err(|e| Failure::op(format!("cannot resolve {}: {e}", r.store.display())))?;
            let cfg = Config {
                etcd: etcd(&r.etcd)?,
                node: r.name,
                listen: r.listen,
                store,
                key: r.key,
                hook: r.hook,
                json_log: r.json_log,
            };
            agent::run(cfg).map_err(Failure::op)
        }
    }
}
