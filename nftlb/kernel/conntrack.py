"""Conntrack, the kernel's table of connections, through the conntrack tool (conntrack-tools,
run by nftlb.kernel.programs): what nftlb reads there (open connections, for `status`) and
deletes (a pool's stale flows, see nftlb.update.flows; its path probes' entries).

`Tool` acts on the network namespace it runs in; nftlb.kernel.fake.FakeConntrack stands in
for unit tests, so that no test touches a real conntrack table by accident.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from nftlb.errors import KernelError
from nftlb.kernel import programs

if TYPE_CHECKING:  # only the type: the pure nftlb.update stays apart from subprocesses
    from nftlb.update import Flows

CLOSED = {"TIME_WAIT", "CLOSE"}  # TCP states that are no longer an open connection
# a conntrack -L line: proto, its number, timeout, [state], original tuple [UNREPLIED], reply tuple
_TUPLE = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")
MOST = 10_000  # unreplied UDP entries deleted one by one in a go: more wait for the next change

Key = tuple[str, str, int, str, int]  # vip, protocol, port, backend address, backend port


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))


class Tool:
    name = "conntrack"

    def __init__(self, path: str | None = None):
        self.path = programs.find("conntrack") if path is None else (path or None)  # "": none, on purpose

    def _run(self, argv: list[str], what: str) -> programs.Result:
        if not self.path:
            raise KernelError(f"{what}: the conntrack tool is not installed (Debian package conntrack)")
        try:
            return programs.run(self.path, argv, timeout=60)
        except KernelError as e:
            raise KernelError(f"{what}: {e}") from None

    def delete(self, flows: Flows) -> int:
        """Delete the entries `flows` describes; returns how many went."""
        what = f"deleting {flows}"
        base = [
            "-f",
            "ipv4" if flows.family == "ip" else "ipv6",
            "-p",
            flows.protocol,
            "--orig-dst",
            flows.vip,
            "--orig-port-dst",
            str(flows.port),
        ]
        if flows.backend is not None:
            base += ["--reply-src", flows.backend[0], "--reply-port-src", str(flows.backend[1])]
        if not flows.unreplied:
            return self._deleted(self._run(["-D", *base], what), what)
        if flows.protocol == "tcp":  # a TCP entry is unreplied exactly while it is in SYN_SENT
            return self._deleted(self._run(["-D", *base, "--state", "SYN_SENT"], what), what)
        # UDP: conntrack cannot select "never replied" by itself; list, then delete each one
        listed = self._run(["-L", *base], what)
        if listed.returncode not in (0, 1):
            raise KernelError(f"{what}: {listed.stderr.strip() or 'conntrack failed'}")
        gone = 0
        for line in listed.stdout.splitlines()[:MOST]:
            if "[UNREPLIED]" not in line:
                continue
            tuples = _TUPLE.findall(line)
            if not tuples:
                continue
            src, _, sport, _ = tuples[0]
            gone += self._deleted(self._run(["-D", *base, "-s", src, "--sport", sport], what), what)
        return gone

    def forget_replies_to(self, address: str) -> int:
        """Delete the entries whose reply goes to `address` (a path source: probes only)."""
        what = f"deleting conntrack entries of path probes from {address}"
        family = "ipv6" if ":" in address else "ipv4"
        return self._deleted(self._run(["-D", "-f", family, "--reply-dst", address], what), what)

    @staticmethod
    def _deleted(proc: programs.Result, what: str) -> int:
        if proc.returncode == 1 and "0 flow entries" in proc.stderr:
            return 0  # nothing matched
        if proc.returncode != 0:
            raise KernelError(f"{what}: {proc.stderr.strip() or 'conntrack failed'}")
        m = re.search(r"(\d+) flow entries have been deleted", proc.stderr)
        return int(m.group(1)) if m else 0

    def open_connections(self) -> dict[Key, int] | None:
        """Connections open now per (vip, protocol, port, backend, port); None without the tool."""
        if not self.path:
            return None
        out: dict[Key, int] = {}
        for family in ("ipv4", "ipv6"):
            try:
                proc = self._run(["-L", "-f", family], "listing connections")
            except KernelError:
                return None
            if proc.returncode != 0:
                return None
            for line in proc.stdout.splitlines():
                fields = line.split()
                if len(fields) < 4 or fields[0] not in ("tcp", "udp"):
                    continue
                if fields[0] == "tcp" and fields[3] in CLOSED:
                    continue
                tuples = _TUPLE.findall(line)
                if len(tuples) < 2:
                    continue
                (_, vip, _, vport), (backend, _, bport, _) = tuples[0], tuples[1]
                key = (_addr(vip), fields[0], int(vport), _addr(backend), int(bport))
                out[key] = out.get(key, 0) + 1
        return out
