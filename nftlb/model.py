"""The pools file: YAML with line numbers in, a validated `Config` out.

Every problem is reported as ``FILE:LINE: field: message``; all of them at once,
never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from nftlb.errors import ConfigError

DEFAULT_TABLE = "nftlb"
DEFAULT_SEED = 0x6E66746C  # "nftl": fixed, so every gateway given the same file hashes alike

# Limits on what a pools file may be; beyond them it is refused (exit 2) before anything is built.
# A 10,000-pool YAML file (4 backends each) is about 1.9 MB and 150,000 nodes; the limits leave
# a margin of more than ten times that, and keep a hostile file from exhausting memory or the stack.
MAX_FILE_BYTES = 32 * 1024 * 1024  # read at most this much (+1 byte, to tell that it is larger)
MAX_NODES = 2_000_000  # YAML nodes after alias and merge-key expansion ("billion laughs" guard)
MAX_DEPTH = 64  # nested lists and mappings; a pools file needs 6. libyaml's composer recurses in C
#                 (100,000 nested `[` crash the process), so nftlb composes the nodes itself, iteratively.

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


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        if self.line == 0:  # the whole file: unreadable, too large, too deep
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.field}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}


def _show(value: Any, limit: int = 60) -> str:
    """A value from the file for a message: repr'd (quotes, escapes), and short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"  # repr() of a number of over 4300 digits raises
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            raise ValueError(f"{_show(value)} is not an IPv4 or IPv6 address") from None
    if getattr(addr, "scope_id", None) is not None:  # "fe80::1%eth0": Python keeps whatever follows the %
        raise ValueError(f"{_show(value)} has a zone index (%...); nftables addresses cannot carry one")
    shown = value.strip(_SPACE) if isinstance(value, str) else str(addr)  # as written, on one line
    if getattr(addr, "ipv4_mapped", None):
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
    port: StrictInt | None = Field(None, ge=1, le=65535)
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
            raise ValueError(f"port in {_show(text)} is not a number")
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
        raise ValueError(f"{_show(v)} is not a duration: write 500ms, 2s, 1m or a number of seconds")
    if not 0 < seconds <= longest:  # also refuses NaN
        raise ValueError(f"{_show(v)} is out of range: more than 0 and at most {longest:g}s")
    return seconds


Duration = Annotated[float, BeforeValidator(duration)]


def _persistence(v: Any) -> Any:
    if v in (False, "off", 0, None):
        return None
    seconds = duration(v, longest=7 * 86400)
    if seconds != int(seconds):
        raise ValueError(f"{_show(v)}: persistence is kept in whole seconds")
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
    path: StrictBool = False  # probe the way clients come in (dnat pools): see nftlb.health.path_probe
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
class Health:
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
            raise ValueError(f"{_show(v)} is not a pool name: use 1-31 characters a-z 0-9 _ -, starting with a letter")
        return v

    @model_validator(mode="after")
    def _default_ports(self) -> Pool:
        for b in self.backends:
            if b.port is None:
                b.port = self.port
        return self

    @property
    def family(self) -> str:
        return "ip" if self.vip.version == 4 else "ip6"


