"""Plan -> nft text, through the jinja2 templates in templates/ (StrictUndefined).

The second line of defence: whatever the validator let through, and however a Plan was
built, only allow-listed text reaches the output. Every field of the plan is checked
(names are identifiers, numbers ints in range, words of nft syntax from their fixed sets,
addresses ipaddress objects without a zone index), the templates pass what they print
through the same filters, and every element (nftlb/elements.py spells them) is checked
before it is joined into a set; anything else raises RenderError (exit 2) before a script
exists. The systemd units get the same care: a value that a unit file cannot carry (a
newline, a control character) is refused, the rest is quoted for the setting it is in.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cache
from pathlib import Path

import jinja2

from nftlb.errors import UsageError
from nftlb.plan import KINDS, PATH_PROBE_MARK, Endpoint, Plan, PoolPlan
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
_MAX_PERSISTENCE = 7 * 86400  # schema: persistence is at most 7 days


class RenderError(UsageError, ValueError):
    """Refused at render time: nothing was rendered, nothing reached the kernel (exit 2)."""


def _show(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() <= 64 else f"a {value.bit_length()}-bit int"
    return text if len(text) <= 80 else text[:77] + "..."


def template_dir() -> Path:
    """templates/ ships inside the wheel as nftlb/templates; a source checkout keeps it at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nftlb templates not found next to {here}")


# -- nft: allow-lists ---------------------------------------------------------


def ident(value: object) -> str:
    """Second line of defence: only plain identifiers reach nft, whatever the validator let through."""
    if type(value) is not str or not _IDENT.fullmatch(value):
        raise RenderError(f"refusing to render {_show(value)} as an nftables identifier")
    return value


def table_name(value: object) -> str:
    """Our table's name: an identifier that nft does not read as a keyword."""
    if type(value) is not str or not _TABLE.fullmatch(value) or value in NFT_KEYWORDS:
        raise RenderError(f"refusing to render {_show(value)} as an nftables table name")
    return value


def token(value: object) -> str:
    """A word of nft syntax that the plan picks from a fixed set (tcp, udp, ip, ip6, 4, 6)."""
    if type(value) is not str or not _TOKEN.fullmatch(value):
        raise RenderError(f"refusing to render {_show(value)} as an nftables keyword")
    return value


def num(value: object) -> str:
    """A number in nft syntax: an int (not a bool, not a str that looks like one) from 0 to 2**32-1."""
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise RenderError(f"refusing to render {_show(value)} as a number")
    return str(value)


_ADDRESS_TYPES = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}


def address(value: object) -> str:
    """An address the plan holds: an ipaddress object (never a str), without a zone index."""
    version = getattr(value, "version", None)
    if version not in _ADDRESS_TYPES:
        raise RenderError(f"refusing to render {_show(value)} as an address")
    _check_address(value, version, "an address")
    return str(value)


def _check_address(addr: object, version: int, what: str) -> None:
    """An ipaddress object of the family (str() of one is plain), without a zone index ("%eth0")."""
    if type(addr) is not _ADDRESS_TYPES[version] or (version == 6 and addr.scope_id is not None):
        raise RenderError(f"refusing to render {_show(addr)} as the IPv{version} address of {what}")


def _check_port(port: object, what: str) -> None:
    if type(port) is not int or not 1 <= port <= 65535:
        raise RenderError(f"refusing to render {_show(port)} as the port of {what}")


def check_pool(p: PoolPlan) -> None:
    """Every field of a pool's plan that reaches a template or an element, by allow-list."""
    if not isinstance(p, PoolPlan):
        raise RenderError(f"refusing to render {_show(p)} as a pool")
    if type(p.name) is not str or not _POOL.fullmatch(p.name):
        raise RenderError(f"refusing to render {_show(p.name)} as a pool name")
    what = f"pool {p.name}"
    if type(p.family) is not str or p.family not in _FAMILIES:
        raise RenderError(f"refusing to render {_show(p.family)} as the address family of {what}")
    version = _FAMILIES[p.family]
    for field, allowed in (("protocol", ("tcp", "udp")), ("scheduler", tuple(KINDS)), ("mode", ("dnat", "masquerade"))):
        value = getattr(p, field)
        if type(value) is not str or value not in allowed:
            raise RenderError(f"refusing to render {_show(value)} as the {field} of {what}")
    if p.persistence is not None and (type(p.persistence) is not int or not 1 <= p.persistence <= _MAX_PERSISTENCE):
        raise RenderError(f"refusing to render {_show(p.persistence)} as the persistence of {what}")
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
            raise RenderError(f"refusing to render {_show(e)} as a backend of {what}")
        _check_address(e.address, version, what)
        _check_port(e.port, what)
        if e.nft != f"{e.address} . {e.port}":
            raise RenderError(f"refusing to render {_show(e.nft)} as a backend of {what}")
    if p.kind:
        ident(p.chain)


def check_plan(plan: Plan) -> None:
    """The whole plan, before any of it is rendered."""
    if not isinstance(plan, Plan):
        raise RenderError(f"refusing to render {_show(plan)} as a plan")
    table_name(plan.table)
    num(plan.seed)
    for p in plan.pools:
        check_pool(p)
    if type(plan.path_sources) is not tuple or len({a.version for a in plan.path_sources}) != len(plan.path_sources):
        raise RenderError(f"refusing to render {_show(plan.path_sources)} as path sources")
    for addr in plan.path_sources:
        address(addr)


