"""nftlb doctor without a kernel: a fake /proc tree, a stub backend, psutil monkeypatched."""

from __future__ import annotations

import socket
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from nftlb import checks, doctor, pools_file, schema, views
from nftlb.errors import KernelError

Addr = namedtuple("Addr", "ip port")
Conn = namedtuple("Conn", "fd family type laddr raddr status pid")
IfAddr = namedtuple("IfAddr", "family address netmask broadcast ptp")


class Stub:
    """A backend whose kernel refuses any script containing one of `refuse`."""

    name = "stub"

    def __init__(self, *refuse: str):
        self.refuse = refuse
        self.scripts: list[tuple[str, bool]] = []

    def run(self, script: str, *, check: bool = False) -> None:
        self.scripts.append((script, check))
        if any(word in script for word in self.refuse):
            raise KernelError("the kernel check failed:\nError: Could not process rule: No such file or directory\n"
                              "more detail")

    def list(self, what: str) -> str | None:
        return None

    def generation(self) -> int:
        return 0


def fake_proc(root: Path, *, forward: str = "1", forward6: str | None = "1", rp: dict | None = None,
              conntrack: tuple[int, int] | None = (10, 262144)) -> Path:
    def put(rel: str, value: object) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")

    put("sys/net/ipv4/ip_forward", forward)
    if forward6 is not None:
        put("sys/net/ipv6/conf/all/forwarding", forward6)
    for iface, value in (rp or {"all": 0, "default": 0, "lo": 0, "eth0": 2, "eth1": 0}).items():
        put(f"sys/net/ipv4/conf/{iface}/rp_filter", value)
    if conntrack is not None:
        put("sys/net/netfilter/nf_conntrack_count", conntrack[0])
        put("sys/net/netfilter/nf_conntrack_max", conntrack[1])
    return root


def config(*pools: str) -> schema.Config:
    return pools_file.parse("pools:\n" + "".join(pools))


def pool(name: str, vip: str = "198.51.100.10", port: int = 80, protocol: str = "tcp",
         backends: str = "[10.0.0.11:8080, 10.0.0.12:8080]") -> str:
    return f"  - {{name: {name}, vip: '{vip}', port: {port}, protocol: {protocol}, backends: {backends}}}\n"


WEB = config(pool("web"))
WEB6 = config(pool("web6", vip="2001:db8::10", backends="['[fd00:b::11]:8080']"))


@pytest.fixture
def box(monkeypatch):
    """This box: addresses per interface, sockets, processes, routes, tools; edit the dicts in a test."""
    state = {
        "addrs": {"lo": ["127.0.0.1", "::1"], "eth0": ["203.0.113.2", "fe80::1%eth0"]},
        "conns": [],
        "names": {},
        "routes": {},  # vip text -> route dict; missing: {"dev": "eth0", "gateway": "203.0.113.1"}
        "rules": [],  # policy routing rules, as `ip -j rule show` gives them
    }
    monkeypatch.setattr(checks, "rules", lambda: list(state["rules"]))
    monkeypatch.setattr(doctor, "_nft_version", lambda: "nftables v1.0.6 (Lester Gooch #5)")
    monkeypatch.setattr(doctor, "_bindings", lambda: "0.1")
    routed = {"dev": "eth0", "gateway": "203.0.113.1"}
    monkeypatch.setattr(checks, "route", lambda vip: state["routes"].get(str(vip), routed))
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        name: [IfAddr(socket.AF_INET6 if ":" in a else socket.AF_INET, a, None, None, None) for a in addrs]
        for name, addrs in state["addrs"].items()})
    monkeypatch.setattr(psutil, "net_connections", lambda kind="inet": list(state["conns"]))

    class Process:
        def __init__(self, pid: int):
            if pid not in state["names"]:
                raise psutil.NoSuchProcess(pid)
            self.pid = pid

        def name(self) -> str:
            return state["names"][self.pid]

    monkeypatch.setattr(psutil, "Process", Process)
    return state


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def listen(ip: str, port: int, pid: int | None = 4242, udp: bool = False) -> Conn:
    return Conn(3, socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                Addr(ip, port), (), psutil.CONN_NONE if udp else psutil.CONN_LISTEN, pid)


