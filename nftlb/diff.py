"""Pure pieces of comparing the live table with the desired one.

Whether the live table is still what nftlb loaded is decided on the kernel's ruleset
generation, and where that moved, on parsed JSON listings (handles, counters, element
order and the contents of dynamic maps removed), never on nft's text format, which
changes between versions. What an operator reads is a unified diff of nftlb's own
rendered rulesets: the live one against the one the file asks for.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

_VOLATILE = {"handle", "metainfo"}


def normalize(listing: str) -> dict[str, dict]:
    """Comparable form of an `nft -j list` answer: object -> its JSON, with no handles, no
    counter values, elements sorted, and rules kept in order under their chain.

    Keys are "table", "chain NAME", "map NAME", "set NAME", ...; listing one object gives
    the same key and value as listing the whole table, so snapshots can be patched per object.
    """
    out: dict[str, dict] = {}
    for obj in json.loads(listing).get("nftables", []):
        for kind, body in obj.items():
            if kind == "metainfo":
                continue
            body = _clean(body)
            # elements that come and go with traffic: maps with timeouts, and the accounting sets
            # (a counter per element; nft 1.0.6 leaves "dynamic" out of JSON listings)
            if {"timeout", "dynamic"} & set(body.get("flags", ())) or "stmt" in body:
                body.pop("elem", None)
            if kind == "rule":
                out.setdefault(f"chain {body.get('chain')}", {}).setdefault("rules", []).append(body)
            elif kind == "table":
                out["table"] = body
            else:
                out.setdefault(f"{kind} {body.get('name')}", {}).update(body)
    return out


def _clean(value):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in _VOLATILE:
                continue
            if k == "counter" and isinstance(v, dict):
                v = {kk: 0 if kk in ("packets", "bytes") else vv for kk, vv in v.items()}
            out[k] = _clean(v)
            if k == "elem" and isinstance(out[k], list):
                out[k] = sorted(out[k], key=lambda e: json.dumps(e, sort_keys=True))
        return out
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@dataclass
class Diff:
    in_sync: bool
    changes: str  # unified diff, base -> desired ("" when none)
    drift: str | None  # what happened to the live table outside nftlb, if anything

    def as_dict(self) -> dict:
        return {"in_sync": self.in_sync, "changes": self.changes, "drift": self.drift}


def drift_report(expected: dict, live: dict) -> str:
    """Which objects of our table differ from what nftlb loaded, and how (as JSON)."""
    lines = []
    for key in sorted(set(expected) | set(live)):
        if key not in live:
            lines.append(f"{key}: deleted outside nftlb")
        elif key not in expected:
            lines.append(f"{key}: added outside nftlb")
        elif live[key] != expected[key]:
            lines.append(f"{key}: changed outside nftlb")
            a, b = (json.dumps(x, indent=1, sort_keys=True).splitlines(True) for x in (expected[key], live[key]))
            lines += ["  " + line.rstrip("\n") for line in difflib.unified_diff(a, b, "loaded", "live", n=1)]
    return "\n".join(lines) + "\n"


def unified(a: str, b: str, a_label: str, b_label: str) -> str:
    if a == b:
        return ""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), a_label, b_label, n=2))
