"""The pools file: read it (bounded), parse it (JSON fast path, else YAML with line numbers),
validate it (the schema, then the rules that span fields), and report every problem at once
as ``FILE:LINE: field: message``, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nftlb import yamltree
from nftlb.errors import ConfigError, Problem, show
from nftlb.schema import Backend, Config, HealthOverride, IPAddress, Pool, _address
from nftlb.yamltree import TooBig, TooDeep, Tree, field_name

MAX_FILE_BYTES = 32 * 1024 * 1024  # read at most this much (+1 byte, to tell that it is larger)

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _message(err: Mapping[str, Any]) -> str:
    msg = _MESSAGES.get(err["type"])
    if msg is None:
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        value = err.get("input")
        if err["type"] not in ("value_error",) and isinstance(value, (str, int, float, bool)):
            shown = show(value)
            if len(shown) < 60 and not shown.endswith("..."):
                msg += f" (got {shown})"
    return msg


def _loc(err: Mapping[str, Any]) -> tuple:
    # pydantic adds the union member ("function-after[...]", "IPv4Address") to the loc; drop it
    return tuple(p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\]A-Z]", p))


def model_problems(e: ValidationError, tree) -> list[Problem]:
    """pydantic's errors as Problems at the lines the tree knows."""
    out = []
    for err in e.errors(include_url=False):
        loc = _loc(err)
        out.append(Problem(tree.file, tree.line(loc), field_name(loc) or "(top)", _message(err)))
    return out


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
            if config is not None and not problems:
                return config

    tree = tree_of(text, file, "a mapping with a 'pools' list")
    config, problems = _validate(tree.data or {}, tree)
    problems = tree.problems + problems
    if problems or config is None:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return config


def tree_of(text: str, file: str, expected: str) -> Tree:
    """The YAML text as data with line numbers; ConfigError (with a line) when it is not YAML, or
    not a mapping (`expected` says what it should be)."""

    def fail(line: int, field: str, message: str):
        raise ConfigError([Problem(file, line, field, message)])

    if not text.strip(" \t\r\n\ufeff"):  # YAML would stumble on a tab; it is an empty file
        fail(1, "(top)", f"file is empty; expected {expected}")

    try:
        tree = Tree(text, file)
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
    except TooBig:
        fail(0, "file", f"more than {yamltree.MAX_NODES} YAML nodes")
    except TooDeep as e:
        fail(e.line, "yaml", f"lists and mappings nested more than {yamltree.MAX_DEPTH} deep")
    except RecursionError:  # a last resort: nothing above recurses without a bound
        fail(0, "file", "nested too deeply")
    if not isinstance(tree.data, dict):
        what = "empty" if tree.data is None else f"a {type(tree.data).__name__}"
        raise ConfigError(tree.problems + [Problem(file, 1, "(top)", f"file is {what}; expected {expected}")])
    return tree


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
    problems: list[Problem] = []
    config = None

    def problem(loc: tuple, message: str) -> None:
        problems.append(Problem(tree.file, tree.line(loc), field_name(loc), message))

    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        problems += model_problems(e, tree)
    if config is not None:  # valid field by field: check across fields on the validated pools
        problems += _cross_check([_Partial.from_pool(p) for p in config.pools], tree)
    elif isinstance(data.get("pools"), list):  # else on whatever each pool has that is readable
        problems += _cross_check([_Partial.of(p) for p in data["pools"]], tree)
    if config is None:
        return config, problems
    families = {a.version for a in config.health.path_source}
    for i, pool in enumerate(config.pools):
        h = config.probe_settings(pool)
        if h is not None and h.timeout > h.interval:
            problem(("pools", i, "health"), f"timeout ({h.timeout:g}s) must not exceed interval ({h.interval:g}s)")
        if isinstance(pool.health, HealthOverride) and pool.health.path and pool.mode != "dnat":
            problem(
                ("pools", i, "health", "path"),
                "path probes are for mode: dnat (masquerade backends answer "
                "the gateway's own address, which the plain probe already uses)",
            )
        elif h is not None and h.path and pool.vip.version not in families:
            problem(
                ("health", "path_source"),
                f"pool {pool.name} is probed by its clients' path and needs an IPv{pool.vip.version} path_source",
            )
        if pool.persistence and pool.vip.version == 6:
            problem(
                ("pools", i, "persistence"),
                "persistence is for IPv4 pools: nft 1.0.6 cannot keep an IPv6 "
                "client with its backend in a dynamic map (use scheduler: source-hash to keep clients together)",
            )
        if pool.table_size is not None and pool.table_size < len(pool.backends):
            problem(("pools", i, "table_size"), f"{pool.table_size} slots cannot hold {len(pool.backends)} backends")
    taken = {p.vip for p in config.pools} | {b.address for p in config.pools for b in p.backends}
    for a in config.health.path_source:
        if a in taken:
            problem(
                ("health", "path_source"),
                f"{a} is a VIP or a backend here; a path source must be an address no client, VIP or backend has",
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
        listed = raw.get("backends")
        for j, b in enumerate(listed if isinstance(listed, list) else []):
            try:
                backend = Backend.model_validate(b)
            except ValidationError:
                continue
            backend.port = backend.port or port or 0
            backends.append((j, backend))
        return cls(
            name=raw.get("name") if isinstance(raw.get("name"), str) else None,
            vip=vip,
            port=port,
            protocol=raw.get("protocol", "tcp") if raw.get("protocol", "tcp") in ("tcp", "udp") else None,
            mode=raw.get("mode", "dnat") if raw.get("mode", "dnat") in ("dnat", "masquerade") else None,
            backends=backends,
        )


def _cross_check(pools: list[_Partial], tree: Tree) -> list[Problem]:
    """Problems that involve more than one field: duplicates and address families.

    Runs on whatever each pool has that is readable, so they show up next to field errors.
    """
    out = []

    def problem(loc: tuple, message: str):
        out.append(Problem(tree.file, tree.line(loc), field_name(loc), message))

    names: dict[str, tuple] = {}  # first place each was given (a loc: lines are looked up on a problem only)
    services: dict[tuple, tuple] = {}
    for i, pool in enumerate(pools):
        if pool.name is not None:
            first = names.setdefault(pool.name, ("pools", i, "name"))
            if first[1] != i:
                problem(("pools", i, "name"), f"duplicate pool name {pool.name!r} (first on line {tree.line(first)})")
        service = (pool.vip, pool.port, pool.protocol)
        if pool.vip is not None and pool.port is not None and pool.protocol is not None:
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
            if not b.port:
                continue
            first = seen.setdefault(b.key, loc)
            if first is not loc:
                problem(
                    loc, f"backend {_endpoint(b.address, b.port)} is listed twice (first on line {tree.line(first)})"
                )
    return out


def _endpoint(addr: IPAddress, port: int | None) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
