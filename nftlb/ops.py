"""What the commands do, as library calls: validate -> plan -> render -> compare -> commit.

The CLI and the watcher are thin skins over these functions. Every change to the kernel
happens under the state-dir lock, in one transaction, and is followed by a record of
what is now live (applied.json).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nftlb import __version__, diff as difflib_, model, plan as planlib, render, state, update
from nftlb.backend import Backend
from nftlb.errors import StateError, UsageError
from nftlb.model import DEFAULT_TABLE


@dataclass
class Desired:
    source: str
    source_text: str
    config: model.Config
    plan: planlib.Plan
    status: planlib.Status
    script: str


@lru_cache(maxsize=4)
def _parse(text: str, source: str) -> model.Config:
    return model.parse(text, source)


def status_of(state_dir: Path, applied: state.Applied | None) -> planlib.Status:
    """What the state dir knows beyond the file: health (watcher), drains (operator), keep-last memory."""
    health = state.read_doc(state_dir, state.HEALTH) or {}
    overrides = state.read_doc(state_dir, state.OVERRIDES) or {}
    down = {tuple(k.split("|", 1)) for k, v in health.get("backends", {}).items() if not v.get("up", True)}
    last = planlib.Status.from_dict(applied.status).last if applied else {}
    return planlib.Status(down=frozenset(down), drained=frozenset(map(tuple, overrides.get("drained", []))),
                          last=last)


def _desired(source: str, text: str, status: planlib.Status) -> Desired:
    config = _parse(text, source)
    plan = planlib.build(config, status)
    return Desired(source, text, config, plan, status, render.ruleset(plan))


def desired(path: str | Path, state_dir: Path | None = None) -> Desired:
    """Validate and render a pools file, with the state dir's health and drains when given."""
    text = model.read(path)
    _parse(text, str(path))  # raise ConfigError before anything reads the state dir
    status = status_of(state_dir, state.load(state_dir)) if state_dir is not None else planlib.Status()
    return _desired(str(path), text, status)


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
        "down": sum(len(p.down) for p in pools),
        "refusing": [p.name for p in pools if not p.slots],
    }


def snapshot(nft: Backend, table: str) -> dict | None:
    listing = nft.list(f"table inet {table}")
    return None if listing is None else difflib_.normalize(listing)


def compare(path: str | Path, nft: Backend, state_dir: Path) -> tuple[Desired, difflib_.Diff]:
    want = desired(path, state_dir)
    applied = state.load(state_dir)
    return want, difflib_.compare(want.script, want.plan.table, applied, snapshot(nft, want.plan.table), want.source)


@dataclass
class Result:
    action: str  # "applied" | "in-sync" | "dry-run"
    diff: difflib_.Diff
    summary: dict
    transaction: str = ""  # "whole table" | "N pools" | ""
    pools_added: list[str] = field(default_factory=list)
    pools_removed: list[str] = field(default_factory=list)
    pools_changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "action": self.action,
            "summary": self.summary,
            "transaction": self.transaction,
            "pools_added": self.pools_added,
            "pools_removed": self.pools_removed,
            "pools_changed": self.pools_changed,
            "diff": self.diff.as_dict(),
            "seconds": round(self.seconds, 4),
        }


def _applied_plan(applied: state.Applied) -> planlib.Plan | None:
    """The plan nftlb built for the live generation (None if this version cannot read it)."""
    try:
        return planlib.build(_parse(applied.source_text, applied.source), planlib.Status.from_dict(applied.status))
    except model.ConfigError:
        return None


def _live_plan(applied: state.Applied | None, table: str, seed: int) -> planlib.Plan | None:
    """The plan behind the live table, when it can be trusted to be exactly that; else None."""
    if applied is None or applied.table != table or applied.version != __version__:
        return None
    old = _applied_plan(applied)
    if old is None or old.seed != seed or render.ruleset(old) != applied.ruleset:
        return None
    return old


def _transaction(old: planlib.Plan | None, new: planlib.Plan, full: str) -> tuple[str, update.Changes | None]:
    """The smallest script from `old` (None: unknown) to `new`, and its changes (None: whole table)."""
    return (full, None) if old is None else update.script(old, new)


def _record(nft: Backend, state_dir: Path, want: Desired, live: dict) -> None:
    state.save(state_dir, state.Applied(
        table=want.plan.table, applied_at=time.time(), source=want.source, source_text=want.source_text,
        status=planlib.Status(want.status.down, want.status.drained, want.plan.last_in_use(want.status)).as_dict(),
        ruleset=want.script, live=live, backend=nft.name, version=__version__,
    ))


def apply(path: str | Path, nft: Backend, state_dir: Path, *, dry_run: bool = False) -> Result:
    """Bring our table to the state the file asks for (with the health view and drains), in one
    kernel transaction: only the changed pools when the live table is what nftlb left, else
    the whole table. Dry run: the diff, and the kernel's check of the transaction; no change."""
    started = time.monotonic()
    text = model.read(path)
    _parse(text, str(path))  # a bad file never reaches the lock or the kernel
    state_dir = Path(state_dir)
    if dry_run:
        return _apply(str(path), text, nft, state_dir, dry_run=True, started=started)
    with state.lock(state_dir):
        return _apply(str(path), text, nft, state_dir, dry_run=False, started=started)


