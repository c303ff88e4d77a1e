"""The seam to the kernel: two methods, three implementations.

- `run(script, check=False)`: one nft script as one kernel transaction (or only
  checked by the kernel when `check`); raises KernelError with what nft said.
- `list_table(table, json=True)`: our table's listing (JSON or nft text), None if absent.

`Libnftables` (python3-nftables, in-process) and `NftBinary` (`nft` via subprocess,
argv list, script on stdin, never a shell) both talk to the real kernel. `Fake` keeps
tables in memory for unit tests of pure code paths.
"""

from __future__ import annotations

import json as jsonlib
import os
import re
import shutil
import subprocess
from typing import Protocol

from nftlb.errors import KernelError, UsageError

NAMES = ("libnftables", "nft")
_ABSENT = "No such file or directory"


class Backend(Protocol):
    name: str

    def run(self, script: str, *, check: bool = False) -> None: ...

    def list_table(self, table: str, *, json: bool = True) -> str | None: ...


def _kernel_error(what: str, stderr: str) -> KernelError:
    detail = stderr.strip() or "no message"
    if "Operation not permitted" in detail:
        detail += "\n(nftlb needs CAP_NET_ADMIN: run it as root)"
    return KernelError(f"{what}:\n{detail}")


class Libnftables:
    name = "libnftables"

    def __init__(self):
        try:
            import nftables
        except ImportError as e:
            raise KernelError(
                f"the python nftables bindings are not importable ({e}); "
                "install the Debian package python3-nftables, or use --backend nft"
            ) from None
        try:
            self._nft = nftables.Nftables()
        except OSError as e:
            raise KernelError(f"libnftables could not be loaded: {e}") from None

    def _cmd(self, text: str, *, json: bool = False, check: bool = False) -> tuple[int, str, str]:
        self._nft.set_json_output(json)
        self._nft.set_dry_run(check)
        try:
            return self._nft.cmd(text)
        finally:
            self._nft.set_dry_run(False)

    def run(self, script: str, *, check: bool = False) -> None:
        rc, _, err = self._cmd(script, check=check)
        if rc != 0:
            raise _kernel_error("nft rejected the ruleset" if not check else "the kernel check failed", err)

    def list_table(self, table: str, *, json: bool = True) -> str | None:
        rc, out, err = self._cmd(f"list table inet {table}", json=json)
        if rc != 0:
            if _ABSENT in err:
                return None
            raise _kernel_error(f"listing table inet {table} failed", err)
        return out


class NftBinary:
    name = "nft"

    def __init__(self, path: str | None = None):
        self.path = path or shutil.which("nft") or next(
            (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
        )
        if not self.path:
            raise KernelError("the nft binary was not found on PATH; install the Debian package nftables")

    def _exec(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [self.path, *argv],
                input=stdin,
                capture_output=True,
                text=True,
                env={**os.environ, "LC_ALL": "C"},
                timeout=600,
            )
        except OSError as e:
            raise KernelError(f"could not run {self.path}: {e}") from None
        except subprocess.TimeoutExpired:
            raise KernelError(f"{self.path} did not finish within 600 s") from None

    def run(self, script: str, *, check: bool = False) -> None:
        proc = self._exec(["-c", "-f", "-"] if check else ["-f", "-"], stdin=script)
        if proc.returncode != 0:
            raise _kernel_error("nft rejected the ruleset" if not check else "the kernel check failed", proc.stderr)

    def list_table(self, table: str, *, json: bool = True) -> str | None:
        proc = self._exec(["-j", "list", "table", "inet", table] if json else ["list", "table", "inet", table])
        if proc.returncode != 0:
            if _ABSENT in proc.stderr:
                return None
            raise _kernel_error(f"listing table inet {table} failed", proc.stderr)
        return proc.stdout


class Fake:
    """In-memory stand-in: understands only the add/delete/define table idiom nftlb emits."""

    name = "fake"

    def __init__(self):
        self.tables: dict[str, str] = {}
        self.scripts: list[tuple[str, bool]] = []
        self.reject: str | None = None  # set to make the next run() fail like the kernel would

    def run(self, script: str, *, check: bool = False) -> None:
        self.scripts.append((script, check))
        if self.reject:
            message, self.reject = self.reject, None
            raise KernelError(f"nft rejected the ruleset:\n{message}")
        if check:
            return
        tables = dict(self.tables)
        body: list[str] | None = None
        for line in script.splitlines():
            if body is not None:
                if line == "}":
                    tables[name] = "\n".join(body)
                    body = None
                else:
                    body.append(line)
            elif m := re.fullmatch(r"delete table inet (\S+)", line):
                if m[1] not in tables:
                    raise KernelError(f"nft rejected the ruleset:\n{_ABSENT}")
                del tables[m[1]]
            elif m := re.fullmatch(r"table inet (\S+) \{(\})?", line):
                name = m[1]
                tables.setdefault(name, "")
                body = None if m[2] else []
        self.tables = tables

    def list_table(self, table: str, *, json: bool = True) -> str | None:
        if table not in self.tables:
            return None
        if json:
            return jsonlib.dumps({"nftables": [{"table": {"family": "inet", "name": table, "handle": 1}},
                                               {"fake": {"body": self.tables[table], "handle": 2}}]})
        return f"table inet {table} {{\n{self.tables[table]}\n}}\n"


def make(name: str | None = None) -> Backend:
    """`libnftables`, `nft`, or None: the bindings when importable, else the nft binary."""
    if name == "libnftables":
        return Libnftables()
    if name == "nft":
        return NftBinary()
    if name is not None:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    try:
        return Libnftables()
    except KernelError as no_bindings:
        try:
            return NftBinary()
        except KernelError as no_binary:
            raise KernelError(f"no way into the kernel: {no_bindings}; and {no_binary}") from None
