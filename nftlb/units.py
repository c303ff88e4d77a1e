"""systemd units for the watcher, rendered from templates/ with real paths, and the quoting
that keeps a path or a word from the command line inside its setting: a value a unit file
cannot carry (a newline, a control character) is refused, the rest is quoted for its place.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from functools import cache
from pathlib import Path

from nftlb import pools_file, render, schema, state
from nftlb.errors import RenderError, UsageError, show

UNITS = ("nftlb-watch.service", "nftlb-watch-once.service", "nftlb-watch-once.timer")


def _one_line(word: object, what: str) -> str:
    """Text for a unit file: one line of printable characters (a newline would start a new directive)."""
    if type(word) is not str or any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in word):
        raise RenderError(
            f"refusing to put {show(word)} into a systemd unit as {what}: "
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
        raise RenderError(f"refusing to put {show(value)} into a systemd unit as a time span")
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


def executable() -> str:
    """The installed nftlb command: next to this interpreter, else on PATH, else `python -m nftlb`."""
    beside = Path(sys.executable).parent / "nftlb"
    if beside.is_file() and os.access(beside, os.X_OK):
        return systemd_quote(str(beside))
    found = shutil.which("nftlb")
    return systemd_quote(found) if found else f"{systemd_quote(sys.executable)} -m nftlb"


@cache
def _environment():
    """The units' templates, with the quoting filters above."""
    env = render.jinja()
    env.filters["q"] = systemd_quote
    env.filters["q_path"] = systemd_path
    env.filters["unit_text"] = systemd_text
    env.filters["unit_comment"] = systemd_comment
    env.filters["timespan"] = systemd_timespan
    env.tests["plain_directory"] = systemd_directory
    return env


def render_units(config: Path, state_dir: Path, every: str = "10s") -> dict[str, str]:
    state_dir = Path(state_dir).resolve()
    under = state_dir.relative_to("/var/lib") if state_dir.is_relative_to("/var/lib") else None
    context = {
        "exe": executable(),
        "config": str(Path(config).resolve()),
        "state_dir": str(state_dir),
        "state_directory": str(under) if under and str(under) != "." else "",
        "every": every,
    }
    env = _environment()
    return {name: env.get_template(f"{name}.j2").render(**context) for name in UNITS}


def install(units: dict[str, str], unit_dir: Path) -> list[Path]:
    written = []
    for name, text in units.items():
        path = Path(unit_dir) / name
        state.write_atomic(path, text.encode())
        os.chmod(path, 0o644)
        written.append(path)
    return written


def for_file(config: Path, state_dir: Path, every: str = "10s") -> dict[str, str]:
    """`nftlb systemd FILE`: the units for a valid pools file, the timer every `every`."""
    pools_file.load(config)
    try:
        period = schema.duration(every)
    except ValueError as e:
        raise UsageError(f"--every: {e}") from None
    return render_units(config, state_dir, every=f"{period:g}s")
