#!/usr/bin/env python3
"""Image replication between two network namespaces: throughput of a full image, lag of a delta.

Makes two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2, only inside them;
removed on exit), runs `snapshim replicate serve` in one and `snapshim replicate push` in the
other. The images come from scripts/bench_incr_app.c (--size MiB of non-zero pages) under the
shim with incremental checkpoints.

Printed (medians):
  full image     push of the full image to an empty store, connect to acknowledged (the
                 receiver has checked every page checksum, fsynced and committed it): GiB/s,
                 and the receiver's own split (data in, checks, fsync and commit)
  raw write      as many bytes written to a new file in the store and fsynced (the receiver's
                 page cache and disk, without the network)
  raw read       `cat IMAGE > /dev/null`-style read of the image file (page cache)
  raw TCP        the image file sent with sendfile() between the namespaces and discarded by
                 the peer (Python, no MAC, no disk): the link's own rate
  delta lag      after the program rewrote --delta-pct of its pages and a delta was committed:
                 push of the delta, commit to acknowledged
Issue 16 asks: full images at >= 1 GiB/s, a 10 MiB delta acknowledged within 200 ms.

Usage (as root): scripts/bench_replication.py [--size 1024] [--runs 3] [--deltas 5]
                 [--delta-pct 1] [--store DIR]
"""
import argparse, os, re, resource, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
SNAPSHIM = os.path.join(REL, "snapshim")
NS_A, NS_B = "snapshim-repl-a", "snapshim-repl-b"
ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
PORT = 7700


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def build():
    subprocess.run(["cargo", "build", "--release", "--workspace", "-q"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    exe = os.path.join(ROOT, "target", "bench", "bench_incr_app")
    subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "bench_incr_app.c")],
                   check=True)
    return exe


def netns_up():
    netns_down()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "snrepl-a", "type", "veth", "peer", "name", "snrepl-b")
    sh("ip", "link", "set", "snrepl-a", "netns", NS_A)
    sh("ip", "link", "set", "snrepl-b", "netns", NS_B)
    for ns, dev, addr in ((NS_A, "snrepl-a", ADDR_A), (NS_B, "snrepl-b", ADDR_B)):
        sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def netns_down():
    # Removing a namespace removes its end of the veth pair, and so the pair.
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "del", ns, check=False)


def in_ns(ns, *args):
    return ["ip", "netns", "exec", ns, *args]


