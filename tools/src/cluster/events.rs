//! The agent's events: one line each on stderr (`snapshim node: ...`, or one JSON object with
//! `--json-log`), and the operator's hook script, run as `SCRIPT EVENT SERVICE NODE GENERATION
//! [DETAIL]` like Patroni's callbacks. The hook runs in the background: a slow script never
//! delays a failover; its exit status is logged.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::json;

use super::keys::now_ms;

/// The events a hook is called for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The leader key is gone (seen by a standby), or this leader lost it.
    LeaderLost,
    /// This standby took the leader key after the leader was lost.
    Failover,
    /// The program runs on this node (fresh, restored or activated).
    Activated,
    /// The service went back to its preferred node.
    Failback,
    /// A planned move away from this node.
    Switchover,
    CheckpointFailed,
    ReplicationFailed,
    LagOverLimit,
    /// This leader stopped its program because it could not renew its lease in time.
    Fenced,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::LeaderLost => "leader-lost",
            Event::Failover => "failover",
            Event::Activated => "activated",
            Event::Failback => "failback",
            Event::Switchover => "switchover",
            Event::CheckpointFailed => "checkpoint-failed",
            Event::ReplicationFailed => "replication-failed",
            Event::LagOverLimit => "lag-over-limit",
            Event::Fenced => "fenced",
        }
    }
}

/// Where the events go.
#[derive(Clone)]
pub struct Log {
    pub node: String,
    pub hook: Option<PathBuf>,
    pub json: bool,
}

impl Log {
    /// A line that is not an event (start, stop, errors).
    pub fn note(&self, text: &str) {
        if self.json {
            let doc = json!({ "time_ms": now_ms(), "node": self.node, "note": text });
            eprintln!("{doc}");
        } else {
            eprintln!("snapshim node: {}: {text}", self.node);
        }
    }

    /// An event: logged, and passed to the hook.
    pub fn event(&self, ev: Event, service: &str, generation: u32, detail: &str) {
        if self.json {
            let doc = json!({
                "time_ms": now_ms(), "node": self.node, "event": ev.name(),
                "service": service, "generation": generation, "detail": detail,
            });
            eprintln!("{doc}");
        } else {
            let sep = if detail.is_empty() { "" } else { ": " };
            eprintln!(
                "snapshim node: {}: {} {service} generation {generation}{sep}{detail}",
                self.node,
                ev.name()
            );
        }
        let Some(hook) = &self.hook else { return };
        let mut cmd = Command::new(hook);
        cmd.arg(ev.name())
            .arg(service)
            .arg(&self.node)
            .arg(generation.to_string());
        if !detail.is_empty() {
            cmd.arg(detail);
        }
        let hook = hook.clone();
        let node = self.node.clone();
        match cmd.stdin(Stdio::null()).spawn() {
            Ok(mut child) => {
                std::thread::spawn(move || match child.wait() {
                    Ok(s) if s.success() => {}
                    Ok(s) => eprintln!(
                        "snapshim node: {node}: hook {} {}: {s}",
                        hook.display(),
                        ev.name()
                    ),
                    Err(e) => eprintln!("snapshim node: {node}: hook {}: {e}", hook.display()),
                });
            }
            Err(e) => eprintln!(
                "snapshim node: {node}: cannot run the hook {}: {e}",
                hook.display()
            ),
        }
    }
}
