"""Backend health, pure: what is probed (targets), what is known (records), and the rise/fall
state machine that folds each probe result in. The probes themselves are in nftlb.probes.

A backend starts up. `fall` consecutive failed probes take it down; `rise` consecutive
successes bring it back. Streaks are capped at rise/fall, so a steady backend's record
does not change from round to round.
"""

from __future__ import annotations

from dataclasses import dataclass

from nftlb import schema
from nftlb.plan import Endpoint


@dataclass(frozen=True)
class Target:
    pool: str
    backend: str  # display form, "10.0.0.11:8080" / "[2001:db8::1]:80"
    address: str
    port: int  # the port probed: the pool's health port, else the backend's
    settings: schema.ProbeSettings

    @property
    def key(self) -> str:
        return f"{self.pool}|{self.backend}"

    @property
    def path(self) -> bool:
        return self.settings.path


def targets(config: schema.Config) -> list[Target]:
    out = []
    for pool in config.pools:
        h = config.probe_settings(pool)
        if h is None:
            continue
        for b in pool.backends:
            display = Endpoint(b.address, b.port).display
            out.append(Target(pool.name, display, str(b.address), h.port or b.port, h))
    return out


@dataclass
class Record:
    up: bool = True
    ok: int = 0  # consecutive successes, capped at rise
    failed: int = 0  # consecutive failures, capped at fall
    since: float = 0.0  # unix time of the last up/down change (0: never changed)
    error: str = ""  # why the last failed probe failed
    latency: float | None = None  # seconds, of the last successful connect
    checked: float | None = None  # unix time of the last probe


@dataclass(frozen=True)
class Transition:
    target: Target
    up: bool
    streak: int
    reason: str

    def __str__(self) -> str:
        t = self.target
        if self.up:
            return f"pool {t.pool} backend {t.backend} up after {self.streak} successes"
        return f"pool {t.pool} backend {t.backend} down after {self.streak} failures: {self.reason}"


def observe(
    record: Record, target: Target, ok: bool, detail: str, latency: float | None, now: float
) -> Transition | None:
    """Fold one probe result into `record`; return the transition it causes, if any."""
    h = target.settings
    record.checked = now
    if ok:
        record.ok, record.failed, record.latency = min(record.ok + 1, h.rise), 0, latency
        if not record.up and record.ok >= h.rise:
            record.up, record.since = True, now
            return Transition(target, True, record.ok, "")
    else:
        record.failed, record.ok, record.error = min(record.failed + 1, h.fall), 0, detail
        if record.up and record.failed >= h.fall:
            record.up, record.since = False, now
            return Transition(target, False, record.failed, detail)
    return None


def load(doc: dict | None) -> dict[str, Record]:
    return {k: Record(**v) for k, v in ((doc or {}).get("backends") or {}).items()}


def dump(records: dict[str, Record]) -> dict:
    # vars(), not asdict(): a Record holds only scalars, and asdict's recursive copy costs 8 times as much,
    # every round a backend flaps, for every backend watched
    return {"backends": {k: dict(vars(v)) for k, v in sorted(records.items())}}
