//! One look at etcd: every service's keys and the registered nodes, read in two range requests
//! per tick, decoded into [`View`]s. Nothing here writes.

use std::collections::BTreeMap;

use super::etcd::{Etcd, Kv};
use super::keys::{
    self, from_json, Checkpoint, Finished, Image, Leader, NodeInfo, Spec, Standby, Switchover,
};

/// A key's decoded value with the revision it was read at (for compare-and-swap).
#[derive(Debug, Clone)]
pub struct At<T> {
    pub value: T,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What etcd says about one service.
#[derive(Debug, Clone)]
pub struct View {
    pub spec: Spec,
    pub leader: Option<At<Leader>>,
    pub checkpoint: Option<Checkpoint>,
    /// By node name.
    pub standbys: BTreeMap<String, Standby>,
    pub committed: Option<At<Image>>,
    pub switchover: Option<At<Switchover>>,
    pub finished: Option<Finished>,
}

/// Every service, by name; unreadable values are skipped with a note in `problems`.
pub fn services(etcd: &Etcd, problems: &mut Vec<String>) -> Result<BTreeMap<String, View>, String> {
    let root = keys::services();
    let mut by_name: BTreeMap<String, Vec<Kv>> = BTreeMap::new();
    for kv in etcd.prefix(&root)? {
        let rest = &kv.key[root.len()..];
        if let Some((name, _)) = rest.split_once('/') {
            by_name.entry(name.to_string()).or_default().push(kv);
        }
    }
    let mut out = BTreeMap::new();
    for (name, kvs) in by_name {
        match decode(&name, &kvs) {
            Ok(Some(v)) => {
                out.insert(name, v);
            }
            Ok(None) => {} // keys left of a removed service
            Err(e) => problems.push(e),
        }
    }
    Ok(out)
}

/// One service's view, if it has a spec.
pub fn service(etcd: &Etcd, name: &str) -> Result<Option<View>, String> {
    let kvs = etcd.prefix(&keys::service(name, ""))?;
    decode(name, &kvs)
}

fn at<T: for<'a> serde::Deserialize<'a>>(kv: &Kv) -> Result<At<T>, String> {
    Ok(At {
        value: from_json(&kv.key, &kv.value)?,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    })
}

fn decode(name: &str, kvs: &[Kv]) -> Result<Option<View>, String> {
    let base = keys::service(name, "");
    let find = |what: &str| kvs.iter().find(|kv| kv.key == format!("{base}{what}"));
    let Some(spec) = find("spec") else {
        return Ok(None);
    };
    let mut standbys = BTreeMap::new();
    for kv in kvs
        .iter()
        .filter(|kv| kv.key.starts_with(&format!("{base}standbys/")))
    {
        let s: Standby = from_json(&kv.key, &kv.value)?;
        standbys.insert(s.node.clone(), s);
    }
    Ok(Some(View {
        spec: from_json(&spec.key, &spec.value)?,
        leader: find("leader").map(at).transpose()?,
        checkpoint: find("checkpoint")
            .map(|kv| from_json(&kv.key, &kv.value))
            .transpose()?,
        standbys,
        committed: find("committed").map(at).transpose()?,
        switchover: find("switchover").map(at).transpose()?,
        finished: find("finished")
            .map(|kv| from_json(&kv.key, &kv.value))
            .transpose()?,
    }))
}

/// The registered (live) nodes, by name.
pub fn nodes(etcd: &Etcd) -> Result<BTreeMap<String, NodeInfo>, String> {
    let root = keys::nodes();
    let mut out = BTreeMap::new();
    for kv in etcd.prefix(&root)? {
        if let Ok(info) = from_json::<NodeInfo>(&kv.key, &kv.value) {
            out.insert(kv.key[root.len()..].to_string(), info);
        }
    }
    Ok(out)
}
