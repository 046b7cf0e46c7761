//! The leader's side of a service: start the program (fresh, restored, or by activating the
//! warm standby), watch it, publish and push each committed image, hand over on request
//! (switchover), stop when the lease is in danger (the fence in `lease.rs` kills the program;
//! here the role ends).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::{op_delete, op_put, unchanged};
use super::events::Event;
use super::keys::{self, now_ms, to_json, Checkpoint, Finished, Image, Leader, Mode, NodeInfo};
use super::lease::Lease;
use super::local::{Ctx, Service};
use super::program::{self, holder_generation, kill_tree, newest_image};
use super::replicate;
use super::view::View;

/// How long one push may wait on a connect, read or write.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// A standby this many images behind is reported (`lag-over-limit`).
const LAG_LIMIT: u64 = 3;
/// A failed push to a standby is retried after between these.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A switchover's last checkpoint and push may take this long each.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A push that ended: to which node, and the newest image it now holds.
struct Pushed {
    node: String,
    result: Result<u64, String>,
}

/// The program this node runs for a service.
pub struct Leading {
    pub child: Child,
    pub generation: u32,
    /// Recent images by number (oldest first), for the committed key.
    images: BTreeMap<u64, Image>,
    last_image: Option<Image>,
    last_image_at: Instant,
    /// Per standby node, the newest image it acknowledged.
    pushed: HashMap<String, u64>,
    busy: HashSet<String>,
    /// Per standby whose pushes fail: since when, and when to try again.
    failing: HashMap<String, (Instant, Instant)>,
    done_tx: Sender<Pushed>,
    done_rx: Receiver<Pushed>,
    /// Per image id, the nodes that hold it on disk.
    acks: HashMap<u64, HashSet<String>>,
    committed: u64,
    lagging: HashSet<String>,
    checkpoint_late: bool,
}

/// What this node is for one service.
pub enum Role {
    Standby,
    Leading(Box<Leading>),
    /// The program ended by itself with status 0.
    Finished,
}

/// How the program starts on this node.
pub enum Start {
    /// Wake the warm standby.
    Activate(Child),
    /// `snapshim-restore STORE/NAME`.
    Restore,
    /// `snapshim run`: no image exists anywhere.
    Fresh,
}

/// Starts the program and protects it with `lease`.
pub fn start(
    ctx: &Ctx,
    svc: &Service,
    v: &View,
    how: Start,
    generation: u32,
    lease: &Lease,
) -> Result<Leading, String> {
    let child = match how {
        Start::Activate(mut child) => match program::activate(&svc.dir, HANDOVER_TIMEOUT) {
            Ok(_) => child,
            Err(e) => {
                ctx.log.note(&format!(
                    "{}: the warm standby did not resume ({e}); restoring instead",
                    svc.name
                ));
                kill_tree(child.id());
                let _ = child.wait();
                program::start_restore(&svc.dir)?
            }
        },
        Start::Restore => program::start_restore(&svc.dir)?,
        Start::Fresh => program::start_fresh(&v.spec, &ctx.store)?,
    };
    protect(ctx, &svc.name, lease, child.id(), generation);
    if lease.lost() {
        kill_tree(child.id());
    }
    let (done_tx, done_rx) = channel();
    ctx.log.event(
        Event::Activated,
        &svc.name,
        generation,
        &format!("PID {}", child.id()),
    );
    Ok(Leading {
        child,
        generation,
        images: BTreeMap::new(),
        last_image: None,
        last_image_at: Instant::now(),
        pushed: HashMap::new(),
        busy: HashSet::new(),
        failing: HashMap::new(),
        done_tx,
        done_rx,
        acks: HashMap::new(),
        committed: 0,
        lagging: HashSet::new(),
        checkpoint_late: false,
    })
}

/// Protects `pid` with `lease`: when the fence kills it, the lease's thread logs `fenced` (and
/// runs the hook) at once, not when the agent's loop gets to it.
fn protect(ctx: &Ctx, service: &str, lease: &Lease, pid: u32, generation: u32) {
    let (log, service, ttl) = (ctx.log.clone(), service.to_string(), lease.ttl());
    lease.fence_noting(
        pid,
        Box::new(move || log.event(Event::Fenced, &service, generation, &fenced_detail(ttl))),
    );
}

