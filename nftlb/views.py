"""What the commands print for a person at a terminal: one function per command, from the
library's result to text. (`--json` prints the result's own dict instead: nftlb.cli.)
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from nftlb.errors import ConfigError, NftlbError


def _names(names, most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _drift(d) -> str:
    if not d.drift:
        return ""
    return f"drift: {d.drift}\n" if "\n" not in d.drift else f"drift (changed outside nftlb):\n{d.drift}"


def _when(ts: float, fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def validate(file: Path, s: dict) -> str:
    return f"{file}: ok ({s['pools']} pools, {s['backends']} backends, table inet {s['table']})"


def diff(file: Path, table: str, d) -> str:
    return _drift(d) + (d.changes or ("" if not d.in_sync else f"table inet {table} is in sync with {file}\n"))


def apply(file: Path, r) -> str:
    s = r.summary
    if r.action == "in-sync":
        text = f"table inet {s['table']} is in sync with {file}: nothing to do\n"
    elif r.action == "dry-run":
        text = (
            _drift(r.diff)
            + r.diff.changes
            + f"dry run: the kernel accepts this change to table inet {s['table']}; nothing was changed\n"
        )
    else:
        text = (
            f"applied table inet {s['table']}: {s['pools']} pools ({s['ipv4']} IPv4, {s['ipv6']} IPv6; "
            f"{s['tcp']} tcp, {s['udp']} udp), {s['backends']} backends ({s['draining']} draining) "
            f"in {r.seconds:.2f} s\n"
        )
    moved = (("added", r.pools_added), ("removed", r.pools_removed), ("changed", r.pools_changed))
    changes = [f"{k} {_names(v)}" for k, v in moved if v]
    if changes and r.action != "in-sync":
        text += "pools " + "; ".join(changes) + "\n"
    if s["refusing"]:
        text += f"refusing new connections (no active backend): {', '.join(s['refusing'])}\n"
    return text


def remove(removed: str | None) -> str:
    return f"deleted table inet {removed}\n" if removed else "no nftlb table present: nothing to do\n"


def override(doc: dict) -> str:
    verb = "drained" if doc["drained"] else "enabled"
    active = ", ".join(doc["active"]) or "none (refusing)"
    return f"pool {doc['pool']} backend {doc['backend']} {verb}; taking new connections: {active}\n"


def units(rendered: dict[str, str]) -> str:
    return "\n".join(f"### {name}\n{text}" for name, text in rendered.items())


def installed(paths: list[Path]) -> str:
    return "".join(f"wrote {p}\n" for p in paths) + (
        "next: systemctl daemon-reload && systemctl enable --now nftlb-watch.service\n"
        "  (or, instead, the timer: systemctl enable --now nftlb-watch-once.timer)\n"
    )


def explain(e: dict) -> str:
    kind = e["kind"]
    hashed = kind in ("hash", "srchash")
    size = (
        f", Maglev table of {e['table_size']} slots"
        if hashed
        else f", {e['table_size']} slots"
        if kind in ("rr", "random")
        else ", a plain DNAT"
        if kind == "direct"
        else ", refusing new connections"
    )
    lines = [
        f"pool {e['pool']}: {e['service']}, {e['scheduler']}"
        + (f" (seed {e['seed']:#x})" if hashed else "")
        + size
        + (f", persistence {e['persistence']}s" if e["persistence"] else "")
    ]
    width = max(len(r["backend"]) for r in e["backends"])
    lines.append(f"  {'backend':{width}}  weight  slots   share  state")
    lines += [
        f"  {r['backend']:{width}}  {r['weight']:6d}  {r['slots']:5d}  {r['share']:6.1%}  {r['state']}"
        for r in e["backends"]
    ]
    if "client" in e:
        c = e["client"]
        who = f"{c['address']}:{c['port']}" if c["port"] is not None else c["address"]
        where = (
            f"slot {c['slot']} -> {c['backend']}"
            if c["slot"] is not None and kind != "direct"
            else c["backend"] or c["why"]
        )
        lines.append(f"client {who} -> {where}")
    return "\n".join(lines) + "\n"


def history(entries: list[dict], state_dir: Path) -> str:
    if not entries:
        return f"no generations kept in {state_dir} yet\n"
    lines = [f"{'':1} {'#':>4}  {'applied (UTC)':19}  {'sha256':12}  {'file':24}  what changed"]
    for e in entries:
        lines.append(
            f"{'*' if e['live'] else '':1} {e['id']:>4}  {_when(e['applied_at'], '%Y-%m-%d %H:%M:%S'):19}  "
            f"{e['sha256'][:12]}  {e['source'][-24:]:24}  {e['summary']}"
        )
    return "\n".join(lines) + "\n"


def rollback(target: dict, r) -> str:
    what = (
        f"generation #{target['id']} ({target['source']}, applied {_when(target['applied_at'])}: {target['summary']})"
    )
    if r.action == "dry-run":
        return _drift(r.diff) + r.diff.changes + f"dry run: would roll back to {what}; nothing was changed\n"
    if r.action == "in-sync":
        return f"rolled back to {what}; the kernel already matched it\n"
    return f"rolled back to {what} in {r.seconds:.2f} s\n"


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "-"
    s = max(0, int(now - then))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _size(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _health(h: dict | None, now: float) -> str:
    if h is None:
        return "not probed"
    out = ("up" if h["up"] else "DOWN") + (f" {_ago(h['since'], now)}" if h["since"] else "")
    if h["up"] and h["latency_seconds"] is not None:
        out += f" ({h['latency_seconds'] * 1000:.1f} ms)"
    elif not h["up"] and h["last_error"]:
        out += f" ({h['last_error']})"
    return out


def status(doc: dict) -> str:
    """`nftlb status`: a header, then a block per pool."""
    now = doc["now"]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(doc["applied_at"]))
    head = f"table inet {doc['table']}" + ("" if doc["live"] else " (NOT LOADED: run `nftlb apply`)")
    lines = [
        f"{head}, applied {when} from {doc['source']}; health "
        + (f"checked {_ago(doc['health_checked_at'], now)} ago" if doc["health_checked_at"] else "not watched")
    ]
    if not doc["conntrack"]:
        lines.append("open connections unknown: the conntrack tool is not installed")
    for p in doc["pools"]:
        lines.append("")
        lines.append(
            f"pool {p['name']}  {p['service']}  {p['scheduler']}  {p['mode']}  {p['state']}"
            + (f" (fallback: {p['fallback']})" if p["fallback"] else "")
            + ("  probed by the clients' path" if p["probe"] == "path" else "")
        )
        cells = [
            (
                b["backend"],
                b["configured"] + ("*" if b["drained_by_operator"] else ""),
                "yes" if b["serving"] else "no",
                _health(b["health"], now),
                str(b["connections"]),
                _size(b["bytes"]),
                "-" if b["open"] is None else str(b["open"]),
            )
            for b in p["backends"]
        ]
        columns = ("backend", "config", "serving", "health", "conns", "bytes", "open")
        widths = [max(len(row[i]) for row in [columns, *cells]) for i in range(len(columns))]
        for row in [columns, *cells]:
            lines.append(
                "  "
                + "  ".join(
                    c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
    if any(b["drained_by_operator"] for p in doc["pools"] for b in p["backends"]):
        lines.append("\n* drained with `nftlb drain` (undo: `nftlb enable POOL BACKEND`)")
    return "\n".join(lines) + "\n"


def doctor(checks) -> str:
    """`nftlb doctor`: a verdict per line, then the sum."""
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{c.verdict:<5} {c.name:<{width}}  {c.detail}" for c in checks]
    counts = {v: sum(c.verdict == v for c in checks) for v in ("fail", "warn", "ok")}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    verdict = "traffic is blocked" if counts["fail"] else ("works, with warnings" if counts["warn"] else "ready")
    return "\n".join(lines + [f"doctor: {verdict} ({summary})"]) + "\n"


def report(e: NftlbError, as_json: bool) -> None:
    """An error, on stderr: a ConfigError's problems one a line, else one line; with --json, a
    document on stdout too."""
    problems = e.problems if isinstance(e, ConfigError) else []
    for line in (str(p) for p in problems) if problems else [f"nftlb: {e}"]:
        print(line, file=sys.stderr)
    if as_json:
        doc = {"ok": False, "exit_code": int(e.exit_code), "error": str(e), "problems": [p.as_dict() for p in problems]}
        print(json.dumps(doc, indent=2, sort_keys=True))
