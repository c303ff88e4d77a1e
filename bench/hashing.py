#!/usr/bin/env python3
"""Hashing benchmark for nftlb: balance and disruption of `scheduler: hash` on the live kernel.

    client ns ----veth---- gw ns ----veth---- backend ns
    192.0.2.2              192.0.2.1          10.0.0.2, and 10.0.1.1 .. 10.0.1.100 on lo
                           10.0.0.1           ONE server on 0.0.0.0:8080 that answers every
                           nftlb / plain nft  connection with the address it was reached at
                           VIP 198.51.100.10:80

For N = 3, 10 and 100 backends (one pool, scheduler hash, default table size, seed 0x5eed),
K flows (TCP connections from the fixed source ports 20000 .. 20000+K-1, one each) measure:

  balance        flows per backend, max/mean, next to the table's own shares (`nftlb explain --json`)
  drain          `nftlb drain web B` (the same table change as the health watcher makes), gw conntrack
                 flushed, the same K 4-tuples again: the fraction whose backend changed (target 1/N + 1pp)
  enable         `nftlb enable web B`, the K flows again: the fraction back on their first backend
  config         re-apply the file without B: the fraction whose backend changed
  plain mod N    nftlb's table removed; a table of ours with the naive rule
                 `dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod N seed 0x5eed map {...}`,
                 then `mod N-1` without B: the fraction whose backend changed

Every measurement is also predicted flow by flow from the slot map the kernel holds (read back with
`nft -j list map`) and the kernel's jhash (nftlb.maglev): the report says how many flows agree.

Run as root:  /work/main/.venv/bin/python bench/hashing.py [--flows K] [--json PATH]

Nothing is changed in the root network namespace.  Every namespace is named nlbhash<pid>-... and is
deleted at the end (finally + atexit + SIGTERM/SIGINT/SIGHUP handlers); every process started is
killed; every wait is bounded.  The client and server halves (`_client`, `_server` below) are stdlib
only and run inside the namespaces with this same interpreter.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import time

# ======================================================================= peers (stdlib only)


def peer_server(port: int) -> int:
    """Accept forever; answer each connection with its local address (the backend's identity).

    The server writes its answer and closes.  The client never sends a FIN: it resets the
    connection (SO_LINGER 0) once it has the answer, so the server's socket dies on that RST in
    FIN_WAIT and neither side keeps a TIME_WAIT socket for the 4-tuple (see bench/README.md).
    """
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = ls.accept()
        try:
            conn.sendall(conn.getsockname()[0].encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()


def peer_client(vip: str, port: int, first: int, count: int, window: int, timeout: float) -> int:
    """One TCP connection from each source port first .. first+count-1, `window` in flight.

    Prints one JSON line per flow, [sport, backend address or null, error or null], then
    {"done": seconds}.  A connection is reset (SO_LINGER 0) as soon as its answer is read.
    """
    sel = selectors.DefaultSelector()
    linger0 = struct.pack("ii", 1, 0)
    pending: dict[int, list] = {}  # fd -> [sock, sport, started, buffer]
    lines: list[str] = []
    t_start = time.monotonic()

    def finish(entry: list, backend, error) -> None:
        sock = entry[0]
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        pending.pop(sock.fileno(), None)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        except OSError:
            pass
        sock.close()
        lines.append(json.dumps([entry[1], backend, error]))

    nxt, end = first, first + count
    last_sweep = time.monotonic()
    while nxt < end or pending:
        while nxt < end and len(pending) < window:
            sport, nxt = nxt, nxt + 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind(("0.0.0.0", sport))
                err = sock.connect_ex((vip, port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                sock.close()
                lines.append(json.dumps([sport, None, f"{type(exc).__name__}: {exc}"]))
                continue
            entry = [sock, sport, time.monotonic(), b""]
            pending[sock.fileno()] = entry
            sel.register(sock, selectors.EVENT_READ, entry)
        for key, _ in sel.select(timeout=0.1):
            entry = key.data
            try:
                data = entry[0].recv(256)
            except OSError as exc:
                finish(entry, None, f"{type(exc).__name__}: {exc}")
                continue
            if not data:
                finish(entry, None, "closed before the answer")
                continue
            entry[3] += data
            if b"\n" in entry[3]:
                finish(entry, entry[3].split(b"\n", 1)[0].decode(errors="replace"), None)
        now = time.monotonic()
        if now - last_sweep > 0.1:
            last_sweep = now
            for entry in [e for e in pending.values() if now - e[2] > timeout]:
                finish(entry, None, f"timeout after {timeout}s")
    lines.append(json.dumps({"done": round(time.monotonic() - t_start, 3)}))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("_server", "_client"):
    if sys.argv[1] == "_server":
        sys.exit(peer_server(int(sys.argv[2])))
    a = sys.argv[2:]
    sys.exit(peer_client(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), float(a[5])))

# ======================================================================= orchestration

import argparse  # noqa: E402
import datetime  # noqa: E402
import ipaddress  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from fractions import Fraction  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # nftlb.maglev: the kernel's jhash, for the flow-by-flow prediction
import sandbox  # noqa: E402  (bench/sandbox.py: namespaces, processes, cleanup)
from sandbox import BenchError, delete_namespaces, list_netns, log, nsexec  # noqa: E402

from nftlb import maglev  # noqa: E402

NFT = shutil.which("nft") or "/usr/sbin/nft"
CONNTRACK = shutil.which("conntrack") or "/usr/sbin/conntrack"
SS = shutil.which("ss") or "/usr/bin/ss"
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"
PY = sys.executable  # the venv's python: runs nftlb, and the stdlib peers above

PREFIX = sandbox.init("nlbhash")  # nlbhash<pid>-
PINNED_FACTOR = 200  # pinned table_size: about 200 slots per backend (Maglev rebuilds move ~1/N + 1pp from there)
CLIENT_ADDR, GW_CLIENT_ADDR = "192.0.2.2", "192.0.2.1"
GW_BACKEND_ADDR, BACKEND_HOST_ADDR = "10.0.0.1", "10.0.0.2"
VIP, PORT, BPORT = "198.51.100.10", 80, 8080
SEED = 0x5EED
POOL = "web"
PLAIN_TABLE = "nlbhash_plain"  # ip family table of ours for the plain `jhash mod N` rule
MAX_BACKENDS = 250
NOISE_REPS = 200


def backend_addr(i: int) -> str:  # 1-based
    return f"10.0.1.{i}"


# ----------------------------------------------------------------------- the lab
class Lab:
    def __init__(self, nbackends: int, tmp: str):
        self.client, self.gw, self.be = PREFIX + "client", PREFIX + "gw", PREFIX + "be"
        self.tmp = tmp
        self.state = os.path.join(tmp, "state")
        self.server: subprocess.Popen | None = None
        sandbox.add_namespaces([self.client, self.gw, self.be])
        sandbox.ip_batch(self.gw, [
            "link set lo up",
            f"link add c0 type veth peer name eth0 netns {self.client}",
            f"link add g0 type veth peer name eth0 netns {self.be}",
            f"addr add {GW_CLIENT_ADDR}/24 dev c0", f"addr add {GW_BACKEND_ADDR}/24 dev g0",
            "link set c0 up", "link set g0 up",
            f"route add 10.0.1.0/24 via {BACKEND_HOST_ADDR} dev g0",
        ])
        sandbox.ip_batch(self.client, ["link set lo up", f"addr add {CLIENT_ADDR}/24 dev eth0",
                                       "link set eth0 up", f"route add default via {GW_CLIENT_ADDR} dev eth0"])
        sandbox.ip_batch(self.be, ["link set lo up", f"addr add {BACKEND_HOST_ADDR}/24 dev eth0", "link set eth0 up",
                                   f"route add default via {GW_BACKEND_ADDR} dev eth0"]
                         + [f"addr add {backend_addr(i)}/32 dev lo" for i in range(1, nbackends + 1)])
        # sysctls: only inside our namespaces
        nsexec(self.gw, SYSCTL, "-q", "-w", "net.ipv4.ip_forward=1", timeout=10)
        nsexec(self.be, SYSCTL, "-q", "-w", "net.core.somaxconn=4096", "net.ipv4.tcp_max_syn_backlog=4096",
               timeout=10)
        sandbox.wait_carrier([self.client, self.gw, self.be])

    def start_server(self, timeout: float = 10.0) -> None:
        proc = sandbox.popen(self.be, [PY, os.path.abspath(__file__), "_server", BPORT],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.server = proc
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        if line != "ready":
            err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else "(still running)"
            raise BenchError(f"server did not report ready within {timeout}s: {line!r} {err}")

    # -- nftlb, nft, conntrack in gw
    def nftlb(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        return nsexec(self.gw, PY, "-m", "nftlb", *args, "--state-dir", self.state, timeout=timeout, cwd=REPO)

    def explain(self, path: str) -> dict:
        return json.loads(self.nftlb("explain", path, POOL, "--json").stdout)

    def nft(self, *args, input: str | None = None) -> str:
        return nsexec(self.gw, NFT, *args, input=input, timeout=30).stdout

    def live_slots(self) -> list[str]:
        """nftlb's slot table for VIP:PORT as the kernel holds it: slot -> backend address."""
        doc = json.loads(self.nft("-j", "list", "map", "inet", "nftlb", "slots4_tcp"))
        elems = next(x["map"] for x in doc["nftables"] if "map" in x).get("elem", [])
        slots = {}
        for key, value in elems:
            k = key["concat"] if isinstance(key, dict) else key
            v = value["concat"] if isinstance(value, dict) else value
            if k[0] == VIP and int(k[1]) == PORT:
                slots[int(k[2])] = v[0] if isinstance(v, list) else v
        if sorted(slots) != list(range(len(slots))):
            raise BenchError(f"slot map of {VIP}:{PORT} is not 0..S-1: {sorted(slots)[:10]}...")
        return [slots[i] for i in range(len(slots))]

    def load_plain(self, addrs: list[str]) -> None:
        """The naive ruleset: one jhash mod N rule in a table of ours (replaced in one transaction)."""
        n = len(addrs)
        elems = ", ".join(f"{i} : {a}" for i, a in enumerate(addrs))
        self.nft("-f", "-", input=(
            f"table ip {PLAIN_TABLE} {{}}\ndelete table ip {PLAIN_TABLE}\n"
            f"table ip {PLAIN_TABLE} {{\n"
            "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {VIP} tcp dport {PORT} dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport "
            f"mod {n} seed {SEED:#x} map {{ {elems} }} : {BPORT}\n  }}\n}}\n"))

    def drop_plain(self) -> None:
        self.nft("-f", "-", input=f"table ip {PLAIN_TABLE} {{}}\ndelete table ip {PLAIN_TABLE}\n")

    def flush_conntrack(self, timeout: float = 5.0) -> int:
        """conntrack -F in gw (only gw's table), then wait (bounded) until it is empty.

        Returns how many entries gw held before: the previous measurement's K flows."""
        before = int(nsexec(self.gw, CONNTRACK, "-C", timeout=10).stdout.strip() or 0)
        nsexec(self.gw, CONNTRACK, "-F", timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            count = int(nsexec(self.gw, CONNTRACK, "-C", timeout=10).stdout.strip() or 0)
            if count == 0:
                return before
            if time.monotonic() > deadline:
                raise BenchError(f"gw conntrack still holds {count} entries {timeout}s after conntrack -F")
            nsexec(self.gw, CONNTRACK, "-F", timeout=30)
            time.sleep(0.05)  # polling interval of a bounded wait

    def time_wait(self) -> dict:
        return {name: len(nsexec(ns, SS, "-Htan", "state", "time-wait", timeout=10).stdout.splitlines())
                for name, ns in (("client", self.client), ("backends", self.be))}

    def connect_all(self, first: int, count: int, window: int, timeout: float) -> tuple[dict, dict]:
        """The K flows from the client ns: {sport: backend or None}, plus run info."""
        bound = 30 + count * timeout / max(1, window) * 2 + count / 200
        cp = nsexec(self.client, PY, os.path.abspath(__file__), "_client", VIP, PORT, first, count, window, timeout,
                    timeout=bound)
        got: dict[int, str | None] = {}
        errors: dict[str, int] = {}
        seconds = None
        for line in cp.stdout.splitlines():
            rec = json.loads(line)
            if isinstance(rec, dict):
                seconds = rec["done"]
                continue
            sport, backend, error = rec
            got[sport] = backend
            if error:
                kind = re.sub(r"\d+", "#", error)[:120]
                errors[kind] = errors.get(kind, 0) + 1
        if seconds is None or len(got) != count:
            raise BenchError(f"client: {len(got)} of {count} flows reported; stderr {cp.stderr[-1000:]}")
        return got, {"seconds": seconds, "errors": errors}

    def teardown(self) -> None:
        if self.server is not None:
            sandbox.stop_proc(self.server)
            self.server = None
        left = delete_namespaces([self.client, self.gw, self.be])
        if left:
            raise BenchError(f"could not delete namespaces {left}")


# ----------------------------------------------------------------------- arithmetic
def moved_between(t1: list[str], t2: list[str]) -> float:
    """Exact share of uniformly random hashes whose backend differs between two slot tables.

    A hash h picks slot (h * S) >> 32 of a table of S slots, so slot i of table 1 covers
    [i/S1, (i+1)/S1) of the hash range.  Merging both tables' boundaries gives the exact measure.
    """
    s1, s2 = len(t1), len(t2)
    cuts = sorted({Fraction(i, s1) for i in range(s1 + 1)} | {Fraction(j, s2) for j in range(s2 + 1)})
    moved = Fraction(0)
    for lo, hi in zip(cuts, cuts[1:]):
        mid = (lo + hi) / 2
        if t1[int(mid * s1)] != t2[int(mid * s2)]:
            moved += hi - lo
    return float(moved)


def table_max_mean(slots: list[str], active: int) -> float:
    counts: dict[str, int] = {}
    for s in slots:
        counts[s] = counts.get(s, 0) + 1
    return max(counts.values()) / (len(slots) / active)


def chi2_p(x: float, k: int) -> float:
    """Upper tail of chi-square with k dof (Wilson-Hilferty approximation)."""
    if k <= 0:
        return 1.0
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def balance(flows: dict[int, str | None], backends: list[str], table_shares: dict[str, float]) -> dict:
    ok = [b for b in flows.values() if b is not None]
    counts = {b: 0 for b in backends}
    for b in ok:
        counts[b] = counts.get(b, 0) + 1
    mean = len(ok) / len(backends)
    chi2 = sum((counts[b] - len(ok) * p) ** 2 / (len(ok) * p) for b, p in table_shares.items() if p > 0)
    return {"counts": counts, "max_mean": max(counts.values()) / mean if mean else 0.0,
            "min_mean": min(counts.values()) / mean if mean else 0.0,
            "chi2": round(chi2, 2), "chi2_dof": sum(1 for p in table_shares.values() if p > 0) - 1,
            "chi2_p": round(chi2_p(chi2, sum(1 for p in table_shares.values() if p > 0) - 1), 4),
            "foreign_backends": sorted(set(counts) - set(backends))}


def noise_max_mean(table_shares: dict[str, float], k: int, reps: int = NOISE_REPS) -> dict:
    """max/mean of k flows drawn at random with exactly the table's shares: sampling noise alone."""
    rng = random.Random(SEED)
    names = list(table_shares)
    cum, acc = [], 0.0
    for n in names:
        acc += table_shares[n]
        cum.append(acc)
    vals = []
    for _ in range(reps):
        counts = dict.fromkeys(names, 0)
        for b in rng.choices(names, cum_weights=cum, k=k):
            counts[b] += 1
        vals.append(max(counts.values()) / (k / len(names)))
    vals.sort()
    return {"median": vals[len(vals) // 2], "p95": vals[int(len(vals) * 0.95)], "reps": reps}


def flow_hashes(first: int, count: int) -> dict[int, int]:
    """The kernel's jhash of each flow's 4-tuple (as `jhash ip saddr . tcp sport . ip daddr . tcp dport`).

    maglev.slot(size) is (jhash * size) >> 32, so size 2**32 returns the hash itself."""
    return {p: maglev.slot("hash", SEED, 1 << 32, CLIENT_ADDR, p, VIP, PORT) for p in range(first, first + count)}


def predict(hashes: dict[int, int], slots: list[str]) -> dict[int, str]:
    s = len(slots)
    return {p: slots[(h * s) >> 32] for p, h in hashes.items()}


def compare(a: dict, b: dict) -> dict:
    both = [p for p in a if a[p] is not None and b.get(p) is not None]
    moved = sum(1 for p in both if a[p] != b[p])
    return {"flows": len(both), "moved": moved, "fraction": moved / len(both) if both else float("nan")}


# ----------------------------------------------------------------------- one N
class Runner:
    def __init__(self, lab: Lab, args, hashes: dict[int, int]):
        self.lab, self.args, self.hashes = lab, args, hashes
        self.total_connections = 0
        self.total_failed = 0

    def measure(self, label: str, predicted_slots: list[str]) -> dict:
        lab, a = self.lab, self.args
        flushed = lab.flush_conntrack()
        flows, info = lab.connect_all(a.first_sport, a.flows, a.window, a.timeout)
        failed = sum(1 for b in flows.values() if b is None)
        self.total_connections += len(flows)
        self.total_failed += failed
        pred = predict(self.hashes, predicted_slots)
        mismatch = sum(1 for p, b in flows.items() if b is not None and b != pred[p])
        rec = {"label": label, "seconds": info["seconds"], "conn_per_s": round(len(flows) / info["seconds"]),
               "failed": failed, "errors": info["errors"], "conntrack_entries_flushed_before": flushed,
               "predicted_mismatch": mismatch, "time_wait_after": lab.time_wait(), "flows": flows}
        log(f"    {label:<26} {len(flows) - failed}/{len(flows)} ok in {info['seconds']:.1f}s "
            f"({rec['conn_per_s']}/s), {mismatch} differ from the prediction"
            + (f", errors {info['errors']}" if info["errors"] else ""))
        if failed > 0.005 * len(flows):
            raise BenchError(f"{label}: {failed} of {len(flows)} connections failed (> 0.5%): {info['errors']}")
        return rec

    def run_n(self, n: int) -> dict:
        lab, tmp = self.lab, self.lab.tmp
        addrs = [backend_addr(i) for i in range(1, n + 1)]
        names = [f"{a}:{BPORT}" for a in addrs]
        full = self._write(f"pools-{n}.yaml", names)
        t0 = time.monotonic()
        lab.nftlb("apply", full)
        apply_s = time.monotonic() - t0
        ex = lab.explain(full)
        if ex["kind"] != "hash":
            raise BenchError(f"pool kind {ex['kind']!r}, expected hash")
        size = ex["table_size"]
        tshares = {r["backend"].rsplit(":", 1)[0]: r["share"] for r in ex["backends"]}
        slots_full = lab.live_slots()
        kshares = {a: slots_full.count(a) / len(slots_full) for a in addrs}
        if len(slots_full) != size or any(abs(kshares[a] - tshares[a]) > 1e-12 for a in addrs):
            raise BenchError(f"explain and the kernel's slot map disagree (sizes {size} / {len(slots_full)})")
        # the backend that goes: the largest share (worst case for a drain), lowest address on ties
        victim = max(sorted(addrs, key=ipaddress.ip_address), key=lambda x: tshares[x])
        vname = f"{victim}:{BPORT}"
        log(f"N={n}: table {size} slots (explain), apply {apply_s:.2f}s, drained/removed backend {vname}")

        ms = {}
        ms["base"] = self.measure("nftlb", slots_full)

        lab.nftlb("drain", POOL, vname)
        ex_drain = lab.explain(full)
        slots_drain = lab.live_slots()
        ms["drain"] = self.measure(f"nftlb, {victim} drained", slots_drain)

        lab.nftlb("enable", POOL, vname)
        slots_back = lab.live_slots()
        ms["enable"] = self.measure(f"nftlb, {victim} enabled", slots_back)

        less = self._write(f"pools-{n}-without.yaml", [x for x in names if x != vname])
        lab.nftlb("apply", less)
        ex_less = lab.explain(less)
        slots_less = lab.live_slots()
        ms["config"] = self.measure(f"nftlb, {victim} removed", slots_less)

        # the same removal with table_size pinned at about PINNED_FACTOR x N slots in both files:
        # what an operator who pins the size gets (Maglev's rebuild disruption falls with M/N)
        pinned = next(m for m in range(PINNED_FACTOR * n, 10 * PINNED_FACTOR * n) if maglev.is_prime(m))
        lab.nftlb("apply", self._write(f"pools-{n}-pinned.yaml", names, pinned))
        slots_pinned = lab.live_slots()
        ms["pinned"] = self.measure(f"nftlb, {pinned} slots", slots_pinned)
        lab.nftlb("apply", self._write(f"pools-{n}-pinned-without.yaml", [x for x in names if x != vname], pinned))
        slots_pinned_less = lab.live_slots()
        ms["pinned_config"] = self.measure(f"nftlb, {pinned} slots, {victim} removed", slots_pinned_less)

        lab.nftlb("remove")
        lab.load_plain(addrs)
        ms["plain"] = self.measure(f"plain mod {n}", addrs)
        plain_less = [x for x in addrs if x != victim]
        lab.load_plain(plain_less)
        ms["plain_less"] = self.measure(f"plain mod {n - 1}", plain_less)
        lab.drop_plain()

        base = ms["base"]["flows"]
        bal = balance(base, addrs, tshares)
        drain = compare(base, ms["drain"]["flows"])
        on_victim = [p for p, b in base.items() if b == victim]
        extra = sum(1 for p, b in base.items() if b not in (None, victim) and ms["drain"]["flows"].get(p) not in (None, b))
        back = compare(base, ms["enable"]["flows"])
        config = compare(base, ms["config"]["flows"])
        config_extra = sum(1 for p, b in base.items()
                           if b not in (None, victim) and ms["config"]["flows"].get(p) not in (None, b))
        plain = compare(ms["plain"]["flows"], ms["plain_less"]["flows"])
        pinned_config = compare(ms["pinned"]["flows"], ms["pinned_config"]["flows"])
        target = 1 / n + 0.01
        failed = sum(m["failed"] for m in ms.values())
        conns = sum(len(m["flows"]) for m in ms.values())
        back_fraction = 1 - back["fraction"]
        res = {
            "n": n, "table_size": size, "table_size_without": ex_less["table_size"], "apply_seconds": round(apply_s, 3),
            "victim": vname,
            "table": {"max_mean": max(tshares.values()) * n, "shares": tshares,  # from explain
                      "slots": {r["backend"]: r["slots"] for r in ex["backends"]},
                      "drained_shares": {r["backend"]: r["share"] for r in ex_drain["backends"]},
                      "drained_max_mean": table_max_mean(slots_drain, n - 1)},
            "measured": {**bal, "noise_only": noise_max_mean(tshares, len([b for b in base.values() if b]))},
            "plain_balance": balance(ms["plain"]["flows"], addrs, {a: 1 / n for a in addrs}),
            "drain": {**drain, "on_victim_before": len(on_victim), "moved_not_from_victim": extra,
                      "table_exact": moved_between(slots_full, slots_drain)},
            "enable": {"flows": back["flows"], "back": back["flows"] - back["moved"], "fraction_back": back_fraction,
                       "table_exact_back": 1 - moved_between(slots_full, slots_back)},
            "config": {**config, "moved_not_from_victim": config_extra,
                       "table_exact": moved_between(slots_full, slots_less)},
            "pinned_config": {**pinned_config, "table_size": pinned,
                              "table_exact": moved_between(slots_pinned, slots_pinned_less)},
            "plain_mod": {**plain, "table_exact": moved_between(addrs, plain_less)},
            "target": target,
            "pass": drain["fraction"] <= target and back_fraction == 1.0,
            "connections": conns, "failed": failed,
            "prediction_mismatch": sum(m["predicted_mismatch"] for m in ms.values()),
            "measurements": {k: {kk: vv for kk, vv in v.items() if kk != "flows"} for k, v in ms.items()},
        }
        return res

    def _write(self, name: str, backends: list[str], table_size: int | None = None) -> str:
        path = os.path.join(self.lab.tmp, name)
        size = f"    table_size: {table_size}\n" if table_size else ""
        with open(path, "w") as f:
            f.write(f"# generated by bench/hashing.py\nseed: {SEED:#x}\npools:\n  - name: {POOL}\n"
                    f"    vip: {VIP}\n    port: {PORT}\n    protocol: tcp\n    scheduler: hash\n{size}    backends:\n")
            f.writelines(f"      - {b}\n" for b in backends)
        return path


# ----------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def report(results: list[dict], k: int) -> str:
    out = []
    for r in results:
        n, t, m = r["n"], r["table"], r["measured"]
        out.append(f"\nN = {n} backends: table {r['table_size']} slots (seed {SEED:#x}), K = {k} flows, "
                   f"the backend that goes: {r['victim']}")
        if n <= 10:
            out.append(f"  {'backend':<16} {'slots':>5} {'table share':>11} {'measured':>9}")
            ok = sum(m["counts"].values())
            for b, s in sorted(t["slots"].items(), key=lambda kv: ipaddress.ip_address(kv[0].rsplit(':', 1)[0])):
                a = b.rsplit(":", 1)[0]
                out.append(f"  {b:<16} {s:>5} {pct(t['shares'][a]):>11} {pct(m['counts'][a] / ok):>9}")
        else:
            hist: dict[int, int] = {}
            for s in t["slots"].values():
                hist[s] = hist.get(s, 0) + 1
            counts = sorted(m["counts"].values())
            out.append("  table: " + ", ".join(f"{c} backends with {s} slot{'s' if s > 1 else ''}"
                                               for s, c in sorted(hist.items()))
                       + f"; measured flows per backend: min {counts[0]}, median {counts[len(counts) // 2]}, "
                         f"max {counts[-1]}")
        nz = m["noise_only"]
        out.append(f"  max/mean: table {t['max_mean']:.3f}, measured {m['max_mean']:.3f} "
                   f"(sampling noise alone, {nz['reps']} draws of K from the table's shares: median "
                   f"{nz['median']:.3f}, 95th pct {nz['p95']:.3f}; chi2 vs table p = {m['chi2_p']:.2f})")
        d, c, pm = r["drain"], r["config"], r["plain_mod"]
        sigma = math.sqrt(d["table_exact"] * (1 - d["table_exact"]) / max(1, d["flows"]))
        out.append(f"  drain:  moved {pct(d['fraction'])} (table-exact {pct(d['table_exact'])}, sampling sd "
                   f"{100 * sigma:.2f}pp; {d['moved_not_from_victim']} flows moved that were not on {r['victim']}); "
                   f"target {pct(r['target'])}: {'PASS' if r['pass'] else 'FAIL'}")
        out.append(f"  enable: back {pct(r['enable']['fraction_back'])}")
        out.append(f"  config: moved {pct(c['fraction'])} (table-exact {pct(c['table_exact'])}; table "
                   f"{r['table_size']} -> {r['table_size_without']} slots; {c['moved_not_from_victim']} flows "
                   f"moved that were not on {r['victim']})")
        pc = r["pinned_config"]
        out.append(f"  config, table_size pinned at {pc['table_size']}: moved {pct(pc['fraction'])} "
                   f"(table-exact {pct(pc['table_exact'])}); target {pct(r['target'])}")
        out.append(f"  plain jhash mod {n} -> mod {n - 1}: moved {pct(pm['fraction'])} "
                   f"(table-exact {pct(pm['table_exact'])}); plain mod {n} max/mean "
                   f"{r['plain_balance']['max_mean']:.3f}")
        out.append(f"  kernel vs prediction: {r['prediction_mismatch']} of {r['connections']} flows differ; "
                   f"failed connections {r['failed']} of {r['connections']}")
    head = ["N", "table max/mean", "measured max/mean", "drain moved", "(table)", "back", "config moved",
            "pinned M", "config moved", "plain mod moved", "target 1/N+1pp", "disruption", "failed"]
    rows = [[str(r["n"]), f"{r['table']['max_mean']:.3f}", f"{r['measured']['max_mean']:.3f}",
             pct(r["drain"]["fraction"]), pct(r["drain"]["table_exact"]), pct(r["enable"]["fraction_back"]),
             pct(r["config"]["fraction"]), str(r["pinned_config"]["table_size"]),
             pct(r["pinned_config"]["fraction"]),
             pct(r["plain_mod"]["fraction"]), pct(r["target"]), "PASS" if r["pass"] else "FAIL",
             f"{r['failed']}/{r['connections']}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    out.append("")
    out.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    out.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
    return "\n".join(out)


# ----------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=20000, help="K: flows (source ports) per measurement (default 20000)")
    ap.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    ap.add_argument("--backends", default="3,10,100", help="pool sizes N, comma-separated (default 3,10,100)")
    ap.add_argument("--first-sport", type=int, default=20000, help="first client source port (default 20000)")
    ap.add_argument("--window", type=int, default=64, help="connections in flight (default 64)")
    ap.add_argument("--timeout", type=float, default=3.0, help="per-connection timeout in seconds (default 3)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.backends.split(",") if x.strip()]
    if not 1 <= args.flows or args.first_sport < 1024 or args.first_sport + args.flows > 65536:
        ap.error("need 1 <= --flows and 1024 <= --first-sport .. --first-sport + flows - 1 <= 65535")
    if not sizes or any(not 2 <= n <= MAX_BACKENDS for n in sizes):
        ap.error(f"every N must be between 2 and {MAX_BACKENDS}")
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces, nftables)")
    sandbox.catch_signals()

    started = time.monotonic()
    stale = sandbox.stale_namespaces()
    if stale:
        log(f"deleting namespaces left by a dead earlier run: {stale}")
        delete_namespaces(stale)
    tmp = sandbox.mkdtemp()
    results: list[dict] = []
    error = None
    lab = None
    runner = None
    try:
        t0 = time.monotonic()
        hashes = flow_hashes(args.first_sport, args.flows)
        log(f"jhash of {args.flows} flows computed in {time.monotonic() - t0:.1f}s")
        lab = Lab(max(sizes), tmp)
        lab.start_server()
        runner = Runner(lab, args, hashes)
        for n in sizes:
            results.append(runner.run_n(n))
    except BenchError as exc:
        error = str(exc)
        log(f"\nFAILED: {exc}")
    except KeyboardInterrupt as exc:
        error = f"interrupted ({exc or 'SIGINT'})"
        log(f"\nFAILED: {error}")
    finally:
        sandbox.ignore_signals()  # a second signal must not cut the cleanup short
        if lab is not None:
            try:
                lab.teardown()
            except BenchError as exc:
                log(f"WARNING: {exc}")
        sandbox.cleanup_all()
        left = [ns for ns in list_netns() if ns.startswith(PREFIX)]
        if left:
            log(f"WARNING: namespaces left behind: {left}")
            error = error or f"namespaces left behind: {left}"
    runtime = time.monotonic() - started

    if results:
        print(report(results, args.flows))
    total = runner.total_connections if runner else 0  # including an aborted N
    failed = runner.total_failed if runner else 0
    print(f"\nruntime {runtime:.1f}s; connections {total}, failed {failed}"
          + (f" ({100 * failed / total:.3f}%)" if total else ""))
    ok = error is None and all(r["pass"] for r in results) and (not total or failed <= 0.005 * total) \
        and all(r["prediction_mismatch"] == 0 for r in results)
    if args.json:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "kernel": os.uname().release, "flows": args.flows, "first_sport": args.first_sport,
               "window": args.window, "timeout": args.timeout, "seed": SEED, "vip": f"{VIP}:{PORT}",
               "runtime_seconds": round(runtime, 1), "connections": total, "failed": failed,
               "error": error, "ok": ok, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
    if error is not None:
        return 1
    if not ok:
        print("FAIL: " + "; ".join(
            [f"N={r['n']}: disruption over target or flows did not all come back" for r in results if not r["pass"]]
            + [f"N={r['n']}: {r['prediction_mismatch']} flows not where the kernel's table predicts"
               for r in results if r["prediction_mismatch"]]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
