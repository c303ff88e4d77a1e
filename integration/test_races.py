"""Races on a real kernel: one lock in the state dir serialises every change.

- 50 CLI processes (applies of three files, drain/enable, rollback, `watch --once`,
  status, history) started at once in the lab's gateway namespace: each exits 0 or 2,
  none with a traceback, and afterwards every state file parses and the live table is
  exactly what the state dir says (diff, snapshot, and a scratch namespace loaded with
  the rendered desired ruleset).
- Dry runs racing applies: `apply --dry-run` takes the state lock too.
- A kernel rejection in the middle of apply, rollback or drain leaves the previous
  ruleset in place and every file of the state dir byte for byte as it was, except
  stats.json, whose apply_failures counter counts the failure by design.

The racers are real processes running the CLI (`cli.main`, as `python -m nftlb` does), each
its own interpreter; they are let go together once all have imported nftlb, so that they
meet at the state dir instead of arriving in the order their start-ups finish.
"""

from __future__ import annotations

import collections
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.lab import IP, _run
from integration.test_apply import REJECTED, VIP, Gateway, pool
from nftlb import desired, state
from nftlb.diff import normalize

RACERS = 50
READY_SECONDS = 30.0  # racers still importing by then are let go late (a loaded machine)
RACE_SECONDS = 50.0  # every racer has exited within this, or the test fails
HEALTH = "health: {interval: 300ms, timeout: 200ms, rise: 2, fall: 3}\n"
TCP3 = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
FILES = {
    "a": HEALTH + "pools:\n" + pool("web", TCP3),
    "b": HEALTH + "pools:\n" + pool("web", TCP3[:2])
    + pool("dns", ["10.0.0.11:5353", "10.0.0.12:5353"], port=53, protocol="udp", health="{port: 8080}"),
    "c": HEALTH + "pools:\n" + pool("web2", TCP3[1:], port=81, scheduler="round-robin"),
}


@pytest.fixture
def gw(lab, tmp_path):
    return Gateway(lab, tmp_path)


@pytest.fixture
def scratch_ns():
    """A bare network namespace of our own, for loading a ruleset to compare with."""
    name = f"nlbrace{os.getpid()}"
    _run([IP, "netns", "add", name], timeout=10)
    try:
        yield name
    finally:
        _run([IP, "netns", "delete", name], check=False, timeout=10)


def state_files(state_dir: Path) -> dict[str, bytes]:
    """Every file in the state dir (history/ included), by relative path."""
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file()}


def racers(files: dict[str, Path], rng: random.Random) -> list[tuple[str, list[str]]]:
    """50 mixed operations: (kind, argv after `nftlb`)."""
    backends = ["10.0.0.11", "10.0.0.12:8080", "10.0.0.13"]  # 10.0.0.13 is in file a only
    mix = (["apply"] * 14 + ["drain"] * 7 + ["enable"] * 6 + ["rollback"] * 5 + ["once"] * 6
           + ["status"] * 6 + ["history"] * 6)
    assert len(mix) == RACERS
    rng.shuffle(mix)
    out = []
    for kind in mix:
        name = rng.choice(sorted(files))
        if kind == "apply":
            out.append((f"apply {name}", ["apply", str(files[name])]))
        elif kind in ("drain", "enable"):
            out.append((kind, [kind, "web", rng.choice(backends)]))
        elif kind == "once":
            out.append((f"watch {name} --once", ["watch", str(files[name]), "--once"]))
        else:
            out.append((kind, [kind]))
    return out


# A racer: `python -m nftlb ARGS`, except that it first imports everything, says it is ready, then
# waits on the go pipe, so that all of them hit the state dir together rather than in the
# order their interpreters happen to finish starting.
RACER = """
import os, sys
from nftlb import cli, status
os.write(int(os.environ["RACE_READY"]), b".")
os.read(int(os.environ["RACE_GO"]), 1)  # EOF: the test lets every racer go at once
sys.exit(cli.main(sys.argv[1:]))
"""


