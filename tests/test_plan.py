from collections import Counter
from ipaddress import ip_address

from nftlb import plan, pools_file
from nftlb.plan import Endpoint


def ep(addr, port=80):
    return Endpoint(ip_address(addr), port)


def build(text, **status):
    return plan.build(pools_file.parse(text), plan.Conditions(**status))


def test_slot_table_follows_weights_reduced_by_gcd():
    a, b, c = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")
    assert Counter(plan.slot_table([(a, 1), (b, 3)])) == {a: 1, b: 3}
    assert Counter(plan.slot_table([(a, 20), (b, 20), (c, 10)])) == {a: 2, b: 2, c: 1}
    assert plan.slot_table([]) == ()


def test_slot_table_interleaves_for_round_robin():
    a, b, c = ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")
    slots = plan.slot_table([(a, 5), (b, 1), (c, 1)])
    assert slots == (a, a, b, a, c, a, a)  # nginx smooth weighted round-robin: no run of b/c blocks
    assert max(len(run) for run in "".join("x" if s == a else "." for s in slots).split(".")) <= 2 * 2


def test_drained_backends_take_no_slots_and_file_order_does_not_matter():
    first = build("""
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends: [10.0.0.3, 10.0.0.1, {address: 10.0.0.2, state: drain}]
""")
    second = build("""
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    backends: [{address: 10.0.0.2, state: drain}, 10.0.0.1, 10.0.0.3]
""")
    assert first == second
    web = first.pools[0]
    assert set(web.active) == {ep("10.0.0.1"), ep("10.0.0.3")}
    assert len(web.slots) == web.size == 41  # three configured backends: 41 slots (maglev.default_size)
    assert web.draining == (ep("10.0.0.2"),)
    assert web.backends == (ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3"))
    assert (web.kind, web.chain, web.service) == ("hash", "hash4_tcp_41", "198.51.100.10:80/tcp")


def test_kinds_and_chains():
    p = build("""
pools:
  - {name: h, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2], table_size: 251, persistence: 10m}
  - {name: s, vip: 198.51.100.2, port: 80, scheduler: source-hash, backends: [10.0.0.1, 10.0.0.2]}
  - {name: r, vip: 198.51.100.3, port: 80, scheduler: round-robin, backends: [10.0.0.1, 10.0.0.2]}
  - {name: n, vip: 198.51.100.4, port: 53, protocol: udp, scheduler: random, backends: [10.0.0.1, 10.0.0.2]}
  - {name: one, vip: "2001:db8::1", port: 80, backends: [fd00::1]}
  - {name: off, vip: 198.51.100.5, port: 80, backends: [{address: 10.0.0.1, state: drain}]}
""".replace("name: off", "name: 'off'"))
    got = {x.name: (x.kind, x.chain, len(x.slots)) for x in p.pools}
    assert got == {
        "h": ("hash", "hash4_tcp_251_p600", 251), "s": ("srchash", "srchash4_tcp_53", 53),
        "r": ("rr", "rr_r", 2), "n": ("random", "random4_udp_2", 2),
        "one": ("direct", "direct6_tcp", 1), "off": ("", "", 0),
    }
    assert sorted(p.group_chains()) == ["hash4_tcp_251_p600", "random4_udp_2", "srchash4_tcp_53"]
    assert list(p.sticky()) == [("4", "tcp", 600)]


def test_backups_and_keep_last():
    text = """
pools:
  - name: web
    vip: 198.51.100.10
    port: 80
    when_all_down: keep-last
    backends: [10.0.0.1, 10.0.0.2, {address: 10.0.0.9, backup: true}]
"""
    down = frozenset({("web", "10.0.0.1:80"), ("web", "10.0.0.2:80")})
    web = build(text, down=down).pools[0]
    assert web.active == (ep("10.0.0.9"),) and web.fallback == "backups" and web.kind == "direct"
    web = build(text, down=down | {("web", "10.0.0.9:80")}, last={"web": ("10.0.0.2:80",)}).pools[0]
    assert web.active == (ep("10.0.0.2"),) and web.fallback == "keep-last"  # the last set stays
    web = build(text, down=down | {("web", "10.0.0.9:80")}, drained=frozenset({("web", "10.0.0.2:80")}),
                last={"web": ("10.0.0.2:80",)}).pools[0]
    assert web.fallback == "keep-last" and ep("10.0.0.2") not in web.active  # a drain always wins


def test_families_and_refusing():
    p = build("""
pools:
  - {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2], mode: masquerade}
  - {name: b, vip: "2001:db8::1", port: 53, protocol: udp, backends: ["fd00::1"]}
  - {name: c, vip: 198.51.100.2, port: 80, backends: [{address: 10.0.0.1, state: drain}]}
""")
    assert [(x.name, x.family, x.kind) for x in p.pools] == [("a", "ip", "hash"), ("b", "ip6", "direct"), ("c", "ip", "")]
    assert p.pool("c").chain == ""  # refused: its services element goes to the `refuse` chain
    assert ep("fd00::1", 53).display == "[fd00::1]:53"
