"""Plan -> nft text, through the jinja2 templates in templates/ (StrictUndefined), after
nftlb.allowlist has checked every value that reaches them. Also renders the systemd units'
templates (nftlb.units quotes their values).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

from nftlb import allowlist, elements, names
from nftlb.allowlist import address, check_elements, check_plan, check_pool, ident, num, table_name, token
from nftlb.errors import RenderError, show
from nftlb.plan import PATH_PROBE_MARK, Plan


def template_dir() -> Path:
    """templates/ ships inside the wheel as nftlb/templates; a source checkout keeps it at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nftlb templates not found next to {here}")


def _raise(message: str):
    raise RenderError(message)


def jinja(directory: str | None = None) -> jinja2.Environment:
    """A jinja2 environment on templates/ that refuses whatever is undefined."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory or template_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do"],
    )


@cache
def environment() -> jinja2.Environment:
    """The nft templates' environment: the allow-list filters, the object names."""
    env = jinja()
    env.filters["ident"] = ident
    env.filters["table_name"] = table_name
    env.filters["token"] = token
    env.filters["num"] = num
    env.filters["address"] = address
    env.globals["names"] = names
    env.globals["raise"] = _raise
    env.globals["path_mark"] = PATH_PROBE_MARK
    return env


def ruleset(plan: Plan) -> str:
    """The complete nft script: replaces table inet <plan.table> in one transaction."""
    check_plan(plan)
    items_of = elements.of_plan(plan)
    for name, items in items_of.items():
        check_elements(name, items, shape=False)
    return environment().get_template("ruleset.nft.j2").render(plan=plan, elements=items_of)


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
            or not 1 <= secs <= allowlist.MAX_PERSISTENCE
        ):
            raise RenderError(f"refusing to render {show((f, proto, secs))} as a persistence map")
    if changes.remember is not None:
        check_plan(changes.remember)
    if changes.path_probes is not None:
        check_plan(changes.path_probes)
    return environment().get_template("update.nft.j2").render(table=table, seed=seed, changes=changes)
