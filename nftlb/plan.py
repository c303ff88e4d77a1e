"""Desired state, pure: from a validated Config (and what is known of backends) to
slot tables, chain names and element lists.

Nothing here touches the kernel or the file system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, reduce
from math import gcd
from typing import Literal

from nftlb import maglev, names
from nftlb.schema import Config, IPAddress, Pool

KINDS = {"hash": "hash", "source-hash": "srchash", "random": "random", "round-robin": "rr"}
Family = Literal["ip", "ip6"]
# "backups": no primary usable, the backups serve; "keep-last": nothing usable, the last set is kept
Fallback = Literal["", "backups", "keep-last"]
# The socket mark of path probes (nftlb.probes.path_probe): the table's postrouting chain SNATs
# connections that carry it to the path source, so that the backend's answer must come back the
# way it answers clients. A fixed value: an operator's fwmark rules must not match it (doctor checks).
PATH_PROBE_MARK = 0x6E6C6270  # "nlbp"


@dataclass(frozen=True, eq=False)
class Endpoint:
    address: IPAddress
    port: int
    nft: str = field(init=False, repr=False)  # in a concatenation: "addr . port"
    display: str = field(init=False, repr=False)  # for people: "addr:port", "[v6]:port"

    def __post_init__(self):  # spelled once: a large plan formats hundreds of thousands of them
        text = str(self.address)
        object.__setattr__(self, "nft", f"{text} . {self.port}")
        object.__setattr__(
            self, "display", f"[{text}]:{self.port}" if self.address.version == 6 else f"{text}:{self.port}"
        )

    # compared and hashed by their spelling, which is unique: much cheaper than ipaddress's
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and self.nft == other.nft

    def __hash__(self) -> int:
        return hash(self.nft)

    def __str__(self) -> str:
        return self.nft


@dataclass(frozen=True)
class Conditions:
    """What is known of backends beyond the file: the watcher's health view, the operator's
    drains, the keep-last memory. Keys are (pool name, "addr:port")."""

    down: frozenset[tuple[str, str]] = frozenset()  # the health watcher says down
    drained: frozenset[tuple[str, str]] = frozenset()  # operator overrides (`nftlb drain`)
    last: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pool -> backends last in use (keep-last)

    def as_dict(self) -> dict:
        return {
            "down": sorted(map(list, self.down)),
            "drained": sorted(map(list, self.drained)),
            "last": {k: list(v) for k, v in sorted(self.last.items())},
        }

    @classmethod
    def from_dict(cls, doc: dict) -> Conditions:
        return cls(
            down=frozenset(map(tuple, doc.get("down", ()))),
            drained=frozenset(map(tuple, doc.get("drained", ()))),
            last={k: tuple(v) for k, v in doc.get("last", {}).items()},
        )


@dataclass(frozen=True)
class PoolPlan:
    name: str
    family: Family  # the nft keyword for the address family
    vip: IPAddress
    port: int
    protocol: str
    scheduler: str
    mode: str
    persistence: int | None  # seconds a client stays on its backend after its last new connection
    size: int  # slots in the pool's table: Maglev's prime M for hash schedulers
    backends: tuple[Endpoint, ...]  # every configured backend, canonical order
    backups: tuple[Endpoint, ...]  # configured as backup: used only while no primary is usable
    draining: tuple[Endpoint, ...]  # drained in the file or by the operator: no new connections
    down: tuple[Endpoint, ...]  # the health watcher says down
    slots: tuple[Endpoint, ...]  # the table: slot i -> backend (one entry: a plain DNAT; none: refused)
    fallback: Fallback = ""

    @property
    def fam(self) -> str:
        return "4" if self.family == "ip" else "6"

    @property
    def kind(self) -> str:
        """How a new connection picks its backend: direct | hash | srchash | random | rr ("": refused)."""
        if not self.slots:
            return ""
        return "direct" if len(self.slots) == 1 else KINDS[self.scheduler]

    @property
    def chain(self) -> str:
        """The chain the services map sends this pool's new connections to."""
        kind = self.kind
        if not kind:
            return ""  # refused: no chain
        if kind == "direct":
            return names.direct(self.fam, self.protocol)
        if kind == "rr":
            return names.round_robin_chain(self.name)
        return names.pick_chain(kind, self.fam, self.protocol, len(self.slots), self.persistence)

    @property
    def service(self) -> str:
        return f"{Endpoint(self.vip, self.port).display}/{self.protocol}"

    @cached_property
    def active(self) -> tuple[Endpoint, ...]:
        """Backends taking new connections, in canonical order."""
        used = set(self.slots)
        return tuple(b for b in self.backends if b in used)


@dataclass(frozen=True)
class Plan:
    table: str
    seed: int
    pools: tuple[PoolPlan, ...]
    path_sources: tuple[IPAddress, ...] = ()  # where path probes come from (one per family in use)

    def pool(self, name: str) -> PoolPlan | None:
        return next((p for p in self.pools if p.name == name), None)

    def group_chains(self) -> dict[str, PoolPlan]:
        """Shared chains in use (hash, source-hash and random pools), each with one pool as example."""
        return {p.chain: p for p in self.pools if p.kind in ("hash", "srchash", "random")}

    def sticky(self) -> dict[tuple[str, str, int], list[PoolPlan]]:
        """(fam, protocol, seconds) -> pools with that persistence: one dynamic map each."""
        out: dict[tuple[str, str, int], list[PoolPlan]] = {}
        for p in self.pools:
            if p.persistence:
                out.setdefault((p.fam, p.protocol, p.persistence), []).append(p)
        return out

    def last_in_use(self, before: Conditions) -> dict[str, tuple[str, ...]]:
        """keep-last memory after this plan is committed: each pool's backends in use."""
        last = {}
        for p in self.pools:
            if p.slots and p.fallback != "keep-last":
                last[p.name] = tuple(b.display for b in p.active)
            elif p.name in before.last:
                last[p.name] = before.last[p.name]
        return last