def check_elements(name: object, items: object, *, shape: bool = True) -> None:
    """The elements (or element keys) of set or map `name` have the shape of elements, or with
    `shape=False` (elements of a checked plan) at least their characters: one element each."""
    ident(name)
    if not isinstance(items, (list, tuple)) or not all(type(x) is str for x in items):
        raise RenderError(f"refusing to render {_show(items)} as the elements of {name}")
    if not items:
        return
    text = "\n".join(items) + "\n"
    if shape:
        ok = _ELEMENTS.fullmatch(text)
    else:
        ok = text.count("\n") == len(items) and _ELEMENT_CHARS.fullmatch(text) and '"' not in _COMMENTS.sub("", text)
    if not ok:
        bad = next((x for x in items if not _ELEMENTS.fullmatch(x + "\n")), items[0])
        raise RenderError(f"refusing to render {_show(bad)} as an element of {name}")


# -- systemd: quoting -----------------------------------------------------------


def _one_line(word: object, what: str) -> str:
    """Text for a unit file: one line of printable characters (a newline would start a new directive)."""
    if type(word) is not str or any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in word):
        raise RenderError(
            f"refusing to put {_show(word)} into a systemd unit as {what}: "
            "it holds a newline or another control character, or is not text"
        )
    return word


def systemd_quote(word: str) -> str:
    """One word on a systemd command line (systemd.syntax, ExecStart=): double quotes when needed.
    Inside them a backslash and a quote are escaped, `%` (specifiers) doubles, and so does `$`
    (environment variables). A newline or other control character cannot be carried: refused."""
    _one_line(word, "a command-line word")
    if word and not re.search(r'[\s"\'\\$%;]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%") + '"'


def systemd_path(path: str) -> str:
    """A path in a path-list setting (ReadWritePaths=): quoted like a command-line word, but `$`
    stays as it is (no environment variables there), and `%` doubles (specifiers are)."""
    _one_line(path, "a path")
    if path and not re.search(r'[\s"\'\\%;]', path):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def systemd_text(text: str) -> str:
    """Free text in a setting that expands specifiers (Description=): one line, `%` doubled."""
    return _one_line(text, "text").replace("%", "%%")


def systemd_comment(text: str) -> str:
    """Text in a unit's comment line: one line, as it is."""
    return _one_line(text, "a comment")


def systemd_timespan(value: object) -> str:
    """A time span (OnUnitActiveSec=): digits, a point and a unit, nothing else."""
    if type(value) is not str or not re.fullmatch(
        r"[0-9]{1,12}(?:\.[0-9]{1,12})?(?:e-?[0-9]{1,3})?(?:us|ms|s|min|h|d)?", value
    ):
        raise RenderError(f"refusing to put {_show(value)} into a systemd unit as a time span")
    return value


def systemd_directory(name: object) -> bool:
    """Can StateDirectory= name this directory (relative to /var/lib) as it is? Plain path
    characters only: it takes a whitespace-separated list, and since systemd 250 a `:` makes
    a symlink; otherwise the units use ReadWritePaths= with the quoted absolute path."""
    return (
        type(name) is str
        and bool(re.fullmatch(r"[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*", name))
        and not any(part in (".", "..") for part in name.split("/"))
    )


def _raise(message: str):
    raise RenderError(message)


@cache
def environment(directory: str | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory or template_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do"],
    )
    env.filters["ident"] = ident
    env.filters["table_name"] = table_name
    env.filters["token"] = token
    env.filters["num"] = num
    env.filters["address"] = address
    env.filters["q"] = systemd_quote
    env.filters["q_path"] = systemd_path
    env.filters["unit_text"] = systemd_text
    env.filters["unit_comment"] = systemd_comment
    env.filters["timespan"] = systemd_timespan
    env.tests["plain_directory"] = systemd_directory
    env.globals["raise"] = _raise
    env.globals["path_mark"] = PATH_PROBE_MARK
    return env


def ruleset(plan: Plan) -> str:
    """The complete nft script: replaces table inet <plan.table> in one transaction."""
    from nftlb.elements import of_plan  # elements spell names with ident() from here

    check_plan(plan)
    elements = of_plan(plan)
    for name, items in elements.items():
        check_elements(name, items, shape=False)
    return environment().get_template("ruleset.nft.j2").render(plan=plan, elements=elements)


def macros():
    """The template macros, callable from Python (element spellings for update transactions)."""
    return environment().get_template("macros.nft.j2").module


def chain_rules(p, seed: int) -> str:
    """The rules of the chain that picks backends for pool `p`."""
    check_pool(p)
    num(seed)
    return str(macros().pick_rules(p, seed))


def update(table: str, seed: int, changes) -> str:
    """A small transaction applying `changes` (nftlb.update.Changes) to the live table."""
    table_name(table)
    num(seed)
    for name, items in list(changes.delete_elements) + list(changes.add_elements):
        check_elements(name, items)
    for name, p in changes.add_chains:
        ident(name)
        check_pool(p)
    for f, proto, secs in changes.add_sticky:
        if (
            f not in ("4", "6")
            or proto not in ("tcp", "udp")
            or type(secs) is not int
            or not 1 <= secs <= _MAX_PERSISTENCE
        ):
            raise RenderError(f"refusing to render {_show((f, proto, secs))} as a persistence map")
    if changes.remember is not None:
        check_plan(changes.remember)
    if changes.path_probes is not None:
        check_plan(changes.path_probes)
    return environment().get_template("update.nft.j2").render(table=table, seed=seed, changes=changes)
