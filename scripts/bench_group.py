#!/usr/bin/env python3
"""A consistency group's pause against one process's pause, with each engine, in one run.

N copies of scripts/bench_loop.c of M MiB each (dense: every page written at start, each
iteration reads 64 pages and writes 4) run in one group (SNAPSHIM_GROUP); `snapshim checkpoint
--group` takes them at one instant. Against it, one bench_loop of N x M MiB takes a plain
`snapshim checkpoint`. Printed per engine (medians over --runs):
  group_ms   the group's pause: the earliest member's pause start to the latest member's
             resume, as the members report them (the set's group_pause_us)
  worst_ms   the longest single member pause in the group
  single_ms  the pause of the one process of N x M MiB (its shim's own timing)
  ratio      group_ms / single_ms (issue 15's goal: at most 2)
  group_s    `snapshim checkpoint --group` from start to the set committed
  single_s   `snapshim checkpoint` of the one process, start to commit

Usage: scripts/bench_group.py [--members 8] [--mib 128] [--engines stop,fork,uffd] [--runs 3]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
SNAPSHIM = os.path.join(REL, "snapshim")


def build():
    subprocess.run(["cargo", "build", "--release", "--workspace", "-q"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    exe = os.path.join(ROOT, "target", "bench", "bench_loop")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "bench_loop.c")], check=True)
    return exe


def start(exe, mib, work, name, engine, group=None):
    env = dict(os.environ, LD_PRELOAD=os.path.join(REL, "libsnapshim.so"),
               SNAPSHIM_DIR=os.path.join(work, "img"), SNAPSHIM_NAME=name, SNAPSHIM_COW=engine)
    if group:
        env["SNAPSHIM_GROUP"] = group
    app = subprocess.Popen([exe, str(mib), "dense", os.path.join(work, name + ".timeline")],
                           env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    if app.stderr.readline().strip() != b"READY":
        raise RuntimeError("bench_loop did not start")
    return app


def stop_all(apps):
    for a in apps:
        if a.poll() is None:
            a.kill()
        a.wait()


def group_run(exe, members, mib, engine, work):
    group = f"bench-{os.getpid()}-{engine}"
    apps = []
    try:
        for i in range(members):
            apps.append(start(exe, mib, work, f"m{i}", engine, group))
        time.sleep(1.0)
        t0 = time.monotonic()
        out = subprocess.run([SNAPSHIM, "checkpoint", "--group", group, "--dir", work, "--json"],
                             capture_output=True, text=True, timeout=900)
        took = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        doc = json.loads(out.stdout)
        worst = max(m["pause_us"] for m in doc["members"])
        return doc["group_pause_us"] / 1000, worst / 1000, took
    finally:
        stop_all(apps)


def single_run(exe, mib, engine, work):
    app = start(exe, mib, work, "one", engine)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        out = subprocess.run([SNAPSHIM, "checkpoint", "--json", str(app.pid)],
                             capture_output=True, text=True, timeout=900)
        took = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        doc = json.loads(out.stdout)
        if doc.get("engine") != engine:
            raise RuntimeError(f"SNAPSHIM_COW={engine} but engine {doc.get('engine')}")
        return doc["pause_us"] / 1000, took
    finally:
        stop_all([app])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--engines", default="stop,fork,uffd")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    exe = build()
    print(f"{a.members} members x {a.mib} MiB in one group against one process of "
          f"{a.members * a.mib} MiB; medians of {a.runs} runs")
    print(f"{'engine':8} {'group_ms':>9} {'worst_ms':>9} {'single_ms':>10} {'ratio':>6} "
          f"{'group_s':>8} {'single_s':>9}")
    for engine in a.engines.split(","):
        g, w, gs, s, ss = [], [], [], [], []
        for _ in range(a.runs):
            work = tempfile.mkdtemp(prefix="snapshim-bench-group-")
            try:
                pause, worst, took = group_run(exe, a.members, a.mib, engine, work)
                g.append(pause), w.append(worst), gs.append(took)
                pause, took = single_run(exe, a.members * a.mib, engine, work)
                s.append(pause), ss.append(took)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        med = statistics.median
        print(f"{engine:8} {med(g):9.1f} {med(w):9.1f} {med(s):10.1f} {med(g) / med(s):6.2f} "
              f"{med(gs):8.2f} {med(ss):9.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
