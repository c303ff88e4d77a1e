"""The update engine: old plan + small transaction == new plan loaded whole (on the fake kernel)."""

import json

import pytest

from nftlb import model, plan, render, update
from nftlb.diff import normalize
from nftlb.fake import Fake

from plans import random_plans

WEB = """
seed: 0x5eed
pools:
  - {name: web, vip: 198.51.100.1, port: 80, backends: [10.0.0.1, 10.0.0.2, 10.0.0.3]}
  - {name: api, vip: 198.51.100.1, port: 443, backends: [10.0.0.1, 10.0.0.2]}
  - {name: dns, vip: 198.51.100.2, port: 53, protocol: udp, backends: [10.0.0.1]}
"""


def build(text, **status):
    return plan.build(model.parse(text), plan.Status(**status))


def test_one_backend_down_touches_only_its_pool():
    old = build(WEB)
    new = build(WEB, down=frozenset({("web", "10.0.0.2:80")}))
    script, c = update.script(old, new)
    assert [p.name for p in c.add_pools] == ["web"]
    assert c.flush_chains == ["pool_web"] and c.delete_maps == ["pool_web_slots"]
    assert c.delete_elements == [] and c.add_elements == []
    assert "pool_api" not in script and "pool_dns" not in script and "delete table" not in script
    assert sorted(c.touched) == [("chain", "pool_web"), ("map", "pool_web_slots")]


def test_last_backend_down_moves_the_pool_from_services_to_refuse():
    old = build(WEB)
    new = build(WEB, down=frozenset({("dns", "10.0.0.1:53")}))
    _, c = update.script(old, new)
    assert c.delete_elements == [("services4", ["198.51.100.2 . udp . 53"])]
    assert c.add_elements == [("refuse4", ["198.51.100.2 . udp . 53"])]


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
