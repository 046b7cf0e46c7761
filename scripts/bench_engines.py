#!/usr/bin/env python3
"""Copy-on-write engines against a stop-the-world baseline, measured in one run.

For each size and kind of program (scripts/bench_loop.c) and each engine, the program runs under
the shim, a checkpoint is taken with `snapshim checkpoint`, and the program reports its own
timeline. Printed per configuration (medians over --runs):
  pause     the program's own gap between two loop iterations at the snapshot (the gap that
            overlaps the pause as the shim timed it, from its statistics)
  shim_ms   the pause as the shim timed it (quiesce to release)
  max_gap   its largest gap anywhere during the checkpoint: on this shared 2-vCPU VM, gaps
            during the flush track the hypervisor's steal time (also printed), not the engine
  speed     the program's iterations per second while the image is written, as a fraction of
            its speed in the second before the checkpoint (stop: the program is not running)
  ckpt      signal to image committed (as `snapshim checkpoint` measures it)
  lead      signal to the start of the pause: the uffd engine write-protects memory and fills
            in its copy store meanwhile, the program running
  lspeed    the program's speed during the lead, as a fraction of the second before
  image     image file size
  rss       the program's VmRSS (/proc/PID/status) right before the signal and right after the
            commit, MiB: what the checkpoint left behind (the uffd engine's copy store, kept
            with SNAPSHIM_KEEP_STORE=1)
and the ratio of the stop engine's pause to each engine's.

With --checkpoints N each run takes N checkpoints 1 s apart and measures the last: the steady
state of periodic checkpoints (`uffd+keep` keeps the uffd engine's copy store between them;
`uffd` maps and fills in a new one for each).

Usage: scripts/bench_engines.py [--sizes 256,1024,4096] [--kinds dense,sparse,write,read] [--runs 3]
                                [--checkpoints 1] [--engines stop,fork,fork+thp,uffd,uffd+keep,...]
"""
import argparse, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
ENGINES = [("stop", {"SNAPSHIM_COW": "stop"}), ("fork", {"SNAPSHIM_COW": "fork"}),
           ("fork+thp", {"SNAPSHIM_COW": "fork", "SNAPSHIM_HUGEPAGES": "1"}),
           ("uffd", {"SNAPSHIM_COW": "uffd"}),
           ("uffd+keep", {"SNAPSHIM_COW": "uffd", "SNAPSHIM_KEEP_STORE": "1"}),
           ("uffd+thp", {"SNAPSHIM_COW": "uffd", "SNAPSHIM_HUGEPAGES": "1"}),
           ("uffd+thp+keep", {"SNAPSHIM_COW": "uffd", "SNAPSHIM_HUGEPAGES": "1",
                              "SNAPSHIM_KEEP_STORE": "1"})]


def build():
    subprocess.run(["cargo", "build", "--release", "--workspace", "-q"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    exe = os.path.join(ROOT, "target", "bench", "bench_loop")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "bench_loop.c")], check=True)
    return exe


