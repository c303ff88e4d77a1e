"""Consistent hashing, pure: Maglev lookup tables (Eisenbud et al., NSDI 2016) and the
kernel's jhash, so a table built here can be checked against what the kernel does.

Every gateway given the same backends builds the same table: backends are identified by
name ("10.0.0.11:8080"), permutations come from fixed hash functions (BLAKE2b with fixed
keys), and turns are taken in a fixed order.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Set as AbstractSet
from functools import lru_cache

DEFAULT_MAX_SIZE = 65537  # largest default table (a prime)


# -- Maglev --------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _offset_skip(name: str, size: int) -> tuple[int, int]:
    """A backend's permutation of the slots: start at offset, step by skip (fixed hash: BLAKE2b)."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=b"nftlb-maglev").digest()
    return int.from_bytes(digest[:8], "little") % size, int.from_bytes(digest[8:], "little") % (size - 1) + 1


def _cycle(weights: list[int]) -> list[int]:
    """One cycle of turns: backend indexes in smooth weighted round-robin order."""
    if len(set(weights)) == 1:
        return list(range(len(weights)))
    total, current, out = sum(weights), [0] * len(weights), []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= total
        out.append(best)
    return out


def populate(size: int, backends: list[tuple[str, int]], table: list[str | None] | None = None) -> list[str | None]:
    """Fill the empty slots of `table` (all of them when None) with `backends` (name, weight).

    Each backend walks its own permutation of the slots (offset, offset+skip, ...) and,
    on its turn, takes its next preferred slot that is still empty. Turns follow the
    weights, so a backend of weight 2 ends with about twice the slots.
    """
    table = [None] * size if table is None else list(table)
    empty = table.count(None)
    if not backends or not empty:
        return table
    names = [name for name, _ in backends]
    position = [_offset_skip(name, size) for name in names]  # (next slot to look at, skip)
    cycle = _cycle([w for _, w in backends])
    while True:
        for i in cycle:
            slot, skip = position[i]
            while table[slot] is not None:
                slot = (slot + skip) % size
            table[slot] = names[i]
            position[i] = ((slot + skip) % size, skip)
            empty -= 1
            if not empty:
                return table


def table(size: int, backends: list[tuple[str, int]], out: AbstractSet[str] = frozenset()) -> list[str]:
    """The lookup table for configured `backends` with the ones in `out` (down, drained) taken out.

    The table of all configured backends is built first; the slots of those that are out
    are then shared among the rest by the same Maglev turns. So a backend going out moves
    only its own slots (1/N of the flows), and coming back moves them back; and the result
    depends only on (backends, out), never on the order things happened in.
    """
    base = populate(size, backends)
    if not out:
        return _filled(base)
    up = [(n, w) for n, w in backends if n not in out]
    if not up:
        return []
    return _filled(populate(size, up, [s if s not in out else None for s in base]))


def _filled(slots: list[str | None]) -> list[str]:
    """A table populate() filled: every slot holds a backend (there was at least one)."""
    if None in slots:
        raise ValueError("a Maglev table with empty slots: no backend to fill them")
    return [s for s in slots if s is not None]


def shares(slots: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in slots:
        out[s] = out.get(s, 0) + 1
    return {k: v / len(slots) for k, v in out.items()}


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


@lru_cache(maxsize=4096)
def default_size(weights: tuple[int, ...]) -> int:
    """Smallest prime table size, larger than the number of backends, whose table of these
    weights meets both targets:

    - no backend's share exceeds its fair share by more than 1 percentage point (so
      taking one out re-maps at most 1/N + 1pp of the flows), and
    - from 10 backends on, max/fair share <= 1.02.

    With few backends the first rule is the binding one and keeps tables small (31
    slots for 4 equal backends): slot maps are the bulk of a large ruleset's load time.
    """
    if not weights:
        return 2
    total = sum(weights)
    n = len(weights)
    size = n + 1  # more slots than backends: a table of exactly N slots would be plain mod-N hashing
    while size < DEFAULT_MAX_SIZE:
        if is_prime(size):
            names = [(f"b{i}", w) for i, w in enumerate(weights)]  # shares do not depend on names
            got = shares(_filled(populate(size, names)))
            worst_abs = max(got.get(f"b{i}", 0) - w / total for i, w in enumerate(weights))
            worst_rel = max(got.get(f"b{i}", 0) / (w / total) for i, w in enumerate(weights))
            if worst_abs <= 0.01 and (n < 10 or worst_rel <= 1.02):
                return size
        size += 1
    return DEFAULT_MAX_SIZE


# -- the kernel's jhash (include/linux/jhash.h) and nft's `jhash ... mod M` ---------

_M32 = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def jhash(data: bytes, initval: int) -> int:
    """Bob Jenkins' lookup3 as the kernel's jhash(): little-endian words (x86, arm64)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _M32
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k : k + 4], "little")) & _M32
        b = (b + int.from_bytes(data[k + 4 : k + 8], "little")) & _M32
        c = (c + int.from_bytes(data[k + 8 : k + 12], "little")) & _M32
        a = (a - c) & _M32
        a ^= _rol(c, 4)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol(a, 6)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol(b, 8)
        b = (b + a) & _M32
        a = (a - c) & _M32
        a ^= _rol(c, 16)
        c = (c + b) & _M32
        b = (b - a) & _M32
        b ^= _rol(a, 19)
        a = (a + c) & _M32
        c = (c - b) & _M32
        c ^= _rol(b, 4)
        b = (b + a) & _M32
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    c ^= b
    c = (c - _rol(b, 14)) & _M32
    a ^= c
    a = (a - _rol(c, 11)) & _M32
    b ^= a
    b = (b - _rol(a, 25)) & _M32
    c ^= b
    c = (c - _rol(b, 16)) & _M32
    a ^= c
    a = (a - _rol(c, 4)) & _M32
    b ^= a
    b = (b - _rol(a, 14)) & _M32
    c ^= b
    c = (c - _rol(b, 24)) & _M32
    return c


def _register(value: bytes) -> bytes:
    """A field as nft loads it into 32-bit registers: zero-padded to a multiple of 4 bytes."""
    return value + bytes(-len(value) % 4)


def slot(scheduler: str, seed: int, size: int, saddr: str, sport: int, daddr: str, dport: int) -> int:
    """The slot nft's `jhash ... mod size seed seed` picks for a connection (hash | source-hash)."""
    src, dst = ipaddress.ip_address(saddr).packed, ipaddress.ip_address(daddr).packed
    if scheduler == "source-hash":
        data = _register(src)
    elif len(src) == 16:  # IPv6 pools hash the client side only (see templates/macros.nft.j2)
        data = _register(src) + _register(sport.to_bytes(2, "big"))
    else:
        data = b"".join(_register(x) for x in (src, sport.to_bytes(2, "big"), dst, dport.to_bytes(2, "big")))
    return (jhash(data, seed) * size) >> 32
