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


def applied(table="lb", generation=7, snapshot=None):
    return Applied(table=table, applied_at=0, source="pools.yaml", source_text="pools: []\n", conditions={},
                   generation=generation, snapshot=snapshot, kernel="fake", version="0")


def test_dynamic_map_contents_are_not_compared():
    listing = json.dumps({"nftables": [{"map": {"name": "sticky", "flags": ["timeout"], "elem": [[1, 2]]}}]})
    assert diff.normalize(listing) == {"map sticky": {"name": "sticky", "flags": ["timeout"]}}


def test_drift_report_names_each_object():
    report = diff.drift_report({"chain c": {"name": "c"}, "map m": {}},
                               {"chain c": {"name": "c", "rules": [1]}, "chain x": {"name": "x"}})
    assert report.splitlines()[0] == "chain c: changed outside nftlb"
    assert "map m: deleted outside nftlb" in report and "chain x: added outside nftlb" in report


def test_unified_is_empty_when_equal():
    assert diff.unified("a\n", "a\n", "x", "y") == ""
    assert "-a\n+b\n" in diff.unified("a\n", "b\n", "x", "y")
