#!/usr/bin/env python3
"""Control-plane benchmark: what a full apply, a one-pool re-apply and a single backend
change cost at scale, next to `nft -f` of the same ruleset and to the ruleset shape that
gives every pool its own chain and map.

Each measurement runs in a fresh network namespace of its own (deleted afterwards), so
nothing is measured against the host's ruleset and no run inherits another's kernel state.
Scenarios run alternately for --rounds rounds; the table shows medians.

    sudo .venv/bin/python bench/controlplane.py [--pools 10000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sandbox  # bench/sandbox.py: namespaces, cleanup

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PREFIX = sandbox.init("nlbcp")  # nlbcp<pid>-


def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=check, timeout=600)


def timed(ns: str, *argv: str, stdin: str | None = None) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (KB) of one command run in namespace `ns`."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as sink:  # not a pipe: a large output must not block the command
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE if stdin else None,
                                stdout=sink, stderr=subprocess.STDOUT, text=True)
        if stdin:
            proc.stdin.write(stdin)
            proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        sink.seek(0)
        out = sink.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:3]} failed in {ns}: {out[-2000:]}")
    return seconds, usage.ru_maxrss, out


class Netns:
    counter = 0

    def __enter__(self) -> str:
        Netns.counter += 1
        self.name = f"{PREFIX}{Netns.counter}"
        sandbox.add_namespaces([self.name])
        return self.name

    def __exit__(self, *exc) -> None:
        sandbox.delete_namespaces([self.name])


def pools_doc(n: int) -> dict:
    """n pools x 4 distinct backends, IPv4, alternating tcp and udp."""
    pools = []
    for i in range(n):
        vip = f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        backends = [f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{4 * (i & 63) + j}:8080" for j in range(4)]
        pools.append({"name": f"p{i}", "vip": vip, "port": 80, "protocol": ("tcp", "udp")[i % 2],
                      "backends": backends})
    return {"seed": 0x5EED, "pools": pools}


def as_yaml(doc: dict) -> str:
    lines = [f"seed: {doc['seed']}", "pools:"]
    for p in doc["pools"]:
        lines.append(f"  - name: {p['name']}\n    vip: {p['vip']}\n    port: {p['port']}\n"
                     f"    protocol: {p['protocol']}\n    backends: [{', '.join(p['backends'])}]")
    return "\n".join(lines) + "\n"


def per_pool_shape(n: int) -> str:
    """The shape nftlb does not use: a chain and a small map per pool, dispatched by a vmap."""
    out = ["table inet shape {", "\tmap services4 {", "\t\ttype ipv4_addr . inet_proto . inet_service : verdict",
           "\t\telements = { " + ",\n\t\t\t".join(
               f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255} . tcp . 80 : goto pool_{i}" for i in range(n)) + " }",
           "\t}", "\tchain pre {", "\t\ttype nat hook prerouting priority dstnat; policy accept;",
           "\t\tip daddr . meta l4proto . th dport vmap @services4", "\t}"]
    for i in range(n):
        out += [f"\tmap pool_{i}_slots {{", "\t\ttypeof numgen inc mod 4 : ip daddr . tcp dport",
                "\t\telements = { " + ", ".join(f"{s} : 10.{64 + (i >> 16)}.{(i >> 8) & 255}.{4 * (i & 63) + s} . 8080"
                                                for s in range(4)) + " }", "\t}",
                f"\tchain pool_{i} {{",
                f"\t\tmeta l4proto tcp dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod 4 seed 0x1 "
                f"map @pool_{i}_slots", "\t}"]
    return "\n".join(out + ["}"]) + "\n"


def nftlb(*args: str) -> list[str]:
    return [PYTHON, "-m", "nftlb", *args]


# In the gateway: what the running watcher does when one backend goes down. Its process has
# read the applied file and planned it already (warm caches); the health view then changes.
WATCHER_TRANSACTION = """
import json, statistics, sys, time
from pathlib import Path
from nftlb import kernel, ops, state
state_dir, down = Path(sys.argv[1]), json.loads(sys.argv[2])  # [[pool, backend], ...]
nft = kernel.make(None)
with state.lock(state_dir):
    ops.refresh(nft, state_dir)  # warm: nothing to change
took = []
for pool, backend_name in down:  # one more backend down each time, as health rounds would report
    health = state.read_doc(state_dir, state.HEALTH) or {"backends": {}}
    health["backends"][f"{pool}|{backend_name}"] = {"up": False}
    state.write_doc(state_dir, state.HEALTH, health)
    started = time.monotonic()
    with state.lock(state_dir):
        r = ops.refresh(nft, state_dir)
    took.append(time.monotonic() - started)
    assert r.changed == [pool] and not r.whole_table, (r.changed, r.whole_table)