class Config(_Model):
    table: str = DEFAULT_TABLE
    seed: StrictInt = Field(DEFAULT_SEED, ge=0, le=0xFFFFFFFF)
    health: HealthDefaults = HealthDefaults()
    pools: list[Pool]

    def health_of(self, pool: Pool) -> Health | None:
        """Probe settings for `pool`, or None when its probing is off."""
        if pool.health is False:
            return None
        o = pool.health or HealthOverride()
        d = self.health
        # masquerade backends answer the gateway's own address: the plain probe is their clients' path
        path = (o.path if o.path is not None else d.path) and pool.mode == "dnat"
        return Health(
            interval=o.interval or d.interval,
            timeout=o.timeout or d.timeout,
            rise=o.rise or d.rise,
            fall=o.fall or d.fall,
            port=o.port,
            path=path,
        )

    def path_sources(self) -> tuple[IPAddress, ...]:
        """The path sources in use: of the families whose pools are probed by their clients' path."""
        families = {p.vip.version for p in self.pools if (h := self.health_of(p)) is not None and h.path}
        return tuple(a for a in self.health.path_source if a.version in families)

    @field_validator("table", mode="before")
    @classmethod
    def _check_table(cls, v: Any) -> str:
        _not_bool(v)
        if not isinstance(v, str) or not TABLE_NAME.fullmatch(v):
            raise ValueError(f"{_show(v)} is not a table name: use 1-31 characters a-z 0-9 _, starting with a letter")
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
                raise ValueError(f"{_show(v)} is not a number from 0 to 0xffffffff")
            try:
                return int(v, 0)
            except ValueError:
                raise ValueError(f"{_show(v)} is not a number (write it as 24301 or 0x5eed)") from None
        return v


# --- YAML with line numbers -------------------------------------------------


_STR, _MERGE, _VALUE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_SCALARS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "binary", "timestamp"))
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: 20x faster


