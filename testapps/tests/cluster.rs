//! Failover as a cluster on one machine (issue 16, point 7): three nodes, each a network
//! namespace on a bridge with a member of a three-member etcd cluster (testapps/src/cluster.rs),
//! a snapshim node agent in each (testapps/src/nodes.rs), and a service running the `ticker`
//! app with its output in a file. Nodes are killed (SIGKILL: agent and program), cut off,
//! switched over; at the end the output must be byte-identical to an uninterrupted run, and
//! the program must never have run in two nodes at once.
//!
//! The first two tests check the test bed itself and need no agent.
//! `SNAPSHIM_CLUSTER_TRIALS` (default 3) sets the number of random kill/partition trials.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use snapshim_testapps::cluster::{poll_until, Cluster, ETCD, ETCDCTL, IP};
use snapshim_testapps::nodes::{
    agent_available, now_ms, ticker, ticker_reference, wait_for_lines, Monitor, Nodes, TICKER,
};
use snapshim_testapps::rng::{base_seed, hash_str, Rng};
use snapshim_testapps::{bail, diff_summary, needs, Failure, Result};

/// Root, ip, etcd and etcdctl; false when the test is skipped.
fn cluster_needs() -> Result<bool> {
    Ok(
        needs::root("network namespaces and a bridge for the test cluster")?
            && needs::program(IP, "iproute2")?
            && needs::program(ETCD, "etcd-server")?
            && needs::program(ETCDCTL, "etcd-client")?,
    )
}

/// The namespaces whose names contain `tag`.
fn namespaces_of(tag: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new(IP)
        .args(["netns", "list"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(tag))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect())
}

/// `etcdctl put KEY VALUE` through member `i`; whether it succeeded.
fn put(c: &Cluster, i: usize, key: &str, value: &str) -> Result<bool> {
    Ok(c.etcdctl(i, &["put", key, value])?.status.success())
}

/// The value of `key` read through member `i` (a quorum read).
fn get(c: &Cluster, i: usize, key: &str) -> Result<String> {
    let r = c.etcdctl(i, &["get", "--print-value-only", key])?;
    if !r.status.success() {
        bail!("{}", r.report());
    }
    Ok(r.stdout.trim().to_string())
}

#[test]
fn etcd_keeps_quorum_with_two_members_and_a_cut_member_has_none() -> Result<()> {
    if !cluster_needs()? {
        return Ok(());
    }
    let c = Cluster::with_etcd(3)?;
    let tag = c.tag().to_string();
    assert_eq!(namespaces_of(&tag)?.len(), 4, "three nodes and the bridge");

    // Three members, each reachable from every node over the bridge.
    let members = c.etcdctl(0, &["member", "list"])?;
    assert!(members.status.success(), "{}", members.report());
    assert_eq!(members.stdout.lines().count(), 3, "{}", members.stdout);
    for i in 0..3 {
        assert!(
            members.stdout.contains(&c.etcd_url(i)),
            "{}",
            members.stdout
        );
    }
    assert!(put(&c, 0, "/t/a", "one")?);
    for i in 0..3 {
        assert_eq!(get(&c, i, "/t/a")?, "one", "read through member {i}");
    }

    // One member lost: the other two still make a quorum.
    c.stop_etcd(2)?;
    assert!(!c.etcd_healthy(2));
    assert!(put(&c, 1, "/t/a", "two")?);
    assert_eq!(get(&c, 0, "/t/a")?, "two");
    c.start_etcd(2)?;
    c.wait_until("member 2 is back with what was written without it", || {
        Ok(c.etcd_healthy(2) && get(&c, 2, "/t/a").is_ok_and(|v| v == "two"))
    })?;

    // Node 1 cut off: its member answers nothing that needs a quorum and it reaches no one;
    // the two others go on.
    c.cut_link(1)?;
    assert!(
        !put(&c, 1, "/t/a", "cut")?,
        "a write through the cut member"
    );
    let across = c.etcdctl_at(1, &c.etcd_url(0), &["endpoint", "health"])?;
    assert!(
        !across.status.success(),
        "node 1 reached member 0 while cut"
    );
    assert!(!c.etcd_healthy(1));
    c.wait_until("members 0 and 2 have a quorum without 1", || {
        put(&c, 0, "/t/a", "three")
    })?;
    assert_eq!(get(&c, 2, "/t/a")?, "three");
    c.restore_link(1)?;
    c.wait_until("member 1 catches up once its link is back", || {
        Ok(c.etcd_healthy(1) && get(&c, 1, "/t/a").is_ok_and(|v| v == "three"))
    })?;

    // kill_node kills what runs in the node, and only there, but not its etcd member.
    let mut sleeper = c.command(0, "/bin/sleep")?;
    sleeper.arg("1000").stdout(Stdio::null());
    let pid = c.exec(0, &mut sleeper)?;
    let mut other = c.command(1, "/bin/sleep")?;
    other.arg("1000");
    let other_pid = c.exec(1, &mut other)?;
    assert!(c.pids(0)?.contains(&pid));
    let killed = c.kill_node(0)?;
    assert_eq!(killed, vec![pid]);
    assert_eq!(c.pids(0)?, vec![c.etcd_pid(0).expect("etcd 0 runs")]);
    assert!(c.pids(1)?.contains(&other_pid));
    assert!(c.etcd_healthy(0));

    drop(c);
    assert_eq!(namespaces_of(&tag)?, Vec::<String>::new());
    assert!(
        !std::path::Path::new(&format!("/proc/{other_pid}")).exists(),
        "a process started in node 1 outlived the cluster"
    );
    Ok(())
}

