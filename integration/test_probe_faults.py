"""Misbehaving probe targets on a real kernel: a SYN black hole, a closed port (RST), an ICMP
reject, a server that accepts and closes at once, one that listens but never accepts
(with room in its accept queue, and with none), and one that flaps every second.

`probes.tcp_probe` gives each its verdict within the timeout (+0.5 s), and a watcher
process (`nftlb watch FILE`) runs through all of them at once, taking down exactly the
ones that do not answer, and following the flapping one both ways.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest

from integration.lab import PYTHON
from integration.test_apply import VIP, Gateway, pool
from integration.test_watch import WatchProcess, wait_for

TIMEOUT = 0.5  # the direct probes' timeout
SLACK = 0.5  # a verdict comes within TIMEOUT + SLACK
ADDRESS = "10.0.0.11"  # every faulty target lives on b1
PORTS = {"blackhole": 9001, "rst": 9002, "icmp": 9003, "accept-close": 9004, "slow-accept": 9005,
         "queue-full": 9006, "flap": 9007}

# The faulty servers, inside b1: stdlib only, bounded lifetime, "ready" once all are listening.
SERVERS = """
import select, socket, sys, time
ports = dict(arg.split("=") for arg in sys.argv[1:])
def listener(port, backlog):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(backlog)
    return s
