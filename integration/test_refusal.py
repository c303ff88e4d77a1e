"""A refused pool is refused on every topology (issue 10, part 1).

The refusal lives in the nat chains' one lookup per new connection (`goto refuse`), which
runs at prerouting and output, before routing. So a pool without a usable backend answers
with a TCP reset or an ICMP port-unreachable whether its VIP is local to the gateway,
covered by one of its routes, or not routable there at all (the common DNAT set-up: the
upstream router sends the VIP to the gateway, which only ever DNATs it).

The lab's gateway has no default route, so by default a VIP has no route there.
"""

from __future__ import annotations

import pytest

from integration.test_apply import VIP, VIP6, Gateway, pool

TOPOLOGIES = ("no-route", "default-route", "local")


def topology(lab, kind: str) -> None:
    if kind == "default-route":  # the default route leads to b3, which drops what is not its own
        lab.exec(lab.gw, "ip", "route", "add", "default", "via", "10.0.0.13")
        lab.exec(lab.gw, "ip", "-6", "route", "add", "default", "via", "fd00:b::13")
    elif kind == "local":
        lab.add_local_vip(VIP)
        lab.add_local_vip(VIP6)


DRAINED = ("pools:\n"
           + pool("web", ["{address: 10.0.0.11, port: 8080, state: drain}"])
           + pool("web6", ["{address: 'fd00:b::11', port: 8080, state: drain}"], vip=VIP6)
           + pool("dns", ["{address: 10.0.0.11, port: 5353, state: drain}"], port=53, protocol="udp")
           + pool("dns6", ["{address: 'fd00:b::11', port: 5353, state: drain}"], vip=VIP6, port=53, protocol="udp"))


def assert_all_refused_fast(res: dict, what: str) -> None:
    times = sorted(t for _, t, _ in res["results"])
    print(f"{what}: {res['outcomes']}, median {times[len(times) // 2] * 1000:.2f} ms, "
          f"slowest {times[-1] * 1000:.2f} ms")
    assert res["outcomes"] == {"refused": 100}, (what, res["outcomes"])
    assert times[-1] < 0.05, (what, times[-5:])


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_a_refused_pool_is_refused_on_every_topology(lab_factory, tmp_path, kind):
    lab = lab_factory()
    gw = Gateway(lab, tmp_path)
    topology(lab, kind)
    out = gw.nftlb("apply", gw.write(DRAINED)).stdout
    assert "refusing new connections (no active backend): web, web6, dns, dns6" in out

    for vip in (VIP, VIP6):  # 100 consecutive new TCP connections from a forwarded client
        assert_all_refused_fast(lab.connects(vip, 80, 100, "tcp", timeout=1.0), f"{kind} tcp {vip}")

    # UDP: every datagram is refused by nftlb; the kernel rate-limits the ICMP errors it sends
    # (per peer; net.ipv4.icmp_ratelimit, icmp_msgs_per_sec), so some may go unanswered
    for vip in (VIP, VIP6):
        res = lab.connects(vip, 53, 20, "udp", timeout=0.2)
        print(f"{kind} udp {vip}: {res['outcomes']}")
        assert res["outcomes"].get("refused", 0) >= 6 and not res["outcomes"].get("answered"), res["outcomes"]
        assert set(res["outcomes"]) <= {"refused", "timeout"}, res["outcomes"]

    # the gateway's own connections: refused where it has a route to the VIP; without one its
    # own stack says "network unreachable" before any hook (nothing to refuse)
    for vip in (VIP, VIP6):
        res = lab.connects(vip, 80, 10, "tcp", timeout=1.0, ns=lab.gw)
        expected = "unreachable" if kind == "no-route" else "refused"
        assert res["outcomes"] == {expected: 10}, (kind, vip, res["outcomes"])


