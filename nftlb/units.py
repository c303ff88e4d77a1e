"""systemd units for the watcher, rendered from templates/ with real paths."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from nftlb import render, state

UNITS = ("nftlb-watch.service", "nftlb-watch-once.service", "nftlb-watch-once.timer")


def executable() -> str:
    """The installed nftlb command: next to this interpreter, else on PATH, else `python -m nftlb`."""
    beside = Path(sys.executable).parent / "nftlb"
    if beside.is_file() and os.access(beside, os.X_OK):
        return render.systemd_quote(str(beside))
    found = shutil.which("nftlb")
    return render.systemd_quote(found) if found else f"{render.systemd_quote(sys.executable)} -m nftlb"


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
    env = render.environment()
    return {name: env.get_template(f"{name}.j2").render(**context) for name in UNITS}


def install(units: dict[str, str], unit_dir: Path) -> list[Path]:
    written = []
    for name, text in units.items():
        path = Path(unit_dir) / name
        state.write_atomic(path, text.encode())
        os.chmod(path, 0o644)
        written.append(path)
    return written
