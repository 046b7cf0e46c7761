//! The cluster test bed (testapps/src/cluster.rs): three network namespaces on a bridge with a
//! three-member etcd cluster, links cut and restored, nodes killed, everything removed at the end.

use std::process::Stdio;
use std::time::Duration;

use snapshim_testapps::cluster::{Cluster, ETCD, ETCDCTL, IP};
use snapshim_testapps::{bail, needs, Result};

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