def test_refusal_control_without_nftlb_the_no_route_vip_times_out(lab_factory):
    """The control: the same no-route gateway without nftlb's table black-holes the VIP
    (routing drops it; at most a rate-limited ICMP net-unreachable comes back)."""
    lab = lab_factory()
    res = lab.connects(VIP, 80, 10, "tcp", timeout=0.3)
    assert res["outcomes"].get("refused", 0) == 0, res["outcomes"]
    assert res["outcomes"].get("timeout", 0) >= 4, res["outcomes"]
    res = lab.connects(VIP6, 80, 5, "tcp", timeout=0.3)
    assert res["outcomes"].get("refused", 0) == 0, res["outcomes"]


# -- all down under the watcher, then up again; stale conntrack entries ------------------------

BLACKHOLE = "table inet blackhole {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n" \
            "\t\ttcp dport 8080 drop\n\t\tudp dport 5353 drop\n\t}\n}\n"


def blackhole(lab, names, on: bool) -> None:
    """A backend host that stops answering at all (dead, cut off): its SYNs vanish."""
    for name in names:
        ns = lab.backend(name).ns
        if on:
            lab.exec(ns, "nft", "-f", "-", input=BLACKHOLE)
        else:
            lab.exec(ns, "nft", "delete", "table", "inet", "blackhole")


def syn_sent(lab, sport_from: int, sport_to: int) -> list[int]:
    """Client ports of the gateway's TCP entries to the VIP that never saw a reply."""
    out = lab.exec(lab.gw, "conntrack", "-L", "-p", "tcp", "--orig-dst", VIP, check=False).stdout
    ports = []
    for line in out.splitlines():
        if "SYN_SENT" in line and "[UNREPLIED]" in line:
            sport = int(line.split("sport=")[1].split()[0])
            if sport_from <= sport < sport_to:
                ports.append(sport)
    return sorted(ports)


def test_a_stale_entry_overrides_the_table_control(lab_factory, tmp_path):
    """The control for the test below: a client kernel reuses the source port of a connection that
    got no answer, and its SYN follows the stale SYN_SENT entry to the dead backend, whatever the
    table now says. Here the table is switched to refusal by hand, without touching conntrack."""
    lab = lab_factory(backends=1)
    lab.start_servers()
    gw = Gateway(lab, tmp_path)
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", ["10.0.0.11:8080"])))
    blackhole(lab, ["b1"], True)
    assert lab.connects(VIP, 80, 1, "tcp", timeout=0.3, first_sport=41000)["outcomes"] == {"timeout": 1}
    assert syn_sent(lab, 41000, 41001) == [41000]
    gw.nft("-f", "-", input=f"delete element inet nftlb services4 {{ {VIP} . tcp . 80 }}\n"
                            f"add element inet nftlb services4 {{ {VIP} . tcp . 80 : goto refuse }}\n")
    assert lab.connects(VIP, 80, 1, "tcp", timeout=0.3, first_sport=41001)["outcomes"] == {"refused": 1}
    assert lab.connects(VIP, 80, 1, "tcp", timeout=0.3, first_sport=41000)["outcomes"] == {"timeout": 1}


