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


def normalize(listing: str) -> list:
    """Comparable form of `nft -j list table`: no handles, no counter values, sorted elements."""
    doc = json.loads(listing)
    return [_clean(obj) for obj in doc.get("nftables", []) if "metainfo" not in obj]


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


def compare(desired: str, table: str, applied: Applied | None, live: list | None, live_text: str | None,
            source: str = "file") -> Diff:
    """Diff the desired script against what is live in the kernel.

    `live`/`live_text` are the normalized JSON and text listings of our table (None when absent).
    """
    ours = applied if applied is not None and applied.table == table else None
    to_label = f"{source} (rendered)"
    if live is None:
        drift = f"table inet {table} was deleted outside nftlb" if ours else None
        return Diff(False, _unified("", desired, f"live: no table inet {table}", to_label), drift)
    if ours is None:
        drift = (f"table inet {table} exists but the state dir has no record of nftlb applying it; "
                 "showing nft's own listing of it")
        return Diff(False, _unified(live_text or "", desired, f"live: table inet {table} (nft list)", to_label), drift)
    when = datetime.fromtimestamp(ours.applied_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    base_label = f"live: as applied {when} from {ours.source}"
    changes = _unified(ours.ruleset, desired, base_label, to_label)
    if live != ours.live:
        drift = _unified(ours.live_text, live_text or "", f"table inet {table} as applied {when}",
                         f"table inet {table} now") or f"table inet {table} changed outside nftlb"
        return Diff(False, changes, drift)
    return Diff(not changes, changes, None)


def _unified(a: str, b: str, a_label: str, b_label: str) -> str:
    if a == b:
        return ""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), a_label, b_label, n=2))
