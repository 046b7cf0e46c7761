//! The cluster on one machine, over loopback: a single-member etcd started by the test, two
//! node agents (`snapshim node run`) with stores of their own, a service running the `single`
//! app with its output in a file.
//!
//! - the leader's agent and program are killed with SIGKILL: the program resumes on the
//!   standby from the last replicated image and its output file ends byte-identical to an
//!   uninterrupted run's; an image of the dead leader's generation pushed to the new leader
//!   is refused;
//! - in sync mode, an image is committed once the standby holds it; switchover to the standby
//!   and back (failback): the output is byte-identical again;
//! - etcd stops answering (SIGSTOP): the leader kills its program (fencing) and says so; once
//!   etcd is back a node leads again and the output is byte-identical.
//!
//! Every wait polls `snapshim service status --json` (or the agent's log) for a condition, with
//! a generous deadline; nothing sleeps in place of synchronisation. Needs
//! `cargo build --release --workspace` first and `/usr/bin/etcd` (Debian's etcd-server).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapshim_testapps::process::{children_of, run_captured, send_signal, timeout, Stream};
use snapshim_testapps::{artifacts, bail, diff_summary, needs, AppSpec, Result};

const ETCD: &str = "/usr/bin/etcd";
/// Rounds of `single`: long enough (several seconds) for a failover or two switchovers to
/// land in the middle of its run.
const ROUNDS: &str = "400";

/// A free TCP port on loopback (bound, then released for the child that uses it).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child killed (with its descendants) when dropped.
struct Owned {
    child: Child,
    log: Option<Stream>,
    what: String,
}

impl Owned {
    fn kill_all(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        self.log.as_ref().map(|s| s.text()).unwrap_or_default()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// SIGKILLs `pid` and everything below it.
fn kill_tree(pid: u32) {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children_of(all[i]);
        all.extend(kids);
        i += 1;
    }
    for p in all {
        let _ = send_signal(p, libc::SIGKILL);
    }
}

/// etcd, the agents and the files of one test.
struct Cluster {
    dir: PathBuf,
    etcd_url: String,
    key: PathBuf,
    etcd: Option<Owned>,
    agents: Vec<(String, String, Owned)>,
}

impl Cluster {
    /// Starts a single-member etcd in a fresh directory and waits until it answers.
    fn start(test: &str) -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("snapshim-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (client, peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new(ETCD)
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "t", "--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = child.stderr.take().map(Stream::spawn);
        let cluster = Cluster {
            key: dir.join("key"),
            dir,
            etcd_url,
            etcd: Some(Owned {
                child,
                log,
                what: "etcd".into(),
            }),
            agents: Vec::new(),
        };
        cluster.until("etcd answers", |c| {
            Ok(c.snapshim(&["service", "list"])?
                .status
                .success()
                .then_some(()))
        })?;
        let keygen = cluster.snapshim(&["node", "keygen", &cluster.key.to_string_lossy()])?;
        if !keygen.status.success() {
            bail!("snapshim node keygen failed\n{}", keygen.report());
        }
        Ok(cluster)
    }

    /// Runs `snapshim ARGS --etcd URL`.
    fn snapshim(&self, args: &[&str]) -> Result<snapshim_testapps::Captured> {
        let mut cmd = Command::new(&artifacts()?.tool);
        cmd.args(args).env("SNAPSHIM_ETCD", &self.etcd_url);
        run_captured(&mut cmd, timeout())
    }

    /// Starts the agent of node `name`.
    fn agent(&mut self, name: &str) -> Result<()> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut child = Command::new(&artifacts()?.tool)
            .args(["node", "run", "--etcd", &self.etcd_url, "--name", name])
            .args(["--listen", &addr])
            .arg("--store")
            .arg(self.dir.join(format!("store-{name}")))
            .arg("--key")
            .arg(&self.key)
            // The shim's notes go to the program's stderr, which is the output file: with the
            // engine chosen, a restored program has nothing to say there.
            .env("SNAPSHIM_COW", "fork")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = child.stderr.take().map(Stream::spawn);
        let owned = Owned {
            child,
            log,
            what: format!("agent {name}"),
        };
        self.agents.push((name.to_string(), addr, owned));
        Ok(())
    }

    fn store(&self, node: &str, service: &str) -> PathBuf {
        self.dir.join(format!("store-{node}")).join(service)
    }

    fn address(&self, node: &str) -> String {
        self.agents
            .iter()
            .find(|(n, _, _)| n == node)
            .map(|(_, a, _)| a.clone())
            .unwrap_or_default()
    }

    /// SIGKILLs node `name`'s agent and everything it started (the program among them).
    fn kill_node(&mut self, name: &str) {
        if let Some((_, _, a)) = self.agents.iter_mut().find(|(n, _, _)| n == name) {
            a.kill_all();
        }
    }

