"""nftlb apply on a real kernel: namespaces (client, gateway, backends), real TCP and UDP.

Each test gets fresh namespaces from the lab fixture; nftlb runs inside the gateway
namespace as the operator would run it (the CLI, as a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nftlb.diff import normalize

NFTLB = [sys.executable, "-m", "nftlb"]
RULES = Path(__file__).resolve().parent.parent / "rules"
VIP = "198.51.100.10"
VIP6 = "2001:db8::10"


class Gateway:
    """nftlb and nft inside the lab's gateway namespace, with a state dir of the test's own."""

    def __init__(self, lab, tmp_path):
        self.lab = lab
        self.dir = tmp_path
        self.state = tmp_path / "state"

    def write(self, text: str, name: str = "pools.yaml"):
        path = self.dir / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def nftlb(self, *args, expect: int = 0, backend: str | None = None) -> subprocess.CompletedProcess:
        argv = [*NFTLB, *map(str, args)]
        if backend and args[0] in ("apply", "diff", "remove"):
            argv += ["--backend", backend]
        cp = self.lab.exec(self.lab.gw, *argv, check=False, env={"NFTLB_STATE_DIR": str(self.state)})
        assert cp.returncode == expect, f"nftlb {args} exited {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
        assert "Traceback" not in cp.stderr
        return cp

    def nft(self, *args: str, input: str | None = None) -> str:
        return self.lab.exec(self.lab.gw, "nft", *args, input=input).stdout

    def live(self, table: str = "nftlb") -> list:
        return normalize(self.nft("-j", "list", "table", "inet", table))

    def backends(self, vip: str, port: int, proto: str = "tcp") -> set[str]:
        """Addresses taking new connections for vip:port: its slots, or its direct entry."""
        fam = "6" if ":" in vip else "4"
        out = set()
        for name in (f"slots{fam}_{proto}", f"direct{fam}_{proto}"):
            for key, value in (self.live().get(f"map {name}") or {}).get("elem", []):
                key = key.get("elem", {}).get("val", key)  # elements with a comment
                if key["concat"][:2] == [vip, port]:
                    out.add(value["concat"][0])
        return out

    def ruleset_with_handles(self) -> str:
        return self.nft("-a", "list", "ruleset")


@pytest.fixture
def gw(lab, tmp_path):
    return Gateway(lab, tmp_path)


def pool(name, backends, vip=VIP, port=80, **extra) -> str:
    lines = [f"  - name: {name}", f"    vip: \"{vip}\"", f"    port: {port}"]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    lines += ["    backends:"] + [f"      - {b}" for b in backends]
    return "\n".join(lines) + "\n"


TCP3 = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]


def within_half_of_fair(counts: dict, names, total: int) -> bool:
    fair = total / len(names)
    return all(0.5 * fair <= counts.get(n, 0) <= 1.5 * fair for n in names)


def test_hash_pool_spreads_new_connections_and_weights_hold(gw, lab):
    gw.nftlb("apply", gw.write("seed: 0x5eed\npools:\n" + pool("web", TCP3) + pool(
        "weighted", ["{address: 10.0.0.11, port: 8080, weight: 1}", "{address: 10.0.0.12, port: 8080, weight: 3}"],
        port=81)))

    res = lab.http_spread(VIP, 80, 300)
    print("hash pool, 300 connections:", res["backends"])
    assert res["failed"] == 0, res["errors"]
    assert within_half_of_fair(res["backends"], ["b1", "b2", "b3"], 300), res["backends"]

    res = lab.http_spread(VIP, 81, 300)
    print("weights 1:3, 300 connections:", res["backends"])
    assert res["failed"] == 0 and set(res["backends"]) == {"b1", "b2"}
    ratio = res["backends"]["b2"] / res["backends"]["b1"]
    assert 2.0 <= ratio <= 5.0, res["backends"]


def test_keepalive_connection_stays_on_one_backend(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3, scheduler="round-robin")))
    seen = set()
    for _ in range(6):
        answers = lab.keepalive(VIP, 80, requests=3)
        assert len(set(answers)) == 1, answers  # connections, not requests, are balanced
        seen.add(answers[0])
    assert seen == {"b1", "b2", "b3"}  # while new connections do go round


def test_established_connection_survives_reapply_even_when_its_backend_drains(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3)))
    held = lab.hold(VIP, 80)
    first = held.request()
    ip = {"b1": "10.0.0.11", "b2": "10.0.0.12", "b3": "10.0.0.13"}[first]
    others = [b for b in TCP3 if not b.startswith(ip + ":")]

    # Change the pool: drain the held connection's backend, reweight another.
    changed = gw.write("pools:\n" + pool("web", [f"{{address: {ip}, port: 8080, state: drain}}",
                                                f"{{address: {others[0].split(':')[0]}, port: 8080, weight: 3}}",
                                                others[1]]))
    out = gw.nftlb("apply", changed).stdout
    assert "pools changed web" in out
    for _ in range(3):
        assert held.request() == first  # conntrack keeps the established flow on its backend
    res = lab.http_spread(VIP, 80, 60)
    assert res["failed"] == 0 and first not in res["backends"], res  # no new connection to a drained one
    held.close()


def test_udp_pool_balances_and_replies_come_back(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool(
        "dns", ["10.0.0.11:5353", "10.0.0.12:5353", "10.0.0.13:5353"], port=53, protocol="udp")))
    res = lab.udp_spread(VIP, 53, 150)
    print("udp pool, 150 flows:", res["backends"])
    assert res["failed"] == 0, res["errors"]
    assert within_half_of_fair(res["backends"], ["b1", "b2", "b3"], 150), res["backends"]
    assert set(sum(res["peers"].values(), [])) == {"192.0.2.2"}  # plain DNAT: backends see the client


def test_ipv6_pool_balances_next_to_ipv4(gw, lab):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3) + pool(
        "web6", ["\"[fd00:b::11]:8080\"", "\"[fd00:b::12]:8080\"", "\"[fd00:b::13]:8080\""], vip=VIP6)))
    res = lab.http_spread(VIP6, 80, 150)
    print("ipv6 pool, 150 connections:", res["backends"])
    assert res["failed"] == 0, res["errors"]
    assert within_half_of_fair(res["backends"], ["b1", "b2", "b3"], 150), res["backends"]
    assert lab.http_spread(VIP, 80, 30)["failed"] == 0


def test_masquerade_reaches_backends_without_a_route_back(lab_factory, tmp_path):
    lab = lab_factory(routed_backends=False)
    lab.start_servers()
    gw = Gateway(lab, tmp_path)
    backends = ["10.0.0.11:8080", "10.0.0.12:8080"]
    gw.nftlb("apply", gw.write("pools:\n" + pool("plain", backends, vip="198.51.100.20")
                               + pool("full", backends, port=81, mode="masquerade")
                               + pool("full6", ["\"[fd00:b::11]:8080\"", "\"[fd00:b::12]:8080\""],
                                      vip=VIP6, port=81, mode="masquerade")))
    res = lab.http_spread("198.51.100.20", 80, 3, timeout=0.5)
    assert res["failed"] == 3  # dnat alone: the backends cannot answer the client
    res = lab.http_spread(VIP, 81, 40)
    assert res["failed"] == 0 and set(res["backends"]) == {"b1", "b2"}, res
    assert set(sum(res["peers"].values(), [])) == {"10.0.0.1"}  # they saw the gateway
    res = lab.http_spread(VIP6, 81, 20)
    assert res["failed"] == 0 and set(sum(res["peers"].values(), [])) == {"fd00:b::1"}, res


def test_gateway_itself_reaches_the_vip_through_the_output_hook(gw, lab):
    lab.add_local_vip(VIP)
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3, scheduler="round-robin")))
    res = lab.http_spread(VIP, 80, 30, ns=lab.gw)
    assert res["failed"] == 0 and res["backends"] == {"b1": 10, "b2": 10, "b3": 10}, res


def test_all_drained_pool_refuses_at_once(gw, lab):
    # Without nftlb's refusal these would vanish: the gateway routes the VIPs to b3,
    # which silently drops what is not addressed to it. One VIP is local to the gateway.
    lab.exec(lab.gw, "ip", "route", "add", "198.51.100.0/24", "via", "10.0.0.13")
    lab.add_local_vip("198.51.100.11")
    gw.nftlb("apply", gw.write("pools:\n" + pool("closed", ["{address: 10.0.0.11, port: 8080, state: drain}"])
                               + pool("closed-udp", ["{address: 10.0.0.11, port: 5353, state: drain}"],
                                      port=53, protocol="udp")
                               + pool("local", ["{address: 10.0.0.12, port: 8080, state: drain}"],
                                      vip="198.51.100.11")))
    for vip in (VIP, "198.51.100.11"):  # forwarded and local VIPs
        started = time.monotonic()
        res = lab.http_spread(vip, 80, 2, timeout=3)
        assert res["failed"] == 2 and time.monotonic() - started < 2.5, res
        assert all("refused" in e.lower() for e in res["errors"]), res["errors"]
    res = lab.udp_spread(VIP, 53, 2, timeout=3)
    assert res["failed"] == 2 and all("refused" in e.lower() for e in res["errors"]), res


def test_second_apply_is_in_sync_and_touches_nothing(gw):
    f = gw.write("pools:\n" + pool("web", TCP3))
    gw.nftlb("apply", f)
    before = gw.ruleset_with_handles()
    out = gw.nftlb("apply", f).stdout
    assert "in sync" in out
    assert gw.ruleset_with_handles() == before  # same handles: nothing was reloaded
    gw.nftlb("diff", f, expect=0)


def test_dry_run_and_diff_change_nothing(gw, lab):
    a = gw.write("pools:\n" + pool("web", TCP3), "a.yaml")
    b = gw.write("pools:\n" + pool("web", TCP3[:2]), "b.yaml")
    gw.nftlb("apply", a)
    before, state_before = gw.ruleset_with_handles(), (gw.state / "applied.json").read_bytes()

    out = gw.nftlb("diff", b, expect=1).stdout
    assert ": 10.0.0.13 . 8080" in out and all(
        "10.0.0.13" not in line for line in out.splitlines() if line.startswith("+"))
    out = gw.nftlb("apply", "--dry-run", b).stdout
    assert "dry run: the kernel accepts" in out and "10.0.0.13" in out
    assert gw.ruleset_with_handles() == before
    assert (gw.state / "applied.json").read_bytes() == state_before
    assert "b3" in lab.http_spread(VIP, 80, 60)["backends"]  # still the old pool


FOREIGN = """
table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept
	}
}
table ip nat {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 2222 dnat to 10.0.0.11:8080
	}
}
table inet nftlb_other {
	set blocked {
		type ipv4_addr
		elements = { 192.0.2.99 }
	}
}
"""


def test_foreign_tables_survive_apply_and_remove_byte_identical(gw, lab):
    gw.nft("-f", "-", input=FOREIGN)
    foreign = {t: gw.nft("-a", "list", "table", *t.split()) for t in ("inet filter", "ip nat", "inet nftlb_other")}

    def unchanged():
        return {t: gw.nft("-a", "list", "table", *t.split()) for t in foreign} == foreign

    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3)))
    assert unchanged()
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3[:2])))
    assert unchanged()
    assert lab.http_spread(VIP, 80, 10)["failed"] == 0
    assert gw.nftlb("remove").stdout == "deleted table inet nftlb\n"
    assert unchanged()
    tables = gw.nft("list", "tables").split("\n")
    assert "table inet nftlb" not in tables and len([t for t in tables if t]) == 3
    assert not (gw.state / "applied.json").exists()


# Runs inside the gateway: the real apply path with a script the kernel refuses at the
# end of the transaction (more elements than a set's size: ENFILE from nf_tables).
REJECTED = """
import sys
from nftlb import cli, render
BAD = "add set inet nftlb tiny { type ipv4_addr; size 1; }\\nadd element inet nftlb tiny { 10.0.0.1, 10.0.0.2 }\\n"
whole, small = render.ruleset, render.update
render.ruleset = lambda *a: whole(*a) + BAD
render.update = lambda *a: small(*a) + BAD
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("backend, transaction", [("libnftables", "small"), ("nft", "small"),
                                                  ("libnftables", "whole"), ("nft", "whole")])
