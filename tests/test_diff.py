import json

from nftlb import diff
from nftlb.state import Applied


def listing(elems, handle=7, packets=0, rules=("r1", "r2")):
    return json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "lb", "handle": handle}},
        {"map": {"family": "inet", "name": "m", "table": "lb", "handle": handle + 1, "elem": elems}},
        {"chain": {"family": "inet", "name": "c", "table": "lb", "handle": handle + 2}},
    ] + [{"rule": {"chain": "c", "handle": handle + 3 + i, "expr": [
        {"match": r}, {"counter": {"packets": packets, "bytes": packets * 60}}]}} for i, r in enumerate(rules)]})


def test_normalize_keys_objects_and_ignores_handles_counters_element_order():
    a = diff.normalize(listing([[0, "x"], [1, "y"]], handle=7, packets=0))
    b = diff.normalize(listing([[1, "y"], [0, "x"]], handle=99, packets=12345))
    assert a == b
    assert set(a) == {"table", "map m", "chain c"}
    assert [r["expr"][0]["match"] for r in a["chain c"]["rules"]] == ["r1", "r2"]
    assert diff.normalize(listing([[0, "x"]])) != a
    assert diff.normalize(listing([[0, "x"], [1, "y"]], rules=("r2", "r1"))) != a  # rule order matters


def test_one_object_listing_patches_a_table_snapshot():
    whole = diff.normalize(listing([[0, "x"]]))
    one = json.dumps({"nftables": [{"metainfo": {}}, {"map": {"family": "inet", "name": "m", "table": "lb",
                                                              "handle": 1, "elem": [[0, "x"]]}}]})
    assert diff.normalize(one) == {"map m": whole["map m"]}


def applied(ruleset="R1\n", live=None, table="lb"):
    return Applied(table=table, applied_at=0, source="pools.yaml", source_text="", status={}, ruleset=ruleset,
                   live=live if live is not None else {"chain c": {"name": "c"}}, backend="fake", version="0")


def test_in_sync_when_live_is_what_we_applied_and_file_unchanged():
    d = diff.compare("R1\n", "lb", applied(), {"chain c": {"name": "c"}})
    assert d.in_sync and d.changes == "" and d.drift is None


def test_file_change_shows_our_own_rendered_diff():
    d = diff.compare("R2\n", "lb", applied(), {"chain c": {"name": "c"}})
    assert not d.in_sync and d.drift is None
    assert "-R1\n+R2\n" in d.changes and d.changes.startswith("--- live: as loaded 1970-01-01 00:00:00 UTC")


def test_drift_is_detected_on_json_and_named_per_object():
    live = {"chain c": {"name": "c", "rules": [1]}, "chain x": {"name": "x"}}
    d = diff.compare("R1\n", "lb", applied(live={"chain c": {"name": "c"}, "map m": {}}), live)
    assert not d.in_sync and d.changes == ""
    assert d.drift.splitlines()[0] == "chain c: changed outside nftlb"
    assert "map m: deleted outside nftlb" in d.drift and "chain x: added outside nftlb" in d.drift


def test_table_absent_or_unknown():
    d = diff.compare("R1\n", "lb", None, None)
    assert not d.in_sync and d.drift is None and "+R1\n" in d.changes
    d = diff.compare("R1\n", "lb", applied(), None)
    assert d.drift == "table inet lb was deleted outside nftlb"
    d = diff.compare("R1\n", "lb", None, {"chain c": {}})
    assert not d.in_sync and "no record" in d.drift
    d = diff.compare("R1\n", "lb", applied(table="other"), {"chain c": {}})
    assert not d.in_sync and "no record" in d.drift
