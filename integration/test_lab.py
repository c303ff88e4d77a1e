"""Tests of the namespace lab itself: plain routing, no nftables, no NAT."""

import json
import subprocess
import time

import pytest

from integration.lab import IP, Lab, LabError, list_netns


def test_topology(lab_factory):
    lab = lab_factory(backends=2)
    assert [b.name for b in lab.backends] == ["b1", "b2"]
    assert [(b.ipv4, b.ipv6) for b in lab.backends] == [("10.0.0.11", "fd00:b::11"), ("10.0.0.12", "fd00:b::12")]
    assert set(lab.namespaces) <= set(list_netns())
    assert lab.exec(lab.gw, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert lab.exec(lab.gw, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    links = {l["ifname"]: l for l in json.loads(subprocess.run(
        [IP, "-n", lab.gw, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True).stdout)}
    assert {"c0", "br0", "vip0", "vb1", "vb2"} <= set(links)
    assert links["vb1"]["master"] == "br0" and links["vb2"]["master"] == "br0"
    assert "UP" in links["vip0"]["flags"]
    # no default route in the gateway; client and backends have one
    assert lab.exec(lab.gw, IP, "route", "show", "default").stdout.strip() == ""
    for ns in (lab.client, lab.backends[0].ns):
        assert "default via" in lab.exec(ns, IP, "-4", "route", "show", "default").stdout
        assert "default via" in lab.exec(ns, IP, "-6", "route", "show", "default").stdout


def test_tcp_udp_direct(lab):
    res = lab.http_spread("10.0.0.11", 8080, 5)
    assert res["backends"] == {"b1": 5}, res
    assert res["failed"] == 0 and res["errors"] == []
    assert res["peers"] == {"b1": ["192.0.2.2"]}

    res = lab.http_spread("fd00:b::12", 8080, 3)
    assert res["backends"] == {"b2": 3}, res
    assert res["peers"] == {"b2": ["fd00:c::2"]}

    res = lab.udp_spread("10.0.0.13", 5353, 4)
    assert res["backends"] == {"b3": 4} and res["failed"] == 0, res
    assert res["peers"] == {"b3": ["192.0.2.2"]}

    res = lab.udp_spread("fd00:b::11", 5353, 2)
    assert res["backends"] == {"b1": 2} and res["peers"] == {"b1": ["fd00:c::2"]}, res

    # from the gateway: the backends see the gateway's own bridge address
    res = lab.http_spread("[fd00:b::13]", 8080, 2, ns=lab.gw)
    assert res["backends"] == {"b3": 2} and res["peers"] == {"b3": ["fd00:b::1"]}, res


def test_keepalive_and_hold(lab):
    assert lab.keepalive("10.0.0.12", 8080) == ["b2", "b2", "b2"]
    assert lab.keepalive("fd00:b::13", 8080, requests=2) == ["b3", "b3"]

    held = lab.hold("10.0.0.11", 8080)
    assert isinstance(held.local_port, int) and held.local_port > 0
    assert held.request() == "b1"
    assert held.request() == "b1"
    # the server going away breaks the held connection: request() raises
    lab.stop_server(lab.backends[0])
    with pytest.raises(LabError):
        held.request()
    held.close()


def test_stop_start_server_and_failures_are_counted(lab):
    b1 = lab.backends[0]
    lab.stop_server(b1)
    res = lab.http_spread("10.0.0.11", 8080, 2, timeout=1.0)
    assert res["backends"] == {} and res["failed"] == 2
    assert "ConnectionRefusedError" in res["errors"][0]
    res = lab.udp_spread("10.0.0.11", 5353, 2, timeout=0.5)
    assert res["failed"] == 2, res  # ICMP port unreachable -> refused
    lab.start_server(b1)
    assert lab.http_spread("10.0.0.11", 8080, 2)["backends"] == {"b1": 2}
    # extra ports
    lab.stop_server(b1)
    lab.start_server(b1, tcp_ports=(80, 8080), udp_ports=(53,))
    assert lab.http_spread("10.0.0.11", 80, 1)["backends"] == {"b1": 1}
    assert lab.udp_spread("10.0.0.11", 53, 1)["backends"] == {"b1": 1}


def test_local_vip(lab_factory):
    lab = lab_factory(backends=1)
    lab.add_local_vip("198.51.100.10")
    lab.add_local_vip("2001:db8::10")
    out = lab.exec(lab.gw, IP, "addr", "show", "dev", "vip0").stdout
    assert "198.51.100.10/32" in out and "2001:db8::10/128" in out and "tentative" not in out
    # the VIP is local to gw: a connection from gw to it reaches gw's own
    # stack (nothing listens there without nftlb -> refused, not a timeout)
    res = lab.http_spread("198.51.100.10", 8080, 1, ns=lab.gw, timeout=1.0)
    assert res["failed"] == 1 and "ConnectionRefusedError" in res["errors"][0], res
    res = lab.http_spread("2001:db8::10", 8080, 1, ns=lab.gw, timeout=1.0)
    assert res["failed"] == 1 and "ConnectionRefusedError" in res["errors"][0], res


def test_unrouted_backends_cannot_answer_client(lab_factory):
    lab = lab_factory(backends=1, routed_backends=False)
    lab.start_servers()
    assert lab.exec(lab.backends[0].ns, IP, "route", "show", "default").stdout.strip() == ""
    t0 = time.monotonic()
    res = lab.http_spread("10.0.0.11", 8080, 1, timeout=0.5)
    assert res["backends"] == {} and res["failed"] == 1, res
    assert "timed out" in res["errors"][0], res
    res = lab.http_spread("fd00:b::11", 8080, 1, timeout=0.5)
    assert res["backends"] == {} and res["failed"] == 1, res
    assert time.monotonic() - t0 < 5
    # positive control: the on-link gateway still reaches the server
    assert lab.http_spread("10.0.0.11", 8080, 1, ns=lab.gw)["backends"] == {"b1": 1}


def test_teardown_removes_everything(lab_factory):
    lab = lab_factory(backends=2)
    lab.start_servers()
    held = lab.hold("10.0.0.11", 8080)
    sleeper = lab.popen(lab.client, "sleep", "300")
    namespaces = list(lab.namespaces)
    assert set(namespaces) <= set(list_netns())
    lab.teardown()
    lab.teardown()  # idempotent
    assert not set(namespaces) & set(list_netns())
    assert sleeper.poll() is not None and held._proc.poll() is not None
    for b in lab.backends:
        assert lab._servers[b.name].poll() is not None


def test_context_manager_cleans_up_on_error():
    with pytest.raises(ZeroDivisionError):
        with Lab(backends=1) as lab:
            namespaces = list(lab.namespaces)
            assert set(namespaces) <= set(list_netns())
            1 / 0
    assert not set(namespaces) & set(list_netns())


def test_failed_build_cleans_up():
    first = Lab(backends=1)
    try:
        with pytest.raises(LabError, match="already exist"):
            Lab(backends=1, prefix=first.prefix)
        assert set(first.namespaces) <= set(list_netns())
    finally:
        first.teardown()
    assert not set(first.namespaces) & set(list_netns())
