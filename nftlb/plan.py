"""Desired state, pure: from a validated Config to names, slot tables and element lists.

Nothing here touches the kernel or the file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from math import gcd

from nftlb.model import Config, IPAddress, Pool


@dataclass(frozen=True)
class Endpoint:
    address: IPAddress
    port: int

    def __str__(self) -> str:  # nft's spelling in a concatenation: addr . port
        return f"{self.address} . {self.port}"

    @property
    def display(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PoolPlan:
    name: str
    family: str  # "ip" | "ip6": the nft keyword for the address family
    vip: IPAddress
    port: int
    protocol: str
    scheduler: str
    mode: str
    backends: tuple[Endpoint, ...]  # every configured backend, canonical order
    draining: tuple[Endpoint, ...]  # configured but taking no new connections
    slots: tuple[Endpoint, ...]  # slot i of the pool's map -> backend; weights repeat a backend

    @property
    def chain(self) -> str:
        return f"pool_{self.name}"

    @property
    def slot_map(self) -> str:
        return f"pool_{self.name}_slots"

    @property
    def service(self) -> str:
        return f"{Endpoint(self.vip, self.port).display}/{self.protocol}"

    @property
    def active(self) -> tuple[Endpoint, ...]:
        return tuple(dict.fromkeys(self.slots))


@dataclass(frozen=True)
class Plan:
    table: str
    seed: int
    pools: tuple[PoolPlan, ...]

    def serving(self, family: str) -> list[PoolPlan]:
        """Pools of `family` that have a backend for new connections."""
        return [p for p in self.pools if p.family == family and p.slots]

    def refusing(self, family: str) -> list[PoolPlan]:
        """Pools of `family` with no backend for new connections: refused, not black-holed."""
        return [p for p in self.pools if p.family == family and not p.slots]

    def masquerading(self, family: str) -> list[tuple[PoolPlan, Endpoint]]:
        return [(p, b) for p in self.pools if p.family == family and p.mode == "masquerade" for b in p.backends]


def build(config: Config) -> Plan:
    return Plan(table=config.table, seed=config.seed, pools=tuple(_pool(p) for p in config.pools))


def _pool(pool: Pool) -> PoolPlan:
    ordered = sorted(pool.backends, key=lambda b: b.key)  # file order never changes the hash mapping
    active = [(Endpoint(b.address, b.port), b.weight) for b in ordered if b.state == "active"]
    return PoolPlan(
        name=pool.name,
        family=pool.family,
        vip=pool.vip,
        port=pool.port,
        protocol=pool.protocol,
        scheduler=pool.scheduler,
        mode=pool.mode,
        backends=tuple(Endpoint(b.address, b.port) for b in ordered),
        draining=tuple(Endpoint(b.address, b.port) for b in ordered if b.state == "drain"),
        slots=slot_table(active),
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
