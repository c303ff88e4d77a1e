"""The commit: one kernel transaction, then the record of what is now live (applied.json),
then the clean-up the change calls for (remembered clients of backends that left, conntrack
entries the new table no longer stands behind). Callers hold the state-dir lock.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nftlb import __version__, allowlist, diff, names, plan, state, update
from nftlb.desired import Desired, element_count
from nftlb.errors import KernelError
from nftlb.kernel import Kernel

log = logging.getLogger("nftlb")
SNAPSHOT_LIMIT = 20_000  # elements: listing a larger table costs seconds, so only the generation is kept


def commit(
    nft: Kernel,
    state_dir: Path,
    want: Desired,
    old: plan.Plan | None,
    *,
    check: bool = False,
    retire: str | None = None,
    history_id: int | None = None,
    believed: plan.Plan | None = None,
) -> update.Changes | None:
    """One transaction from `old` (None: unknown, replace the whole table) to `want`, then the
    record, then the conntrack entries the change leaves stale (`believed`: the plan believed
    live, also when the table is replaced whole). `check`: the kernel only checks it."""
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
    if element_count(want.plan) <= SNAPSHOT_LIMIT:
        listing = nft.list(f"table inet {want.plan.table}")
        snapshot = diff.normalize(listing) if listing is not None else None
    c = want.conditions
    state.save(
        state_dir,
        state.Applied(
            table=want.plan.table,
            applied_at=time.time(),
            source=want.source,
            source_text=want.source_text,
            conditions=plan.Conditions(c.down, c.drained, want.plan.last_in_use(c)).as_dict(),
            generation=after if after == before + commits else None,  # someone else committed in between: unsure
            snapshot=snapshot,
            kernel=nft.name,
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