def start_app(exe, mib, img):
    env = dict(os.environ, LD_PRELOAD=os.path.join(REL, "libsnapshim.so"), SNAPSHIM_DIR=img,
               SNAPSHIM_NAME="b", SNAPSHIM_INCREMENTAL="on", SNAPSHIM_FULL_EVERY="1000",
               SNAPSHIM_FULL_FRACTION="1000", SNAPSHIM_KEEP="100")
    app = subprocess.Popen([exe, str(mib)], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if app.stderr.readline().strip() != "READY":
        raise RuntimeError("bench_incr_app did not start")
    return app


def checkpoint(pid):
    out = subprocess.run([SNAPSHIM, "checkpoint", "-q", str(pid)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout.strip()


def start_serve(key, store):
    log = open(store + ".log", "w")
    p = subprocess.Popen(in_ns(NS_B, SNAPSHIM, "replicate", "serve", "--listen",
                               f"{ADDR_B}:{PORT}", "--key", key, "--store", store),
                         stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()
    if not line.startswith("listening on"):
        raise RuntimeError(f"serve said {line!r}: {open(store + '.log').read()}")
    return p


def cpu_of(pid):
    """User + system CPU seconds of a process so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def push(key, service, src):
    t0 = time.monotonic()
    out = subprocess.run(in_ns(NS_A, SNAPSHIM, "replicate", "push", "--to", f"{ADDR_B}:{PORT}",
                               "--key", key, "--service", service, src),
                         capture_output=True, text=True, timeout=600)
    t = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return t, out.stdout


PHASES = re.compile(r"in (\d+) ms: data (\d+), checks (\d+), fsync and commit (\d+)")


def phases(log_path, n):
    """The receiver's split of its n-th received image (0-based)."""
    found = PHASES.findall(open(log_path).read())
    return tuple(int(x) for x in found[n]) if len(found) > n else None


def raw_read(path):
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass
    return time.monotonic() - t0


def raw_write(store, size):
    """Writes `size` bytes to a new file in the store (8 MiB writes of one buffer), fsync."""
    path = os.path.join(store, ".raw-write")
    buf = os.urandom(8 << 20)
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    left = size
    while left > 0:
        left -= os.write(fd, buf[:min(left, len(buf))])
    os.fsync(fd)
    os.close(fd)
    t = time.monotonic() - t0
    os.unlink(path)
    return t


RAW_SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0
while True:
    k = c.recv_into(buf)
    if not k: break
    n += k
c.sendall(str(n).encode()); c.close()
"""


def raw_tcp(path):
    sink = subprocess.Popen(in_ns(NS_B, sys.executable, "-c", RAW_SINK, ADDR_B, str(PORT + 1)),
                            stdout=subprocess.PIPE, text=True)
    sink.stdout.readline()
    code = ("import socket, sys, time\n"
            "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
            "f = open(sys.argv[3], 'rb'); t0 = time.monotonic(); s.sendfile(f)\n"
            "s.shutdown(socket.SHUT_WR); s.recv(64); print(time.monotonic() - t0)\n")
    out = subprocess.run(in_ns(NS_A, sys.executable, "-c", code, ADDR_B, str(PORT + 1), path),
                         capture_output=True, text=True, check=True)
    sink.wait()
    return float(out.stdout.strip())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="program size, MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--deltas", type=int, default=5)
    ap.add_argument("--delta-pct", type=float, default=1.0)
    ap.add_argument("--store", help="receiver's store, left in place [default: a temporary "
                    "directory, removed]")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_replication.py: needs root (network namespaces)")
    exe = build()
    work = tempfile.mkdtemp(prefix="snapshim-bench-repl-")
    store = a.store or os.path.join(work, "store")
    key = os.path.join(work, "key")
    subprocess.run([SNAPSHIM, "replicate", "keygen", key], check=True, capture_output=True)
    app = serve = None
    try:
        netns_up()
        serve = start_serve(key, store)
        img_dir = os.path.join(work, "img")
        app = start_app(exe, a.size, img_dir)
        full = checkpoint(app.pid)
        size = os.path.getsize(full)
        src = os.path.join(img_dir, "b")
        full_t, split, cpu_send, cpu_recv = [], [], [], []
        load = os.getloadavg()[0]
        for r in range(a.runs):
            c_recv, c_send = cpu_of(serve.pid), children_cpu()
            t, _ = push(key, f"full{r}", src)
            cpu_send.append(children_cpu() - c_send)
            cpu_recv.append(cpu_of(serve.pid) - c_recv)
            full_t.append(t)
            split.append(phases(store + ".log", r))
            # Freed at once: on this VM, writing GiBs of new page cache gets several times
            # slower once a few GiB were written and kept (plain dd shows it too).
            shutil.rmtree(os.path.join(store, f"full{r}"))
        writes = [raw_write(store, size) for _ in range(a.runs)]
        reads = [raw_read(full) for _ in range(a.runs)]
        tcps = [raw_tcp(full) for _ in range(a.runs)]
        lags, dsizes = [], []
        push(key, "delta", src)
        for _ in range(a.deltas):
            app.stdin.write(f"{a.delta_pct}\n")
            app.stdin.flush()
            app.stdout.readline()
            d = checkpoint(app.pid)
            dsizes.append(os.path.getsize(d))
            t, out = push(key, "delta", src)
            if out.count("\nsent ") + out.startswith("sent ") != 1:
                raise RuntimeError("the delta push sent other than one image:\n" + out)
            lags.append(t)
        gib = size / (1 << 30)
        med = statistics.median
        split_ok = [s for s in split if s]
        print(f"\nimage {size / 2**20:.0f} MiB (program {a.size} MiB), medians of {a.runs};"
              f" deltas: median of {a.deltas}")
        print("| measure | time | rate |")
        print("|---|---|---|")
        print(f"| full image pushed, connect to acknowledged | {med(full_t) * 1e3:.0f} ms |"
              f" {gib / med(full_t):.2f} GiB/s |")
        if split_ok:
            for i, what in ((1, "receiver: data in (MAC checked, written)"),
                            (2, "receiver: image checks (header, metadata, page checksums)"),
                            (3, "receiver: fsync, rename, directory fsync")):
                print(f"| {what} | {med(s[i] for s in split_ok):.0f} ms | |")
        print(f"| CPU per GiB of full image: sender (push) | {med(cpu_send) / gib * 1e3:.0f} ms"
              " | |")
        print(f"| CPU per GiB of full image: receiver (serve) | {med(cpu_recv) / gib * 1e3:.0f}"
              " ms | |")
        print(f"| raw write of as many bytes to a new file in the store, fsync |"
              f" {med(writes) * 1e3:.0f} ms | {gib / med(writes):.2f} GiB/s |")
        print(f"| raw read of the image file (page cache) | {med(reads) * 1e3:.0f} ms |"
              f" {gib / med(reads):.2f} GiB/s |")
        print(f"| raw TCP between the namespaces (sendfile, discarded) | {med(tcps) * 1e3:.0f}"
              f" ms | {gib / med(tcps):.2f} GiB/s |")
        print(f"| delta ({med(dsizes) / 2**20:.1f} MiB) pushed, commit to acknowledged |"
              f" {med(lags) * 1e3:.0f} ms | |")
        print(f"\nload average (1 min) before the full pushes: {load:.1f}, at the end:"
              f" {os.getloadavg()[0]:.1f}")
        print(f"all full pushes (s): {[round(t, 3) for t in full_t]}")
        print(f"all delta lags (s): {[round(t, 3) for t in lags]}")
    finally:
        if app:
            app.kill()
            app.wait()
        if serve:
            serve.kill()
            serve.wait()
        netns_down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
