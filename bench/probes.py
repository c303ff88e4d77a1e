#!/usr/bin/env python3
"""Watcher benchmark: what a probe round costs, plain TCP probes against path probes.

A gateway namespace and one backend namespace holding --backends addresses (10.0.1.x and up,
one TCP listener on 0.0.0.0:8080 that accepts and closes). nftlb applies one pool per four
backends with `health: path` (its table SNATs the path probes), then the watcher's own
probe_round() probes every backend, --rounds times with plain probes and --rounds times with
path probes, alternating. The table shows the median wall time and CPU time (of the watcher's
process) per round, and the ratio path/plain; the target is at most 2.

    sudo .venv/bin/python bench/probes.py [--backends 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
from pathlib import Path

import sandbox  # bench/sandbox.py: namespaces, cleanup

ROOT = Path(__file__).resolve().parent.parent
PREFIX = sandbox.init("nlbpr")

LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(4096)
    print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.close()
""")

# Runs inside the gateway: the watcher's probe rounds, timed. argv: state dir, rounds.
ROUNDS = textwrap.dedent("""
    import asyncio, json, statistics, sys, time
    from nftlb import kernel, probes
    from nftlb.watch import Watcher
    state_dir, rounds = sys.argv[1], int(sys.argv[2])
    nft = kernel.make(None)
    kinds = {"plain": Watcher(nft, state_dir, path_probe=probes.tcp_probe),  # path targets probed plainly
             "path": Watcher(nft, state_dir)}
    out = {k: {"wall": [], "cpu": [], "failed": 0} for k in kinds}
    for _ in range(rounds):
        for kind, w in kinds.items():
            keys = list(w.targets)
            wall, cpu = time.monotonic(), time.process_time()
            asyncio.run(w.probe_round(keys))
            out[kind]["wall"].append(time.monotonic() - wall)
            out[kind]["cpu"].append(time.process_time() - cpu)
            out[kind]["failed"] += sum(not w.records[k].ok for k in keys)
    out["targets"] = len(keys)
    print(json.dumps(out))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    sandbox.catch_signals()
    gw, be = f"{PREFIX}gw", f"{PREFIX}be"
    try:
        sandbox.add_namespaces([gw, be])
        sandbox.ip_batch(gw, ["link set lo up", f"link add b0 type veth peer name eth0 netns {be}",
                              "link set b0 up", "addr add 10.0.0.1/16 dev b0"])
        addrs = [f"10.0.{1 + i // 250}.{1 + i % 250}" for i in range(args.backends)]
        sandbox.ip_batch(be, ["link set lo up", "link set eth0 up", *(f"addr add {a}/16 dev eth0" for a in addrs),
                              "route add default via 10.0.0.1"])
        sandbox.nsexec(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sandbox.wait_carrier([gw, be])
        server = sandbox.popen(be, [sys.executable, "-c", LISTENER], stdout=sandbox.subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise sandbox.BenchError("the backend's listener did not start")
        tmp = Path(sandbox.mkdtemp("files"))
        pools = ["health: {interval: 1s, timeout: 500ms, path: true, path_source: 203.0.113.250}", "pools:"]
        for n in range(0, len(addrs), 4):
            pools += [f"  - name: p{n // 4}", f"    vip: 198.51.{100 + n // 1000}.{(n // 4) % 250 + 1}",
                      f"    port: {80 + n // 1000}", "    backends: [" + ", ".join(f"{a}:8080" for a in addrs[n:n + 4]) + "]"]
        (tmp / "pools.yaml").write_text("\n".join(pools) + "\n")
        state = tmp / "state"
        sandbox.nsexec(gw, sys.executable, "-m", "nftlb", "apply", tmp / "pools.yaml", "--state-dir", state, timeout=120)
        out = json.loads(sandbox.nsexec(gw, sys.executable, "-c", ROUNDS, state, args.rounds, timeout=600,
                                        cwd=ROOT).stdout)
    finally:
        sandbox.ignore_signals()
        sandbox.cleanup_all()

    def median_ms(kind: str, what: str) -> float:
        values = sorted(out[kind][what])
        return 1000 * values[len(values) // 2]

    print(f"probe rounds of {out['targets']} backends, {args.rounds} rounds each, alternating "
          f"({platform.node()}, {platform.machine()}, Python {platform.python_version()})")
    print(f"{'':6} {'wall ms':>8} {'cpu ms':>8} {'failed':>7}")
    for kind in ("plain", "path"):
        print(f"{kind:6} {median_ms(kind, 'wall'):8.1f} {median_ms(kind, 'cpu'):8.1f} {out[kind]['failed']:7d}")
    wall = median_ms("path", "wall") / median_ms("plain", "wall")
    cpu = median_ms("path", "cpu") / median_ms("plain", "cpu")
    print(f"path / plain: wall {wall:.2f}, cpu {cpu:.2f} (target: at most 2)")
    return 0 if out["plain"]["failed"] == out["path"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