fn fenced_detail(ttl: Duration) -> String {
    format!("could not renew the lease within {ttl:?} less the margin: program killed")
}

/// Called every loop, etcd reachable or not: a leader whose lease was lost (the fence killed
/// the program, or etcd said the lease is gone) stops leading. The event was logged by the
/// lease's thread when the fence fired, unless there was nothing to kill then.
pub fn check_fence(ctx: &Ctx, svc: &mut Service, role: &mut Role) {
    let Some(lease) = svc.lease.as_ref().filter(|l| l.lost()) else {
        return;
    };
    if let Role::Leading(lead) = role {
        kill_tree(lead.child.id());
        let _ = lead.child.wait();
        if !lease.noted() {
            let detail = fenced_detail(lease.ttl());
            ctx.log
                .event(Event::Fenced, &svc.name, lead.generation, &detail);
        }
        *role = Role::Standby;
    }
}

/// One look as leader. Returns the new role, or `None` to stay leader.
pub fn step(
    ctx: &Ctx,
    svc: &mut Service,
    lead: &mut Leading,
    v: &View,
    nodes: &BTreeMap<String, NodeInfo>,
    lease: &Arc<Lease>,
) -> Option<Role> {
    let mine = v
        .leader
        .as_ref()
        .filter(|l| l.value.node == ctx.node && l.lease == lease.id());
    let Some(key) = mine else {
        lease.fence(0);
        kill_tree(lead.child.id());
        let _ = lead.child.wait();
        ctx.log.event(
            Event::LeaderLost,
            &svc.name,
            lead.generation,
            "the leader key is no longer ours: program killed",
        );
        return Some(Role::Standby);
    };
    if let Some(role) = exited(ctx, svc, lead, key.mod_revision, lease) {
        return Some(role);
    }
    sync_generation(ctx, svc, lead, key.mod_revision, lease);
    note_image(ctx, svc, lead, v, lease);
    collect_pushes(ctx, svc, lead, v);
    let targets = standby_nodes(ctx, v, nodes);
    for (node, addr) in &targets {
        start_push(ctx, svc, lead, node, addr);
    }
    check_lag(ctx, svc, lead, v, &targets);
    if let Some(req) = &v.switchover {
        if req.value.to != ctx.node {
            return switchover(ctx, svc, lead, v, nodes, &req.value.to, lease);
        }
        // Already here: the request is done.
        let _ = ctx
            .etcd
            .delete(&keys::service(&svc.name, "switchover"), false);
    }
    None
}

/// The program ended: with status 0 the service is finished, otherwise the key is given up so
/// that the best standby (maybe this node) restores it.
fn exited(
    ctx: &Ctx,
    svc: &Service,
    lead: &mut Leading,
    leader_rev: i64,
    lease: &Lease,
) -> Option<Role> {
    let status = lead.child.try_wait().ok().flatten()?;
    lease.fence(0);
    let leader_key = keys::service(&svc.name, "leader");
    if status.success() {
        let done = Finished {
            node: ctx.node.clone(),
            generation: lead.generation,
            status: 0,
            time_ms: now_ms(),
        };
        let ops = vec![
            op_put(&keys::service(&svc.name, "finished"), &to_json(&done), 0),
            op_delete(&leader_key),
            op_delete(&keys::service(&svc.name, "checkpoint")),
        ];
        let _ = ctx.etcd.txn(vec![unchanged(&leader_key, leader_rev)], ops);
        ctx.log.note(&format!(
            "{}: the program finished (status 0); the service is done",
            svc.name
        ));
        return Some(Role::Finished);
    }
    ctx.log.note(&format!(
        "{}: the program ended ({status}); giving up the leader key",
        svc.name
    ));
    let _ = ctx.etcd.txn(
        vec![unchanged(&leader_key, leader_rev)],
        vec![op_delete(&leader_key)],
    );
    Some(Role::Standby)
}