#[test]
fn a_panicking_test_leaves_no_namespace_and_no_process() -> Result<()> {
    if !cluster_needs()? {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let c = Cluster::new(2).expect("cluster");
        let mut cmd = c.command(1, "/bin/sleep").expect("command");
        cmd.arg("1000");
        let pid = c.exec(1, &mut cmd).expect("sleep");
        tx.send((c.tag().to_string(), pid)).expect("send");
        panic!("on purpose, with the cluster up");
    });
    assert!(t.join().is_err(), "the thread panicked");
    let (tag, pid) = rx.recv_timeout(Duration::from_secs(60)).expect("tag");
    assert_eq!(namespaces_of(&tag)?, Vec::<String>::new());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    // Kept for a look at what failed, but no longer marked as owning namespaces.
    let dir = std::env::temp_dir().join(format!("sn{tag}-cluster"));
    assert!(dir.is_dir() && !dir.join("owner").exists());
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The agent tests run one at a time: each runs three agents, three etcd members and a
/// program on a machine of two cores.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The lease TTL of the services under test.
const TTL: &str = "2s";
/// The ticker prints a line every PERIOD_MS.
const PERIOD_MS: u64 = 25;

/// A service of the ticker app on three nodes, watched by a [`Monitor`].
struct Case {
    monitor: Option<Monitor>,
    nodes: Nodes,
    service: String,
    out: PathBuf,
    lines: u64,
}

/// Runs `body` on a service `service` of `ticker LINES PERIOD_MS` added with `options`, then
/// waits for the program's end and checks its output and that it never ran twice at once. Any
/// failure carries the agents' logs. Skipped (said on stderr) when the machine cannot run it.
fn with_service(
    service: &str,
    lines: u64,
    options: &[&str],
    body: impl FnOnce(&Case) -> Result<()>,
) -> Result<()> {
    if !cluster_needs()? || !agent_available()? {
        return Ok(());
    }
    let _serial = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let nodes = Nodes::start(3)?;
    let out = nodes.cluster.dir().join("out.txt");
    let (ticker, out_arg) = (ticker(), out.to_string_lossy().into_owned());
    let (lines_arg, period_arg) = (lines.to_string(), PERIOD_MS.to_string());
    let mut args = vec![
        "service",
        "add",
        service,
        "--interval",
        "300ms",
        "--ttl",
        TTL,
        "--output",
        &out_arg,
    ];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--", ticker.to_str().unwrap_or_default(), &lines_arg]);
    args.push(&period_arg);
    nodes.tool_ok(&args)?;
    let monitor = Monitor::start(&nodes.cluster, TICKER)?;
    let case = Case {
        monitor: Some(monitor),
        nodes,
        service: service.to_string(),
        out,
        lines,
    };
    if let Err(e) = body(&case) {
        let mut case = case;
        let seen = match case.monitor.take().expect("started").finish() {
            Ok(samples) => {
                format!("the monitor saw the program in one node at most ({samples} samples)")
            }
            Err(e) => e.to_string(),
        };
        return Err(case.with_logs(Failure::new(format!("{e}\n{seen}"))));
    }
    case.finish()
}

