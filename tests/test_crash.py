"""State files survive a writer killed at any moment: SIGKILL a process that keeps rewriting
them through nftlb.state, over and over, and after every kill each file is whole, either
its old or its new content. Temp files a killed writer leaves are ignored by readers and
removed by the next write once they are stale."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nftlb import state

ROOT = Path(__file__).resolve().parent.parent
KILLS = 120  # at least 100 must be done
BUDGET = 18.0  # seconds for all the kills
DOCS = (state.APPLIED, state.HEALTH, state.OVERRIDES, state.STATS)

# Shared by the test and the writer: the two versions of each file and the history entries.
CONTENT = '''
def version(name, v):
    """Version v (0 or 1) of a state file's payload: different sizes, so a torn write shows."""
    return {"name": name, "v": v, "pad": ("ab" if v else "xyz") * (20000 + 30000 * v)}


def entry(i):
    """History entry #i, as ops writes one (its text is the bulk)."""
    return {"applied_at": float(i), "source": "/etc/nftlb/pools.yaml", "table": "nftlb",
            "sha256": "%064x" % i, "summary": "generation %d" % i, "source_text": "# gen %d\\n" % i * (500 + i % 7 * 900)}
'''
exec(CONTENT)  # defines version() and entry() here too

# The child: `python -c` with nftlb.state imported once, forking one writer per kill (a fork
# costs a millisecond, an interpreter start-up a hundred on a busy machine). Each writer
# rewrites every state file, alternating their two versions, and records history entries,
# until it is SIGKILLed; the child reports each writer's pid, then how it died.
CHILD = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from nftlb import state
{CONTENT}
d = Path(sys.argv[1])
names = {DOCS!r}


def history():
    new = state.next_history_id(d)
    state.add_history(d, entry(new), new, after=None)


def write_forever(n):
    steps = [lambda name=name: state.write_doc(d, name, version(name, i // 5 % 2)) for name in names]
    steps.append(history)
    i = n  # writer n starts at step n % 5: every kill window gets its share
    while True:
        steps[i % 5]()
        i += 1


n = 0
while sys.stdin.readline():  # one line: start one writer
    pid = os.fork()
    if pid == 0:
        try:
            write_forever(n)
        finally:
            os._exit(1)
    sys.stdout.write(f"{{pid}}\\n"); sys.stdout.flush()
    sys.stdout.write(f"{{os.waitpid(pid, 0)[1]}}\\n"); sys.stdout.flush()
    n += 1
"""


def encoded(data: dict) -> bytes:
    return json.dumps({"format": state.FORMAT, "data": data}, separators=(",", ":")).encode()


def temps(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob(".*") if p.is_file())


def check_whole(d: Path) -> dict[str, int]:
    """Every file is one of its two versions (docs) or exactly its entry (history); readers work."""
    seen = {}
    for name in DOCS:
        raw = (d / name).read_bytes()
        versions = [encoded(version(name, v)) for v in (0, 1)]
        assert raw in versions, f"{name}: torn or foreign ({len(raw)} bytes)"
        seen[name] = versions.index(raw)
        assert state.read_doc(d, name) == version(name, seen[name])
    kept = state.history(d)  # parses every entry and ignores temp files
    files = sorted((d / state.HISTORY).glob("*.json"))
    # more than HISTORY_KEEP when writers died between an entry and the prune; the next add prunes
    assert len(kept) == len(files) >= 1
    for path in files:
        i = int(path.stem)
        assert path.read_bytes() == encoded({**entry(i), "id": i}), f"history {path.name} torn"
    ids = [e["id"] for e in kept]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap: an entry never vanishes early
    return seen


def test_sigkilled_writer_leaves_old_or_new_files_never_torn(tmp_path):
    d = tmp_path / "state"
    for name in DOCS:
        state.write_doc(d, name, version(name, 0))
    state.add_history(d, entry(1), 1, after=None)
    rng = random.Random(int(os.environ.get("NFTLB_CRASH_SEED", "0")) or None)
    # -S: no site-packages to scan at start-up; nftlb.state needs only the standard library
    child = subprocess.Popen([sys.executable, "-S", "-c", CHILD, str(d)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def line() -> bytes:
        ready, _, _ = select.select([child.stdout], [], [], 10)
        assert ready, "the child said nothing for 10 s"
        out = child.stdout.readline()
        assert out, f"the child died: {child.stderr.read().decode()}"
        return out

    kills = mid_write = 0
    flips = {name: 0 for name in DOCS}
    last, left = check_whole(d), set()
    started = time.monotonic()
    try:
        while kills < KILLS and time.monotonic() - started < BUDGET:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            writer = int(line())
            time.sleep(rng.uniform(0, 0.04))  # not synchronisation: a random moment to kill it at
            os.kill(writer, signal.SIGKILL)  # the child reaps it only after this: the pid is still its
            status = int(line())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            kills += 1
            now_left = set(temps(d))
            mid_write += bool(now_left - left)  # this writer died between mkstemp and rename
            left = now_left
            seen = check_whole(d)
            for name in DOCS:
                flips[name] += seen[name] != last[name]
            last = seen
    finally:
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
    took = time.monotonic() - started
    left = temps(d)
    print(f"{kills} kills in {took:.1f} s; {mid_write} left a temp file behind (killed mid-write); "
          f"content changes seen {flips}; history ids now {[e['id'] for e in state.history(d)]}; "
          f"{len(left)} temp files left")
    assert kills >= 100, f"only {kills} kills within {BUDGET:.0f} s"
    assert mid_write > 0 and sum(flips.values()) > 0  # the kills did land in the middle of the work

    # the next write of each file clears what killed writers left, once stale
    old = time.time() - state.STALE_TEMP - 1
    for p in left:
        os.utime(p, (old, old))
    for name in DOCS:
        state.write_doc(d, name, version(name, 1))
    new = state.next_history_id(d)
    state.add_history(d, entry(new), new, after=None)
    assert temps(d) == []
    check_whole(d)
    assert len(state.history(d)) == state.HISTORY_KEEP


def test_stale_temp_files_are_ignored_then_cleared_young_ones_kept(tmp_path):
    state.write_doc(tmp_path, state.HEALTH, {"backends": {}})
    state.add_history(tmp_path, entry(1), 1, after=None)
    stale = [tmp_path / ".health.json.k3j9x_0a", tmp_path / state.HISTORY / ".000002.json.zz01ab9c"]
    young = tmp_path / ".health.json.q8w7e6r5"  # a writer may be at work on it right now
    other = [tmp_path / ".health.json.lock", tmp_path / ".stats.json.k3j9x_0a", tmp_path / "notes.txt"]
    for p in (*stale, young, *other):
        p.write_bytes(b"{half")
    old = time.time() - state.STALE_TEMP - 1
    for p in (*stale, *other):
        os.utime(p, (old, old))

    assert state.read_doc(tmp_path, state.HEALTH) == {"backends": {}}  # readers never see them
    assert [e["id"] for e in state.history(tmp_path)] == [1] and state.next_history_id(tmp_path) == 2

    state.write_doc(tmp_path, state.HEALTH, {"backends": {"x": {}}})
    assert not stale[0].exists() and young.exists()
    assert all(p.exists() for p in other)  # another file's temp waits for that file's next write
    state.add_history(tmp_path, entry(2), 2, after=None)
    assert not stale[1].exists()
    state.write_doc(tmp_path, state.STATS, {})
    assert not other[1].exists() and other[0].exists() and other[2].exists()


def test_failed_write_cleans_its_own_temp_file(tmp_path, monkeypatch):
    state.write_doc(tmp_path, state.STATS, {"applies": 1})

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(state.StateError, match="No space left"):
        state.write_doc(tmp_path, state.STATS, {"applies": 2})
    monkeypatch.undo()
    assert state.read_doc(tmp_path, state.STATS) == {"applies": 1} and temps(tmp_path) == []