print(json.dumps({"seconds": statistics.median(took), "each": took}))
"""


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="nftlb-cp-"))
    doc = pools_doc(args.pools)
    files = {"yaml": work / "pools.yaml", "json": work / "pools.json"}
    files["yaml"].write_text(as_yaml(doc))
    files["json"].write_text(json.dumps(doc))
    changed = json.loads(json.dumps(doc))
    changed["pools"][args.pools // 2]["backends"][0] = "10.255.255.1:8080"  # one pool, one backend swapped
    (work / "changed.json").write_text(json.dumps(changed))
    rendered = subprocess.run(nftlb("render", str(files["json"])), capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout
    shape = per_pool_shape(args.pools)
    elements = sum(1 for line in rendered.splitlines() if " : " in line or line.strip().startswith("elements"))
    results: dict[str, list] = {k: [] for k in ("nft -f (nftlb's ruleset)", "nft -f (chain + map per pool)",
                                                 "apply, YAML file", "apply, JSON file", "re-apply, one pool changed",
                                                 "drain one backend (CLI)", "watcher transaction (one backend down)",
                                                 "status --json (CLI)",
                                                 "peak RSS of apply (MB)")}
    for r in range(args.rounds):
        with Netns() as ns:
            results["nft -f (nftlb's ruleset)"].append(timed(ns, "nft", "-f", "-", stdin=rendered)[0])
        with Netns() as ns:
            results["nft -f (chain + map per pool)"].append(timed(ns, "nft", "-f", "-", stdin=shape)[0])
        for form in ("yaml", "json"):
            with Netns() as ns:
                state = work / f"state-{form}-{r}"
                seconds, rss, out = timed(ns, *nftlb("apply", str(files[form]), "--state-dir", str(state)))
                results[f"apply, {form.upper()} file"].append(seconds)
                results["peak RSS of apply (MB)"].append(rss / 1024)
                if form == "json":
                    seconds, _, out = timed(ns, *nftlb("apply", str(work / "changed.json"), "--state-dir", str(state),
                                                       "--json"))
                    assert json.loads(out)["transaction"] == "1 pools", out[:500]
                    results["re-apply, one pool changed"].append(seconds)
                    pool = changed["pools"][args.pools // 2]
                    seconds, _, out = timed(ns, *nftlb("drain", pool["name"], pool["backends"][1], "--state-dir",
                                                       str(state)))
                    results["drain one backend (CLI)"].append(seconds)
                    seconds, _, out = timed(ns, *nftlb("status", "--json", "--state-dir", str(state)))
                    assert len(json.loads(out)["pools"]) == args.pools
                    results["status --json (CLI)"].append(seconds)
                    n = len(changed["pools"])
                    down = [[changed["pools"][n * k // 6]["name"], changed["pools"][n * k // 6]["backends"][2]]
                            for k in range(1, 6)]
                    _, _, out = timed(ns, PYTHON, "-c", WATCHER_TRANSACTION, str(state), json.dumps(down))
                    results["watcher transaction (one backend down)"].append(json.loads(out)["seconds"])
    subprocess.run(["rm", "-rf", str(work)], check=False)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"pools": args.pools, "rounds": args.rounds, "elements_in_ruleset": elements, "runs": results,
            "median": med,
            "ratios": {
                "apply YAML / nft -f": med["apply, YAML file"] / med["nft -f (nftlb's ruleset)"],
                "apply JSON / nft -f": med["apply, JSON file"] / med["nft -f (nftlb's ruleset)"],
                "nftlb shape / per-pool shape": med["nft -f (nftlb's ruleset)"] / med["nft -f (chain + map per pool)"],
                "drain CLI / full apply (JSON)": med["drain one backend (CLI)"] / med["apply, JSON file"],
                "watcher transaction / full apply (JSON)":
                    med["watcher transaction (one backend down)"] / med["apply, JSON file"],
                "one-pool re-apply / full apply (JSON)": med["re-apply, one pool changed"] / med["apply, JSON file"],
                "status / full apply (JSON)": med["status --json (CLI)"] / med["apply, JSON file"],
            }}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        out = run(args)
    finally:
        sandbox.cleanup_all()
    nft = sh("nft", "--version").stdout.strip()
    print(f"machine: {os.cpu_count()} cores, kernel {platform.release()}, {nft}, python {platform.python_version()}")
    print(f"{out['pools']} pools x 4 backends (IPv4, half tcp, half udp); {out['rounds']} rounds, fresh netns each "
          f"run; the ruleset has ~{out['elements_in_ruleset']} element lines\n")
    print(f"{'':42} {'median':>9} {'min':>9} {'max':>9}")
    for k, v in out["runs"].items():
        unit = "" if "RSS" in k else " s"
        print(f"{k:42} {statistics.median(v):8.3f}{unit} {min(v):8.3f}{unit} {max(v):8.3f}{unit}")
    print()
    targets = {"apply YAML / nft -f": 1.25, "apply JSON / nft -f": 1.25, "nftlb shape / per-pool shape": 0.5,
               "drain CLI / full apply (JSON)": 1 / 20, "watcher transaction / full apply (JSON)": 1 / 20,
               "status / full apply (JSON)": None,
               "one-pool re-apply / full apply (JSON)": None}
    for k, v in out["ratios"].items():
        t = targets[k]
        print(f"{k:42} {v:8.3f}   " + (f"target <= {t:.3g}: {'met' if v <= t else 'NOT met'}" if t else ""))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
