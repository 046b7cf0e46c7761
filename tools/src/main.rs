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
mod cluster;
mod enterable;
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

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Why a command failed: the line(s) printed after `snapshim: `, and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// The operation failed (exit code 1).
    pub fn op(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// The input was unusable (exit code 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

#[derive(Parser)]
#[command(
    name = "snapshim",
    version,
    about = "Transparent checkpoint/restart for Linux programs",
    long_about = "Transparent checkpoint/restart for Linux programs.\n\n\
        A program started with `snapshim run` (or with LD_PRELOAD=libsnapshim.so) writes an \
        image of itself when it receives the checkpoint signal (SIGRTMAX by default), on a \
        timer, or when asked with `snapshim checkpoint PID`. `snapshim restore IMAGE` brings \
        it back, here or on another machine."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(RunArgs),
    Checkpoint(CheckpointArgs),
    Restore(RestoreArgs),
    Activate(ActivateArgs),
    Inspect(InspectArgs),
    Verify(VerifyArgs),
    Ls(LsArgs),
    Merge(MergeArgs),
    Check(CheckArgs),
    Ps(PsArgs),
    Node(cluster::node::NodeArgs),
    Service(cluster::service::ServiceArgs),
    /// Keep a killed program's live TCP connections for its restore (started by
    /// `snapshim checkpoint --kill`)
    #[command(name = "keep-tcp", hide = true)]
    KeepTcp {
        /// The sockets, inherited
        fds: Vec<i32>,
    },
    /// Image replication between nodes: keygen, serve, push (for tests and benchmarks)
    #[command(hide = true)]
    Replicate(cluster::replicate::ReplicateArgs),
}

/// Run a program with snapshim loaded (LD_PRELOAD), replacing this process
///
/// The program keeps this process's PID, which is printed on stderr. Options not given are
/// left to the environment (SNAPSHIM_DIR, SNAPSHIM_INTERVAL, ...) and the shim's defaults.
#[derive(Args)]
#[command(
    after_help = "Example:\n  snapshim run --interval 10m --dir /shared/ckpt -- ./solver input.dat"
)]
pub struct RunArgs {
    /// Directory for images, SNAPSHIM_DIR [default: $SNAPSHIM_DIR, else ./snapshim-images]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Take a checkpoint every TIME (30s, 10m, 1h, 500ms, or seconds), SNAPSHIM_INTERVAL
    #[arg(long, value_name = "TIME", value_parser = parse::interval_arg)]
    pub interval: Option<String>,
    /// Name of the image directory inside DIR, SNAPSHIM_NAME [default: the program's file name]
    #[arg(long, value_name = "NAME", value_parser = name_arg)]
    pub name: Option<String>,
    /// Checkpoint signal (USR2, SIGUSR1, RTMIN+3, RTMAX-2, or a number), SNAPSHIM_SIGNAL
    /// [default: RTMAX]
    #[arg(long, value_name = "SIG", value_parser = parse::signal_arg)]
    pub signal: Option<String>,
    /// Number of images to keep, SNAPSHIM_KEEP [default: 3]
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Incremental checkpoints: off, on (delta images between full ones), merge (deltas; a
    /// background `snapshim merge` makes the full images), SNAPSHIM_INCREMENTAL [default: off]
    #[arg(long, value_name = "MODE", value_parser = ["off", "on", "merge"])]
    pub incremental: Option<String>,
    /// With --incremental: a full image (or merge) at least every N checkpoints,
    /// SNAPSHIM_FULL_EVERY [default: 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub full_every: Option<u32>,
    /// With --incremental: a full image (or merge) once the deltas since the last one hold more
    /// than F times its size, SNAPSHIM_FULL_FRACTION [default: 0.5]
    #[arg(long, value_name = "F", value_parser = positive_fraction)]
    pub full_fraction: Option<f64>,
    /// Keep the uffd engine's copy store between checkpoints: faster periodic checkpoints, but
    /// the program's resident memory stays larger by it, SNAPSHIM_KEEP_STORE=1 [default: given
    /// back after each checkpoint]
    #[arg(long)]
    pub keep_store: bool,
    /// Also capture established TCP connections alive, with TCP_REPAIR (needs CAP_NET_ADMIN;
    /// `snapshim-restore --tcp-established` restores them), SNAPSHIM_TCP_ESTABLISHED=1
    /// [default: they come back reset]
    #[arg(long)]
    pub tcp_established: bool,
    /// The program and its arguments (after `--`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROG ARGS"
    )]
    pub command: Vec<OsString>,
}

