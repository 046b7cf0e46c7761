//! `snapshim`: the command-line tool around the shim and the restorer.
//!
//! - `run` launches a program with `libsnapshim.so` preloaded and the shim's settings in its
//!   environment, by `exec`, so the program keeps the PID `snapshim run` had.
//! - `checkpoint` asks a running program for a checkpoint and waits for the outcome (the
//!   protocol is described in `checkpoint.rs`).
//! - `restore` execs `snapshim-restore`.
//! - `activate` wakes a waiting `snapshim-restore --standby` (`activate.rs`).
//! - `node` runs the node agent of a cluster, `service` defines and moves the programs it
//!   keeps running (`cluster/`).
//! - `inspect`, `verify` and `ls` read images through `snapshim-image` only; they never load
//!   the shim.
//!
//! Errors are one line on stderr, `snapshim: <what failed>: <why>`. Exit codes: 0 success,
//! 1 the operation failed, 2 bad usage (clap's code for usage errors).

mod activate;
mod check;
mod checkpoint;
mod cli;
mod cluster;
mod companions;
mod durable;
mod enterable;
mod failure;
mod group;
mod inspect;
mod json;
mod keeper;
mod launch;
mod ls;
mod merge;
mod parse;
mod proc;
mod ps;
mod verify;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` prints its own report, failed or not.
    let json = match &cli.command {
        Command::Checkpoint(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Ls(a) => a.json,
        Command::Verify(a) => a.json,
        Command::Ps(a) => a.json,
        Command::Restore(a) => a.json,
        _ => false,
    };
    let result = match cli.command {
        Command::Run(a) => launch::run(a),
        Command::Checkpoint(a) if a.group.is_some() => group::checkpoint(a),
        Command::Checkpoint(a) => checkpoint::checkpoint(a),
        Command::Restore(a) => launch::restore(a),
        Command::Activate(a) => activate::activate(a),
        Command::Inspect(a) => inspect::inspect(&a.image, a.json),
        Command::Verify(a) => verify::verify(&a.image, a.json),
        Command::Ls(a) => ls::ls(a.dir, a.json),
        Command::Merge(a) => merge::merge(&a.image, a.quiet),
        Command::Check(a) => check::check(a),
        Command::Ps(a) => ps::ps(a.json),
        Command::Node(a) => cluster::node::run(a),
        Command::Service(a) => cluster::service::run(a),
        Command::KeepTcp { fds } => keeper::run(&fds),
        Command::Replicate(a) => cluster::replicate::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                println!("{}", json::failure(&f));
            }
            for line in f.message.lines() {
                eprintln!("snapshim: {line}");
            }
            ExitCode::from(f.code)
        }
    }
}