def one_run(exe, mib, kind, env_extra, work, checkpoints=1):
    img = os.path.join(work, "img")
    shutil.rmtree(img, ignore_errors=True)
    timeline = os.path.join(work, "timeline")
    env = dict(os.environ, LD_PRELOAD=os.path.join(REL, "libsnapshim.so"), SNAPSHIM_DIR=img,
               SNAPSHIM_NAME="b", **env_extra)
    app = subprocess.Popen([exe, str(mib), kind, timeline], env=env, stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL)
    try:
        if app.stderr.readline().strip() != b"READY":
            raise RuntimeError("bench_loop did not start")
        time.sleep(1.0)
        # Earlier checkpoints of the same program (--checkpoints): the measured one is the last.
        for _ in range(checkpoints - 1):
            out = subprocess.run([os.path.join(REL, "snapshim"), "checkpoint", str(app.pid)],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(out.stderr.strip())
            time.sleep(1.0)
        steal0 = steal_jiffies()
        rss_before = vm_rss(app.pid)
        t_trigger = time.monotonic_ns()
        out = subprocess.run([os.path.join(REL, "snapshim"), "checkpoint", str(app.pid)],
                             capture_output=True, text=True, timeout=600)
        t_done = time.monotonic_ns()
        rss_after = vm_rss(app.pid)
        steal = steal_jiffies() - steal0
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        path = out.stdout.splitlines()[0].split(": ", 1)[1]
        shim_pause = float(re.search(r"pause ([0-9.]+) ms", out.stdout).group(1)) * 1e6
        want = env_extra["SNAPSHIM_COW"]
        if f"engine {want}" not in out.stdout:
            raise RuntimeError(f"SNAPSHIM_COW={want} but: {out.stdout.strip()}")
        flush = re.search(r"flush ([0-9.]+) (ms|s)", out.stdout)
        flush_s = float(flush.group(1)) / (1000 if flush.group(2) == "ms" else 1) if flush else None
        size = os.path.getsize(path)
        time.sleep(0.3)
        app.send_signal(signal.SIGUSR1)
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    start, bucket_ns, buckets, gaps = 0, 1, [], []
    with open(timeline) as f:
        for line in f:
            w = line.split()
            if w[0] == "start":
                start, bucket_ns = int(w[1]), int(w[3])
            elif w[0] == "b":
                buckets.append(int(w[1]))
            else:
                gaps.append((int(w[1]), int(w[2])))
    inside = [(at, g) for at, g in gaps if t_trigger <= at + g and at <= t_done]
    max_gap = max((g for _, g in inside), default=0)
    # The snapshot's own gap: one that overlaps the pause as the shim timed it (CLOCK_MONOTONIC,
    # in its statistics; the uffd engine write-protects memory before it, so it comes a while
    # after the trigger).
    with open(os.path.splitext(path)[0] + ".json") as f:
        stats = f.read()
    paused_at = int(re.search(r'"pause_started_monotonic_ns": ([0-9]+)', stats).group(1))
    kept = re.search(r'"copy_store_kept_bytes": ([0-9]+)', stats)
    at_snapshot = [(at, g) for at, g in inside if at <= paused_at + shim_pause and at + g >= paused_at]
    pause = max((g for _, g in at_snapshot), default=0)

    def rate(t0, t1):
        b0, b1 = max(0, (t0 - start) // bucket_ns), min(len(buckets), (t1 - start) // bucket_ns)
        return sum(buckets[b0:b1]) / max(1e-9, (b1 - b0) * bucket_ns / 1e9) if b1 > b0 else None

    before = rate(t_trigger - 1_000_000_000, t_trigger)
    # Before the pause (the uffd engine protects memory and fills in its copy store meanwhile).
    lead = rate(t_trigger, paused_at) if paused_at - t_trigger > 3 * bucket_ns else None
    # The flush: from the end of the pause to the commit.
    release = max((at + g for at, g in at_snapshot if g == pause), default=t_trigger)
    during = rate(release + bucket_ns, t_done) if t_done - release > 3 * bucket_ns else None
    # The stop engine writes the image inside the pause: there is no flush to run during.
    speed = during / before if during is not None and before and want_running(env_extra) else None
    return dict(pause_ms=pause / 1e6, shim_pause_ms=shim_pause / 1e6, max_gap_ms=max_gap / 1e6, speed=speed,
                ckpt_ms=(t_done - t_trigger) / 1e6, image=size, steal_ms=steal * 1000 / HZ,
                lead_ms=(paused_at - t_trigger) / 1e6,
                lead_speed=lead / before if lead is not None and before else None,
                rss_before=rss_before, rss_after=rss_after,
                kept=int(kept.group(1)) if kept else None,
                write_gibs=size / 2**30 / flush_s if flush_s else None)


def want_running(env_extra):
    return env_extra.get("SNAPSHIM_COW") != "stop"


HZ = os.sysconf("SC_CLK_TCK")


def vm_rss(pid):
    """VmRSS of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def steal_jiffies():
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--kinds", default="dense,sparse,write,read")
    ap.add_argument("--engines", default=",".join(e for e, _ in ENGINES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--checkpoints", type=int, default=1,
                    help="checkpoints per run, 1 s apart; the last is measured (steady state of "
                         "periodic checkpoints: the uffd engine keeps its copy store between them)")
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "bench"),
                    help="where images are written (e.g. /dev/shm to take the disk out of the flush rate)")
    a = ap.parse_args()
    exe = build()
    os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench.", dir=a.dir)
    engines = [e for e in ENGINES if e[0] in a.engines.split(",")]
    print(f"{'size':>6} {'kind':>6} {'engine':>13} {'pause_ms':>9} {'shim_ms':>8} {'stop/this':>9} {'max_gap':>8} "
          f"{'steal_ms':>8} {'speed':>6} {'ckpt_ms':>8} {'lead_ms':>8} {'lspeed':>6} {'image_MiB':>9} {'GiB/s':>6} "
          f"{'rss_MiB':>11} {'kept_MiB':>8}", flush=True)
    try:
        for mib in map(int, a.sizes.split(",")):
            for kind in a.kinds.split(","):
                # Round by round, each engine in turn: load that comes and goes on a shared
                # machine then weighs on every engine alike.
                runs = {name: [] for name, _ in engines}
                for _ in range(a.runs):
                    for name, env in engines:
                        runs[name].append(one_run(exe, mib, kind, env, work, a.checkpoints))
                res = {name: {k: med([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()}
                base = res.get("stop", {}).get("pause_ms")
                for name, r in res.items():
                    ratio = f"{base / r['pause_ms']:.0f}x" if base and r["pause_ms"] else "-"
                    speed = f"{100 * r['speed']:.0f}%" if r["speed"] is not None else "-"
                    gibs = f"{r['write_gibs']:.2f}" if r["write_gibs"] and name != "stop" else "-"
                    lspeed = f"{100 * r['lead_speed']:.0f}%" if r["lead_speed"] is not None else "-"
                    rss = (f"{r['rss_before'] / 2**20:.0f}>{r['rss_after'] / 2**20:.0f}"
                           if r["rss_before"] is not None and r["rss_after"] is not None else "-")
                    kept = f"{r['kept'] / 2**20:.0f}" if r["kept"] is not None else "-"
                    print(f"{mib:>6} {kind:>6} {name:>13} {r['pause_ms']:>9.2f} {r['shim_pause_ms']:>8.2f} {ratio:>9} "
                          f"{r['max_gap_ms']:>8.1f} {r['steal_ms']:>8.0f} {speed:>6} {r['ckpt_ms']:>8.0f} "
                          f"{r['lead_ms']:>8.0f} {lspeed:>6} {r['image'] / 2**20:>9.0f} {gibs:>6} {rss:>11} "
                          f"{kept:>8}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    which = f"checkpoint {a.checkpoints} of each run, " if a.checkpoints > 1 else ""
    print(f"({which}medians of {a.runs} runs; pause = the program's gap at the snapshot; shim_ms = the pause "
          "as the shim timed it; stop/this = "
          "stop-the-world pause / this engine's; max_gap = largest gap during the checkpoint; steal_ms = "
          "hypervisor steal time meanwhile; speed = iterations/s while the image is written vs the "
          "second before; lead = signal to pause, lspeed = iterations/s meanwhile vs the second before; "
          "GiB/s = image bytes / flush time; rss = VmRSS before the signal > after the commit; "
          "kept = copy store kept after the checkpoint)")


if __name__ == "__main__":
    main()
