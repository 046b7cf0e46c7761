//! The standby's side of a service: keep a warm standby on the newest image received, publish
//! what it holds, and when the leader key is gone take it (best standby first) and start the
//! program; when a switchover hands the key to this node, activate.
//!
//! Who takes over: the standbys with an image, newest generation first, then newest image,
//! ties by node name; in sync mode only those holding the committed image. The one ranked r
//! waits r × TTL/4 after it saw the key gone before its transaction, so the best one wins and
//! the others find the key taken. When no image exists anywhere (and nothing was committed),
//! the live nodes are ranked instead, the preferred one first, and the winner starts the
//! program afresh.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::{absent, op_delete, op_put, unchanged};
use super::events::Event;
use super::keys::{self, now_ms, to_json, Image, Leader, Mode, NodeInfo, Standby};
use super::leader::{self, Role, Start};
use super::lease::Lease;
use super::local::{raise, Ctx, Service};
use super::program::{self, kill_tree, newest_image};
use super::view::View;

/// The shortest time between two starts of the warm standby.
const RESTART_AFTER: Duration = Duration::from_secs(2);

pub fn step(
    ctx: &Ctx,
    svc: &mut Service,
    v: &View,
    nodes: &BTreeMap<String, NodeInfo>,
    lease: &Arc<Lease>,
) -> Result<Role, String> {
    if v.finished.is_some() {
        stop_standby(svc);
        svc.published.clear();
        let _ = ctx.etcd.delete(&keys::standby(&svc.name, &ctx.node), false);
        return Ok(Role::Finished);
    }
    drop_stale(ctx, svc, v);
    let newest = newest_image(&svc.dir);
    keep_warm(ctx, svc, newest.as_ref());
    publish(ctx, svc, newest.as_ref(), lease)?;
    match &v.leader {
        Some(l) => {
            svc.leader_seen = Some(l.value.generation);
            svc.absent_since = None;
            svc.no_holder_noted = false;
            if l.value.node == ctx.node && l.lease == lease.id() {
                // Handed over by a switchover.
                return take_over(ctx, svc, v, l.value.generation, lease, false);
            }
            Ok(Role::Standby)
        }
        None => {
            if let Some(g) = svc.leader_seen.take() {
                ctx.log
                    .event(Event::LeaderLost, &svc.name, g, "the leader key is gone");
            }
            let since = *svc.absent_since.get_or_insert_with(Instant::now);
            let Some(rank) = rank(&ctx.node, v, nodes, newest.as_ref()) else {
                note_no_holder(ctx, svc, v);
                return Ok(Role::Standby);
            };
            if since.elapsed() < lease.ttl() / 4 * rank as u32 {
                return Ok(Role::Standby);
            }
            let lease = fresh_lease(ctx, svc, lease)?;
            try_take(ctx, svc, v, newest.as_ref(), &lease)
        }
    }
}

/// This node's place in the queue of takers, `None` when it may not take the key.
fn rank(
    me: &str,
    v: &View,
    nodes: &BTreeMap<String, NodeInfo>,
    mine: Option<&Image>,
) -> Option<usize> {
    let key = |i: &Image| (i.generation, i.seq);
    let committed = v.committed.as_ref().map(|c| key(&c.value));
    let enough = |i: &Image| v.spec.mode == Mode::Async || committed.is_none_or(|c| key(i) >= c);
    let mut holders: Vec<(&str, &Image)> = v
        .standbys
        .values()
        .filter_map(|s| s.image.as_ref().map(|i| (s.node.as_str(), i)))
        .filter(|(_, i)| enough(i))
        .collect();
    // This node's own view of its images is fresher than its published key.
    holders.retain(|(n, _)| *n != me);
    if let Some(i) = mine.filter(|i| enough(i)) {
        holders.push((me, i));
    }
    if !holders.is_empty() {
        holders.sort_by(|a, b| key(b.1).cmp(&key(a.1)).then(a.0.cmp(b.0)));
        return holders.iter().position(|(n, _)| *n == me);
    }
    if committed.is_some() && v.spec.mode == Mode::Sync {
        return None; // an acknowledged image exists, but no live node holds it
    }
    let mut live: Vec<&str> = nodes.keys().map(|n| n.as_str()).collect();
    live.sort_by_key(|n| (Some(*n) != v.spec.prefer.as_deref(), n.to_string()));
    live.iter().position(|n| *n == me)
}

