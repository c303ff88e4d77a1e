"""The watcher's state machine and transactions, with a fake clock, a fake prober and the fake kernel."""

import asyncio
import logging

import pytest

from nftlb import health, ops, probes, state
from nftlb.diff import normalize
from nftlb.kernel.fake import Fake
from nftlb.watch import Watcher

POOLS = """
health: {interval: 1s, timeout: 500ms, rise: 2, fall: 3}
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends:
      - 10.0.0.11:8080
      - 10.0.0.12:8080
      - {address: 10.0.0.21, port: 8080, backup: true}
  - name: dns
    vip: 198.51.100.53
    port: 53
    protocol: udp
    health: {port: 8080}
    backends: [10.0.0.11, 10.0.0.12]
  - name: last
    vip: 198.51.100.20
    port: 80
    when_all_down: keep-last
    backends: [10.0.0.11:8080, 10.0.0.12:8080]
  - name: quiet
    vip: 198.51.100.30
    port: 80
    health: off
    backends: [10.0.0.99:80]
"""


VIPS = {"web": ("198.51.100.10", 80, "tcp"), "dns": ("198.51.100.53", 53, "udp"), "plain": ("198.51.100.11", 80, "tcp"),
        "last": ("198.51.100.20", 80, "tcp")}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class World:
    """Fake clock + fake prober + fake kernel + a real state dir."""

    def __init__(self, tmp_path, text=POOLS):
        self.kernel, self.clock, self.dead = Fake(), Clock(), set()
        self.state_dir = tmp_path / "state"
        self.file = tmp_path / "pools.yaml"
        self.file.write_text(text)
        self.probed = []
        ops.apply(self.file, self.kernel, self.state_dir)

    async def probe(self, address, port, timeout):
        self.probed.append((address, port))
        if (address, port) in self.dead:
            return False, "connection refused", None
        return True, "", 0.001

    def watcher(self):
        return Watcher(self.kernel, self.state_dir, probe=self.probe, monotonic=self.clock, wall=self.clock)

    def rounds(self, w, n=1):
        out = []
        for _ in range(n):
            out += asyncio.run(w.step())
            self.clock.t += 1.0
        return out

    def slots(self, pool, port=None):
        """Backends taking new connections in `pool`, read back from the (fake) kernel."""
        vip, configured, proto = VIPS[pool]
        port = port or configured
        live = normalize(self.kernel.list("table inet nftlb"))
        out = set()
        for name in (f"map slots4_{proto}", f"map direct4_{proto}"):
            for e in live[name].get("elem", []):
                key, _, backend = e.partition(" : ")
                if key.startswith(f"{vip} . {port} . ") or key.startswith(f"{vip} . {port} comment"):
                    out.add(backend)
        return sorted(out)

    def refused(self):
        return [e.split(" comment")[0] for e in normalize(self.kernel.list("table inet nftlb"))["map services4"].get("elem", [])
                if e.endswith(": goto refuse")]


def test_fall_then_rise_one_transaction_each(tmp_path):
    world = World(tmp_path)
    w = world.watcher()
    assert world.rounds(w, 3) == [] and w.transactions == 0  # steady: no transaction at all
    assert world.slots("web") == ["10.0.0.11 . 8080", "10.0.0.12 . 8080"]

    world.dead.add(("10.0.0.12", 8080))
    assert world.rounds(w, 2) == [] and "10.0.0.12 . 8080" in world.slots("web")  # 2 failures < fall
    [t_web, t_dns, t_last] = world.rounds(w, 1)  # the third: down in every pool it serves
    assert str(t_web) == "pool web backend 10.0.0.12:8080 down after 3 failures: connection refused"
    assert world.slots("web") == ["10.0.0.11 . 8080"] and w.transactions == 1
    assert world.slots("dns") == ["10.0.0.11 . 53"]  # probed on its health port 8080

    world.dead.clear()
    assert world.rounds(w, 1) == [] and world.slots("web") == ["10.0.0.11 . 8080"]  # 1 success < rise
    assert [str(t) for t in world.rounds(w, 1)][0] == "pool web backend 10.0.0.12:8080 up after 2 successes"
    assert world.slots("web") == ["10.0.0.11 . 8080", "10.0.0.12 . 8080"] and w.transactions == 2
    assert world.rounds(w, 5) == [] and w.transactions == 2


def test_health_off_pool_is_not_probed(tmp_path):
    world = World(tmp_path)
    world.rounds(world.watcher(), 2)
    assert ("10.0.0.99", 80) not in world.probed
    assert ("10.0.0.21", 8080) in world.probed  # backups are probed too


