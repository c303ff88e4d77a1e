"""Plan -> nft text, through the jinja2 templates in templates/ (StrictUndefined)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import jinja2

from nftlb.plan import Plan

_IDENT = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def template_dir() -> Path:
    """templates/ ships inside the wheel as nftlb/templates; a source checkout keeps it at the top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nftlb templates not found next to {here}")


def ident(value: object) -> str:
    """Second line of defence: only plain identifiers reach nft, whatever the validator let through."""
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise ValueError(f"refusing to render {value!r} as an nftables identifier")
    return value


def systemd_quote(word: str) -> str:
    """One word on a systemd command line (systemd.syntax): double quotes when needed."""
    if word and not re.search(r'[\s"\'\\$%;]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%") + '"'


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=None)
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
    env.filters["q"] = systemd_quote
    env.globals["raise"] = _raise
    return env


def ruleset(plan: Plan) -> str:
    """The complete nft script: replaces table inet <plan.table> in one transaction."""
    from nftlb.elements import of_plan  # elements spell names with ident() from here

    return environment().get_template("ruleset.nft.j2").render(plan=plan, elements=of_plan(plan))


def macros():
    """The template macros, callable from Python (element spellings for update transactions)."""
    return environment().get_template("macros.nft.j2").module


def chain_rules(p, seed: int) -> str:
    """The rules of the chain that picks backends for pool `p`."""
    return str(macros().pick_rules(p, seed))


def update(table: str, seed: int, changes) -> str:
    """A small transaction applying `changes` (nftlb.update.Changes) to the live table."""
    return environment().get_template("update.nft.j2").render(table=table, seed=seed, changes=changes)