    /// `snapshim service status NAME --json`.
    fn status(&self, service: &str) -> Result<Value> {
        let c = self.snapshim(&["service", "status", service, "--json"])?;
        if !c.status.success() {
            bail!("service status failed\n{}", c.report());
        }
        serde_json::from_str(&c.stdout)
            .map_err(|e| snapshim_testapps::Failure::new(format!("status JSON: {e}")))
    }

    /// Polls `check` until it returns a value; fails with the logs after the test's timeout.
    fn until<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&Cluster) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout();
        let mut last = String::new();
        while Instant::now() < deadline {
            match check(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "waited {:?} for {what} in vain ({last})\n{}",
            timeout(),
            self.logs()
        )
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for o in self
            .etcd
            .iter()
            .chain(self.agents.iter().map(|(_, _, a)| a))
        {
            if o.what != "etcd" {
                s += &format!("--- {} ---\n{}", o.what, o.log());
            }
        }
        s
    }

    /// The status once `pred` holds for it.
    fn status_until(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        self.until(what, |c| Ok(c.status("single").ok().filter(|v| pred(v))))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Skips (or fails under CI) without etcd.
fn have_etcd() -> Result<bool> {
    needs::program(ETCD, "etcd-server")
}

fn single() -> Result<PathBuf> {
    Ok(AppSpec::named("single")?.program)
}

/// The output of an uninterrupted run of `single ROUNDS`, stdout and stderr into one file as
/// the agents do it.
fn uninterrupted(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join("reference.out");
    let file = File::create(&path)?;
    let status = Command::new(single()?)
        .arg(ROUNDS)
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()?;
    if !status.success() {
        bail!("the uninterrupted run of single failed: {status}");
    }
    Ok(std::fs::read(&path)?)
}

/// A cluster named after `test` whose service (in `mode`) node a leads, with a warm standby on
/// node b. Returns the cluster, the output file and the status that showed the standby warm.
fn a_leads_b_waits(test: &str, mode: &str) -> Result<(Cluster, PathBuf, Value)> {
    let mut c = Cluster::start(test)?;
    let out = add_service(&c, mode)?;
    c.agent("a")?;
    c.until("node a to lead", |c| {
        Ok(c.status("single")
            .ok()
            .filter(|v| leader(v).is_some_and(|l| l.0 == "a")))
    })?;
    c.agent("b")?;
    let warm = c.status_until("a warm standby on b", |v| warm_standby(v, "b"))?;
    Ok((c, out, warm))
}

/// Defines the service `single` with node a preferred and its output in the cluster's
/// directory; returns the output file.
fn add_service(c: &Cluster, mode: &str) -> Result<PathBuf> {
    let out = c.dir.join("single.out");
    let prog = single()?;
    let added = c.snapshim(&[
        "service",
        "add",
        "single",
        "--interval",
        "1s",
        "--ttl",
        "2s",
        "--prefer",
        "a",
        "--mode",
        mode,
        "--output",
        &out.to_string_lossy(),
        "--",
        &prog.to_string_lossy(),
        ROUNDS,
    ])?;
    if !added.status.success() {
        bail!("service add failed\n{}", added.report());
    }
    Ok(out)
}

fn leader(v: &Value) -> Option<(&str, u64)> {
    let l = &v["leader"];
    Some((l["node"].as_str()?, l["generation"].as_u64()?))
}

/// The standby `node` is warm and holds an image of the leader's current generation.
fn warm_standby(v: &Value, node: &str) -> bool {
    let Some((_, generation)) = leader(v) else {
        return false;
    };
    v["standbys"].as_array().into_iter().flatten().any(|s| {
        s["node"] == node
            && s["state"] == "warm"
            && s["image"]["generation"].as_u64() == Some(generation)
    })
}

fn finished(v: &Value) -> bool {
    !v["finished"].is_null()
}

/// The service's output must equal the uninterrupted run's, byte for byte.
fn expect_same_output(c: &Cluster, out: &Path) -> Result<()> {
    let expected = uninterrupted(&c.dir)?;
    let got = std::fs::read(out)?;
    if got != expected {
        bail!(
            "the service's output differs from an uninterrupted run: {}\n{}",
            diff_summary(&expected, &got),
            c.logs()
        );
    }
    if !got.ends_with(b"PASS\n") {
        bail!("the output does not end with PASS");
    }
    Ok(())
}

#[test]
fn failover_resumes_on_the_standby_and_refuses_the_old_generation() -> Result<()> {
    if !have_etcd()? {
        return Ok(());
    }
    let (mut c, out, before) = a_leads_b_waits("failover", "async")?;
    let (_, old_generation) = leader(&before).unwrap_or_default();

    c.kill_node("a");
    let killed = Instant::now();
    c.until("b to run the program", |c| {
        Ok(c.agent_log("b")
            .contains(": activated single")
            .then_some(()))
    })?;
    // A figure for the reader (within the 100 ms of a poll), not a bound.
    eprintln!(
        "failover: program running on b {} ms after the kill (TTL 2 s)",
        killed.elapsed().as_millis()
    );
    let after = c.status_until("b to take over", |v| {
        leader(v).is_some_and(|(n, g)| n == "b" && g > old_generation)
    })?;
    eprintln!("failover: {}", after["leader"]);
    // The dead leader's newest image, under a name the new leader does not hold, is offered
    // to it: its receiver must refuse the older generation.
    let stale = c.dir.join("stale").join("single");
    std::fs::create_dir_all(&stale)?;
    let newest = snapshim_image::list_images(&c.store("a", "single"))
        .ok()
        .and_then(|v| v.last().cloned());
    let Some(newest) = newest else {
        bail!("node a holds no image\n{}", c.logs());
    };
    std::fs::copy(&newest, stale.join("ckpt-00000900.snap"))?;
    let refused = c.snapshim(&[
        "replicate",
        "push",
        "--to",
        &c.address("b"),
        "--key",
        &c.key.to_string_lossy(),
        "--service",
        "single",
        &stale.to_string_lossy(),
    ])?;
    if refused.status.success() || !refused.stderr.contains("generation") {
        bail!(
            "an image of the dead leader's generation {old_generation} was not refused by the \
             new leader\n{}",
            refused.report()
        );
    }
    if c.store("b", "single").join("ckpt-00000900.snap").exists() {
        bail!("the refused image is in node b's store");
    }
    c.status_until("the program to finish", finished)?;
    expect_same_output(&c, &out)
}

#[test]
fn switchover_and_failback_keep_the_output() -> Result<()> {
    if !have_etcd()? {
        return Ok(());
    }
    let (c, out, _) = a_leads_b_waits("switchover", "sync")?;
    // Sync mode: an image counts as committed once b holds it.
    c.status_until("an image committed", |v| !v["committed"].is_null())?;
    for (to, from) in [("b", "a"), ("a", "b")] {
        let moved = c.snapshim(&["service", "switchover", "single", "--to", to])?;
        if !moved.status.success() {
            bail!(
                "switchover to {to} failed\n{}\n{}",
                moved.report(),
                c.logs()
            );
        }
        eprintln!("{}", moved.stdout.trim());
        c.status_until(&format!("{to} to lead"), |v| {
            leader(v).is_some_and(|l| l.0 == to)
        })?;
        if to == "b" {
            c.status_until(&format!("a warm standby on {from}"), |v| {
                warm_standby(v, from)
            })?;
        }
    }
    if !c.logs().contains("failback single") {
        bail!(
            "the move back to the preferred node was not logged as a failback\n{}",
            c.logs()
        );
    }
    c.status_until("the program to finish", finished)?;
    expect_same_output(&c, &out)
}

#[test]
fn a_leader_cut_off_from_etcd_fences_itself_and_the_service_recovers() -> Result<()> {
    if !have_etcd()? {
        return Ok(());
    }
    let (c, out, _) = a_leads_b_waits("fencing", "async")?;
    let program: u32 = c.until("node a's program", |c| Ok(activated_pid(&c.agent_log("a"))))?;

    // etcd stops answering: node a cannot renew its lease and must kill its program before
    // the TTL is over; nobody can take the key meanwhile.
    let etcd = c.etcd.as_ref().map(|e| e.child.id()).unwrap_or_default();
    send_signal(etcd, libc::SIGSTOP)?;
    let fenced = c.until("node a to fence itself", |c| {
        Ok(c.agent_log("a").contains("fenced single").then_some(()))
    });
    let gone = snapshim_testapps::process::wait_for_exit_of(program, Instant::now());
    send_signal(etcd, libc::SIGCONT)?;
    fenced?;
    if !gone? {
        bail!(
            "node a logged its fence but its program (PID {program}) still runs\n{}",
            c.logs()
        );
    }
    c.status_until("a leader again", |v| leader(v).is_some_and(|(_, g)| g > 1))?;
    c.status_until("the program to finish", finished)?;
    expect_same_output(&c, &out)
}

/// The PID in the agent's first `activated` line.
fn activated_pid(log: &str) -> Option<u32> {
    let line = log.lines().find(|l| l.contains(": activated single"))?;
    line.rsplit("PID ").next()?.trim().parse().ok()
}

impl Cluster {
    fn agent_log(&self, node: &str) -> String {
        self.agents
            .iter()
            .find(|(n, _, _)| n == node)
            .map(|(_, _, a)| a.log())
            .unwrap_or_default()
    }
}