class _TooBig(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


def _compose(loader) -> yaml.Node | None:
    """The document's root node, like `loader.get_single_node()` but iterative, and refusing
    collections nested deeper than MAX_DEPTH: libyaml's composer recurses in C, and a file of
    100,000 `[` overflows the process's stack (a segfault, not an exception)."""
    get, check, resolve = loader.get_event, loader.check_event, loader.resolve
    Scalar, SeqStart, MapStart, Alias = (
        yaml.ScalarEvent,
        yaml.SequenceStartEvent,
        yaml.MappingStartEvent,
        yaml.AliasEvent,
    )
    ScalarNode, SequenceNode, MappingNode = yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode
    ComposerError = yaml.composer.ComposerError
    get()  # stream start
    if check(yaml.StreamEndEvent):
        get()
        return None
    get()  # document start
    anchors: dict[str, yaml.Node] = {}
    stack: list[list] = []  # [collection node, key node of a mapping's pending pair, or None]
    while True:
        event = get()
        kind = event.__class__
        if kind is Scalar:
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(ScalarNode, event.value, event.implicit)
            node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        elif kind is SeqStart or kind is MapStart:
            if len(stack) >= MAX_DEPTH:
                raise _TooDeep(event.start_mark.line + 1)
            cls = SequenceNode if kind is SeqStart else MappingNode
            tag = event.tag
            if tag is None or tag == "!":
                tag = resolve(cls, None, event.implicit)
            node = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
        elif kind is Alias:
            node = anchors.get(event.anchor)
            if node is None:
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            loader.nftlb_aliases = True
        else:  # the end of a sequence or mapping
            node = stack.pop()[0]
            node.end_mark = event.end_mark
            kind = None
        if kind is not None and kind is not Alias:
            anchor = event.anchor
            if anchor is not None:
                if anchor in anchors:
                    raise ComposerError(
                        f"found duplicate anchor {anchor!r}; first occurrence",
                        anchors[anchor].start_mark,
                        "second occurrence",
                        event.start_mark,
                    )
                anchors[anchor] = node  # before its items, as PyYAML does: they may refer to it
            if kind is not Scalar:
                stack.append([node, None])
                continue
        if not stack:
            break
        top = stack[-1]
        if top[0].__class__ is SequenceNode:
            top[0].value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            top[0].value.append((top[1], node))
            top[1] = None
    get()  # document end
    if not check(yaml.StreamEndEvent):
        event = get()
        raise ComposerError(
            "expected a single document in the stream", node.start_mark, "but found another document", event.start_mark
        )
    get()
    return node


def _expanded(node: yaml.Node, sizes: dict[int, int], depth: int) -> int:
    """Nodes in `node` once every alias is expanded (an upper bound of merge keys' pairs too):
    in time linear in the nodes the file spells, whatever the expansion. An alias inside its
    own anchor never ends: it is refused as too deep."""
    if node.__class__ is yaml.ScalarNode:
        return 1
    size = sizes.get(id(node))
    if size is not None:
        return size
    if depth >= MAX_DEPTH:
        raise _TooDeep(node.start_mark.line + 1)
    size = 1
    items = node.value if node.__class__ is yaml.SequenceNode else [x for pair in node.value for x in pair]
    for item in items:
        size += _expanded(item, sizes, depth + 1)
        if size > MAX_NODES:
            break
    sizes[id(node)] = size
    return size


class _Tree:
    """Plain data from a YAML document plus the line of every key, item and value."""

    def __init__(self, text: str, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self._nodes = 0
        self._merged: set[tuple] = set()
        loader = _Loader(text)
        try:
            loader.nftlb_aliases = False
            node = _compose(loader)
            if loader.nftlb_aliases and _expanded(node, {}, 0) > MAX_NODES:
                raise _TooBig()  # a "billion laughs": refused before any of it is built
            self.lines[()] = 1 if node is None else node.start_mark.line + 1
            self.data = None if node is None else self._build(loader, node, ())
        finally:
            loader.dispose()

    def _problem(self, node: yaml.Node, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.file, node.start_mark.line + 1, _field(path) or "(top)", message))

    def _scalar(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        tag = node.tag
        if tag == _STR:  # most of a pools file: no constructor needed
            return node.value
        if tag not in _SCALARS:  # !!python/..., !foo, or a collection's tag (!!seq) on a scalar
            if tag == _VALUE:  # a plain `=`: PyYAML reads it as the string
                return node.value
            self._problem(node, path, f"unsupported YAML tag {_show(tag)}")
            return None
        try:
            return loader.yaml_constructors[tag](loader, node)
        except yaml.YAMLError:
            raise
        except Exception:  # int() of over 4300 digits, `!!bool maybe` (KeyError), `!!timestamp x` ...
            what = tag.rsplit(":", 1)[-1]
            self._problem(
                node,
                path,
                f"cannot read {_show(node.value)} as {'an' if what[0] in 'aeiou' else 'a'} "
                f"{what}" + (" (too many digits)" if len(node.value) > 4000 else ""),
            )
            return None

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig()
        if len(path) > MAX_DEPTH:  # an alias can nest a collection in itself: `&a [*a]`
            raise _TooDeep(node.start_mark.line + 1)
        kind = node.__class__
        if kind is yaml.ScalarNode:
            return self._scalar(loader, node, path)
        if kind is yaml.SequenceNode:
            if node.tag != _SEQ:
                self._problem(node, path, f"unsupported YAML tag {_show(node.tag)}")
            out_list = []
            for i, item in enumerate(node.value):
                sub = path + (i,)
                self.lines[sub] = item.start_mark.line + 1
                out_list.append(
                    self._scalar(loader, item, sub)
                    if item.__class__ is yaml.ScalarNode
                    else self._build(loader, item, sub)
                )
            self._nodes += len(node.value)
            return out_list
        if node.tag != _MAP:
            self._problem(node, path, f"unsupported YAML tag {_show(node.tag)}")
        pairs, merged = self._pairs(node, 0)
        out: dict = {}
        for n, (knode, vnode) in enumerate(pairs):
            key = self._scalar(loader, knode, path) if knode.__class__ is yaml.ScalarNode else None
            line = knode.start_mark.line + 1
            if key is None or isinstance(key, (list, dict)):
                self.problems.append(Problem(self.file, line, _field(path) or "(top)", "keys must be plain scalars"))
                continue
            sub = path + (key,)
            if key in out:
                if sub not in self._merged:
                    self.problems.append(
                        Problem(self.file, line, _field(sub), f"duplicate key (first given on line {self.lines[sub]})")
                    )
                    continue
                self._merged.discard(sub)  # an explicit key overrides a merged one
            if n < merged:
                self._merged.add(sub)
            self.lines[sub] = line
            out[key] = (
                self._scalar(loader, vnode, sub)
                if vnode.__class__ is yaml.ScalarNode
                else self._build(loader, vnode, sub)
            )
        self._nodes += len(pairs)
        return out

    def _pairs(self, node: yaml.MappingNode, depth: int) -> tuple[list, int]:
        """A mapping's (key, value) nodes with YAML merge keys (<<) expanded, merged pairs first,
        and how many were merged. PyYAML's flatten_mapping, but it leaves the node as it is (an
        alias builds the same node again), counts toward MAX_NODES (a merge of two merges of
        two ... grows exponentially) and is bounded in depth (`&a {<<: *a}` merges itself)."""
        if not any(k.tag == _MERGE for k, _ in node.value):
            return node.value, 0
        if depth >= MAX_DEPTH:
            raise _TooDeep(node.start_mark.line + 1)
        merge, explicit = [], []
        for knode, vnode in node.value:
            if knode.tag != _MERGE:
                explicit.append((knode, vnode))
                continue
            subs = vnode.value if vnode.__class__ is yaml.SequenceNode else [vnode]
            for sub in subs:
                if sub.__class__ is not yaml.MappingNode:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"expected a mapping or list of mappings for merging, but found {sub.id}",
                        sub.start_mark,
                    )
            for sub in reversed(subs):  # earlier mappings in the list win: they go last
                merge.extend(self._pairs(sub, depth + 1)[0])
                self._nodes += len(sub.value)
                if len(merge) > MAX_NODES or self._nodes > MAX_NODES:
                    raise _TooBig()
        return merge + explicit, len(merge)

    def line(self, loc: tuple) -> int:
        """Line of the deepest part of `loc` that the file spells out."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        # a key as the file spells it when it is a plain word; else quoted and escaped, so that a
        # key holding a newline or a terminal escape cannot make up lines of the report
        text = part if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else _show(part, 40)
        out += f".{text}" if out else text
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _message(err: dict) -> str:
    msg = _MESSAGES.get(err["type"])
    if msg is None:
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        value = err.get("input")
        if err["type"] not in ("value_error",) and isinstance(value, (str, int, float, bool)):
            shown = _show(value)
            if len(shown) < 60 and not shown.endswith("..."):
                msg += f" (got {shown})"
    return msg


def _loc(err: dict) -> tuple:
    # pydantic adds the union member ("function-after[...]", "IPv4Address") to the loc; drop it
    return tuple(p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\]A-Z]", p))


def read(path: str | Path) -> str:
    """The pools file's text; ConfigError if it cannot be read, is too large or is not UTF-8."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more: /dev/zero or a 50 GB file is not read whole
            if len(raw) > MAX_FILE_BYTES:
                try:
                    size = os.fstat(f.fileno()).st_size
                except OSError:
                    size = 0
    except OSError as e:
        raise ConfigError([Problem(file, 0, "file", e.strerror or str(e))]) from None
    if len(raw) > MAX_FILE_BYTES:
        what = f"{size} bytes" if size > MAX_FILE_BYTES else "more bytes"  # a pipe or device has no size
        raise ConfigError(
            [
                Problem(
                    file,
                    0,
                    "file",
                    f"{what}, larger than the limit of {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES // 2**20} MiB)",
                )
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(file, raw[: e.start].count(b"\n") + 1, "file", "not UTF-8 text")]) from None


def load(path: str | Path) -> Config:
    """Read and validate a pools file; raise ConfigError listing every problem."""
    return parse(read(path), str(path))


def parse(text: str, file: str = "<string>") -> Config:
    """Validate a pools file's text; ConfigError lists every problem with its line.

    A file written as JSON (a subset of YAML; what tools that generate thousands of pools
    tend to write) is read with the json module first, which is many times faster; only
    if it has problems is it read again as YAML, to find their lines.
    """
    if text.lstrip().startswith("{"):
        data = _json(text)
        if isinstance(data, dict):
            config, problems = _validate(data, _NoLines(file))
            if not problems:
                return config

    def fail(line: int, field: str, message: str):
        raise ConfigError([Problem(file, line, field, message)])

    if not text.strip(" \t\r\n\ufeff"):  # YAML would stumble on a tab; it is an empty file
        fail(1, "(top)", "file is empty; expected a mapping with a 'pools' list")

    try:
        tree = _Tree(text, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        fail(mark.line + 1 if mark else 0, "yaml", " ".join(filter(None, [e.context, e.problem])))
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, other controls)
        position = e.position if isinstance(e.position, int) else 0
        char = chr(e.character) if isinstance(e.character, int) else e.character  # libyaml: a code point
        fail(
            text.count("\n", 0, position) + 1,
            "yaml",
            f"character {char!r} (U+{ord(char):04X}) is not allowed in YAML"
            if isinstance(char, str) and len(char) == 1
            else (e.reason or "a character YAML does not allow"),
        )
    except yaml.YAMLError as e:
        fail(0, "yaml", str(e))
    except UnicodeEncodeError:  # lone surrogates: only from a caller's str, read() decodes strictly
        fail(0, "file", "not UTF-8 text")
    except _TooBig:
        fail(0, "file", f"more than {MAX_NODES} YAML nodes")
    except _TooDeep as e:
        fail(e.line, "yaml", f"lists and mappings nested more than {MAX_DEPTH} deep")
    except RecursionError:  # a last resort: nothing above recurses without a bound
        fail(0, "file", "nested too deeply")
    if not isinstance(tree.data, dict):
        what = "empty" if tree.data is None else f"a {type(tree.data).__name__}"
        raise ConfigError(
            tree.problems + [Problem(file, 1, "(top)", f"file is {what}; expected a mapping with a 'pools' list")]
        )
    config, problems = _validate(tree.data, tree)
    problems = tree.problems + problems
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return config


def _json(text: str) -> Any:
    """Plain JSON, or None (not JSON, or a duplicate key: the YAML reader will say where)."""

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None


class _NoLines:
    """Stands in for _Tree when the data came from JSON: problems send the file back to YAML."""

    def __init__(self, file: str):
        self.file = file

    def line(self, loc: tuple) -> int:
        return 0


def _validate(data: dict, tree) -> tuple[Config | None, list[Problem]]:
    file, problems, config = tree.file, [], None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = _loc(err)
            problems.append(Problem(file, tree.line(loc), _field(loc) or "(top)", _message(err)))
    if config is not None:  # valid field by field: check across fields on the validated pools
        problems += _cross_check([_Partial.from_pool(p) for p in config.pools], tree)
    elif isinstance(data.get("pools"), list):  # else on whatever each pool has that is readable
        problems += _cross_check([_Partial.of(p) for p in data["pools"]], tree)
    if config is not None:
        for i, pool in enumerate(config.pools):
            h = config.health_of(pool)
            if h is not None and h.timeout > h.interval:
                loc = ("pools", i, "health")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        f"timeout ({h.timeout:g}s) must not exceed interval ({h.interval:g}s)",
                    )
                )
            if isinstance(pool.health, HealthOverride) and pool.health.path and pool.mode != "dnat":
                loc = ("pools", i, "health", "path")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        "path probes are for mode: dnat (masquerade backends answer the "
                        "gateway's own address, which the plain probe already uses)",
                    )
                )
            elif h is not None and h.path and pool.vip.version not in {a.version for a in config.health.path_source}:
                loc = ("health", "path_source")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        f"pool {pool.name} is probed by its clients' path and needs an "
                        f"IPv{pool.vip.version} path_source",
                    )
                )
            if pool.persistence and pool.vip.version == 6:
                loc = ("pools", i, "persistence")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        "persistence is for IPv4 pools: nft 1.0.6 cannot keep an IPv6 client with its "
                        "backend in a dynamic map (use scheduler: source-hash to keep clients together)",
                    )
                )
            if pool.table_size is not None and pool.table_size < len(pool.backends):
                loc = ("pools", i, "table_size")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        f"{pool.table_size} slots cannot hold {len(pool.backends)} backends",
                    )
                )
        taken = {p.vip for p in config.pools} | {b.address for p in config.pools for b in p.backends}
        for a in config.health.path_source:
            if a in taken:
                loc = ("health", "path_source")
                problems.append(
                    Problem(
                        file,
                        tree.line(loc),
                        _field(loc),
                        f"{a} is a VIP or a backend here; a "
                        "path source must be an address no client, VIP or backend has",
                    )
                )
    return config, problems


