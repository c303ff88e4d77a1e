"""The pools file: YAML with line numbers in, a validated `Config` out.

Every problem is reported as ``FILE:LINE: field: message``; all of them at once,
never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_NODES = 2_000_000  # YAML nodes after alias expansion ("billion laughs" guard)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

_POOL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")
_SHORT_V6 = re.compile(r"\[(?P<addr>[^\]]+)\](?::(?P<port>[^:]*))?")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}


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
            addr = ipaddress.ip_address(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    if getattr(addr, "ipv4_mapped", None):
        raise ValueError(f"{value} is an IPv4-mapped IPv6 address; write it as {addr.ipv4_mapped}")
    for bad, why in (
        (addr.is_unspecified, "unspecified"),
        (addr.is_multicast, "multicast"),
        (addr.is_loopback, "loopback (forwarded traffic cannot be DNATed to it)"),
        (addr.is_link_local, "link-local"),
        (addr == _BROADCAST, "broadcast"),
    ):
        if bad:
            raise ValueError(f"{value} is {why}; a {what} needs a unicast address")
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
    text = text.strip()
    m = _SHORT_V6.fullmatch(text)
    if m:
        addr, port = m["addr"], m["port"]
    elif text.count(":") == 1:
        addr, port = text.split(":")
    else:  # a bare IPv4 or IPv6 address
        addr, port = text, None
    out: dict[str, Any] = {"address": addr}
    if port is not None:
        if not port.isdigit():
            raise ValueError(f"port in {text!r} is not a number")
        out["port"] = int(port)
    return out


_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration(v: Any, longest: float = 3600) -> Any:
    """`500ms`, `2s`, `1m`, `1h`, or plain seconds -> float seconds in (0, longest]."""
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if isinstance(v, (int, float)):
        seconds = float(v)
    elif isinstance(v, str) and (m := _DURATION.fullmatch(v.strip())):
        seconds = float(m["n"]) * _UNITS[m["unit"]]
    else:
        raise ValueError(f"{v!r} is not a duration: write 500ms, 2s, 1m or a number of seconds")
    if not 0 < seconds <= longest:
        raise ValueError(f"{v!r} is out of range: more than 0 and at most {longest:g}s")
    return seconds


Duration = Annotated[float, BeforeValidator(duration)]


def _persistence(v: Any) -> Any:
    if v in (False, "off", 0, None):
        return None
    seconds = duration(v, longest=7 * 86400)
    if seconds != int(seconds):
        raise ValueError(f"{v!r}: persistence is kept in whole seconds")
    return int(seconds)


Persistence = Annotated[int | None, BeforeValidator(_persistence)]


class HealthDefaults(_Model):
    """Top-level `health:`: how every backend is probed unless its pool says otherwise."""

    interval: Duration = 2.0  # between probes of one backend
    timeout: Duration = 1.0  # TCP connect timeout
    rise: StrictInt = Field(2, ge=1, le=100)  # consecutive successes before a down backend is up
    fall: StrictInt = Field(3, ge=1, le=100)  # consecutive failures before an up backend is down

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> "HealthDefaults":
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


@dataclass(frozen=True)
class Health:
    """The effective probe settings of one pool."""

    interval: float
    timeout: float
    rise: int
    fall: int
    port: int | None


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
            raise ValueError(
                f"{v!r} is not a pool name: use 1-31 characters a-z 0-9 _ -, starting with a letter"
            )
        return v

    @model_validator(mode="after")
    def _default_ports(self) -> "Pool":
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
        return Health(
            interval=o.interval or d.interval, timeout=o.timeout or d.timeout,
            rise=o.rise or d.rise, fall=o.fall or d.fall, port=o.port,
        )

    @field_validator("table", mode="before")
    @classmethod
    def _check_table(cls, v: Any) -> str:
        _not_bool(v)
        if not isinstance(v, str) or not TABLE_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a table name: use 1-31 characters a-z 0-9 _, starting with a letter")
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _hex_seed(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return int(v, 0)
            except ValueError:
                raise ValueError(f"{v!r} is not a number (write it as 24301 or 0x5eed)") from None
        return v


# --- YAML with line numbers -------------------------------------------------


_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: 20x faster


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
            node = loader.get_single_node()
            self.lines[()] = 1 if node is None else node.start_mark.line + 1
            self.data = None if node is None else self._build(loader, node, ())
        finally:
            loader.dispose()

    def _scalar(self, loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if node.tag == _STR:  # most of a pools file: no constructor needed
            return node.value
        construct = loader.yaml_constructors.get(node.tag)
        return construct(loader, node) if construct else loader.construct_object(node, deep=True)

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig()
        kind = node.__class__
        if kind is yaml.ScalarNode:
            return self._scalar(loader, node)
        if kind is yaml.SequenceNode:
            out_list = []
            for i, item in enumerate(node.value):
                sub = path + (i,)
                self.lines[sub] = item.start_mark.line + 1
                out_list.append(self._scalar(loader, item) if item.__class__ is yaml.ScalarNode
                                else self._build(loader, item, sub))
            self._nodes += len(node.value)
            return out_list
        merged = 0
        if any(k.tag == _MERGE for k, _ in node.value):  # YAML merge keys (<<): merged pairs first
            explicit = sum(k.tag != _MERGE for k, _ in node.value)
            loader.flatten_mapping(node)
            merged = len(node.value) - explicit  # explicit keys override merged ones
        out: dict = {}
        for n, (knode, vnode) in enumerate(node.value):
            key = self._scalar(loader, knode) if knode.__class__ is yaml.ScalarNode else None
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
            out[key] = self._scalar(loader, vnode) if vnode.__class__ is yaml.ScalarNode \
                else self._build(loader, vnode, sub)
        self._nodes += len(node.value)
        return out

    def line(self, loc: tuple) -> int:
        """Line of the deepest part of `loc` that the file spells out."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1


