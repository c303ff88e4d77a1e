"""The seam to the kernel: what nftlb asks of nf_tables and conntrack, and the ways in.

A `Kernel` has:
- `run(script, check=False)`: one nft script as one kernel transaction (or only checked by
  the kernel when `check`); raises KernelError with what nft said;
- `list(what)`: the JSON listing of one object, e.g. "table inet nftlb" or "map inet nftlb
  services4"; None if it does not exist;
- `generation()`: the ruleset generation, +1 per committed transaction in this network
  namespace (any table's). nftlb records it after each of its commits: when it has not
  moved, nothing can have changed the live table;
- `has_table(name)`: is `table inet NAME` there;
- `conntrack`: the same namespace's connection table (nftlb.kernel.conntrack.Tool).

`Libnftables` and `NftBinary` (nftlb.kernel.nft) reach the real kernel; `Fake`
(nftlb.kernel.fake) keeps tables in memory for unit tests. Every other program nftlb runs
goes through nftlb.kernel.programs.
"""

from __future__ import annotations

from typing import Any, Protocol

from nftlb.errors import KernelError, UsageError

NAMES = ("libnftables", "nft")  # the CLI's --backend choices


class Kernel(Protocol):
    name: str

    def run(self, script: str, *, check: bool = False) -> None: ...

    def list(self, what: str) -> str | None: ...

    def generation(self) -> int: ...

    def has_table(self, name: str) -> bool: ...

    @property
    def conntrack(self) -> Any: ...  # nftlb.kernel.conntrack.Tool, or the fake's


def make(name: str | None = None) -> Kernel:
    """`libnftables`, `nft`, or None: the bindings when importable, else the nft binary."""
    from nftlb.kernel.nft import Libnftables, NftBinary

    if name == "libnftables":
        return Libnftables()
    if name == "nft":
        return NftBinary()
    if name is not None:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    try:
        return Libnftables()
    except KernelError as no_bindings:
        try:
            return NftBinary()
        except KernelError as no_binary:
            raise KernelError(f"no way into the kernel: {no_bindings}; and {no_binary}") from None