# --- kernel features --------------------------------------------------------------------


def test_kernel_probe_is_a_dry_run_with_every_feature(box, tmp_path):
    nft = Stub()
    check = by_name(doctor.run(None, nft, proc=fake_proc(tmp_path)))["kernel"]
    assert check.verdict == "ok"
    assert "nf_tables, nat, numgen, jhash, conntrack, masquerade and reject accepted (kernel dry-run)" in check.detail
    assert nft.scripts and all(check for _, check in nft.scripts)  # never committed
    script = nft.scripts[0][0]
    assert f"table inet {doctor.PROBE_TABLE} {{" in script and "nftlb_doctor" in script
    for part in ("dnat ip to numgen inc mod 2 map { 0 : 192.0.2.1, 1 : 192.0.2.2 }",
                 "jhash ip saddr . tcp sport mod 2 seed 0x1", "ct state new", "masquerade",
                 "type nat hook prerouting", "type nat hook postrouting", "reject with tcp reset"):
        assert part in script


def test_kernel_refusal_names_the_missing_feature_and_what_nft_said(box, tmp_path):
    nft = Stub("jhash")
    check = by_name(doctor.run(None, nft, proc=fake_proc(tmp_path)))["kernel"]
    assert check.verdict == "fail"
    assert check.detail == "the kernel refused jhash: Error: Could not process rule: No such file or directory"
    assert all(check for _, check in nft.scripts)


def test_kernel_refusing_nat_names_everything_that_needs_it(box, tmp_path):
    check = by_name(doctor.run(None, Stub("type nat"), proc=fake_proc(tmp_path)))["kernel"]
    assert check.verdict == "fail"
    assert "refused nat, numgen, jhash, conntrack, masquerade, reject:" in check.detail
    assert "nf_tables" not in check.detail


def test_no_backend_at_all_fails(box, tmp_path):
    assert by_name(doctor.run(None, None, proc=fake_proc(tmp_path)))["kernel"].verdict == "fail"


# --- tools ----------------------------------------------------------------------------


def test_tools_present(box, tmp_path):
    checks = by_name(doctor.run(None, Stub(), proc=fake_proc(tmp_path)))
    assert (checks["nft"].verdict, checks["nft"].detail) == ("ok", "nftables v1.0.6 (Lester Gooch #5)")
    assert checks["bindings"].verdict == "ok" and "0.1" in checks["bindings"].detail


@pytest.mark.parametrize("binary, bindings, nft_verdict, bindings_verdict", [
    (None, "0.1", "warn", "ok"),
    ("nftables v1.0.6", None, "ok", "warn"),
    (None, None, "fail", "fail"),
])
def test_tools_missing(box, tmp_path, monkeypatch, binary, bindings, nft_verdict, bindings_verdict):
    monkeypatch.setattr(doctor, "_nft_version", lambda: binary)
    monkeypatch.setattr(doctor, "_bindings", lambda: bindings)
    checks = by_name(doctor.run(None, Stub(), proc=fake_proc(tmp_path)))
    assert (checks["nft"].verdict, checks["bindings"].verdict) == (nft_verdict, bindings_verdict)


# --- forwarding -----------------------------------------------------------------------


def test_ip_forward_off_fails_when_backends_are_on_other_hosts(box, tmp_path):
    checks = doctor.run(WEB, Stub(), proc=fake_proc(tmp_path, forward="0"))
    check = by_name(checks)["ip_forward"]
    assert check.verdict == "fail"
    assert "10.0.0.11, 10.0.0.12" in check.detail and "sysctl -w net.ipv4.ip_forward=1" in check.detail
    assert doctor.exit_code(checks) == 1


def test_ip_forward_on_is_ok(box, tmp_path):
    checks = doctor.run(WEB, Stub(), proc=fake_proc(tmp_path, forward="1"))
    assert by_name(checks)["ip_forward"].verdict == "ok"
    assert doctor.exit_code(checks) == 0


def test_ip_forward_off_is_fine_when_every_backend_is_local(box, tmp_path):
    box["addrs"]["eth1"] = ["10.0.0.11", "10.0.0.12"]
    check = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path, forward="0")))["ip_forward"]
    assert check.verdict == "ok" and "every backend is local" in check.detail