/// The lease to take the key on: `lease` if its last keepalive that succeeded is recent,
/// otherwise a new one. A key put on a lease whose renewals have been failing for a while
/// would be fenced soon after the takeover, though etcd works again.
fn fresh_lease(ctx: &Ctx, svc: &mut Service, lease: &Arc<Lease>) -> Result<Arc<Lease>, String> {
    if lease.fresh() {
        return Ok(lease.clone());
    }
    ctx.log.note(&format!(
        "{}: the standby lease was not renewed lately: taking the key on a new one",
        svc.name
    ));
    lease.release(&ctx.etcd);
    svc.published.clear();
    svc.lease(ctx, lease.ttl())
}

/// In sync mode, no live node holds the acknowledged image: nobody takes over (an older image
/// would lose what was acknowledged); said once per absence of the leader.
fn note_no_holder(ctx: &Ctx, svc: &mut Service, v: &View) {
    let Some(c) = v.committed.as_ref().filter(|_| v.spec.mode == Mode::Sync) else {
        return;
    };
    let key = |i: &Image| (i.generation, i.seq);
    let held = v
        .standbys
        .values()
        .any(|s| s.image.as_ref().is_some_and(|i| key(i) >= key(&c.value)));
    if held || svc.no_holder_noted {
        return; // a holder will take over; this node is just not one
    }
    svc.no_holder_noted = true;
    ctx.log.note(&format!(
        "{}: no live node holds the acknowledged image {} (generation {}, seq {}): waiting for \
         its holder; nothing older is started in sync mode",
        svc.name,
        hex(c.value.id),
        c.value.generation,
        c.value.seq
    ));
}

/// The transaction that takes the leader key, then the program's start.
fn try_take(
    ctx: &Ctx,
    svc: &mut Service,
    v: &View,
    newest: Option<&Image>,
    lease: &Arc<Lease>,
) -> Result<Role, String> {
    let leader_key = keys::service(&svc.name, "leader");
    let generation = newest.map_or(1, |i| i.generation + 1);
    let value = Leader {
        node: ctx.node.clone(),
        generation,
        address: ctx.address.clone(),
    };
    let mut compare = vec![absent(&leader_key)];
    if let (Mode::Sync, Some(c)) = (v.spec.mode, &v.committed) {
        compare.push(unchanged(
            &keys::service(&svc.name, "committed"),
            c.mod_revision,
        ));
    }
    let ops = vec![
        op_put(&leader_key, &to_json(&value), lease.id()),
        op_delete(&keys::standby(&svc.name, &ctx.node)),
    ];
    if !ctx.etcd.txn(compare, ops)? {
        return Ok(Role::Standby);
    }
    raise(
        &mut ctx.gate.lock().unwrap_or_else(|e| e.into_inner()),
        &svc.name,
        generation,
    );
    svc.published.clear();
    let detail = match newest {
        Some(i) => format!("from image {} (seq {})", hex(i.id), i.seq),
        None => "no image anywhere: fresh start".into(),
    };
    if newest.is_some() {
        ctx.log
            .event(Event::Failover, &svc.name, generation, &detail);
    }
    take_over(ctx, svc, v, generation, lease, true)
}

/// Starts the program as the key's holder.
fn take_over(
    ctx: &Ctx,
    svc: &mut Service,
    v: &View,
    generation: u32,
    lease: &Arc<Lease>,
    fresh_ok: bool,
) -> Result<Role, String> {
    let warm = svc
        .standby
        .take()
        .and_then(|mut c| c.try_wait().ok().flatten().is_none().then_some(c));
    let how = match (warm, newest_image(&svc.dir)) {
        (Some(child), _) => Start::Activate(child),
        (_, Some(_)) => Start::Restore,
        (_, None) if fresh_ok => Start::Fresh,
        (_, None) => return Err("handed the key without an image to start from".into()),
    };
    svc.published.clear();
    let _ = ctx.etcd.delete(&keys::standby(&svc.name, &ctx.node), false);
    match leader::start(ctx, svc, v, how, generation, lease) {
        Ok(lead) => Ok(Role::Leading(Box::new(lead))),
        Err(e) => {
            let key = keys::service(&svc.name, "leader");
            let _ = ctx.etcd.delete(&key, false);
            Err(format!("cannot start the program: {e}"))
        }
    }
}

