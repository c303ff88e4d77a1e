"""Hardening under load, on a real kernel: a load generator in the client namespace keeps
opening short TCP connections through the VIP while nftlb re-applies files, and while the
watcher takes a killed backend out.

Every connection is one JSON record from `client.py load-http` (start and end on
CLOCK_MONOTONIC, which the namespaces share with this process, source port, backend or
error), so each one can be placed against the applies and the watcher's log lines.
"""

from __future__ import annotations

import bisect
import json
import os
import signal
import statistics
import subprocess
import threading
import time

import pytest

from integration.lab import LabTimeout, _LineReader
from integration.test_apply import NFTLB, VIP, Gateway, pool
from integration.test_watch import FALL, HEALTH, INTERVAL, WatchProcess, wait_for
from integration.test_watch import TIMEOUT as PROBE_TIMEOUT
from nftlb import explain

CLIENT = "192.0.2.2"
NAME = {"10.0.0.11": "b1", "10.0.0.12": "b2", "10.0.0.13": "b3", "10.0.0.14": "b4"}
CONN_TIMEOUT = 1.0  # per connection (connect, and each read) of the load generator


class Load:
    """`client.py load-http` running in the client namespace; its records collected as they come."""

    def __init__(self, lab, seconds: float, max_connections: int, first_sport: int, rate: float = 0.0):
        self.proc = lab.load_http(VIP, 80, seconds, max_connections, CONN_TIMEOUT, first_sport, rate=rate)
        self.records: list[dict] = []
        self.summary: dict | None = None
        self.garbage: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            try:
                doc = json.loads(raw)
            except ValueError:
                self.garbage.append(raw)
                continue
            if "summary" in doc:
                self.summary = doc["summary"]
            else:
                self.records.append(doc)

    def wait_records(self, condition, timeout: float, what: str):
        def check():
            if self.proc.poll() is not None and not self._reader.is_alive():
                pytest.fail(f"the load generator exited early ({self.proc.returncode}) while waiting for {what}; "
                            f"summary {self.summary}")
            return condition(self.records)
        return wait_for(check, timeout, what)

    def stop(self) -> dict:
        """SIGTERM (connections in flight finish, each bounded); return the summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(3 * CONN_TIMEOUT + 5)
        except Exception:
            self.proc.kill()
            raise
        self._reader.join(5)
        err = self.proc.stderr.read().decode(errors="replace")
        assert self.proc.returncode == 0 and not self.garbage and self.summary is not None, (
            self.proc.returncode, self.garbage[:3], err)
        assert self.summary["attempted"] == len(self.records), (self.summary, len(self.records))
        return self.summary

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if "error" in r]


class TimedWatch(WatchProcess):
    """WatchProcess that also notes when (monotonic) each log line arrived."""

    def __init__(self, gw, file, *extra):
        self.stamped: list[tuple[float, str]] = []
        super().__init__(gw, file, *extra)

    def _read(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.stamped.append((time.monotonic(), line))
            self.lines.append(line)

    def when(self, text: str, timeout: float = 10) -> float:
        return wait_for(lambda: next((t for t, l in self.stamped if text in l), None), timeout,
                        f"log line {text!r}\n" + "\n".join(self.lines))


def _fmt(durations: list[float]) -> str:
    if len(durations) < 2:
        return f"{[round(d * 1000) for d in durations]} ms"
    q = statistics.quantiles(durations, n=10)
    return (f"median {statistics.median(durations) * 1000:.0f} ms, min {min(durations) * 1000:.0f}, "
            f"p90 {q[-1] * 1000:.0f}, max {max(durations) * 1000:.0f}")


# --------------------------------------------------------------------------------------------
# 1. 100 re-applies under load

APPLY_TIMEOUT = 15.0


def _bytecode_env(gw: Gateway) -> list[str]:
    # Bytecode cached under the test's own directory: this machine sets PYTHONDONTWRITEBYTECODE,
    # so otherwise every CLI start compiles most of nftlb again.
    return ["PYTHONDONTWRITEBYTECODE=", f"PYTHONPYCACHEPREFIX={gw.dir / 'pycache'}"]


def run_apply(lab, gw: Gateway, file) -> tuple[int, str, str]:
    """`python -m nftlb apply --json FILE` in the gateway, a process of its own. One that hangs
    is made to print where (faulthandler, on SIGABRT) before the test fails."""
    env = [f"NFTLB_STATE_DIR={gw.state}", *_bytecode_env(gw)]
    proc = lab.popen(lab.gw, "env", *env, NFTLB[0], "-X", "faulthandler", *NFTLB[1:],
                     "apply", "--json", str(file), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=APPLY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
        pytest.fail(f"nftlb apply {file} still running after {APPLY_TIMEOUT} s; where it was:\n{err}")
    return proc.returncode, out, err


# `python -m nftlb ARGS...` without the interpreter start: a server in the gateway imports
# nftlb.cli once (what `python -m nftlb` imports first), then forks one child per request;
# the child runs nftlb/__main__.py with runpy, as `python -m` does, and exits with its code.
# Each apply is still a fresh process that has done nothing but import; it skips the ~0.4 s
# of CPU that interpreter start and imports cost, which 100 applies on a shared 2-CPU
# machine cannot afford within the time bound.
FORK_SERVER = r"""
import faulthandler, json, os, runpy, sys, tempfile, time, traceback
import nftlb.cli
faulthandler.enable()  # fd 2: in a child, its captured stderr
for line in sys.stdin:
    req = json.loads(line)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.environ.update(req["env"])
            sys.argv = ["nftlb", *req["argv"]]
            try:
                runpy.run_module("nftlb", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    out.seek(0)
    err.seek(0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "out": out.read().decode(errors="replace"),
                      "err": err.read().decode(errors="replace"), "seconds": seconds}), flush=True)
    out.close()
    err.close()
