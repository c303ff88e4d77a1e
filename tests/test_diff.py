import json

from nftlb import diff
from nftlb.state import Applied


def listing(elems, handle=7, packets=0):
    return json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "lb", "handle": handle}},
        {"map": {"family": "inet", "name": "m", "table": "lb", "handle": handle + 1, "elem": elems}},
        {"rule": {"chain": "c", "handle": handle + 2, "expr": [{"counter": {"packets": packets, "bytes": packets * 60}}]}},
    ]})


def test_normalize_ignores_handles_counters_element_order_and_version():
    a = diff.normalize(listing([[0, "x"], [1, "y"]], handle=7, packets=0))
    b = diff.normalize(listing([[1, "y"], [0, "x"]], handle=99, packets=12345))
    assert a == b
    assert diff.normalize(listing([[0, "x"]])) != a


def applied(ruleset="R1\n", live=("L",), table="lb"):
    return Applied(table=table, applied_at=0, source="pools.yaml", source_text="", ruleset=ruleset,
                   live=list(live), live_text="table inet lb {\n\tL\n}\n", backend="fake", version="0")


def test_in_sync_when_live_is_what_we_applied_and_file_unchanged():
    d = diff.compare("R1\n", "lb", applied(), ["L"], "table inet lb {\n\tL\n}\n")
    assert d.in_sync and d.changes == "" and d.drift is None


def test_file_change_shows_our_own_rendered_diff():
    d = diff.compare("R2\n", "lb", applied(), ["L"], "irrelevant")
    assert not d.in_sync and d.drift is None
    assert "-R1\n+R2\n" in d.changes and d.changes.startswith("--- live: as applied 1970-01-01 00:00:00 UTC")


def test_drift_is_detected_on_json_and_shown_as_nft_text():
    d = diff.compare("R1\n", "lb", applied(), ["L", "added by hand"], "table inet lb {\n\tL\n\tX\n}\n")
    assert not d.in_sync and d.changes == ""
    assert "+\tX\n" in d.drift


def test_table_absent_or_unknown():
    d = diff.compare("R1\n", "lb", None, None, None)
    assert not d.in_sync and d.drift is None and "+R1\n" in d.changes
    d = diff.compare("R1\n", "lb", applied(), None, None)
    assert d.drift == "table inet lb was deleted outside nftlb"
    d = diff.compare("R1\n", "lb", None, ["L"], "table inet lb {}\n")
    assert not d.in_sync and "no record" in d.drift
    d = diff.compare("R1\n", "lb", applied(table="other"), ["L"], "table inet lb {}\n")
    assert not d.in_sync and "no record" in d.drift