/// Checkpoint a running program and wait until its image is committed
///
/// Sends a request with sigqueue, on the shim's second signal (SIGRTMAX-1, which queues: any
/// number of requests at once are each answered), or to an older shim on the program's
/// checkpoint signal (SNAPSHIM_SIGNAL in its environment, else SIGUSR2, an older shim's
/// default); only after checking
/// that libsnapshim.so is loaded in it and handles the signal. Then waits for the shim's report
/// and prints where the image is.
#[derive(Args)]
pub struct CheckpointArgs {
    /// Give up waiting after TIME (seconds, or 30s, 10m, ...)
    #[arg(long, value_name = "TIME", default_value = "600", value_parser = parse::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print only the image path
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the outcome as JSON (schema in docs/usage.md)
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Also print what the checkpoint did: the pause's phases, the flush, pages copied
    #[arg(long, short, conflicts_with_all = ["quiet", "json"])]
    pub verbose: bool,
    /// Append what the checkpoint did (or why it failed) to FILE, with the time
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Make it the program's last checkpoint: the program stays stopped from the pause on and
    /// is killed (SIGKILL) once the image is committed; its TCP connections captured alive
    /// (SNAPSHIM_TCP_ESTABLISHED) end without a word to their peers, for a restore with
    /// `snapshim-restore --tcp-established`. If the checkpoint fails, the program runs on
    #[arg(long)]
    pub kill: bool,
    /// Process to checkpoint (a program under snapshim, or a running snapshim-restore)
    #[arg(value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: i32,
}

/// Restore a program from an image (runs snapshim-restore with these arguments)
///
/// The restored program replaces this process. IMAGE_OR_DIR is an image file, an image
/// directory (its `latest` image is used), or a base directory holding one image directory.
#[derive(Args)]
#[command(
    after_help = "Options of snapshim-restore (see `snapshim-restore --help`) go before \
                  IMAGE_OR_DIR:\n  snapshim restore --no-verify /shared/ckpt/solver"
)]
pub struct RestoreArgs {
    /// Options for snapshim-restore, then IMAGE_OR_DIR
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// Activate a waiting `snapshim-restore --standby` and wait until the program runs again
///
/// DIR_OR_PID is the image directory the standby watches (or an image in it), or the standby's
/// PID. Prints the image used and the time from activation to the program running; fails
/// without touching anything when no standby is waiting there.
#[derive(Args)]
#[command(
    after_help = "Example:\n  snapshim-restore --standby /shared/ckpt/solver &\n  \
                        snapshim activate /shared/ckpt/solver"
)]
pub struct ActivateArgs {
    /// Give up waiting for the program to resume after TIME (seconds, or 30s, 10m, ...)
    #[arg(long, value_name = "TIME", default_value = "600", value_parser = parse::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print only the path of the image used
    #[arg(long, short)]
    pub quiet: bool,
    /// Image directory (or image) the standby waits on, or its PID
    #[arg(value_name = "DIR_OR_PID")]
    pub target: PathBuf,
}

/// Describe an image: the program, its memory regions, threads, files and signal handlers
#[derive(Args)]
pub struct InspectArgs {
    /// Print the description as JSON (schema in docs/usage.md)
    #[arg(long)]
    pub json: bool,
    /// Image file, image directory (uses `latest`), or a base directory with one image directory
    #[arg(value_name = "IMAGE_OR_DIR")]
    pub image: PathBuf,
}

