//! `snapshim node run`: the agent of one machine. It registers the node, receives images for
//! every service into its store, and for each service defined in etcd is that service's
//! leader (runs the program, streams its images: `leader.rs`) or a standby (keeps a warm
//! standby, takes over when the leader is lost: `standby.rs`).
//!
//! The main loop looks at etcd every tick (at most 100 ms, and at most a tenth of the shortest
//! service TTL), decides, acts, and looks again: no watch stream, so a lost connection needs no
//! recovery. Leases are renewed, and the fence fires, on threads of their own (`lease.rs`), so
//! a slow step of the loop never delays either.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::etcd::Etcd;
use super::events::Log;
use super::keys::{self, now_ms, to_json, NodeInfo};
use super::leader::{self, Role};
use super::lease::Lease;
use super::local::{raise, Ctx, Service};
use super::replicate::{Gate, MacKey, Offer, Receiver};
use super::standby;
use super::view::{self, View};

/// TTL of the node's own lease (its `/snapshim/nodes/NODE` key): how long a dead node stays
/// listed as a push target.
const NODE_TTL: Duration = Duration::from_secs(3);
/// The longest tick.
const MAX_TICK: Duration = Duration::from_millis(100);

/// What `snapshim node run` was given.
pub struct Config {
    pub etcd: Etcd,
    pub node: String,
    pub listen: String,
    pub store: PathBuf,
    pub key: PathBuf,
    pub hook: Option<PathBuf>,
    pub json_log: bool,
}

/// One service on this node: what it keeps here, and what it is for the service.
struct Entry {
    svc: Service,
    role: Role,
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    TERMINATE.store(true, Ordering::SeqCst);
}