/// Puts the generation the running instance really has (its lock record) into the leader key,
/// when it is higher than the one the key was taken with.
fn sync_generation(ctx: &Ctx, svc: &Service, lead: &mut Leading, rev: i64, lease: &Lease) {
    let Some(g) = holder_generation(&svc.dir) else {
        return;
    };
    // Only upwards: before the restored program takes the directory, the record is its
    // previous holder's.
    if g <= lead.generation {
        return;
    }
    let key = keys::service(&svc.name, "leader");
    let value = Leader {
        node: ctx.node.clone(),
        generation: g,
        address: ctx.address.clone(),
    };
    if let Ok(true) = ctx.etcd.txn(
        vec![unchanged(&key, rev)],
        vec![op_put(&key, &to_json(&value), lease.id())],
    ) {
        lead.generation = g;
        protect(ctx, &svc.name, lease, lead.child.id(), g);
    }
}

/// A newly committed image is published as the service's last checkpoint; none for too long
/// is reported once.
fn note_image(ctx: &Ctx, svc: &Service, lead: &mut Leading, v: &View, lease: &Lease) {
    let newest = newest_image(&svc.dir).filter(|i| i.generation >= lead.generation);
    match newest {
        Some(img) if lead.last_image.as_ref().map(|i| i.id) != Some(img.id) => {
            let ck = Checkpoint {
                image: img.clone(),
                node: ctx.node.clone(),
            };
            let _ = ctx.etcd.put(
                &keys::service(&svc.name, "checkpoint"),
                &to_json(&ck),
                lease.id(),
            );
            lead.images.insert(img.seq, img.clone());
            while lead.images.len() > 16 {
                lead.images.pop_first();
            }
            lead.last_image = Some(img);
            lead.last_image_at = Instant::now();
            lead.checkpoint_late = false;
        }
        _ => {
            let interval = snapshim_image::settings::parse_duration(&v.spec.interval)
                .unwrap_or(Duration::from_secs(60));
            let late = interval * 3 + Duration::from_secs(5);
            if !lead.checkpoint_late && lead.last_image_at.elapsed() > late {
                lead.checkpoint_late = true;
                ctx.log.event(
                    Event::CheckpointFailed,
                    &svc.name,
                    lead.generation,
                    &format!("no new image for {late:?}"),
                );
            }
        }
    }
}

/// The nodes that receive the images: the `standbys` first live nodes other than this one, the
/// preferred node first, then by name.
fn standby_nodes(ctx: &Ctx, v: &View, nodes: &BTreeMap<String, NodeInfo>) -> Vec<(String, String)> {
    let mut list: Vec<(&String, &NodeInfo)> =
        nodes.iter().filter(|(n, _)| **n != ctx.node).collect();
    list.sort_by_key(|(n, _)| (Some(n.as_str()) != v.spec.prefer.as_deref(), n.to_string()));
    list.into_iter()
        .take(v.spec.standbys as usize)
        .map(|(n, i)| (n.clone(), i.address.clone()))
        .collect()
}

fn start_push(ctx: &Ctx, svc: &Service, lead: &mut Leading, node: &str, addr: &str) {
    let Some(img) = &lead.last_image else { return };
    if lead.busy.contains(node) || lead.pushed.get(node) == Some(&img.id) {
        return;
    }
    if lead
        .failing
        .get(node)
        .is_some_and(|(_, retry)| Instant::now() < *retry)
    {
        return;
    }
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return;
    };
    lead.busy.insert(node.to_string());
    let (key, name, dir) = (ctx.key.clone(), svc.name.clone(), svc.dir.clone());
    let (tx, node) = (lead.done_tx.clone(), node.to_string());
    std::thread::spawn(move || {
        let result = replicate::push(addr, &key, &name, &dir, PUSH_TIMEOUT)
            .map(|r| r.newest.id)
            .map_err(|e| e.to_string());
        let _ = tx.send(Pushed { node, result });
    });
}

