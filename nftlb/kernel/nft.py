"""The two real ways into nf_tables: `Libnftables` (python3-nftables, in-process) and
`NftBinary` (the nft program through nftlb.kernel.programs: argv list, script on stdin, never a
shell). Both answer to nftlb.kernel.Kernel.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

from nftlb.errors import KernelError
from nftlb.kernel import netlink, programs

_ABSENT = "No such file or directory"


def kernel_error(what: str, stderr: str) -> KernelError:
    detail = stderr.strip() or "no message"
    if "Operation not permitted" in detail:  # the one cause an operator can fix at once: say it first
        return KernelError(f"nftlb needs CAP_NET_ADMIN (run it as root): {what}: Operation not permitted")
    return KernelError(f"{what}:\n{detail}")


_NOISE = ("have no json callback", "Operation not permitted (you must be root)")


@contextmanager
def _fd2_filtered(errors: list[str]):
    """libnftables writes some messages straight to fd 2: JSON listings of `update @map` rules
    warn "stmt ops map have no json callback" (1.0.6), and a missing capability prints "you
    must be root". Keep those out of nftlb's output (the error says it better); collect the
    rest into `errors` for the caller to report."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            errors += [
                line
                for line in sink.read().decode(errors="replace").splitlines()
                if line.strip() and not any(n in line for n in _NOISE)
            ]


class _Conntrack:
    """The conntrack tool, found on first use (most commands never need it)."""

    _tool = None

    @property
    def conntrack(self):
        if self._tool is None:
            from nftlb.kernel.conntrack import Tool

            self._tool = Tool()
        return self._tool


class Libnftables(_Conntrack):
    name = "libnftables"
    generation = staticmethod(netlink.generation)
    has_table = staticmethod(netlink.has_table)

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
        stray: list[str] = []
        try:
            with _fd2_filtered(stray):
                rc, out, err = self._nft.cmd(text)
        finally:
            self._nft.set_dry_run(False)
        if stray and rc == 0:
            print("\n".join(stray), file=sys.stderr)
        return rc, out, "\n".join([err, *stray]) if stray else err

    def run(self, script: str, *, check: bool = False) -> None:
        rc, _, err = self._cmd(script, check=check)
        if rc != 0:
            raise kernel_error("nft rejected the ruleset" if not check else "the kernel check failed", err)

    def list(self, what: str) -> str | None:
        rc, out, err = self._cmd(f"list {what}", json=True)
        if rc != 0:
            if _ABSENT in err:
                return None
            raise kernel_error(f"listing {what} failed", err)
        return out


class NftBinary(_Conntrack):
    name = "nft"
    generation = staticmethod(netlink.generation)
    has_table = staticmethod(netlink.has_table)

    def __init__(self, path: str | None = None):
        found = path or programs.find("nft")
        if not found:
            raise KernelError("the nft binary was not found on PATH; install the Debian package nftables")
        self.path: str = found

    def _exec(self, argv: list[str], stdin: str | None = None) -> programs.Result:
        return programs.run(self.path, argv, stdin=stdin, timeout=600)

    def run(self, script: str, *, check: bool = False) -> None:
        proc = self._exec(["-c", "-f", "-"] if check else ["-f", "-"], stdin=script)
        if proc.returncode != 0:
            raise kernel_error("nft rejected the ruleset" if not check else "the kernel check failed", proc.stderr)

    def list(self, what: str) -> str | None:
        proc = self._exec(["-j", "list", *what.split()])
        if proc.returncode != 0:
            if _ABSENT in proc.stderr:
                return None
            raise kernel_error(f"listing {what} failed", proc.stderr)
        return proc.stdout
