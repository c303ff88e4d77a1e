from collections import Counter
from ipaddress import ip_address

from nftlb import model, plan
from nftlb.plan import Endpoint


def ep(addr, port=80):
    return Endpoint(ip_address(addr), port)


def build(text):
    return plan.build(model.parse(text))


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
    assert web.slots == (ep("10.0.0.1"), ep("10.0.0.3"))
    assert web.draining == (ep("10.0.0.2"),)
    assert web.backends == (ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3"))
    assert (web.chain, web.slot_map, web.service) == ("pool_web", "pool_web_slots", "198.51.100.10:80/tcp")


def test_families_refusing_and_masquerade():
    p = build("""
pools:
  - {name: a, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2], mode: masquerade}
  - {name: b, vip: "2001:db8::1", port: 53, protocol: udp, backends: ["fd00::1"]}
  - {name: c, vip: 198.51.100.2, port: 80, backends: [{address: 10.0.0.1, state: drain}]}
""")
    assert [x.name for x in p.serving("ip")] == ["a"]
    assert [x.name for x in p.serving("ip6")] == ["b"]
    assert [x.name for x in p.refusing("ip")] == ["c"]
    assert p.refusing("ip6") == []
    assert [(x.name, str(b)) for x, b in p.masquerading("ip")] == [("a", "10.0.0.1 . 80"), ("a", "10.0.0.2 . 80")]
    assert p.masquerading("ip6") == []
    assert ep("fd00::1", 53).display == "[fd00::1]:53"