closer = listener(ports["accept-close"], 128)       # accepts, then closes at once
slow = listener(ports["slow-accept"], 128)          # never accepts: the kernel completes handshakes
full = listener(ports["queue-full"], 0)             # never accepts, room for one: then SYNs are dropped
flap, flap_since = listener(ports["flap"], 128), time.monotonic()  # listening one second, closed the next
print("ready", flush=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    if time.monotonic() - flap_since >= 1.0:
        if flap is None:
            flap = listener(ports["flap"], 128)
        else:
            flap.close()
            flap = None
        flap_since = time.monotonic()
    ready, _, _ = select.select([closer] + ([flap] if flap else []), [], [], 0.05)
    for s in ready:
        try:
            s.accept()[0].close()
        except OSError:
            pass
"""

FIREWALL = f"""table inet faults {{
    chain input {{
        type filter hook input priority filter; policy accept;
        tcp dport {PORTS['blackhole']} drop
        tcp dport {PORTS['icmp']} reject with icmpx host-unreachable
    }}
}}
"""

# Probes each kind in turn with nftlb's own prober, inside the gateway; one JSON line per probe.
PROBE = """
import asyncio, json, sys, time
from nftlb import probes
address, timeout = sys.argv[1], float(sys.argv[2])
async def main():
    for arg in sys.argv[3:]:
        kind, port = arg.split("=")
        started = time.monotonic()
        ok, detail, latency = await probes.tcp_probe(address, int(port), timeout)
        print(json.dumps({"kind": kind, "ok": ok, "detail": detail, "seconds": time.monotonic() - started}))
asyncio.run(main())
"""


@pytest.fixture
def faulty(lab):
    """b1's faulty servers and firewall; returns the lab."""
    b1 = lab.backend("b1")
    lab.exec(b1.ns, "nft", "-f", "-", input=FIREWALL)
    proc = lab.popen(b1.ns, PYTHON, "-c", SERVERS, *(f"{k}={v}" for k, v in PORTS.items()),
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready and proc.stdout.readline() == b"ready\n", proc.stderr.read1(4096) if ready else "no answer"
    return lab


def probe(lab, *kinds, timeout=TIMEOUT) -> list[dict]:
    cp = lab.exec(lab.gw, sys.executable, "-c", PROBE, ADDRESS, str(timeout), *(f"{k}={PORTS[k]}" for k in kinds),
                  timeout=30)
    return [json.loads(line) for line in cp.stdout.splitlines()]


def test_each_kind_of_target_gets_its_verdict_within_the_timeout(faulty):
    expected = {  # kind: (ok, detail)
        "blackhole": (False, f"no answer within {TIMEOUT:g}s"),
        "rst": (False, "connection refused"),
        "icmp": (False, "no route to host"),
        "accept-close": (True, ""),
        "slow-accept": (True, ""),  # the kernel completed the handshake; nobody has to accept
    }
    kinds = [k for k in expected for _ in range(3)]
    results = probe(faulty, *kinds)
    assert [r["kind"] for r in results] == kinds
    worst = {}
    for r in results:
        assert (r["ok"], r["detail"]) == expected[r["kind"]], r
        assert r["seconds"] <= TIMEOUT + SLACK, r
        worst[r["kind"]] = max(worst.get(r["kind"], 0.0), r["seconds"])
    # a listener that never accepts is up only while its accept queue has room
    full = probe(faulty, "queue-full", "queue-full", "queue-full")
    assert [(r["ok"], r["detail"]) for r in full] == [(True, "")] + [(False, f"no answer within {TIMEOUT:g}s")] * 2
    assert all(r["seconds"] <= TIMEOUT + SLACK for r in full), full
    worst["queue-full"] = max(r["seconds"] for r in full)
    flap = probe(faulty, *["flap"] * 6)  # either answer, never slow
    assert {(r["ok"], r["detail"]) for r in flap} <= {(True, ""), (False, "connection refused")}, flap
    worst["flap"] = max(r["seconds"] for r in flap)
    assert all(r["seconds"] <= TIMEOUT + SLACK for r in flap), flap
    print("slowest verdict per kind (timeout %.1f s): %s" % (TIMEOUT, ", ".join(f"{k} {v:.3f} s" for k, v in worst.items())))


INTERVAL, PROBE_TIMEOUT = 0.3, 0.2
HEALTH = f"health: {{interval: {INTERVAL}, timeout: {PROBE_TIMEOUT}, rise: 2, fall: 3}}\n"


def test_watcher_runs_through_every_kind_of_fault(faulty, tmp_path):
    lab = faulty
    gw = Gateway(lab, tmp_path)
    names = list(PORTS)
    f = gw.write(HEALTH + "pools:\n" + "".join(
        pool(kind.replace("-", ""), [f"{ADDRESS}:8080"], port=81 + i, health=f"{{port: {PORTS[kind]}}}")
        for i, kind in enumerate(names)) + pool("healthy", [f"{ADDRESS}:8080", "10.0.0.12:8080"]))
    watcher = WatchProcess(gw, f)
    watcher.saw(f"watching {len(names) + 2} backends in {len(names) + 1} pools")
    started = time.monotonic()

    def line(pool_name, what):
        return f"pool {pool_name} backend {ADDRESS}:8080 {what}"

    watcher.saw(line("blackhole", f"down after 3 failures: no answer within {PROBE_TIMEOUT:g}s"))
    watcher.saw(line("rst", "down after 3 failures: connection refused"))
    watcher.saw(line("icmp", "down after 3 failures: no route to host"))
    watcher.saw(line("queuefull", f"down after 3 failures: no answer within {PROBE_TIMEOUT:g}s"))
    watcher.saw(line("flap", "down after 3 failures: connection refused"))
    watcher.saw(line("flap", "up after 2 successes"))
    flapped = time.monotonic() - started
    # ... and a few more rounds of everything at once, the flapping one included
    wait_for(lambda: sum(line("flap", "up") in l for l in watcher.lines) >= 2, 10, "a second flap")
    assert watcher.proc.poll() is None, "\n".join(watcher.lines)

    for kind in ("accept-close", "slow-accept"):  # up all along: never a transition
        assert not [l for l in watcher.lines if line(kind.replace("-", ""), "") in l], kind
    assert not [l for l in watcher.lines if "pool healthy" in l and " down " in l]
    assert gw.backends(VIP, 80) == {ADDRESS, "10.0.0.12"}  # the healthy pool never noticed
    assert gw.backends(VIP, 81 + names.index("accept-close")) == {ADDRESS}
    assert gw.backends(VIP, 81 + names.index("blackhole")) == set()  # refusing
    flaps = sum(line("flap", "") in l for l in watcher.lines)
    ran = time.monotonic() - started
    assert watcher.stop() == 0
    watcher.saw("nftlb watch stopped")
    assert not [l for l in watcher.lines if "Traceback" in l or "internal error" in l or "round failed" in l]
    print(f"watcher ran {ran:.1f} s through {len(names)} kinds of fault: every expected transition "
          f"within {flapped:.1f} s, {flaps} flap transitions, still running until SIGTERM")
