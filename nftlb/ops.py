"""What the commands do, as library calls: the file's desired state (nftlb.desired), what is
live (nftlb.live), the decision (nftlb.decide, pure), the commit (nftlb.commit).

The CLI and the watcher are thin skins over these functions. Every change to the kernel
happens under the state-dir lock, in one transaction, and is followed by a record of what is
now live (applied.json).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nftlb import commit, decide, desired, diff, live, render, schema, state
from nftlb.errors import KernelError, StateError, UsageError
from nftlb.kernel import Kernel
from nftlb.plan import Endpoint, Plan


@dataclass
class Result:
    action: decide.Action
    diff: diff.Diff
    summary: dict
    transaction: str = ""  # decide.Decision.transaction: "whole table", "N pools", or none
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


def _diff(want: desired.Desired, applied: state.Applied | None, now: decide.Live) -> diff.Diff:
    """The operator's view: nftlb's rendering of what is live against the file's."""
    old = None
    if applied is not None and applied.table == want.plan.table and now.exists:
        old = desired.applied_plan(applied)
    if old is not None and applied is not None:
        when = datetime.fromtimestamp(applied.applied_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        base, label = render.ruleset(old), f"live: as loaded {when} from {applied.source}"
    else:
        table = f"table inet {want.plan.table}"
        base, label = "", f"live: no {table}" if not now.exists else f"live: {table}, origin unknown"
    changes = diff.unified(base, want.script, label, f"{want.source} (rendered)")
    return diff.Diff(now.trusted and old == want.plan, changes, now.drift)


def compare(path: str | Path, nft: Kernel, state_dir: Path) -> tuple[desired.Desired, diff.Diff]:
    """`nftlb diff`: the file's table against the live one."""
    want = desired.of_file(path, state_dir)
    with state.lock_if_present(Path(state_dir)):  # not in the middle of someone's commit: that looks like drift
        applied = state.load(state_dir)
        return want, _diff(want, applied, live.inspect(nft, applied, want.plan.table))


def apply(path: str | Path, nft: Kernel, state_dir: Path, *, dry_run: bool = False) -> Result:
    """Bring our table to the state the file asks for (with the health view and drains), in one
    kernel transaction: only what changed when the live table is what nftlb left, else the
    whole table. Dry run: the diff, and the kernel's check of the transaction; no change."""
    started = time.monotonic()
    text = desired.pools_file.read(path)
    desired.parse(text, str(path))  # a bad file never reaches the lock or the kernel
    state_dir = Path(state_dir)
    with state.lock(state_dir) if not dry_run else state.lock_if_present(state_dir):
        if dry_run:  # locked too: its kernel check must not race another commit
            return _apply(str(path), text, nft, state_dir, dry_run=True, started=started)
        return _counted(state_dir, lambda: _apply(str(path), text, nft, state_dir, dry_run=False, started=started))


def _counted(state_dir: Path, run) -> Result:
    """Count the apply (or its failure) for the metrics."""
    try:
        result = run()
    except (KernelError, StateError):
        try:
            state.bump_stats(state_dir, failed=True)
        except StateError:
            pass
        raise
    if result.action == "applied":
        state.bump_stats(state_dir, applied=True)
    return result


def _facts(
    source: str, text: str, want: Plan, applied: state.Applied | None, nft: Kernel, state_dir: Path
) -> decide.Facts:
    renamed = applied is not None and applied.table != want.table
    return decide.Facts(
        source=source,
        text=text,
        table=want.table,
        applied_table=applied.table if applied is not None else None,
        applied_source=(applied.source, applied.source_text) if applied is not None else None,
        applied_history_id=applied.history_id if applied is not None else None,
        believed=desired.applied_plan(applied) if applied is not None else None,
        old_table_exists=renamed and applied is not None and nft.has_table(applied.table),
        next_history_id=state.next_history_id(state_dir),
        now=time.time(),
    )


def _apply(
    source: str,
    text: str,
    nft: Kernel,
    state_dir: Path,
    *,
    dry_run: bool,
    started: float,
    rollback_to: dict | None = None,
) -> Result:
    applied = state.load(state_dir)
    want = desired.of_text(source, text, desired.conditions_of(state_dir, applied))
    now = live.inspect(nft, applied, want.plan.table)
    facts = _facts(source, text, want.plan, applied, nft, state_dir)
    summary = desired.summary(want.plan)
    d = decide.decide(want.plan, summary, now, facts, dry_run=dry_run, rollback_to=rollback_to)
    result = Result(
        d.action,
        diff.Diff(d.in_sync, "", now.drift),
        summary,
        d.transaction,
        list(d.added),
        list(d.removed),
        list(d.changed),
    )
    if d.kind in ("small", "whole"):
        if dry_run:
            result.diff = _diff(want, applied, now)
        commit.commit(
            nft, state_dir, want, d.old, check=dry_run, retire=d.retire, history_id=d.history_id, believed=d.believed
        )
        if d.entry is not None and not dry_run and d.history_id is not None:
            state.add_history(state_dir, d.entry, d.history_id, after=d.entry_after)
    elif d.kind == "record" and applied is not None and d.history_id is not None:
        state.save(state_dir, dataclasses.replace(applied, source=source, source_text=text, history_id=d.history_id))
        if d.entry is not None:
            state.add_history(state_dir, d.entry, d.history_id, after=d.entry_after)
    result.seconds = time.monotonic() - started
    return result


def history(state_dir: Path) -> list[dict]:
    """The kept generations, newest first, without their file texts; `live` marks the one loaded."""
    applied = state.load(state_dir)
    current = applied.history_id if applied is not None else None
    return [
        {k: v for k, v in e.items() if k != "source_text"} | {"live": e.get("id") == current}
        for e in reversed(state.history(state_dir))
    ]


def rollback(nft: Kernel, state_dir: Path, *, dry_run: bool = False) -> tuple[dict, Result]:
    """Put back the generation applied before the live one, in one transaction (with today's
    health and drains). A second rollback goes one further back."""
    started = time.monotonic()
    state_dir = Path(state_dir)
    with state.lock(state_dir):
        applied = state.load(state_dir)
        if applied is None:
            raise StateError(f"nothing applied yet in {state_dir}: nothing to roll back")
        entries = state.history(state_dir)
        current = applied.history_id if applied.history_id is not None else (entries[-1]["id"] if entries else 0)
        earlier = [e for e in entries if e["id"] < current]
        if not earlier:
            raise UsageError(
                f"no generation before #{current} is kept in {state_dir / state.HISTORY} (see `nftlb history`)"
            )
        target = earlier[-1]
        desired.parse(target["source_text"], target["source"])  # a generation this nftlb cannot read stops here

        def run() -> Result:
            return _apply(
                target["source"],
                target["source_text"],
                nft,
                state_dir,
                dry_run=dry_run,
                started=started,
                rollback_to=target,
            )

        result = run() if dry_run else _counted(state_dir, run)
        return {k: v for k, v in target.items() if k != "source_text"}, result


@dataclass
class Refresh:
    changed: list[str]  # pools whose part of the table was rewritten
    whole_table: bool
    plan: Plan


def refresh(nft: Kernel, state_dir: Path, *, whole_table: bool = False) -> Refresh:
    """Re-plan the applied file with the current health view and drains, and commit the difference:
    one small transaction for the affected pools (the whole table when asked, e.g. after a failed
    transaction, or when the live table may have been changed by someone else).
    Must be called with the state lock held."""
    applied = state.load(state_dir)
    if applied is None:
        raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
    want = desired.of_text(applied.source, applied.source_text, desired.conditions_of(state_dir, applied))
    old = desired.applied_plan(applied)
    if not whole_table and old == want.plan:
        return Refresh([], False, want.plan)
    trusted = not whole_table and live.inspect(nft, applied, want.plan.table).trusted
    changes = commit.commit(nft, state_dir, want, old if trusted else None, history_id=applied.history_id, believed=old)
    before = {p.name: p for p in (old.pools if old else ())}
    changed = [p.name for p in want.plan.pools if before.get(p.name) != p]
    return Refresh(changed if changes is not None else [p.name for p in want.plan.pools], changes is None, want.plan)


def _find_backend(config: schema.Config, pool_name: str, backend: str) -> str:
    """Resolve POOL BACKEND ("addr:port", "[v6]:port" or a bare address) to the backend's display name."""
    pool = next((p for p in config.pools if p.name == pool_name), None)
    if pool is None:
        pools = ", ".join(p.name for p in config.pools)
        raise UsageError(f"no pool {pool_name!r} in the applied file (pools: {pools})")
    displays = [Endpoint(b.address, b.port).display for b in pool.backends]
    if backend in displays:
        return backend
    by_address = [d for d, b in zip(displays, pool.backends, strict=True) if str(b.address) == backend.strip("[]")]
    if len(by_address) == 1:
        return by_address[0]
    raise UsageError(f"pool {pool_name} has no single backend {backend!r} (backends: {', '.join(displays)})")


def set_drain(nft: Kernel, state_dir: Path, pool: str, backend: str, drained: bool) -> tuple[str, Refresh]:
    """Operator override: drain (no new connections, whatever its health) or enable again."""
    with state.lock(state_dir):
        applied = state.load(state_dir)
        if applied is None:
            raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
        name = _find_backend(desired.parse(applied.source_text, applied.source), pool, backend)
        before = state.read_doc(state_dir, state.OVERRIDES)
        current = {tuple(x) for x in (before or {}).get("drained", [])}
        current = current | {(pool, name)} if drained else current - {(pool, name)}
        state.write_doc(state_dir, state.OVERRIDES, {"drained": sorted(map(list, current))})
        try:
            return name, refresh(nft, state_dir)
        except Exception:  # the kernel said no: the override must not wait there to surprise a later apply
            if before is None:
                state.remove_doc(state_dir, state.OVERRIDES)
            else:
                state.write_doc(state_dir, state.OVERRIDES, before)
            raise


def override(nft: Kernel, state_dir: Path, pool: str, backend: str, drained: bool) -> dict:
    """`nftlb drain` / `nftlb enable`: the override, committed; what the pool takes now."""
    name, r = set_drain(nft, state_dir, pool, backend, drained)
    p = r.plan.pool(pool)
    active = [b.display for b in p.active] if p is not None else []
    return {"pool": pool, "backend": name, "drained": drained, "committed": bool(r.changed), "active": active}


def remove(nft: Kernel, state_dir: Path, table: str | None = None) -> str | None:
    """Delete our table (and only it). Returns the table deleted, None when there was none."""
    if table is not None and (not schema.TABLE_NAME.fullmatch(table) or table in schema.NFT_KEYWORDS):
        raise UsageError(f"{table!r} is not a table name")
    with state.lock(state_dir):
        applied = state.load(state_dir)
        name = table or (applied.table if applied else schema.DEFAULT_TABLE)
        existed = nft.has_table(name)
        if existed:
            nft.run(f"delete table inet {name}\n")
        if applied is not None and applied.table == name:
            state.clear(state_dir)
        return name if existed else None
