"""Network-namespace test lab for nftlb kernel tests.

Topology built by :class:`Lab` (all inside namespaces it creates; nothing is
ever created or changed in the root network namespace)::

    client ns                gw ns                              backend ns bI
    eth0 192.0.2.2/24 ----- c0 192.0.2.1/24
         fd00:c::2/64           fd00:c::1/64
                                br0 10.0.0.1/24, fd00:b::1/64
                                  +- vbI ------------------------- eth0 10.0.0.(10+I)/24
                                vip0 (dummy, up, no address)           fd00:b::(10+I)/64

* client: default routes via 192.0.2.1 / fd00:c::1.
* gw: ip_forward=1 and IPv6 forwarding=1, bridge-nf-call-* = 0 (inside gw
  only).  vip0 is a dummy device, or an ifb device on kernels without
  CONFIG_DUMMY (``Lab.vip_link_kind`` says which).
* IPv6 DAD is off in every lab namespace (accept_dad=0 plus nodad).
* backends: default routes via 10.0.0.1 / fd00:b::1 when ``routed_backends``
  (otherwise none, so only a masquerading gateway can make them answer).
* VIPs (198.51.100.x, 2001:db8::x) are assigned nowhere by default; the client
  reaches them through its default route to gw.  :meth:`Lab.add_local_vip`
  puts one on gw's vip0.

Namespaces are named ``nlb<pid>x<counter>-{client,gw,bI}``; every namespace
and every process the lab started is removed by :meth:`Lab.teardown`
(idempotent; also run by ``__exit__``, the pytest fixture finalizer and an
atexit hook).  Stdlib only; needs root and the ``ip`` (iproute2) tool.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref

from integration import netns

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_PY = os.path.join(HERE, "server.py")
CLIENT_PY = os.path.join(HERE, "client.py")
# Helper scripts are stdlib only; run them with the system interpreter.
PYTHON = os.environ.get("NFTLB_LAB_PYTHON") or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
IP, SYSCTL = netns.IP, netns.SYSCTL

# Every namespace created by this process starts with this string.
PROCESS_PREFIX = f"nlb{os.getpid()}x"

DEFAULT_TCP_PORTS = (8080,)
DEFAULT_UDP_PORTS = (5353,)
READY_TIMEOUT = 10.0  # seconds to wait for a server's "ready"
KILL_GRACE = netns.KILL_GRACE  # seconds between SIGTERM and SIGKILL
UDP_FIRST_SPORT = 20000  # udp_spread() source ports count up from here

BRIDGE_NF_OFF = (
    "net.bridge.bridge-nf-call-iptables=0",
    "net.bridge.bridge-nf-call-ip6tables=0",
    "net.bridge.bridge-nf-call-arptables=0",
)

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_live_labs: "weakref.WeakSet[Lab]" = weakref.WeakSet()
_vip_kind: str | None = None  # link kind that worked for vip0 ("dummy" or "ifb")


LabError = netns.NetnsError  # a lab operation failed
LabTimeout = netns.Timeout  # a bounded wait expired
LabCommandError = netns.CommandError  # a command returned non-zero; the message has its stdout and stderr


@dataclasses.dataclass(frozen=True)
class BackendHost:
    name: str  # "b1"
    ns: str  # namespace name
    ipv4: str  # "10.0.0.11"
    ipv6: str  # "fd00:b::11"


_run = netns.run
list_netns = netns.list_netns
delete_netns = netns.delete
_pid_alive = netns.pid_alive


def sweep(prefix: str = PROCESS_PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``.

    Returns the names that were found (and deleted)."""
    found = [ns for ns in list_netns() if ns.startswith(prefix)]
    left = delete_netns(found)
    if left:
        raise LabError(f"could not delete namespaces: {left}")
    return found


def sweep_dead_processes() -> list[str]:
    """Delete ``nlb<pid>x...`` namespaces whose creating process is gone."""
    found = []
    for ns in list_netns():
        if not ns.startswith("nlb"):
            continue
        head = ns[3:].split("x", 1)[0]
        if head.isdigit() and int(head) != os.getpid() and not _pid_alive(int(head)):
            found.append(ns)
    delete_netns(found)
    return found