def start_racers(lab, state_dir: Path, plan, logs: Path, ready_by: float) -> tuple[list[subprocess.Popen], int]:
    """Start every racer and release them together once all are ready, or at `ready_by` with
    those that are (on a loaded machine the rest join late, still racing the others)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    procs, ready = [], 0
    try:
        env = ["env", f"NFTLB_STATE_DIR={state_dir}", f"RACE_READY={ready_w}", f"RACE_GO={go_r}"]
        for i, (_, argv) in enumerate(plan):
            with open(logs / f"{i:02d}.out", "wb") as out, open(logs / f"{i:02d}.err", "wb") as err:
                procs.append(lab.popen(lab.gw, *env, sys.executable, "-c", RACER, *argv, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=err, pass_fds=(ready_w, go_r)))
        os.close(ready_w)
        ready_w = -1
        while ready < len(procs):
            left = ready_by - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                break
            chunk = os.read(ready_r, 64)
            if not chunk:
                break  # every racer has passed the ready point, or died (its exit code tells)
            ready += len(chunk)
    finally:
        for fd in (ready_r, ready_w, go_r):
            if fd >= 0:
                os.close(fd)
        os.close(go_w)  # go
    return procs, ready


def test_fifty_concurrent_operations_leave_one_consistent_state(gw, lab, scratch_ns, tmp_path):
    files = {k: gw.write(v, f"{k}.yaml") for k, v in FILES.items()}
    # a route for the VIPs, as in production: a pool whose backends all end up drained must be
    # seen refusing, not lost to "network unreachable"
    lab.exec(lab.gw, "ip", "route", "add", "198.51.100.0/24", "via", "10.0.0.13")
    gw.nftlb("apply", files["c"])
    gw.nftlb("apply", files["a"])  # two generations: the first rollbacks have somewhere to go
    seed = int(os.environ.get("NFTLB_RACE_SEED", "0")) or random.randrange(1, 2**32)
    print(f"seed {seed} (NFTLB_RACE_SEED={seed} repeats this mix)")
    plan = racers(files, random.Random(seed))

    logs = tmp_path / "racers"
    logs.mkdir()
    started = time.monotonic()
    procs, ready = start_racers(lab, gw.state, plan, logs, started + READY_SECONDS)
    released = time.monotonic()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, started + RACE_SECONDS - time.monotonic())))
        except subprocess.TimeoutExpired:
            pytest.fail(f"racers still running after {RACE_SECONDS:.0f} s")
    took = time.monotonic() - released
    print(f"{ready} of {len(procs)} racers ready after {released - started:.1f} s, released together; "
          f"all done {took:.1f} s later")

    tally = collections.Counter((kind.split()[0], code) for (kind, _), code in zip(plan, codes))
    print(f"exit codes {dict(sorted(collections.Counter(codes).items()))}")
    for (kind, code), n in sorted(tally.items()):
        print(f"  {kind:9} exit {code}: {n}")
    problems = []
    for i, ((kind, argv), code) in enumerate(zip(plan, codes)):
        err = (logs / f"{i:02d}.err").read_text()
        if code not in (0, 2) or "Traceback" in err or "internal error" in err:
            problems.append(f"#{i} nftlb {' '.join(argv)} exited {code}:\n{err}")
        elif code == 2:
            print(f"  #{i} {kind}: {err.strip().splitlines()[-1]}")
    assert not problems, "\n".join(problems)

    # every state file parses, and no temp file is left behind
    for name in (state.APPLIED, state.HEALTH, state.OVERRIDES, state.STATS):
        # overrides.json only exists once some drain or enable went through
        assert state.read_doc(gw.state, name) is not None or name == state.OVERRIDES, name
    history = state.history(gw.state)
    assert 1 <= len(history) <= state.HISTORY_KEEP
    assert len(history) == len(list((gw.state / state.HISTORY).glob("*.json")))
    leftovers = [p for p in gw.state.rglob(".*") if p.is_file()]
    assert not leftovers, leftovers
    applied = state.load(gw.state)
    assert applied.history_id in {e["id"] for e in history}
    assert state.read_doc(gw.state, state.STATS).get("apply_failures", 0) == 0

    # the live table is what the state says
    gw.nftlb("diff", applied.source, expect=0)
    live = gw.live()
    if applied.snapshot is not None:
        assert live == applied.snapshot
    want = desired.of_text(applied.source, applied.source_text, desired.conditions_of(gw.state, applied))
    _run([IP, "netns", "exec", scratch_ns, "nft", "-f", "-"], input=want.script, timeout=30)
    scratch = _run([IP, "netns", "exec", scratch_ns, "nft", "-j", "list", "table", "inet", "nftlb"], timeout=30)
    assert normalize(scratch.stdout) == live
    # and it balances over exactly the backends the plan has in service (or refuses, all drained)
    [p] = [p for p in want.plan.pools if p.protocol == "tcp"]
    names = {f"b{int(str(b.address).rsplit('.', 1)[1]) - 10}" for b in p.slots}
    drained = (state.read_doc(gw.state, state.OVERRIDES) or {}).get("drained", [])
    print(f"at the end: {Path(applied.source).name} live (history #{applied.history_id} of "
          f"{[e['id'] for e in history]}), drained {drained}, pool {p.name} serving {sorted(names) or 'nobody'}")
    res = lab.http_spread(VIP, p.port, 12, timeout=1.0)
    if names:
        assert res["failed"] == 0 and set(res["backends"]) <= names, (res, names)
    else:
        assert res["failed"] == 12 and all("refused" in e.lower() for e in res["errors"]), res


def test_dry_runs_racing_applies_get_a_consistent_answer(gw, lab, tmp_path):
    files = {k: gw.write(v, f"{k}.yaml") for k, v in FILES.items()}
    gw.nftlb("apply", files["a"])
    # before the dry run took the lock, 3 to 17 of these 18 dry runs exited 3
    plan = [(f"apply {k}", ["apply", str(files[k])]) for k in "abababab"] + [
        (f"dry-run {k}", ["apply", "--dry-run", str(files[k])]) for k in "abc" * 6]
    logs = tmp_path / "racers"
    logs.mkdir()
    started = time.monotonic()
    procs, _ = start_racers(lab, gw.state, plan, logs, started + READY_SECONDS)
    codes = [p.wait(timeout=max(0.1, started + RACE_SECONDS - time.monotonic())) for p in procs]
    print("exit codes:", collections.Counter((kind.split()[0], code) for (kind, _), code in zip(plan, codes)))
    failed = [(kind, (logs / f"{i:02d}.err").read_text()) for i, ((kind, _), code) in enumerate(zip(plan, codes))
              if code != 0]
    assert not failed, failed


# -- a kernel rejection in the middle of a change -------------------------------------


@pytest.mark.parametrize("command", ["apply-small", "apply-whole", "rollback", "drain"])
def test_kernel_rejection_changes_nothing_but_the_failure_count(gw, lab, command):
    first = gw.write("pools:\n" + pool("web", TCP3), "first.yaml")
    second = gw.write("pools:\n" + pool("web", TCP3[:2]) + pool("web2", TCP3, port=81), "second.yaml")
    gw.nftlb("apply", first)
    gw.nftlb("apply", second)
    gw.nftlb("drain", "web2", "10.0.0.12")
    argv = {"apply-small": ["apply", str(first)], "apply-whole": ["apply", str(first)],
            "rollback": ["rollback"], "drain": ["drain", "web", "10.0.0.11"]}[command]
    if command == "apply-whole":  # no record of the live table: the next apply replaces it whole
        (gw.state / state.APPLIED).unlink()
    live, files = gw.live(), state_files(gw.state)
    failures = (state.read_doc(gw.state, state.STATS) or {}).get("apply_failures", 0)

    cp = lab.exec(lab.gw, sys.executable, "-c", REJECTED, *argv, check=False, env={"NFTLB_STATE_DIR": str(gw.state)})
    assert cp.returncode == 3, cp
    assert "Too many open files" in cp.stderr and "Traceback" not in cp.stderr

    assert gw.live() == live  # the whole transaction was rolled back
    after = state_files(gw.state)
    stats_before, stats_after = files.pop("stats.json"), after.pop("stats.json")
    assert after.keys() == files.keys()
    changed = [name for name in files if after[name] != files[name]]
    assert not changed, f"{command} changed {changed} although the kernel refused it"
    counted = state.read_doc(gw.state, state.STATS).get("apply_failures", 0)
    if command.startswith("apply") or command == "rollback":
        assert counted == failures + 1  # the failure is counted, by design
    else:
        assert stats_after == stats_before
    assert set(lab.http_spread(VIP, 80, 30)["backends"]) == {"b1", "b2"}