/// Check an image: header, metadata and page checksums, and the files its mappings need
#[derive(Args)]
pub struct VerifyArgs {
    /// Print the outcome as JSON (schema in docs/usage.md)
    #[arg(long)]
    pub json: bool,
    /// Image file, image directory (uses `latest`), or a base directory with one image directory
    #[arg(value_name = "IMAGE_OR_DIR")]
    pub image: PathBuf,
}

/// List image directories and their images
#[derive(Args)]
pub struct LsArgs {
    /// Print the listing as JSON (schema in docs/usage.md)
    #[arg(long)]
    pub json: bool,
    /// Base directory or image directory [default: $SNAPSHIM_DIR, else ./snapshim-images]
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// List the programs running under snapshim: PID, image directory, generation, last
/// checkpoint, engine, and whether a checkpoint is being taken
#[derive(Args)]
pub struct PsArgs {
    /// Print the list as JSON (schema in docs/usage.md)
    #[arg(long)]
    pub json: bool,
}

/// Say which kernel features snapshim can use here, and what each one enables
///
/// Exit status 0 when checkpoint and restore will work on this machine as this user.
#[derive(Args)]
pub struct CheckArgs {
    /// Print the report as JSON (schema in docs/usage.md)
    #[arg(long)]
    pub json: bool,
}

/// Fold a chain of delta images into one full image
///
/// The named image (or the directory's `latest`), if it is a delta, is replaced by a full image
/// of the same instant, made from the chain of images it depends on; then the older images of
/// that chain are deleted, unless another image still depends on them. Safe while the program
/// runs and takes new checkpoints; a crash at any point leaves a restorable chain.
#[derive(Args)]
pub struct MergeArgs {
    /// Print nothing on success
    #[arg(long, short)]
    pub quiet: bool,
    /// Image file, image directory (uses `latest`), or a base directory with one image directory
    #[arg(value_name = "IMAGE_OR_DIR")]
    pub image: PathBuf,
}

/// A number greater than 0.
fn positive_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f.is_finite() => Ok(f),
        _ => Err(format!("'{s}' is not a number greater than 0")),
    }
}

