//! snapshim-restore — rebuilds a process from a snapshim image and runs it in the foreground.
//!
//! This file is the command line only: it reads the options and hands over to
//! [`restore::run`] (the algorithm is told at the top of `restore.rs`) or, for `--standby`,
//! to [`standby::run`].

mod blob;
mod error;
mod lineage;
mod log;
mod ns;
mod objects;
mod options;
mod plan;
mod restore;
mod standby;
mod vdso;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use lineage::Pick;
use options::{Namespace, Options, RunState, Unrestorable};
use plan::{PREFETCH_BACKGROUND, PREFETCH_EAGER, PREFETCH_NONE};

/// Rebuilds the process saved in a snapshim image and runs it in the foreground; exits with
/// the program's exit status.
///
/// The program gets back its PID and thread IDs, and CLOCK_MONOTONIC and CLOCK_BOOTTIME go on
/// from the checkpoint, in new PID and time namespaces (this process stays outside, passing
/// signals on). Where the system does not allow that, the program runs in this process, with
/// new IDs, after a warning.
#[derive(Parser, Debug)]
#[command(name = "snapshim-restore", version, verbatim_doc_comment)]
struct Cli {
    /// An image file, or an image directory (its `latest` image)
    #[arg(value_name = "IMAGE_OR_DIR")]
    target: PathBuf,

    /// Restore in this process, without namespaces (IDs change)
    #[arg(long)]
    no_namespace: bool,

    /// Fail instead of restoring with new IDs
    #[arg(long)]
    require_exact_pids: bool,

    /// Skip checking page-data checksums
    ///
    /// Checking reads every stored page before the program resumes; skip it for an instant
    /// restore.
    #[arg(long, verbatim_doc_comment)]
    no_verify: bool,

    /// Read every stored page into memory before resuming
    ///
    /// Instead of mapping the image (copy-on-write) where the layout allows.
    #[arg(long, verbatim_doc_comment)]
    copy: bool,

    /// What happens to mapped pages when the program resumes: none, background or eager
    ///
    /// none        each page is read from the image on its first touch
    /// background  the kernel starts reading them all in and the program resumes at once
    /// eager       every page is read in and mapped before resuming
    #[arg(long, value_name = "MODE", default_value = "background", value_parser = prefetch_mode,
          verbatim_doc_comment)]
    prefetch: u64,

    /// Accept the mapped file PATH although it changed since the checkpoint; repeatable
    ///
    /// Another size, modification time or build-id. Safe only if the file's content is the
    /// same (a copy or a reproducible rebuild of it): any other change crashes or silently
    /// misleads the program. Repeat for each file.
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    allow_changed_file: Vec<String>,

    /// Print the time from start to resuming the program
    #[arg(long)]
    stats: bool,

    /// Log each step of the restore on stderr, with its time (implies --stats)
    #[arg(long, short)]
    verbose: bool,

    /// Append the log of each step to FILE
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,

    /// Stop just before the jump and print the PID, for a debugger (continue with kill -CONT PID)
    ///
    /// Also set by the environment variable SNAPSHIM_RESTORE_PAUSE.
    #[arg(long, verbatim_doc_comment)]
    pause: bool,

    /// What to do with a descriptor that cannot be restored: fail or closed
    ///
    /// fail    the restore stops before the program resumes, naming the descriptor (default)
    /// closed  the program resumes with that descriptor number closed: every call on it
    ///         fails with EBADF (one warning per descriptor)
    #[arg(long, value_name = "MODE", default_value = "fail", value_parser = unrestorable_mode,
          verbatim_doc_comment)]
    unrestorable: Unrestorable,

    /// Restore established TCP connections alive, as captured with TCP_REPAIR
    ///
    /// Only for connections the program's shim captured (SNAPSHIM_TCP_ESTABLISHED=1, `snapshim
    /// run --tcp-established`), on the same address (this machine, or one that took the
    /// address over). Needs CAP_NET_ADMIN. Without it they come back reset.
    #[arg(long, verbatim_doc_comment)]
    tcp_established: bool,

    /// Check everything ahead, then wait; resume within milliseconds when activated
    ///
    /// Does all the checks (page checksums included) for the newest image of IMAGE_OR_DIR,
    /// keeps its pages in the page cache, then waits; resumes on `snapshim activate DIR_OR_PID`
    /// or SIGUSR1, taking the newest good image committed meanwhile.
    #[arg(long, verbatim_doc_comment)]
    standby: bool,

    /// Give the restored program a lineage of its own, its images in DIR
    ///
    /// A restored program is the next generation of its image's lineage: it writes its images
    /// into the image's directory, which no running instance (the original, another restore)
    /// may hold. With --new-lineage it may run beside one: its images go to DIR, or without
    /// =DIR to the first free IMAGE_DIR.2, IMAGE_DIR.3...
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true,
          default_missing_value = BESIDE, verbatim_doc_comment)]
    new_lineage: Option<PathBuf>,
}

