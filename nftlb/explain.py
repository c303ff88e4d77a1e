"""`nftlb explain`: how a pool picks its backends, and where a given client goes, computed with
the kernel's own jhash (nftlb.maglev), so that it is what the kernel will do.
"""

from __future__ import annotations

from pathlib import Path

from nftlb import desired, maglev, schema
from nftlb.errors import UsageError
from nftlb.plan import Endpoint


def pool(
    path: str | Path, pool_name: str, state_dir: Path | None = None, client: tuple[str, int | None] | None = None
) -> dict:
    """How a pool picks: its table, each backend's share, and where a given client goes."""
    want = desired.of_file(path, state_dir)
    p = want.plan.pool(pool_name)
    if p is None:
        raise UsageError(f"no pool {pool_name!r} in {path} (pools: {', '.join(x.name for x in want.plan.pools)})")
    weights = {
        Endpoint(b.address, b.port): b.weight
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


def client(text: str | None) -> tuple[str, int | None] | None:
    """`--client ADDR[:PORT]` ([V6]:PORT): (address, port or None); UsageError when it is neither."""
    if text is None:
        return None
    try:
        parsed = schema._parse_short(text)
        schema._address(parsed["address"], "client")
    except ValueError as e:
        raise UsageError(f"--client {text!r}: {e}") from None
    return parsed["address"].strip("[]"), parsed.get("port") or None