def test_backups_only_while_no_primary_is_up(tmp_path, caplog):
    world = World(tmp_path)
    w = world.watcher()
    world.dead |= {("10.0.0.11", 8080), ("10.0.0.12", 8080)}
    with caplog.at_level(logging.WARNING, "nftlb"):
        world.rounds(w, 3)
    assert world.slots("web") == ["10.0.0.21 . 8080"]
    assert "pool web: no primary up; serving from backups 10.0.0.21:8080" in caplog.text
    world.dead.discard(("10.0.0.12", 8080))
    world.rounds(w, 2)
    assert world.slots("web") == ["10.0.0.12 . 8080"]  # handed back


def test_all_down_reject_refuses_and_keep_last_keeps(tmp_path, caplog):
    world = World(tmp_path)
    w = world.watcher()
    world.rounds(w, 1)
    world.dead.add(("10.0.0.11", 8080))
    world.rounds(w, 3)
    assert world.slots("last") == ["10.0.0.12 . 8080"]
    deleted = world.kernel.conntrack.deleted
    assert [(f.pool, f.backend, f.unreplied) for f in deleted] == [
        ("web", ("10.0.0.11", 8080), True), ("dns", ("10.0.0.11", 53), False), ("last", ("10.0.0.11", 8080), True)]
    deleted.clear()
    world.dead |= {("10.0.0.12", 8080), ("10.0.0.21", 8080)}
    with caplog.at_level(logging.ERROR, "nftlb"):
        world.rounds(w, 3)
    assert sorted(world.refused()) == ["198.51.100.10 . tcp . 80", "198.51.100.53 . udp . 53"]
    # refused pools lose their unreplied entries; dns (udp: on_down reset) also its flows to 10.0.0.12;
    # keep-last keeps 10.0.0.12 in `last`, and its entries with it
    assert [(f.pool, f.backend, f.unreplied) for f in deleted] == [
        ("web", None, True), ("dns", None, True), ("dns", ("10.0.0.12", 53), False)]
    assert world.slots("web") == []
    assert world.slots("last") == ["10.0.0.12 . 8080"]  # the last healthy set stays in place
    assert "pool last: ALL BACKENDS DOWN; keep-last leaves 10.0.0.12:8080 in place" in caplog.text
    assert "pool web: no backend up; refusing new connections to 198.51.100.10:80/tcp" in caplog.text
    world.dead.clear()
    world.rounds(w, 2)
    assert world.refused() == [] and len(world.slots("web")) == 2 and len(world.slots("last")) == 2


def test_drain_survives_watcher_restart_and_reapply(tmp_path):
    world = World(tmp_path)
    name, r = ops.set_drain(world.kernel, world.state_dir, "web", "10.0.0.11", True)
    assert name == "10.0.0.11:8080" and r.changed == ["web"]
    assert world.slots("web") == ["10.0.0.12 . 8080"]
    world.rounds(world.watcher(), 3)  # healthy, but drained
    assert world.slots("web") == ["10.0.0.12 . 8080"]
    assert ops.apply(world.file, world.kernel, world.state_dir).action == "in-sync"
    world.rounds(world.watcher(), 2)  # a new watcher
    assert world.slots("web") == ["10.0.0.12 . 8080"]
    ops.set_drain(world.kernel, world.state_dir, "web", "10.0.0.11:8080", False)
    assert world.slots("web") == ["10.0.0.11 . 8080", "10.0.0.12 . 8080"]


def test_reapply_does_not_resurrect_a_down_backend(tmp_path):
    world = World(tmp_path)
    w = world.watcher()
    world.dead.add(("10.0.0.12", 8080))
    world.rounds(w, 3)
    r = ops.apply(world.file, world.kernel, world.state_dir)
    assert r.action == "in-sync" and world.slots("web") == ["10.0.0.11 . 8080"]
    edited = POOLS.replace("port: 80\n    backends:\n      - 10.0.0.11", "port: 81\n    backends:\n      - 10.0.0.11", 1)
    world.file.write_text(edited)
    r = ops.apply(world.file, world.kernel, world.state_dir)
    assert r.action == "applied" and r.transaction == "1 pools" and world.slots("web", port=81) == ["10.0.0.11 . 8080"]


