"""Consistent hashing and persistence on a real kernel.

The Python side computes the kernel's choice (jhash + Maglev table); these tests check
that the kernel agrees, connection by connection, and that persistence keeps clients
with their backend until that backend goes.
"""

from __future__ import annotations

import pytest

from integration.test_apply import VIP, VIP6, Gateway, pool
from integration.test_watch import HEALTH, WatchProcess
from nftlb import explain

NAME = {"10.0.0.11": "b1", "10.0.0.12": "b2", "10.0.0.13": "b3", "fd00:b::11": "b1", "fd00:b::12": "b2",
        "fd00:b::13": "b3"}


@pytest.fixture
def gw(lab, tmp_path):
    return Gateway(lab, tmp_path)


def ports(lab, vip, port, first, count):
    return lab._client(lab.client, "ports-http", vip, port, first, count, 2.0, timeout=count * 5 + 10)["answers"]


@pytest.mark.parametrize("scheduler, vip, client", [("hash", VIP, "192.0.2.2"), ("source-hash", VIP, "192.0.2.2"),
                                                    ("hash", VIP6, "fd00:c::2")])
def test_the_kernel_picks_what_explain_predicts(gw, lab, scheduler, vip, client):
    backends = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"] if vip == VIP else \
        ['"[fd00:b::11]:8080"', '"[fd00:b::12]:8080"', '"[fd00:b::13]:8080"']
    f = gw.write("seed: 0x5eed\npools:\n" + pool("web", backends, vip=vip, scheduler=scheduler))
    gw.nftlb("apply", f)
    answers = ports(lab, vip, 80, 41000, 60)
    assert all(b for _, b in answers)
    for sport, backend in answers:
        predicted = explain.pool(f, "web", client=(client, sport))["client"]["backend"]
        assert NAME[predicted.rsplit(":", 1)[0].strip("[]")] == backend, (sport, predicted, backend)
    if scheduler == "source-hash":
        assert len({b for _, b in answers}) == 1  # one client address, one backend


def test_persistence_keeps_a_client_until_its_backend_goes(gw, lab):
    f = gw.write(HEALTH + "pools:\n" + pool("web", ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"],
                                            persistence="5m"))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends")
    first = ports(lab, VIP, 80, 42000, 1)[0][1]
    answers = ports(lab, VIP, 80, 42001, 20)  # new 4-tuples, which alone would hash all over
    assert {b for _, b in answers} == {first}
    entries = lab.exec(lab.gw, "nft", "-j", "list", "map", "inet", "nftlb", "sticky4_tcp_300").stdout
    assert "192.0.2.2" in entries

    other = next(b for b in ("b1", "b2", "b3") if b != first)
    lab.stop_server(lab.backend(other))  # another backend's health changes: the client stays
    watcher.saw(f"pool web backend 10.0.0.1{other[1]}:8080 down")
    assert {b for _, b in ports(lab, VIP, 80, 42100, 10)} == {first}

    lab.stop_server(lab.backend(first))  # its own backend goes: re-balanced, not black-holed
    watcher.saw(f"pool web backend 10.0.0.1{first[1]}:8080 down")
    moved = ports(lab, VIP, 80, 42200, 10)
    assert all(b is not None and b not in (first, other) for _, b in moved), moved
    assert watcher.stop() == 0
