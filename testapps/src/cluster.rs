//! A cluster of nodes on one machine, for the failover tests: each node is a network namespace,
//! all of them joined by a bridge, with one member of a three-member etcd cluster in each.
//!
//! ```text
//!   namespace sn<tag>-br            namespace sn<tag>-0      sn<tag>-1            sn<tag>-2
//!   ┌──────────────────────┐        ┌────────────────────┐   ┌────────────────┐   ┌──────────┐
//!   │ br0 ── v0 ═══════════╪════════╪═ eth0 10.X.Y.1/24  │   │ eth0 10.X.Y.2  │   │ eth0 .3  │
//!   │    ├── v1 ═══════════╪════════╪════════════════════╪═══╪═               │   │          │
//!   │    └── v2 ═══════════╪════════╪════════════════════╪═══╪════════════════╪═══╪═         │
//!   └──────────────────────┘        │ etcd n0 :2379/2380 │   │ etcd n1        │   │ etcd n2  │
//!                                   │ agent, program...  │   │ ...            │   │ ...      │
//!                                   └────────────────────┘   └────────────────┘   └──────────┘
//! ```
//!
//! The bridge lives in a namespace of its own, so nothing is added to the machine's own network
//! and addresses cannot clash with anything (the subnet 10.X.Y.0/24, X in 200..=250, is random
//! all the same). [`Cluster::cut_link`] sets the bridge's end of a node's veth pair down: the
//! node keeps its address and reaches itself (its agent still talks to its own etcd member,
//! which then has no quorum), but nobody else.
//!
//! Processes are started in a node with [`Cluster::command`] (the child enters the namespace
//! with `setns` between fork and exec, so no `ip netns exec` stands between the test and the
//! process, and the mount namespace stays the test's). A node's processes are found with
//! `ip netns pids`, which also finds what the test's children started (a restored program).
//!
//! Dropping the [`Cluster`] kills every process in its namespaces, deletes the namespaces
//! (which removes the bridge and the veth pairs) and its directory, also while a test panics.
//! A test process killed outright cannot clean up: the next [`Cluster::new`] removes the
//! namespaces of clusters whose owner process is gone (their directory names the owner's PID).
#![allow(unsafe_code)] // setns between fork and exec, with its SAFETY note.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::{run_captured, send_signal, wait_until, Captured};
use crate::rng::{base_seed, Rng};
use crate::{bail, Context, Failure, Result};

/// etcd (Debian package `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";
/// etcdctl (Debian package `etcd-client`).
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// ip (Debian package `iproute2`).
pub const IP: &str = "/usr/bin/ip";
/// etcd's client port on each node's address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on each node's address.
pub const ETCD_PEER_PORT: u16 = 2380;
/// Prefix of every name the clusters make (namespaces, directories).
const PREFIX: &str = "sn";

/// A cluster of network namespaces joined by a bridge, with an etcd member in each node.
pub struct Cluster {
    tag: String,
    subnet: [u8; 2],
    nodes: usize,
    dir: PathBuf,
    etcd: Mutex<Vec<Option<Child>>>,
    /// Everything else the test started, with the node it runs in.
    started: Mutex<Vec<(usize, Child)>>,
    /// Which nodes' links are cut.
    cut: Mutex<Vec<bool>>,
}

impl Cluster {
    /// `nodes` namespaces on a fresh bridge, without etcd. Needs root.
    pub fn new(nodes: usize) -> Result<Cluster> {
        sweep_abandoned();
        let mut rng = Rng::new(
            base_seed()
                ^ u64::from(std::process::id()) << 32
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
        );
        let tag = format!("{:06x}", rng.next_u64() & 0xff_ffff);
        let subnet = [
            200 + (rng.next_u64() % 51) as u8,
            (rng.next_u64() % 256) as u8,
        ];
        let dir = std::env::temp_dir().join(format!("{PREFIX}{tag}-cluster"));
        fs::create_dir_all(&dir).context(format!("create {}", dir.display()))?;
        // Before any namespace exists: a later sweep knows whose they are.
        fs::write(dir.join("owner"), std::process::id().to_string())
            .context(format!("write {}/owner", dir.display()))?;
        let cluster = Cluster {
            tag,
            subnet,
            nodes,
            dir,
            etcd: Mutex::new((0..nodes).map(|_| None).collect()),
            started: Mutex::new(Vec::new()),
            cut: Mutex::new(vec![false; nodes]),
        };
        // From here on, Drop removes whatever part was made.
        cluster.build_network()?;
        eprintln!(
            "[cluster {}] {nodes} nodes in namespaces {PREFIX}{}-0.., subnet 10.{}.{}.0/24, \
             files in {}",
            cluster.tag,
            cluster.tag,
            subnet[0],
            subnet[1],
            cluster.dir.display()
        );
        Ok(cluster)
    }

