"""What the commands do, as library calls: validate -> plan -> render -> compare -> commit.

The CLI and the watcher are thin skins over these functions. Every change to the kernel
happens under the state-dir lock, in one transaction, and is followed by a record of
what is now live (applied.json).

Whether the live table is exactly what nftlb left decides between a small transaction
(only what changed) and replacing the whole table. It is decided without listing the
table whenever possible: the kernel counts committed transactions (the ruleset
generation), and when the count is where nftlb's last commit left it, nothing can have
touched the table. Otherwise a listing is compared with the snapshot taken after that
commit (kept for tables small enough to list cheaply), and failing that the whole table
is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from nftlb import __version__, allowlist, errors, maglev, names, pools_file, render, schema, state, update
from nftlb import diff as difflib_
from nftlb import plan as planlib
from nftlb.errors import KernelError, StateError, UsageError
from nftlb.kernel import Kernel
from nftlb.schema import DEFAULT_TABLE

log = logging.getLogger("nftlb")
SNAPSHOT_LIMIT = 20_000  # elements: listing a larger table costs seconds, so only the generation is kept


@lru_cache(maxsize=4)
def _parse(text: str, source: str) -> schema.Config:
    return pools_file.parse(text, source)


def status_of(state_dir: Path, applied: state.Applied | None) -> planlib.Status:
    """What the state dir knows beyond the file: health (watcher), drains (operator), keep-last memory."""
    health = state.read_doc(state_dir, state.HEALTH) or {}
    overrides = state.read_doc(state_dir, state.OVERRIDES) or {}
    down = {tuple(k.split("|", 1)) for k, v in health.get("backends", {}).items() if not v.get("up", True)}
    last = planlib.Status.from_dict(applied.status).last if applied else {}
    return planlib.Status(down=frozenset(down), drained=frozenset(map(tuple, overrides.get("drained", []))), last=last)


@dataclass
class Desired:
    source: str
    source_text: str
    config: schema.Config
    plan: planlib.Plan
    status: planlib.Status

    @property
    def script(self) -> str:
        return render.ruleset(self.plan)


def _desired(source: str, text: str, status: planlib.Status) -> Desired:
    config = _parse(text, source)
    return Desired(source, text, config, planlib.build(config, status), status)


def check(path: str | Path) -> schema.Config:
    """Read and validate a pools file (ConfigError, exit 2): before any kernel or state dir."""
    return _parse(pools_file.read(path), str(path))


def desired(path: str | Path, state_dir: Path | None = None) -> Desired:
    """Validate and plan a pools file, with the state dir's health and drains when given."""
    text = pools_file.read(path)
    _parse(text, str(path))  # raise ConfigError before anything reads the state dir
    status = status_of(state_dir, state.load(state_dir)) if state_dir is not None else planlib.Status()
    return _desired(str(path), text, status)


def applied_plan(applied: state.Applied) -> planlib.Plan | None:
    """The plan of the live generation (None if this nftlb cannot read it)."""
    try:
        return planlib.build(_parse(applied.source_text, applied.source), planlib.Status.from_dict(applied.status))
    except errors.ConfigError:
        return None


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


def elements(plan: planlib.Plan) -> int:
    return sum(len(p.slots) + 2 for p in plan.pools)


def _exists(nft: Kernel, table: str) -> bool:
    """Is `table inet TABLE` there? One netlink request (`list tables` costs seconds next to a
    large table)."""
    return nft.has_table(table)


def _lock_if_present(state_dir: Path):
    """The state lock for read-only commands, which must not create the state dir."""
    return state.lock(state_dir) if Path(state_dir).is_dir() else contextlib.nullcontext()


@dataclass
class Live:
    """What is known of the live table."""

    exists: bool
    trusted: bool  # exactly what nftlb's last commit left
    drift: str | None  # when not trusted: why, or what changed


def inspect(nft: Kernel, applied: state.Applied | None, table: str) -> Live:
    if applied is None or applied.table != table:
        if _exists(nft, table):
            return Live(
                True,
                False,
                f"table inet {table} exists but the state dir has no record of nftlb loading it; apply will replace it",
            )
        return Live(False, False, None)
    if applied.version != __version__:
        exists = _exists(nft, table)
        return Live(
            exists,
            False,
            f"table inet {table} was loaded by nftlb {applied.version}; "
            f"this is {__version__}: apply will reload it whole"
            if exists
            else None,
        )
    if applied.generation is not None and nft.generation() == applied.generation:
        return Live(True, True, None)  # nothing committed since nftlb's own last commit
    if applied.snapshot is not None:
        listing = nft.list(f"table inet {table}")
        if listing is None:
            return Live(False, False, f"table inet {table} was deleted outside nftlb")
        live = difflib_.normalize(listing)
        if live == applied.snapshot:
            return Live(True, True, None)  # other tables changed, ours did not
        return Live(True, False, difflib_.drift_report(applied.snapshot, live))
    if not _exists(nft, table):
        return Live(False, False, f"table inet {table} was deleted outside nftlb")
    return Live(
        True,
        False,
        f"nftables changed since nftlb's last commit (ruleset generation {applied.generation} "
        f"-> {nft.generation()}) and table inet {table} is too large to compare cheaply; "
        "apply will reload it whole",
    )