def test_ip_forward_off_without_a_config_warns(box, tmp_path):
    checks = by_name(doctor.run(None, Stub(), proc=fake_proc(tmp_path, forward="0", forward6="0")))
    assert checks["ip_forward"].verdict == "warn"
    assert checks["ipv6_forwarding"].verdict == "ok"  # no config: nothing says IPv6 is needed


def test_ipv6_forwarding_off_fails_for_ipv6_pools_only(box, tmp_path):
    proc = fake_proc(tmp_path, forward6="0")
    assert by_name(doctor.run(WEB6, Stub(), proc=proc))["ipv6_forwarding"].verdict == "fail"
    check = by_name(doctor.run(WEB, Stub(), proc=proc))["ipv6_forwarding"]
    assert check.verdict == "ok" and "no IPv6 pools" in check.detail


def test_ipv6_disabled(box, tmp_path):
    proc = fake_proc(tmp_path, forward6=None)
    check = by_name(doctor.run(WEB6, Stub(), proc=proc))["ipv6_forwarding"]
    assert check.verdict == "fail" and "IPv6 is disabled" in check.detail
    check = by_name(doctor.run(None, Stub(), proc=proc))["ipv6_forwarding"]
    assert check.verdict == "ok" and "IPv6 is disabled" in check.detail


# --- rp_filter ------------------------------------------------------------------------


@pytest.mark.parametrize("rp, verdict, named", [
    ({"all": 0, "default": 0, "lo": 0, "eth0": 2, "eth1": 0}, "ok", []),
    ({"all": 0, "default": 0, "lo": 1, "eth0": 1, "eth1": 2}, "warn", ["eth0"]),
    ({"all": 1, "default": 0, "lo": 0, "eth0": 0, "eth1": 2}, "warn",  # effective: max(all, iface)
     ["default (new interfaces)", "eth0"]),
    ({"all": 2, "default": 1, "lo": 0, "eth0": 1, "eth1": 0}, "ok", []),
])
def test_rp_filter(box, tmp_path, rp, verdict, named):
    check = by_name(doctor.run(None, Stub(), proc=fake_proc(tmp_path, rp=rp)))["rp_filter"]
    assert check.verdict == verdict, check
    if named:
        assert check.detail.startswith(f"strict (1) on {', '.join(named)}:")
        assert "use 2 (loose)" in check.detail and "eth1" not in check.detail


# --- conntrack ------------------------------------------------------------------------


@pytest.mark.parametrize("count, limit, cfg, verdict, words", [
    (950, 1000, None, "fail", "950 of 1000 entries in use (95%)"),
    (800, 1000, None, "warn", "80%"),
    (10, 16384, WEB, "warn", "nf_conntrack_max is small"),
    (10, 16384, None, "ok", "10 of 16384"),
    (10, 262144, WEB, "ok", "10 of 262144 entries in use (0%)"),
])
def test_conntrack(box, tmp_path, count, limit, cfg, verdict, words):
    check = by_name(doctor.run(cfg, Stub(), proc=fake_proc(tmp_path, conntrack=(count, limit))))["conntrack"]
    assert check.verdict == verdict and words in check.detail, check
    if verdict != "ok":
        assert "net.netfilter.nf_conntrack_max" in check.detail


def test_conntrack_not_loaded(box, tmp_path):
    check = by_name(doctor.run(None, Stub(), proc=fake_proc(tmp_path, conntrack=None)))["conntrack"]
    assert check.verdict == "warn" and "conntrack module not loaded" in check.detail


# --- VIPs and listeners ---------------------------------------------------------------


def test_vip_local(box, tmp_path):
    box["addrs"]["vip0"] = ["198.51.100.10"]
    check = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))["vip 198.51.100.10"]
    assert check.verdict == "ok" and check.detail.startswith("local (on dev vip0)")


def test_vip_local_by_route(box, tmp_path):  # AnyIP: `ip route add local 198.51.100.0/24 dev lo`
    box["routes"]["198.51.100.10"] = {"type": "local", "dev": "lo"}
    check = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))["vip 198.51.100.10"]
    assert check.verdict == "ok" and check.detail.startswith("local (on dev lo)")


