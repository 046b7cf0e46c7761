//! snapshim node agents on a [`Cluster`], for the failover tests: one agent per node
//! (`snapshim node run`), a service of the `ticker` app, and the evidence the tests check.
//!
//! ```text
//!  cluster dir/                 (one file system for every node: paths are valid everywhere)
//!    key                        the replication key (`snapshim node keygen`)
//!    hook                       the hook script: appends `UNIX_MS EVENT SERVICE NODE GEN DETAIL`
//!    hook.log                     to hook.log, one line per event
//!    agentN.log                 node N's agent, stderr (`--json-log`: one JSON object a line)
//!    nodeN/                     node N's image store (`--store`)
//!    out.txt                    the service's program's output (`--output`)
//! ```
//!
//! Two kinds of evidence that two instances never ran at once:
//! - a [`Monitor`] thread samples every node's processes every few milliseconds and records
//!   each moment at which a live (not zombie, not exiting) process of the program ran in two
//!   nodes (a warm standby is `snapshim-restore` until activated, then it becomes the program:
//!   its command name is the program's);
//! - [`Nodes::active_intervals`]: per node, from its agent's `activated` event to the first of
//!   `fenced`, `switchover`, `failback` or `leader-lost` from it, or the test's kill or cut of
//!   the node; no two may overlap. (After a cut, the node's program runs on until its agent
//!   fences it, which the intervals cannot see: there the monitor is the evidence.)

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::artifacts::{artifacts, c_app};
use crate::cluster::Cluster;
use crate::process::{run_captured, Captured};
use crate::{bail, needs, Context, Failure, Result};

/// Port of every agent's image receiver, on its node's address.
pub const AGENT_PORT: u16 = 7070;
/// The program the tests run as a service.
pub const TICKER: &str = "ticker";

