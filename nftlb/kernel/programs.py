"""The one way nftlb runs another program (nft, conntrack, ip): an argument list, never a
shell; the program found on PATH or in /usr/sbin and /sbin; a timeout on every run; the C
locale, so that messages can be matched. Tests swap `RUNNER` for a fake that checks argv and
stdin (nftlb.kernel.fake.FakePrograms).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nftlb.errors import KernelError

SBIN = ("/usr/sbin", "/sbin")  # where Debian keeps them, also when PATH leaves them out


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Missing(KernelError):
    """The program is not installed (or the path given does not run)."""


def find(tool: str) -> str | None:
    """The program's path: `tool` itself when it holds a slash, else from PATH or /usr/sbin, /sbin."""
    if "/" in tool:
        return tool
    return shutil.which(tool) or next((p for d in SBIN if os.access(p := f"{d}/{tool}", os.X_OK)), None)


def _subprocess(path: str, argv: list[str], stdin: str | None, timeout: float) -> Result:
    try:
        proc = subprocess.run(
            [path, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError:
        raise Missing(f"{path} is not there") from None
    except OSError as e:
        raise KernelError(f"could not run {path}: {e}") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{Path(path).name} did not finish within {timeout:g} s") from None
    return Result(proc.returncode, proc.stdout, proc.stderr)


RUNNER: Callable[[str, list[str], str | None, float], Result] = _subprocess


def run(tool: str, argv: list[str], *, stdin: str | None = None, timeout: float = 60.0) -> Result:
    """Run `tool` with `argv` (and `stdin`); Missing when it is not installed, KernelError when it
    cannot run or overruns `timeout`. The exit status is the caller's to judge."""
    path = find(tool)
    if path is None:
        raise Missing(f"the {tool} program was not found (PATH, {', '.join(SBIN)})")
    return RUNNER(path, [str(a) for a in argv], stdin, timeout)