class _LineReader:
    """Bounded line reads from an unbuffered binary pipe."""

    def __init__(self, fileobj):
        self._f = fileobj
        self._buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self._f.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabTimeout(f"no line within {timeout}s (partial: {self._buf[:200]!r})")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"pipe closed (partial: {self._buf[:200]!r})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")


_stop_process = netns.stop_process


class HeldConnection:
    """A long-lived HTTP keep-alive connection driven through ``client.py hold``."""

    def __init__(self, lab: "Lab", proc: subprocess.Popen, vip: str, port: int, timeout: float):
        self._lab = lab
        self._proc = proc
        self._reader = _LineReader(proc.stdout)
        self.vip = vip
        self.port = port
        self.timeout = timeout
        first = self._read(timeout + 5)
        if "error" in first:
            self.close()
            raise LabError(f"hold {vip}:{port}: could not connect: {first['error']}")
        self.local_port: int = first["local_port"]

    def _read(self, timeout: float) -> dict:
        try:
            line = self._reader.readline(timeout)
        except (LabTimeout, EOFError) as exc:
            raise LabError(f"hold {self.vip}:{self.port}: {exc}; stderr: {self._stderr()}") from None
        return json.loads(line)

    def _stderr(self) -> str:
        if self._proc.poll() is None:
            return "(running)"
        try:
            return self._proc.stderr.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def request(self) -> str:
        """Send one more request on the same connection; return the backend name."""
        if self._proc.poll() is not None:
            raise LabError(f"hold {self.vip}:{self.port}: client exited; stderr: {self._stderr()}")
        try:
            self._proc.stdin.write(b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise LabError(f"hold {self.vip}:{self.port}: client gone: {exc}") from None
        answer = self._read(2 * self.timeout + 5)
        if "error" in answer:
            raise LabError(f"hold {self.vip}:{self.port} (local port {self.local_port}): {answer['error']}")
        return answer["backend"]

    def close(self) -> None:
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()  # EOF: the client closes the connection and exits
            except OSError:
                pass
        try:
            proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        _stop_process(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Lab:
    """client -- gw -- bridge -- N backends, in fresh network namespaces."""

    def __init__(self, backends: int = 3, routed_backends: bool = True, prefix: str | None = None):
        if not 1 <= backends <= 200:
            raise ValueError("backends must be between 1 and 200")
        if prefix is None:
            with _counter_lock:
                prefix = f"{PROCESS_PREFIX}{next(_counter)}"
        self.prefix = prefix
        self.routed_backends = routed_backends
        self.client = f"{prefix}-client"
        self.gw = f"{prefix}-gw"
        self.backends: list[BackendHost] = [
            BackendHost(name=f"b{i}", ns=f"{prefix}-b{i}", ipv4=f"10.0.0.{10 + i}", ipv6=f"fd00:b::{10 + i}")
            for i in range(1, backends + 1)
        ]
        self.namespaces: list[str] = [self.client, self.gw] + [b.ns for b in self.backends]
        self._procs: list[subprocess.Popen] = []
        self._servers: dict[str, subprocess.Popen] = {}
        self._held: list[HeldConnection] = []
        self._server_ports = (DEFAULT_TCP_PORTS, DEFAULT_UDP_PORTS)
        self._udp_sport = UDP_FIRST_SPORT
        self._created: list[str] = []
        self._torn_down = False
        self.vip_link_kind: str | None = None  # "dummy", or "ifb" where CONFIG_DUMMY is missing
        self._logdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        _live_labs.add(self)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        netns.add(self.namespaces, created=self._created)  # recorded first: teardown covers a partial failure
        # No IPv6 DAD anywhere, set before any interface exists so that
        # link-local addresses are usable at once too (a router with only a
        # tentative link-local address does not send neighbour solicitations
        # for forwarded packets).
        no_dad = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        for ns in self.namespaces:
            if ns == self.gw:
                self._sysctl(
                    ns,
                    *no_dad,
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    # br_netfilter is built into some kernels and defaults to
                    # 1 in every new netns: bridged frames (and frames entering
                    # br0 from a backend) would then traverse the ip/ip6/inet
                    # hooks with iif = the bridge *port*.  Make gw a plain
                    # router on br0 instead.
                    *BRIDGE_NF_OFF,
                )
            else:
                self._sysctl(ns, *no_dad)

        gw = [
            "link set lo up",
            f"link add c0 type veth peer name eth0 netns {self.client}",
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
        ]
        for b in self.backends:
            gw += [
                f"link add v{b.name} type veth peer name eth0 netns {b.ns}",
                f"link set v{b.name} master br0",
                f"link set v{b.name} up",
            ]
        gw += [
            "link set c0 up",
            "link set br0 up",
            "link set vip0 up",
            "addr add 192.0.2.1/24 dev c0",
            "addr add fd00:c::1/64 dev c0 nodad",
            "addr add 10.0.0.1/24 dev br0",
            "addr add fd00:b::1/64 dev br0 nodad",
        ]
        self._add_vip_link()
        self._batch(self.gw, gw)

        self._batch(
            self.client,
            [
                "link set lo up",
                "link set eth0 up",
                "addr add 192.0.2.2/24 dev eth0",
                "addr add fd00:c::2/64 dev eth0 nodad",
                "route add default via 192.0.2.1 dev eth0",
                "route add ::/0 via fd00:c::1 dev eth0",
            ],
        )
        for b in self.backends:
            cmds = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {b.ipv4}/24 dev eth0",
                f"addr add {b.ipv6}/64 dev eth0 nodad",
            ]
            if self.routed_backends:
                cmds += [
                    "route add default via 10.0.0.1 dev eth0",
                    "route add ::/0 via fd00:b::1 dev eth0",
                ]
            self._batch(b.ns, cmds)
        self._wait_links_ready()

    def _add_vip_link(self) -> None:
        """Create gw's vip0: a dummy device, or an ifb device (equally inert
        for local addresses) on kernels built without CONFIG_DUMMY."""
        global _vip_kind
        kinds = [_vip_kind] if _vip_kind else ["dummy", "ifb"]
        errors = []
        for kind in kinds:
            cp = _run([IP, "-n", self.gw, "link", "add", "vip0", "type", kind], check=False, timeout=10)
            if cp.returncode == 0:
                _vip_kind = self.vip_link_kind = kind
                return
            errors.append(f"{kind}: {cp.stderr.strip()}")
        raise LabError(f"cannot create vip0 in {self.gw}: {'; '.join(errors)}")

    def _batch(self, ns: str, commands: list[str]) -> None:
        netns.batch(ns, commands)

    def _sysctl(self, ns: str, *settings: str) -> None:
        if not os.path.isdir("/proc/sys/net/bridge"):
            settings = tuple(s for s in settings if s not in BRIDGE_NF_OFF)
        self.exec(ns, SYSCTL, "-q", "-w", *settings, timeout=10)

    def _wait_links_ready(self, timeout: float = 5.0) -> None:
        netns.wait_links_ready(self.namespaces, timeout)

    def add_local_vip(self, addr: str) -> None:
        """Assign ``addr`` (/32 or /128, nodad for IPv6) to gw's vip0."""
        addr = addr.strip("[]")
        if ":" in addr:
            _run([IP, "-n", self.gw, "-6", "addr", "add", f"{addr}/128", "dev", "vip0", "nodad"], timeout=10)
        else:
            _run([IP, "-n", self.gw, "addr", "add", f"{addr}/32", "dev", "vip0"], timeout=10)

    def backend(self, name: str) -> BackendHost:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    # -------------------------------------------------------------- processes
    def exec(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``ip netns exec ns argv...`` (text mode, output captured).

        ``env`` entries are added to the current environment.  Raises
        :class:`LabCommandError` (with stdout+stderr) on non-zero exit when
        ``check``, :class:`LabTimeout` when ``timeout`` expires (the command
        is killed)."""
        full_env = None if env is None else {**os.environ, **env}
        return _run([IP, "netns", "exec", ns, *argv], check=check, timeout=timeout, input=input, env=full_env)

    def popen(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        """Start ``ip netns exec ns argv...``; the process is killed on teardown."""
        if self._torn_down:
            raise LabError("lab is torn down")
        proc = subprocess.Popen([IP, "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    # ---------------------------------------------------------------- servers
    def _spawn_server(self, b: BackendHost, tcp_ports, udp_ports) -> subprocess.Popen:
        if b.name in self._servers and self._servers[b.name].poll() is None:
            raise LabError(f"server already running on {b.name}")
        argv = [PYTHON, SERVER_PY, "--name", b.name]
        for p in tcp_ports:
            argv += ["--tcp", str(int(p))]
        for p in udp_ports:
            argv += ["--udp", str(int(p))]
        log = open(os.path.join(self._logdir, f"server-{b.name}.log"), "wb")
        try:
            proc = self.popen(b.ns, *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, bufsize=0)
        finally:
            log.close()
        proc._lab_log = log.name  # type: ignore[attr-defined]
        self._servers[b.name] = proc
        return proc

    def _wait_ready(self, b: BackendHost, proc: subprocess.Popen, deadline: float) -> None:
        try:
            line = _LineReader(proc.stdout).readline(max(0.0, deadline - time.monotonic()))
        except (LabTimeout, EOFError) as exc:
            line = f"<{exc}>"
        if line.strip() != "ready":
            _stop_process(proc)
            with open(proc._lab_log, errors="replace") as f:  # type: ignore[attr-defined]
                log = f.read()
            raise LabError(f"server on {b.name} did not become ready: {line}\n--- stderr ---\n{log}")

    def start_servers(self, tcp_ports=DEFAULT_TCP_PORTS, udp_ports=DEFAULT_UDP_PORTS) -> None:
        """Start server.py in every backend; wait (bounded) until each is ready."""
        self._server_ports = (tuple(tcp_ports), tuple(udp_ports))
        procs = [(b, self._spawn_server(b, tcp_ports, udp_ports)) for b in self.backends]
        deadline = time.monotonic() + READY_TIMEOUT
        for b, proc in procs:
            self._wait_ready(b, proc, deadline)

    def start_server(self, backend: BackendHost, tcp_ports=None, udp_ports=None) -> None:
        """(Re)start server.py in one backend (ports default to the last start_servers())."""
        tcp_ports = self._server_ports[0] if tcp_ports is None else tcp_ports
        udp_ports = self._server_ports[1] if udp_ports is None else udp_ports
        proc = self._spawn_server(backend, tcp_ports, udp_ports)
        self._wait_ready(backend, proc, time.monotonic() + READY_TIMEOUT)

    def stop_server(self, backend: BackendHost) -> None:
        """Stop server.py in one backend (waits, bounded, for it to exit)."""
        proc = self._servers.pop(backend.name, None)
        if proc is not None:
            _stop_process(proc)

    # ---------------------------------------------------------------- traffic
    def _client(self, ns: str, *args, timeout: float) -> dict:
        cp = self.exec(ns, PYTHON, CLIENT_PY, *map(str, args), timeout=timeout)
        try:
            return json.loads(cp.stdout)
        except ValueError:
            raise LabError(f"client.py {args}: bad output {cp.stdout!r}; stderr {cp.stderr!r}") from None

    def http_spread(self, vip: str, port: int, count: int, ns: str | None = None, timeout: float = 2.0) -> dict:
        """``count`` new TCP connections (one GET each, Connection: close), sequentially.

        Returns ``{"backends": {"b1": n}, "failed": k, "errors": [...],
        "peers": {"b1": [addresses seen by the backend]}}``."""
        return self._client(
            ns or self.client, "spread-http", vip, port, count, timeout, timeout=count * (2 * timeout + 0.5) + 10
        )

    def udp_spread(self, vip: str, port: int, count: int, timeout: float = 1.0, ns: str | None = None) -> dict:
        """``count`` datagrams, each from a new socket; same shape as http_spread.

        Source ports come from a per-Lab counter (20000, 20001, ...), so no
        datagram of this Lab ever reuses a 5-tuple still in gw's conntrack
        table: every datagram is a NEW flow for the load balancer.  (Random
        ephemeral ports collide surprisingly often: birthday problem.)"""
        out = self._client(
            ns or self.client,
            "spread-udp",
            vip,
            port,
            count,
            timeout,
            self._udp_sport,
            timeout=count * (timeout + 0.5) + 10,
        )
        if out.get("last_sport"):
            self._udp_sport = out["last_sport"] + 1
        if self._udp_sport > 60000:
            self._udp_sport = UDP_FIRST_SPORT
        out.pop("last_sport", None)
        return out

    def connects(self, vip: str, port: int, count: int, proto: str = "tcp", timeout: float = 1.0,
                 ns: str | None = None, first_sport: int | None = None) -> dict:
        """``count`` new connections one after another, each timed (see client.py ``connects``)."""
        extra = [] if first_sport is None else [first_sport]
        return self._client(ns or self.client, "connects", vip, port, count, timeout, proto, *extra,
                            timeout=count * (timeout + 0.5) + 10)

    def keepalive(self, vip: str, port: int, requests: int = 3, ns: str | None = None, timeout: float = 5.0) -> list[str]:
        """One TCP connection, ``requests`` HTTP/1.1 requests; backend name per request.

        Raises :class:`LabError` if any request fails."""
        out = self._client(
            ns or self.client, "keepalive", vip, port, requests, timeout, timeout=(requests + 1) * (2 * timeout) + 10
        )
        if out.get("error"):
            raise LabError(f"keepalive {vip}:{port}: {out['error']} (answers so far: {out['backends']})")
        return out["backends"]

    def hold(self, vip: str, port: int, ns: str | None = None, timeout: float = 5.0) -> HeldConnection:
        """Open a long-lived keep-alive connection (from the client ns by default)."""
        proc = self.popen(
            ns or self.client,
            PYTHON,
            CLIENT_PY,
            "hold",
            str(vip),
            str(port),
            str(timeout),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        try:
            held = HeldConnection(self, proc, vip, port, timeout)
        except BaseException:
            _stop_process(proc)
            raise
        self._held.append(held)
        return held

    def load_http(
        self,
        vip: str,
        port: int,
        seconds: float,
        max_connections: int,
        timeout: float = 1.0,
        first_sport: int | None = None,
        workers: int = 1,
        ns: str | None = None,
        nice: int = 0,
        rate: float = 0.0,
    ) -> subprocess.Popen:
        """Start ``client.py load-http`` in the background (the client ns by default).

        ``rate`` > 0 paces it to at most that many new connections a second.
        It stops on its own after ``seconds`` or ``max_connections``, or at
        SIGTERM (then the connections in flight finish, each within about
        3 x ``timeout``).  stdout (a buffered binary pipe; read it while
        the load runs, or it fills up and stalls the client): one JSON line per
        connection, then a summary line; stderr is a pipe too.  The process
        is killed on teardown like every other.  ``nice`` > 0 runs it at a
        lower CPU priority (the lab shares the machine's CPUs between the
        client, the gateway and the backends)."""
        argv = ["nice", "-n", str(int(nice))] if nice else []
        argv += [PYTHON, CLIENT_PY, "load-http", str(vip), str(port), str(seconds), str(max_connections), str(timeout)]
        argv += ["-" if first_sport is None else str(first_sport), str(workers), str(rate)]
        return self.popen(
            ns or self.client, *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    # --------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Kill every process and delete every namespace of this lab (idempotent)."""
        if self._torn_down:
            return
        self._torn_down = True
        for held in self._held:
            try:
                held.close()
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
        for proc in self._procs:
            try:
                _stop_process(proc)
            except Exception:  # noqa: BLE001
                pass
        left = delete_netns(self._created)
        shutil.rmtree(self._logdir, ignore_errors=True)
        _live_labs.discard(self)
        if left:
            raise LabError(f"could not delete namespaces {left}")

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} backends={len(self.backends)} routed={self.routed_backends}>"


@atexit.register
def _teardown_live_labs() -> None:
    for lab in list(_live_labs):
        try:
            lab.teardown()
        except Exception:  # noqa: BLE001
            pass
