"""Health probes: a TCP connect to the backend, directly from the gateway or by the clients'
path. Each takes (address, port, timeout) and returns (ok, why not, seconds to connect).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from nftlb import plan

NO_CLIENT_PATH = "no reply by the client path"  # answers a direct probe, not one by the clients' path

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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, plan.PATH_PROBE_MARK)
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
