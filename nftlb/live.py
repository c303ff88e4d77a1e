"""What is known of the live table, and whether it is exactly what nftlb's last commit left.

That decides between a small transaction (only what changed) and replacing the whole table,
and it is decided without listing the table whenever possible: the kernel counts committed
transactions (the ruleset generation), and when the count is where nftlb's last commit left
it, nothing can have touched the table. Otherwise a listing is compared with the snapshot
taken after that commit (kept for tables small enough to list cheaply), and failing that the
table is not trusted.
"""

from __future__ import annotations

from nftlb import __version__, diff, state
from nftlb.decide import Live
from nftlb.kernel import Kernel


def inspect(nft: Kernel, applied: state.Applied | None, table: str) -> Live:
    if applied is None or applied.table != table:
        if nft.has_table(table):
            return Live(
                True,
                False,
                f"table inet {table} exists but the state dir has no record of nftlb loading it; apply will replace it",
            )
        return Live(False, False, None)
    if applied.version != __version__:
        exists = nft.has_table(table)
        why = (
            f"table inet {table} was loaded by nftlb {applied.version}; this is {__version__}: "
            "apply will reload it whole"
        )
        return Live(exists, False, why if exists else None)
    if applied.generation is not None and nft.generation() == applied.generation:
        return Live(True, True, None)  # nothing committed since nftlb's own last commit
    if applied.snapshot is not None:
        listing = nft.list(f"table inet {table}")
        if listing is None:
            return Live(False, False, f"table inet {table} was deleted outside nftlb")
        live = diff.normalize(listing)
        if live == applied.snapshot:
            return Live(True, True, None)  # other tables changed, ours did not
        return Live(True, False, diff.drift_report(applied.snapshot, live))
    if not nft.has_table(table):
        return Live(False, False, f"table inet {table} was deleted outside nftlb")
    return Live(
        True,
        False,
        f"nftables changed since nftlb's last commit (ruleset generation {applied.generation} "
        f"-> {nft.generation()}) and table inet {table} is too large to compare cheaply; "
        "apply will reload it whole",
    )