/// `--new-lineage` without a directory (no directory has this name: it is not a path).
const BESIDE: &str = "\u{1}beside";

/// `--prefetch`'s value, as the plan's `PREFETCH_*`.
fn prefetch_mode(s: &str) -> Result<u64, String> {
    match s {
        "none" => Ok(PREFETCH_NONE),
        "background" => Ok(PREFETCH_BACKGROUND),
        "eager" => Ok(PREFETCH_EAGER),
        other => Err(format!(
            "unknown prefetch mode {other:?} (none, background or eager)"
        )),
    }
}

/// `--unrestorable`'s value.
fn unrestorable_mode(s: &str) -> Result<Unrestorable, String> {
    match s {
        "fail" => Ok(Unrestorable::Fail),
        "closed" => Ok(Unrestorable::Closed),
        other => Err(format!("unknown mode {other:?} (fail or closed)")),
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Command {
    verbose: bool,
    log: Option<PathBuf>,
    target: PathBuf,
    standby: bool,
    opt: Options,
}

/// Why the command line leads to no restore.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// `--help` or `--version`: print this on stdout, exit 0.
    Print(String),
    /// A wrong option or combination: this one line on stderr, exit 2.
    Usage(String),
}

/// Reads the command line (`args` includes the program name). `pause_env`: the environment
/// asks for `--pause`.
fn parse(args: impl IntoIterator<Item = OsString>, pause_env: bool) -> Result<Command, Stop> {
    let cli = Cli::try_parse_from(args).map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            Stop::Print(e.render().to_string())
        }
        _ => Stop::Usage(first_paragraph(&e.render().to_string())),
    })?;
    let namespace = match (cli.no_namespace, cli.require_exact_pids) {
        (true, true) => {
            return Err(Stop::Usage(
                "--no-namespace and --require-exact-pids exclude each other".into(),
            ))
        }
        (true, false) => Namespace::Off,
        (false, true) => Namespace::Required,
        (false, false) => Namespace::Preferred,
    };
    if cli.standby && cli.no_verify {
        return Err(Stop::Usage(
            "--standby always checks page checksums (ahead, while it waits); drop --no-verify"
                .into(),
        ));
    }
    Ok(Command {
        verbose: cli.verbose,
        log: cli.log,
        target: cli.target,
        standby: cli.standby,
        opt: Options {
            verify: !cli.no_verify,
            copy: cli.copy,
            prefetch: cli.prefetch,
            pause: cli.pause || pause_env,
            stats: cli.stats || cli.verbose,
            namespace,
            allow_changed: cli.allow_changed_file,
            lineage: match cli.new_lineage {
                None => Pick::Continue,
                Some(d) if d.as_os_str() == BESIDE => Pick::New(None),
                Some(d) => Pick::New(Some(d)),
            },
            unrestorable: cli.unrestorable,
            tcp_established: cli.tcp_established,
        },
    })
}

/// clap's message in one line: its first paragraph, without the "error:" prefix (the usage
/// and the hint to try --help that follow it are left out).
fn first_paragraph(rendered: &str) -> String {
    let first = rendered.split("\n\n").next().unwrap_or(rendered);
    let first = first.trim().trim_start_matches("error:");
    let words: Vec<&str> = first.split_whitespace().collect();
    format!("{} (see --help)", words.join(" "))
}