def test_kernel_rejection_leaves_previous_ruleset_and_state(gw, lab, backend, transaction):
    gw.nftlb("apply", gw.write("pools:\n" + pool("web", TCP3), "a.yaml"), backend=backend)
    if transaction == "whole":  # no record of the live table: the next apply replaces it whole
        (gw.state / "applied.json").unlink()
    record = gw.state / "applied.json"
    live, state_before = gw.live(), record.read_bytes() if record.exists() else None
    cp = lab.exec(lab.gw, sys.executable, "-c", REJECTED, "apply", "--backend", backend,
                  str(gw.write("pools:\n" + pool("web", TCP3[:1]), "b.yaml")),
                  check=False, env={"NFTLB_STATE_DIR": str(gw.state)})
    assert cp.returncode == 3, cp
    assert "Too many open files" in cp.stderr and "Traceback" not in cp.stderr
    assert gw.live() == live  # the whole transaction was rolled back, delete included
    assert (record.read_bytes() if record.exists() else None) == state_before
    assert lab.http_spread(VIP, 80, 60)["backends"].keys() == {"b1", "b2", "b3"}


def test_both_kernel_backends_build_the_same_live_ruleset(gw):
    f = gw.write("pools:\n" + pool("web", TCP3) + pool(
        "web6", ["\"[fd00:b::11]:8080\"", "\"[fd00:b::12]:8080\""], vip=VIP6, mode="masquerade")
        + pool("dns", ["10.0.0.11:5353"], port=53, protocol="udp"))
    gw.nftlb("apply", f, backend="nft")
    by_binary = gw.live()
    gw.nftlb("diff", f, backend="libnftables", expect=0)  # each reads what the other wrote
    gw.nftlb("remove", backend="nft")
    gw.nftlb("apply", f, backend="libnftables")
    assert gw.live() == by_binary
    gw.nftlb("diff", f, backend="nft", expect=0)


@pytest.mark.parametrize("example", sorted(p.stem for p in RULES.glob("*.yaml")))
def test_nft_listing_of_our_table_loads_back(gw, example):
    """Operators save `nft list ruleset` and restore it at boot: what we load must round-trip."""
    gw.nftlb("apply", RULES / f"{example}.yaml")
    live, listing = gw.live(), gw.nft("list", "table", "inet", "nftlb")
    gw.nft("delete", "table", "inet", "nftlb")
    gw.nft("-f", "-", input=listing)
    assert gw.live() == live


def test_drift_is_seen_and_repaired(gw, lab):
    f = gw.write("pools:\n" + pool("web", TCP3))
    gw.nftlb("apply", f)
    gw.nft("add", "element", "inet", "nftlb", "services4", "{ 198.51.100.99 . tcp . 80 : accept }")
    out = gw.nftlb("diff", "--json", f, expect=1).stdout
    doc = json.loads(out)
    assert doc["in_sync"] is False and "198.51.100.99" in doc["drift"]
    gw.nftlb("apply", f)
    gw.nftlb("diff", f, expect=0)