impl Case {
    /// Waits for a leader running the program, a standby holding an image, and some output.
    fn running_with_a_standby(&self) -> Result<usize> {
        let l = self.nodes.wait_for_leader(&self.service, None)?;
        self.nodes
            .cluster
            .wait_until("a standby holds an image", || {
                for j in (0..3).filter(|&j| j != l) {
                    if self.nodes.is_standby_with_image(&self.service, j)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            })?;
        wait_for_lines(&self.out, 40)?;
        Ok(l)
    }

    fn with_logs(&self, e: Failure) -> Failure {
        Failure::new(format!("{e}\n{}", self.nodes.logs()))
    }

    /// Waits for the program to end (PASS printed, running nowhere), then compares its output
    /// with an uninterrupted run, and checks that it never ran in two nodes at once.
    fn finish(mut self) -> Result<()> {
        let r = self.check_end();
        r.map_err(|e| self.with_logs(e))
    }

    fn check_end(&mut self) -> Result<()> {
        let limit = Duration::from_millis(self.lines * PERIOD_MS) + Duration::from_secs(120);
        let out = self.out.clone();
        poll_until("the program printed PASS and ended", limit, || {
            let text = std::fs::read(&out).unwrap_or_default();
            Ok(
                (text.ends_with(b"PASS\n") || text.windows(5).any(|w| w == b"FAIL:"))
                    && self.nodes.running_in(TICKER)?.is_empty(),
            )
        })?;
        let samples = self.monitor.take().expect("started").finish()?;
        self.nodes.assert_never_two_by_the_logs()?;
        let expected = ticker_reference(self.lines)?;
        let actual = std::fs::read(&self.out)?;
        if actual != expected {
            bail!(
                "the service's output differs from an uninterrupted run: {}",
                diff_summary(&expected, &actual)
            );
        }
        eprintln!(
            "[{}] output byte-identical ({} bytes); never two at once in {samples} samples",
            self.service,
            actual.len()
        );
        Ok(())
    }
}

#[test]
fn the_leader_node_killed_the_program_resumes_on_a_standby() -> Result<()> {
    with_service("killed", 600, &["--standbys", "2"], |case| {
        let l = case.running_with_a_standby()?;
        let (_, generation) = case.nodes.leader(&case.service)?.expect("a leader");
        case.nodes.kill_node(l)?;
        let m = case.nodes.wait_for_leader(&case.service, Some(l))?;
        let (_, next) = case.nodes.leader(&case.service)?.expect("a leader");
        if next <= generation {
            bail!("generation {generation}, then {next} after the failover");
        }
        eprintln!("[killed] node{l} killed, node{m} leads, generation {next}");
        // The hook ran for the takeover and the activation, with the new generation.
        let hook_log = case.nodes.hook_log();
        for event in ["failover", "activated"] {
            let line = format!(" {event} killed node{m} {next}");
            case.nodes.cluster.wait_until(
                &format!("the hook recorded `{}`", line.trim()),
                || {
                    let text = std::fs::read_to_string(&hook_log).unwrap_or_default();
                    Ok(text
                        .lines()
                        .any(|l| l.ends_with(&line) || l.contains(&format!("{line} "))))
                },
            )?;
        }
        Ok(())
    })
}

#[test]
fn a_cut_off_leader_fences_itself_and_rejoins_as_a_standby() -> Result<()> {
    with_service("cut", 600, &["--standbys", "2"], |case| {
        let l = case.running_with_a_standby()?;
        case.nodes.cut_link(l)?;
        let m = case.nodes.wait_for_leader(&case.service, Some(l))?;
        // That the cut leader's program was gone before the new one ran is the monitor's to
        // see (it samples every node's processes). The cut leader must also say it fenced
        // itself; its agent logs that when its main loop gets to it, which may be after the
        // new leader's activation (the kill comes from its lease thread, on time).
        let (old, new) = (case.nodes.name(l), case.nodes.name(m));
        let (mut fenced, mut activated) = (None, None);
        case.nodes.cluster.wait_until(
            "the old leader logged `fenced`, the new one `activated`",
            || {
                let events = case.nodes.events()?;
                fenced = events
                    .iter()
                    .find(|e| e.node == old && e.event == "fenced")
                    .map(|e| e.time_ms);
                activated = events
                    .iter()
                    .rev()
                    .find(|e| e.node == new && e.event == "activated")
                    .map(|e| e.time_ms);
                Ok(fenced.is_some() && activated.is_some())
            },
        )?;
        if let (Some(f), Some(a)) = (fenced, activated) {
            if f > a {
                eprintln!(
                    "[cut] note: {old} logged `fenced` {} ms after {new} logged `activated`",
                    f - a
                );
            }
        }
        case.nodes.cluster.restore_link(l)?;
        // Back as a standby holding an image, while the program runs on the leader (m, or
        // another node if leadership moved on meanwhile), and only there.
        let svc = case.service.as_str();
        case.nodes.cluster.wait_until(
            "the old leader is back as a standby with an image",
            || {
                let Some((now, _)) = case.nodes.leader(svc)? else {
                    return Ok(false);
                };
                Ok(now != l
                    && case.nodes.is_standby_with_image(svc, l)?
                    && case.nodes.running_in(TICKER)? == vec![now])
            },
        )?;
        Ok(())
    })
}

#[test]
fn switchover_and_failback() -> Result<()> {
    with_service("moved", 800, &["--standbys", "2"], |case| {
        let (nodes, svc) = (&case.nodes, case.service.as_str());
        let l = case.running_with_a_standby()?;
        let status = nodes.tool_ok(&["service", "status", svc, "--json"])?;
        let doc: serde_json::Value = serde_json::from_str(&status.stdout)
            .map_err(|e| Failure::new(format!("status --json: {e}: {}", status.stdout)))?;
        if !doc.to_string().contains(&nodes.name(l)) {
            bail!("status does not name the leader node{l}: {doc}");
        }
        let mut target = None;
        for j in (0..3).filter(|&j| j != l) {
            if target.is_none() && nodes.is_standby_with_image(svc, j)? {
                target = Some(j);
            }
        }
        let target = target.expect("running_with_a_standby saw one");
        let to = nodes.name(target);
        nodes.tool_ok(&["service", "switchover", svc, "--to", &to])?;
        let m = nodes.wait_for_leader(svc, Some(l))?;
        if m != target {
            bail!("switched over to {to}, but node{m} leads");
        }
        nodes
            .cluster
            .wait_until("the old leader is a standby with an image", || {
                nodes.is_standby_with_image(svc, l)
            })?;
        let back = nodes.name(l);
        nodes.tool_ok(&["service", "switchover", svc, "--to", &back])?;
        let again = nodes.wait_for_leader(svc, Some(m))?;
        if again != l {
            bail!("failed back to {back}, but node{again} leads");
        }
        if !nodes.events()?.iter().any(|e| e.event == "switchover") {
            bail!("no switchover event was logged");
        }
        Ok(())
    })
}

#[test]
fn one_etcd_member_lost_the_leader_keeps_leading() -> Result<()> {
    with_service("member", 600, &["--standbys", "2"], |case| {
        let (nodes, svc) = (&case.nodes, case.service.as_str());
        let l = case.running_with_a_standby()?;
        let before = nodes.leader(svc)?;
        // The leader's own member: its agent must renew through the two others.
        nodes.cluster.stop_etcd(l)?;
        let since = now_ms();
        let lines = std::fs::read(&case.out)?
            .iter()
            .filter(|&&c| c == b'\n')
            .count();
        // Three TTLs of the program's output: the lease was renewed meanwhile, or it fenced.
        wait_for_lines(&case.out, lines + (3 * 2000 / PERIOD_MS) as usize)?;
        let after = nodes.leader(svc)?;
        if after != before || nodes.running_in(TICKER)? != vec![l] {
            bail!(
                "with node{l}'s etcd member lost: leader {before:?} became {after:?}, the \
                 program runs in {:?}",
                nodes.running_in(TICKER)?
            );
        }
        let events = nodes.events()?;
        if let Some(e) = events
            .iter()
            .find(|e| e.time_ms >= since && matches!(e.event.as_str(), "fenced" | "failover"))
        {
            bail!("{e:?} with one etcd member lost");
        }
        nodes.cluster.start_etcd(l)
    })
}

#[test]
fn random_kills_and_partitions_never_run_two_and_lose_no_acknowledged_image() -> Result<()> {
    let trials: u64 = std::env::var("SNAPSHIM_CLUSTER_TRIALS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(3);
    // About 10 s of output per trial, and some to spare.
    let lines = (trials * 10_000 + 10_000) / PERIOD_MS;
    let options = ["--mode", "sync", "--standbys", "1"];
    with_service("trials", lines, &options, |case| {
        let seed = base_seed() ^ hash_str("trials");
        eprintln!(
            "[trials] {trials} trials, seed {seed} (SNAPSHIM_TEST_SEED={} repeats them)",
            base_seed()
        );
        let mut rng = Rng::new(seed);
        for t in 0..trials {
            trial(case, t, &mut rng)?;
        }
        Ok(())
    })
}

/// One fault of the current leader (SIGKILL or link cut), the takeover, the old leader back.
fn trial(case: &Case, t: u64, rng: &mut Rng) -> Result<()> {
    let (nodes, svc) = (&case.nodes, case.service.as_str());
    let l = nodes.wait_for_leader(svc, None)?;
    let (_, generation) = nodes.leader(svc)?.expect("a leader");
    nodes
        .cluster
        .wait_until("an image of this generation is acknowledged", || {
            Ok(nodes.committed(svc)?.is_some_and(|(g, _)| g >= generation))
        })?;
    let cut = rng.next_u64() % 2 == 1;
    if cut {
        nodes.cut_link(l)?;
    } else {
        nodes.kill_node(l)?;
    }
    // Nobody can commit now until a new leader runs: this is the last acknowledged image.
    let committed = nodes.committed(svc)?.expect("acknowledged before");
    let m = nodes.wait_for_leader(svc, Some(l)).map_err(|e| {
        let standbys: Vec<String> = (0..3)
            .filter(|&j| j != l)
            .map(|j| format!("node{j}: {:?}", nodes.standby(svc, j).ok().flatten()))
            .collect();
        Failure::new(format!(
            "trial {t}: {e}\nlast acknowledged (generation, image) {committed:?}; standbys: {}",
            standbys.join("; ")
        ))
    })?;
    let origin = nodes.origin_of_running(svc, m)?;
    eprintln!(
        "[trials] trial {t}: node{l} {} at generation {generation}; node{m} resumed from \
         {origin:?} (generation, image), last acknowledged {committed:?}",
        if cut { "cut off" } else { "killed" }
    );
    match origin {
        Some(o) if o >= committed => {}
        _ => bail!(
            "trial {t}: node{m} resumed from {origin:?}, older than the acknowledged {committed:?}"
        ),
    }
    if cut {
        nodes.cluster.restore_link(l)?;
    } else {
        nodes.start_agent(l)?;
    }
    nodes
        .cluster
        .wait_until("the old leader is back as a standby", || {
            Ok(nodes.standby(svc, l)?.is_some())
        })
}
