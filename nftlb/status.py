"""What the kernel is doing, per pool and backend: `nftlb status` and the metrics read this.

Sources, all read-only:
- the state dir: what was applied (the plan that is live), the watcher's health view,
  the operator's drains, and the apply/transition counts (stats.json);
- the table's accounting sets (conns4/6, traffic4/6): new connections, packets and
  bytes per service and backend, counted by the kernel since the table was loaded;
- conntrack: connections open right now, per service and backend.
"""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

from nftlb import desired, names, state
from nftlb.errors import StateError
from nftlb.kernel import Kernel
from nftlb.kernel.conntrack import Tool
from nftlb.plan import Endpoint


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))


Key = tuple[str, str, int, str, int]  # vip, protocol, port, backend address, backend port


def counters(nft: Kernel, table: str) -> tuple[dict[str, dict[Key, dict]], bool]:
    """{"conns": {key: {"packets", "bytes"}}, "traffic": {...}} from the accounting sets, and
    whether the table is there (listing a set is cheap; `list tables` is not, at 10,000 pools)."""
    out: dict[str, dict[Key, dict]] = {"conns": {}, "traffic": {}}
    for what in out:
        for fam in ("4", "6"):
            listing = nft.list(f"set inet {table} {names.counted(what, fam)}")
            if listing is None:
                return {"conns": {}, "traffic": {}}, False
            for obj in json.loads(listing or "{}").get("nftables", []):
                for elem in obj.get("set", {}).get("elem", []):
                    inner = elem.get("elem", elem) if isinstance(elem, dict) else elem
                    val = inner.get("val", inner) if isinstance(inner, dict) else inner
                    counter = inner.get("counter", {}) if isinstance(inner, dict) else {}
                    try:
                        vip, proto, port, addr, bport = val["concat"]
                        key = (_addr(vip), str(proto), int(port), _addr(addr), int(bport))
                    except (KeyError, TypeError, ValueError):
                        continue
                    out[what][key] = {"packets": int(counter.get("packets", 0)), "bytes": int(counter.get("bytes", 0))}
    return out, True


def open_connections(conntrack: str | None = None) -> dict[Key, int] | None:
    """Connections open now per (vip, protocol, port, backend, port); None without conntrack."""
    return Tool(conntrack).open_connections()


def collect(nft: Kernel, state_dir: Path, *, conntrack: str | None = None, now: float | None = None) -> dict:
    """Everything `nftlb status --json` prints: stable keys, one entry per pool and backend."""
    applied = state.load(state_dir)
    if applied is None:
        raise StateError(f"nothing applied yet in {state_dir}: run `nftlb apply FILE` first")
    plan = desired.applied_plan(applied)
    if plan is None:
        raise StateError(f"{state_dir} was written by another nftlb version ({applied.version}): re-apply first")
    config = desired.parse(applied.source_text, applied.source)
    now = time.time() if now is None else now
    health_doc = state.read_doc(state_dir, state.HEALTH) or {}
    records = health_doc.get("backends", {})
    drained = {tuple(x) for x in (state.read_doc(state_dir, state.OVERRIDES) or {}).get("drained", [])}
    counts, live = counters(nft, applied.table)
    opened = (Tool(conntrack) if conntrack is not None else nft.conntrack).open_connections()
    stats = state.read_doc(state_dir, state.STATS) or {}
    checked = [r.get("checked") for r in records.values() if r.get("checked")]
    pools = []
    for p, cp in zip(plan.pools, config.pools, strict=True):
        h = config.probe_settings(cp)
        probe = None if h is None else "path" if h.path else "tcp"  # how the watcher probes them
        by_backend = {Endpoint(b.address, b.port): b for b in cp.backends}
        rows = []
        for b in p.backends:
            key = (str(p.vip), p.protocol, p.port, str(b.address), b.port)
            conf = by_backend[b]
            rec = records.get(f"{p.name}|{b.display}")
            traffic = counts["traffic"].get(key, {})
            rows.append(
                {
                    "backend": b.display,
                    "configured": "drain" if conf.state == "drain" else "backup" if conf.backup else "active",
                    "drained_by_operator": (p.name, b.display) in drained,
                    "serving": b in p.slots,  # takes new connections now
                    "health": None
                    if rec is None
                    else {
                        "up": rec.get("up", True),
                        "since": rec.get("since") or None,
                        "last_probe": rec.get("checked"),
                        "last_error": rec.get("error") or None,
                        "latency_seconds": rec.get("latency"),
                    },
                    "connections": counts["conns"].get(key, {}).get("packets", 0),
                    "packets": traffic.get("packets", 0),
                    "bytes": traffic.get("bytes", 0),
                    "open": None if opened is None else opened.get(key, 0),
                }
            )
        pools.append(
            {
                "name": p.name,
                "vip": str(p.vip),
                "port": p.port,
                "protocol": p.protocol,
                "service": p.service,
                "scheduler": p.scheduler,
                "mode": p.mode,
                "state": "serving" if p.slots else "refusing",
                "fallback": p.fallback or None,
                "probe": probe,
                "backends": rows,
            }
        )
    return {
        "table": applied.table,
        "live": live,
        "source": applied.source,
        "applied_at": applied.applied_at,
        "health_checked_at": max(checked) if checked else None,
        "conntrack": opened is not None,
        "applies": stats.get("applies", 0),
        "apply_failures": stats.get("apply_failures", 0),
        "last_apply_success": stats.get("last_apply_success"),
        "transitions": stats.get("transitions", {}),
        "now": now,
        "pools": pools,
    }
