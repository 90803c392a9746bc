"""Helper processes for the crash and concurrency tests (run as a script, not collected by pytest).

Imports once, then forks writers/readers so that each test pays the torch import only once.

    python _procs.py crash ROOT SEEDS      # per seed: fork a writer, SIGKILL it at a random time
    python _procs.py concurrent ROOT       # fork one writer and two readers on one store
    python _procs.py all ROOT SEEDS        # both, one JSON object {"crash": ..., "concurrent": ...}

Batch b holds ids [b·B, (b+1)·B) and rows ``batch_rows(b)``; both modes print one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import numpy as np

from lightning_sketch.store import SketchStore

B, D = 512, 64
SPEC = {"kind": "dense", "dim": 1000, "sketch_dim": D, "seed": 0}


def batch_rows(b: int) -> np.ndarray:
    return np.random.default_rng(1000 + b).normal(size=(B, D)).astype(np.float32)


def expected(num_batches: int) -> tuple[np.ndarray, np.ndarray]:
    if num_batches == 0:
        return np.zeros(0, np.int64), np.zeros((0, D), np.float32)
    return np.arange(num_batches * B), np.concatenate([batch_rows(b) for b in range(num_batches)])


def _wait_all(fds: list[int]) -> None:
    """Block until every fd delivers one byte (a reader's handshake)."""
    for fd in fds:
        if os.read(fd, 1) != b"!":
            raise RuntimeError("a reader exited before its handshake")


def write(path: str, batches: int, ack_fd: int | None = None, pause: float = 0.0,
          handshake: tuple[list[int], int] | None = None) -> None:
    """Commit ``batches`` batches; with ``handshake=(fds, k)``, wait for every reader before the first
    batch and again after batch k, so each reader is sure to see the store mid-way (no timing guess)."""
    store = SketchStore.create(path, SPEC, exist_ok=True)
    store.add_checkpoint("c", step=0, lr=0.1)
    start = store.num_rows // B
    if handshake is not None:
        _wait_all(handshake[0])
    for b in range(start, start + batches):
        store.append(np.arange(b * B, (b + 1) * B), batch_rows(b))
        store.commit()
        if ack_fd is not None:
            os.write(ack_fd, b"%d\n" % (b + 1))
        if handshake is not None and b + 1 == handshake[1]:
            _wait_all(handshake[0])
        time.sleep(pause)
    store.close()


def crash(root: str, seeds: list[int]) -> dict:
    acked = {}
    for seed in seeds:
        rng = random.Random(seed)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                write(os.path.join(root, f"seed{seed}"), batches=10_000, ack_fd=write_fd)
            finally:
                os._exit(0)
        os.close(write_fd)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd) as f:
            lines = f.read().split()
        acked[seed] = int(lines[-1]) if lines else 0
    return acked


def read_loop(path: str, rounds: int, batches: int, handshake: tuple[int, int] | None = None) -> dict:
    """Poll the store until all ``batches`` are visible; ``handshake=(fd, k)``: write one byte to ``fd``
    after the first poll and one when k batches are first seen (the writer waits for both)."""
    seen, bad = [], []
    signalled = 0
    reader = None
    all_ids, all_rows = expected(batches)
    last = -1
    t0 = time.time()
    for _ in range(rounds):
        try:
            reader = SketchStore.open(path, verify="full") if reader is None else reader
            reader.refresh()
            n = reader.num_rows
            if n % B:
                bad.append(f"partial batch: {n} rows")
            elif n and n != last:
                if not (np.array_equal(reader.ids("c"), all_ids[:n]) and np.array_equal(reader.vectors("c"), all_rows[:n])):
                    bad.append(f"rows differ from the committed prefix at {n} rows")
            seen.append(n)
            last = n
            if handshake is not None and (signalled == 0 or (signalled == 1 and n >= handshake[1] * B)):
                os.write(handshake[0], b"!")
                signalled += 1
        except Exception as err:  # the store may not exist yet at the very start
            if os.path.exists(os.path.join(path, "manifest.json")):
                bad.append(repr(err))
        if seen and seen[-1] == batches * B:
            break
        time.sleep(0.01)
    return {"seen": seen, "bad": bad, "seconds": time.time() - t0}


def concurrent(root: str) -> dict:
    path = os.path.join(root, "store")
    SketchStore.create(path, SPEC).close()
    # reader -> writer handshake pipes: the writer pauses at the start and after batch 10 until both
    # readers have polled, so both see the store mid-way whatever the machine load (no sleep tuning)
    shakes = {r: os.pipe() for r in ("reader0", "reader1")}
    pids = []
    for role in ("writer", "reader0", "reader1"):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            t0 = time.time()
            # keep only this process's ends open, so a reader that dies ends the writer's wait (EOF)
            for r, (r_fd, w_fd) in shakes.items():
                os.close(w_fd if role == "writer" else r_fd)
                if role not in ("writer", r):
                    os.close(w_fd)
            if role == "writer":
                out = write(path, batches=20, pause=0.01, handshake=([shakes[r][0] for r in shakes], 10))
            else:
                out = read_loop(path, 20_000, 20, handshake=(shakes[role][1], 10))
            out = out or {"seconds": time.time() - t0}
            os.write(write_fd, json.dumps(out).encode())
            os._exit(0)
        os.close(write_fd)
        pids.append((role, pid, read_fd))
    for r_fd, w_fd in shakes.values():
        os.close(r_fd)
        os.close(w_fd)
    results = {}
    for role, pid, fd in pids:
        with os.fdopen(fd) as f:
            results[role] = json.loads(f.read() or "null")
        os.waitpid(pid, 0)
    return results


if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "crash":
        print(json.dumps(crash(root, [int(s) for s in sys.argv[3].split(",")])))
    elif mode == "concurrent":
        print(json.dumps(concurrent(root)))
    else:
        crashed = crash(os.path.join(root, "crash"), [int(s) for s in sys.argv[3].split(",")])
        print(json.dumps({"crash": crashed, "concurrent": concurrent(os.path.join(root, "concurrent"))}))
