"""The names of the objects in nftlb's table, spelled here and only here: the templates, the
element lists, the small transactions, `status` and the persistence clean-up all take them
from these functions. Pure.

`fam` is "4" or "6", `proto` "tcp" or "udp". Per family and protocol the table holds:

    services4/6          vip . protocol . port -> goto the chain that picks (or `refuse`)
    slots{f}_{p}         vip . port . slot -> backend: every pool's lookup table
    direct{f}_{p}        vip . port -> backend: pools with one backend taking connections
    masquerade{f}_{p}    vip . port: full-NAT pools
    pools4/6             vip . protocol . port: what the accounting counts
    conns4/6, traffic4/6 vip . protocol . port . backend . port -> counters
    sticky{f}_{p}_{s}    client . vip . port -> backend, for s seconds (persistence)
    persist{f}_{p}_{s}   vip . port: the pools whose clients are remembered s seconds
"""

from __future__ import annotations

# chains of fixed names
REFUSE = "refuse"  # rejects what no backend can take: a TCP reset or an ICMP port-unreachable
REMEMBER = "remember"  # postrouting: notes where each persistent client went
PATH_PROBES = "path_probes"  # postrouting: SNATs the watcher's path probes to the path source


def services(fam: str) -> str:
    return f"services{fam}"


def slots(fam: str, proto: str) -> str:
    return f"slots{fam}_{proto}"


def direct(fam: str, proto: str) -> str:
    """The map of single-backend pools; also the name of the chain that looks it up."""
    return f"direct{fam}_{proto}"


def masquerade(fam: str, proto: str) -> str:
    return f"masquerade{fam}_{proto}"


def pools(fam: str) -> str:
    return f"pools{fam}"


def counted(what: str, fam: str) -> str:
    """`what`: "conns" (new connections) or "traffic" (packets and bytes)."""
    return f"{what}{fam}"


def sticky(fam: str, proto: str, seconds: int) -> str:
    return f"sticky{fam}_{proto}_{seconds}"


def persist(fam: str, proto: str, seconds: int) -> str:
    return f"persist{fam}_{proto}_{seconds}"


def pick_chain(kind: str, fam: str, proto: str, size: int, persistence: int | None) -> str:
    """The chain shared by hash, source-hash and random pools of one table size (and persistence)."""
    return f"{kind}{fam}_{proto}_{size}" + (f"_p{persistence}" if persistence else "")


def round_robin_chain(pool: str) -> str:
    """numgen inc keeps its counter per rule: each round-robin pool has a chain of its own."""
    return f"rr_{pool}"
