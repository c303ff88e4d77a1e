"""What `nftlb doctor` reads of the box, shared by its checks: a check's verdict, sysctls
under /proc, this namespace's addresses, its routes and policy routing rules (`ip -j`, through
nftlb.kernel.programs). Nothing here changes anything.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil

from nftlb.errors import KernelError
from nftlb.kernel import programs

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Verdict = Literal["ok", "warn", "fail"]  # fail: something blocks traffic


@dataclass
class Check:
    name: str  # short id: "kernel", "ip_forward", "vip 198.51.100.10", ...
    verdict: Verdict
    detail: str  # one line: what is wrong and what to do

    def as_dict(self) -> dict:
        return asdict(self)


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def local_addresses() -> dict[Address, str]:
    """Every address on this box's interfaces (in this network namespace) -> its interface."""
    out: dict[Address, str] = {}
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.setdefault(ipaddress.ip_address(a.address.split("%")[0]), ifname)
                except ValueError:
                    pass
    return out


def examples(items: list, most: int = 3) -> str:
    return ", ".join(map(str, items[:most])) + (f" and {len(items) - most} more" if len(items) > most else "")


def ip(*argv: str) -> tuple[int, list] | None:
    """`ip -j ARGV`: (exit status, parsed output), None when unknown (no ip tool, no answer)."""
    try:
        out = programs.run("ip", ["-j", *argv], timeout=10)
        return out.returncode, json.loads(out.stdout or "[]")
    except (KernelError, ValueError):
        return None


def route(vip: Address) -> dict | None:
    """The kernel's route to vip (`ip -j route get`), {} when there is none, None when unknown."""
    got = ip("route", "get", str(vip))
    if got is None:
        return None
    return (got[1] or [{}])[0] if got[0] == 0 else {}


def rules() -> list[dict]:
    """Policy routing rules, IPv4 and IPv6 (`ip -j rule show`)."""
    out = []
    for family in ("-4", "-6"):
        got = ip(family, "rule", "show")
        out += got[1] if got is not None and got[0] == 0 else []
    return out
