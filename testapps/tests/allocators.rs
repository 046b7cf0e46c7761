//! Programs that bring their own allocator run under the shim exactly as without it, and
//! restore: the `allocs` app (allocation churn in three threads, every block written over its
//! whole `malloc_usable_size`) linked with jemalloc, tcmalloc and mimalloc, with jemalloc
//! preloaded after the shim, and with glibc's allocator; each checkpointed at a random moment
//! (most of its time is spent inside the allocator), killed with SIGKILL, restored, and its
//! output compared byte for byte with an uninterrupted run. `SNAPSHIM_DISABLE=1` leaves the
//! program alone. Debian's redis-server (linked with jemalloc) starts under the shim, serves,
//! and is checkpointed while a client writes to it, then still serves the same data.
//!
//! Needs `cargo build --release --workspace` first, and the Debian packages libjemalloc-dev,
//! libgoogle-perftools-dev, libmimalloc-dev, redis-server (`scripts/test.sh` installs them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

use snapshim_testapps::{
    bail, needs, reference, uninterrupted_run, AppSpec, Context, Failure, Result, Running, Session,
};

/// The allocators the app is linked with: library and Debian package.
const JEMALLOC: (&str, &str) = ("jemalloc", "libjemalloc-dev");
const TCMALLOC: (&str, &str) = ("tcmalloc", "libgoogle-perftools-dev");
const MIMALLOC: (&str, &str) = ("mimalloc", "libmimalloc-dev");

/// The `allocs` app linked with `lib`, or `None` when the library is missing (skipped loudly).
fn linked((lib, package): (&str, &str)) -> Result<Option<AppSpec>> {
    if !needs::c_library(lib, package)? {
        return Ok(None);
    }
    AppSpec::allocs_linked_with(lib).map(Some)
}

/// Checkpoint at a random moment, SIGKILL, restore, identical output. The reference run under
/// the shim must print what a run without it prints (`reference` checks that first).
fn restores_at_a_random_moment(spec: AppSpec) -> Result<()> {
    Session::new(spec)?.restores_from_a_random_moment()
}

#[test]
fn jemalloc_linked_restores() -> Result<()> {
    match linked(JEMALLOC)? {
        Some(spec) => restores_at_a_random_moment(spec),
        None => Ok(()),
    }
}

#[test]
fn tcmalloc_linked_restores() -> Result<()> {
    match linked(TCMALLOC)? {
        Some(spec) => restores_at_a_random_moment(spec),
        None => Ok(()),
    }
}

#[test]
fn mimalloc_linked_restores() -> Result<()> {
    match linked(MIMALLOC)? {
        Some(spec) => restores_at_a_random_moment(spec),
        None => Ok(()),
    }
}

/// `LD_PRELOAD="libsnapshim.so libjemalloc.so.2"`: the shim's malloc family forwards to the
/// preloaded allocator, which the program's own references reach too.
#[test]
fn jemalloc_preloaded_after_the_shim_restores() -> Result<()> {
    if !needs::c_library(JEMALLOC.0, JEMALLOC.1)? {
        return Ok(());
    }
    restores_at_a_random_moment(AppSpec::named("allocs")?.preload("libjemalloc.so.2"))
}

/// glibc's allocator, where the shim also saves mmapped chunks before `free` during a flush.
#[test]
fn glibc_allocator_restores() -> Result<()> {
    restores_at_a_random_moment(AppSpec::named("allocs")?)
}

