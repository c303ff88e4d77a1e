"""Exceptions nftlb raises on purpose, each carrying the exit code the CLI returns; and the
problems of a pools file that a ConfigError lists."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ExitStatus(IntEnum):
    """nftlb's exit codes: stable, scripts rely on them."""

    OK = 0
    CHECK_FAILED = 1  # a command that checks said no: `diff` (the live table differs), `doctor` (traffic is blocked)
    BAD_INPUT = 2  # a bad file, option or usage: nothing was done
    SYSTEM = 3  # the kernel, nft, conntrack, the state dir or the OS said no
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class NftlbError(Exception):
    exit_code = ExitStatus.SYSTEM


class ConfigError(NftlbError):
    """The pools file is unusable; `problems` lists every problem found."""

    exit_code = ExitStatus.BAD_INPUT

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(NftlbError):
    exit_code = ExitStatus.BAD_INPUT


class KernelError(NftlbError):
    """nft or libnftables refused a command; the message carries what nft said."""


class RenderError(UsageError, ValueError):
    """Refused at render time (nftlb.allowlist): nothing was rendered, nothing reached the kernel."""


class StateError(NftlbError):
    """The state dir cannot be read, written or locked."""


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


def show(value: Any, limit: int = 60) -> str:
    """A value from the file for a message: repr'd (quotes, escapes), and short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"  # repr() of a number of over 4300 digits raises
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
