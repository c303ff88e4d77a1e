"""Operating nftlb on a real kernel: status with the kernel's counters and conntrack, the
Prometheus endpoint and textfile, history and rollback."""

from __future__ import annotations

import json
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.test_apply import VIP, Gateway, pool
from integration.test_watch import HEALTH, TCP3, WatchProcess, wait_for

ADDR = {"b1": "10.0.0.11:8080", "b2": "10.0.0.12:8080", "b3": "10.0.0.13:8080"}


@pytest.fixture
def gw(lab, tmp_path):
    return Gateway(lab, tmp_path)


def status(gw: Gateway) -> dict:
    return json.loads(gw.nftlb("status", "--json").stdout)


def rows(doc: dict, name: str = "web") -> dict:
    return {b["backend"]: b for b in next(p for p in doc["pools"] if p["name"] == name)["backends"]}


def test_status_counts_connections_and_bytes_per_backend(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3) + pool("other", TCP3, port=81)))
    before = rows(status(gw))
    assert all(b["connections"] == 0 and b["bytes"] == 0 and b["open"] == 0 for b in before.values()), before

    res = lab.http_spread(VIP, 80, 60)
    assert res["failed"] == 0, res["errors"]
    after = rows(status(gw))
    for name, n in res["backends"].items():
        b = after[ADDR[name]]
        assert b["connections"] == n, (name, n, b)  # the kernel counted exactly the connections it picked
        assert b["packets"] >= 6 * n and b["bytes"] >= 300 * n, b  # handshake, request, reply, close
        assert b["serving"] and b["configured"] == "active"
    assert sum(b["connections"] for b in after.values()) == 60
    assert all(b["connections"] == 0 for b in rows(status(gw), "other").values())  # per service, not per backend

    text = gw.nftlb("status").stdout
    assert "pool web  198.51.100.10:80/tcp  hash  dnat  serving" in text, text
    assert "10.0.0.11:8080" in text


def test_status_shows_open_connections_while_held(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3)))
    held = lab.hold(VIP, 80)
    backend = ADDR[held.request()]
    doc = rows(status(gw))
    assert doc[backend]["open"] == 1, doc
    assert sum(b["open"] for b in doc.values()) == 1
    held.close()
    wait_for(lambda: rows(status(gw))[backend]["open"] == 0, 10, "the closed connection to leave conntrack's open states")


def test_drain_shows_in_status(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3)))
    gw.nftlb("drain", "web", "10.0.0.12:8080")
    doc = rows(status(gw))
    assert doc["10.0.0.12:8080"]["drained_by_operator"] and not doc["10.0.0.12:8080"]["serving"]
    assert doc["10.0.0.11:8080"]["serving"]
    assert "* drained with `nftlb drain`" in gw.nftlb("status").stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(gw: Gateway, port: int) -> dict:
    """GET /metrics from inside the gateway namespace; {(name, labels): value}."""
    code = ("import urllib.request,sys;"
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")
    cp = gw.lab.exec(gw.lab.gw, "python3", "-c", code, check=False)
    if cp.returncode != 0:
        return {}
    out = {}
    for family in text_string_to_metric_families(cp.stdout):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_endpoint_serves_prometheus_text_with_the_kernels_numbers(gw, lab):
    file = gw.write(HEALTH + "pools:\n" + pool("web", TCP3))
    port = free_port()
    watch = WatchProcess(gw, file, "--metrics", f"127.0.0.1:{port}")
    try:
        watch.saw("metrics on http://127.0.0.1")
        watch.saw("watching 3 backends")  # the table is applied (the metrics listener starts first)
        res = lab.http_spread(VIP, 80, 30)
        assert res["failed"] == 0
        m = wait_for(lambda: (lambda d: d if d.get(("nftlb_probe_duration_seconds_count", (("result", "ok"),)), 0) >= 6
                              else None)(scrape(gw, port)), 10, "probes to be observed")
        for name, n in res["backends"].items():
            key = (("backend", ADDR[name]), ("pool", "web"))
            assert m[("nftlb_backend_connections_total", key)] == n
            assert m[("nftlb_backend_bytes_total", key)] > 0
            assert m[("nftlb_backend_up", key)] == 1
            assert m[("nftlb_backend_open_connections", key)] == 0
        assert m[("nftlb_applies_total", ())] >= 1
        assert m[("nftlb_apply_failures_total", ())] == 0
        assert m[("nftlb_last_apply_success_timestamp_seconds", ())] > 1.7e9
        assert m[("nftlb_table_loaded", ())] == 1

        lab.stop_server(lab.backend("b2"))
        watch.saw("pool web backend 10.0.0.12:8080 down")
        m = scrape(gw, port)
        key = (("backend", "10.0.0.12:8080"), ("pool", "web"))
        assert m[("nftlb_backend_up", key)] == 0 and m[("nftlb_backend_serving", key)] == 0
        assert m[("nftlb_backend_transitions_total", key + (("to", "down"),))] == 1
        assert m[("nftlb_probe_duration_seconds_count", (("result", "failed"),))] >= 3
    finally:
        assert watch.stop() == 0


def test_metrics_textfile_for_cron(gw, lab, tmp_path):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3)))
    assert lab.http_spread(VIP, 80, 10)["failed"] == 0
    path = tmp_path / "nftlb.prom"
    gw.nftlb("metrics", "--textfile", path)
    samples = {(s.name, s.labels.get("backend")): s.value
               for f in text_string_to_metric_families(path.read_text()) for s in f.samples}
    assert sum(v for (name, _), v in samples.items() if name == "nftlb_backend_connections_total") == 10
    assert samples[("nftlb_applies_total", None)] == 1
    assert not list(tmp_path.glob("*.prom.*"))  # written atomically: no temp file left


