#!/usr/bin/env python3
"""Data-plane benchmark for nftlb: new TCP connections per second through a gateway.

    client ns ---veth--- gw ns ---bridge br0--- 4 backend ns, each running nginx
    192.0.2.2            192.0.2.1 (c0)          10.0.0.11 .. 10.0.0.14, port 80
                         10.0.0.1  (br0)

Scenarios (each run builds FRESH namespaces, runs wrk, deletes them):

  no-nat           client -> 10.0.0.11:80 routed through gw, no NAT, no netfilter rules
  nftlb-1          `nftlb apply` of 1 pool (198.51.100.10:80, 4 backends, hash) in gw
  nftlb-10k        `nftlb apply` of --pools pools; the measured pool is the last one
  iptables-linear  iptables-restore of one DNAT rule per service in nat PREROUTING;
                   the measured service is LAST (4 `-m statistic --mode random` rules)
  haproxy          HAProxy `mode tcp`, `balance roundrobin`, listening on the VIP in gw

Load: wrk -H "Connection: close", so every request is a new TCP connection.
Scenarios are run round-robin (the starting scenario rotates every round), R rounds,
and the table shows the median requests/s over the rounds.

Stdlib only.  Needs root, iproute2, wrk, nginx, haproxy, iptables, nft.
Nothing is changed in the root network namespace: every namespace this script
creates is named nlbbench<pid>-... and is deleted at the end (finally + atexit +
SIGTERM/SIGINT/SIGHUP handlers); every process it starts is killed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import sandbox  # bench/sandbox.py: namespaces, processes, cleanup
from sandbox import IP, BenchError, cleanup_all, delete_namespaces, list_netns, log, mkdtemp, nsexec, run, stop_proc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"
SYS_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

PREFIX = sandbox.init("nlbbench")  # nlbbench<pid>-
VIP = "198.51.100.10"
PORT = 80
GW_CLIENT_ADDR = "192.0.2.1"
CLIENT_ADDR = "192.0.2.2"
GW_BACKEND_ADDR = "10.0.0.1"
BACKENDS = ["10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"]
# no-nat-ecmp: routing only, like no-nat, but spread over the 4 backends like the
# balancers: every backend has the VIP on lo and gw routes the VIP with a 4-way
# ECMP route hashed on the L4 4-tuple.  No NAT, no conntrack.
SCENARIOS = ["no-nat", "no-nat-ecmp", "nftlb-1", "nftlb-10k", "iptables-linear", "haproxy"]
# diagnostics, only with --scenarios:
#   no-nat-ct    no-nat plus conntrack (one `ct state` rule in forward)
#   nft-minimal  the smallest nftables DNAT: one prerouting rule, jhash over the 4 backends
EXTRA_SCENARIOS = ["no-nat-ct", "nft-minimal"]
SINGLE_BACKEND = {"no-nat", "no-nat-ct"}  # the others must reach all 4 backends
MAX_POOLS = 60000  # filler addressing scheme below supports up to 65535


# ------------------------------------------------------------------ the lab
class Lab:
    """client -- gw -- br0 -- 4 nginx backends, in fresh namespaces named PREFIX+tag-*."""

    def __init__(self, tag: str):
        self.tag = tag
        self.client = f"{PREFIX}{tag}-client"
        self.gw = f"{PREFIX}{tag}-gw"
        self.backends = [(f"{PREFIX}{tag}-b{i}", addr) for i, addr in enumerate(BACKENDS, 1)]
        self.namespaces = [self.client, self.gw] + [ns for ns, _ in self.backends]
        self.dir = mkdtemp(tag)
        self.procs: list[subprocess.Popen] = []
        self.sysctl_notes: list[str] = []
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def _sysctl(self, ns: str, *settings: str, required: bool = True) -> None:
        for s in settings:
            cp = nsexec(ns, SYSCTL, "-q", "-w", s, timeout=10, check=False)
            if cp.returncode != 0:
                if required:
                    raise BenchError(f"sysctl {s} in {ns}: {cp.stderr.strip()}")
                self.sysctl_notes.append(f"{s}: {cp.stderr.strip() or 'failed'}")

    def _build(self) -> None:
        sandbox.add_namespaces(self.namespaces)

        gw = ["link set lo up",
              f"link add c0 type veth peer name eth0 netns {self.client}",
              "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0"]
        for i, (ns, _) in enumerate(self.backends, 1):
            gw += [f"link add vb{i} type veth peer name eth0 netns {ns}",
                   f"link set vb{i} master br0", f"link set vb{i} up"]
        gw += ["link set c0 up", "link set br0 up",
               f"addr add {GW_CLIENT_ADDR}/24 dev c0", f"addr add {GW_BACKEND_ADDR}/24 dev br0"]
        sandbox.ip_batch(self.gw, gw)
        sandbox.ip_batch(self.client, ["link set lo up", "link set eth0 up", f"addr add {CLIENT_ADDR}/24 dev eth0",
                                       f"route add default via {GW_CLIENT_ADDR} dev eth0"])
        for ns, addr in self.backends:
            sandbox.ip_batch(ns, ["link set lo up", "link set eth0 up", f"addr add {addr}/24 dev eth0",
                                  f"route add default via {GW_BACKEND_ADDR} dev eth0"])

        # sysctls, all inside our namespaces
        self._sysctl(self.gw, "net.ipv4.ip_forward=1", "net.ipv4.ip_local_port_range=1024 65535")
        if os.path.isdir("/proc/sys/net/bridge"):
            # br_netfilter defaults to 1 in each new netns: keep bridged frames out of the ip hooks
            self._sysctl(self.gw, "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
                         "net.bridge.bridge-nf-call-arptables=0", required=False)
        # conntrack: short TIME_WAIT, big table (per-netns; some knobs are read-only outside init_net)
        self._sysctl(self.gw, "net.netfilter.nf_conntrack_tcp_timeout_time_wait=5",
                     "net.netfilter.nf_conntrack_max=1048576", required=False)
        self._sysctl(self.client, "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1")
        for ns, _ in self.backends:
            self._sysctl(ns, "net.core.somaxconn=8192", "net.ipv4.tcp_max_syn_backlog=8192")
        sandbox.wait_carrier(self.namespaces)

    def popen(self, ns: str, argv, logname: str) -> subprocess.Popen:
        out = open(os.path.join(self.dir, logname), "wb")
        try:
            proc = sandbox.popen(ns, argv, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def wait_listening(self, ns: str, addr: str, port: int, proc: subprocess.Popen, logname: str,
                       timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = nsexec(ns, "ss", "-Hltn", f"sport = :{port}", timeout=10).stdout
            if f"{addr}:{port}" in out or f"*:{port}" in out or f"0.0.0.0:{port}" in out or f"[::]:{port}" in out:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.dir, logname), errors="replace") as f:
                    text = f.read()[-2000:]
                raise BenchError(f"{logname}: not listening on {addr}:{port} (exit {proc.poll()}): {text}")
            time.sleep(0.05)

    def start_nginx(self) -> None:
        for i, (ns, addr) in enumerate(self.backends, 1):
            d = os.path.join(self.dir, f"nginx-b{i}")
            os.makedirs(d)
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"""\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 0;
    server {{
        listen {PORT} backlog=8192;
        default_type text/plain;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
            self.popen(ns, ["nginx", "-p", d, "-c", conf, "-e", f"{d}/error.log", "-g", "daemon off;"],
                       f"nginx-b{i}.log")
        for i, (ns, addr) in enumerate(self.backends, 1):
            self.wait_listening(ns, addr, PORT, self.procs[i - 1], f"nginx-b{i}.log")

    def passive_opens(self) -> list[int]:
        """Tcp PassiveOpens of each backend (connections it accepted)."""
        counts = []
        for ns, _ in self.backends:
            lines = nsexec(ns, "cat", "/proc/net/snmp", timeout=10).stdout.splitlines()
            tcp = [l.split() for l in lines if l.startswith("Tcp:")]
            counts.append(int(tcp[1][tcp[0].index("PassiveOpens")]))
        return counts

    def gw_conntrack(self) -> dict:
        out = {}
        cp = nsexec(self.gw, "cat", "/proc/sys/net/netfilter/nf_conntrack_count", timeout=10, check=False)
        if cp.returncode == 0:
            out["count"] = int(cp.stdout.strip() or 0)
        cp = nsexec(self.gw, "cat", "/proc/net/stat/nf_conntrack", timeout=10, check=False)
        if cp.returncode == 0:
            rows = [l.split() for l in cp.stdout.splitlines() if l.strip()]
            if len(rows) > 1:
                head = rows[0]
                for key in ("drop", "early_drop", "insert_failed", "invalid", "error"):
                    if key in head:
                        k = head.index(key)
                        out[key] = sum(int(r[k], 16) for r in rows[1:] if len(r) > k)
        return out

    def teardown(self) -> None:
        for proc in self.procs:
            stop_proc(proc)
        self.procs = []
        left = delete_namespaces(self.namespaces)
        sandbox.remove_tmpdir(self.dir)
        if left:
            raise BenchError(f"could not delete namespaces {left}")


# ------------------------------------------------------------------ inputs
def filler(i: int) -> tuple[str, list[str]]:
    """VIP and 4 (nonexistent) backends of filler service i (0-based)."""
    n = i + 1
    vip = f"10.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"
    bes = [f"10.{128 + 4 * (n >> 16) + k}.{(n >> 8) & 255}.{n & 255}" for k in range(4)]
    return vip, bes


def pools_yaml(npools: int) -> str:
    lines = ["# generated by bench/dataplane.py", "pools:"]
    for i in range(npools - 1):
        vip, bes = filler(i)
        lines += [f"  - name: f{i}", f"    vip: {vip}", f"    port: {PORT}", "    scheduler: hash",
                  f"    backends: [{', '.join(bes)}]"]
    lines += ["  - name: web", f"    vip: {VIP}", f"    port: {PORT}", "    scheduler: hash",
              f"    backends: [{', '.join(f'{b}:{PORT}' for b in BACKENDS)}]"]
    return "\n".join(lines) + "\n"


def iptables_restore_text(nservices: int) -> str:
    out = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]"]
    for i in range(nservices - 1):
        vip, bes = filler(i)
        out.append(f"-A PREROUTING -d {vip}/32 -p tcp -m tcp --dport {PORT} -j DNAT --to-destination {bes[0]}:{PORT}")
    # the measured service, last: 1/4, 1/3, 1/2, rest -> uniform over the 4 backends
    n = len(BACKENDS)
    for k, be in enumerate(BACKENDS):
        match = f"-A PREROUTING -d {VIP}/32 -p tcp -m tcp --dport {PORT}"
        if k < n - 1:
            match += f" -m statistic --mode random --probability {1 / (n - k):.11f}"
        out.append(f"{match} -j DNAT --to-destination {be}:{PORT}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"


HAPROXY_CFG = f"""\
global
    maxconn 8000
    # nbthread: HAProxy's default (one thread per CPU)
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    maxconn 8000
frontend fe
    bind {VIP}:{PORT}
    default_backend be
backend be
    balance roundrobin
{''.join(f'    server b{i} {b}:{PORT}' + chr(10) for i, b in enumerate(BACKENDS, 1))}"""


# ------------------------------------------------------------------ measuring
def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


PF_KTHREAD = 0x00200000


def task_snapshot() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (comm, netns inode, utime ticks, utime+stime ticks) of every user-space process."""
    snap = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                st = f.read()
            comm = st[st.index("(") + 1:st.rindex(")")]
            fields = st.rsplit(")", 1)[1].split()
            if int(fields[6]) & PF_KTHREAD:
                continue
            ino = os.stat(f"/proc/{name}/ns/net").st_ino
        except (OSError, ValueError, IndexError):
            continue
        snap[int(name)] = (comm, ino, int(fields[11]), int(fields[11]) + int(fields[12]))
    return snap


def foreign_load(lab_inodes: set[int], before: dict, after: dict, cpu0: list[int], cpu1: list[int]) -> dict:
    """How much CPU went to things other than this benchmark during the measurement.

    foreign_user_percent: machine-wide user+nice time minus the user time of the
    lab's processes (wrk, nginx, haproxy), as a share of all CPU time: catches
    short-lived foreign processes too.  top: foreign processes alive at both ends."""
    total = sum(b - a for a, b in list(zip(cpu0, cpu1))[:8]) or 1
    user_all = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    ours_user, foreign = 0, {}
    me = os.getpid()
    for pid, (comm, ino, ut1, t1) in after.items():
        if pid not in before:
            continue
        _, _, ut0, t0 = before[pid]
        if ino in lab_inodes:
            ours_user += ut1 - ut0
        elif pid != me and t1 > t0:
            foreign[f"{comm}[{pid}]"] = t1 - t0
    top = sorted(foreign.items(), key=lambda kv: -kv[1])[:3]
    return {"foreign_user_percent": round(max(0.0, 100.0 * (user_all - ours_user) / total), 1),
            "top_foreign": [f"{k} {100.0 * v / total:.0f}%" for k, v in top]}


def wait_quiet(max_wait: float, idle_min: float = 80.0) -> dict:
    """Before measuring, wait (at most max_wait s) until the machine is mostly idle.

    Nothing of the lab is busy at that point, so CPU use comes from other work on
    the box (or the kernel finishing up after a big ruleset load)."""
    start = time.monotonic()
    while True:
        c0 = cpu_times()
        time.sleep(0.5)
        idle = cpu_share(c0, cpu_times())["idle"]
        waited = time.monotonic() - start
        if idle >= idle_min or waited >= max_wait:
            return {"quiet_wait_seconds": round(waited, 1), "idle_before_percent": idle}


def cpu_share(before: list[int], after: list[int]) -> dict:
    d = [a - b for a, b in zip(after, before)]
    total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {n: round(100.0 * d[k] / total, 1) for k, n in enumerate(names)}


def http_check(ns: str, target: str, timeout: float = 10.0) -> None:
    """One GET from ns to target, retried (bounded) until it answers 200 ok."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{target}',{PORT}),timeout=1)\n"
        f"s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "d=b''\n"
        "while True:\n"
        "    c=s.recv(4096)\n"
        "    if not c: break\n"
        "    d+=c\n"
        "sys.exit(0 if d.startswith(b'HTTP/1.1 200') and d.endswith(b'ok\\n') else 1)\n"
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        cp = nsexec(ns, SYS_PYTHON, "-c", code, timeout=5, check=False)
        if cp.returncode == 0:
            return
        last = cp.stderr.strip()[-300:]
        time.sleep(0.2)
    raise BenchError(f"sanity GET http://{target}:{PORT}/ from client failed for {timeout}s: {last}")


WRK_RE = {
    "requests": re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+)", re.M),
    "rps": re.compile(r"^Requests/sec:\s*([\d.]+)", re.M),
    "sock": re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses: (\d+)"),
}


def wrk(ns: str, target: str, seconds: float, threads: int, conns: int) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, int(round(seconds)))}s", "--timeout", "2s",
            "-H", "Connection: close", f"http://{target}:{PORT}/"]
    cp = nsexec(ns, *argv, timeout=seconds + 30, check=False)
    text = cp.stdout
    m_req, m_rps = WRK_RE["requests"].search(text), WRK_RE["rps"].search(text)
    if cp.returncode != 0 or not m_req or not m_rps:
        raise BenchError(f"wrk failed (exit {cp.returncode}): {text[-1500:]} {cp.stderr[-500:]}")
    m_sock, m_non = WRK_RE["sock"].search(text), WRK_RE["non2xx"].search(text)
    sock = dict(zip(("connect", "read", "write", "timeout"), map(int, m_sock.groups()))) if m_sock else \
        {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    non2xx = int(m_non.group(1)) if m_non else 0
    requests = int(m_req.group(1))
    errors = non2xx + sum(sock.values())
    return {"rps": float(m_rps.group(1)), "requests": requests, "non2xx": non2xx, "socket_errors": sock,
            "errors": errors, "error_ratio": errors / max(1, requests + sum(sock.values())),
            "argv": " ".join(argv)}


class Runner:
    def __init__(self, args):
        self.args = args
        self.nftlb = args.nftlb
        self.inputs = mkdtemp("inputs")
        self.pools_file = os.path.join(self.inputs, f"pools-{args.pools}.yaml")
        with open(self.pools_file, "w") as f:
            f.write(pools_yaml(args.pools))
        self.one_pool_file = os.path.join(self.inputs, "pools-1.yaml")
        with open(self.one_pool_file, "w") as f:
            f.write(pools_yaml(1))
        self.ipt_file = os.path.join(self.inputs, f"iptables-{args.pools}.rules")
        with open(self.ipt_file, "w") as f:
            f.write(iptables_restore_text(args.pools))
        self.haproxy_cfg = os.path.join(self.inputs, "haproxy.cfg")
        with open(self.haproxy_cfg, "w") as f:
            f.write(HAPROXY_CFG)

    # each setup returns (target address, info dict)
    def setup_no_nat(self, lab: Lab):
        return BACKENDS[0], {}

    def setup_no_nat_ecmp(self, lab: Lab):
        for ns, _ in lab.backends:
            run([IP, "-n", ns, "addr", "add", f"{VIP}/32", "dev", "lo"], timeout=10)
        lab._sysctl(lab.gw, "net.ipv4.fib_multipath_hash_policy=1")
        run([IP, "-n", lab.gw, "route", "add", f"{VIP}/32",
             *[w for b in BACKENDS for w in ("nexthop", "via", b, "dev", "br0")]], timeout=10)
        return VIP, {}

    def setup_no_nat_ct(self, lab: Lab):
        nsexec(lab.gw, "nft", "-f", "-", timeout=30, input=(
            "table inet nlbbench_ct {\n"
            "  chain forward { type filter hook forward priority 0; policy accept; ct state established accept; }\n"
            "}\n"))
        return BACKENDS[0], {}

    def setup_nft_minimal(self, lab: Lab):
        elems = ", ".join(f"{k} : {b}" for k, b in enumerate(BACKENDS))
        nsexec(lab.gw, "nft", "-f", "-", timeout=30, input=(
            "table ip nlbbench_min {\n"
            "  chain pre { type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {VIP} tcp dport {PORT} dnat to jhash ip saddr . tcp sport mod {len(BACKENDS)} "
            f"map {{ {elems} }}\n"
            "  }\n}\n"))
        return VIP, {}

    def _nftlb_apply(self, lab: Lab, pools_file: str, npools: int):
        state = os.path.join(lab.dir, "nftlb-state")
        t0 = time.monotonic()
        cp = nsexec(lab.gw, *self.nftlb, "apply", pools_file, "--state-dir", state,
                    timeout=self.args.apply_timeout, check=False, cwd=REPO)
        took = time.monotonic() - t0
        if cp.returncode != 0:
            raise BenchError(f"nftlb apply exited {cp.returncode}: {cp.stdout[-1000:]} {cp.stderr[-1500:]}")
        first = (cp.stdout.splitlines() or [""])[0][:200]
        log(f"    nftlb apply of {npools} pool(s): {took:.2f} s  ({first})")
        return VIP, {"apply_seconds": round(took, 3), "apply_summary": first}

    def setup_nftlb_1(self, lab: Lab):
        return self._nftlb_apply(lab, self.one_pool_file, 1)

    def setup_nftlb_10k(self, lab: Lab):
        return self._nftlb_apply(lab, self.pools_file, self.args.pools)

    def setup_iptables_linear(self, lab: Lab):
        t0 = time.monotonic()
        nsexec(lab.gw, "iptables-restore", self.ipt_file, timeout=self.args.apply_timeout)
        took = time.monotonic() - t0
        log(f"    iptables-restore of {self.args.pools - 1 + len(BACKENDS)} DNAT rules: {took:.2f} s")
        return VIP, {"restore_seconds": round(took, 3)}

    def setup_haproxy(self, lab: Lab):
        run([IP, "-n", lab.gw, "addr", "add", f"{VIP}/32", "dev", "lo"], timeout=10)
        run(["haproxy", "-c", "-q", "-f", self.haproxy_cfg], timeout=30)
        proc = lab.popen(lab.gw, ["haproxy", "-db", "-f", self.haproxy_cfg], "haproxy.log")
        lab.wait_listening(lab.gw, VIP, PORT, proc, "haproxy.log")
        return VIP, {}

    def run_one(self, scenario: str, rnd: int) -> dict:
        args = self.args
        tag = f"r{rnd}{scenario.replace('-', '')[:10]}"
        rec = {"scenario": scenario, "round": rnd, "ok": False}
        t_start = time.monotonic()
        lab = None
        try:
            lab = Lab(tag)
            if lab.sysctl_notes:
                rec["sysctl_notes"] = lab.sysctl_notes
            lab.start_nginx()
            setup = getattr(self, "setup_" + scenario.replace("-", "_"))
            target, info = setup(lab)
            rec.update(info)
            rec["target"] = target
            http_check(lab.client, target)
            if args.quiet_wait > 0:
                rec.update(wait_quiet(args.quiet_wait))
            if args.warmup > 0:
                wrk(lab.client, target, args.warmup, args.threads, args.connections)
            opens0 = lab.passive_opens()
            lab_inodes = {os.stat(f"/run/netns/{ns}").st_ino for ns in lab.namespaces}
            tasks0, cpu0 = task_snapshot(), cpu_times()
            res = wrk(lab.client, target, args.seconds, args.threads, args.connections)
            cpu1, tasks1 = cpu_times(), task_snapshot()
            opens1 = lab.passive_opens()
            rec.update(res)
            rec["cpu_percent"] = cpu_share(cpu0, cpu1)
            rec.update(foreign_load(lab_inodes, tasks0, tasks1, cpu0, cpu1))
            rec["backend_accepts"] = [b - a for a, b in zip(opens0, opens1)]
            rec["gw_conntrack"] = lab.gw_conntrack()
            rec["loadavg"] = open("/proc/loadavg").read().split()[:3]
            if res["error_ratio"] > 0.01:
                rec["failure"] = f"errors {res['errors']} of {res['requests']} requests (> 1%)"
            elif scenario not in SINGLE_BACKEND and sum(1 for c in rec["backend_accepts"] if c > 0) < len(BACKENDS):
                rec["failure"] = f"not spread over all backends: {rec['backend_accepts']}"
            else:
                rec["ok"] = True
        except BenchError as exc:
            rec["failure"] = str(exc)
        finally:
            if lab is not None:
                try:
                    lab.teardown()
                except BenchError as exc:
                    rec["ok"] = False
                    rec["failure"] = (rec.get("failure", "") + f"; teardown: {exc}").lstrip("; ")
            rec["wall_seconds"] = round(time.monotonic() - t_start, 2)
        return rec


# ------------------------------------------------------------------ reporting
def version(argv, pattern=None) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (cp.stdout + "\n" + cp.stderr).strip()
    if pattern:
        m = re.search(pattern, text)
        return m.group(0) if m else text.splitlines()[0] if text else "?"
    return text.splitlines()[0] if text else "?"


def machine_info(nftlb_cmd) -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": os.uname().release,
        "debian": open("/etc/debian_version").read().strip() if os.path.exists("/etc/debian_version") else "?",
        "nft": version(["nft", "-v"]),
        "iptables": version(["iptables", "-V"]),
        "haproxy": version(["haproxy", "-v"], r"HAProxy version \S+"),
        "nginx": version(["nginx", "-v"], r"nginx/\S+"),
        "wrk": version(["wrk", "-v"], r"wrk \S+"),
        "nftlb": version([*nftlb_cmd, "--version"]),
        "python": sys.version.split()[0],
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "other_netns_at_start": len([n for n in list_netns() if not n.startswith(PREFIX)]),
    }


