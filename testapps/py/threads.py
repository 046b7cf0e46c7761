"""threads.py: the test-app contract in Python, run with /usr/bin/python3 -I.

Six worker threads take items from a queue.Queue, compute a deterministic result per item and
store it by index under a Lock; the main thread feeds the queue batch by batch, waits for each
batch on a Condition and prints the results in index order, so the output does not depend on
scheduling. stdout is a file, so it is block-buffered: output sits in memory at checkpoint time.

Usage: threads.py [BATCHES]     (default 30, about 1.5 s here)
"""

import queue
import sys
import threading

WORKERS = 6
BATCH = 20
MASK = (1 << 64) - 1


def work(item):
    x = item
    for k in range(8000 + (item * 7919) % 8000):
        x = (x * 6364136223846793005 + k) & MASK
        x ^= x >> 29
    return x


def fail(reason):
    print(f"FAIL: {reason}", flush=True)
    print(f"FAIL: {reason}", file=sys.stderr, flush=True)
    sys.exit(1)


def main():
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    items = queue.Queue()
    lock = threading.Lock()
    done = threading.Condition(lock)
    results = [None] * (batches * BATCH)
    finished = [0]

    def worker():
        while True:
            item = items.get()
            if item is None:
                return
            r = work(item)
            with lock:
                results[item] = r
                finished[0] += 1
                done.notify_all()

    threads = [threading.Thread(target=worker, name=f"worker-{i}") for i in range(WORKERS)]
    for t in threads:
        t.start()
    print(f"threads.py: {WORKERS} workers, {batches} batches of {BATCH} items")
    print("READY", file=sys.stderr, flush=True)

    chain = 0
    for b in range(batches):
        if b == batches // 2:
            print("PHASE 2", file=sys.stderr, flush=True)
        for i in range(b * BATCH, (b + 1) * BATCH):
            items.put(i)
        with done:
            done.wait_for(lambda: finished[0] == (b + 1) * BATCH)
        for i in range(b * BATCH, (b + 1) * BATCH):
            chain = (chain * 31 + results[i]) & MASK
            print(f"item {i:4d}: {results[i]:016x} chain {chain:016x}")
    for _ in threads:
        items.put(None)
    for t in threads:
        t.join()

    for i in range(0, len(results), 9):
        if results[i] != work(i):
            fail(f"result {i} is wrong")
    if any(t.is_alive() for t in threads):
        fail("a worker is still alive")
    print(f"final: {len(results)} items, chain {chain:016x}")
    print("PASS")


main()
