"""Health probes that take the clients' path (issue 10, part 2), on a real kernel.

b3's default route points away from the gateway (to 10.0.0.99, which nobody has), though the
gateway's own address is on its subnet. A plain probe from the gateway passes; clients, whose
answers b3 sends to its default route, time out. A path probe leaves from the path source
(SNATed by nftlb's table), so b3's SYN-ACK goes where its answers to clients go: lost.
"""

from __future__ import annotations

import json
import sys
import time

from integration.test_apply import VIP, Gateway, pool
from integration.test_watch import WatchProcess, backends_in_pool, wait_for

INTERVAL, TIMEOUT, FALL = 0.3, 0.2, 3
SOURCE = "203.0.113.250"
FILE = (f"health: {{interval: {INTERVAL}, timeout: {TIMEOUT}, rise: 2, fall: {FALL}, path: true, "
        f"path_source: {SOURCE}}}\npools:\n" + pool("web", ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]))

PROBES = """
import asyncio, json, sys
from nftlb import probes
address = sys.argv[1]
out = {}
for name, probe in (("plain", probes.tcp_probe), ("path", probes.path_probe)):
    ok, detail, _ = asyncio.run(probe(address, 8080, 0.5))
    out[name] = "up" if ok else detail
print(json.dumps(out))
"""


def misroute(lab, name: str) -> None:
    """`name` answers everything off its subnet through a router that is not there."""
    ns = lab.backend(name).ns
    lab.exec(ns, "ip", "route", "replace", "default", "via", "10.0.0.99")


def time_wait(lab) -> int:
    """TIME_WAIT sockets of the gateway toward b1 and b2 (each holds a local port for 60 s)."""
    out = lab.exec(lab.gw, "ss", "-tanH", "state", "time-wait").stdout
    return sum(peer in line for line in out.splitlines() for peer in ("10.0.0.11:8080", "10.0.0.12:8080"))


def probes(lab, address: str) -> dict:
    cp = lab.exec(lab.gw, sys.executable, "-c", PROBES, address)
    return json.loads(cp.stdout)


def test_a_path_probe_takes_out_a_backend_that_only_answers_the_gateway(lab, tmp_path):
    gw = Gateway(lab, tmp_path)
    misroute(lab, "b3")
    f = gw.write(FILE)
    gw.nftlb("apply", f)  # the table carries the path probes' SNAT rule

    # the fault is real: the plain probe says up, the path probe down, and clients fail on b3
    assert probes(lab, "10.0.0.13") == {"plain": "up", "path": "no answer within 0.5s"}
    assert probes(lab, "10.0.0.11") == {"plain": "up", "path": "up"}
    before = lab.http_spread(VIP, 80, 30, timeout=0.3)
    assert before["failed"] > 0 and "b3" not in before["backends"], before

    links = lab.exec(lab.gw, "ip", "-o", "link").stdout
    waiting = time_wait(lab)  # the control's plain probe left one toward b1
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends in 1 pools")
    started = time.monotonic()
    wait_for(lambda: "10.0.0.13" not in backends_in_pool(gw, "web"), 5, "b3 out of the pool")
    took = time.monotonic() - started
    bound = FALL * INTERVAL + TIMEOUT
    print(f"b3 out after {took:.2f} s (bound {bound:.2f} s)")
    assert took <= bound + 0.25, took  # + the time to commit and to see the commit
    watcher.saw("pool web backend 10.0.0.13:8080 down after 3 failures: no reply by the client path")
    assert backends_in_pool(gw, "web") == {"10.0.0.11", "10.0.0.12"}  # the healthy ones stay

    after = lab.http_spread(VIP, 80, 60, timeout=1.0)
    assert after["failed"] == 0 and set(after["backends"]) == {"b1", "b2"}, after

    doc = json.loads(gw.nftlb("status", "--json").stdout)
    [web] = doc["pools"]
    rows = {b["backend"]: b for b in web["backends"]}
    assert web["probe"] == "path" and rows["10.0.0.13:8080"]["health"]["last_error"] == "no reply by the client path"
    prom = tmp_path / "nftlb.prom"
    gw.nftlb("metrics", "--textfile", prom)
    assert ('nftlb_backend_down_reason{backend="10.0.0.13:8080",pool="web",reason="no reply by the client path"} 1.0'
            in prom.read_text())

    # the probes take no port of the gateway's for long: reset, not closed, so no TIME_WAIT socket
    # (a plain probe leaves one for 60 s); their conntrack entries come from the path source
    assert time_wait(lab) == waiting == 1, (time_wait(lab), waiting)  # after a dozen path probes each
    entries = lab.exec(lab.gw, "conntrack", "-L", "--reply-dst", SOURCE, check=False).stdout
    assert "dst=10.0.0.11" in entries

    assert watcher.stop() == 0
    assert lab.exec(lab.gw, "conntrack", "-L", "--reply-dst", SOURCE, check=False).stdout == ""  # none left
    assert lab.exec(lab.gw, "ip", "-o", "link").stdout == links  # no interface, namespace or route made

    # and with plain probes, the same backend would stay in
    gw.nftlb("apply", gw.write(FILE.replace("path: true", "path: false")))
    watcher = WatchProcess(gw, gw.dir / "pools.yaml")
    watcher.saw("pool web backend 10.0.0.13:8080 up after 2 successes")
    wait_for(lambda: "10.0.0.13" in backends_in_pool(gw, "web"), 5, "b3 back with plain probes")
    assert watcher.stop() == 0


def test_path_probes_run_as_the_cli_would(lab, tmp_path):
    """`nftlb watch --once`: one round through the clients' path from cron, nothing left behind."""
    gw = Gateway(lab, tmp_path)
    misroute(lab, "b3")
    f = gw.write(FILE)
    for _ in range(FALL):
        gw.nftlb("watch", f, "--once")
    assert backends_in_pool(gw, "web") == {"10.0.0.11", "10.0.0.12"}
    health = json.loads((gw.state / "health.json").read_text())["data"]
    assert health["backends"]["web|10.0.0.13:8080"]["error"] == "no reply by the client path"
    assert lab.exec(lab.gw, "conntrack", "-L", "--reply-dst", SOURCE, check=False).stdout == ""


def test_doctor_checks_the_path_source_and_the_mark(lab_factory):
    from integration.test_doctor import doctor

    lab = lab_factory(backends=1)
    out = doctor(lab, FILE)
    assert out["by_name"][f"path_source {SOURCE}"]["verdict"] == "ok", out["text"]
    assert out["by_name"]["path_mark"]["verdict"] == "ok", out["text"]
    lab.exec(lab.gw, "ip", "rule", "add", "fwmark", "0x70/0xff", "table", "100")  # catches 0x6e6c6270
    lab.exec(lab.gw, "ip", "route", "add", "203.0.113.0/24", "dev", "br0")  # the source on the backends' link
    out = doctor(lab, FILE)
    assert out["by_name"]["path_mark"]["verdict"] == "warn", out["text"]
    assert out["by_name"][f"path_source {SOURCE}"]["verdict"] == "warn", out["text"]
