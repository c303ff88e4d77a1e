"""What may reach nft text: the second line of defence.

Whatever the validator let through, and however a Plan was built, only allow-listed text
reaches a ruleset. Every field of a plan is checked (names are identifiers, numbers ints in
range, words of nft syntax from their fixed sets, addresses ipaddress objects without a zone
index); the templates pass what they print through the same filters; and every element
(nftlb.elements spells them) is checked before it is joined into a set. Anything else raises
RenderError (exit 2) before a script exists. Pure.
"""

from __future__ import annotations

import ipaddress
import re

from nftlb.errors import RenderError, show
from nftlb.plan import KINDS, Endpoint, Plan, PoolPlan
from nftlb.schema import NFT_KEYWORDS, POOL_NAME, TABLE_NAME

_IDENT = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_TABLE, _POOL = TABLE_NAME, POOL_NAME  # the validator's own patterns, checked again here
_TOKEN = re.compile(r"[a-z0-9_]{1,16}")  # a word of nft syntax picked from a fixed set: tcp, ip6, 4, ...

# One element of a set or map, as nftlb/elements.py spells them: addresses, protocols and
# numbers joined by " . ", an optional comment holding a pool name, an optional mapped value
# (a verdict to a chain, or address . port). No quote, brace, semicolon, hash, newline, %.
_ADDR = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){1,7}(?::[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
_PART = rf"(?:{_ADDR}|[0-9]{{1,10}}|tcp|udp)"
_CONCAT = rf"{_PART}(?: \. {_PART})*"
_COMMENT = ' comment "[a-z][a-z0-9_-]{0,63}"'
_ELEMENTS = re.compile(rf"(?:{_CONCAT}(?:{_COMMENT})?(?: : (?:goto [a-z][a-z0-9_-]{{0,63}}|{_CONCAT}))?\n)*")
# The whole table's elements come from a plan check_plan() has checked field by field, and
# there are hundreds of thousands of them (a 10,000-pool table: 310,000, and the shape above
# takes a second for those): there the characters are checked, which is what keeps an element
# inside its set: no brace, comma, semicolon, hash or newline; quotes only around a comment.
_ELEMENT_CHARS = re.compile(r'[0-9a-z.: _"\n-]*')
_COMMENTS = re.compile(_COMMENT)

_FAMILIES = {"ip": 4, "ip6": 6}


def _shown(value: object) -> str:
    return show(value, 80)


MAX_PERSISTENCE = 7 * 86400  # schema: persistence is at most 7 days


def ident(value: object) -> str:
    """Second line of defence: only plain identifiers reach nft, whatever the validator let through."""
    if type(value) is not str or not _IDENT.fullmatch(value):
        raise RenderError(f"refusing to render {_shown(value)} as an nftables identifier")
    return value


def table_name(value: object) -> str:
    """Our table's name: an identifier that nft does not read as a keyword."""
    if type(value) is not str or not _TABLE.fullmatch(value) or value in NFT_KEYWORDS:
        raise RenderError(f"refusing to render {_shown(value)} as an nftables table name")
    return value


def token(value: object) -> str:
    """A word of nft syntax that the plan picks from a fixed set (tcp, udp, ip, ip6, 4, 6)."""
    if type(value) is not str or not _TOKEN.fullmatch(value):
        raise RenderError(f"refusing to render {_shown(value)} as an nftables keyword")
    return value


def num(value: object) -> str:
    """A number in nft syntax: an int (not a bool, not a str that looks like one) from 0 to 2**32-1."""
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise RenderError(f"refusing to render {_shown(value)} as a number")
    return str(value)


_ADDRESS_TYPES = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}


def address(value: object) -> str:
    """An address the plan holds: an ipaddress object (never a str), without a zone index."""
    version = getattr(value, "version", None)
    if version not in _ADDRESS_TYPES:
        raise RenderError(f"refusing to render {_shown(value)} as an address")
    _check_address(value, version, "an address")
    return str(value)


def _check_address(addr: object, version: int, what: str) -> None:
    """An ipaddress object of the family (str() of one is plain), without a zone index ("%eth0")."""
    if type(addr) is not _ADDRESS_TYPES[version] or (isinstance(addr, ipaddress.IPv6Address) and addr.scope_id):
        raise RenderError(f"refusing to render {_shown(addr)} as the IPv{version} address of {what}")


def _check_port(port: object, what: str) -> None:
    if type(port) is not int or not 1 <= port <= 65535:
        raise RenderError(f"refusing to render {_shown(port)} as the port of {what}")


def check_pool(p: PoolPlan) -> None:
    """Every field of a pool's plan that reaches a template or an element, by allow-list."""
    if not isinstance(p, PoolPlan):
        raise RenderError(f"refusing to render {_shown(p)} as a pool")
    if type(p.name) is not str or not _POOL.fullmatch(p.name):
        raise RenderError(f"refusing to render {_shown(p.name)} as a pool name")
    what = f"pool {p.name}"
    if type(p.family) is not str or p.family not in _FAMILIES:
        raise RenderError(f"refusing to render {_shown(p.family)} as the address family of {what}")
    version = _FAMILIES[p.family]
    for field, allowed in (("protocol", ("tcp", "udp")), ("scheduler", tuple(KINDS)), ("mode", ("dnat", "masquerade"))):
        value = getattr(p, field)
        if type(value) is not str or value not in allowed:
            raise RenderError(f"refusing to render {_shown(value)} as the {field} of {what}")
    if p.persistence is not None and (type(p.persistence) is not int or not 1 <= p.persistence <= MAX_PERSISTENCE):
        raise RenderError(f"refusing to render {_shown(p.persistence)} as the persistence of {what}")
    _check_address(p.vip, version, what)
    _check_port(p.port, what)
    if type(p.slots) is not tuple or type(p.backends) is not tuple:
        raise RenderError(f"refusing to render the backends of {what}: not a tuple")
    seen = set()
    for e in p.backends + p.slots:  # a slot is one of the backends' Endpoint objects: checked once
        if id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is not Endpoint:
            raise RenderError(f"refusing to render {_shown(e)} as a backend of {what}")
        _check_address(e.address, version, what)
        _check_port(e.port, what)
        if e.nft != f"{e.address} . {e.port}":
            raise RenderError(f"refusing to render {_shown(e.nft)} as a backend of {what}")
    if p.kind:
        ident(p.chain)


def check_plan(plan: Plan) -> None:
    """The whole plan, before any of it is rendered."""
    if not isinstance(plan, Plan):
        raise RenderError(f"refusing to render {_shown(plan)} as a plan")
    table_name(plan.table)
    num(plan.seed)
    for p in plan.pools:
        check_pool(p)
    if type(plan.path_sources) is not tuple or len({a.version for a in plan.path_sources}) != len(plan.path_sources):
        raise RenderError(f"refusing to render {_shown(plan.path_sources)} as path sources")
    for addr in plan.path_sources:
        address(addr)


def check_elements(name: object, items: object, *, shape: bool = True) -> None:
    """The elements (or element keys) of set or map `name` have the shape of elements, or with
    `shape=False` (elements of a checked plan) at least their characters: one element each."""
    ident(name)
    if not isinstance(items, (list, tuple)) or not all(type(x) is str for x in items):
        raise RenderError(f"refusing to render {_shown(items)} as the elements of {name}")
    if not items:
        return
    text = "\n".join(items) + "\n"
    if shape:
        ok = _ELEMENTS.fullmatch(text) is not None
    else:
        ok = (
            text.count("\n") == len(items)
            and _ELEMENT_CHARS.fullmatch(text) is not None
            and '"' not in _COMMENTS.sub("", text)
        )
    if not ok:
        bad = next((x for x in items if not _ELEMENTS.fullmatch(x + "\n")), items[0])
        raise RenderError(f"refusing to render {_shown(bad)} as an element of {name}")
