#!/usr/bin/python3
"""Backend test server for the nftlb network-namespace lab.

Run inside a backend namespace::

    server.py --name b1 --tcp 8080 --tcp 80 --udp 5353

* TCP: an HTTP/1.1 server with keep-alive on every ``--tcp`` port.
* UDP: answers every datagram on every ``--udp`` port.
* ``--echo PORT``: a line server: each line received is answered with the line
  ``NAME\n`` (many long-lived connections, one thread).
* ``--push PORT``: a server that speaks first: every ``--push-every`` seconds
  (default 0.01) it writes ``NAME SEQ\n`` on each connection, SEQ counting up
  from 0 per connection.

Every answer is the JSON object ``{"backend": NAME, "peer": "client ip as
seen"}``; HTTP answers also carry an ``X-Backend: NAME`` header.  All sockets
are bound dual-stack on ``::`` (IPV6_V6ONLY=0), and IPv4-mapped peers
(``::ffff:a.b.c.d``) are reported as plain IPv4.

"ready" is printed (and flushed) once every socket is bound and listening.
The process exits on SIGTERM/SIGINT.  Stdlib only.
"""

import argparse
import http.server
import ipaddress
import json
import os
import signal
import socket
import sys
import threading


def _peer_ip(addr: str) -> str:
    """Return the peer address, unmapping ``::ffff:a.b.c.d`` to IPv4."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _answer(name: str, peer_addr: str) -> bytes:
    return json.dumps({"backend": name, "peer": _peer_ip(peer_addr)}).encode()


class _DualStackHTTPServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # (socketserver's own server_bind would set this; it is replaced here)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # HTTPServer.server_bind() calls getfqdn(), which may try DNS inside an
        # isolated namespace: bind directly instead.
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = "backend"
        self.server_port = self.server_address[1]


def _make_handler(name: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "nftlb-lab-backend"
        sys_version = ""
        # Idle keep-alive connections are closed after this many seconds so
        # that handler threads never pile up forever.
        timeout = 120

        def _reply(self, with_body: bool) -> None:
            body = _answer(name, self.client_address[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Backend", name)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def _drain_body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 0:
                self.rfile.read(length)

        def do_GET(self):  # noqa: N802 (http.server naming)
            self._reply(True)

        def do_HEAD(self):  # noqa: N802
            self._reply(False)

        def do_POST(self):  # noqa: N802
            self._drain_body()
            self._reply(True)

        def log_message(self, format, *args):  # quiet access log
            pass

        def log_error(self, format, *args):  # quiet (timeouts, bad requests)
            pass

    return Handler


def _udp_loop(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _data, addr = sock.recvfrom(65535)
        except OSError:
            return
        try:
            sock.sendto(_answer(name, addr[0]), addr)
        except OSError:
            # e.g. no route back to the client (non-routed backend): ignore.
            pass


def _lines_loop(echo_ports, push_ports, name: str, every: float, stop: threading.Event) -> None:
    """One selectors loop for every --echo and --push connection."""
    import selectors
    import time

    sel = selectors.DefaultSelector()
    for port, kind in [(p, "echo") for p in echo_ports] + [(p, "push") for p in push_ports]:
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("::", port))
        ls.listen(1024)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, ("listen", kind))
    pushed = {}  # socket -> next sequence number
    pending = {}  # socket -> the rest of a line not yet sent
    answer = f"{name}\n".encode()
    next_push = time.monotonic() + every
    while not stop.is_set():
        timeout = max(0.0, next_push - time.monotonic()) if pushed else 0.5
        for key, _ in sel.select(timeout):
            role, kind = key.data
            if role == "listen":
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, ("conn", kind))
                if kind == "push":
                    pushed[conn] = 0
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conn)
                pushed.pop(conn, None)
                pending.pop(conn, None)
                conn.close()
                continue
            if kind == "echo":
                try:
                    conn.sendall(answer * data.count(b"\n"))
                except OSError:
                    pass
        if pushed and time.monotonic() >= next_push:
            next_push += every
            if next_push < time.monotonic():  # behind: do not burst to catch up
                next_push = time.monotonic() + every
            for conn, seq in list(pushed.items()):
                out = pending.get(conn, b"")
                if not out:  # a new line only once the last one is out whole
                    out, pushed[conn] = f"{name} {seq}\n".encode(), seq + 1
                try:
                    pending[conn] = out[conn.send(out):]
                except BlockingIOError:
                    pending[conn] = out  # the client's window is full: wait, do not queue more
                except OSError:
                    pending[conn] = b""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    parser.add_argument("--echo", type=int, action="append", default=[])
    parser.add_argument("--push", type=int, action="append", default=[])
    parser.add_argument("--push-every", type=float, default=0.01)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    handler = _make_handler(args.name)
    threads = []
    for port in args.tcp:
        srv = _DualStackHTTPServer(("::", port), handler)
        threads.append(threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True))
    for port in args.udp:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        threads.append(threading.Thread(target=_udp_loop, args=(sock, args.name), daemon=True))
    if args.echo or args.push:
        threads.append(threading.Thread(target=_lines_loop, args=(args.echo, args.push, args.name, args.push_every,
                                                                   stop), daemon=True))
    for t in threads:
        t.start()

    print("ready", flush=True)
    # Event.wait() with a timeout in a loop keeps the main thread responsive
    # to signals.
    while not stop.wait(1.0):
        pass
    sys.stdout.flush()
    # Daemon threads may be blocked in accept()/recvfrom(): exit hard.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
