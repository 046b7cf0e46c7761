#!/usr/bin/env python3
"""What a checkpoint costs a server's clients: redis-server with a 1 GiB dataset, in one run.

Debian's redis-server (linked with jemalloc) runs under the shim on 127.0.0.1, filled with
`DEBUG POPULATE` (--keys keys of --value-size bytes: 1,000,000 x 1 KiB by default, about 1.2
GiB resident). Clients (--clients threads, one connection each, pipeline depth 1) send `GET` of
random keys at a steady rate (--rate requests per second per client, on a fixed schedule), and
each request's latency is measured from the moment it was due, not from when it was sent, so a
stall counts for every request it delayed. Three phases of the same length, in one run:

  none        nothing happens
  snapshim    `snapshim checkpoint PID` is run at the phase's first third (a full image)
  bgsave      redis's own `BGSAVE` (its fork-based snapshot to dump.rdb) at the first third

A phase lasts --seconds, or until the checkpoint or the save has ended plus a third of that.
Printed per phase: requests, failed requests (an error reply, a wrong value, a timeout of 5 s or
a connection error), the largest latency, the p99, and the ratios of the largest latencies and
p99s: snapshim/none, bgsave/none, snapshim/bgsave; and what `snapshim checkpoint` and redis
said about their snapshots, with when the phase's largest latency came, counted from the start
of the checkpoint or the save. Then the same figures over only the requests due while the
checkpoint or the save ran (for `none`, over the same stretch as the checkpoint's). --cow sets SNAPSHIM_COW for redis-server (the engine).

Usage: scripts/bench_redis.py [--keys 1000000] [--value-size 1024] [--clients 4] [--rate 1000]
                              [--seconds 12] [--port 16400] [--dir /tmp] [--cow auto]
Needs: cargo build --release --workspace, redis-server; root for the uffd engine (else fork).
"""
import argparse, os, random, shutil, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
TIMEOUT = 5.0


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Conn:
    """One RESP connection: a command, its reply (bulk strings as bytes, errors raised)."""

    def __init__(self, port, timeout=TIMEOUT):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def call(self, *args):
        self.s.sendall(resp(*args))
        line = self.f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        return rest


def info(port, section, field):
    text = Conn(port).call("INFO", section).decode()
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1]
    return None


class Phase:
    def __init__(self, name):
        self.name, self.lat, self.due, self.failed, self.note = name, [], [], 0, ""
        self.acted = None  # when the checkpoint or the save was started (none: would be)
        self.took = None  # how long it took
        self.lock = threading.Lock()


def client(port, keys, value_size, rate, phase_box, stop, seed):
    rng = random.Random(seed)
    conn, period, due = None, 1.0 / rate, time.monotonic()
    while not stop.is_set():
        due += period
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        phase = phase_box[0]
        k = rng.randrange(keys)
        try:
            if conn is None:
                conn = Conn(port)
            v = conn.call("GET", "key:%d" % k)
            ok = v is not None and len(v) == value_size
        except Exception:
            ok, conn = False, None
        lat = time.monotonic() - due
        with phase.lock:
            phase.lat.append(lat)
            phase.due.append(due)
            if not ok:
                phase.failed += 1


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


