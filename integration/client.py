#!/usr/bin/python3
"""Traffic client for the nftlb network-namespace lab (stdlib only).

Run inside the client (or gateway) namespace.  Subcommands; every result is
JSON on stdout:

``spread-http VIP PORT COUNT TIMEOUT``
    COUNT new TCP connections, each carrying one ``GET /`` with
    ``Connection: close``.  Prints one object::

        {"backends": {"b1": n, ...}, "failed": k, "errors": [...],
         "peers": {"b1": ["192.0.2.2"], ...}}

``ports-http VIP PORT FIRST_SPORT COUNT TIMEOUT``
    One connection from each source port FIRST_SPORT.. (one GET each); prints
    ``{"answers": [[sport, backend or null], ...]}``: where each 4-tuple went.

``spread-udp VIP PORT COUNT TIMEOUT [FIRST_SPORT]``
    COUNT datagrams, each from a new socket with a new source port.  Same
    output.  With FIRST_SPORT the sockets are bound to FIRST_SPORT,
    FIRST_SPORT+1, ... (ports in use are skipped); otherwise the kernel picks
    random ephemeral ports, which may repeat.  The last source port used is
    reported as "last_sport".

``connects VIP PORT COUNT TIMEOUT PROTO [FIRST_SPORT]``
    COUNT new connections one after another (PROTO tcp: a connect(); udp: one
    datagram, then wait for an answer), each timed.  With FIRST_SPORT the
    sockets are bound to FIRST_SPORT, FIRST_SPORT+1, ...  Prints
    ``{"outcomes": {"refused": n, "timeout": n, "answered": n, ...},
    "results": [[outcome, seconds, sport], ...]}``; an outcome is
    ``answered``, ``refused`` (a TCP reset or an ICMP port-unreachable),
    ``timeout``, ``unreachable`` (an ICMP net/host unreachable) or an errno name.

``keepalive VIP PORT N [TIMEOUT]``
    One TCP connection, N HTTP/1.1 requests on it.  Prints
    ``{"backends": [...], "local_port": p, "error": null|"..."}``.

``hold VIP PORT [TIMEOUT]``
    Open one keep-alive connection, print
    ``{"event": "connected", "local_port": p}`` (or ``{"error": ...}``), then
    for every line read on stdin send one request on the SAME connection and
    print one JSON line ``{"backend": ..., "peer": ..., "local_port": p}`` or
    ``{"error": "...", "local_port": p}``.  Never reconnects.  Exits at EOF.

``load-http VIP PORT SECONDS MAX_CONNECTIONS TIMEOUT [FIRST_SPORT [WORKERS [RATE]]]``
    A load generator: keeps opening new TCP connections, each carrying one
    ``GET /`` with ``Connection: close``, until SECONDS have passed or
    MAX_CONNECTIONS were attempted, or SIGTERM/SIGINT (the connections in
    flight finish first, each bounded by TIMEOUT).  WORKERS (default 1)
    threads run connections side by side; RATE > 0 paces them to at most
    RATE new connections a second (default 0: as fast as they go).  With
    FIRST_SPORT ("-": none) the sockets are
    bound to FIRST_SPORT, FIRST_SPORT+1, ... (ports in use are skipped, no
    port is used twice); otherwise the kernel picks the port at bind time.
    Either way the source port is known even when the connection fails.
    Prints one JSON line per connection, as it ends::

        {"n": i, "t0": start, "t1": end, "sport": p, "backend": "b1"}
        {"n": i, "t0": start, "t1": end, "sport": p, "error": "..."}

    (t0/t1: ``time.monotonic()``, CLOCK_MONOTONIC, which every network
    namespace shares), then one summary line ``{"summary": {"attempted",
    "ok", "failed", "backends", "errors", "seconds", "stopped_by"}}``.

Failures (timeouts, resets, refusals, garbage) are counted/reported, never
raised.  IPv6 literals are accepted with or without brackets.
"""

import errno
import http.client
import json
import signal
import socket
import sys
import threading
import time

MAX_ERRORS = 5


