"""Pure: what must change in the live table to go from one plan to another.

Used by `apply` when the live table is exactly what nftlb last loaded, and by the health
watcher and `drain`/`enable`. Only the pools that changed are looked at: their elements
in the shared maps and sets are deleted or added one by one, and the chains and maps
that exist for some pools only are created or removed as pools start or stop using them.
The other pools' elements are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nftlb import elements, names, render
from nftlb.plan import Family, Plan, PoolPlan


@dataclass
class Changes:
    delete_elements: list[tuple[str, list[str]]] = field(default_factory=list)  # (set or map, keys)
    flush_chains: list[str] = field(default_factory=list)  # emptied, then refilled or deleted
    delete_chains: list[str] = field(default_factory=list)
    delete_maps: list[str] = field(default_factory=list)
    delete_sets: list[str] = field(default_factory=list)
    add_sticky: list[tuple[str, str, int]] = field(default_factory=list)  # (fam, protocol, seconds)
    add_chains: list[tuple[str, PoolPlan]] = field(default_factory=list)  # (chain, a pool it picks for)
    remember: Plan | None = None  # the plan whose persistence rules fill chain `remember`
    path_probes: Plan | None = None  # the plan whose path sources fill chain `path_probes`
    add_elements: list[tuple[str, list[str]]] = field(default_factory=list)  # (set or map, elements)

    def __bool__(self) -> bool:
        return any(
            (
                self.delete_elements,
                self.flush_chains,
                self.delete_chains,
                self.delete_maps,
                self.delete_sets,
                self.add_sticky,
                self.add_chains,
                self.remember,
                self.add_elements,
                self.path_probes,
            )
        )


def _chains(plan: Plan) -> dict[str, PoolPlan]:
    """Chains that exist for some pools only: shared pick chains and round-robin chains."""
    chains = dict(plan.group_chains())
    chains.update({p.chain: p for p in plan.pools if p.kind == "rr"})
    return chains


def changes(old: Plan, new: Plan) -> Changes:
    """The small transaction from `old` to `new` (same table and seed)."""
    if (old.table, old.seed) != (new.table, new.seed):
        raise ValueError("table or seed changed: replace the whole table instead")
    c = Changes()
    before, after = {p.name: p for p in old.pools}, {p.name: p for p in new.pools}
    was: dict[str, dict[str, str]] = {}
    now: dict[str, dict[str, str]] = {}
    for name in before.keys() | after.keys():
        p, q = before.get(name), after.get(name)
        if p == q:
            continue
        for obj, items in (elements.of_pool(p) if p else {}).items():
            was.setdefault(obj, {}).update(items)
        for obj, items in (elements.of_pool(q) if q else {}).items():
            now.setdefault(obj, {}).update(items)
    for obj in sorted(was.keys() | now.keys()):
        old_items, new_items = was.get(obj, {}), now.get(obj, {})
        gone = [k for k, e in old_items.items() if new_items.get(k) != e]
        came = [e for k, e in new_items.items() if old_items.get(k) != e]
        if gone:
            c.delete_elements.append((obj, gone))
        if came:
            c.add_elements.append((obj, came))

    old_chains, new_chains = _chains(old), _chains(new)
    for name, p in old_chains.items():
        q = new_chains.get(name)
        if q is None:
            c.flush_chains.append(name)
            c.delete_chains.append(name)
        elif render.chain_rules(p, old.seed) != render.chain_rules(q, new.seed):
            c.flush_chains.append(name)
            c.add_chains.append((name, q))
    c.add_chains += [(name, q) for name, q in new_chains.items() if name not in old_chains]

    if old.path_sources != new.path_sources:
        c.flush_chains.append(names.PATH_PROBES)
        c.path_probes = new

    old_sticky, new_sticky = set(old.sticky()), set(new.sticky())
    if old_sticky != new_sticky:
        c.flush_chains.insert(0, names.REMEMBER)
        c.remember = new
        for f, proto, secs in sorted(old_sticky - new_sticky):
            c.delete_sets.append(names.persist(f, proto, secs))
            c.delete_maps.append(names.sticky(f, proto, secs))
        c.add_sticky = sorted(new_sticky - old_sticky)
    return c


def losers(old: Plan, new: Plan) -> dict[str, tuple[PoolPlan, set]]:
    """Pools with persistence that stopped sending new connections to some backends:
    pool name -> (new pool, backends still in use). Clients remembered with another
    backend must be forgotten, so they are balanced again instead of sent to it."""
    before = {p.name: p for p in old.pools}
    out = {}
    for q in new.pools:
        p = before.get(q.name)
        if q.persistence and p is not None and p.persistence == q.persistence and set(p.active) - set(q.active):
            out[q.name] = (q, set(q.active))
    return out


def forget(table: str, remembered: dict[tuple[str, str, int], list[tuple[str, str, int, str, int]]], lost) -> str:
    """The deletion of remembered clients of `lost` pools (see losers()) whose backend is gone.

    `remembered`: (fam, protocol, seconds) of a persistence map -> [(client, vip, port, backend
    address, backend port)].
    A separate transaction: remembered clients expire on their own, so one may be gone by
    the time it is deleted, and that must not fail the change that took the backend out.
    """
    by_service = {(str(q.vip), q.port, q.protocol): (q, keep) for q, keep in lost.values()}
    doomed = []
    for (fam, proto, seconds), entries in remembered.items():
        keys = []
        for client, vip, port, address, bport in entries:
            hit = by_service.get((vip, port, proto))
            if hit and not any(str(b.address) == address and b.port == bport for b in hit[1]):
                keys.append(elements.sticky_key(client, hit[0]))
        if keys:
            doomed.append((names.sticky(fam, proto, seconds), keys))
    if not doomed:
        return ""
    return render.update(table, 0, Changes(delete_elements=doomed))


def script(old: Plan, new: Plan) -> tuple[str, Changes]:
    c = changes(old, new)
    return (render.update(new.table, new.seed, c) if c else ""), c


@dataclass(frozen=True)
class Flows:
    """Conntrack entries of one pool's service, toward one backend (None: any), that must go
    after a transaction: they would keep sending packets where the new table no longer does."""

    pool: str
    family: Family
    protocol: str
    vip: str
    port: int
    backend: tuple[str, int] | None  # the reply source (address, port); None: any backend
    unreplied: bool  # only entries that never saw a reply (TCP SYN_SENT, UDP [UNREPLIED])

    def __str__(self) -> str:
        b = self.backend
        toward = "" if b is None else f" toward [{b[0]}]:{b[1]}" if ":" in b[0] else f" toward {b[0]}:{b[1]}"
        return f"{'unreplied ' if self.unreplied else ''}conntrack entries of pool {self.pool}{toward}"


def flows(old: Plan | None, new: Plan, reset: frozenset[str] = frozenset()) -> list[Flows]:
    """The conntrack entries to delete once `new` is committed over `old` (None: unknown).

    - A backend that went down (the watcher says so) and takes no new connections: its
      entries that never saw a reply. A client kernel reuses the source port of a
      connection that got no answer, and its next SYN (or datagram) would follow such an
      entry to the dead backend whatever the table says now. With `on_down: reset` (the
      pools named in `reset`), all of its entries: clients fail fast and come back.
    - A pool that became refused: its entries that never saw a reply, toward any backend,
      so that the next attempt meets the refusal instead of a stale entry.
    Entries of established connections are otherwise left alone: draining keeps them.
    """
    before = {p.name: p for p in old.pools} if old is not None else {}
    out = []
    for q in new.pools:
        p = before.get(q.name)
        if p is not None and (p.vip, p.port, p.protocol) != (q.vip, q.port, q.protocol):
            p = None  # another service under the same name: nothing of the old one carries over
        service = (q.name, q.family, q.protocol, str(q.vip), q.port)
        if not q.slots and (p is None or p.slots):
            out.append(Flows(*service, None, True))
        active = set(q.active)
        for b in q.down:
            if b in active or (p is not None and b in p.down):
                continue  # still used (keep-last), or already down before: dealt with then
            if not q.slots and q.name not in reset:
                continue  # the pool's unreplied entries go as a whole, above
            out.append(Flows(*service, (str(b.address), b.port), q.name not in reset))
    return out
