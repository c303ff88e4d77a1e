"""Pure comparison of the live table with the desired ruleset.

Whether the live table is what nftlb last loaded is decided on parsed JSON listings
(handles, counters and element order removed), never on nft's text format, which
changes between versions. What an operator reads is a unified diff of nftlb's own
rendered rulesets: the one last applied against the one the file asks for.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from nftlb.state import Applied

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


def compare(desired: str, table: str, applied: Applied | None, live: dict | None, source: str = "file") -> Diff:
    """Diff the desired script against what is live in the kernel.

    `live` is the normalized listing of our table, None when it does not exist.
    """
    ours = applied if applied is not None and applied.table == table else None
    to_label = f"{source} (rendered)"
    if live is None:
        drift = f"table inet {table} was deleted outside nftlb" if ours else None
        return Diff(False, _unified("", desired, f"live: no table inet {table}", to_label), drift)
    if ours is None:
        drift = (f"table inet {table} exists but the state dir has no record of nftlb loading it; "
                 "apply will replace it")
        return Diff(False, _unified("", desired, f"live: table inet {table}, origin unknown", to_label), drift)
    when = datetime.fromtimestamp(ours.applied_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    changes = _unified(ours.ruleset, desired, f"live: as loaded {when} from {ours.source}", to_label)
    if live != ours.live:
        return Diff(False, changes, drift_report(ours.live, live))
    return Diff(not changes, changes, None)


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


def _unified(a: str, b: str, a_label: str, b_label: str) -> str:
    if a == b:
        return ""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), a_label, b_label, n=2))