/// With `SNAPSHIM_DISABLE=1` the shim is loaded but does nothing: every build prints what it
/// prints without the shim.
#[test]
fn disabled_shim_leaves_every_allocator_alone() -> Result<()> {
    let mut specs = vec![AppSpec::named("allocs")?];
    for lib in [JEMALLOC, TCMALLOC, MIMALLOC] {
        specs.extend(linked(lib)?);
    }
    for spec in specs {
        let want = reference(&spec)?;
        let got = uninterrupted_run(&spec.clone().env("SNAPSHIM_DISABLE", "1"), true)?;
        if got.stdout != want.stdout {
            bail!(
                "{} under a disabled shim printed something else: {}",
                spec.name,
                snapshim_testapps::diff_summary(&want.stdout, &got.stdout)
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// redis-server

const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// redis-server under the shim on 127.0.0.1 and a free port, without persistence, its log on
/// stderr; returned once it accepts connections.
fn start_redis(disable_shim: bool) -> Result<Option<(Running, u16)>> {
    if !needs::program(REDIS_SERVER, "redis-server")? || !needs::program(REDIS_CLI, "redis-tools")?
    {
        return Ok(None);
    }
    let port = free_port()?;
    let port_arg = port.to_string();
    #[rustfmt::skip]
    let args = [
        "--port", &port_arg, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", ".", "--logfile", "/dev/stderr", "--daemonize", "no",
    ];
    let mut spec = AppSpec::new("redis", REDIS_SERVER.into(), &args);
    if disable_shim {
        spec = spec.env("SNAPSHIM_DISABLE", "1");
    }
    let mut redis = Session::new(spec)?.spawn_without_reference()?;
    redis.wait_for("Ready to accept connections")?;
    Ok(Some((redis, port)))
}

/// A port nobody listens on now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local address")?.port())
}

/// `redis-cli -p PORT ARGS...` must print `want`.
fn redis_cli(port: u16, args: &[&str], want: &str) -> Result<()> {
    let out = Command::new(REDIS_CLI)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .context("run redis-cli")?;
    let got = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || got.trim() != want {
        bail!(
            "redis-cli {args:?}: {}, printed {got:?} instead of {want:?}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A RESP connection that sends commands in batches (pipelined) and reads their replies.
struct Client {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl Client {
    fn connect(port: u16) -> Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port)).context("connect to redis")?;
        Ok(Client {
            input: BufReader::new(s.try_clone().context("clone the socket")?),
            out: s,
        })
    }

    /// Sends every command, then returns every reply (`+OK`, `$` bulk strings as their text,
    /// `:n` as `n`; `-ERR` is an error).
    fn run(&mut self, commands: &[Vec<String>]) -> Result<Vec<String>> {
        let mut buf = Vec::new();
        for c in commands {
            write!(buf, "*{}\r\n", c.len()).expect("to a Vec");
            for a in c {
                write!(buf, "${}\r\n{a}\r\n", a.len()).expect("to a Vec");
            }
        }
        self.out.write_all(&buf).context("send to redis")?;
        commands.iter().map(|_| self.reply()).collect()
    }

    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.input.read_line(&mut l).context("read from redis")? == 0 {
            bail!("redis closed the connection");
        }
        Ok(l.trim_end_matches("\r\n").to_string())
    }

    fn reply(&mut self) -> Result<String> {
        let l = self.line()?;
        match l.split_at(1.min(l.len())) {
            ("+", s) | (":", s) => Ok(s.to_string()),
            ("$", "-1") => Ok("(nil)".into()),
            ("$", n) => {
                let n: usize = n.parse().context(format!("bulk length in {l:?}"))?;
                let mut data = vec![0u8; n + 2]; // and its CRLF
                self.input
                    .read_exact(&mut data)
                    .context("read from redis")?;
                data.truncate(n);
                String::from_utf8(data).context("a reply from redis")
            }
            _ => bail!("unexpected reply from redis: {l:?}"),
        }
    }
}

fn set_commands(prefix: &str, n: usize) -> Vec<Vec<String>> {
    (0..n)
        .map(|i| vec!["SET".into(), format!("{prefix}:{i}"), value(prefix, i)])
        .collect()
}

fn value(prefix: &str, i: usize) -> String {
    format!("{prefix}-value-{i}-{}", "x".repeat(i % 97))
}

/// Every `prefix:i` for i < n holds its value.
fn check_keys(client: &mut Client, prefix: &str, n: usize) -> Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let gets: Vec<Vec<String>> = chunk
            .iter()
            .map(|i| vec!["GET".into(), format!("{prefix}:{i}")])
            .collect();
        for (i, got) in chunk.iter().zip(client.run(&gets)?) {
            if got != value(prefix, *i) {
                bail!("GET {prefix}:{i} returned {got:?}");
            }
        }
    }
    Ok(())
}

fn set_keys(client: &mut Client, prefix: &str, n: usize) -> Result<()> {
    for chunk in set_commands(prefix, n).chunks(5000) {
        if let Some(bad) = client.run(chunk)?.into_iter().find(|r| r != "OK") {
            bail!("SET {prefix}:... answered {bad:?}");
        }
    }
    Ok(())
}

/// Debian's redis-server (linked with libjemalloc) starts under the shim, serves, and is
/// checkpointed while a second client writes 50,000 keys; it then serves every key of both
/// clients, and the image verifies. (Restoring it needs sockets and epoll: not tested here.)
#[test]
fn redis_serves_and_checkpoints_under_the_shim() -> Result<()> {
    let Some((redis, port)) = start_redis(false)? else {
        return Ok(());
    };
    redis_cli(port, &["PING"], "PONG")?;
    let mut client = Client::connect(port)?;
    let allocator = client
        .run(&[vec!["INFO".into(), "memory".into()]])?
        .remove(0);
    if !allocator.contains("mem_allocator:jemalloc") {
        bail!("redis-server does not use jemalloc here; its INFO memory:\n{allocator}");
    }
    set_keys(&mut client, "before", 20_000)?;

    let writer = std::thread::spawn(move || -> Result<()> {
        let mut c = Client::connect(port)?;
        set_keys(&mut c, "during", 50_000)
    });
    let img = redis.checkpoint()?;
    writer
        .join()
        .map_err(|_| Failure::new("the writing client panicked"))??;

    check_keys(&mut client, "before", 20_000)?;
    check_keys(&mut client, "during", 50_000)?;
    redis_cli(port, &["DBSIZE"], "70000")?;
    redis_cli(port, &["PING"], "PONG")?;
    img.session().expect_verify_ok(img.path())?;
    img.session().passed();
    Ok(())
}

/// With `SNAPSHIM_DISABLE=1` redis-server runs with the shim loaded but inert: no helper thread,
/// nothing reserved, and it serves.
#[test]
fn redis_runs_under_a_disabled_shim() -> Result<()> {
    let Some((redis, port)) = start_redis(true)? else {
        return Ok(());
    };
    redis_cli(port, &["PING"], "PONG")?;
    let mut client = Client::connect(port)?;
    set_keys(&mut client, "k", 10_000)?;
    check_keys(&mut client, "k", 10_000)?;
    let pid = redis.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).context("read maps")?;
    if !maps.contains("libsnapshim.so") {
        bail!("the shim is not even loaded in redis-server:\n{maps}");
    }
    if let Some(l) = maps.lines().find(|l| l.starts_with("6e000000-")) {
        bail!("a disabled shim reserved the restorer's range: {l}");
    }
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).context("list tasks")? {
        let comm = std::fs::read_to_string(task.context("list tasks")?.path().join("comm"))
            .unwrap_or_default();
        if comm.trim() == "snapshim" {
            bail!("a disabled shim started its helper thread in redis-server");
        }
    }
    redis.session().passed();
    Ok(())
}