/// Wall-clock now in Unix milliseconds (the clock the agents' logs use).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether the `snapshim` tool has the node agent (`snapshim node run`): [`needs::check`].
pub fn agent_available() -> Result<bool> {
    let tool = &artifacts()?.tool;
    let has = Command::new(tool)
        .args(["node", "run", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    needs::check(
        "`snapshim node run` (the node agent) in the snapshim tool",
        has,
    )
}

/// The `ticker` app (testapps/c/ticker.c).
pub fn ticker() -> PathBuf {
    c_app(TICKER)
}

/// What `ticker LINES PERIOD` prints when nothing interrupts it (it does not depend on the
/// period, so this runs with none).
pub fn ticker_reference(lines: u64) -> Result<Vec<u8>> {
    let out = Command::new(ticker())
        .args([lines.to_string(), "0".into()])
        .output()
        .context("run ticker for its reference output")?;
    if !out.status.success() {
        bail!("ticker {lines} 0 failed: {}", out.status);
    }
    Ok(out.stdout)
}

/// One event an agent logged.
#[derive(Debug, Clone)]
pub struct Event {
    pub time_ms: u64,
    pub node: String,
    pub event: String,
    pub generation: u64,
    pub detail: String,
}

/// Agents on a cluster.
pub struct Nodes {
    pub cluster: Cluster,
    /// When the test killed or cut a node: (node index, Unix ms).
    faults: Mutex<Vec<(usize, u64)>>,
    agents: Mutex<Vec<Option<u32>>>,
}

impl Nodes {
    /// A cluster of `n` nodes with etcd, a key and a hook, and an agent in every node.
    pub fn start(n: usize) -> Result<Nodes> {
        let cluster = Cluster::with_etcd(n)?;
        let nodes = Nodes {
            cluster,
            faults: Mutex::new(Vec::new()),
            agents: Mutex::new(vec![None; n]),
        };
        let key = nodes.key();
        let c = nodes.tool(0, &["node", "keygen", &key.to_string_lossy()])?;
        if !c.status.success() {
            bail!("{}", c.report());
        }
        let hook = nodes.cluster.dir().join("hook");
        fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$(date +%s%3N) $*\" >> {}\n",
                nodes.hook_log().display()
            ),
        )
        .context("write the hook script")?;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).context("chmod the hook")?;
        for i in 0..n {
            nodes.start_agent(i)?;
        }
        Ok(nodes)
    }

    /// Node `i`'s name.
    pub fn name(&self, i: usize) -> String {
        format!("node{i}")
    }

    /// The index of the node called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        (0..self.cluster.nodes()).find(|&i| self.name(i) == name)
    }

    /// Node `i`'s image store.
    pub fn store(&self, i: usize) -> PathBuf {
        self.cluster.dir().join(format!("node{i}"))
    }

    fn key(&self) -> PathBuf {
        self.cluster.dir().join("key")
    }

    /// The hook's records, `UNIX_MS EVENT SERVICE NODE GENERATION [DETAIL]` per line.
    pub fn hook_log(&self) -> PathBuf {
        self.cluster.dir().join("hook.log")
    }

    fn agent_log(&self, i: usize) -> PathBuf {
        self.cluster.dir().join(format!("agent{i}.log"))
    }

    /// Starts node `i`'s agent (again, after [`Nodes::kill_node`]).
    pub fn start_agent(&self, i: usize) -> Result<()> {
        let store = self.store(i);
        fs::create_dir_all(&store).context(format!("create {}", store.display()))?;
        let log_path = self.agent_log(i);
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .context(format!("open {}", log_path.display()))?;
        let mut cmd = self.cluster.command(i, &artifacts()?.tool)?;
        cmd.args(["node", "run", "--etcd", &self.cluster.etcd_endpoints()])
            .args(["--name", &self.name(i)])
            .arg("--listen")
            .arg(format!("{}:{AGENT_PORT}", self.cluster.addr(i)))
            .arg("--store")
            .arg(&store)
            .arg("--key")
            .arg(self.key())
            .arg("--hook")
            .arg(self.cluster.dir().join("hook"))
            .arg("--json-log")
            .stdout(log.try_clone().context("dup the agent log")?)
            .stderr(log);
        let pid = self.cluster.exec(i, &mut cmd)?;
        self.agents.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(pid);
        Ok(())
    }

    /// The nodes whose link is up and whose etcd member runs, to run commands from.
    fn reachable_nodes(&self) -> Vec<usize> {
        (0..self.cluster.nodes())
            .filter(|&i| self.cluster.link_is_up(i) && self.cluster.etcd_pid(i).is_some())
            .collect()
    }

    fn reachable_node(&self) -> usize {
        self.reachable_nodes().first().copied().unwrap_or(0)
    }

    /// `snapshim ARGS` in node `i`, with `SNAPSHIM_ETCD` set to every member.
    pub fn tool(&self, i: usize, args: &[&str]) -> Result<Captured> {
        let mut cmd = self.cluster.command(i, &artifacts()?.tool)?;
        cmd.env("SNAPSHIM_ETCD", self.cluster.etcd_endpoints())
            .args(args);
        run_captured(&mut cmd, Duration::from_secs(60))
    }

    /// `snapshim ARGS` from a reachable node; must succeed.
    pub fn tool_ok(&self, args: &[&str]) -> Result<Captured> {
        let c = self.tool(self.reachable_node(), args)?;
        if !c.status.success() {
            bail!("{}", c.report());
        }
        Ok(c)
    }

    /// The value of an etcd key (`None`: no such key), read (a quorum read) through each
    /// reachable member in turn until one answers: a member that just came back may not answer
    /// yet.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        let mut failures = String::new();
        for i in self.reachable_nodes() {
            let c = self
                .cluster
                .etcdctl(i, &["get", "--print-value-only", key])?;
            if c.status.success() {
                let v = c.stdout.trim_end_matches('\n');
                return Ok((!v.is_empty()).then(|| v.to_string()));
            }
            failures += &c.report();
            failures.push('\n');
        }
        bail!("no etcd member answered a read of {key}:\n{failures}")
    }

    /// A JSON document stored in etcd.
    pub fn etcd_json(&self, key: &str) -> Result<Option<serde_json::Value>> {
        match self.etcd_get(key)? {
            Some(v) => Ok(Some(
                serde_json::from_str(&v).context(format!("{key} holds {v:?}"))?,
            )),
            None => Ok(None),
        }
    }

    /// The service's leader: (node index, generation), from its key in etcd.
    pub fn leader(&self, service: &str) -> Result<Option<(usize, u64)>> {
        let key = format!("/snapshim/services/{service}/leader");
        let Some(doc) = self.etcd_json(&key)? else {
            return Ok(None);
        };
        let node = doc["node"].as_str().unwrap_or_default();
        let Some(i) = self.index(node) else {
            bail!("{key} names an unknown node: {doc}");
        };
        Ok(Some((i, doc["generation"].as_u64().unwrap_or(0))))
    }

    /// What the standby node `i` published for `service` (`None`: nothing).
    pub fn standby(&self, service: &str, i: usize) -> Result<Option<serde_json::Value>> {
        self.etcd_json(&format!(
            "/snapshim/services/{service}/standbys/{}",
            self.name(i)
        ))
    }

    /// Whether node `i` published itself as a standby of `service` holding an image.
    pub fn is_standby_with_image(&self, service: &str, i: usize) -> Result<bool> {
        Ok(self
            .standby(service, i)?
            .is_some_and(|d| !d["image"].is_null()))
    }

    /// The indexes of the nodes where the program (`comm` = `program`) runs now.
    pub fn running_in(&self, program: &str) -> Result<Vec<usize>> {
        let inodes = self.cluster.ns_inodes()?;
        Ok(program_nodes(program, &inodes))
    }

    /// Polls until the service's leader is a node other than `not` (any node: `None`), its
    /// program runs there and nowhere else. Returns that node.
    pub fn wait_for_leader(&self, service: &str, not: Option<usize>) -> Result<usize> {
        let mut found = None;
        let what = match not {
            Some(n) => format!("{service} runs on a node other than node{n}"),
            None => format!("{service} runs on a leader"),
        };
        self.cluster.wait_until(&what, || {
            let Some((l, _)) = self.leader(service)? else {
                return Ok(false);
            };
            if Some(l) == not {
                return Ok(false);
            }
            found = Some(l);
            Ok(self.running_in(TICKER)? == vec![l])
        })?;
        Ok(found.expect("set when the wait ends"))
    }

    /// SIGKILLs node `i`'s agent and everything it started (not its etcd member); recorded as a
    /// fault.
    pub fn kill_node(&self, i: usize) -> Result<()> {
        self.fault(i);
        self.cluster.kill_node(i)?;
        self.agents.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
        Ok(())
    }

    /// Cuts node `i`'s link; recorded as a fault.
    pub fn cut_link(&self, i: usize) -> Result<()> {
        self.fault(i);
        self.cluster.cut_link(i)
    }

    fn fault(&self, i: usize) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((i, now_ms()));
    }

    /// Every event the agents logged (`--json-log` lines), in time order.
    pub fn events(&self) -> Result<Vec<Event>> {
        let mut all = Vec::new();
        for i in 0..self.cluster.nodes() {
            let text = fs::read_to_string(self.agent_log(i)).unwrap_or_default();
            for line in text.lines().filter(|l| l.starts_with('{')) {
                let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let Some(event) = doc["event"].as_str() else {
                    continue;
                };
                all.push(Event {
                    time_ms: doc["time_ms"].as_u64().unwrap_or(0),
                    node: doc["node"].as_str().unwrap_or_default().to_string(),
                    event: event.to_string(),
                    generation: doc["generation"].as_u64().unwrap_or(0),
                    detail: doc["detail"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        all.sort_by_key(|e| e.time_ms);
        Ok(all)
    }

    /// The agents' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for i in 0..self.cluster.nodes() {
            let text = fs::read_to_string(self.agent_log(i)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s += &format!("--- agent{i}.log (last {} lines) ---\n", tail.len());
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s += &format!(
            "--- hook.log ---\n{}",
            fs::read_to_string(self.hook_log()).unwrap_or_default()
        );
        s
    }

    /// Per node, the intervals during which it ran the program by its agent's events: from
    /// `activated` to the first of `fenced`, `switchover`, `failback`, `leader-lost` from the
    /// same node or a fault the test caused there (open: `u64::MAX`).
    pub fn active_intervals(&self) -> Result<Vec<(usize, u64, u64)>> {
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut marks: Vec<(u64, usize, bool)> = Vec::new(); // (time, node, starts)
        for e in self.events()? {
            let Some(i) = self.index(&e.node) else {
                continue;
            };
            match e.event.as_str() {
                "activated" => marks.push((e.time_ms, i, true)),
                "fenced" | "switchover" | "failback" | "leader-lost" => {
                    marks.push((e.time_ms, i, false))
                }
                _ => {}
            }
        }
        marks.extend(faults.iter().map(|&(i, t)| (t, i, false)));
        marks.sort();
        let mut open: Vec<Option<u64>> = vec![None; self.cluster.nodes()];
        let mut out = Vec::new();
        for (t, i, starts) in marks {
            match (starts, open[i]) {
                (true, None) => open[i] = Some(t),
                (false, Some(s)) => {
                    out.push((i, s, t));
                    open[i] = None;
                }
                _ => {}
            }
        }
        for (i, s) in open.iter().enumerate() {
            if let Some(s) = s {
                out.push((i, *s, u64::MAX));
            }
        }
        Ok(out)
    }

    /// Fails if two nodes' [`Nodes::active_intervals`] overlap.
    pub fn assert_never_two_by_the_logs(&self) -> Result<()> {
        let iv = self.active_intervals()?;
        for (a, x) in iv.iter().enumerate() {
            for y in &iv[a + 1..] {
                if x.0 != y.0 && x.1 < y.2 && y.1 < x.2 {
                    bail!(
                        "node{} ran the program from {} to {} and node{} from {} to {} (Unix ms, \
                         by the agents' events)\n{}",
                        x.0,
                        x.1,
                        x.2,
                        y.0,
                        y.1,
                        y.2,
                        self.logs()
                    );
                }
            }
        }
        Ok(())
    }

    /// The image the program running in node `i` was restored from: (generation, image number)
    /// from its image directory's lock record (`None`: an original run, or no record).
    pub fn origin_of_running(&self, service: &str, i: usize) -> Result<Option<(u64, u64)>> {
        let lock = self
            .store(i)
            .join(service)
            .join(snapshim_image::lineage::LOCK_FILE);
        let text = fs::read_to_string(&lock).context(format!("read {}", lock.display()))?;
        let Some(record) = snapshim_image::lineage::Record::parse(&text) else {
            bail!("{} holds no lock record", lock.display());
        };
        Ok(record
            .lineage
            .origin
            .map(|o| (u64::from(o.generation), image_number(&o.file))))
    }

    /// The image acknowledged in sync mode: (generation, image number) (`None`: none yet).
    pub fn committed(&self, service: &str) -> Result<Option<(u64, u64)>> {
        Ok(self
            .etcd_json(&format!("/snapshim/services/{service}/committed"))?
            .map(|d| {
                (
                    d["generation"].as_u64().unwrap_or(0),
                    d["seq"].as_u64().unwrap_or(0),
                )
            }))
    }
}

/// N of `.../ckpt-N.snap` (0 when the name is not one).
pub fn image_number(file: &str) -> u64 {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("ckpt-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The nodes (by index in `inodes`, the inode numbers of their network namespaces) in which a
/// live process whose command name is `program` runs.
fn program_nodes(program: &str, inodes: &[u64]) -> Vec<usize> {
    let mut nodes = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return nodes;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let base = Path::new("/proc").join(pid);
        let Ok(stat) = fs::read_to_string(base.join("stat")) else {
            continue;
        };
        // comm is between the first '(' and the last ')'; the state follows.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
        if &stat[open + 1..close] != program || matches!(state, 'Z' | 'X' | 'x') {
            continue;
        }
        let Ok(meta) = fs::metadata(base.join("ns/net")) else {
            continue;
        };
        if let Some(i) = inodes.iter().position(|&ino| ino == meta.ino()) {
            if !nodes.contains(&i) {
                nodes.push(i);
            }
        }
    }
    nodes.sort();
    nodes
}

/// A moment (Unix ms) the program ran in more than one node, and those nodes.
type Sighting = (u64, Vec<usize>);

/// A thread that samples where the program runs every few milliseconds and keeps every moment
/// it ran in two nodes at once.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Sighting>>>,
    samples: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    /// Starts sampling the nodes of `cluster` for `program`.
    pub fn start(cluster: &Cluster, program: &str) -> Result<Monitor> {
        let inodes = cluster.ns_inodes()?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0u64));
        let (s, v, n, p) = (
            Arc::clone(&stop),
            Arc::clone(&seen),
            Arc::clone(&samples),
            program.to_string(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let at = program_nodes(&p, &inodes);
                if at.len() > 1 {
                    v.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((now_ms(), at));
                }
                *n.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Ok(Monitor {
            stop,
            seen,
            samples,
            thread: Some(thread),
        })
    }

    /// Stops sampling; fails if the program was ever seen in two nodes at once.
    pub fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let samples = *self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, at)) = seen.first() {
            return Err(Failure::new(format!(
                "the program ran in nodes {at:?} at once at {t} (Unix ms; {} such samples of \
                 {samples})",
                seen.len()
            )));
        }
        Ok(samples)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls until `path` holds at least `lines` lines, within the test timeout.
pub fn wait_for_lines(path: &Path, lines: usize) -> Result<()> {
    let deadline = Instant::now() + crate::process::timeout();
    loop {
        let n = fs::read(path)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0);
        if n >= lines {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} has {n} lines, not {lines}, after the deadline",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