    /// [`Cluster::new`] with an etcd member in every node, all healthy.
    pub fn with_etcd(nodes: usize) -> Result<Cluster> {
        let cluster = Cluster::new(nodes)?;
        for i in 0..nodes {
            cluster.start_etcd(i)?;
        }
        cluster.wait_until("every etcd member is healthy", || {
            Ok((0..nodes).all(|i| cluster.etcd_healthy(i)))
        })?;
        Ok(cluster)
    }

    fn build_network(&self) -> Result<()> {
        let br = self.bridge_ns();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..self.nodes {
            let ns = self.ns(i);
            let veth = format!("v{i}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"])?;
            let cidr = format!("{}/24", self.addr(i));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The random part of every name this cluster made.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The cluster's private directory (etcd data and logs; tests may put their files here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i`'s network namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{PREFIX}{}-{i}", self.tag)
    }

    fn bridge_ns(&self) -> String {
        format!("{PREFIX}{}-br", self.tag)
    }

    /// Node `i`'s address (10.X.Y.i+1), on its `eth0`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet[0], self.subnet[1], i as u8 + 1)
    }

    /// etcd member `i`'s client URL.
    pub fn etcd_url(&self, i: usize) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.addr(i))
    }

    /// Every member's client URL, comma-separated (what `--etcd` takes).
    pub fn etcd_endpoints(&self) -> String {
        (0..self.nodes)
            .map(|i| self.etcd_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A command that runs `program` in node `i`'s network namespace (entered between fork and
    /// exec). stdin is /dev/null.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let path = format!("/run/netns/{}", self.ns(i));
        let ns = File::open(&path).context(format!("open {path}"))?;
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only calls setns, an
        // async-signal-safe system call, on a descriptor the closure owns (open, close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Starts `cmd` (made by [`Cluster::command`] for node `i`) and keeps it, to be killed with
    /// the node or the cluster. Returns its PID.
    pub fn exec(&self, i: usize, cmd: &mut Command) -> Result<u32> {
        let what = crate::process::command_line(cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Failure::new(format!("cannot start `{what}` in node {i}: {e}")))?;
        let pid = child.id();
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i, child));
        Ok(pid)
    }

    /// Runs `cmd` (made by [`Cluster::command`]) to completion, within `limit`.
    pub fn run(&self, cmd: &mut Command, limit: Duration) -> Result<Captured> {
        run_captured(cmd, limit)
    }

    /// `etcdctl ARGS` in node `i` against member `i` alone, with short timeouts.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Result<Captured> {
        self.etcdctl_at(i, &self.etcd_url(i), args)
    }

    /// `etcdctl ARGS` in node `i` against `endpoints`, with short timeouts.
    pub fn etcdctl_at(&self, i: usize, endpoints: &str, args: &[&str]) -> Result<Captured> {
        let mut cmd = self.command(i, ETCDCTL)?;
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args);
        run_captured(&mut cmd, Duration::from_secs(30))
    }

    /// Whether member `i` answers `endpoint health` (a quorum read) from its own node.
    pub fn etcd_healthy(&self, i: usize) -> bool {
        self.etcdctl(i, &["endpoint", "health"])
            .is_ok_and(|c| c.status.success())
    }

    /// Starts etcd member `i` (again, after [`Cluster::stop_etcd`]: its data directory makes it
    /// rejoin as the member it was). Does not wait for it to be healthy.
    pub fn start_etcd(&self, i: usize) -> Result<()> {
        let mut etcd = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        if etcd[i].is_some() {
            bail!("etcd member {i} is already running");
        }
        let peers: Vec<String> = (0..self.nodes)
            .map(|j| format!("n{j}=http://{}:{ETCD_PEER_PORT}", self.addr(j)))
            .collect();
        let (client, peer) = (
            self.etcd_url(i),
            format!("http://{}:{ETCD_PEER_PORT}", self.addr(i)),
        );
        let log_path = self.dir.join(format!("etcd{i}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .context(format!("open {}", log_path.display()))?;
        let mut cmd = self.command(i, ETCD)?;
        cmd.arg(format!("--name=n{i}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.join(format!("etcd{i}")).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", peers.join(",")))
            .arg(format!("--initial-cluster-token={PREFIX}{}", self.tag))
            .arg("--initial-cluster-state=new")
            // Fast elections for fast tests (defaults: 100 ms and 1000 ms).
            .args(["--heartbeat-interval=100", "--election-timeout=500"])
            // etcd 3.4 defaults to no pre-vote (3.5 turned it on): a member back from a cut
            // then campaigns with the higher term it reached alone and deposes the leader,
            // and the election that follows can outlast a 2 s lease TTL.
            .arg("--pre-vote")
            .stdout(log.try_clone().context("dup the etcd log")?)
            .stderr(log);
        let what = crate::process::command_line(&cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Failure::new(format!("cannot start `{what}` in node {i}: {e}")))?;
        etcd[i] = Some(child);
        Ok(())
    }

    /// SIGKILLs etcd member `i` and reaps it.
    pub fn stop_etcd(&self, i: usize) -> Result<()> {
        let mut etcd = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = etcd[i].take() else {
            bail!("etcd member {i} is not running");
        };
        let _ = child.kill();
        wait_until(&mut child, Instant::now() + Duration::from_secs(30))
            .context(format!("wait for etcd member {i}"))?
            .ok_or_else(|| Failure::new(format!("etcd member {i} survived SIGKILL")))?;
        Ok(())
    }

    /// Cuts node `i` off the bridge (its veth's bridge end down).
    pub fn cut_link(&self, i: usize) -> Result<()> {
        self.set_link(i, "down")?;
        self.cut.lock().unwrap_or_else(|e| e.into_inner())[i] = true;
        eprintln!("[cluster {}] node {i}: link cut", self.tag);
        Ok(())
    }

    /// Puts node `i` back on the bridge.
    pub fn restore_link(&self, i: usize) -> Result<()> {
        self.set_link(i, "up")?;
        self.cut.lock().unwrap_or_else(|e| e.into_inner())[i] = false;
        eprintln!("[cluster {}] node {i}: link restored", self.tag);
        Ok(())
    }

    fn set_link(&self, i: usize, state: &str) -> Result<()> {
        let (ns, veth) = (self.bridge_ns(), format!("v{i}"));
        ip(&["-n", &ns, "link", "set", &veth, state])
    }

    /// Whether node `i`'s link is up (not cut by [`Cluster::cut_link`]).
    pub fn link_is_up(&self, i: usize) -> bool {
        !self.cut.lock().unwrap_or_else(|e| e.into_inner())[i]
    }

    /// The inode numbers of the nodes' network namespaces, by node (what `/proc/PID/ns/net` of
    /// a process in the node resolves to).
    pub fn ns_inodes(&self) -> Result<Vec<u64>> {
        use std::os::unix::fs::MetadataExt;
        (0..self.nodes)
            .map(|i| {
                let path = format!("/run/netns/{}", self.ns(i));
                fs::metadata(&path)
                    .map(|m| m.ino())
                    .context(format!("stat {path}"))
            })
            .collect()
    }

    /// The PIDs of the processes in node `i`'s namespace (zombies are not listed).
    pub fn pids(&self, i: usize) -> Result<Vec<u32>> {
        ns_pids(&self.ns(i))
    }

    /// PID of etcd member `i`, while it runs.
    pub fn etcd_pid(&self, i: usize) -> Option<u32> {
        self.etcd.lock().unwrap_or_else(|e| e.into_inner())[i]
            .as_ref()
            .map(Child::id)
    }

    /// SIGKILLs every process in node `i` but its etcd member (the agent, the program it runs,
    /// anything the test started there), until none is left, and reaps those the test started.
    /// Returns the PIDs it killed.
    pub fn kill_node(&self, i: usize) -> Result<Vec<u32>> {
        let keep = self.etcd_pid(i);
        let killed = kill_all_in(&self.ns(i), keep, Duration::from_secs(30))?;
        self.reap(Some(i));
        eprintln!("[cluster {}] node {i}: killed {killed:?}", self.tag);
        Ok(killed)
    }

    /// Reaps the test's children in node `i` (every node: `None`) that have exited.
    fn reap(&self, node: Option<usize>) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        started.retain_mut(|(n, child)| {
            node.is_some_and(|i| i != *n) || !matches!(child.try_wait(), Ok(Some(_)))
        });
    }

    /// Polls `cond` until it holds, within `SNAPSHIM_TEST_TIMEOUT` (default 120 s); an error
    /// names `what`.
    pub fn wait_until(&self, what: &str, cond: impl FnMut() -> Result<bool>) -> Result<()> {
        poll_until(what, crate::process::timeout(), cond)
    }

    /// Removes everything: processes, namespaces (bridge and links with them), the directory.
    fn tear_down(&mut self) {
        let mut etcd = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.nodes {
            if let Err(e) = kill_all_in(&self.ns(i), None, Duration::from_secs(30)) {
                eprintln!("[cluster {}] node {i}: {e}", self.tag);
            }
        }
        for child in etcd.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (_, child) in self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in (0..self.nodes)
            .map(|i| self.ns(i))
            .chain([self.bridge_ns()])
        {
            if Path::new("/run/netns").join(&ns).exists() {
                if let Err(e) = ip(&["netns", "del", &ns]) {
                    eprintln!("[cluster {}] {e}", self.tag);
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.tear_down();
        let keep = std::thread::panicking() || std::env::var_os("SNAPSHIM_TEST_KEEP").is_some();
        if keep {
            eprintln!("[cluster {}] keeping {}", self.tag, self.dir.display());
            // The namespaces are gone: a sweep must not look at this directory again.
            let _ = fs::remove_file(self.dir.join("owner"));
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn poll_until(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `ip ARGS`; an error carries its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let c = run_captured(Command::new(IP).args(args), Duration::from_secs(30))?;
    if !c.status.success() {
        bail!("`{}` failed: {}", c.what, c.stderr.trim());
    }
    Ok(())
}

/// `ip netns pids NS`.
fn ns_pids(ns: &str) -> Result<Vec<u32>> {
    let c = run_captured(
        Command::new(IP).args(["netns", "pids", ns]),
        Duration::from_secs(30),
    )?;
    if !c.status.success() {
        bail!("`{}` failed: {}", c.what, c.stderr.trim());
    }
    Ok(c.stdout
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs every process in `ns` but `keep`, again until none is left (a dying parent may have
/// forked), within `limit`. Returns the PIDs killed.
fn kill_all_in(ns: &str, keep: Option<u32>, limit: Duration) -> Result<Vec<u32>> {
    let mut killed = Vec::new();
    poll_until(&format!("no process is left in {ns}"), limit, || {
        let left: Vec<u32> = ns_pids(ns)?
            .into_iter()
            .filter(|p| Some(*p) != keep)
            .collect();
        for &pid in &left {
            let _ = send_signal(pid, libc::SIGKILL);
            if !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        Ok(left.is_empty())
    })?;
    Ok(killed)
}

/// Removes the namespaces of clusters whose owner process has died without cleaning up (a test
/// binary killed by a timeout, say). Best effort: errors are printed, not returned.
fn sweep_abandoned() {
    let Ok(c) = run_captured(
        Command::new(IP).args(["netns", "list"]),
        Duration::from_secs(30),
    ) else {
        return;
    };
    for line in c.stdout.lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some((tag, _)) = ns.strip_prefix(PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        if tag.len() != 6 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let dir = std::env::temp_dir().join(format!("{PREFIX}{tag}-cluster"));
        let Some(owner) = fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue; // not ours, or being made right now
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        eprintln!("[cluster] removing {ns}, left behind by process {owner}");
        if let Err(e) = kill_all_in(ns, None, Duration::from_secs(10)) {
            eprintln!("[cluster] {e}");
        }
        if let Err(e) = ip(&["netns", "del", ns]) {
            eprintln!("[cluster] {e}");
        }
        let none_left = run_captured(
            Command::new(IP).args(["netns", "list"]),
            Duration::from_secs(30),
        )
        .is_ok_and(|c| !c.stdout.contains(&format!("{PREFIX}{tag}-")));
        if none_left {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}
