"""The update engine: old plan + small transaction == new plan loaded whole (on the fake kernel)."""


import pytest
from plans import random_plans

from nftlb import plan, pools_file, render, update
from nftlb.diff import normalize
from nftlb.kernel.fake import Fake

WEB = """
seed: 0x5eed
pools:
  - {name: web, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2, 10.0.0.3]}
  - {name: api, vip: 198.51.100.1, port: 443, backends: [10.0.0.1, 10.0.0.2]}
  - {name: dns, vip: 198.51.100.2, port: 53, protocol: udp, backends: [10.0.0.1]}
"""


def build(text, **status):
    return plan.build(pools_file.parse(text), plan.Conditions(**status))


def test_one_backend_down_touches_only_its_pool():
    old = build(WEB)
    new = build(WEB, down=frozenset({("web", "10.0.0.2:80")}))
    script, c = update.script(old, new)
    [(obj, gone)] = c.delete_elements
    [(obj2, came)] = c.add_elements
    assert obj == obj2 == "slots4_tcp"
    assert all(k.startswith("198.51.100.1 . 80 . ") for k in gone)  # only web's slots
    assert len(gone) == len(came) < new.pool("web").size  # only the slots that changed owner
    assert all(e.endswith(("10.0.0.1 . 80", "10.0.0.3 . 80")) for e in came)
    assert not (c.flush_chains or c.delete_chains or c.add_chains or c.delete_maps)
    assert "443" not in script and "delete table" not in script


def test_maglev_moves_only_the_down_backends_slots():
    old, new = build(WEB).pool("web"), build(WEB, down=frozenset({("web", "10.0.0.2:80")})).pool("web")
    moved = [i for i, (a, b) in enumerate(zip(old.slots, new.slots)) if a != b]
    assert moved and all(str(old.slots[i].address) == "10.0.0.2" for i in moved)


def test_last_backend_down_points_the_service_at_refuse():
    old = build(WEB)
    new = build(WEB, down=frozenset({("dns", "10.0.0.1:53")}))
    script, c = update.script(old, new)
    assert c.delete_elements == [("direct4_udp", ["198.51.100.2 . 53"]), ("services4", ["198.51.100.2 . udp . 53"])]
    assert c.add_elements == [("services4", ['198.51.100.2 . udp . 53 comment "dns" : goto refuse'])]
    assert "chain" not in script  # the refuse chain is always there: one element changes, nothing else
    _, back = update.script(new, old)
    assert not back.delete_chains and back.add_elements == [
        ("direct4_udp", ['198.51.100.2 . 53 comment "dns" : 10.0.0.1 . 53']),
        ("services4", ['198.51.100.2 . udp . 53 comment "dns" : goto direct4_udp'])]


def test_a_chain_used_by_no_pool_goes_and_a_new_one_comes():
    old = build(WEB)
    new = build(WEB.replace("port: 443, backends", "port: 443, scheduler: random, backends"))
    _, c = update.script(old, new)
    assert [name for name, _ in c.add_chains] == ["random4_tcp_2"]
    assert c.delete_chains == ["hash4_tcp_53"]  # api's, while hash4_tcp_41 still serves web
    _, back = update.script(new, old)
    assert back.delete_chains == ["random4_tcp_2"] and back.flush_chains == ["random4_tcp_2"]
    assert [name for name, _ in back.add_chains] == ["hash4_tcp_53"]


def test_persistence_groups_come_and_go_with_their_objects():
    old = build(WEB)
    new = build(WEB.replace("port: 443, backends", "port: 443, persistence: 1m, backends"))
    script, c = update.script(old, new)
    assert c.add_sticky == [("4", "tcp", 60)] and c.flush_chains[0] == "remember"
    assert "map sticky4_tcp_60" in script and "update @sticky4_tcp_60" in script
    script, c = update.script(new, old)
    assert c.delete_maps == ["sticky4_tcp_60"] and c.delete_sets == ["persist4_tcp_60"]