def test_vip_routed_and_unroutable(box, tmp_path):
    checks = doctor.run(config(pool("web"), pool("other", vip="203.0.113.99")), Stub(), proc=fake_proc(tmp_path))
    box_checks = by_name(checks)
    assert box_checks["vip 198.51.100.10"].verdict == "ok"
    assert "not local: routed via dev eth0 via 203.0.113.1" in box_checks["vip 198.51.100.10"].detail
    box["routes"]["203.0.113.99"] = {}
    check = by_name(doctor.run(config(pool("other", vip="203.0.113.99")), Stub(), proc=fake_proc(tmp_path)))
    assert check["vip 203.0.113.99"].verdict == "ok" and "no route" in check["vip 203.0.113.99"].detail
    assert "fine for DNAT" in check["vip 203.0.113.99"].detail


@pytest.mark.parametrize("where, own", [("local", "refused alike"), ("routed", "refused alike"),
                                        ("none", "'network unreachable' from its own stack")])
def test_refusal_says_how_a_refused_pool_answers(box, tmp_path, where, own):
    if where == "local":
        box["addrs"]["vip0"] = ["198.51.100.10"]
    elif where == "none":
        box["routes"]["198.51.100.10"] = {}
    proc = fake_proc(tmp_path)
    for rel, value in (("sys/net/ipv4/icmp_ratelimit", "1000"), ("sys/net/ipv4/icmp_ratemask", "6168")):
        (proc / rel).parent.mkdir(parents=True, exist_ok=True)
        (proc / rel).write_text(value + "\n")
    cfg = config(pool("web"), pool("dns", port=53, protocol="udp"))
    check = by_name(doctor.run(cfg, Stub(), proc=proc))["refusal 198.51.100.10"]
    assert check.verdict == "ok" and "before routing: TCP reset and ICMP port-unreachable" in check.detail
    assert "a burst of 6, then one per 1000 ms (net.ipv4.icmp_ratelimit)" in check.detail
    assert own in check.detail
    (proc / "sys/net/ipv4/icmp_ratemask").write_text("0\n")
    assert "not rate-limited" in by_name(doctor.run(cfg, Stub(), proc=proc))["refusal 198.51.100.10"].detail
    assert "ICMP" not in by_name(doctor.run(WEB, Stub(), proc=proc))["refusal 198.51.100.10"].detail  # tcp only


def test_vip_checked_once_per_address(box, tmp_path):
    checks = doctor.run(config(pool("a", port=80), pool("b", port=443)), Stub(), proc=fake_proc(tmp_path))
    assert [c.name for c in checks].count("vip 198.51.100.10") == 1


def test_listener_on_the_vip_is_shadowed(box, tmp_path):
    box["conns"] = [listen("198.51.100.10", 80, pid=4242), listen("198.51.100.10", 81)]
    box["names"][4242] = "nginx"
    checks = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))
    check = checks["listener 198.51.100.10:80/tcp"]
    assert check.verdict == "warn"
    assert check.detail == ("DNAT shadows it: nginx (pid 4242) listens on 198.51.100.10:80; "
                            "its clients through the VIP will reach the backends instead")
    assert "listeners" not in checks


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_wildcard_listener_counts_only_when_the_vip_is_local(box, tmp_path, wildcard):
    box["conns"] = [listen(wildcard, 80, pid=7)]
    box["names"][7] = "sshd"
    assert by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))["listeners"].verdict == "ok"
    box["addrs"]["vip0"] = ["198.51.100.10"]
    check = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))["listener 198.51.100.10:80/tcp"]
    assert check.verdict == "warn" and "sshd (pid 7)" in check.detail


def test_listener_protocol_must_match(box, tmp_path):
    box["conns"] = [listen("198.51.100.10", 53, udp=True, pid=None), listen("198.51.100.10", 80, udp=True)]
    cfg = config(pool("dns", port=53, protocol="udp"), pool("web", port=80))
    checks = by_name(doctor.run(cfg, Stub(), proc=fake_proc(tmp_path)))
    assert checks["listener 198.51.100.10:53/udp"].verdict == "warn"
    assert "a process (pid unknown) listens on 198.51.100.10:53" in checks["listener 198.51.100.10:53/udp"].detail
    assert "listener 198.51.100.10:80/tcp" not in checks  # a UDP socket on 80 does not meet a TCP pool


