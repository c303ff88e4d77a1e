"""The pools file's schema: its fields, their defaults and the rules of each (pydantic).

Pure: values in, a validated `Config` out, or pydantic's errors. Reading the file, its line
numbers and the rules that span several fields live in nftlb.pools_file.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from nftlb.errors import show

DEFAULT_TABLE = "nftlb"
DEFAULT_SEED = 0x6E66746C  # "nftl": fixed, so every gateway given the same file hashes alike

# Words nft 1.0.6 cannot take as a table name (a syntax error in `table inet WORD`, `delete table
# inet WORD`, `add element inet WORD ...` or `list table inet WORD`): found by trying every word of
# nft(8) and of libnftables' strings, and every name of up to 3 characters, in a scratch namespace.
NFT_KEYWORDS = frozenset(
    """
accept add ah all and arp bridge cgroup chain chains comment comp constant continue counter counters
cpu create ct daddr day dccp define delete describe device devices dnat drop dst dup dynamic ecn
element elements eq esp ether exists expires export exthdr fib flags flow flowtable flowtables flush
frag fwd ge get goto gt handle hbh hdrlength hook hooks hour ibriport ibrname icmp icmpv6 igmp iif
iifgroup iifname iiftype import include index inet insert interval ip ip6 ipsec jhash jump le limit
limits list log lt map maps mark masquerade meta meter meters mh missing monitor ne netdev nftrace
not notrack numgen obriport obrname offload offset oif oifgroup oifname oiftype or osf pkttype
policy position priority queue quota quotas random redefine redirect reject rename replace reset
return rt rt0 rt2 rtclassid rule ruleset sctp secmark secmarks set sets size skgid skuid snat socket
srh symhash synproxy synproxys table tables tcp th time timeout tproxy type typeof udp udplite
undefine update vlan vmap xor xt
""".split()
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

POOL_NAME = _POOL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
_SHORT_V6 = re.compile(r"\[(?P<addr>[^\]]+)\](?::(?P<port>[^:]*))?")
_SPACE = " \t\r\n"  # around an address: str.strip() would also take U+0085, U+00A0, U+2028 ...
_PORT = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() and int() also take "８０" and "٨٠"


def _address(value: Any, what: str) -> IPAddress:
    if isinstance(value, str):
        return _parsed_address(value, what)
    return _check_address(value, what)


@lru_cache(maxsize=262144)  # a re-apply reads the same addresses twice (old and new file)
def _parsed_address(value: str, what: str) -> IPAddress:
    return _check_address(value, what)


def _check_address(value: Any, what: str) -> IPAddress:
    """An address a packet can be sent to: not unspecified, multicast, loopback or link-local."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = value
    elif not isinstance(value, str):
        raise ValueError(f"expected an IPv4 or IPv6 address as a string, got {type(value).__name__}")
    else:
        try:
            addr = ipaddress.ip_address(value.strip(_SPACE))
        except ValueError:
            raise ValueError(f"{show(value)} is not an IPv4 or IPv6 address") from None
    if getattr(addr, "scope_id", None) is not None:  # "fe80::1%eth0": Python keeps whatever follows the %
        raise ValueError(f"{show(value)} has a zone index (%...); nftables addresses cannot carry one")
    shown = value.strip(_SPACE) if isinstance(value, str) else str(addr)  # as written, on one line
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        raise ValueError(f"{shown} is an IPv4-mapped IPv6 address; write it as {addr.ipv4_mapped}")
    for bad, why in (
        (addr.is_unspecified, "unspecified"),
        (addr.is_multicast, "multicast"),
        (addr.is_loopback, "loopback (forwarded traffic cannot be DNATed to it)"),
        (addr.is_link_local, "link-local"),
        (addr == _BROADCAST, "broadcast"),
    ):
        if bad:
            raise ValueError(f"{shown} is {why}; a {what} needs a unicast address")
    return addr