pub fn run(cfg: Config) -> Result<(), String> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
    let listener = TcpListener::bind(&cfg.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let load = || MacKey::load(&cfg.key).map_err(|e| e.to_string());
    let (key, receiver_key) = (load()?, load()?);
    std::fs::create_dir_all(&cfg.store)
        .map_err(|e| format!("cannot create the store {}: {e}", cfg.store.display()))?;
    let gate_map: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let receiver = Receiver::serve(listener, receiver_key, cfg.store.clone(), gate(&gate_map))
        .map_err(|e| e.to_string())?;
    let ctx = Ctx {
        etcd: cfg.etcd,
        address: cfg.listen.clone(),
        store: cfg.store,
        key: Arc::new(key),
        log: Log {
            node: cfg.node.clone(),
            hook: cfg.hook,
            json: cfg.json_log,
        },
        node: cfg.node,
        gate: gate_map,
    };
    // etcd may come up after the agents: wait for it (saying why once).
    let mut last_error = String::new();
    let mut node_lease = loop {
        match register(&ctx) {
            Ok(l) => break l,
            Err(e) => note_once(&ctx, &mut last_error, e),
        }
        if TERMINATE.load(Ordering::SeqCst) {
            receiver.stop();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    ctx.log.note(&format!(
        "joined: images on {}, store {}",
        ctx.address,
        ctx.store.display()
    ));
    let mut services: BTreeMap<String, Entry> = BTreeMap::new();
    let base_timeout = ctx.etcd.timeout();
    while !TERMINATE.load(Ordering::SeqCst) {
        if node_lease.lost() {
            match register(&ctx) {
                Ok(l) => node_lease = l,
                Err(e) => note_once(&ctx, &mut last_error, e),
            }
        }
        for e in services.values_mut() {
            leader::check_fence(&ctx, &mut e.svc, &mut e.role);
        }
        ctx.etcd.set_timeout(etcd_timeout(&services, base_timeout));
        match tick(&ctx, &mut services) {
            Ok(()) => last_error.clear(),
            Err(e) => note_once(&ctx, &mut last_error, e),
        }
        std::thread::sleep(period(&services));
    }
    ctx.log.note("stopping (signal)");
    for Entry { svc, role } in services.values_mut() {
        leader::shut_down(&ctx, svc, role);
        standby::stop_standby(svc);
        if let Some(l) = svc.lease.take() {
            l.release(&ctx.etcd);
        }
    }
    node_lease.release(&ctx.etcd);
    receiver.stop();
    ctx.log.note("stopped");
    Ok(())
}

/// The receiver's gate: an image of an older generation than the leader key's is refused.
fn gate(map: &Arc<Mutex<HashMap<String, u32>>>) -> Gate {
    let map = map.clone();
    Arc::new(move |offer: &Offer| {
        let leader = map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&offer.service)
            .copied();
        match leader {
            Some(g) if offer.generation != 0 && offer.generation < g => Err(format!(
                "{} is of generation {}, older than the leader's {g}",
                offer.file, offer.generation
            )),
            _ => Ok(()),
        }
    })
}

fn note_once(ctx: &Ctx, last: &mut String, e: String) {
    if *last != e {
        ctx.log.note(&e);
        *last = e;
    }
}

/// Registers the node on a new lease.
fn register(ctx: &Ctx) -> Result<Arc<Lease>, String> {
    let lease = Lease::grant(&ctx.etcd, NODE_TTL)?;
    let info = NodeInfo {
        address: ctx.address.clone(),
        health: "ok".into(),
        pid: std::process::id(),
        since_ms: now_ms(),
    };
    ctx.etcd
        .put(&keys::node(&ctx.node), &to_json(&info), lease.id())?;
    Ok(lease)
}

/// The loop's timeout per etcd request and endpoint: a quarter of the shortest TTL, at most
/// `base` (the command's), so that a dead endpoint delays a look (and a leader's step down)
/// by little.
fn etcd_timeout(services: &BTreeMap<String, Entry>, base: Duration) -> Duration {
    services
        .values()
        .filter_map(|e| e.svc.lease.as_ref().map(|l| l.ttl() / 4))
        .min()
        .unwrap_or(base)
        .min(base)
}

/// A tenth of the shortest TTL, at most [`MAX_TICK`].
fn period(services: &BTreeMap<String, Entry>) -> Duration {
    services
        .values()
        .filter_map(|e| e.svc.lease.as_ref().map(|l| l.ttl() / 10))
        .min()
        .unwrap_or(MAX_TICK)
        .min(MAX_TICK)
}

fn tick(ctx: &Ctx, services: &mut BTreeMap<String, Entry>) -> Result<(), String> {
    let mut problems = Vec::new();
    let views = view::services(&ctx.etcd, &mut problems)?;
    let nodes = view::nodes(&ctx.etcd)?;
    {
        // The gate only rises: between a leader's loss and its successor's key (and while this
        // node takes the key itself) the last generation known still holds.
        let mut g = ctx.gate.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|name, _| views.contains_key(name));
        for (name, v) in &views {
            if let Some(l) = &v.leader {
                raise(&mut g, name, l.value.generation);
            }
        }
    }
    for (name, v) in &views {
        let entry = services.entry(name.clone()).or_insert_with(|| Entry {
            svc: Service::new(&ctx.store, name),
            role: Role::Standby,
        });
        if let Err(e) = step(ctx, entry, v, &nodes) {
            problems.push(format!("{name}: {e}"));
        }
    }
    let gone: Vec<String> = services
        .keys()
        .filter(|n| !views.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        if let Some(Entry { mut svc, mut role }) = services.remove(&name) {
            ctx.log.note(&format!("{name}: removed from the cluster"));
            leader::abandon(ctx, &mut svc, &mut role);
            standby::stop_standby(&mut svc);
            if let Some(l) = svc.lease.take() {
                l.release(&ctx.etcd);
            }
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

fn step(
    ctx: &Ctx,
    entry: &mut Entry,
    v: &View,
    nodes: &BTreeMap<String, NodeInfo>,
) -> Result<(), String> {
    let svc = &mut entry.svc;
    let lease = svc.lease(ctx, Duration::from_millis(v.spec.ttl_ms))?;
    let role = std::mem::replace(&mut entry.role, Role::Standby);
    entry.role = match role {
        Role::Leading(mut lead) => {
            leader::step(ctx, svc, &mut lead, v, nodes, &lease).unwrap_or(Role::Leading(lead))
        }
        Role::Finished if v.finished.is_some() => Role::Finished,
        Role::Finished | Role::Standby => standby::step(ctx, svc, v, nodes, &lease)?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(service: &str, generation: u32) -> Offer {
        Offer {
            service: service.into(),
            file: "ckpt-00000009.snap".into(),
            id: 9,
            parent_id: 0,
            parent_file: None,
            lineage: 1,
            generation,
            size: 1 << 20,
            created_ns: 0,
        }
    }

    #[test]
    fn the_gate_refuses_older_generations_and_only_rises() {
        let map: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let g = gate(&map);
        assert!(g(&offer("s", 1)).is_ok(), "no leader known yet");
        raise(&mut map.lock().unwrap(), "s", 3);
        raise(&mut map.lock().unwrap(), "s", 2);
        let why = g(&offer("s", 2)).unwrap_err();
        assert!(
            why.contains("generation 2, older than the leader's 3"),
            "{why}"
        );
        assert!(g(&offer("s", 3)).is_ok());
        assert!(g(&offer("s", 4)).is_ok());
        assert!(g(&offer("other", 1)).is_ok());
    }
}
