//! `snapshim service add|status|switchover|list|remove`: define a service for the cluster and
//! look at it, through etcd only (the agents do the rest).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::etcd::{absent, op_delete_prefix_but, op_put, Etcd};
use super::keys::{self, now_ms, to_json, Mode, Spec, Switchover};
use super::node::{etcd, node_name};
use super::view::{self, View};
use crate::parse::parse_duration;
use crate::{json as out, Failure, Result};

/// Define, inspect and move services (programs the cluster keeps running)
#[derive(Args)]
pub struct ServiceArgs {
    /// etcd endpoints, comma-separated http://HOST:PORT [default: $SNAPSHIM_ETCD]
    #[arg(long, value_name = "URLS", global = true)]
    pub etcd: Option<String>,
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Subcommand)]
enum ServiceCommand {
    Add(AddArgs),
    /// Show the leader, the generation, the last checkpoint and each standby's lag
    Status {
        #[arg(value_parser = node_name)]
        name: String,
        /// Print the status as JSON (schema in docs/usage.md)
        #[arg(long)]
        json: bool,
    },
    /// Move the program to NODE with the least downtime (a planned move, or a failback)
    Switchover {
        #[arg(value_parser = node_name)]
        name: String,
        /// The node to move to: one of the service's standbys
        #[arg(long, value_name = "NODE", value_parser = node_name)]
        to: String,
        /// Give up waiting after TIME
        #[arg(long, value_name = "TIME", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// List the services: leader and generation of each
    List,
    /// Remove a service: its program is stopped wherever it runs; images stay in the stores
    Remove {
        #[arg(value_parser = node_name)]
        name: String,
    },
}

/// Define a service: the program the cluster keeps running on one node, with standbys
#[derive(Args)]
#[command(
    after_help = "Example:\n  snapshim service add solver --interval 10s --standbys 2 \
                        --output /shared/solver.out -- /opt/solver input.dat"
)]
pub struct AddArgs {
    #[arg(value_parser = node_name)]
    name: String,
    /// Checkpoint every TIME
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = crate::parse::interval_arg)]
    interval: String,
    /// Incremental checkpoints (delta images between full ones)
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = ["off", "on"])]
    incremental: String,
    /// How many nodes receive the images (sync mode: how many must hold one)
    #[arg(long, value_name = "K", default_value = "1", value_parser = clap::value_parser!(u32).range(1..))]
    standbys: u32,
    /// The node the program should run on when it can
    #[arg(long, value_name = "NODE", value_parser = node_name)]
    prefer: Option<String>,
    /// async: a checkpoint counts once committed on the leader; sync: once K standbys hold it
    #[arg(long, value_name = "MODE", default_value = "async", value_parser = ["async", "sync"])]
    mode: String,
    /// TTL of the leader lease (etcd counts whole seconds)
    #[arg(long, value_name = "TIME", default_value = "2s", value_parser = parse_duration)]
    ttl: Duration,
    /// Where the program's stdout and stderr go (a path valid on every node)
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The program's working directory (valid on every node)
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// The program and its arguments (after `--`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD ARGS"
    )]
    command: Vec<OsString>,
}

pub fn run(a: ServiceArgs) -> Result<()> {
    let etcd = etcd(&a.etcd)?;
    match a.command {
        ServiceCommand::Add(add) => add_service(&etcd, add),
        ServiceCommand::Status { name, json } => status(&etcd, &name, json).inspect_err(|f| {
            if json {
                println!("{}", out::failure(f));
            }
        }),
        ServiceCommand::Switchover { name, to, timeout } => switchover(&etcd, &name, &to, timeout),
        ServiceCommand::List => list(&etcd),
        ServiceCommand::Remove { name } => remove(&etcd, &name),
    }
}

fn op(e: String) -> Failure {
    Failure::op(e)
}

fn add_service(etcd: &Etcd, a: AddArgs) -> Result<()> {
    if a.ttl < Duration::from_secs(1) {
        return Err(Failure::usage(
            "--ttl must be at least 1s (etcd counts whole seconds)",
        ));
    }
    let abs = |p: Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.map(|p| std::path::absolute(&p).map_err(|e| Failure::op(format!("{}: {e}", p.display()))))
            .transpose()
    };
    let command: Vec<String> = a
        .command
        .iter()
        .map(|s| s.to_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| Failure::usage("the command must be valid UTF-8"))?;
    let spec = Spec {
        name: a.name.clone(),
        command,
        interval: a.interval,
        incremental: a.incremental == "on",
        standbys: a.standbys,
        prefer: a.prefer,
        mode: if a.mode == "sync" {
            Mode::Sync
        } else {
            Mode::Async
        },
        ttl_ms: a.ttl.as_millis() as u64,
        output: abs(a.output)?,
        cwd: abs(a.cwd)?,
    };
    let spec_key = keys::service(&a.name, "spec");
    // Keys left by an earlier service of the same name go with the new definition.
    let added = etcd
        .txn(
            vec![absent(&spec_key)],
            op_delete_prefix_but(&keys::service(&a.name, ""), &spec_key)
                .into_iter()
                .chain([op_put(&spec_key, &to_json(&spec), 0)])
                .collect(),
        )
        .map_err(op)?;
    if !added {
        return Err(Failure::op(format!(
            "service {} exists already (snapshim service remove {} first)",
            a.name, a.name
        )));
    }
    println!("service {} added", a.name);
    Ok(())
}

fn get(etcd: &Etcd, name: &str) -> Result<View> {
    view::service(etcd, name)
        .map_err(op)?
        .ok_or_else(|| Failure::op(format!("no service named {name}")))
}

