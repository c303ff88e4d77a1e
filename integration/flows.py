#!/usr/bin/python3
"""Long-lived flows through a gateway, for failover tests (stdlib only, one thread).

    flows.py VIP --tcp N --echo-port P [--udp N --udp-port P --udp-first-sport S]
             [--push N --push-port P] [--period SECONDS]

Opens N TCP flows to VIP:echo-port, each sending a line every PERIOD (staggered) and
reading the backend's name back (server.py --echo); N UDP flows from fixed source ports
to VIP:udp-port (server.py --udp answers JSON); N TCP flows to VIP:push-port on which
the backend speaks first, a line `NAME SEQ` every 10 ms (server.py --push).

Prints `{"ready": {...backends per kind...}}` once every flow has been answered, then
runs until stdin closes or a line arrives, and prints one JSON report: per kind, per flow
its first backend, answers, errors, whether the backend changed, the longest gap between
answers and the last answer's time (time.monotonic(): every namespace shares the clock);
and `outage`, the longest time in which no flow of any kind got an answer.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time


class Flow:
    def __init__(self, kind: str, sock: socket.socket, period: float, offset: float):
        self.kind, self.sock, self.period = kind, sock, period
        self.next_send = time.monotonic() + offset
        self.buf = b""
        self.backend: str | None = None
        self.answers = 0
        self.changed = 0
        self.errors: list[str] = []
        self.last: float | None = None
        self.max_gap = 0.0
        self.seq: int | None = None  # push: the last sequence number seen
        self.skipped = 0  # push: numbers missing in between (the server skips none unless the line was lost)
        self.closed = False

    def answered(self, name: str, now: float) -> None:
        if self.backend is None:
            self.backend = name
        elif name != self.backend:
            self.changed += 1
        if self.last is not None:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.answers += 1

    def report(self) -> dict:
        return {"backend": self.backend, "answers": self.answers, "changed": self.changed,
                "errors": self.errors[:3], "error_count": len(self.errors), "max_gap": round(self.max_gap, 4),
                "last": self.last, "skipped": self.skipped, "closed": self.closed}


def _connect(vip: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((vip, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("vip")
    ap.add_argument("--tcp", type=int, default=0)
    ap.add_argument("--echo-port", type=int, default=7070)
    ap.add_argument("--udp", type=int, default=0)
    ap.add_argument("--udp-port", type=int, default=5353)
    ap.add_argument("--udp-first-sport", type=int, default=30000)
    ap.add_argument("--push", type=int, default=0)
    ap.add_argument("--push-port", type=int, default=7071)
    ap.add_argument("--period", type=float, default=0.2)
    ap.add_argument("--ready-timeout", type=float, default=20.0)
    args = ap.parse_args(argv)

    sel = selectors.DefaultSelector()
    flows: list[Flow] = []
    n = max(1, args.tcp + args.udp)
    for i in range(args.tcp):
        flows.append(Flow("tcp", _connect(args.vip, args.echo_port, 5.0), args.period, args.period * i / n))
    for i in range(args.udp):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", args.udp_first_sport + i))
        s.connect((args.vip, args.udp_port))
        s.setblocking(False)
        flows.append(Flow("udp", s, args.period, args.period * (args.tcp + i) / n))
    for _ in range(args.push):
        flows.append(Flow("push", _connect(args.vip, args.push_port, 5.0), 0.0, 0.0))
    for f in flows:
        sel.register(f.sock, selectors.EVENT_READ, f)
    sel.register(sys.stdin, selectors.EVENT_READ, None)

    ready = False
    started = time.monotonic()
    last_any, outage = None, 0.0
    while True:
        now = time.monotonic()
        timeout = min([f.next_send for f in flows if f.kind != "push" and not f.closed] or [now + 0.05]) - now
        stop = False
        for key, _ in sel.select(max(0.0, min(timeout, 0.05))):
            if key.data is None:
                stop = True
                continue
            f: Flow = key.data
            try:
                data = f.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                f.errors.append(f"{errno.errorcode.get(e.errno or 0, type(e).__name__)}")
                if f.kind != "udp":
                    sel.unregister(f.sock)
                    f.closed = True
                continue
            now = time.monotonic()
            if f.kind == "udp":
                try:
                    f.answered(json.loads(data)["backend"], now)
                except (ValueError, KeyError):
                    f.errors.append("garbage")
                    continue
            else:
                if not data:
                    f.errors.append("closed by peer")
                    sel.unregister(f.sock)
                    f.closed = True
                    continue
                f.buf += data
                *lines, f.buf = f.buf.split(b"\n")
                for line in lines:
                    parts = line.decode(errors="replace").split()
                    if not parts:
                        continue
                    if f.kind == "push":
                        seq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
                        if f.seq is not None and seq != f.seq + 1:
                            f.skipped += max(0, seq - f.seq - 1) or 1
                        f.seq = seq
                    f.answered(parts[0], now)
            if ready:
                if last_any is not None:
                    outage = max(outage, now - last_any)
                last_any = now
        if stop:
            break
        now = time.monotonic()
        for f in flows:
            if f.kind == "push" or f.closed or f.next_send > now:
                continue
            f.next_send += f.period
            try:
                f.sock.send(b"x\n")
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                f.errors.append(f"send: {errno.errorcode.get(e.errno or 0, type(e).__name__)}")
                if f.kind != "udp":
                    sel.unregister(f.sock)
                    f.closed = True
        if not ready and all(f.answers for f in flows):
            ready = True
            last_any = time.monotonic()
            for f in flows:  # gaps count from here: the set-up is not an outage
                f.max_gap, f.last = 0.0, last_any
            backends: dict = {}
            for f in flows:
                backends.setdefault(f.kind, {}).setdefault(f.backend, 0)
                backends[f.kind][f.backend] += 1
            print(json.dumps({"ready": backends, "at": last_any}), flush=True)
        elif not ready and time.monotonic() - started > args.ready_timeout:
            print(json.dumps({"error": "not every flow answered", "flows": [f.report() for f in flows]}), flush=True)
            return 1
    out: dict = {"outage": round(outage, 4), "at": time.monotonic()}
    for kind in ("tcp", "udp", "push"):
        out[kind] = [f.report() for f in flows if f.kind == kind]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