@dataclass
class _Partial:
    """What can be read of one pool even when other fields of it are wrong (None: unreadable)."""

    name: str | None
    vip: IPAddress | None
    port: int | None
    protocol: str | None
    mode: str | None
    backends: list[tuple[int, Backend]]  # (index, backend) for the backends that are valid by themselves

    @classmethod
    def from_pool(cls, pool: Pool) -> _Partial:
        return cls(pool.name, pool.vip, pool.port, pool.protocol, pool.mode, list(enumerate(pool.backends)))

    @classmethod
    def of(cls, raw: Any) -> _Partial:
        if not isinstance(raw, dict):
            return cls(None, None, None, None, None, [])
        try:
            vip = _address(raw.get("vip"), "vip")
        except ValueError:
            vip = None
        port = raw.get("port") if type(raw.get("port")) is int else None
        backends = []
        for j, b in enumerate(raw.get("backends") if isinstance(raw.get("backends"), list) else []):
            try:
                backend = Backend.model_validate(b)
            except ValidationError:
                continue
            backend.port = backend.port or port
            backends.append((j, backend))
        return cls(
            name=raw.get("name") if isinstance(raw.get("name"), str) else None,
            vip=vip,
            port=port,
            protocol=raw.get("protocol", "tcp") if raw.get("protocol", "tcp") in ("tcp", "udp") else None,
            mode=raw.get("mode", "dnat") if raw.get("mode", "dnat") in ("dnat", "masquerade") else None,
            backends=backends,
        )


