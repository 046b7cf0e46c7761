#!/usr/bin/env python3
"""Failover time and switchover downtime of a snapshim cluster, on one machine (as root).

The same test bed as testapps/tests/cluster.rs: three network namespaces on a bridge (in a
namespace of its own), a three-member etcd cluster (one member per node, heartbeat 100 ms,
election timeout 500 ms) and a `snapshim node run` agent per node. The program is
testapps/c/ticker.c in `stamp` mode: a line every 10 ms ending in the wall-clock time it was
printed, flushed, while it rewrites part of its memory.

failover    TTL 2 s, ticker of 64 MiB: SIGKILL of the leader node (agent and program), then
            the time until the output holds a line printed after the kill (the program runs
            again on a standby), and until the new leader's `activated` event. Goal: TTL + 1 s.
switchover  ticker of --switch-mib MiB (1024) rewriting 1% of its memory per checkpoint
            interval (1 s; incremental images): `snapshim service switchover --to STANDBY`, and
            the largest gap between two consecutive output lines around it (the program's own
            period, 10 ms, included). Goal: 100 ms.
Medians of --runs (5) of each.

Usage: sudo scripts/bench_failover.py [--runs 5] [--switch-mib 1024] [--only failover|switchover]
"""
import argparse, json, os, random, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
TOOL = os.path.join(REL, "snapshim")
PERIOD_MS = 10
TTL_S = 2


def build():
    subprocess.run(["cargo", "build", "--release", "--workspace", "-q"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    exe = os.path.join(ROOT, "target", "bench", "ticker")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "testapps", "c", "ticker.c")],
                   check=True)
    return exe


