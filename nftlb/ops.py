"""What the commands do: validate -> plan -> render -> compare -> commit, as library calls.

The CLI is a thin skin over these functions; tests and other programs can call them too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from nftlb import __version__, diff as difflib_, model, plan as planlib, render, state
from nftlb.backend import Backend
from nftlb.errors import ConfigError, UsageError
from nftlb.model import DEFAULT_TABLE


@dataclass
class Desired:
    source: str
    source_text: str
    config: model.Config
    plan: planlib.Plan
    script: str


def desired(path: str | Path) -> Desired:
    """Validate and render a pools file; raises ConfigError (exit 2) on any problem."""
    text = model.read(path)
    config = model.parse(text, str(path))
    plan = planlib.build(config)
    return Desired(str(path), text, config, plan, render.ruleset(plan))


def summary(plan: planlib.Plan) -> dict:
    pools = plan.pools
    return {
        "table": plan.table,
        "pools": len(pools),
        "tcp": sum(p.protocol == "tcp" for p in pools),
        "udp": sum(p.protocol == "udp" for p in pools),
        "ipv4": sum(p.family == "ip" for p in pools),
        "ipv6": sum(p.family == "ip6" for p in pools),
        "backends": sum(len(p.backends) for p in pools),
        "draining": sum(len(p.draining) for p in pools),
        "refusing": [p.name for p in pools if not p.slots],
    }


def _live(nft: Backend, table: str) -> tuple[list | None, str | None]:
    listing = nft.list_table(table, json=True)
    if listing is None:
        return None, None
    return difflib_.normalize(listing), nft.list_table(table, json=False)


def compare(path: str | Path, nft: Backend, state_dir: Path) -> tuple[Desired, difflib_.Diff]:
    want = desired(path)
    live, live_text = _live(nft, want.plan.table)
    return want, difflib_.compare(want.script, want.plan.table, state.load(state_dir), live, live_text, want.source)


@dataclass
class Result:
    action: str  # "applied" | "in-sync" | "dry-run"
    diff: difflib_.Diff
    summary: dict
    pools_added: list[str] = field(default_factory=list)
    pools_removed: list[str] = field(default_factory=list)
    pools_changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "action": self.action,
            "summary": self.summary,
            "pools_added": self.pools_added,
            "pools_removed": self.pools_removed,
            "pools_changed": self.pools_changed,
            "diff": self.diff.as_dict(),
            "seconds": round(self.seconds, 4),
        }


def apply(path: str | Path, nft: Backend, state_dir: Path, *, dry_run: bool = False) -> Result:
    """Bring our table to the state the file asks for, in one kernel transaction.

    Dry run: compute the diff and have the kernel check the transaction; change nothing.
    """
    started = time.monotonic()
    want = desired(path)
    if dry_run:
        return _apply_locked(want, nft, Path(state_dir), dry_run=True, started=started)
    with state.lock(state_dir):
        return _apply_locked(want, nft, Path(state_dir), dry_run=False, started=started)


def _apply_locked(want: Desired, nft: Backend, state_dir: Path, *, dry_run: bool, started: float) -> Result:
    table = want.plan.table
    applied = state.load(state_dir)
    live, live_text = _live(nft, table)
    d = difflib_.compare(want.script, table, applied, live, live_text, want.source)
    result = Result("in-sync", d, summary(want.plan))
    _pool_changes(result, applied, want.plan)
    if not d.in_sync:
        script = want.script
        if applied is not None and applied.table != table and nft.list_table(applied.table) is not None:
            script += f"delete table inet {applied.table}\n"  # we moved to a new table name: retire the old one
        if dry_run:
            nft.run(script, check=True)
            result.action = "dry-run"
        else:
            nft.run(script)
            live, live_text = _live(nft, table)
            state.save(state_dir, state.Applied(
                table=table, applied_at=time.time(), source=want.source, source_text=want.source_text,
                ruleset=want.script, live=live, live_text=live_text, backend=nft.name, version=__version__,
            ))
            result.action = "applied"
    result.seconds = time.monotonic() - started
    return result


def _pool_changes(result: Result, applied: state.Applied | None, new: planlib.Plan) -> None:
    if applied is None:
        result.pools_added = [p.name for p in new.pools]
        return
    try:
        old = planlib.build(model.parse(applied.source_text, applied.source))
    except ConfigError:  # written by another nftlb version; the ruleset diff still tells
        return
    before = {p.name: p for p in old.pools}
    after = {p.name: p for p in new.pools}
    result.pools_added = [n for n in after if n not in before]
    result.pools_removed = [n for n in before if n not in after]
    result.pools_changed = [n for n in after if n in before and before[n] != after[n]]


def remove(nft: Backend, state_dir: Path, table: str | None = None) -> str | None:
    """Delete our table (and only it). Returns the table deleted, None when there was none."""
    if table is not None and not model._TABLE_NAME.fullmatch(table):
        raise UsageError(f"{table!r} is not a table name")
    with state.lock(state_dir):
        applied = state.load(state_dir)
        name = table or (applied.table if applied else DEFAULT_TABLE)
        existed = nft.list_table(name) is not None
        if existed:
            nft.run(f"delete table inet {name}\n")
        if applied is not None and applied.table == name:
            state.clear(state_dir)
        return name if existed else None