def summarize(records, scenarios) -> dict:
    summary = {}
    for s in scenarios:
        ok = [r["rps"] for r in records if r["scenario"] == s and r["ok"]]
        runs = [r for r in records if r["scenario"] == s]
        summary[s] = {
            "runs": len(runs), "ok_runs": len(ok),
            "median": statistics.median(ok) if ok else None,
            "min": min(ok) if ok else None, "max": max(ok) if ok else None,
            "values": ok,
        }
    base = summary.get("no-nat", {}).get("median")
    for s in scenarios:
        m = summary[s]["median"]
        summary[s]["vs_no_nat"] = (m / base) if (m and base) else None
    return summary


TARGETS = [("nftlb-10k", "no-nat", 0.95), ("nftlb-10k", "iptables-linear", 2.5), ("nftlb-10k", "haproxy", 1.5)]
INFO_RATIOS = [("nftlb-10k", "no-nat-ecmp"), ("nftlb-10k", "nftlb-1"), ("nftlb-1", "nft-minimal"),
               ("no-nat-ct", "no-nat")]


def report(info, settings, records, summary, scenarios, total_seconds) -> tuple[str, dict]:
    L = []
    L.append("machine: nproc={nproc} cpu={cpu!r} kernel={kernel} debian={debian}".format(**info))
    L.append(f"tools:   {info['nft']} | {info['iptables']} | {info['haproxy']} | {info['nginx']} | "
             f"{info['wrk']} | nftlb {info['nftlb']}")
    L.append(f"load:    {settings['wrk']} for {settings['seconds']} s (+{settings['warmup']} s warmup) per run, "
             f"{settings['rounds']} rounds, fresh namespaces per run, round-robin with rotating start")
    L.append(f"NOTE: all {info['nproc']} cores are shared by wrk, the gateway's softirq/NAT work, nginx x4 and "
             f"haproxy: the numbers are relative, not a gateway's capacity. loadavg at start "
             f"{' '.join(info['loadavg_at_start'])}; {info['other_netns_at_start']} foreign netns present.")
    L.append("")
    hdr = f"{'scenario':<16} {'median conn/s':>13} {'min':>9} {'max':>9} {'vs no-nat':>9} {'ok/runs':>7}  notes"
    L.append(hdr)
    L.append("-" * len(hdr))
    for s in scenarios:
        sm = summary[s]
        notes = []
        rs = [r for r in records if r["scenario"] == s]
        ap = [r["apply_seconds"] for r in rs if "apply_seconds" in r]
        if ap:
            notes.append(f"apply {statistics.median(ap):.2f} s")
        rp = [r["restore_seconds"] for r in rs if "restore_seconds" in r]
        if rp:
            notes.append(f"restore {statistics.median(rp):.2f} s")
        idle = [r["cpu_percent"]["idle"] for r in rs if "cpu_percent" in r]
        if idle:
            notes.append(f"cpu idle {statistics.median(idle):.0f}%")
        fu = [r["foreign_user_percent"] for r in rs if "foreign_user_percent" in r]
        if fu:
            noisy = sum(1 for v in fu if v > settings["noisy_threshold"])
            notes.append(f"foreign cpu {statistics.median(fu):.0f}% (max {max(fu):.0f}%), {noisy} noisy")
        fmt = lambda v: f"{v:,.0f}" if v is not None else "-"
        ratio = f"{sm['vs_no_nat']:.3f}" if sm["vs_no_nat"] is not None else "-"
        L.append(f"{s:<16} {fmt(sm['median']):>13} {fmt(sm['min']):>9} {fmt(sm['max']):>9} {ratio:>9} "
                 f"{sm['ok_runs']}/{sm['runs']:<5}  {', '.join(notes)}")
    for key, label in (("apply_seconds", "nftlb apply"), ("restore_seconds", "iptables-restore")):
        for s in scenarios:
            vals = [r[key] for r in records if r["scenario"] == s and key in r]
            if vals and (s != "nftlb-1"):
                L.append(f"{label} time ({s}, {settings['pools'] if s != 'nftlb-1' else 1} pools/services): "
                         + ", ".join(f"{v:.2f}" for v in vals) + " s")
    L.append(f"'foreign cpu' = user CPU of processes outside this benchmark during the measurement, "
             f"share of all CPUs; a run is noisy above {settings['noisy_threshold']:.0f}%")
    L.append("")
    ratios = {}
    for a, b, target in TARGETS:
        if a in summary and b in summary and summary[a]["median"] and summary[b]["median"]:
            v = summary[a]["median"] / summary[b]["median"]
            ratios[f"{a}/{b}"] = {"value": v, "target": target, "met": v >= target}
            L.append(f"{a} / {b:<16} = {v:6.3f}   (target >= {target}: {'met' if v >= target else 'NOT met'})")
        elif a in scenarios or b in scenarios:
            ratios[f"{a}/{b}"] = {"value": None, "target": target, "met": None}
            L.append(f"{a} / {b:<16} = n/a")
    for a, b in INFO_RATIOS:
        if a in summary and b in summary and summary[a]["median"] and summary[b]["median"]:
            v = summary[a]["median"] / summary[b]["median"]
            ratios[f"{a}/{b}"] = {"value": v, "target": None, "met": None}
            L.append(f"{a} / {b:<16} = {v:6.3f}   (information, no target)")
    failed = [r for r in records if not r["ok"]]
    if failed:
        L.append("")
        L.append("FAILED runs:")
        for r in failed:
            L.append(f"  {r['scenario']} round {r['round']}: {r.get('failure', '?')[:500]}")
    L.append("")
    L.append(f"total wall time {total_seconds:.0f} s")
    return "\n".join(L), ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="wrk duration per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios (default 3)")
    p.add_argument("--pools", type=int, default=10000, help="pools / services for nftlb-10k and iptables-linear")
    p.add_argument("--warmup", type=float, default=1.0, help="wrk warm-up seconds before each measurement (0: none)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list from {','.join(SCENARIOS + EXTRA_SCENARIOS)} (default: all but no-nat-ct)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="before each run, wait up to this many seconds for the CPUs to be >= 80%% idle (0: don't)")
    p.add_argument("--noisy", type=float, default=10.0,
                   help="flag a run as noisy when foreign user CPU during it exceeds this %% (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--apply-timeout", type=float, default=600.0, help="bound for nftlb apply / iptables-restore")
    p.add_argument("--budget", type=float, default=1800.0, help="stop starting new runs after this many seconds")
    p.add_argument("--nftlb", default=None, help="command to run nftlb (default: <repo>/.venv/bin/python -m nftlb)")
    args = p.parse_args(argv)

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS + EXTRA_SCENARIOS]
    if bad or not scenarios:
        p.error(f"unknown scenarios {bad}")
    if not 1 <= args.pools <= MAX_POOLS:
        p.error(f"--pools must be 1..{MAX_POOLS}")
    if args.rounds < 1 or args.seconds < 1:
        p.error("--rounds and --seconds must be >= 1")
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    venv_py = os.path.join(REPO, ".venv", "bin", "python")
    args.nftlb = args.nftlb.split() if args.nftlb else [venv_py if os.path.exists(venv_py) else sys.executable,
                                                        "-m", "nftlb"]
    missing = [t for t in ("wrk", "nginx", "haproxy", "iptables-restore", "ss") if not shutil.which(t)]
    if missing:
        p.error(f"missing tools: {missing} (apt-get install -y wrk nginx-light haproxy iptables)")

    sandbox.catch_signals()

    t0 = time.monotonic()
    records = []
    try:
        # namespaces left behind by an earlier, killed run of this script
        stale = sandbox.stale_namespaces()
        if stale:
            log(f"removing {len(stale)} stale namespaces of dead benchmark runs")
            delete_namespaces(stale)
        info = machine_info(args.nftlb)
        settings = {"seconds": args.seconds, "rounds": args.rounds, "pools": args.pools, "warmup": args.warmup,
                    "wrk": f"wrk -t{args.threads} -c{args.connections} -H 'Connection: close'",
                    "scenarios": scenarios,
                    "iptables_linear": "one DNAT rule per service in nat PREROUTING; measured service last, "
                                       "4 rules with -m statistic --mode random (1/4, 1/3, 1/2, rest)",
                    "haproxy": "mode tcp, balance roundrobin, default nbthread (one per CPU)",
                    "nginx": "1 worker per backend, access_log off, return 200 \"ok\\n\"",
                    "quiet_wait": args.quiet_wait, "noisy_threshold": args.noisy,
                    "gw_sysctls": "ip_forward=1, nf_conntrack_tcp_timeout_time_wait=5, nf_conntrack_max=1048576"}
        log(f"nlbbench: prefix {PREFIX}; generating inputs ({args.pools} pools)")
        runner = Runner(args)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(scenarios)
            order = scenarios[k:] + scenarios[:k]
            for s in order:
                if time.monotonic() - t0 > args.budget:
                    log(f"budget of {args.budget:.0f} s exhausted: skipping {s} round {rnd}")
                    records.append({"scenario": s, "round": rnd, "ok": False, "failure": "skipped: budget"})
                    continue
                log(f"[round {rnd}/{args.rounds}] {s} ...")
                rec = runner.run_one(s, rnd)
                records.append(rec)
                if rec["ok"]:
                    log(f"    {rec['rps']:,.0f} conn/s, {rec['errors']} errors, backends {rec['backend_accepts']}, "
                        f"cpu idle {rec['cpu_percent']['idle']}% steal {rec['cpu_percent']['steal']}% "
                        f"foreign-user {rec['foreign_user_percent']}% {' '.join(rec['top_foreign'])}, "
                        f"{rec['wall_seconds']} s")
                else:
                    log(f"    FAILED: {rec.get('failure', '?')[:800]}")
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); cleaning up")
        cleanup_all()
        return 130
    finally:
        cleanup_all()
    total = time.monotonic() - t0
    summary = summarize(records, scenarios)
    text, ratios = report(info, settings, records, summary, scenarios, total)
    print(text, flush=True)
    if args.json:
        doc = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": info, "settings": settings, "summary": summary, "ratios": ratios,
               "runs": records, "total_seconds": round(total, 1)}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    leftovers = [ns for ns in list_netns() if ns.startswith(PREFIX)]
    if leftovers:
        log(f"WARNING: namespaces left: {leftovers}")
        return 3
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
