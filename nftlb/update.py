"""Pure: what must change in the live table to go from one plan to another.

Used by `apply` when the live table is exactly what nftlb last loaded, and by the
health watcher and `drain`/`enable`: only the pools that changed are rewritten, and
only the elements that changed in the shared maps and sets. Everything else, the
other pools' chains and maps included, is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nftlb import render
from nftlb.plan import Plan


@dataclass
class Changes:
    delete_elements: list[tuple[str, list[str]]] = field(default_factory=list)  # (set or map, keys)
    flush_chains: list[str] = field(default_factory=list)
    delete_maps: list[str] = field(default_factory=list)
    delete_chains: list[str] = field(default_factory=list)
    add_pools: list = field(default_factory=list)  # PoolPlans whose map and chain are (re)created
    add_elements: list[tuple[str, list[str]]] = field(default_factory=list)  # (set or map, elements)

    def __bool__(self) -> bool:
        return any((self.delete_elements, self.flush_chains, self.delete_maps, self.delete_chains,
                    self.add_pools, self.add_elements))

    @property
    def touched(self) -> list[tuple[str, str]]:
        """(kind, name) of every object this transaction creates, changes or deletes."""
        out = [("map" if n.startswith("services") else "set", n) for n, _ in self.delete_elements + self.add_elements]
        out += [("chain", c) for c in self.flush_chains + self.delete_chains]
        out += [("map", m) for m in self.delete_maps]
        for p in self.add_pools:
            out.append(("chain", p.chain))
            if len(p.slots) > 1:
                out.append(("map", p.slot_map))
        return list(dict.fromkeys(out))


def _elements(plan: Plan) -> dict[str, dict[str, str]]:
    """Shared maps and sets: name -> {key: element}."""
    m = render.macros()
    out = {}
    for family, n in (("ip", "4"), ("ip6", "6")):
        out[f"services{n}"] = {m.service_key(p): m.service_element(p) for p in plan.serving(family)}
        out[f"masquerade{n}"] = {e: e for e in (m.masquerade_element(p, b) for p, b in plan.masquerading(family))}
        out[f"refuse{n}"] = {e: e for e in (m.service_key(p) for p in plan.refusing(family))}
    return out


def changes(old: Plan, new: Plan) -> Changes:
    """The small transaction from `old` to `new` (same table and seed)."""
    if (old.table, old.seed) != (new.table, new.seed):
        raise ValueError("table or seed changed: replace the whole table instead")
    c = Changes()
    before, after = {p.name: p for p in old.pools}, {p.name: p for p in new.pools}
    for name, p in before.items():
        q = after.get(name)
        if q == p:
            continue
        c.flush_chains.append(p.chain)
        if len(p.slots) > 1:
            c.delete_maps.append(p.slot_map)
        if q is None:
            c.delete_chains.append(p.chain)
    c.add_pools = [q for name, q in after.items() if before.get(name) != q]
    old_elements, new_elements = _elements(old), _elements(new)
    for name, was in old_elements.items():
        now = new_elements[name]
        gone = [key for key, element in was.items() if now.get(key) != element]
        came = [element for key, element in now.items() if was.get(key) != element]
        if gone:
            c.delete_elements.append((name, gone))
        if came:
            c.add_elements.append((name, came))
    return c


def script(old: Plan, new: Plan) -> tuple[str, Changes]:
    c = changes(old, new)
    return (render.update(new.table, new.seed, c) if c else ""), c