/// The status document (also the source of the text form).
fn document(v: &View) -> Value {
    let now = now_ms();
    let ck = v.checkpoint.as_ref().map(|c| &c.image);
    let standbys: Vec<Value> = v
        .standbys
        .values()
        .map(|s| {
            let lag = match (ck, &s.image) {
                (Some(c), Some(i)) => json!({
                    "images": c.seq.saturating_sub(i.seq),
                    "seconds": c.time_ms.saturating_sub(i.time_ms) as f64 / 1000.0,
                }),
                _ => Value::Null,
            };
            json!({
                "node": s.node, "state": s.state,
                "image": s.image.as_ref().map(|i| json!({
                    "id": format!("{:016x}", i.id), "seq": i.seq, "generation": i.generation,
                    "time_ms": i.time_ms })),
                "lag": lag,
            })
        })
        .collect();
    json!({
        "service": v.spec.name,
        "leader": v.leader.as_ref().map(|l| json!({
            "node": l.value.node, "generation": l.value.generation, "address": l.value.address })),
        "checkpoint": ck.map(|i| json!({
            "id": format!("{:016x}", i.id), "seq": i.seq, "generation": i.generation,
            "time_ms": i.time_ms, "age_seconds": now.saturating_sub(i.time_ms) as f64 / 1000.0 })),
        "committed": v.committed.as_ref().map(|c| json!({
            "id": format!("{:016x}", c.value.id), "seq": c.value.seq })),
        "finished": v.finished.as_ref().map(|f| json!({
            "node": f.node, "generation": f.generation, "status": f.status })),
        "switchover": v.switchover.as_ref().map(|s| s.value.to.clone()),
        "standbys": standbys,
        "spec": serde_json::to_value(&v.spec).unwrap_or(Value::Null),
    })
}

fn status(etcd: &Etcd, name: &str, as_json: bool) -> Result<()> {
    let doc = document(&get(etcd, name)?);
    if as_json {
        return out::print_ok(doc);
    }
    println!("service {name}");
    match (&doc["leader"], &doc["finished"]) {
        (_, f) if !f.is_null() => println!(
            "  finished on {} (generation {}, status {})",
            f["node"].as_str().unwrap_or("?"),
            f["generation"],
            f["status"]
        ),
        (l, _) if !l.is_null() => println!(
            "  leader {} (generation {}, images to {})",
            l["node"].as_str().unwrap_or("?"),
            l["generation"],
            l["address"].as_str().unwrap_or("?")
        ),
        _ => println!("  no leader"),
    }
    let c = &doc["checkpoint"];
    if !c.is_null() {
        println!(
            "  last checkpoint: image {} (#{}), {:.1} s ago",
            c["id"].as_str().unwrap_or("?"),
            c["seq"],
            c["age_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    for s in doc["standbys"].as_array().into_iter().flatten() {
        let lag = match &s["lag"] {
            Value::Null => String::new(),
            l => format!(
                ", {} images / {:.1} s behind",
                l["images"],
                l["seconds"].as_f64().unwrap_or(0.0)
            ),
        };
        let img = match &s["image"] {
            Value::Null => "no image".to_string(),
            i => format!("image #{}", i["seq"]),
        };
        println!(
            "  standby {}: {}, {img}{lag}",
            s["node"].as_str().unwrap_or("?"),
            s["state"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn switchover(etcd: &Etcd, name: &str, to: &str, timeout: Duration) -> Result<()> {
    let v = get(etcd, name)?;
    let Some(leader) = &v.leader else {
        return Err(Failure::op(format!("{name} has no leader to move")));
    };
    if leader.value.node == to {
        println!("{name} runs on {to} already");
        return Ok(());
    }
    if v.standbys.get(to).is_none_or(|s| s.image.is_none()) {
        return Err(Failure::op(format!(
            "{to} is not a standby of {name} holding an image (see snapshim service status {name})"
        )));
    }
    let req_key = keys::service(name, "switchover");
    let req = Switchover { to: to.to_string() };
    if !etcd
        .txn(
            vec![absent(&req_key)],
            vec![op_put(&req_key, &to_json(&req), 0)],
        )
        .map_err(op)?
    {
        return Err(Failure::op(format!(
            "a switchover of {name} is under way already"
        )));
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        let v = get(etcd, name)?;
        if let Some(l) = v.leader.as_ref().filter(|l| l.value.node == to) {
            println!(
                "{name} moved to {to} (generation {}) in {} ms",
                l.value.generation,
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        if v.switchover.is_none() {
            return Err(Failure::op(format!(
                "the switchover of {name} to {to} was abandoned (the leader's log says why)"
            )));
        }
    }
    let _ = etcd.delete(&req_key, false);
    Err(Failure::op(format!(
        "{name} did not move to {to} within {timeout:?}; request withdrawn"
    )))
}

fn list(etcd: &Etcd) -> Result<()> {
    let mut problems = Vec::new();
    for (name, v) in view::services(etcd, &mut problems).map_err(op)? {
        let where_ = match (&v.leader, &v.finished) {
            (_, Some(f)) => format!("finished on {}", f.node),
            (Some(l), _) => format!("leader {} generation {}", l.value.node, l.value.generation),
            _ => "no leader".into(),
        };
        println!("{name}\t{where_}\t{}", v.spec.command.join(" "));
    }
    for p in problems {
        eprintln!("snapshim: {p}");
    }
    Ok(())
}

fn remove(etcd: &Etcd, name: &str) -> Result<()> {
    get(etcd, name)?;
    etcd.delete(&keys::service(name, ""), true).map_err(op)?;
    println!("service {name} removed");
    Ok(())
}