def build(config: Config, conditions: Conditions = Conditions()) -> Plan:
    """The plan for `config` given `conditions`. Pools are memoized on (pool, its part of the
    conditions): a watcher re-planning 10,000 pools after one backend changed rebuilds one."""
    mine: dict[str, list] = {}
    for kind, entries in (("down", conditions.down), ("drained", conditions.drained)):
        for pool, backend in entries:
            mine.setdefault(pool, []).append((kind, backend))
    pools = []
    for p in config.pools:
        last = conditions.last.get(p.name) if p.when_all_down == "keep-last" else None  # matters only there
        key = (_identity(p), tuple(sorted(mine.get(p.name, ()))), last)
        hit = _MEMO.get(key)
        if hit is None:
            if len(_MEMO) > 4 * len(config.pools) + 1000:
                _MEMO.clear()
            hit = _MEMO[key] = _pool(p, conditions)
        pools.append(hit)
    return Plan(table=config.table, seed=config.seed, pools=tuple(pools), path_sources=config.path_sources())


_MEMO: dict[tuple, PoolPlan] = {}


def _identity(p: Pool) -> tuple:
    """Everything of a pool that its plan depends on (besides the conditions), hashable: the same
    pool read from two versions of a file is the same key."""
    return (
        p.name,
        p.vip,
        p.port,
        p.protocol,
        p.scheduler,
        p.mode,
        p.persistence,
        p.table_size,
        p.when_all_down,
        tuple((b.address, b.port, b.weight, b.state, b.backup) for b in p.backends),
    )


def _pool(pool: Pool, conditions: Conditions) -> PoolPlan:
    ordered = sorted(pool.backends, key=lambda b: b.key)  # file order never changes the mapping
    ep = {id(b): Endpoint(b.address, b.port) for b in ordered}
    name = {id(b): ep[id(b)].display for b in ordered}
    drained = {id(b) for b in ordered if b.state == "drain" or (pool.name, name[id(b)]) in conditions.drained}
    down = {id(b) for b in ordered if (pool.name, name[id(b)]) in conditions.down}
    primaries = [b for b in ordered if not b.backup] or ordered  # all backups: they are the primaries
    backups = [b for b in ordered if b.backup and b not in primaries]

    def usable(group):
        return [b for b in group if id(b) not in drained and id(b) not in down]

    fallback: Fallback = ""
    group, chosen = primaries, usable(primaries)
    if not chosen and usable(backups):
        group, chosen, fallback = backups, usable(backups), "backups"
    if not chosen and pool.when_all_down == "keep-last":
        candidates = [b for b in ordered if id(b) not in drained]  # the operator's drain always wins
        last = set(conditions.last.get(pool.name, ()))
        chosen = [b for b in candidates if name[id(b)] in last] or (
            [b for b in candidates if not b.backup] or candidates  # nothing remembered: fail open
        )
        group = primaries if all(not b.backup for b in chosen) else ordered
        fallback = "keep-last" if chosen else ""

    if pool.scheduler in ("hash", "source-hash"):
        size = pool.table_size or maglev.default_size(tuple(b.weight for b in group))
        if len(chosen) > 1:
            out = {name[id(b)] for b in group} - {name[id(b)] for b in chosen}
            by_name = {name[id(b)]: ep[id(b)] for b in group}
            slots = tuple(by_name[n] for n in maglev.table(size, [(name[id(b)], b.weight) for b in group], out))
        else:
            slots = tuple(ep[id(b)] for b in chosen)
    else:
        slots = slot_table([(ep[id(b)], b.weight) for b in chosen])
        size = len(slots)
    return PoolPlan(
        name=pool.name,
        family=pool.family,
        vip=pool.vip,
        port=pool.port,
        protocol=pool.protocol,
        scheduler=pool.scheduler,
        mode=pool.mode,
        persistence=pool.persistence,
        size=size,
        backends=tuple(ep[id(b)] for b in ordered),
        backups=tuple(ep[id(b)] for b in backups),
        draining=tuple(ep[id(b)] for b in ordered if id(b) in drained),
        down=tuple(ep[id(b)] for b in ordered if id(b) in down),
        slots=slots,
        fallback=fallback,
    )


def slot_table(weighted: list[tuple[Endpoint, int]]) -> tuple[Endpoint, ...]:
    """Slots in proportion to weight (reduced by their gcd), interleaved smoothly.

    Uses nginx's smooth weighted round-robin order, so `numgen inc` walks the
    backends evenly (A B A C A B ...) rather than in blocks (A A A B C ...).
    """
    if not weighted:
        return ()
    g = reduce(gcd, (w for _, w in weighted))
    weights = [w // g for _, w in weighted]
    total = sum(weights)
    current = [0] * len(weights)
    out = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])  # first max: deterministic
        current[best] -= total
        out.append(weighted[best][0])
    return tuple(out)