class _TooBig(Exception):
    pass


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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
        if err["type"] not in ("value_error",) and isinstance(value, (str, int, float, bool)) and len(repr(value)) < 60:
            msg += f" (got {value!r})"
    return msg


def _loc(err: dict) -> tuple:
    # pydantic adds the union member ("function-after[...]", "IPv4Address") to the loc; drop it
    return tuple(p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\]A-Z]", p))


def read(path: str | Path) -> str:
    """The pools file's text; ConfigError if it cannot be read, is too large or is not UTF-8."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError([Problem(file, 0, "file", e.strerror or str(e))]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Problem(file, 0, "file", f"larger than the {MAX_FILE_BYTES // 2**20} MiB limit")])
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

    try:
        tree = _Tree(text, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        fail(mark.line + 1 if mark else 0, "yaml", " ".join(filter(None, [e.context, e.problem])))
    except yaml.YAMLError as e:
        fail(0, "yaml", str(e))
    except _TooBig:
        fail(0, "file", f"more than {MAX_NODES} YAML nodes")
    except RecursionError:
        fail(0, "yaml", "nested too deeply")
    if not isinstance(tree.data, dict):
        what = "empty" if tree.data is None else f"a {type(tree.data).__name__}"
        raise ConfigError(tree.problems + [
            Problem(file, 1, "(top)", f"file is {what}; expected a mapping with a 'pools' list")])
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
                problems.append(Problem(file, tree.line(loc), _field(loc),
                                        f"timeout ({h.timeout:g}s) must not exceed interval ({h.interval:g}s)"))
            if pool.persistence and pool.vip.version == 6:
                loc = ("pools", i, "persistence")
                problems.append(Problem(file, tree.line(loc), _field(loc),
                                        "persistence is for IPv4 pools: nft 1.0.6 cannot keep an IPv6 client with its "
                                        "backend in a dynamic map (use scheduler: source-hash to keep clients together)"))
            if pool.table_size is not None and pool.table_size < len(pool.backends):
                loc = ("pools", i, "table_size")
                problems.append(Problem(file, tree.line(loc), _field(loc),
                                        f"{pool.table_size} slots cannot hold {len(pool.backends)} backends"))
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
    def from_pool(cls, pool: "Pool") -> "_Partial":
        return cls(pool.name, pool.vip, pool.port, pool.protocol, pool.mode, list(enumerate(pool.backends)))

    @classmethod
    def of(cls, raw: Any) -> "_Partial":
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
                problem(("pools", i, "vip"), f"{_endpoint(pool.vip, pool.port)}/{pool.protocol} is already served "
                        f"by the pool on line {tree.line(first)}")
        seen: dict[tuple, tuple] = {}
        for j, b in pool.backends:
            loc = ("pools", i, "backends", j)
            if pool.vip is not None and b.address.version != pool.vip.version:
                problem(loc, f"IPv{b.address.version} backend {b.address} in a pool whose vip {pool.vip} "
                        f"is IPv{pool.vip.version}")
            if b.port is None:
                continue
            first = seen.setdefault(b.key, loc)
            if first is not loc:
                problem(loc, f"backend {_endpoint(b.address, b.port)} is listed twice (first on line {tree.line(first)})")
    return out


def _endpoint(addr: IPAddress, port: int | None) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
