"""Backend health: the rise/fall state machine (pure) and the TCP connect probe.

A backend starts up. `fall` consecutive failed probes take it down; `rise` consecutive
successes bring it back. Streaks are capped at rise/fall, so a steady backend's record
does not change from round to round.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nftlb import model
from nftlb import plan as planlib

NO_CLIENT_PATH = "no reply by the client path"  # answers a direct probe, not one by the clients' path


@dataclass(frozen=True)
class Target:
    pool: str
    backend: str  # display form, "10.0.0.11:8080" / "[2001:db8::1]:80"
    address: str
    port: int  # the port probed: the pool's health port, else the backend's
    health: model.Health

    @property
    def key(self) -> str:
        return f"{self.pool}|{self.backend}"

    @property
    def path(self) -> bool:
        return self.health.path


def targets(config: model.Config) -> list[Target]:
    out = []
    for pool in config.pools:
        h = config.health_of(pool)
        if h is None:
            continue
        for b in pool.backends:
            display = planlib.Endpoint(b.address, b.port).display
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
    h = target.health
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


Probe = Callable[[str, int, float], Awaitable[tuple[bool, str, float | None]]]


async def tcp_probe(address: str, port: int, timeout: float) -> tuple[bool, str, float | None]:
    """TCP connect: (ok, why not, seconds to connect), within `timeout` (+50 ms to close). The
    connection is closed at once: the kernel's handshake is all it asks of the backend."""
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except TimeoutError:
        return False, f"no answer within {timeout:g}s", None
    except ConnectionRefusedError:
        return False, "connection refused", None
    except OSError as e:  # asyncio words it "Connect call failed (addr, port)": say what the errno says
        return False, (os.strerror(e.errno) if e.errno else e.strerror or str(e)).lower(), None
    latency = time.monotonic() - started
    writer.close()
    try:  # within what is left of the timeout: a probe's verdict never takes longer than that
        await asyncio.wait_for(writer.wait_closed(), max(0.05, timeout - latency))
    except (TimeoutError, OSError):
        pass
    return True, "", latency


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, no TIME_WAIT


async def path_probe(address: str, port: int, timeout: float) -> tuple[bool, str, float | None]:
    """A TCP connect the way a client's connection reaches the backend: the socket carries
    PATH_PROBE_MARK, and the table's postrouting chain SNATs it to the path source, an address
    that is not on the backend's subnet. So the backend's SYN-ACK must come back through the
    gateway, as its answers to clients must; a backend whose route back (or firewall) fails
    clients fails this probe too. Closed with a reset: it leaves no TIME_WAIT socket on the
    gateway and a conntrack entry of seconds, not minutes."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    started = time.monotonic()
    try:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, planlib.PATH_PROBE_MARK)
        except PermissionError:
            return False, "probe error: cannot mark the path probe's socket (needs CAP_NET_ADMIN)", None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (address, port)), timeout)
        except TimeoutError:
            return False, f"no answer within {timeout:g}s", None
        except ConnectionRefusedError:
            return False, "connection refused", None
        except OSError as e:
            return False, (os.strerror(e.errno) if e.errno else e.strerror or str(e)).lower(), None
        return True, "", time.monotonic() - started
    finally:
        sock.close()


def by_path(path: Probe = path_probe, direct: Probe | None = None) -> Probe:
    """The probe of a `health: path` backend: by the clients' path, and when that fails, a direct
    probe says why. A backend that answers directly but not by the clients' path is down with
    NO_CLIENT_PATH. The direct probe gets what is left of the timeout, at least 100 ms (a
    backend that answers slower than that is down all the same; only the reason differs), so a
    probe round is not stretched much, and a healthy backend costs one probe."""
    direct = direct or tcp_probe

    async def probe(address: str, port: int, timeout: float) -> tuple[bool, str, float | None]:
        started = time.monotonic()
        ok, detail, latency = await path(address, port, timeout)
        if ok:
            return ok, detail, latency
        left = max(0.1, timeout - (time.monotonic() - started))
        plain_ok, plain_detail, _ = await direct(address, port, left)
        if plain_ok:
            return False, NO_CLIENT_PATH, None
        # down either way: say what a direct probe says (refused, unreachable), unless it only ran
        # out of the little time it had
        return False, detail if plain_detail.startswith("no answer") else plain_detail, None

    return probe