def _host(vip: str) -> str:
    if vip.startswith("[") and vip.endswith("]"):
        return vip[1:-1]
    return vip


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Result:
    def __init__(self):
        self.backends = {}
        self.peers = {}
        self.failed = 0
        self.errors = []

    def ok(self, answer: dict) -> None:
        name = answer["backend"]
        self.backends[name] = self.backends.get(name, 0) + 1
        peers = self.peers.setdefault(name, [])
        if answer.get("peer") not in peers:
            peers.append(answer.get("peer"))

    def fail(self, msg: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    def as_dict(self) -> dict:
        return {"backends": self.backends, "failed": self.failed, "errors": self.errors, "peers": self.peers}


def _parse_answer(raw: bytes) -> dict:
    answer = json.loads(raw.decode())
    if not isinstance(answer, dict) or "backend" not in answer:
        raise ValueError(f"unexpected answer {raw[:200]!r}")
    return answer


def _get(conn: http.client.HTTPConnection, close: bool) -> dict:
    headers = {"Connection": "close"} if close else {}
    conn.request("GET", "/", headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}")
    answer = _parse_answer(body)
    if resp.getheader("X-Backend") != answer["backend"]:
        raise RuntimeError(f"X-Backend header {resp.getheader('X-Backend')!r} != body {answer['backend']!r}")
    return answer


def spread_http(vip: str, port: int, count: int, timeout: float) -> dict:
    res = _Result()
    for _ in range(count):
        conn = http.client.HTTPConnection(_host(vip), port, timeout=timeout)
        try:
            res.ok(_get(conn, close=True))
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            res.fail(_err(exc))
        finally:
            conn.close()
    return res.as_dict()


def ports_http(vip: str, port: int, first_sport: int, count: int, timeout: float) -> dict:
    """One connection (one GET, Connection: close) from each source port first_sport..+count-1.

    Returns {"answers": [[sport, backend or null], ...]}: which backend each 4-tuple reached.
    """
    answers = []
    for sport in range(first_sport, first_sport + count):
        conn = http.client.HTTPConnection(_host(vip), port, timeout=timeout, source_address=("", sport))
        try:
            answers.append([sport, _get(conn, close=True)["backend"]])
        except Exception:  # noqa: BLE001 - a failed connection is an answer too
            answers.append([sport, None])
        finally:
            conn.close()
    return {"answers": answers}


def _bind_next(sock: socket.socket, family: int, sport: int) -> int:
    """Bind to the first free port >= sport (wrapping below 65535); return it."""
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for _ in range(1000):
        if sport > 65535:
            sport = 1024
        try:
            sock.bind((wildcard, sport))
            return sport
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            sport += 1
    raise OSError(errno.EADDRINUSE, "no free source port")


def spread_udp(vip: str, port: int, count: int, timeout: float, first_sport: int | None = None) -> dict:
    res = _Result()
    host = _host(vip)
    sport = first_sport
    last_sport = None
    for _ in range(count):
        try:
            family, socktype, proto, _cn, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
            )[0]
        except Exception as exc:  # noqa: BLE001
            res.fail(_err(exc))
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            sock.settimeout(timeout)
            if sport is not None:
                last_sport = _bind_next(sock, family, sport)
                sport = last_sport + 1
            # connect(): only answers coming back from VIP:PORT are accepted
            # (an un-NATed reply from a backend's real address is a failure),
            # and ICMP port-unreachable surfaces as ConnectionRefusedError.
            sock.connect(addr)
            sock.send(b"ping")
            res.ok(_parse_answer(sock.recv(65535)))
        except Exception as exc:  # noqa: BLE001
            res.fail(_err(exc))
        finally:
            sock.close()
    out = res.as_dict()
    out["last_sport"] = last_sport
    return out


def _outcome(exc: OSError) -> str:
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
        return "refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def connects(vip: str, port: int, count: int, timeout: float, proto: str, first_sport: int | None = None) -> dict:
    host = _host(vip)
    family, socktype, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    results, outcomes, sport = [], {}, first_sport
    for _ in range(count):
        sock = socket.socket(family, socktype)
        sock.settimeout(timeout)
        used = None
        started = time.monotonic()
        try:
            if sport is not None:
                used = _bind_next(sock, family, sport)
                sport = used + 1
            sock.connect(addr)
            if proto == "udp":
                sock.send(b"ping")
                sock.recv(65535)
            outcome = "answered"
        except OSError as exc:
            outcome = _outcome(exc)
        finally:
            sock.close()
        results.append([outcome, round(time.monotonic() - started, 6), used])
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"outcomes": outcomes, "results": results}


def _open(vip: str, port: int, timeout: float) -> tuple:
    conn = http.client.HTTPConnection(_host(vip), port, timeout=timeout)
    conn.connect()
    # Never silently reconnect: a request on a dead connection must fail.
    conn.auto_open = 0
    return conn, conn.sock.getsockname()[1]


def _request_same(conn: http.client.HTTPConnection, local_port: int) -> dict:
    if conn.sock is None:
        raise ConnectionError("connection was closed")
    answer = _get(conn, close=False)
    if conn.sock is not None and conn.sock.getsockname()[1] != local_port:
        raise ConnectionError("connection changed")
    return answer


def keepalive(vip: str, port: int, n: int, timeout: float) -> dict:
    out = {"backends": [], "local_port": None, "error": None}
    try:
        conn, out["local_port"] = _open(vip, port, timeout)
    except Exception as exc:  # noqa: BLE001
        out["error"] = _err(exc)
        return out
    try:
        for _ in range(n):
            out["backends"].append(_request_same(conn, out["local_port"])["backend"])
    except Exception as exc:  # noqa: BLE001
        out["error"] = _err(exc)
    finally:
        conn.close()
    return out


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def hold(vip: str, port: int, timeout: float) -> int:
    try:
        conn, local_port = _open(vip, port, timeout)
    except Exception as exc:  # noqa: BLE001
        _emit({"error": _err(exc)})
        return 1
    _emit({"event": "connected", "local_port": local_port})
    try:
        for _line in sys.stdin:
            try:
                answer = _request_same(conn, local_port)
                _emit({"backend": answer["backend"], "peer": answer.get("peer"), "local_port": local_port})
            except Exception as exc:  # noqa: BLE001
                _emit({"error": _err(exc), "local_port": local_port})
    finally:
        conn.close()
    return 0