def run(argv, check=True, timeout=60, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def wait(what, cond, limit=120.0, every=0.005):
    deadline = time.monotonic() + limit
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(every)


class Bed:
    """Namespaces sn<tag>-0..2 and sn<tag>-br, etcd and agents; close() removes everything."""

    def __init__(self, n=3):
        self.n = n
        self.tag = "%06x" % random.getrandbits(24)
        self.net = (random.randint(200, 250), random.randint(0, 255))
        self.dir = tempfile.mkdtemp(prefix=f"sn{self.tag}-bench-")
        self.etcd = {}
        self.procs = []
        br = self.ns("br")
        run(["ip", "netns", "add", br])
        run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i in range(n):
            ns = self.ns(i)
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                 "netns", ns])
            run(["ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.key = os.path.join(self.dir, "key")
        self.hook = os.path.join(self.dir, "hook")

    def ns(self, i):
        return f"sn{self.tag}-{i}"

    def addr(self, i):
        return f"10.{self.net[0]}.{self.net[1]}.{i + 1}"

    def endpoints(self):
        return ",".join(f"http://{self.addr(i)}:2379" for i in range(self.n))

    def spawn(self, i, argv, log):
        f = open(os.path.join(self.dir, log), "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i)] + argv, stdin=subprocess.DEVNULL,
                             stdout=f, stderr=f)
        self.procs.append(p)
        return p

    def start_etcd(self):
        peers = ",".join(f"n{i}=http://{self.addr(i)}:2380" for i in range(self.n))
        for i in range(self.n):
            a = self.addr(i)
            self.etcd[i] = self.spawn(i, [
                "etcd", f"--name=n{i}", f"--data-dir={self.dir}/etcd{i}",
                f"--listen-client-urls=http://{a}:2379", f"--advertise-client-urls=http://{a}:2379",
                f"--listen-peer-urls=http://{a}:2380",
                f"--initial-advertise-peer-urls=http://{a}:2380", f"--initial-cluster={peers}",
                f"--initial-cluster-token=sn{self.tag}", "--initial-cluster-state=new",
                "--heartbeat-interval=100", "--election-timeout=500"], f"etcd{i}.log")
        wait("etcd is healthy", lambda: all(self.etcdctl(i, ["endpoint", "health"]).returncode == 0
                                            for i in range(self.n)), every=0.2)

    def etcdctl(self, i, args):
        return run(["ip", "netns", "exec", self.ns(i), "etcdctl",
                    f"--endpoints={self.endpoints()}", "--dial-timeout=1s",
                    "--command-timeout=2s"] + args, check=False)

    def get_json(self, key):
        r = self.etcdctl(0, ["get", "--print-value-only", key])
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    def tool(self, args, timeout=180):
        env = dict(os.environ, SNAPSHIM_ETCD=self.endpoints())
        return run(["ip", "netns", "exec", self.ns(0), TOOL] + args, timeout=timeout, env=env)

    def start_agents(self):
        self.tool(["node", "keygen", self.key])
        with open(self.hook, "w") as f:
            f.write(f'#!/bin/sh\necho "$(date +%s%3N) $*" >> {self.dir}/hook.log\n')
        os.chmod(self.hook, 0o755)
        for i in range(self.n):
            self.start_agent(i)

    def start_agent(self, i):
        store = os.path.join(self.dir, f"node{i}")
        os.makedirs(store, exist_ok=True)
        self.spawn(i, [TOOL, "node", "run", "--etcd", self.endpoints(), "--name", f"node{i}",
                       "--listen", f"{self.addr(i)}:7070", "--store", store, "--key", self.key,
                       "--hook", self.hook, "--json-log"], f"agent{i}.log")

    def pids(self, i):
        return [int(p) for p in run(["ip", "netns", "pids", self.ns(i)]).stdout.split()]

    def kill_node(self, i, keep_etcd=True):
        keep = self.etcd[i].pid if keep_etcd and i in self.etcd else None

        def gone():
            left = [p for p in self.pids(i) if p != keep]
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not left
        wait(f"node{i} is dead", gone, every=0.01)
        for p in self.procs:
            p.poll()

    def leader(self, svc):
        d = self.get_json(f"/snapshim/services/{svc}/leader")
        return (int(d["node"][4:]), d["generation"]) if d else None

    def standby_image(self, svc, i):
        d = self.get_json(f"/snapshim/services/{svc}/standbys/node{i}")
        return d.get("image") if d else None

    def events(self, i):
        out = []
        try:
            with open(os.path.join(self.dir, f"agent{i}.log")) as f:
                for line in f:
                    if line.startswith("{"):
                        try:
                            d = json.loads(line)
                        except ValueError:
                            continue
                        if "event" in d:
                            out.append(d)
        except OSError:
            pass
        return out

    def close(self):
        for i in range(self.n):
            try:
                self.kill_node(i, keep_etcd=False)
            except Exception as e:  # best effort: go on removing the rest
                print(f"cleanup node{i}: {e}", file=sys.stderr)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in [self.ns(i) for i in range(self.n)] + [self.ns("br")]:
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def stamps(path):
    """(stamp ms) of every complete line of the ticker's output, in file order."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:
        parts = line.split()
        if len(parts) == 4 and parts[0] == b"tick":
            out.append(int(parts[3]))
    return out


def ready(bed, svc, out):
    """Waits for a leader whose program prints, and a standby holding an image of its
    generation; returns (leader, generation, standby)."""
    def check():
        lead = bed.leader(svc)
        if not lead or len(stamps(out)) < 20:
            return None
        for j in range(bed.n):
            img = bed.standby_image(svc, j) if j != lead[0] else None
            if img and img.get("generation") == lead[1]:
                return (lead[0], lead[1], j)
        return None
    return wait(f"{svc} runs with a standby up to date", check, limit=300, every=0.1)


def bench_failover(bed, ticker, runs):
    svc, out = "fo", os.path.join(bed.dir, "fo.out")
    bed.tool(["service", "add", svc, "--ttl", f"{TTL_S}s", "--interval", "1s", "--standbys", "2",
              "--output", out, "--", ticker, "1000000000", str(PERIOD_MS), "64", "1", "stamp"])
    resumed, activated = [], []
    for r in range(runs):
        lead, gen, _ = ready(bed, svc, out)
        t0 = time.time() * 1000
        bed.kill_node(lead)
        # Lines the dead program printed while the kill was on its way are not the new one's.
        last_old = max(stamps(out)[-1:] + [t0])
        t1 = wait("the program prints again", lambda: next(
            (s for s in stamps(out) if s > last_old), None), every=0.005)
        resumed.append((t1 - t0) / 1000)
        new, _ = wait("a new leader", lambda: (lambda x: x if x and x[0] != lead else None)(
            bed.leader(svc)), every=0.05)
        acts = wait("the new leader logs `activated`", lambda: [
            e["time_ms"] for e in bed.events(new) if e["event"] == "activated"
            and e["time_ms"] > t0], every=0.05)
        activated.append((min(acts) - t0) / 1000)
        print(f"  failover {r + 1}: node{lead} killed at generation {gen}; node{new} printed "
              f"after {resumed[-1]:.3f} s, activated after {activated[-1]:.3f} s", flush=True)
        bed.start_agent(lead)
    bed.tool(["service", "remove", svc])
    return resumed, activated


def bench_switchover(bed, ticker, runs, mib):
    svc, out = "so", os.path.join(bed.dir, "so.out")
    # 1% of the memory per 1 s checkpoint interval = 0.01% per 10 ms line.
    pct = str(1.0 * PERIOD_MS / 1000)
    bed.tool(["service", "add", svc, "--ttl", f"{TTL_S}s", "--interval", "1s", "--standbys", "1",
              "--incremental", "on", "--output", out, "--", ticker, "1000000000",
              str(PERIOD_MS), str(mib), pct, "stamp"])
    gaps, totals = [], []
    for r in range(runs):
        lead, gen, target = ready(bed, svc, out)
        t0 = time.time() * 1000
        bed.tool(["service", "switchover", svc, "--to", f"node{target}"])
        t1 = time.time() * 1000
        wait("the program prints on the target",
             lambda: sum(1 for s in stamps(out) if s > t1) >= 5, every=0.01)
        st = stamps(out)
        window = [s for s in st if s >= t0 - 200]
        gap = max((b - a for a, b in zip(window, window[1:])), default=float("nan"))
        gaps.append(gap)
        totals.append((t1 - t0) / 1000)
        print(f"  switchover {r + 1}: node{lead} -> node{target} (generation {gen}): output gap "
              f"{gap:.0f} ms, command took {totals[-1]:.2f} s", flush=True)
    bed.tool(["service", "remove", svc])
    return gaps, totals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--switch-mib", type=int, default=1024)
    ap.add_argument("--only", choices=["failover", "switchover"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_failover.py: needs root (network namespaces)")
    for prog in ["ip", "etcd", "etcdctl"]:
        if not shutil.which(prog):
            sys.exit(f"bench_failover.py: {prog} is missing (apt-get install iproute2 "
                     "etcd-server etcd-client)")
    ticker = build()
    bed = Bed()
    rows = []
    try:
        bed.start_etcd()
        bed.start_agents()
        if args.only in (None, "failover"):
            resumed, activated = bench_failover(bed, ticker, args.runs)
            rows.append(("failover: kill -9 -> output again (TTL 2 s)",
                         f"{statistics.median(resumed):.2f} s", f"<= {TTL_S + 1} s"))
            rows.append(("failover: kill -9 -> `activated` event",
                         f"{statistics.median(activated):.2f} s", f"<= {TTL_S + 1} s"))
        if args.only in (None, "switchover"):
            gaps, totals = bench_switchover(bed, ticker, args.runs, args.switch_mib)
            rows.append((f"switchover downtime, {args.switch_mib} MiB, 1%/interval",
                         f"{statistics.median(gaps):.0f} ms", "<= 100 ms"))
            rows.append(("switchover command, request to done",
                         f"{statistics.median(totals):.2f} s", ""))
    finally:
        bed.close()
    print(f"\n| figure (median of {args.runs}) | measured | goal |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
