"""The seam to the kernel: two methods, three implementations.

- `run(script, check=False)`: one nft script as one kernel transaction (or only
  checked by the kernel when `check`); raises KernelError with what nft said.
- `list(what)`: JSON listing of one object, e.g. "table inet nftlb" or
  "map inet nftlb services4"; None if it does not exist.
- `generation()`: the kernel's nftables ruleset generation, +1 per committed
  transaction in this network namespace (any table's). nftlb records it after each of
  its commits: when it has not moved, nothing can have changed the live table.

`Libnftables` (python3-nftables, in-process) and `NftBinary` (`nft` via subprocess,
argv list, script on stdin, never a shell) both talk to the real kernel. `Fake` keeps
tables in memory for unit tests (nftlb.fake).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Protocol

from nftlb.errors import KernelError, UsageError

NAMES = ("libnftables", "nft")
_ABSENT = "No such file or directory"


class Backend(Protocol):
    name: str

    def run(self, script: str, *, check: bool = False) -> None: ...

    def list(self, what: str) -> str | None: ...

    def generation(self) -> int: ...

    def has_table(self, name: str) -> bool: ...

    @property
    def conntrack(self): ...  # nftlb.conntrack.Tool (or the fake's): the same namespace's connections


def _kernel_error(what: str, stderr: str) -> KernelError:
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


def _nftables_request(msg_type: int, flags: int, family: int, attrs: bytes, what: str) -> tuple[int, bytes]:
    """One nftables request over a netfilter netlink socket: (the answer's message type, the
    answer). An NLMSG_ERROR answer is returned as is (its errno is the caller's to judge)."""
    body = struct.pack("=BBH", family, 0, 0) + attrs  # nfgenmsg, then attributes
    # nlmsghdr(len, type = NFNL_SUBSYS_NFTABLES << 8 | msg_type, flags (NLM_F_REQUEST | ...), seq, pid)
    message = struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg_type, 1 | flags, 1, 0) + body
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    except OSError as e:
        raise KernelError(f"cannot open a netfilter netlink socket: {e.strerror}") from None
    with sock:
        try:
            sock.settimeout(5)
            sock.bind((0, 0))
            sock.send(message)
            data = sock.recv(65536)
        except OSError as e:
            raise KernelError(f"{what} failed: {e.strerror or e}") from None
    return struct.unpack_from("=H", data, 4)[0], data


def _errno(data: bytes) -> int:
    return -struct.unpack_from("=i", data, 16)[0]  # NLMSG_ERROR: 0 is an ack, else -errno


def kernel_generation() -> int:
    """NFT_MSG_GETGEN: the ruleset generation of this netns."""
    what = "asking the kernel for the nftables generation"
    kind, data = _nftables_request(16, 0, 0, b"", what)
    if kind == 2:  # NLMSG_ERROR
        raise _kernel_error(f"{what} failed", os.strerror(_errno(data)))
    length = struct.unpack_from("=I", data, 0)[0]
    offset = 20  # nlmsghdr + nfgenmsg, then attributes
    while offset + 4 <= min(length, len(data)):
        size, attr = struct.unpack_from("=HH", data, offset)
        if attr & 0x7FFF == 1 and size >= 8:  # NFTA_GEN_ID, u32 big endian
            return struct.unpack_from(">I", data, offset + 4)[0]
        offset += max(4, (size + 3) & ~3)
    raise KernelError("the kernel's answer carried no nftables generation")


def kernel_has_table(name: str) -> bool:
    """NFT_MSG_GETTABLE for `inet NAME`: one netlink request, where `list tables` through nft
    fetches far more (7 s next to a 10,000-pool table)."""
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), 1) + raw + b"\0" * (-len(raw) % 4)  # NFTA_TABLE_NAME
    what = f"asking the kernel for table inet {name}"
    kind, data = _nftables_request(1, 4, 1, attr, what)  # NLM_F_ACK; NFPROTO_INET
    if kind == 2:
        err = _errno(data)
        if err == errno.ENOENT:
            return False
        if err:
            raise _kernel_error(f"{what} failed", os.strerror(err))
    return kind == (10 << 8) | 0  # NFT_MSG_NEWTABLE: it exists


class _Conntrack:
    """The conntrack tool, found on first use (most commands never need it)."""

    _tool = None

    @property
    def conntrack(self):
        if self._tool is None:
            from nftlb.conntrack import Tool

            self._tool = Tool()
        return self._tool


class Libnftables(_Conntrack):
    name = "libnftables"
    generation = staticmethod(kernel_generation)
    has_table = staticmethod(kernel_has_table)

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
            raise _kernel_error("nft rejected the ruleset" if not check else "the kernel check failed", err)

    def list(self, what: str) -> str | None:
        rc, out, err = self._cmd(f"list {what}", json=True)
        if rc != 0:
            if _ABSENT in err:
                return None
            raise _kernel_error(f"listing {what} failed", err)
        return out


class NftBinary(_Conntrack):
    name = "nft"
    generation = staticmethod(kernel_generation)
    has_table = staticmethod(kernel_has_table)

    def __init__(self, path: str | None = None):
        self.path = (
            path
            or shutil.which("nft")
            or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
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

    def list(self, what: str) -> str | None:
        proc = self._exec(["-j", "list", *what.split()])
        if proc.returncode != 0:
            if _ABSENT in proc.stderr:
                return None
            raise _kernel_error(f"listing {what} failed", proc.stderr)
        return proc.stdout


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
