//! `snapshim replicate keygen|serve|push`: hidden commands over the replication API, for the
//! tests and the benchmark (the node agent calls the API directly).

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{push, push_only, Gate, MacKey, Offer, Options, PushReport, Receiver};
use crate::{Failure, Result};

#[derive(Args)]
pub struct ReplicateArgs {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Make a new replication key (refuses to replace a file)
    Keygen { file: PathBuf },
    /// Receive images into a store until killed; prints `listening on ADDR` once bound
    Serve {
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Images kept per service, with the images they depend on (0: all)
        #[arg(long, value_name = "K", default_value = "3")]
        keep: usize,
        /// Refuse images of a generation older than N (what the agent's gate does with the
        /// leader key's generation; for tests)
        #[arg(long, value_name = "N", hide = true)]
        min_generation: Option<u32>,
    },
    /// Send DIR's newest image (and the images it depends on the receiver lacks)
    Push {
        #[arg(long, value_name = "ADDR")]
        to: std::net::SocketAddr,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_name = "NAME")]
        service: String,
        /// Give up a connect, read or write after TIME (seconds, or 30s, 10m, ...)
        #[arg(long, value_name = "TIME", default_value = "60", value_parser = crate::parse::parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
        /// Offer only this image of DIR, not the images it depends on (for tests)
        #[arg(long, value_name = "FILE", hide = true)]
        only: Option<String>,
        dir: PathBuf,
    },
}

pub fn run(a: ReplicateArgs) -> Result<()> {
    match a.command {
        Sub::Keygen { file } => {
            MacKey::generate(&file)?;
            println!("wrote a new key to {}", file.display());
            Ok(())
        }
        Sub::Serve {
            listen,
            key,
            store,
            keep,
            min_generation,
        } => serve(&listen, &key, store, keep, min_generation),
        Sub::Push {
            to,
            key,
            service,
            timeout,
            json,
            only,
            dir,
        } => {
            let key = MacKey::load(&key)?;
            let r = match only {
                Some(f) => push_only(to, &key, &service, &dir.join(f), timeout)?,
                None => push(to, &key, &service, &dir, timeout)?,
            };
            print_report(&r, json);
            Ok(())
        }
    }
}

fn serve(
    listen: &str,
    key: &std::path::Path,
    store: PathBuf,
    keep: usize,
    min_generation: Option<u32>,
) -> Result<()> {
    let key = MacKey::load(key)?;
    let listener = TcpListener::bind(listen)
        .map_err(|e| Failure::op(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::op(format!("cannot listen on {listen}: {e}")))?;
    let opts = Options {
        keep,
        ..Options::default()
    };
    let gate: Gate = match min_generation {
        Some(min) => Arc::new(move |o: &Offer| {
            if o.generation < min {
                return Err(format!(
                    "it is of generation {}, older than generation {min}",
                    o.generation
                ));
            }
            Ok(())
        }),
        None => Arc::new(|_: &Offer| Ok(())),
    };
    let r = Receiver::serve_with(listener, key, store, gate, opts)?;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    r.wait();
    Ok(())
}

fn print_report(r: &PushReport, json: bool) {
    if json {
        let sent: Vec<_> = r
            .sent
            .iter()
            .map(|s| {
                serde_json::json!({
                    "file": s.file, "id": format!("{:016x}", s.id), "bytes": s.bytes,
                    "seconds": s.elapsed.as_secs_f64(),
                })
            })
            .collect();
        let already: Vec<_> = r.already.iter().map(|h| h.file.clone()).collect();
        let acked: Vec<_> = r.acknowledged.iter().map(|i| format!("{i:016x}")).collect();
        let v = serde_json::json!({
            "newest": r.newest.file, "newest_id": format!("{:016x}", r.newest.id),
            "generation": r.newest.generation,
            "sent": sent, "already": already, "acknowledged": acked,
        });
        println!("{v}");
        return;
    }
    for s in &r.sent {
        println!(
            "sent {} (image {:016x}, {} bytes, acknowledged after {:.3} s)",
            s.file,
            s.id,
            s.bytes,
            s.elapsed.as_secs_f64()
        );
    }
    for h in &r.already {
        println!("held {} (image {:016x}) already", h.file, h.id);
    }
    println!(
        "the receiver holds {} (image {:016x}) and the {} image(s) it depends on",
        r.newest.file,
        r.newest.id,
        r.acknowledged.len() - 1
    );
}
