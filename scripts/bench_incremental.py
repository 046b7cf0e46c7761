#!/usr/bin/env python3
"""Incremental checkpoints against full ones, measured in one run.

A program of --size MiB (scripts/bench_incr_app.c, 4 KiB pages, every page non-zero) runs
under the shim with SNAPSHIM_INCREMENTAL=on. Per run and per rewrite fraction: a full
checkpoint, then the program rewrites that fraction of its pages (a pseudo-random set), then a
checkpoint that is a delta. Printed per fraction (medians over --runs):
  dirtied      bytes of the pages the program rewrote
  delta data   page data in the delta image (header data_len), and its ratio to dirtied
  delta file   the whole delta file (page data + metadata + header page)
  metadata     the delta's metadata (regions, threads, ..., inherited spans)
  full ckpt    signal to committed for the full image (as `snapshim checkpoint` measures it)
  delta ckpt   the same for the delta, and full/delta
  delta pause  the program's pause for the delta (from the image's statistics)
Issue 5 asks: delta data <= 1.05 x dirtied (plus metadata), and at 1% the delta checkpoint
>= 10x faster than the full one.

Usage: scripts/bench_incremental.py [--size 1024] [--fractions 1,10,50] [--runs 3]
"""
import argparse, json, os, re, shutil, statistics, struct, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")


def build():
    subprocess.run(["cargo", "build", "--release", "--workspace", "-q"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    exe = os.path.join(ROOT, "target", "bench", "bench_incr_app")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "bench_incr_app.c")],
                   check=True)
    return exe


def header(path):
    """(flags, data_len, meta_len) from the image header (see image/src/lib.rs)."""
    with open(path, "rb") as f:
        h = f.read(88)
    flags = struct.unpack_from("<I", h, 20)[0]
    data_len, _, meta_len = struct.unpack_from("<QQQ", h, 56)
    return flags, data_len, meta_len


def checkpoint(pid):
    t0 = time.monotonic()
    out = subprocess.run([os.path.join(REL, "snapshim"), "checkpoint", str(pid)],
                         capture_output=True, text=True, timeout=600)
    t = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    path = out.stdout.splitlines()[0].split(": ", 1)[1]
    with open(os.path.splitext(path)[0] + ".json") as f:
        stats = json.load(f)
    return path, t, stats


def one_run(exe, mib, pct, work):
    img = os.path.join(work, "img")
    shutil.rmtree(img, ignore_errors=True)
    env = dict(os.environ, LD_PRELOAD=os.path.join(REL, "libsnapshim.so"), SNAPSHIM_DIR=img,
               SNAPSHIM_NAME="b", SNAPSHIM_INCREMENTAL="on", SNAPSHIM_FULL_EVERY="1000",
               SNAPSHIM_FULL_FRACTION="1000", SNAPSHIM_KEEP="10")
    app = subprocess.Popen([exe, str(mib)], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if app.stderr.readline().strip() != "READY":
            raise RuntimeError("bench_incr_app did not start")
        full_path, full_t, _ = checkpoint(app.pid)
        if header(full_path)[0] & 1:
            raise RuntimeError("the first image is not a full one")
        app.stdin.write(f"{pct}\n")
        app.stdin.flush()
        n = int(app.stdout.readline().split()[1])
        delta_path, delta_t, stats = checkpoint(app.pid)
        flags, data_len, meta_len = header(delta_path)
        if not flags & 1:
            raise RuntimeError("the second image is not a delta: " + open(
                os.path.splitext(delta_path)[0] + ".json").read())
        return dict(dirtied=n * 4096, data=data_len, file=os.path.getsize(delta_path),
                    meta=meta_len, full_t=full_t, delta_t=delta_t,
                    pause=stats["pause_us"] / 1000, engine=stats["engine"])
    finally:
        app.kill()
        app.wait()
        shutil.rmtree(img, ignore_errors=True)


def mib(b):
    return f"{b / 2**20:.1f} MiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--fractions", default="1,10,50")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    exe = build()
    work = tempfile.mkdtemp(prefix="snapshim-bench-incr-")
    rows = []
    try:
        for pct in [float(x) for x in a.fractions.split(",")]:
            runs = [one_run(exe, a.size, pct, work) for _ in range(a.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "engine"}
            rows.append((pct, med, runs[0]["engine"]))
            print(f"{pct:g}%: " + ", ".join(
                f"dirtied {mib(r['dirtied'])} delta {mib(r['data'])} in {r['delta_t']*1000:.0f} ms"
                f" (full {r['full_t']*1000:.0f} ms)" for r in runs), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{a.size} MiB program, 4 KiB pages, medians of {a.runs} runs")
    print(f"{'rewrite':>7} {'dirtied':>11} {'delta data':>11} {'/dirtied':>8} {'delta file':>11}"
          f" {'metadata':>9} {'full ckpt':>10} {'delta ckpt':>10} {'full/delta':>10}"
          f" {'delta pause':>11} {'writer':>6}")
    for pct, m, engine in rows:
        print(f"{pct:>6g}% {mib(m['dirtied']):>11} {mib(m['data']):>11}"
              f" {m['data'] / m['dirtied']:>7.3f}x {mib(m['file']):>11}"
              f" {m['meta'] / 1024:>6.1f} KiB {m['full_t'] * 1000:>7.0f} ms"
              f" {m['delta_t'] * 1000:>7.0f} ms {m['full_t'] / m['delta_t']:>9.1f}x"
              f" {m['pause']:>8.1f} ms {engine:>6}")


if __name__ == "__main__":
    main()