def test_no_change_no_script():
    assert update.script(build(WEB), build(WEB)) == ("", update.Changes())


def test_table_or_seed_change_needs_the_whole_table():
    with pytest.raises(ValueError):
        update.changes(build(WEB), build(WEB.replace("0x5eed", "0x1")))


def loaded(fake, table="nftlb"):
    return normalize(fake.list(f"table inet {table}"))


@pytest.mark.parametrize("seed", range(40))
def test_update_equals_whole_load_on_the_fake(seed):
    """Walk random plans; after each small transaction the table equals the new plan loaded whole."""
    plans = list(random_plans(seed, 8))
    walked = Fake()
    walked.run(render.ruleset(plans[0]))
    for old, new in zip(plans, plans[1:]):
        script, _ = update.script(old, new)
        if script:
            walked.run(script)
        fresh = Fake()
        fresh.run(render.ruleset(new))
        assert loaded(walked) == loaded(fresh), script


# -- conntrack entries a change leaves stale (update.flows) -----------------------------------

def F(pool, vip, port, backend, unreplied, protocol="tcp", family="ip"):
    return update.Flows(pool, family, protocol, vip, port, backend, unreplied)


def test_a_backend_going_down_loses_its_unreplied_entries_and_with_reset_all():
    old = build(WEB)
    new = build(WEB, down=frozenset({("web", "10.0.0.2:80"), ("dns", "10.0.0.1:53")}))
    assert update.flows(old, new) == [
        F("web", "198.51.100.1", 80, ("10.0.0.2", 80), True),  # on_down keep (tcp): only unreplied ones
        F("dns", "198.51.100.2", 53, None, True, "udp"),  # dns has nothing left: refused, all its unreplied
    ]
    assert update.flows(old, new, reset=frozenset({"web", "dns"})) == [
        F("web", "198.51.100.1", 80, ("10.0.0.2", 80), False),  # reset: every entry toward it
        F("dns", "198.51.100.2", 53, None, True, "udp"),
        F("dns", "198.51.100.2", 53, ("10.0.0.1", 53), False, "udp"),
    ]
    assert str(update.flows(old, new)[0]) == "unreplied conntrack entries of pool web toward 10.0.0.2:80"


def test_only_changes_leave_entries_stale():
    down = frozenset({("web", "10.0.0.2:80")})
    assert update.flows(build(WEB, down=down), build(WEB, down=down)) == []  # down before: dealt with then
    assert update.flows(build(WEB, down=down), build(WEB)) == []  # coming back up
    drained = build(WEB, drained=frozenset({("web", "10.0.0.2:80")}))
    assert update.flows(build(WEB), drained) == []  # a drain keeps what is open, and a drained backend answers
    refused = build(WEB, drained=frozenset({("dns", "10.0.0.1:53")}))
    assert update.flows(build(WEB), refused) == [F("dns", "198.51.100.2", 53, None, True, "udp")]
    assert update.flows(None, refused) == [F("dns", "198.51.100.2", 53, None, True, "udp")]  # unknown before


def test_keep_last_keeps_the_entries_of_what_it_keeps():
    text = WEB.replace("backends: [10.0.0.1, 10.0.0.2]}", "backends: [10.0.0.1, 10.0.0.2], when_all_down: keep-last}")
    old = build(text, last={"api": ("10.0.0.1:443", "10.0.0.2:443")})
    new = build(text, down=frozenset({("api", "10.0.0.1:443"), ("api", "10.0.0.2:443")}),
                last={"api": ("10.0.0.1:443", "10.0.0.2:443")})
    assert new.pool("api").fallback == "keep-last"
    assert update.flows(old, new) == []


def test_a_pool_that_changed_service_is_new():
    moved = WEB.replace("vip: 198.51.100.2, port: 53", "vip: 198.51.100.3, port: 53")
    old, new = build(WEB), build(moved, drained=frozenset({("dns", "10.0.0.1:53")}))
    assert update.flows(old, new) == [F("dns", "198.51.100.3", 53, None, True, "udp")]