def _diff(want: Desired, applied: state.Applied | None, live: Live) -> difflib_.Diff:
    """The operator's view: nftlb's rendering of what is live against the file's."""
    old = applied_plan(applied) if applied is not None and applied.table == want.plan.table and live.exists else None
    if old is not None:
        when = datetime.fromtimestamp(applied.applied_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        base, label = render.ruleset(old), f"live: as loaded {when} from {applied.source}"
    else:
        base, label = (
            "",
            (
                f"live: no table inet {want.plan.table}"
                if not live.exists
                else f"live: table inet {want.plan.table}, origin unknown"
            ),
        )
    changes = difflib_.unified(base, want.script, label, f"{want.source} (rendered)")
    return difflib_.Diff(live.trusted and old == want.plan, changes, live.drift)


def compare(path: str | Path, nft: Kernel, state_dir: Path) -> tuple[Desired, difflib_.Diff]:
    want = desired(path, state_dir)
    with _lock_if_present(Path(state_dir)):  # not in the middle of someone's commit: that would look like drift
        applied = state.load(state_dir)
        return want, _diff(want, applied, inspect(nft, applied, want.plan.table))


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


def _commit(
    nft: Kernel,
    state_dir: Path,
    want: Desired,
    old: planlib.Plan | None,
    *,
    check: bool = False,
    retire: str | None = None,
    history_id: int | None = None,
    believed: planlib.Plan | None = None,
) -> update.Changes | None:
    """One transaction from `old` (None: unknown, replace the whole table) to `want`, then the
    record, then the conntrack entries the change leaves stale (`believed`: the plan believed
    live, also when the table is replaced whole)."""
    if old is None:
        script, changes = want.script, None
    else:
        script, changes = update.script(old, want.plan)
    if retire:  # we moved to a new table name: retire the old one (a name read back from applied.json)
        script += f"delete table inet {allowlist.table_name(retire)}\n"
    if check:
        nft.run(script, check=True)
        return changes
    before = nft.generation()
    nft.run(script)
    commits = 1
    if changes is not None and old is not None:
        commits += _forget(nft, want.plan.table, update.losers(old, want.plan))
    after = nft.generation()
    snapshot = None
    if elements(want.plan) <= SNAPSHOT_LIMIT:
        listing = nft.list(f"table inet {want.plan.table}")
        snapshot = difflib_.normalize(listing) if listing is not None else None
    state.save(
        state_dir,
        state.Applied(
            table=want.plan.table,
            applied_at=time.time(),
            source=want.source,
            source_text=want.source_text,
            status=planlib.Status(want.status.down, want.status.drained, want.plan.last_in_use(want.status)).as_dict(),
            generation=after if after == before + commits else None,  # someone else committed in between: unsure
            snapshot=snapshot,
            backend=nft.name,
            version=__version__,
            history_id=history_id,
        ),
    )
    reset = frozenset(p.name for p in want.config.pools if p.reset_on_down)
    clear_flows(nft, update.flows(believed if believed is not None else old, want.plan, reset))
    return changes


def clear_flows(nft: Kernel, stale: list[update.Flows]) -> int:
    """Delete conntrack entries the committed table no longer stands behind. The table is
    committed already: a failure here is logged, and the entries time out on their own."""
    gone = 0
    for flows in stale:
        try:
            n = nft.conntrack.delete(flows)
        except KernelError as e:
            log.error("%s", e)
            continue
        gone += n
        if n:
            log.info("%s: %d deleted", flows, n)
    return gone


def _remembered(nft: Kernel, table: str, lost) -> dict[tuple[str, str, int], list]:
    """Clients the persistence maps of `lost` pools hold: (fam, protocol, seconds) of the map ->
    [(client, vip, port, addr, port)]."""
    out: dict[tuple[str, str, int], list] = {}
    for q, _ in lost.values():
        which = (q.fam, q.protocol, q.persistence)
        if which in out:
            continue
        listing = nft.list(f"map inet {table} {names.sticky(*which)}")
        entries = []
        for obj in json.loads(listing or "{}").get("nftables", []):
            for key, value in obj.get("map", {}).get("elem", []):
                key = key.get("elem", {}).get("val", key)
                client, vip, port = key["concat"]
                address, bport = value["concat"]
                entries.append((client, vip, port, address, bport))
        out[which] = entries
    return out


def _forget(nft: Kernel, table: str, lost) -> int:
    """Forget persisted clients of backends that left their pool; they expire anyway, so a
    race with an expiry is retried with a fresh listing, and then given up.
    Returns the transactions committed (0 or 1)."""
    for _ in range(3 if lost else 0):
        script = update.forget(table, _remembered(nft, table, lost), lost)
        if not script:
            return 0
        try:
            nft.run(script)
            return 1
        except KernelError:
            continue
    return 0


def apply(path: str | Path, nft: Kernel, state_dir: Path, *, dry_run: bool = False) -> Result:
    """Bring our table to the state the file asks for (with the health view and drains), in one
    kernel transaction: only what changed when the live table is what nftlb left, else the
    whole table. Dry run: the diff, and the kernel's check of the transaction; no change."""
    started = time.monotonic()
    text = pools_file.read(path)
    _parse(text, str(path))  # a bad file never reaches the lock or the kernel
    state_dir = Path(state_dir)
    with state.lock(state_dir) if not dry_run else _lock_if_present(state_dir):
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
    want = _desired(source, text, status_of(state_dir, applied))
    table = want.plan.table
    live = inspect(nft, applied, table)
    old = applied_plan(applied) if live.trusted else None
    in_sync = live.trusted and old == want.plan
    result = Result("in-sync", difflib_.Diff(in_sync, "", live.drift), summary(want.plan))
    if not in_sync:
        if dry_run:
            result.diff = _diff(want, applied, live)
        _pool_changes(result, applied, want.plan)
        retire = None
        if applied is not None and applied.table != table and _exists(nft, applied.table):
            retire = applied.table
        # history: a new entry when the file changed; a rollback points at the entry it restores
        current = applied.history_id if applied is not None else None
        if rollback_to is not None:
            history_id, entry = rollback_to["id"], None
        elif applied is None or applied.source_text != text or applied.table != table or current is None:
            history_id = state.next_history_id(state_dir)
            entry = {
                "applied_at": time.time(),
                "source": source,
                "table": table,
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "summary": _summary_line(result),
                "source_text": text,
            }
        else:
            history_id, entry = current, None
        changes = _commit(
            nft,
            state_dir,
            want,
            old,
            check=dry_run,
            retire=retire,
            history_id=history_id,
            believed=applied_plan(applied) if applied is not None and applied.table == table else None,
        )
        if entry is not None and not dry_run:
            state.add_history(state_dir, entry, history_id, after=current)
        touched = len(result.pools_added) + len(result.pools_removed) + len(result.pools_changed)
        result.transaction = "whole table" if changes is None else f"{touched} pools"
        result.action = "dry-run" if dry_run else "applied"
    elif not dry_run and (rollback_to is not None or (applied.source_text, applied.source) != (text, source)):
        # the kernel already matches, the file does not (comments, health settings): only the record moves
        history_id = rollback_to["id"] if rollback_to is not None else state.next_history_id(state_dir)
        state.save(state_dir, dataclasses.replace(applied, source=source, source_text=text, history_id=history_id))
        if rollback_to is None:
            state.add_history(
                state_dir,
                {
                    "applied_at": time.time(),
                    "source": source,
                    "table": table,
                    "sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "summary": _summary_line(result) + "; the table did not change",
                    "source_text": text,
                },
                history_id,
                after=applied.history_id,
            )
    result.seconds = time.monotonic() - started
    return result


def _summary_line(r: Result) -> str:
    s = r.summary
    parts = [f"{s['pools']} pools, {s['backends']} backends"]
    for verb, pools in (("added", r.pools_added), ("removed", r.pools_removed), ("changed", r.pools_changed)):
        if pools:
            parts.append(f"{verb} {', '.join(pools[:5])}" + (f" and {len(pools) - 5} more" if len(pools) > 5 else ""))
    return "; ".join(parts)


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
        _parse(target["source_text"], target["source"])  # a generation this nftlb cannot read stops here
        run = lambda: _apply(
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


def _pool_changes(result: Result, applied: state.Applied | None, new: planlib.Plan) -> None:
    old = applied_plan(applied) if applied is not None else planlib.Plan(new.table, new.seed, ())
    if old is None:  # written by another nftlb version; the ruleset diff still tells
        return
    before = {p.name: p for p in old.pools}
    after = {p.name: p for p in new.pools}
    result.pools_added = [n for n in after if n not in before]
    result.pools_removed = [n for n in before if n not in after]
    result.pools_changed = [n for n in after if n in before and before[n] != after[n]]


@dataclass
class Refresh:
    changed: list[str]  # pools whose part of the table was rewritten
    whole_table: bool
    plan: planlib.Plan


def refresh(nft: Kernel, state_dir: Path, *, whole_table: bool = False) -> Refresh:
    """Re-plan the applied file with the current health view and drains, and commit the difference:
    one small transaction for the affected pools (the whole table when asked, e.g. after a failed
    transaction, or when the live table may have been changed by someone else).
    Must be called with the state lock held."""
    applied = state.load(state_dir)
    if applied is None:
        raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
    want = _desired(applied.source, applied.source_text, status_of(state_dir, applied))
    old = applied_plan(applied)
    if not whole_table and old == want.plan:
        return Refresh([], False, want.plan)
    trusted = not whole_table and inspect(nft, applied, want.plan.table).trusted
    changes = _commit(nft, state_dir, want, old if trusted else None, history_id=applied.history_id, believed=old)
    before = {p.name: p for p in (old.pools if old else ())}
    changed = [p.name for p in want.plan.pools if before.get(p.name) != p]
    return Refresh(changed if changes is not None else [p.name for p in want.plan.pools], changes is None, want.plan)


def explain(
    path: str | Path, pool_name: str, state_dir: Path | None = None, client: tuple[str, int | None] | None = None
) -> dict:
    """How a pool picks: its table, each backend's share, and where a given client goes."""
    want = desired(path, state_dir)
    p = want.plan.pool(pool_name)
    if p is None:
        raise UsageError(f"no pool {pool_name!r} in {path} (pools: {', '.join(x.name for x in want.plan.pools)})")
    weights = {
        planlib.Endpoint(b.address, b.port): b.weight
        for b in next(x for x in want.config.pools if x.name == pool_name).backends
    }
    counts = dict.fromkeys(p.backends, 0)
    for b in p.slots:
        counts[b] += 1
    rows = []
    for b in p.backends:
        state_ = (
            "down"
            if b in p.down
            else "drained"
            if b in p.draining
            else "backup"
            if b in p.backups and b not in p.active
            else "up"
        )
        rows.append(
            {
                "backend": b.display,
                "weight": weights[b],
                "slots": counts[b],
                "share": counts[b] / len(p.slots) if p.slots else 0.0,
                "state": state_,
            }
        )
    out = {
        "pool": p.name,
        "service": p.service,
        "scheduler": p.scheduler,
        "kind": p.kind or "refused",
        "table_size": len(p.slots),
        "seed": want.plan.seed,
        "persistence": p.persistence,
        "fallback": p.fallback,
        "backends": rows,
    }
    if client is not None:
        address, sport = client
        if p.kind in ("hash", "srchash"):
            if p.kind == "hash" and sport is None:
                raise UsageError("scheduler hash uses the client's port too: give --client ADDR:PORT")
            i = maglev.slot(p.scheduler, want.plan.seed, len(p.slots), address, sport or 0, str(p.vip), p.port)
            out["client"] = {"address": address, "port": sport, "slot": i, "backend": p.slots[i].display}
        elif p.kind == "direct":
            out["client"] = {"address": address, "port": sport, "slot": 0, "backend": p.slots[0].display}
        else:
            out["client"] = {
                "address": address,
                "port": sport,
                "slot": None,
                "backend": None,
                "why": f"{p.scheduler} does not depend on the client",
            }
    return out


def _find_backend(config: schema.Config, pool_name: str, backend: str) -> str:
    """Resolve POOL BACKEND ("addr:port", "[v6]:port" or a bare address) to the backend's display name."""
    pool = next((p for p in config.pools if p.name == pool_name), None)
    if pool is None:
        raise UsageError(
            f"no pool {pool_name!r} in the applied file (pools: {', '.join(p.name for p in config.pools)})"
        )
    displays = [planlib.Endpoint(b.address, b.port).display for b in pool.backends]
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
        name = _find_backend(_parse(applied.source_text, applied.source), pool, backend)
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


def remove(nft: Kernel, state_dir: Path, table: str | None = None) -> str | None:
    """Delete our table (and only it). Returns the table deleted, None when there was none."""
    if table is not None and (not schema.TABLE_NAME.fullmatch(table) or table in schema.NFT_KEYWORDS):
        raise UsageError(f"{table!r} is not a table name")
    with state.lock(state_dir):
        applied = state.load(state_dir)
        name = table or (applied.table if applied else DEFAULT_TABLE)
        existed = _exists(nft, name)
        if existed:
            nft.run(f"delete table inet {name}\n")
        if applied is not None and applied.table == name:
            state.clear(state_dir)
        return name if existed else None