/// An image directory name: one non-empty path component.
fn name_arg(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(format!(
            "'{s}' cannot be a directory name (it must be one path component)"
        ));
    }
    Ok(s.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` prints its own report, failed or not.
    let json = match &cli.command {
        Command::Checkpoint(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Ls(a) => a.json,
        Command::Verify(a) => a.json,
        Command::Ps(a) => a.json,
        _ => false,
    };
    let result = match cli.command {
        Command::Run(a) => launch::run(a),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("snapshim").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_options_then_the_program() {
        let cli = parse(&[
            "run",
            "--dir",
            "/d",
            "--interval",
            "10m",
            "--name",
            "x",
            "--signal",
            "usr1",
            "--keep",
            "2",
            "--",
            "prog",
            "-v",
            "--flag",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.dir, Some(PathBuf::from("/d")));
        assert_eq!(a.interval.as_deref(), Some("10m"));
        assert_eq!(a.name.as_deref(), Some("x"));
        assert_eq!(a.signal.as_deref(), Some("USR1"));
        assert_eq!(a.keep, Some(2));
        assert_eq!(a.command, ["prog", "-v", "--flag"]);
    }

    #[test]
    fn run_takes_the_incremental_options() {
        let cli = parse(&[
            "run",
            "--incremental",
            "merge",
            "--full-every",
            "4",
            "--full-fraction",
            "0.25",
            "--",
            "prog",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.incremental.as_deref(), Some("merge"));
        assert_eq!(a.full_every, Some(4));
        assert_eq!(a.full_fraction, Some(0.25));
        for bad in [
            &["run", "--incremental", "yes", "--", "p"][..],
            &["run", "--full-every", "0", "--", "p"],
            &["run", "--full-fraction", "0", "--", "p"],
            &["run", "--full-fraction", "-1", "--", "p"],
        ] {
            assert_eq!(parse(bad).err().map(|e| e.exit_code()), Some(2), "{bad:?}");
        }
    }

    #[test]
    fn run_program_options_are_not_ours() {
        let cli = parse(&["run", "prog", "--dir", "x"]).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.dir, None);
        assert_eq!(a.command, ["prog", "--dir", "x"]);
    }

    #[test]
    fn run_refuses_bad_values_as_usage_errors() {
        for args in [
            &["run", "--interval", "soon", "--", "p"][..],
            &["run", "--interval", "0", "--", "p"],
            &["run", "--signal", "KILL", "--", "p"],
            &["run", "--keep", "0", "--", "p"],
            &["run", "--name", "a/b", "--", "p"],
            &["run", "--name", "..", "--", "p"],
            &["run"],
            &["run", "--"],
        ] {
            let e = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn checkpoint_takes_a_pid_and_a_timeout() {
        let cli = parse(&["checkpoint", "--timeout", "30s", "-q", "1234"]).unwrap();
        let Command::Checkpoint(a) = cli.command else {
            panic!("not checkpoint")
        };
        assert_eq!(a.pid, 1234);
        assert_eq!(a.timeout, std::time::Duration::from_secs(30));
        assert!(a.quiet);
        let cli = parse(&["checkpoint", "7"]).unwrap();
        let Command::Checkpoint(a) = cli.command else {
            panic!("not checkpoint")
        };
        assert_eq!(a.timeout, std::time::Duration::from_secs(600));
        for bad in [
            &["checkpoint"][..],
            &["checkpoint", "0"],
            &["checkpoint", "-5"],
            &["checkpoint", "abc"],
            &["checkpoint", "--timeout", "x", "5"],
        ] {
            assert_eq!(parse(bad).err().map(|e| e.exit_code()), Some(2), "{bad:?}");
        }
    }

    #[test]
    fn restore_passes_everything_through() {
        let cli = parse(&["restore", "--verbose", "-x", "/img/dir"]).unwrap();
        let Command::Restore(a) = cli.command else {
            panic!("not restore")
        };
        assert_eq!(a.args, ["--verbose", "-x", "/img/dir"]);
        assert!(parse(&["restore"]).is_err());
    }

    #[test]
    fn activate_takes_a_dir_or_pid_and_a_timeout() {
        let cli = parse(&["activate", "--timeout", "5s", "/img/solver"]).unwrap();
        let Command::Activate(a) = cli.command else {
            panic!("not activate")
        };
        assert_eq!(a.target, PathBuf::from("/img/solver"));
        assert_eq!(a.timeout, std::time::Duration::from_secs(5));
        assert!(parse(&["activate"]).is_err());
    }

    #[test]
    fn service_add_takes_options_then_the_command() {
        let cli = parse(&[
            "service",
            "--etcd",
            "http://e:1",
            "add",
            "s",
            "--interval",
            "2s",
            "--standbys",
            "2",
            "--mode",
            "sync",
            "--ttl",
            "3s",
            "--",
            "prog",
            "--x",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Service(_)));
        for bad in [
            &["service", "add", "s"][..],
            &["service", "add", "a/b", "--", "p"],
            &["service", "add", "s", "--mode", "quorum", "--", "p"],
            &["service", "add", "s", "--standbys", "0", "--", "p"],
            &["service", "switchover", "s"],
            &[
                "node", "run", "--name", "a", "--listen", "x:1", "--store", "d",
            ],
        ] {
            assert_eq!(parse(bad).err().map(|e| e.exit_code()), Some(2), "{bad:?}");
        }
    }

    #[test]
    fn every_command_has_help() {
        for cmd in [
            "run",
            "checkpoint",
            "restore",
            "activate",
            "inspect",
            "verify",
            "ls",
            "merge",
            "node",
            "service",
        ] {
            let e = parse(&[cmd, "--help"]).err().unwrap();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{cmd}");
            assert_eq!(e.exit_code(), 0);
        }
    }
}