class _LoadPorts:
    """Source ports for load_http: counting up from FIRST_SPORT (or None: the kernel's choice)."""

    def __init__(self, first: int | None):
        self._next = first
        self._lock = threading.Lock()

    def bind(self, sock: socket.socket, family: int) -> int:
        if self._next is None:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            return sock.getsockname()[1]
        with self._lock:
            sport = _bind_next(sock, family, self._next)
            self._next = sport + 1
            return sport


def _load_one(host: str, port: int, timeout: float, ports: _LoadPorts) -> dict:
    """One connection, one GET (Connection: close); never raises."""
    out = {"sport": None}
    sock = None
    conn = None
    try:
        family, socktype, proto, _cn, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )[0]
        sock = socket.socket(family, socktype, proto)
        sock.settimeout(timeout)
        out["sport"] = ports.bind(sock, family)
        sock.connect(addr)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock, sock = sock, None  # the connection owns (and closes) it now
        conn.auto_open = 0
        out["backend"] = _get(conn, close=True)["backend"]
    except Exception as exc:  # noqa: BLE001 - every failure is recorded
        out["error"] = _err(exc)
    finally:
        if conn is not None:
            conn.close()
        if sock is not None:
            sock.close()
    return out


def load_http(vip: str, port: int, seconds: float, max_connections: int, timeout: float,
              first_sport: int | None = None, workers: int = 1, rate: float = 0.0) -> dict:
    host = _host(vip)
    ports = _LoadPorts(first_sport)
    stop = threading.Event()
    lock = threading.Lock()
    counter = {"n": 0, "attempted": 0, "ok": 0, "failed": 0, "stopped_by": "seconds"}
    backends: dict = {}
    errors: list = []
    started = time.monotonic()
    deadline = started + seconds

    def on_signal(signum, _frame):
        counter["stopped_by"] = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def worker():
        while not stop.is_set():
            with lock:
                if counter["n"] >= max_connections:
                    counter["stopped_by"] = "max_connections"
                    stop.set()
                    return
                n = counter["n"]
                counter["n"] += 1
            if rate > 0:  # pacing: connection n starts no earlier than n / rate seconds in
                delay = min(started + n / rate, deadline) - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            if time.monotonic() >= deadline:
                stop.set()
                return
            with lock:
                counter["attempted"] += 1
            t0 = time.monotonic()
            rec = _load_one(host, port, timeout, ports)
            rec = {"n": n, "t0": t0, "t1": time.monotonic(), **rec}
            with lock:
                if "error" in rec:
                    counter["failed"] += 1
                    if len(errors) < MAX_ERRORS:
                        errors.append(rec["error"])
                else:
                    counter["ok"] += 1
                    backends[rec["backend"]] = backends.get(rec["backend"], 0) + 1
                _emit(rec)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    # Join with a timeout in a loop: the main thread stays responsive to signals.
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return {"summary": {"attempted": counter["attempted"], "ok": counter["ok"], "failed": counter["failed"],
                        "backends": backends, "errors": errors, "seconds": round(time.monotonic() - started, 3),
                        "stopped_by": counter["stopped_by"]}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "spread-http":
            vip, port, count, timeout = args
            _emit(spread_http(vip, int(port), int(count), float(timeout)))
        elif cmd == "spread-udp":
            vip, port, count, timeout = args[:4]
            first_sport = int(args[4]) if len(args) > 4 else None
            _emit(spread_udp(vip, int(port), int(count), float(timeout), first_sport))
        elif cmd == "ports-http":
            vip, port, first, count, timeout = args
            _emit(ports_http(vip, int(port), int(first), int(count), float(timeout)))
        elif cmd == "connects":
            vip, port, count, timeout, proto = args[:5]
            first_sport = int(args[5]) if len(args) > 5 else None
            _emit(connects(vip, int(port), int(count), float(timeout), proto, first_sport))
        elif cmd == "keepalive":
            vip, port, n = args[:3]
            timeout = float(args[3]) if len(args) > 3 else 5.0
            _emit(keepalive(vip, int(port), int(n), timeout))
        elif cmd == "hold":
            vip, port = args[:2]
            timeout = float(args[2]) if len(args) > 2 else 5.0
            return hold(vip, int(port), timeout)
        elif cmd == "load-http":
            vip, port, seconds, max_connections, timeout = args[:5]
            first_sport = int(args[5]) if len(args) > 5 and args[5] != "-" else None
            workers = int(args[6]) if len(args) > 6 else 1
            rate = float(args[7]) if len(args) > 7 else 0.0
            _emit(load_http(vip, int(port), float(seconds), int(max_connections), float(timeout),
                            first_sport, workers, rate))
        else:
            print(f"unknown subcommand {cmd!r}", file=sys.stderr)
            return 2
    except ValueError as exc:
        print(f"bad arguments for {cmd}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
