"""Pure: what `apply` (and `rollback`) must do, decided from facts gathered beforehand.

The decision is frozen data; nftlb.ops carries it out (nftlb.commit talks to the kernel and
writes the record). Like pip-tools' diff() before sync(): everything that can be decided
without the kernel is decided here, and tested without one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from nftlb.plan import Plan

Action = Literal["applied", "in-sync", "dry-run"]  # what the command reports
# small: only the changed elements and chains; whole: replace the table; record: the kernel
# already matches and only the record (and history) move; none: nothing at all
Kind = Literal["small", "whole", "record", "none"]


@dataclass(frozen=True)
class Live:
    """What is known of the live table (nftlb.live.inspect finds it out)."""

    exists: bool
    trusted: bool  # exactly what nftlb's last commit left
    drift: str | None  # when not trusted: why, or what changed


@dataclass(frozen=True)
class Facts:
    """What the decision needs to know, gathered from the state dir and the kernel."""

    source: str
    text: str
    table: str  # of the plan the file asks for
    applied_table: str | None  # of the record, None: nothing applied
    applied_source: tuple[str, str] | None  # (source, text) of the record
    applied_history_id: int | None
    believed: Plan | None  # the plan of the record (None: none, or unreadable by this nftlb)
    old_table_exists: bool  # the record's table, when the file renames it, is still there
    next_history_id: int
    now: float


@dataclass(frozen=True)
class Decision:
    action: Action
    kind: Kind
    in_sync: bool
    old: Plan | None  # the live plan a small transaction starts from
    believed: Plan | None  # the plan believed live, for the conntrack entries the change leaves stale
    retire: str | None  # the record's table, to delete in the same transaction (the file renamed it)
    history_id: int | None  # the history entry that is live afterwards
    entry: dict | None  # a new history entry to write, after the commit
    entry_after: int | None  # the entry it follows (later ones are dropped: they were rolled back)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @property
    def transaction(self) -> str:
        if self.kind == "whole":
            return "whole table"
        if self.kind == "small":
            return f"{len(self.added) + len(self.removed) + len(self.changed)} pools"
        return ""


def pool_changes(believed: Plan | None, new: Plan, anything_applied: bool):
    """(added, removed, changed) pool names; nothing when the record cannot be read (another
    nftlb version wrote it: the ruleset diff still tells)."""
    old = believed if anything_applied else Plan(new.table, new.seed, ())
    if old is None:
        return (), (), ()
    before = {p.name: p for p in old.pools}
    after = {p.name: p for p in new.pools}
    return (
        tuple(n for n in after if n not in before),
        tuple(n for n in before if n not in after),
        tuple(n for n in after if n in before and before[n] != after[n]),
    )


def summary_line(summary: dict, added=(), removed=(), changed=()) -> str:
    """One line for `nftlb history`: the file's size, and which pools moved."""
    parts = [f"{summary['pools']} pools, {summary['backends']} backends"]
    for verb, pools in (("added", added), ("removed", removed), ("changed", changed)):
        if pools:
            more = f" and {len(pools) - 5} more" if len(pools) > 5 else ""
            parts.append(f"{verb} {', '.join(pools[:5])}{more}")
    return "; ".join(parts)


def _entry(facts: Facts, summary: str) -> dict:
    return {
        "applied_at": facts.now,
        "source": facts.source,
        "table": facts.table,
        "sha256": hashlib.sha256(facts.text.encode()).hexdigest(),
        "summary": summary,
        "source_text": facts.text,
    }


def decide(
    want: Plan, summary: dict, live: Live, facts: Facts, *, dry_run: bool, rollback_to: dict | None = None
) -> Decision:
    """What to do to bring the table to `want`. A new history entry when the file changed; a
    rollback points at the entry it restores instead."""
    old = facts.believed if live.trusted else None
    in_sync = live.trusted and old == want
    applied = facts.applied_table is not None
    if not in_sync:
        added, removed, changed = pool_changes(facts.believed, want, applied)
        retire = (
            facts.applied_table if applied and facts.applied_table != facts.table and facts.old_table_exists else None
        )
        current = facts.applied_history_id
        entry = None
        if rollback_to is not None:
            history_id = rollback_to["id"]
        elif (
            facts.applied_source is None
            or facts.applied_source[1] != facts.text
            or facts.applied_table != facts.table
            or current is None
        ):
            history_id = facts.next_history_id
            entry = _entry(facts, summary_line(summary, added, removed, changed))
        else:
            history_id = current
        return Decision(
            "dry-run" if dry_run else "applied",
            "whole" if old is None else "small",
            False,
            old,
            facts.believed if applied and facts.applied_table == facts.table else None,
            retire,
            history_id,
            entry,
            current,
            added,
            removed,
            changed,
        )
    moved = facts.applied_source != (facts.source, facts.text)
    if not dry_run and (rollback_to is not None or moved):
        # the kernel already matches, the file does not (comments, health settings): only the record moves
        history_id = rollback_to["id"] if rollback_to is not None else facts.next_history_id
        entry = None if rollback_to is not None else _entry(facts, summary_line(summary) + "; the table did not change")
        return Decision("in-sync", "record", True, old, None, None, history_id, entry, facts.applied_history_id)
    return Decision("in-sync", "none", True, old, None, None, None, None, None)
