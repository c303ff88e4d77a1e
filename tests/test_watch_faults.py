"""The watcher under misbehaving backends and concurrent commands, with a fake clock, a fake
prober and the fake kernel: flapping for 10,000 rounds costs one transaction per real
change and no memory; a prober that raises, a file changed in the middle of a round and an
unreadable state file do not take it down; `watch --once` runs queue for the watch lock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest

from nftlb import ops, state
from nftlb.diff import normalize
from nftlb.errors import StateError
from nftlb.kernel.fake import Fake
from nftlb.watch import Watcher

RISE, FALL = 2, 3
POOLS = f"""
health: {{interval: 1s, timeout: 500ms, rise: {RISE}, fall: {FALL}}}
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends: [10.0.0.11:8080, 10.0.0.12:8080, 10.0.0.13:8080]
  - name: dns
    vip: 198.51.100.53
    port: 53
    protocol: udp
    health: {{port: 8080}}
    backends: [10.0.0.11, 10.0.0.12]
"""
ROUNDS, EARLY = 10_000, 1_000
GROWTH = 64 * 1024  # bytes the traced memory may grow between round EARLY and round ROUNDS


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Kernel(Fake):
    """The fake kernel, without its log of every script (that log would be the test's leak)."""

    def run(self, script, *, check=False):
        super().run(script, check=check)
        self.scripts.clear()


class Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts: dict[str, int] = {}
        self.last: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        key = "committed" if message.startswith("committed") else record.levelname
        self.counts[key] = self.counts.get(key, 0) + 1
        self.last = [*self.last[-9:], message]


@contextmanager
def counted_logs():
    """The nftlb logger counted, not kept. Inside the test: pytest attaches its capture
    handlers to this logger too when the test starts, and they would keep every record."""
    logger = logging.getLogger("nftlb")
    saved = logger.handlers[:], logger.propagate, logger.level
    counter = Counter()
    logger.handlers[:], logger.propagate = [counter], False
    logger.setLevel(logging.INFO)
    try:
        yield counter
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


@pytest.fixture
def logs():
    with counted_logs() as counter:
        yield counter


def reference(results: list[bool]) -> tuple[int, bool]:
    """The rise/fall rule spelled independently of nftlb.health: (real changes, up at the end)."""
    up, ok, failed, changes = True, 0, 0, 0
    for r in results:
        ok, failed = (ok + 1, 0) if r else (0, failed + 1)
        if up and failed >= FALL or not up and ok >= RISE:
            up, ok, failed, changes = not up, 0, 0, changes + 1
    return changes, up


def serving(kernel: Fake) -> set[str]:
    live = normalize(kernel.list("table inet nftlb"))
    return {e.partition(" : ")[2] for e in live["map slots4_tcp"].get("elem", []) if e.startswith("198.51.100.10 . 80 ")}


@pytest.fixture
def fast_dir(tmp_path):
    """A state dir in memory (tmpfs) when there is one: on ext4 every rename of a state file
    waits for its data, and 10,000 rounds would measure the disk rather than the watcher."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="nftlb-test-", dir="/dev/shm"))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


def test_flapping_for_ten_thousand_rounds_one_transaction_per_change_flat_memory(fast_dir, monkeypatch):
    # durability is test_crash's business; here 10,000 rounds of fsync would only measure the disk
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    kernel, clock = Kernel(), Clock()
    # one pool, a small Maglev table: the fake kernel's cost per transaction grows with its size
    (fast_dir / "pools.yaml").write_text(POOLS.split("  - name: dns")[0].replace(
        "    backends: [10.0.0.11:8080", "    table_size: 7\n    backends: [10.0.0.11:8080"))
    state_dir = fast_dir / "state"
    ops.apply(fast_dir / "pools.yaml", kernel, state_dir)

    # 10.0.0.12 flips every round: rise/fall absorb it, no change at all. 10.0.0.13 flips every
    # round too, but now and then holds for 3 to 6 rounds: long enough, at times, for a real change
    rng = random.Random(20261129)
    b3, answer = [], True
    while len(b3) < ROUNDS:
        b3 += [answer] * (rng.randint(3, 6) if rng.random() < 0.04 else 1)
        answer = not answer
    b3 = b3[:ROUNDS]
    b2 = [i % 2 == 0 for i in range(ROUNDS)]
    answers, steady = {("10.0.0.12", 8080): b2, ("10.0.0.13", 8080): b3}, [True] * ROUNDS
    rnd = [0]

    async def probe(address, port, timeout):
        ok = answers.get((address, port), steady)[rnd[0]]
        return (True, "", 0.001) if ok else (False, "connection refused", None)

    w = Watcher(kernel, state_dir, probe=probe, monotonic=clock, wall=clock)
    memory = {}

    async def rounds():
        for i in range(ROUNDS):
            rnd[0] = i
            await w.step()
            clock.t += 1.0
            if i + 1 in (EARLY, ROUNDS):
                gc.collect()
                memory[i + 1] = tracemalloc.get_traced_memory()[0]

    started = time.monotonic()
    with counted_logs() as logs:
        tracemalloc.start()
        try:
            asyncio.run(rounds())
        finally:
            tracemalloc.stop()
    took = time.monotonic() - started

    changes, up = reference(b3)
    assert reference(b2) == (0, True)
    growth = memory[ROUNDS] - memory[EARLY]
    print(f"{ROUNDS} rounds in {took:.1f} s: 10.0.0.13 changed {changes} times, {w.transactions} transactions; "
          f"traced memory after {EARLY} rounds {memory[EARLY]} B, after {ROUNDS} {memory[ROUNDS]} B "
          f"(growth {growth:+d} B, bound {GROWTH} B)")
    assert changes > 100
    assert w.transactions == changes == logs.counts.get("committed", 0)  # one per real change, none for 10.0.0.12
    stats = state.read_doc(state_dir, state.STATS)["transitions"]
    assert stats == {"web|10.0.0.13:8080": {"up": changes // 2, "down": changes - changes // 2}}
    assert serving(kernel) == {"10.0.0.11 . 8080", "10.0.0.12 . 8080"} | ({"10.0.0.13 . 8080"} if up else set())
    assert growth <= GROWTH, f"memory grew by {growth} B between round {EARLY} and round {ROUNDS}"


def test_a_prober_that_raises_is_a_failed_probe_not_a_dead_watcher(tmp_path, logs):
    kernel, clock = Fake(), Clock()
    (tmp_path / "pools.yaml").write_text(POOLS)
    ops.apply(tmp_path / "pools.yaml", kernel, tmp_path / "state")

    async def probe(address, port, timeout):
        if address == "10.0.0.12":
            raise RuntimeError("the target sent something no prober expects")
        return True, "", 0.001

    w = Watcher(kernel, tmp_path / "state", probe=probe, monotonic=clock, wall=clock)
    for _ in range(FALL):
        transitions = asyncio.run(w.step())
        clock.t += 1.0
    assert {str(t.target.key) for t in transitions} == {"web|10.0.0.12:8080", "dns|10.0.0.12:53"}
    assert w.records["web|10.0.0.12:8080"].error == "probe error: RuntimeError: the target sent something no prober expects"
    assert "10.0.0.12 . 8080" not in serving(kernel)


def test_file_changed_in_the_middle_of_a_round(tmp_path, logs):
    """An apply between the probes and the commit: the failing backend has left its (udp,
    on_down: reset) pool in the new file; the watcher commits the new file and lives on."""
    kernel, clock = Fake(), Clock()
    path = tmp_path / "pools.yaml"
    path.write_text(POOLS)
    state_dir = tmp_path / "state"
    ops.apply(path, kernel, state_dir)
    swapped = []

    async def probe(address, port, timeout):
        if address != "10.0.0.12":
            return True, "", 0.001
        if w.records["dns|10.0.0.12:53"].failed == FALL - 1 and not swapped:  # the failure that counts
            path.write_text(POOLS.replace("backends: [10.0.0.11, 10.0.0.12]", "backends: [10.0.0.11]"))
            ops.apply(path, kernel, state_dir)  # as another process would, under the lock
            swapped.append(True)
        return False, "connection refused", None

    w = Watcher(kernel, state_dir, probe=probe, monotonic=clock, wall=clock)
    for _ in range(FALL + 1):
        asyncio.run(w.step())
        clock.t += 1.0
    assert swapped and "dns|10.0.0.12:53" not in w.records  # it follows the new file
    assert "10.0.0.12 . 8080" not in serving(kernel)
    assert ops.compare(path, kernel, state_dir)[1].in_sync


def test_an_unreadable_state_file_is_logged_and_the_daemon_keeps_watching(tmp_path, logs):
    kernel, clock = Fake(), Clock()
    (tmp_path / "pools.yaml").write_text(POOLS)
    state_dir = tmp_path / "state"
    ops.apply(tmp_path / "pools.yaml", kernel, state_dir)
    w = Watcher(kernel, state_dir, probe=lambda *a: asyncio.sleep(0, (True, "", 0.001)), monotonic=clock,
                wall=clock)
    good = (state_dir / state.APPLIED).read_bytes()
    (state_dir / state.APPLIED).write_text("{half a file")  # e.g. restored badly by an operator
    steps = []

    async def main():
        stop = asyncio.Event()
        real = w.step

        async def step():
            steps.append(clock.t)
            clock.t += 1.0
            if len(steps) == 2:
                (state_dir / state.APPLIED).write_bytes(good)
            if len(steps) == 3:
                stop.set()
            return await real()

        w.step = step
        await w.run(stop)

    started = time.monotonic()
    asyncio.run(main())
    assert len(steps) == 3 and time.monotonic() - started < 5  # a failed round waits one second, not zero
    assert logs.counts.get("ERROR", 0) == 1
    assert any(m.startswith("watch round failed: cannot read") for m in logs.last), logs.last


# -- the watch lock: one watcher, and --once rounds queue rather than fail ----------------


def _hold_watch_lock(state_dir, once, ready, release):
    fd = state.watch_lock(state_dir, once=once)
    ready.set()
    release.wait(10)
    os.close(fd)


@contextlib.contextmanager
def _watch_lock_held(tmp_path, once: bool):
    """Another process holds the watch lock (as a --once round or a daemon) until `release`."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_watch_lock, args=(tmp_path, once, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        yield release
    finally:
        release.set()
        holder.join(10)


@pytest.mark.parametrize("holder_once", [True, False])
def test_once_waits_for_a_once_round_and_a_daemon_is_refused_at_once(tmp_path, holder_once):
    with _watch_lock_held(tmp_path, holder_once) as release:
        started = time.monotonic()
        if holder_once:  # a --once round ends within seconds: the next one queues behind it
            ends = threading.Timer(0.3, release.set)  # the round in progress ends
            ends.start()
            fd = state.watch_lock(tmp_path, once=True, timeout=10)
            ends.join(10)
            assert 0.2 < time.monotonic() - started < 10
            assert (tmp_path / "watch.lock").read_text() == f"{os.getpid()} once\n"
            os.close(fd)
        else:  # a daemon never ends: refused at once, --once or not
            for once in (True, False):
                with pytest.raises(StateError, match="another nftlb watch is running"):
                    state.watch_lock(tmp_path, once=once, timeout=10)
            assert time.monotonic() - started < 1


def test_once_gives_up_after_its_timeout(tmp_path):
    with _watch_lock_held(tmp_path, True):
        with pytest.raises(StateError, match="waited 0 s for its round to end"):
            state.watch_lock(tmp_path, once=True, timeout=0.2)