def _not_bool(v: Any) -> None:
    if isinstance(v, bool):
        raise ValueError(f"YAML read this as the boolean {str(v).lower()} (yes/no/on/off); put it in quotes")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend(_Model):
    address: Annotated[IPAddress, PlainValidator(lambda v: _address(v, "backend"))]
    port: StrictInt = Field(0, ge=1, le=65535)  # 0 (not given): the pool's port, filled in by Pool
    weight: StrictInt = Field(1, ge=1, le=1000)
    state: Literal["active", "drain"] = "active"
    backup: StrictBool = False  # used only while no primary backend of the pool is up

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        """``10.0.0.1:8080``, ``[2001:db8::1]:8080``, or a bare address (the pool's port)."""
        if isinstance(data, str):
            return _parse_short(data)
        return data

    @property
    def key(self) -> tuple:
        return (self.address.version, int(self.address), self.port)


def _parse_short(text: str) -> dict:
    text = text.strip(_SPACE)
    m = _SHORT_V6.fullmatch(text)
    if m:
        addr, port = m["addr"], m["port"]
    elif text.count(":") == 1:
        addr, port = text.split(":")
    else:  # a bare IPv4 or IPv6 address
        addr, port = text, None
    out: dict[str, Any] = {"address": addr}
    if port is not None:
        if not _PORT.fullmatch(port):
            raise ValueError(f"port in {show(text)} is not a number")
        out["port"] = int(port)
    return out


_DURATION = re.compile(r"(?P<n>[0-9]{1,12}(?:\.[0-9]{1,12})?) *(?P<unit>ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration(v: Any, longest: float = 3600) -> Any:
    """`500ms`, `2s`, `1m`, `1h`, or plain seconds -> float seconds in (0, longest]."""
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if isinstance(v, (int, float)):
        try:
            seconds = float(v)
        except OverflowError:  # an int beyond float's range
            seconds = float("inf")
    elif isinstance(v, str) and (m := _DURATION.fullmatch(v.strip())):
        seconds = float(m["n"]) * _UNITS[m["unit"]]
    else:
        raise ValueError(f"{show(v)} is not a duration: write 500ms, 2s, 1m or a number of seconds")
    if not 0 < seconds <= longest:  # also refuses NaN
        raise ValueError(f"{show(v)} is out of range: more than 0 and at most {longest:g}s")
    return seconds


Duration = Annotated[float, BeforeValidator(duration)]


def _persistence(v: Any) -> Any:
    if v in (False, "off", 0, None):
        return None
    seconds = duration(v, longest=7 * 86400)
    if seconds != int(seconds):
        raise ValueError(f"{show(v)}: persistence is kept in whole seconds")
    return int(seconds)


Persistence = Annotated[int | None, BeforeValidator(_persistence)]


# Path probes come from these addresses unless `health: path_source` says otherwise: the
# benchmarking ranges (RFC 2544, RFC 5180), which no real client has and no backend's subnet holds.
PATH_SOURCES = (ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv6Address("2001:2::1"))


def _path_sources(v: Any) -> Any:
    """One address or a list of them, at most one per family."""
    items = v if isinstance(v, list) else [v]
    out = [_address(x, "path_source") for x in items]
    versions = [a.version for a in out]
    if not out or len(set(versions)) != len(versions):
        raise ValueError("give one address, or a list of at most one IPv4 and one IPv6 address")
    return tuple(sorted(out, key=lambda a: a.version))


class HealthDefaults(_Model):
    """Top-level `health:`: how every backend is probed unless its pool says otherwise."""

    interval: Duration = 2.0  # between probes of one backend
    timeout: Duration = 1.0  # TCP connect timeout
    rise: StrictInt = Field(2, ge=1, le=100)  # consecutive successes before a down backend is up
    fall: StrictInt = Field(3, ge=1, le=100)  # consecutive failures before an up backend is down
    path: StrictBool = False  # probe the way clients come in (dnat pools): see nftlb.probes.path_probe
    path_source: Annotated[tuple[IPAddress, ...], BeforeValidator(_path_sources)] = PATH_SOURCES

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthDefaults:
        if self.timeout > self.interval:
            raise ValueError(f"timeout ({self.timeout:g}s) must not exceed interval ({self.interval:g}s)")
        return self


class HealthOverride(_Model):
    """A pool's `health:`: any of the defaults, plus the TCP port to probe."""

    interval: Duration | None = None
    timeout: Duration | None = None
    rise: StrictInt | None = Field(None, ge=1, le=100)
    fall: StrictInt | None = Field(None, ge=1, le=100)
    port: StrictInt | None = Field(None, ge=1, le=65535)  # default: each backend's own port
    path: StrictBool | None = None  # default: the top-level `health: path`


@dataclass(frozen=True)
class ProbeSettings:
    """The effective probe settings of one pool."""

    interval: float
    timeout: float
    rise: int
    fall: int
    port: int | None
    path: bool = False  # probes take the clients' path (from a path source, SNATed by the table)


class Pool(_Model):
    name: str
    vip: Annotated[IPAddress, PlainValidator(lambda v: _address(v, "vip"))]
    port: StrictInt = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    scheduler: Literal["hash", "source-hash", "round-robin", "random"] = "hash"
    mode: Literal["dnat", "masquerade"] = "dnat"
    backends: list[Backend] = Field(min_length=1)
    health: HealthOverride | Literal[False] | None = None  # `health: off` disables probing
    on_down: Literal["keep", "reset"] | None = None  # established connections of a down backend
    when_all_down: Literal["reject", "keep-last"] = "reject"
    table_size: StrictInt | None = Field(None, ge=2, le=65537)  # Maglev slots (a prime); default: sized for N
    persistence: Persistence = None  # seconds a client address stays on its backend after its last connection

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int | None) -> int | None:
        from nftlb.maglev import is_prime

        if v is not None and not is_prime(v):
            raise ValueError(f"{v} is not a prime; Maglev needs a prime table size (e.g. 251, 4099, 65537)")
        return v

    @field_validator("health", mode="before")
    @classmethod
    def _health_off(cls, v: Any) -> Any:
        return False if v in (False, "off") else v

    @property
    def reset_on_down(self) -> bool:
        """Delete a down backend's conntrack entries? Default: yes for udp, no for tcp."""
        return self.on_down == "reset" if self.on_down else self.protocol == "udp"

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, v: Any) -> str:
        _not_bool(v)
        if not isinstance(v, str) or not _POOL_NAME.fullmatch(v):
            raise ValueError(f"{show(v)} is not a pool name: use 1-31 characters a-z 0-9 _ -, starting with a letter")
        return v

    @model_validator(mode="after")
    def _default_ports(self) -> Pool:
        for b in self.backends:
            if not b.port:
                b.port = self.port
        return self

    @property
    def family(self) -> Literal["ip", "ip6"]:
        return "ip" if self.vip.version == 4 else "ip6"