fn main() -> ExitCode {
    let start_ns = options::monotonic_ns();
    let pause_env = std::env::var_os("SNAPSHIM_RESTORE_PAUSE").is_some();
    let cmd = match parse(std::env::args_os(), pause_env) {
        Ok(cmd) => cmd,
        Err(Stop::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(Stop::Usage(line)) => {
            eprintln!("snapshim-restore: {line}");
            return ExitCode::from(2);
        }
    };
    let state = RunState::starting_at(start_ns);
    if let Err(e) = log::start(cmd.verbose, cmd.log.as_deref(), start_ns) {
        eprintln!("snapshim-restore: {e}");
        return ExitCode::FAILURE;
    }
    log!(
        "snapshim-restore {} {}{}",
        env!("CARGO_PKG_VERSION"),
        cmd.target.display(),
        if cmd.standby { " (standby)" } else { "" }
    );
    let result = if cmd.standby {
        standby::run(&cmd.target, &cmd.opt, state)
    } else {
        restore::run(&cmd.target, &cmd.opt, state)
    };
    match result {
        Ok(never) => match never {},
        Err(e) => {
            log!("failed: {e}");
            eprintln!("snapshim-restore: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Command, Stop> {
        let all = std::iter::once("snapshim-restore").chain(args.iter().copied());
        parse(all.map(OsString::from), false)
    }

    fn usage_error(args: &[&str]) -> String {
        match parse_args(args) {
            Err(Stop::Usage(line)) => {
                assert_eq!(line.lines().count(), 1, "{line:?}");
                line
            }
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse_args(&["img"]).unwrap();
        assert_eq!(c.target, PathBuf::from("img"));
        assert!(!c.standby);
        assert_eq!(
            c.opt,
            Options {
                verify: true,
                copy: false,
                prefetch: PREFETCH_BACKGROUND,
                pause: false,
                stats: false,
                namespace: Namespace::Preferred,
                allow_changed: vec![],
                lineage: Pick::Continue,
                unrestorable: Unrestorable::Fail,
                tcp_established: false,
            }
        );
        assert!(
            parse(["r", "img"].map(OsString::from), true)
                .unwrap()
                .opt
                .pause
        );
    }

    #[test]
    fn an_option_value_may_follow_or_be_joined_with_an_equals_sign() {
        for args in [
            &["--prefetch", "eager", "img"][..],
            &["--prefetch=eager", "img"][..],
            &["img", "--prefetch=eager"][..],
        ] {
            assert_eq!(
                parse_args(args).unwrap().opt.prefetch,
                PREFETCH_EAGER,
                "{args:?}"
            );
        }
        let c = parse_args(&[
            "--allow-changed-file",
            "/a",
            "--allow-changed-file=/b",
            "--no-verify",
            "--copy",
            "--stats",
            "--no-namespace",
            "img",
        ])
        .unwrap();
        assert_eq!(c.opt.allow_changed, ["/a", "/b"]);
        assert!(!c.opt.verify && c.opt.copy && c.opt.stats);
        assert_eq!(c.opt.namespace, Namespace::Off);
        let c = parse_args(&["--require-exact-pids", "--standby", "--pause", "d"]).unwrap();
        assert!(c.standby && c.opt.pause);
        assert_eq!(c.opt.namespace, Namespace::Required);
        assert_eq!(
            parse_args(&["--prefetch=none", "i"]).unwrap().opt.prefetch,
            PREFETCH_NONE
        );
    }

    #[test]
    fn mistakes_are_one_line() {
        assert!(usage_error(&["--frobnicate", "img"]).contains("--frobnicate"));
        assert!(
            usage_error(&["--prefetch=sometimes", "img"]).contains("prefetch mode \"sometimes\"")
        );
        assert!(usage_error(&["--allow-changed-file"]).contains("--allow-changed-file"));
        assert!(usage_error(&[]).contains("IMAGE_OR_DIR"));
        assert!(usage_error(&["a", "b"]).contains("'b'"));
        assert!(
            usage_error(&["--no-namespace", "--require-exact-pids", "i"])
                .contains("exclude each other")
        );
        assert!(usage_error(&["--standby", "--no-verify", "d"]).contains("drop --no-verify"));
    }

    #[test]
    fn help_and_version_are_printed() {
        match parse_args(&["--help"]) {
            Err(Stop::Print(text)) => {
                for word in [
                    "IMAGE_OR_DIR",
                    "--prefetch",
                    "background",
                    "--allow-changed-file",
                    "--standby",
                    "SIGUSR1",
                ] {
                    assert!(text.contains(word), "{word} missing from the help:\n{text}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_args(&["-V"]), Err(Stop::Print(v)) if v.contains(env!("CARGO_PKG_VERSION")))
        );
    }
}