def test_rollback_restores_the_previous_generation_and_then_the_one_before(gw, lab):
    files = [gw.write("pools:\n" + pool("web", TCP3[:k]), f"pools{k}.yaml") for k in (1, 2, 3)]
    listings = []
    for f in files:
        gw.nftlb("apply", f)
        listings.append(gw.live())
    assert listings[0] != listings[1] != listings[2]
    hist = json.loads(gw.nftlb("history", "--json").stdout)["generations"]
    assert [(g["id"], g["live"]) for g in hist] == [(3, True), (2, False), (1, False)]

    handles = gw.ruleset_with_handles()
    out = gw.nftlb("rollback", "--dry-run").stdout
    assert "would roll back to generation #2" in out and "10.0.0.13" in out
    assert gw.ruleset_with_handles() == handles  # the dry run changed nothing

    assert "rolled back to generation #2" in gw.nftlb("rollback").stdout
    assert gw.live() == listings[1]
    assert gw.backends(VIP, 80) == {"10.0.0.11", "10.0.0.12"}
    assert "rolled back to generation #1" in gw.nftlb("rollback").stdout
    assert gw.live() == listings[0]
    res = lab.http_spread(VIP, 80, 10)
    assert res["backends"] == {"b1": 10}, res

    err = gw.nftlb("rollback", expect=2).stderr
    assert "no generation before #1" in err
    hist = json.loads(gw.nftlb("history", "--json").stdout)["generations"]
    assert [(g["id"], g["live"]) for g in hist] == [(3, False), (2, False), (1, True)]

    gw.nftlb("apply", files[2])  # a new apply after rollbacks drops the generations rolled back from
    hist = json.loads(gw.nftlb("history", "--json").stdout)["generations"]
    assert [(g["id"], g["live"]) for g in hist] == [(4, True), (1, False)]
    assert gw.live() == listings[2]


def test_status_counts_ipv6_and_udp_too(gw, lab):
    from integration.test_apply import VIP6
    gw.nftlb("apply", gw.write("pools:\n" + pool(
        "web6", ["\"[fd00:b::11]:8080\"", "\"[fd00:b::12]:8080\""], vip=VIP6, mode="masquerade") + pool(
        "dns", ["10.0.0.11:5353", "10.0.0.12:5353"], port=53, protocol="udp")))
    res6 = lab.http_spread(VIP6, 80, 20)
    udp = lab.udp_spread(VIP, 53, 20)
    assert res6["failed"] == 0 and udp["failed"] == 0
    doc = status(gw)
    web6, dns = rows(doc, "web6"), rows(doc, "dns")
    for name, n in res6["backends"].items():
        assert web6[f"[fd00:b::{ADDR[name][7:9]}]:8080"]["connections"] == n, web6
    for name, n in udp["backends"].items():
        b = dns[ADDR[name].replace("8080", "5353")]
        assert b["connections"] == n and b["open"] == n and b["packets"] >= 2 * n, b  # request and reply