def test_ipv6_listener(box, tmp_path):
    box["addrs"]["vip0"] = ["2001:db8::10"]
    box["conns"] = [listen("0.0.0.0", 80, pid=8), listen("::", 80, pid=9)]  # 0.0.0.0 takes no IPv6
    box["names"].update({8: "nginx", 9: "python3"})
    check = by_name(doctor.run(WEB6, Stub(), proc=fake_proc(tmp_path)))["listener [2001:db8::10]:80/tcp"]
    assert check.verdict == "warn" and "python3 (pid 9) listens on [::]:80" in check.detail
    assert "nginx" not in check.detail


def test_ipv4_mapped_listener_address(box, tmp_path):
    box["conns"] = [listen("::ffff:198.51.100.10", 80, pid=9)]
    box["names"][9] = "java"
    check = by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))["listener 198.51.100.10:80/tcp"]
    assert check.verdict == "warn" and "java (pid 9)" in check.detail


# --- output ---------------------------------------------------------------------------


def test_text_has_one_line_per_check_and_a_verdict(box, tmp_path):
    checks = doctor.run(WEB, Stub(), proc=fake_proc(tmp_path, forward="0"))
    lines = views.doctor(checks).splitlines()
    assert len(lines) == len(checks) + 1
    for line, check in zip(lines, checks):
        assert line.split()[0] == check.verdict and check.name in line and line.endswith(check.detail)
    assert lines[-1].startswith("doctor: traffic is blocked (1 fail")
    assert all("\n" not in c.detail for c in checks)


def test_verdict_line_and_exit_code():
    ok = [doctor.Check("a", "ok", "fine"), doctor.Check("b", "ok", "fine")]
    warn = ok + [doctor.Check("c", "warn", "hmm")]
    fail = warn + [doctor.Check("d", "fail", "no")]
    assert [doctor.exit_code(x) for x in (ok, warn, fail)] == [0, 0, 1]
    assert views.doctor(ok).splitlines()[-1] == "doctor: ready (0 fail, 0 warn, 2 ok)"
    assert views.doctor(warn).splitlines()[-1] == "doctor: works, with warnings (0 fail, 1 warn, 2 ok)"
    assert views.doctor(ok).splitlines()[0] == "ok    a  fine"
    assert doctor.Check("x", "warn", "d").as_dict() == {"name": "x", "verdict": "warn", "detail": "d"}


PATHS = config(pool("web"), pool("six", vip="2001:db8::10", backends="['[fd00:b::11]:8080']")).model_copy(
    update={"health": schema.HealthDefaults(path=True)})


def test_path_sources_off_every_link_and_the_mark_uncaught(box, tmp_path):
    checks = by_name(doctor.run(PATHS, Stub(), proc=fake_proc(tmp_path)))
    assert checks["path_source 198.18.0.1"].verdict == checks["path_source 2001:2::1"].verdict == "ok"
    assert checks["path_mark"].verdict == "ok" and "0x6e6c6270" in checks["path_mark"].detail
    assert "path_mark" not in by_name(doctor.run(WEB, Stub(), proc=fake_proc(tmp_path)))  # no path probes


def test_path_source_on_a_link_or_local_and_a_catching_rule(box, tmp_path):
    box["routes"]["198.18.0.1"] = {"dev": "br0"}  # on-link: backends would ARP for it
    box["addrs"]["lo"].append("2001:2::1")
    box["rules"] = [{"priority": 100, "fwmark": "0x70", "fwmask": "0xff", "table": "7"},
                    {"priority": 101, "fwmark": "0x1", "table": "8"}]
    checks = by_name(doctor.run(PATHS, Stub(), proc=fake_proc(tmp_path)))
    assert checks["path_source 198.18.0.1"].verdict == "warn" and "on the link of dev br0" in \
        checks["path_source 198.18.0.1"].detail
    assert checks["path_source 2001:2::1"].verdict == "fail"
    assert checks["path_mark"].verdict == "warn" and checks["path_mark"].detail.endswith("0x70/0xff -> table 7")