def test_failed_transaction_is_retried_with_the_whole_table(tmp_path, caplog):
    world = World(tmp_path)
    w = world.watcher()
    world.dead.add(("10.0.0.12", 8080))
    world.rounds(w, 2)
    world.kernel.reject = "Error: Could not process rule: Cannot allocate memory"
    with caplog.at_level(logging.ERROR, "nftlb"):
        world.rounds(w, 1)
    assert "transaction failed; will retry with the whole table" in caplog.text
    assert "10.0.0.12 . 8080" in world.slots("web") and w.retry_whole_table
    assert state.read_doc(world.state_dir, state.HEALTH)["retry_whole_table"] is True
    world.rounds(w, 1)
    assert world.slots("web") == ["10.0.0.11 . 8080"] and not w.retry_whole_table
    assert world.kernel.scripts[-1][0].startswith("# nftlb: table inet nftlb")  # the whole table


def test_once_rounds_persist_streaks_like_a_daemon(tmp_path):
    world = World(tmp_path)
    world.dead.add(("10.0.0.12", 8080))
    for _ in range(2):
        assert world.watcher().once()  # a fresh process each time, as from cron
    assert "10.0.0.12 . 8080" in world.slots("web")
    assert health.load(state.read_doc(world.state_dir, state.HEALTH))["web|10.0.0.12:8080"].failed == 2
    assert world.watcher().once()
    assert world.slots("web") == ["10.0.0.11 . 8080"]


def test_watcher_follows_a_new_apply(tmp_path):
    world = World(tmp_path)
    w = world.watcher()
    world.rounds(w, 1)
    world.file.write_text(POOLS.replace("      - 10.0.0.12:8080\n      - {address: 10.0.0.21", "      - 10.0.0.13:8080\n      - {address: 10.0.0.21", 1))
    ops.apply(world.file, world.kernel, world.state_dir)
    world.probed.clear()
    world.rounds(w, 1)
    assert ("10.0.0.13", 8080) in world.probed and "web|10.0.0.13:8080" in w.records


@pytest.mark.parametrize("rounds", [200])
def test_flapping_backend_costs_one_transaction_per_real_change(tmp_path, rounds):
    world = World(tmp_path)
    w = world.watcher()
    changes = 0
    for i in range(rounds):
        if i % 4 == 0:
            world.dead.symmetric_difference_update({("10.0.0.12", 8080)})
        changes += len([t for t in world.rounds(w, 1) if t.target.pool == "web"])
    assert changes > 0 and w.transactions == changes


PATHS = """
health: {interval: 1s, timeout: 500ms, rise: 2, fall: 3, path: true, path_source: 203.0.113.250}
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends: [10.0.0.11:8080, 10.0.0.12:8080, 10.0.0.13:8080]
  - name: plain
    vip: 198.51.100.11
    port: 80
    mode: masquerade
    backends: [10.0.0.13:8080]
"""


def test_path_probes_take_out_a_backend_clients_cannot_reach(tmp_path):
    world = World(tmp_path, PATHS)
    no_path, by_path = {("10.0.0.13", 8080)}, []

    async def path(address, port, timeout):
        by_path.append((address, port))
        if (address, port) in no_path | world.dead:
            return False, f"no answer within {timeout:g}s", None
        return True, "", 0.001

    w = Watcher(world.kernel, world.state_dir, probe=world.probe, path_probe=probes.by_path(path, world.probe),
                monotonic=world.clock, wall=world.clock)
    transitions = world.rounds(w, 3)
    assert [str(t) for t in transitions] == [
        "pool web backend 10.0.0.13:8080 down after 3 failures: no reply by the client path"]
    assert world.slots("web") == ["10.0.0.11 . 8080", "10.0.0.12 . 8080"]
    assert world.slots("plain") == ["10.0.0.13 . 8080"]  # masquerade: plain probes, and it answers those
    assert by_path.count(("10.0.0.13", 8080)) == 3 and by_path.count(("10.0.0.11", 8080)) == 3
    # the direct probe only runs for the backend whose path probe failed (and the plain pool)
    assert world.probed.count(("10.0.0.13", 8080)) == 6 and ("10.0.0.11", 8080) not in world.probed
    doc = state.read_doc(world.state_dir, state.HEALTH)
    assert doc["backends"]["web|10.0.0.13:8080"]["error"] == probes.NO_CLIENT_PATH
    world.dead.add(("10.0.0.12", 8080))  # dead for both: the direct probe's reason wins
    assert [str(t) for t in world.rounds(w, 3)] == [
        "pool web backend 10.0.0.12:8080 down after 3 failures: connection refused"]
    w.close()
    assert ("replies to", "203.0.113.250") in world.kernel.conntrack.deleted  # the probes' conntrack entries