def test_all_down_is_refused_at_once_then_flows_again_at_once(lab_factory, tmp_path):
    from integration.test_watch import WatchProcess, backends_in_pool, wait_for

    lab = lab_factory()
    lab.start_servers()
    gw = Gateway(lab, tmp_path)
    # fall 5 x 0.5 s: time enough to make stale entries (and see them) before the watcher acts
    f = gw.write("health: {interval: 0.5, timeout: 0.3, rise: 2, fall: 5}\npools:\n"
                 + pool("web", ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 3 backends in 1 pools")
    assert lab.connects(VIP, 80, 30, "tcp", timeout=1.0)["outcomes"] == {"answered": 30}

    blackhole(lab, ["b1", "b2", "b3"], True)
    # before the watcher sees it: connections from ports 42000.. get no answer, and leave
    # SYN_SENT [UNREPLIED] entries toward the dead backends
    res = lab.connects(VIP, 80, 10, "tcp", timeout=0.05, first_sport=42000)
    stale = syn_sent(lab, 42000, 42010)
    print(f"before the refusal: {res['outcomes']}, {len(stale)} SYN_SENT entries from ports 42000-42009")
    assert stale, "no stale entry was made: the test would prove nothing"
    watcher.saw("pool web: no backend up; refusing new connections")
    wait_for(lambda: not backends_in_pool(gw, "web"), 5, "web refused")

    assert syn_sent(lab, 42000, 42010) == []  # the refusal took the unreplied entries with it
    reused = lab.connects(VIP, 80, 10, "tcp", timeout=1.0, first_sport=42000)
    assert reused["outcomes"] == {"refused": 10}, reused  # the same ports, refused too (control above)
    assert_all_refused_fast(lab.connects(VIP, 80, 100, "tcp", timeout=1.0), "all down under the watcher")

    blackhole(lab, ["b1", "b2", "b3"], False)
    wait_for(lambda: len(backends_in_pool(gw, "web")) == 3, 5, "all three back")
    # at once: no stale state from the refused attempts (rejected first packets are never confirmed)
    back = lab.connects(VIP, 80, 100, "tcp", timeout=1.0)
    assert back["outcomes"] == {"answered": 100}, back["outcomes"]
    assert lab.connects(VIP, 80, 10, "tcp", timeout=1.0, first_sport=42000)["outcomes"] == {"answered": 10}
    assert watcher.stop() == 0


def udp_unreplied(lab, sport_from: int, sport_to: int) -> dict[int, str]:
    """Client port -> backend of the gateway's UDP entries to the VIP that never saw a reply."""
    out = lab.exec(lab.gw, "conntrack", "-L", "-p", "udp", "--orig-dst", VIP, check=False).stdout
    found = {}
    for line in out.splitlines():
        if "[UNREPLIED]" in line:
            sport = int(line.split("sport=")[1].split()[0])
            if sport_from <= sport < sport_to:
                found[sport] = line.split("src=")[2].split()[0]
    return found


def test_a_udp_backend_going_down_loses_its_unreplied_flows_with_on_down_keep(lab_factory, tmp_path):
    from integration.test_watch import WatchProcess, backends_in_pool, wait_for

    lab = lab_factory(backends=2)
    lab.start_servers()
    gw = Gateway(lab, tmp_path)
    f = gw.write("health: {interval: 0.5, timeout: 0.3, rise: 2, fall: 5}\npools:\n"
                 + pool("dns", ["10.0.0.11:5353", "10.0.0.12:5353"], port=53, protocol="udp", on_down="keep",
                        health="{port: 8080}"))
    watcher = WatchProcess(gw, f)
    watcher.saw("watching 2 backends in 1 pools")
    blackhole(lab, ["b1"], True)
    first = lab.connects(VIP, 53, 20, "udp", timeout=0.05, first_sport=43000)
    again = lab.connects(VIP, 53, 20, "udp", timeout=0.05, first_sport=43000)  # the same 20 flows
    stale = udp_unreplied(lab, 43000, 43020)
    print(f"before the watcher acts: {first['outcomes']}, again {again['outcomes']}, unreplied {len(stale)}")
    # the control: a client that keeps its port stays with the dead backend (the entry is refreshed)
    assert stale and set(stale.values()) == {"10.0.0.11"}
    assert again["outcomes"].get("timeout") == len(stale) == first["outcomes"].get("timeout")
    wait_for(lambda: backends_in_pool(gw, "dns", port=53, proto="udp") == {"10.0.0.12"}, 10, "b1 out")
    watcher.saw("unreplied conntrack entries of pool dns toward 10.0.0.11:5353: ")
    assert udp_unreplied(lab, 43000, 43020) == {}
    after = lab.connects(VIP, 53, 20, "udp", timeout=0.5, first_sport=43000)
    assert after["outcomes"] == {"answered": 20}, after  # the same ports, all to b2 now
    assert watcher.stop() == 0