/// Once the leader (another node) has an image of a newer generation than some held here,
/// those are dropped: they were superseded by the takeover that made that generation, and
/// images a fenced leader wrote after its last push would collide by name with the new
/// leader's. The acknowledged (committed) image and the images it depends on stay: until this
/// node holds an image of the new generation that is committed too, it may be the only copy a
/// takeover can start from (the new generation started from it or from a newer one, so its
/// name never collides with the new leader's). The warm standby goes with the dropped images;
/// it starts again on the first image received.
fn drop_stale(ctx: &Ctx, svc: &mut Service, v: &View) {
    let (Some(l), Some(ck)) = (&v.leader, &v.checkpoint) else {
        return;
    };
    if l.value.node == ctx.node {
        return;
    }
    let current = ck.image.generation;
    let keep = committed_chain(&svc.dir, v);
    let stale: Vec<_> = snapshim_image::list_images(&svc.dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !keep.contains(p))
        .filter(|p| program::describe(p).is_some_and(|i| i.generation < current))
        .collect();
    // The receiver's retention may have deleted them first, while the warm standby keeps the
    // one it staged open: it would resume a superseded image.
    let committed = v.committed.as_ref().map(|c| c.value.generation);
    let warm_stale = svc.standby.is_some()
        && svc.standby_generation < current
        && committed != Some(svc.standby_generation);
    if warm_stale {
        stop_standby(svc);
        ctx.log.note(&format!(
            "{}: the warm standby was on an image of generation {}, older than {current}: \
             stopped",
            svc.name, svc.standby_generation
        ));
    }
    if stale.is_empty() {
        return;
    }
    stop_standby(svc);
    for p in &stale {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(p.with_extension("json"));
    }
    ctx.log.note(&format!(
        "{}: dropped {} image(s) older than generation {current}",
        svc.name,
        stale.len()
    ));
}

/// The committed image, if held here, and every image it depends on.
fn committed_chain(dir: &std::path::Path, v: &View) -> Vec<std::path::PathBuf> {
    let Some(c) = &v.committed else {
        return Vec::new();
    };
    let mut chain = Vec::new();
    let mut path = dir.join(snapshim_image::image_file_name(c.value.seq));
    if program::describe(&path).is_none_or(|i| i.id != c.value.id) {
        return chain;
    }
    while !chain.contains(&path) {
        chain.push(path.clone());
        match snapshim_image::Image::open(&path)
            .ok()
            .and_then(|i| i.meta.parent)
        {
            Some(p) => path = dir.join(p.file),
            None => break,
        }
    }
    chain
}

/// Keeps `snapshim-restore --standby` running once there is an image.
fn keep_warm(ctx: &Ctx, svc: &mut Service, newest: Option<&Image>) {
    if let Some(child) = &mut svc.standby {
        match child.try_wait() {
            Ok(None) => return,
            Ok(Some(status)) => {
                ctx.log
                    .note(&format!("{}: the warm standby ended ({status})", svc.name));
                svc.standby = None;
            }
            Err(_) => svc.standby = None,
        }
    }
    let recent = svc
        .standby_started
        .is_some_and(|t| t.elapsed() < RESTART_AFTER);
    let Some(newest) = newest.filter(|_| !recent) else {
        return;
    };
    svc.standby_started = Some(Instant::now());
    svc.standby_generation = newest.generation;
    match program::start_standby(&svc.dir) {
        Ok(child) => svc.standby = Some(child),
        Err(e) => ctx.log.note(&format!("{}: {e}", svc.name)),
    }
}