/// Takes the ended pushes; in sync mode, an image held by `standbys` nodes is committed.
fn collect_pushes(ctx: &Ctx, svc: &Service, lead: &mut Leading, v: &View) {
    while let Ok(p) = lead.done_rx.try_recv() {
        lead.busy.remove(&p.node);
        match p.result {
            Ok(id) => {
                if let Some((since, _)) = lead.failing.remove(&p.node) {
                    ctx.log.note(&format!(
                        "{}: pushes to {} work again after {} s",
                        svc.name,
                        p.node,
                        since.elapsed().as_secs()
                    ));
                }
                lead.pushed.insert(p.node.clone(), id);
                lead.acks.entry(id).or_default().insert(p.node);
            }
            Err(e) => {
                // Reported once per streak; retried after twice the time failed so far
                // (250 ms to 5 s).
                let now = Instant::now();
                let since = match lead.failing.get(&p.node) {
                    Some((since, _)) => *since,
                    None => {
                        ctx.log.event(
                            Event::ReplicationFailed,
                            &svc.name,
                            lead.generation,
                            &format!("to {}: {e}", p.node),
                        );
                        now
                    }
                };
                let wait = (now - since).mul_f32(2.0).clamp(RETRY_MIN, RETRY_MAX);
                lead.failing.insert(p.node, (since, now + wait));
            }
        }
    }
    if lead.acks.len() > 32 {
        let recent: HashSet<u64> = lead.images.values().map(|i| i.id).collect();
        lead.acks.retain(|id, _| recent.contains(id));
    }
    if v.spec.mode != Mode::Sync {
        return;
    }
    let need = v.spec.standbys.max(1) as usize;
    let ready = lead
        .images
        .values()
        .rev()
        .find(|img| lead.acks.get(&img.id).is_some_and(|s| s.len() >= need))
        .cloned();
    if let Some(img) = ready.filter(|i| i.seq > lead.committed) {
        let key = keys::service(&svc.name, "committed");
        if ctx.etcd.put(&key, &to_json(&img), 0).is_ok() {
            lead.committed = img.seq;
        }
    }
}

fn check_lag(ctx: &Ctx, svc: &Service, lead: &mut Leading, v: &View, targets: &[(String, String)]) {
    let Some(last) = &lead.last_image else { return };
    for (node, _) in targets {
        let held = v
            .standbys
            .get(node)
            .and_then(|s| s.image.as_ref())
            .map_or(0, |i| i.seq);
        let behind = last.seq.saturating_sub(held);
        if behind > LAG_LIMIT && lead.lagging.insert(node.clone()) {
            ctx.log.event(
                Event::LagOverLimit,
                &svc.name,
                lead.generation,
                &format!("{node} is {behind} images behind"),
            );
        } else if behind <= LAG_LIMIT {
            lead.lagging.remove(node);
        }
    }
}