def _cross_check(pools: list[_Partial], tree: _Tree) -> list[Problem]:
    """Problems that involve more than one field: duplicates and address families.

    Runs on whatever each pool has that is readable, so they show up next to field errors.
    """
    out = []

    def problem(loc: tuple, message: str):
        out.append(Problem(tree.file, tree.line(loc), _field(loc), message))

    names: dict[str, tuple] = {}  # first place each was given (a loc: lines are looked up on a problem only)
    services: dict[tuple, tuple] = {}
    for i, pool in enumerate(pools):
        if pool.name is not None:
            first = names.setdefault(pool.name, ("pools", i, "name"))
            if first[1] != i:
                problem(("pools", i, "name"), f"duplicate pool name {pool.name!r} (first on line {tree.line(first)})")
        service = (pool.vip, pool.port, pool.protocol)
        if None not in service:
            first = services.setdefault(service, ("pools", i, "vip"))
            if first[1] != i:
                problem(
                    ("pools", i, "vip"),
                    f"{_endpoint(pool.vip, pool.port)}/{pool.protocol} is already served "
                    f"by the pool on line {tree.line(first)}",
                )
        seen: dict[tuple, tuple] = {}
        for j, b in pool.backends:
            loc = ("pools", i, "backends", j)
            if pool.vip is not None and b.address.version != pool.vip.version:
                problem(
                    loc,
                    f"IPv{b.address.version} backend {b.address} in a pool whose vip {pool.vip} "
                    f"is IPv{pool.vip.version}",
                )
            if b.port is None:
                continue
            first = seen.setdefault(b.key, loc)
            if first is not loc:
                problem(
                    loc, f"backend {_endpoint(b.address, b.port)} is listed twice (first on line {tree.line(first)})"
                )
    return out


def _endpoint(addr: IPAddress, port: int | None) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