/// Writes the standby key when what it says changed.
fn publish(
    ctx: &Ctx,
    svc: &mut Service,
    newest: Option<&Image>,
    lease: &Lease,
) -> Result<(), String> {
    let state = match (newest, &svc.standby) {
        (None, _) => "empty",
        (Some(_), Some(_)) => "warm",
        (Some(_), None) => "cold",
    };
    let mut value = Standby {
        node: ctx.node.clone(),
        state: state.into(),
        image: newest.cloned(),
        lease: lease.id(),
        time_ms: 0,
    };
    let text = to_json(&value);
    if text == svc.published {
        return Ok(());
    }
    value.time_ms = now_ms();
    ctx.etcd.put(
        &keys::standby(&svc.name, &ctx.node),
        &to_json(&value),
        lease.id(),
    )?;
    svc.published = text;
    Ok(())
}

/// Ends the warm standby, if one runs.
pub fn stop_standby(svc: &mut Service) {
    if let Some(mut child) = svc.standby.take() {
        kill_tree(child.id());
        let _ = child.wait();
    }
}

fn hex(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::Spec;
    use crate::cluster::view::At;

    fn view(mode: Mode, prefer: Option<&str>, standbys: &[(&str, u32, u64)]) -> View {
        View {
            spec: Spec {
                name: "s".into(),
                command: vec!["p".into()],
                interval: "1s".into(),
                incremental: false,
                standbys: 1,
                prefer: prefer.map(str::to_string),
                mode,
                ttl_ms: 2000,
                output: None,
                cwd: None,
            },
            leader: None,
            checkpoint: None,
            standbys: standbys
                .iter()
                .map(|(n, g, seq)| {
                    let s = Standby {
                        node: n.to_string(),
                        state: "warm".into(),
                        image: Some(img(*g, *seq)),
                        lease: 1,
                        time_ms: 0,
                    };
                    (n.to_string(), s)
                })
                .collect(),
            committed: None,
            switchover: None,
            finished: None,
        }
    }

    fn img(generation: u32, seq: u64) -> Image {
        Image {
            id: seq,
            seq,
            generation,
            time_ms: 0,
        }
    }

    fn nodes(names: &[&str]) -> BTreeMap<String, NodeInfo> {
        names
            .iter()
            .map(|n| {
                let info = NodeInfo {
                    address: "127.0.0.1:1".into(),
                    health: "ok".into(),
                    pid: 1,
                    since_ms: 0,
                };
                (n.to_string(), info)
            })
            .collect()
    }

    #[test]
    fn the_newest_generation_then_the_newest_image_goes_first() {
        let v = view(Mode::Async, None, &[("a", 1, 9), ("b", 2, 3), ("c", 2, 3)]);
        let n = nodes(&["a", "b", "c"]);
        let mine = |me: &str| v.standbys[me].image.clone();
        assert_eq!(rank("b", &v, &n, mine("b").as_ref()), Some(0));
        assert_eq!(rank("c", &v, &n, mine("c").as_ref()), Some(1));
        assert_eq!(rank("a", &v, &n, mine("a").as_ref()), Some(2));
        // Its own newer image counts before its key says so.
        assert_eq!(rank("a", &v, &n, Some(&img(2, 4))), Some(0));
        // Without an image it may not take over while others have one.
        assert_eq!(rank("d", &v, &n, None), None);
    }

    #[test]
    fn sync_mode_needs_the_committed_image() {
        let mut v = view(Mode::Sync, None, &[("a", 1, 5), ("b", 1, 7)]);
        v.committed = Some(At {
            value: img(1, 6),
            mod_revision: 3,
            lease: 0,
        });
        let n = nodes(&["a", "b"]);
        assert_eq!(rank("a", &v, &n, Some(&img(1, 5))), None);
        assert_eq!(rank("b", &v, &n, Some(&img(1, 7))), Some(0));
        v.standbys.remove("b");
        assert_eq!(
            rank("a", &v, &n, Some(&img(1, 5))),
            None,
            "never a fresh start"
        );
    }

    #[test]
    fn with_no_image_anywhere_the_preferred_node_starts_it() {
        let v = view(Mode::Async, Some("b"), &[]);
        let n = nodes(&["a", "b", "c"]);
        assert_eq!(rank("b", &v, &n, None), Some(0));
        assert_eq!(rank("a", &v, &n, None), Some(1));
        assert_eq!(rank("c", &v, &n, None), Some(2));
    }
}
