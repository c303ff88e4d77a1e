"""nftlb watch on a real kernel: real servers stop and start, the watcher (a real process in
the gateway namespace) takes them out and brings them back with small transactions."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from integration.test_apply import NFTLB, VIP, Gateway, pool

INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.2, 2, 3
HEALTH = f"health: {{interval: {INTERVAL}, timeout: {TIMEOUT}, rise: {RISE}, fall: {FALL}}}\n"
TCP3 = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
ADDR = {"b1": "10.0.0.11", "b2": "10.0.0.12", "b3": "10.0.0.13"}


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    """Poll `condition` until it returns a truthy value or `timeout` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)  # polling interval, not synchronisation


class WatchProcess:
    """`nftlb watch FILE` inside the gateway namespace, with its log collected line by line."""

    def __init__(self, gw: Gateway, file, *extra):
        self.gw = gw
        self.proc = gw.lab.popen(gw.lab.gw, "env", f"NFTLB_STATE_DIR={gw.state}", *NFTLB, "watch", str(file), *extra,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str, timeout: float = 10) -> str:
        return wait_for(lambda: next((l for l in self.lines if text in l), None), timeout, f"log line {text!r}\n"
                        + "\n".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def gw(lab, tmp_path):
    return Gateway(lab, tmp_path)


def backends_in_pool(gw: Gateway, name: str, vip: str = VIP, port: int = 80, proto: str = "tcp") -> set[str]:
    """Addresses of the backends taking new connections for vip:port, read from the live table."""
    return gw.backends(vip, port, proto)


def test_dead_backend_leaves_within_the_bound_and_comes_back(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends in 1 pools")
    held = [lab.hold(VIP, 80) for _ in range(8)]
    pinned = [(h, h.request()) for h in held]
    assert len({b for _, b in pinned}) >= 2

    lab.stop_server(lab.backend("b2"))
    stopped = time.monotonic()
    wait_for(lambda: "10.0.0.12" not in backends_in_pool(gw, "web"), 5, "b2 out of the pool")
    took = time.monotonic() - stopped
    bound = FALL * INTERVAL + TIMEOUT
    print(f"b2 out {took:.2f}s after its server stopped (bound {bound:.2f}s + slack)")
    assert took <= bound + 0.5
    watcher.saw("pool web backend 10.0.0.12:8080 down after 3 failures: connection refused")
    res = lab.http_spread(VIP, 80, 60)
    assert res["failed"] == 0 and set(res["backends"]) == {"b1", "b3"}, res

    lab.start_server(lab.backend("b2"))
    started = time.monotonic()
    wait_for(lambda: "10.0.0.12" in backends_in_pool(gw, "web"), 5, "b2 back in the pool")
    took = time.monotonic() - started
    print(f"b2 back {took:.2f}s after its server started (bound {RISE * INTERVAL:.2f}s + slack)")
    assert took <= RISE * INTERVAL + 0.5
    res = lab.http_spread(VIP, 80, 60)
    assert res["failed"] == 0 and res["backends"].get("b2", 0) > 0, res

    for h, backend in pinned:  # established connections to healthy backends never noticed
        if backend != "b2":
            assert h.request() == backend
    assert watcher.stop() == 0
    watcher.saw("nftlb watch stopped")


def test_udp_backend_down_resets_its_flows(gw, lab):
    udp = ["10.0.0.11:5353", "10.0.0.12:5353", "10.0.0.13:5353"]
    f = gw.write(HEALTH + "pools:\n" + pool("dns", udp, port=53, protocol="udp", health="{port: 8080}"))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends")

    def send():  # always the same client port: the same flow, pinned by conntrack
        return lab._client(lab.client, "spread-udp", VIP, 53, 1, 1.0, 41000, timeout=10)

    first = next(iter(send()["backends"]))

    def flows():
        cp = lab.exec(lab.gw, "conntrack", "-L", "-p", "udp", "--orig-dst", VIP, check=False)
        return cp.stdout

    assert f"src={ADDR[first]}" in flows()
    assert set(send()["backends"]) == {first}  # pinned
    lab.stop_server(lab.backend(first))
    watcher.saw(f"conntrack entries of pool dns toward {ADDR[first]}:5353: 1 deleted")
    assert f"src={ADDR[first]}" not in flows()
    now = send()
    assert now["failed"] == 0 and first not in now["backends"], now  # the same client moved on at once
    assert watcher.stop() == 0
    print("\n".join(watcher.lines))


def test_once_from_cron_reaches_the_same_result(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    gw.nftlb("apply", f)
    lab.stop_server(lab.backend("b1"))
    for run in range(1, FALL + 1):
        gw.nftlb("watch", f, "--once")
        assert ("10.0.0.11" in backends_in_pool(gw, "web")) == (run < FALL), run
    assert "b1" not in lab.http_spread(VIP, 80, 30)["backends"]
    lab.start_server(lab.backend("b1"))
    for run in range(1, RISE + 1):
        gw.nftlb("watch", f, "--once")
        assert ("10.0.0.11" in backends_in_pool(gw, "web")) == (run == RISE), run
    assert "b1" in lab.http_spread(VIP, 80, 60)["backends"]


def test_drain_survives_watcher_restart_and_reapply(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching")
    out = gw.nftlb("drain", "web", "10.0.0.11").stdout
    assert out == "pool web backend 10.0.0.11:8080 drained; taking new connections: 10.0.0.12:8080, 10.0.0.13:8080\n"
    assert "b1" not in lab.http_spread(VIP, 80, 30)["backends"]
    assert watcher.stop() == 0

    def checked():
        return json.loads((gw.state / "health.json").read_text())["data"]["backends"]["web|10.0.0.11:8080"]["checked"]

    before = checked()
    watcher = WatchProcess(gw, f)  # a new watcher: healthy b1 stays drained
    wait_for(lambda: checked() > before, 5, "a probe round of the new watcher")  # b1 probed healthy
    assert "10.0.0.11" not in backends_in_pool(gw, "web")
    assert "in sync" in gw.nftlb("apply", f).stdout  # a re-apply neither
    assert "b1" not in lab.http_spread(VIP, 80, 30)["backends"]
    gw.nftlb("enable", "web", "10.0.0.11:8080")
    assert "b1" in lab.http_spread(VIP, 80, 60)["backends"]
    assert watcher.stop() == 0


def test_one_watcher_per_state_dir(gw):
    f = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching")
    second = gw.nftlb("watch", f, expect=3)
    assert "another nftlb watch is running" in second.stderr
    assert watcher.stop() == 0


def test_sighup_reapplies_and_a_bad_file_keeps_the_running_config(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends")
    before = gw.live()
    f.write_text(HEALTH + "pools:\n  - name: web\n    vip: nonsense\n")
    watcher.proc.send_signal(signal.SIGHUP)
    watcher.saw("is not valid; keeping the running config")
    assert gw.live() == before and watcher.proc.poll() is None
    f.write_text(HEALTH + "pools:\n" + pool("web", TCP3[:2]))
    watcher.proc.send_signal(signal.SIGHUP)
    watcher.saw("SIGHUP: " + str(f) + " applied")
    watcher.saw("watching 2 backends")
    assert backends_in_pool(gw, "web") == {"10.0.0.11", "10.0.0.12"}
    assert watcher.stop() == 0


def test_backups_then_refusal_when_everything_is_down(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", ["10.0.0.11:8080", "10.0.0.12:8080",
                                                   "{address: 10.0.0.13, port: 8080, backup: true}"]))
    lab.exec(lab.gw, "ip", "route", "add", "198.51.100.0/24", "via", "10.0.0.13")  # else a black hole
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends")
    assert set(lab.http_spread(VIP, 80, 30)["backends"]) == {"b1", "b2"}  # backup idle
    lab.stop_server(lab.backend("b1"))
    lab.stop_server(lab.backend("b2"))
    watcher.saw("pool web: no primary up; serving from backups 10.0.0.13:8080")
    res = lab.http_spread(VIP, 80, 20)
    assert res["failed"] == 0 and res["backends"] == {"b3": 20}, res
    lab.start_server(lab.backend("b1"))
    wait_for(lambda: backends_in_pool(gw, "web") == {"10.0.0.11"}, 5, "the backup handing back")
    assert lab.http_spread(VIP, 80, 20)["backends"] == {"b1": 20}
    lab.stop_server(lab.backend("b1"))
    lab.stop_server(lab.backend("b3"))
    watcher.saw("pool web: no backend up; refusing new connections")
    started = time.monotonic()
    res = lab.http_spread(VIP, 80, 3, timeout=2)
    assert res["failed"] == 3 and all("refused" in e.lower() for e in res["errors"]), res
    assert time.monotonic() - started < 2  # refused at once, not a timeout
    assert watcher.stop() == 0


def test_on_down_keep_leaves_established_flows_and_reset_cuts_them(gw, lab_factory, tmp_path):
    """Health fails on a separate port (the backend's firewall rejects it) while the service
    port keeps working: only `on_down` decides what happens to established connections."""
    lab = lab_factory()
    lab.start_servers(tcp_ports=(8080, 8081))
    gw = Gateway(lab, tmp_path)
    f = gw.write(HEALTH + "pools:\n" + pool("keep", TCP3, health="{port: 8081}")
                 + pool("cut", TCP3, port=81, health="{port: 8081}", on_down="reset"))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 6 backends")
    keep, cut = {}, {}
    for _ in range(12):  # a held connection in each pool, on one backend
        for pool_port, held in ((80, keep), (81, cut)):
            h = lab.hold(VIP, pool_port)
            held.setdefault(h.request(), h)
        common = sorted(set(keep) & set(cut))
        if common:
            break
    victim = common[0]
    b = lab.backend(victim)
    lab.exec(b.ns, "nft", "-f", "-", input="table inet fw {\n chain input {\n"
             "  type filter hook input priority filter; policy accept;\n  tcp dport 8081 reject with tcp reset\n }\n}\n")
    watcher.saw(f"conntrack entries of pool cut toward {b.ipv4}:8080: ")  # one or more: every hold to it
    watcher.saw(f"pool keep backend {b.ipv4}:8080 down")
    assert keep[victim].request() == victim  # keep: the established connection carries on
    with pytest.raises(Exception, match="reset|closed|Broken|refused") as cut_off:
        cut[victim].request()  # reset: its flow is gone, the client learns at once
    print("the reset pool's established connection:", cut_off.value)
    assert watcher.stop() == 0