/// A planned move to `to`: last checkpoint (the program is killed once it is committed), a
/// synchronous push of it to `to`, then the key handed over in one transaction onto `to`'s
/// lease, with the next generation. If the checkpoint or the push fails, this node goes on
/// leading (restoring its own last image if the program was already gone).
fn switchover(
    ctx: &Ctx,
    svc: &Service,
    lead: &mut Leading,
    v: &View,
    nodes: &BTreeMap<String, NodeInfo>,
    to: &str,
    lease: &Arc<Lease>,
) -> Option<Role> {
    let req_key = keys::service(&svc.name, "switchover");
    let give_up = |why: String| {
        ctx.log.note(&format!(
            "{}: switchover to {to} abandoned: {why}",
            svc.name
        ));
        let _ = ctx.etcd.delete(&req_key, false);
    };
    let (Some(target), Some(info)) = (v.standbys.get(to), nodes.get(to)) else {
        give_up(format!("{to} is not a live standby of this service"));
        return None;
    };
    let Ok(addr) = info.address.parse::<SocketAddr>() else {
        give_up(format!("{to} has an unusable address {}", info.address));
        return None;
    };
    let started = Instant::now();
    if let Err(e) = program::checkpoint_and_kill(lead.child.id(), HANDOVER_TIMEOUT) {
        ctx.log
            .event(Event::CheckpointFailed, &svc.name, lead.generation, &e);
        give_up("the last checkpoint failed".into());
        return None;
    }
    let _ = lead.child.wait();
    lease.fence(0);
    if let Err(e) = replicate::push(addr, &ctx.key, &svc.name, &svc.dir, HANDOVER_TIMEOUT) {
        ctx.log.event(
            Event::ReplicationFailed,
            &svc.name,
            lead.generation,
            &format!("to {to}: {e}"),
        );
        give_up("the last image did not reach it".into());
        return resume_here(ctx, svc, lead, lease);
    }
    let generation = holder_generation(&svc.dir).unwrap_or(lead.generation) + 1;
    let leader_key = keys::service(&svc.name, "leader");
    let value = Leader {
        node: to.to_string(),
        generation,
        address: info.address.clone(),
    };
    let rev = v.leader.as_ref().map_or(0, |l| l.mod_revision);
    let handed = ctx.etcd.txn(
        vec![unchanged(&leader_key, rev)],
        vec![
            op_put(&leader_key, &to_json(&value), target.lease),
            op_delete(&req_key),
            op_delete(&keys::service(&svc.name, "checkpoint")),
        ],
    );
    if handed != Ok(true) {
        give_up("the leader key changed meanwhile".into());
        return Some(Role::Standby);
    }
    let ev = match v.spec.prefer.as_deref() == Some(to) {
        true => Event::Failback,
        false => Event::Switchover,
    };
    ctx.log.event(
        ev,
        &svc.name,
        lead.generation,
        &format!(
            "to {to} ({} ms to hand over)",
            started.elapsed().as_millis()
        ),
    );
    Some(Role::Standby)
}

/// The program is gone but this node still leads: restore it here from its last image.
fn resume_here(ctx: &Ctx, svc: &Service, lead: &mut Leading, lease: &Lease) -> Option<Role> {
    match program::start_restore(&svc.dir) {
        Ok(child) => {
            protect(ctx, &svc.name, lease, child.id(), lead.generation);
            lead.child = child;
            None
        }
        Err(e) => {
            ctx.log.note(&format!("{}: {e}", svc.name));
            let _ = ctx.etcd.delete(&keys::service(&svc.name, "leader"), false);
            Some(Role::Standby)
        }
    }
}

/// SIGTERM: a leader takes a last checkpoint, pushes it to its standbys and stops the program;
/// the caller then revokes the lease, which deletes the leader key at once.
pub fn shut_down(ctx: &Ctx, svc: &mut Service, role: &mut Role) {
    let Role::Leading(lead) = role else {
        return;
    };
    if let Some(l) = &svc.lease {
        l.fence(0);
    }
    match program::checkpoint_and_kill(lead.child.id(), HANDOVER_TIMEOUT) {
        Ok(_) => {
            let _ = lead.child.wait();
            if let Ok(nodes) = super::view::nodes(&ctx.etcd) {
                for (node, info) in nodes.iter().filter(|(n, _)| **n != ctx.node) {
                    let Ok(addr) = info.address.parse() else {
                        continue;
                    };
                    if let Err(e) =
                        replicate::push(addr, &ctx.key, &svc.name, &svc.dir, HANDOVER_TIMEOUT)
                    {
                        ctx.log.event(
                            Event::ReplicationFailed,
                            &svc.name,
                            lead.generation,
                            &format!("to {node}: {e}"),
                        );
                    }
                }
            }
        }
        Err(e) => {
            ctx.log
                .event(Event::CheckpointFailed, &svc.name, lead.generation, &e);
            kill_tree(lead.child.id());
            let _ = lead.child.wait();
        }
    }
    *role = Role::Standby;
}

/// The service was removed: its program is stopped.
pub fn abandon(ctx: &Ctx, svc: &mut Service, role: &mut Role) {
    if let Role::Leading(lead) = role {
        kill_tree(lead.child.id());
        let _ = lead.child.wait();
        ctx.log.note(&format!("{}: program stopped", svc.name));
    }
    *role = Role::Standby;
}