class Config(_Model):
    table: str = DEFAULT_TABLE
    seed: StrictInt = Field(DEFAULT_SEED, ge=0, le=0xFFFFFFFF)
    health: HealthDefaults = HealthDefaults()
    pools: list[Pool]

    def probe_settings(self, pool: Pool) -> ProbeSettings | None:
        """Probe settings for `pool`, or None when its probing is off."""
        if pool.health is False:
            return None
        o = pool.health or HealthOverride()
        d = self.health
        # masquerade backends answer the gateway's own address: the plain probe is their clients' path
        path = (o.path if o.path is not None else d.path) and pool.mode == "dnat"
        return ProbeSettings(
            interval=o.interval or d.interval,
            timeout=o.timeout or d.timeout,
            rise=o.rise or d.rise,
            fall=o.fall or d.fall,
            port=o.port,
            path=path,
        )

    def path_sources(self) -> tuple[IPAddress, ...]:
        """The path sources in use: of the families whose pools are probed by their clients' path."""
        families = {p.vip.version for p in self.pools if (h := self.probe_settings(p)) is not None and h.path}
        return tuple(a for a in self.health.path_source if a.version in families)

    @field_validator("table", mode="before")
    @classmethod
    def _check_table(cls, v: Any) -> str:
        _not_bool(v)
        if not isinstance(v, str) or not TABLE_NAME.fullmatch(v):
            raise ValueError(f"{show(v)} is not a table name: use 1-31 characters a-z 0-9 _, starting with a letter")
        if v in NFT_KEYWORDS:
            raise ValueError(
                f"{v!r} is an nftables keyword, which nft does not take as a table name (choose another, e.g. lb_{v})"
            )
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _hex_seed(cls, v: Any) -> Any:
        if isinstance(v, str):
            if len(v) > 20 or not v.isascii():  # 0xffffffff is 10 characters; int() would also read "٥"
                raise ValueError(f"{show(v)} is not a number from 0 to 0xffffffff")
            try:
                return int(v, 0)
            except ValueError:
                raise ValueError(f"{show(v)} is not a number (write it as 24301 or 0x5eed)") from None
        return v