def run_phase(name, seconds, action, phase_box):
    phase = Phase(name)
    phase_box[0] = phase
    start = time.monotonic()
    time.sleep(seconds / 3)
    phase.acted = time.monotonic()
    if action:
        phase.note = action()
        phase.took = time.monotonic() - phase.acted
        rest = max(seconds - (time.monotonic() - start), phase.took / 3)
    else:
        rest = seconds - (time.monotonic() - start)
    time.sleep(rest)
    return phase


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--port", type=int, default=16400)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--cow", default="auto", help="SNAPSHIM_COW for redis: auto, uffd, fork")
    a = ap.parse_args()
    for f in ("libsnapshim.so", "snapshim"):
        if not os.path.exists(os.path.join(REL, f)):
            sys.exit(f"bench_redis: {REL}/{f} missing: run cargo build --release --workspace")
    if not shutil.which("redis-server"):
        sys.exit("bench_redis: redis-server missing: apt-get install redis-server")
    try:
        socket.create_connection(("127.0.0.1", a.port), timeout=1).close()
        sys.exit(f"bench_redis: port {a.port} is in use: pick another with --port")
    except OSError:
        pass
    work = tempfile.mkdtemp(prefix="bench-redis-", dir=a.dir)
    env = dict(os.environ, LD_PRELOAD=os.path.join(REL, "libsnapshim.so"),
               SNAPSHIM_DIR=os.path.join(work, "img"), SNAPSHIM_NAME="redis", SNAPSHIM_COW=a.cow)
    log = open(os.path.join(work, "redis.log"), "w")
    srv = subprocess.Popen(
        ["redis-server", "--port", str(a.port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work, "--daemonize", "no",
         "--enable-debug-command", "local"], env=env, stdout=log, stderr=log, cwd=work)
    try:
        for _ in range(200):
            try:
                Conn(a.port).call("PING")
                break
            except OSError:
                time.sleep(0.05)
        t = time.monotonic()
        Conn(a.port, timeout=None).call("DEBUG", "POPULATE", a.keys, "key", a.value_size)
        print(f"populated {a.keys} keys of {a.value_size} bytes in {time.monotonic() - t:.1f} s; "
              f"redis used_memory_rss {info(a.port, 'memory', 'used_memory_rss_human')}, "
              f"allocator {info(a.port, 'memory', 'mem_allocator')}", flush=True)

        def checkpoint():
            out = subprocess.run([os.path.join(REL, "snapshim"), "checkpoint", str(srv.pid)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                return "FAILED: " + (out.stderr or out.stdout).strip()
            return " ".join(out.stdout.split())

        def bgsave():
            t0 = time.monotonic()
            Conn(a.port).call("BGSAVE")
            while info(a.port, "persistence", "rdb_bgsave_in_progress") != "0":
                time.sleep(0.05)
            return (f"BGSAVE {info(a.port, 'persistence', 'rdb_last_bgsave_status')} in "
                    f"{time.monotonic() - t0:.2f} s, fork "
                    f"{int(info(a.port, 'stats', 'latest_fork_usec')) / 1000:.2f} ms")

        phase_box, stop = [Phase("warm-up")], threading.Event()
        threads = [threading.Thread(target=client, daemon=True,
                                    args=(a.port, a.keys, a.value_size, a.rate, phase_box, stop, i))
                   for i in range(a.clients)]
        for th in threads:
            th.start()
        time.sleep(2)
        phases = [run_phase("none", a.seconds, None, phase_box),
                  run_phase("snapshim", a.seconds, checkpoint, phase_box),
                  run_phase("bgsave", a.seconds, bgsave, phase_box)]
        phase_box[0] = Phase("done")
        stop.set()
        for th in threads:
            th.join()
    finally:
        srv.kill()
        srv.wait()
        log.close()
    report(a, phases)
    shutil.rmtree(work, ignore_errors=True)


def report(a, phases):
    print(f"\n{a.clients} clients x {a.rate} GET/s, pipeline 1, {a.keys} keys x {a.value_size} B, "
          f"SNAPSHIM_COW={a.cow}")
    print(f"{'phase':10} {'requests':>9} {'failed':>7} {'max ms':>8} {'p99 ms':>8}")
    fig = {}
    for p in phases:
        mx, p99 = max(p.lat) * 1000, pct(p.lat, 0.99) * 1000
        fig[p.name] = (mx, p99)
        print(f"{p.name:10} {len(p.lat):9} {p.failed:7} {mx:8.2f} {p99:8.2f}")
    for p in phases:
        if p.note:
            i = max(range(len(p.lat)), key=p.lat.__getitem__)
            print(f"  {p.name}: {p.note}; its largest latency came "
                  f"{p.due[i] - p.acted:+.2f} s after it was started")
    ratios(fig)
    # The same figures over the requests due while the snapshot was being taken: from its start
    # to its end (for `none`, the same stretch as snapshim's), so that a stall elsewhere in the
    # phase (another program on the machine) does not count.
    took = {p.name: p.took for p in phases}
    took["none"] = took["snapshim"]
    print(f"\nonly requests due while the checkpoint or the save ran (none: the same stretch "
          f"as snapshim's, {took['none']:.2f} s)")
    print(f"{'phase':10} {'requests':>9} {'max ms':>8} {'p99 ms':>8}")
    for p in phases:
        end = p.acted + took[p.name]
        lat = [l for l, d in zip(p.lat, p.due) if p.acted <= d <= end]
        fig[p.name] = (max(lat) * 1000, pct(lat, 0.99) * 1000)
        print(f"{p.name:10} {len(lat):9} {fig[p.name][0]:8.2f} {fig[p.name][1]:8.2f}")
    ratios(fig)


def ratios(fig):
    for x, y in (("snapshim", "none"), ("bgsave", "none"), ("snapshim", "bgsave")):
        print(f"{x}/{y}: max {fig[x][0] / fig[y][0]:.2f}x, p99 {fig[x][1] / fig[y][1]:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except (OSError, RuntimeError) as e:
        sys.exit(f"bench_redis: {e}")