"""


class ForkedNftlb:
    """`python -m nftlb ...` in the gateway, forked from a server that has imported nftlb."""

    def __init__(self, lab, gw: Gateway):
        self.gw = gw
        self.proc = lab.popen(lab.gw, "env", *_bytecode_env(gw), NFTLB[0], "-c", FORK_SERVER,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self._lines = _LineReader(self.proc.stdout)

    def run(self, *args) -> tuple[int, str, str]:
        req = {"argv": [str(a) for a in args], "env": {"NFTLB_STATE_DIR": str(self.gw.state)}}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        try:
            pid = json.loads(self._lines.readline(APPLY_TIMEOUT))["pid"]
        except (LabTimeout, EOFError) as exc:
            self.proc.kill()
            pytest.fail(f"the fork server did not answer: {exc}; stderr:\n{self.proc.stderr.read().decode()}")
        try:
            answer = json.loads(self._lines.readline(APPLY_TIMEOUT))
        except LabTimeout:
            os.kill(pid, signal.SIGABRT)  # faulthandler prints where it is, into its stderr
            answer = json.loads(self._lines.readline(10))
            pytest.fail(f"nftlb {args} still running after {APPLY_TIMEOUT} s; where it was:\n{answer['err']}")
        return answer["rc"], answer["out"], answer["err"]

    def close(self) -> None:
        self.proc.stdin.close()  # EOF: the server exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


B = {n: f"10.0.0.1{n[1]}:8080" for n in ("b1", "b2", "b3", "b4")}
CYCLE = [  # each file differs from the one before it (the last wraps to the first)
    ("round-robin b1-b3", pool("web", [B["b1"], B["b2"], B["b3"]], scheduler="round-robin"), {"b1", "b2", "b3"}),
    ("hash b1-b3", pool("web", [B["b1"], B["b2"], B["b3"]]), {"b1", "b2", "b3"}),
    ("hash, weights 3:1:2", pool("web", ["{address: 10.0.0.11, port: 8080, weight: 3}",
                                         "{address: 10.0.0.12, port: 8080, weight: 1}",
                                         "{address: 10.0.0.13, port: 8080, weight: 2}"]), {"b1", "b2", "b3"}),
    ("hash, b4 added", pool("web", [B["b1"], B["b2"], B["b3"], B["b4"]]), {"b1", "b2", "b3", "b4"}),
    ("hash, b1 removed", pool("web", [B["b2"], B["b3"], B["b4"]]), {"b2", "b3", "b4"}),
]
APPLIES = 100
# Every CLI_EVERY-th apply is a plain `python -m nftlb apply` (7: prime to the cycle of 5, so
# each kind of file gets some), the others are forked (ForkedNftlb). NFTLB_LOAD_CLI_EVERY=1
# makes all 100 plain ones: ~50 s on an idle 2-CPU machine, ~80 s with other tests running.
CLI_EVERY = int(os.environ.get("NFTLB_LOAD_CLI_EVERY", "7"))
# Before every WHOLE_EVERY-th apply the state's record of the live table is deleted, so that
# apply replaces the whole table (add, delete, add table in one transaction) instead of
# sending the small difference.
WHOLE_EVERY = 9
LOAD_RATE = 300  # new connections a second during the applies
LOOP_BUDGET = 55.0 if CLI_EVERY > 1 else 85.0  # seconds for the 100 applies (~32 s measured)
CHECK_HELD_EVERY = 11  # prime to the cycle of 5: the checks come after each kind of file in turn


def test_hundred_reapplies_under_load_lose_no_connection(lab_factory, tmp_path):
    started = time.monotonic()
    lab = lab_factory(backends=4)
    lab.start_servers()
    gw = Gateway(lab, tmp_path)
    files = [gw.write("seed: 0x5eed\npools:\n" + text, f"f{i}.yaml") for i, (_, text, _) in enumerate(CYCLE)]
    rc, out, err = run_apply(lab, gw, files[0])  # (also fills the bytecode cache)
    assert rc == 0, (out, err)

    # Round-robin and no other traffic yet: the three held connections land on b1, b2, b3.
    held = [lab.hold(VIP, 80) for _ in range(3)]
    pinned = [h.request() for h in held]
    assert sorted(pinned) == ["b1", "b2", "b3"], pinned

    # Source ports 10000 up, never one twice: every connection is a new 4-tuple for conntrack.
    # Paced: a real client would not share the gateway's CPUs, and at full speed it takes a
    # whole CPU of the two; 300 a second is still ~50 new connections during each apply.
    load = Load(lab, seconds=LOOP_BUDGET + 15, max_connections=int(LOAD_RATE * (LOOP_BUDGET + 20)),
                first_sport=10000, rate=LOAD_RATE)
    load.wait_records(lambda r: len(r) >= 50, 10, "the load generator's first 50 connections")

    forked = ForkedNftlb(lab, gw)
    applies = []  # (start, end, index into CYCLE)
    took = {"cli": [], "forked": []}
    nftlb_said = []  # nftlb's own timing
    kinds: dict[str, int] = {}  # "1 pools" (a small transaction) or "whole table"
    loop_start = time.monotonic()
    for i in range(1, APPLIES + 1):
        which = i % len(CYCLE)
        how = "cli" if i % CLI_EVERY == 0 else "forked"
        whole = i % WHOLE_EVERY == 0
        if whole:
            (gw.state / "applied.json").unlink()
        t0 = time.monotonic()
        if how == "cli":
            rc, out, err = run_apply(lab, gw, files[which])
        else:
            rc, out, err = forked.run("apply", "--json", files[which])
        t1 = time.monotonic()
        took[how].append(t1 - t0)
        assert rc == 0, f"apply #{i} ({CYCLE[which][0]}, {how}) exited {rc}\n{out}\n{err}"
        assert "Traceback" not in err, err
        doc = json.loads(out)
        assert doc["action"] == "applied", (i, doc)  # every file differs from the one before
        assert (doc["transaction"] == "whole table") == whole, (i, doc)
        nftlb_said.append(doc["seconds"])
        kinds[doc["transaction"]] = kinds.get(doc["transaction"], 0) + 1
        applies.append((t0, t1, which))
        assert t1 - loop_start < LOOP_BUDGET, f"only {i} applies in {LOOP_BUDGET} s: {_fmt([e - s for s, e, _ in applies])}"
        if i % CHECK_HELD_EVERY == 0:
            assert [h.request() for h in held] == pinned, f"after apply #{i}"
    loop_end = time.monotonic()
    assert [h.request() for h in held] == pinned
    forked.close()

    # Keep the load on a little after the last apply, then stop it.
    load.wait_records(lambda r: sum(x["t0"] > loop_end for x in r) >= 50, 10, "50 connections after the loop")
    summary = load.stop()
    for h in held:
        h.close()

    recs = load.records
    failed = load.failures
    during = [r for r in recs if loop_start <= r["t0"] <= loop_end]
    print(f"\n100 re-applies under load: {summary['attempted']} connections attempted, {len(failed)} failed "
          f"({len(during)} started during the {loop_end - loop_start:.1f} s of applies), backends {summary['backends']}")
    print(f"apply, wall: {len(took['cli'])} plain `python -m nftlb apply`: {_fmt(took['cli'])}; "
          f"{len(took['forked'])} forked from an imported nftlb: {_fmt(took['forked'])}; all 100: "
          f"{_fmt(took['cli'] + took['forked'])}")
    print(f"nftlb's own timing: median {statistics.median(nftlb_said) * 1000:.0f} ms, "
          f"max {max(nftlb_said) * 1000:.0f}; transactions {kinds}")
    print(f"held connections {pinned}: {APPLIES // CHECK_HELD_EVERY + 2} requests each during/after the loop, "
          f"all on their backend")

    assert not failed, f"{len(failed)} failed connections, e.g. {failed[:5]}"
    assert recs[0]["t0"] < loop_start and recs[-1]["t1"] > loop_end  # the load covered every apply
    assert len(during) >= 0.5 * LOAD_RATE * (loop_end - loop_start), len(during)  # the pace held, roughly

    # Each connection reached a backend of a file that may have been live during it: the file
    # settled when it started, or the old or new file of any apply overlapping it. So a removed
    # backend (b1 in "b1 removed", b4 outside "b4 added") never got a new connection.
    starts, ends = [s for s, _, _ in applies], [e for _, e, _ in applies]
    live = [0] + [w for _, _, w in applies]  # live[k]: the file live after k applies
    wrong = []
    for r in recs:
        first = bisect.bisect_right(ends, r["t0"])  # applies done when it started
        last = bisect.bisect_left(starts, r["t1"])  # applies begun before it ended (sequential)
        allowed = set().union(*(CYCLE[live[k]][2] for k in range(first, max(first, last) + 1)))
        if r["backend"] not in allowed:
            wrong.append((r, sorted(allowed)))
    assert not wrong, f"{len(wrong)} connections reached a backend not in the pool, e.g. {wrong[:3]}"
    assert {"b1", "b4"} <= set(summary["backends"])
    print(f"test 1 took {time.monotonic() - started:.1f} s")


# --------------------------------------------------------------------------------------------
# 2. A backend killed under load

MARGIN = 0.5  # seconds after the "down" line for connections already in flight


def test_backend_killed_under_load_fails_only_its_connections_until_down(lab, tmp_path):
    started = time.monotonic()
    gw = Gateway(lab, tmp_path)
    f = gw.write("seed: 0x5eed\n" + HEALTH + "pools:\n" + pool("web", [B["b1"], B["b2"], B["b3"]]))
    watcher = TimedWatch(gw, f)
    watcher.saw("watching 3 backends in 1 pools")

    def predicted(sport: int, state_dir=None) -> str:
        backend = explain.pool(f, "web", state_dir, client=(CLIENT, sport))["client"]["backend"]
        return NAME[backend.rsplit(":", 1)[0]]

    # The in-process prediction is the CLI's: one spot check of `nftlb explain --json`.
    cli = json.loads(gw.nftlb("explain", f, "web", "--client", f"{CLIENT}:12345", "--json").stdout)
    assert NAME[cli["client"]["backend"].split(":")[0]] == predicted(12345)

    load = Load(lab, seconds=15, max_connections=30000, first_sport=10000)
    load.wait_records(lambda r: len(r) >= 200, 10, "200 connections before the kill")
    victim = lab.backend("b2")
    kill_start = time.monotonic()
    lab.stop_server(victim)
    kill_end = time.monotonic()
    down = watcher.when(f"pool web backend {victim.ipv4}:8080 down after {FALL} failures")
    committed = watcher.when("committed pools web")
    # Then a while more of load with b2 out.
    load.wait_records(lambda r: sum(x["t0"] > down + MARGIN for x in r) >= 300, 10,
                      "300 connections after the down line + margin")
    summary = load.stop()
    assert watcher.stop() == 0

    recs, failed = load.records, load.failures
    before = [r for r in recs if r["t1"] < kill_start]
    after = [r for r in recs if r["t0"] > down + MARGIN]
    window = len(recs) - len(before) - len(after)
    early = [r for r in failed if r["t1"] < kill_start]
    late = [r for r in failed if r["t0"] > down + MARGIN]
    not_b2 = [r for r in failed if predicted(r["sport"]) != "b2"]
    print(f"\nbackend killed under load: {summary['attempted']} connections attempted, {len(failed)} failed "
          f"({len(failed) - len(not_b2)} of them predicted to b2), backends {summary['backends']}")
    print(f"detection: 'down' logged {down - kill_start:.2f} s after the kill (server stopped within "
          f"{kill_end - kill_start:.2f} s; bound {FALL * INTERVAL + PROBE_TIMEOUT:.2f} s), committed "
          f"{(committed - down) * 1000:.0f} ms later; failures outside [kill, down + {MARGIN}s]: "
          f"{len(early) + len(late)}")
    print(f"connections: {len(before)} before the kill, {window} in the window, {len(after)} after; "
          f"failed ones by error: {_by_error(failed)}")
    if failed:
        print(f"failures from {min(r['t0'] for r in failed) - kill_start:+.3f} s to "
              f"{max(r['t1'] for r in failed) - kill_start:+.3f} s after the kill")

    assert not early, f"failures before the kill: {early[:5]}"
    assert not late, f"failures after the down line + {MARGIN}s: {late[:5]}"
    assert not not_b2, f"failed connections that hash to another backend: {not_b2[:5]}"
    assert failed, "killing b2 under load failed no connection at all: was the load running?"
    assert len(before) >= 200 and len(after) >= 300

    # The kernel picked what explain predicts: before the kill from the full table; and after it
    # (b2 down in the watcher's health view), b2's slots are shared out and nobody else moves.
    assert all(r["backend"] == predicted(r["sport"]) for r in before if "backend" in r)
    moved = [r for r in after if r.get("backend") != predicted(r["sport"], gw.state)]
    assert not moved, f"connections after the down not where explain (with health) says: {moved[:5]}"
    moved_anyway = [r for r in after if predicted(r["sport"]) != "b2" and r["backend"] != predicted(r["sport"])]
    assert not moved_anyway, f"connections not hashing to b2 moved anyway: {moved_anyway[:5]}"
    assert "b2" not in {r["backend"] for r in after}
    print(f"test 2 took {time.monotonic() - started:.1f} s")


def _by_error(records: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in records:
        kind = r["error"].split(":")[0]
        out[kind] = out.get(kind, 0) + 1
    return out