def _apply(source: str, text: str, nft: Backend, state_dir: Path, *, dry_run: bool, started: float) -> Result:
    applied = state.load(state_dir)
    want = _desired(source, text, status_of(state_dir, applied))
    table = want.plan.table
    live = snapshot(nft, table)
    d = difflib_.compare(want.script, table, applied, live, source)
    result = Result("in-sync", d, summary(want.plan))
    if not d.in_sync:
        trusted = applied is not None and live is not None and live == applied.live
        old = _live_plan(applied, table, want.plan.seed) if trusted else None
        script, changes = _transaction(old, want.plan, want.script)
        if applied is not None and applied.table != table and nft.list(f"table inet {applied.table}") is not None:
            script += f"delete table inet {applied.table}\n"  # we moved to a new table name: retire the old one
        _pool_changes(result, applied, want.plan)
        result.transaction = "whole table" if changes is None else f"{len(changes.add_pools)} pools"
        if dry_run:
            nft.run(script, check=True)
            result.action = "dry-run"
        else:
            nft.run(script)
            _record(nft, state_dir, want, snapshot(nft, table) or {})
            result.action = "applied"
    result.seconds = time.monotonic() - started
    return result


def _pool_changes(result: Result, applied: state.Applied | None, new: planlib.Plan) -> None:
    old = _applied_plan(applied) if applied is not None else planlib.Plan(new.table, new.seed, ())
    if old is None:  # written by another nftlb version; the ruleset diff still tells
        return
    before = {p.name: p for p in old.pools}
    after = {p.name: p for p in new.pools}
    result.pools_added = [n for n in after if n not in before]
    result.pools_removed = [n for n in before if n not in after]
    result.pools_changed = [n for n in after if n in before and before[n] != after[n]]


@dataclass
class Refresh:
    changed: list[str]  # pools whose objects were rewritten
    whole_table: bool
    plan: planlib.Plan


def refresh(nft: Backend, state_dir: Path, *, whole_table: bool = False) -> Refresh:
    """Re-plan the applied file with the current health view and drains, and commit the difference:
    one small transaction that rewrites only the affected pools (or the whole table when asked,
    e.g. after a failed transaction). Must be called with the state lock held."""
    applied = state.load(state_dir)
    if applied is None:
        raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
    want = _desired(applied.source, applied.source_text, status_of(state_dir, applied))
    old = None if whole_table else _live_plan(applied, want.plan.table, want.plan.seed)
    if old == want.plan:
        return Refresh([], False, want.plan)
    script, changes = _transaction(old, want.plan, want.script)
    nft.run(script)
    if changes is None:
        live = snapshot(nft, want.plan.table) or {}
        changed = [p.name for p in want.plan.pools]
    else:
        live = dict(applied.live)
        for kind, name in changes.touched:  # patch the record object by object: no full listing
            live.pop(f"{kind} {name}", None)
            listing = nft.list(f"{kind} inet {want.plan.table} {name}")
            if listing is not None:
                live.update(difflib_.normalize(listing))
        changed = [p.name for p in changes.add_pools]
    _record(nft, state_dir, want, live)
    return Refresh(changed, changes is None, want.plan)


def _find_backend(config: model.Config, pool_name: str, backend: str) -> str:
    """Resolve POOL BACKEND ("addr:port", "[v6]:port" or a bare address) to the backend's display name."""
    pool = next((p for p in config.pools if p.name == pool_name), None)
    if pool is None:
        raise UsageError(f"no pool {pool_name!r} in the applied file (pools: {', '.join(p.name for p in config.pools)})")
    displays = [planlib.Endpoint(b.address, b.port).display for b in pool.backends]
    if backend in displays:
        return backend
    by_address = [d for d, b in zip(displays, pool.backends) if str(b.address) == backend.strip("[]")]
    if len(by_address) == 1:
        return by_address[0]
    raise UsageError(f"pool {pool_name} has no single backend {backend!r} (backends: {', '.join(displays)})")


def set_drain(nft: Backend, state_dir: Path, pool: str, backend: str, drained: bool) -> tuple[str, Refresh]:
    """Operator override: drain (no new connections, whatever its health) or enable again."""
    with state.lock(state_dir):
        applied = state.load(state_dir)
        if applied is None:
            raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
        name = _find_backend(_parse(applied.source_text, applied.source), pool, backend)
        overrides = state.read_doc(state_dir, state.OVERRIDES) or {}
        current = {tuple(x) for x in overrides.get("drained", [])}
        current = current | {(pool, name)} if drained else current - {(pool, name)}
        state.write_doc(state_dir, state.OVERRIDES, {"drained": sorted(map(list, current))})
        return name, refresh(nft, state_dir)


def remove(nft: Backend, state_dir: Path, table: str | None = None) -> str | None:
    """Delete our table (and only it). Returns the table deleted, None when there was none."""
    if table is not None and not model.TABLE_NAME.fullmatch(table):
        raise UsageError(f"{table!r} is not a table name")
    with state.lock(state_dir):
        applied = state.load(state_dir)
        name = table or (applied.table if applied else DEFAULT_TABLE)
        existed = nft.list(f"table inet {name}") is not None
        if existed:
            nft.run(f"delete table inet {name}\n")
        if applied is not None and applied.table == name:
            state.clear(state_dir)
        return name if existed else None
