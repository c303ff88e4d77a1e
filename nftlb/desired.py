"""What the pools file asks for: the file read and validated (cached by its text), planned with
what the state dir knows beyond it (the watcher's health view, the operator's drains, the
keep-last memory). The first step of every command that reaches the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nftlb import errors, pools_file, render, schema, state
from nftlb.plan import Conditions, Plan, build


@lru_cache(maxsize=4)
def parse(text: str, source: str) -> schema.Config:
    """A file's text validated, cached: a re-apply, the watcher and status read the same text again."""
    return pools_file.parse(text, source)


def conditions_of(state_dir: Path, applied: state.Applied | None) -> Conditions:
    """What the state dir knows beyond the file: health (watcher), drains (operator), keep-last memory."""
    health = state.read_doc(state_dir, state.HEALTH) or {}
    overrides = state.read_doc(state_dir, state.OVERRIDES) or {}
    down = {tuple(k.split("|", 1)) for k, v in health.get("backends", {}).items() if not v.get("up", True)}
    last = Conditions.from_dict(applied.conditions).last if applied else {}
    drained = frozenset(map(tuple, overrides.get("drained", [])))
    return Conditions(down=frozenset(down), drained=drained, last=last)


@dataclass
class Desired:
    source: str
    source_text: str
    config: schema.Config
    plan: Plan
    conditions: Conditions

    @property
    def script(self) -> str:
        return render.ruleset(self.plan)


def of_text(source: str, text: str, conditions: Conditions) -> Desired:
    config = parse(text, source)
    return Desired(source, text, config, build(config, conditions), conditions)


def check(path: str | Path) -> schema.Config:
    """Read and validate a pools file (ConfigError, exit 2): before any kernel or state dir."""
    return parse(pools_file.read(path), str(path))


def of_file(path: str | Path, state_dir: Path | None = None) -> Desired:
    """Validate and plan a pools file, with the state dir's health and drains when given."""
    text = pools_file.read(path)
    parse(text, str(path))  # raise ConfigError before anything reads the state dir
    conditions = conditions_of(state_dir, state.load(state_dir)) if state_dir is not None else Conditions()
    return of_text(str(path), text, conditions)


def applied_plan(applied: state.Applied) -> Plan | None:
    """The plan of the live generation (None if this nftlb cannot read it)."""
    try:
        return build(parse(applied.source_text, applied.source), Conditions.from_dict(applied.conditions))
    except errors.ConfigError:
        return None


def summary(p: Plan) -> dict:
    pools = p.pools
    return {
        "table": p.table,
        "pools": len(pools),
        "tcp": sum(x.protocol == "tcp" for x in pools),
        "udp": sum(x.protocol == "udp" for x in pools),
        "ipv4": sum(x.family == "ip" for x in pools),
        "ipv6": sum(x.family == "ip6" for x in pools),
        "backends": sum(len(x.backends) for x in pools),
        "draining": sum(len(x.draining) for x in pools),
        "down": sum(len(x.down) for x in pools),
        "refusing": [x.name for x in pools if not x.slots],
    }


def element_count(p: Plan) -> int:
    return sum(len(x.slots) + 2 for x in p.pools)
