"""`nftlb doctor FILE`: the checks against a pools file. Where each VIP lives on this box,
how a refused pool's connections are answered there, local listeners that DNAT would
shadow, and whether path probes can take the clients' way back.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import psutil

from nftlb import checks, plan, schema
from nftlb.checks import Address, Check


def vip(vip: Address, local: dict[Address, str]) -> tuple[Check, str]:
    """Where the VIP lives on this box: "local", "routed", "none" (no route) or "unknown"."""
    name = f"vip {vip}"
    route = None if vip in local else checks.route(vip)
    if vip in local or (route or {}).get("type") == "local":
        dev = local.get(vip) or (route or {}).get("dev")
        return Check(
            name, "ok", f"local (on dev {dev}): the gateway's own traffic and traffic to this box are balanced"
        ), "local"
    if route == {}:
        return Check(
            name,
            "ok",
            "not local and no route to it: fine for DNAT (nftlb translates before "
            "routing); the upstream router must send it to this box, and this box's "
            "own connections to it fail",
        ), "none"
    if route is None:
        return Check(
            name, "ok", "not local: routed via an unknown route (no ip tool); clients must route it through this box"
        ), "unknown"
    via = f"dev {route['dev']}" + (f" via {route['gateway']}" if route.get("gateway") else "")
    return Check(name, "ok", f"not local: routed via {via}; clients must route it through this box"), "routed"


def _icmp_limit(proc: Path, version: int) -> str:
    """How the kernel limits the ICMP errors a refused UDP datagram gets (per client address)."""
    if version == 4:
        ms, mask = checks.read(proc / "sys/net/ipv4/icmp_ratelimit"), checks.read(proc / "sys/net/ipv4/icmp_ratemask")
        if mask is not None and mask.isdigit() and not int(mask) & (1 << 3):  # 3: destination unreachable
            return "not rate-limited (net.ipv4.icmp_ratemask leaves out unreachables)"
        if ms == "0":
            return "not rate-limited (net.ipv4.icmp_ratelimit = 0)"
        return f"rate-limited per client: a burst of 6, then one per {ms or '?'} ms (net.ipv4.icmp_ratelimit)"
    ms = checks.read(proc / "sys/net/ipv6/icmp/ratelimit")
    return (
        f"rate-limited per client: one per {ms or '?'} ms, less for a client behind a wider route "
        "(net.ipv6.icmp.ratelimit)"
    )


def refusal(vip: Address, where: str, protocols: set[str], proc: Path) -> Check:
    """How a refused pool on `vip` answers here (issue: never a black hole)."""
    answers = ["TCP reset"] if "tcp" in protocols else []
    if "udp" in protocols:
        answers.append(f"ICMP port-unreachable ({_icmp_limit(proc, vip.version)})")
    own = {
        "local": "refused alike",
        "routed": "refused alike",
        "none": "fail with 'network unreachable' from its own stack before any rule (no route)",
        "unknown": "refused alike if it has a route to the VIP",
    }[where]
    return Check(
        f"refusal {vip}",
        "ok",
        f"a pool without a usable backend answers clients at once, before "
        f"routing: {' and '.join(answers)}; this box's own connections: {own}",
    )


def path_probes(config: schema.Config, local: dict[Address, str]) -> list[Check]:
    """Path probes leave from each path source: it must not be on a link of this box (backends
    there would look for it on the link, not route it back through the gateway), and no policy
    routing rule may catch the probes' socket mark."""
    out = []
    for source in config.path_sources():
        name = f"path_source {source}"
        route = checks.route(source)
        if source in local or (route or {}).get("type") == "local":
            out.append(
                Check(
                    name,
                    "fail",
                    f"{source} is an address of this box (dev {local.get(source) or (route or {}).get('dev')}): "
                    "a backend answers it like the gateway itself; choose one no host has",
                )
            )
        elif route and not route.get("gateway") and route.get("dev"):
            out.append(
                Check(
                    name,
                    "warn",
                    f"{source} is on the link of dev {route['dev']}: backends there would "
                    "look for it on the link instead of routing it back through this box",
                )
            )
        else:
            out.append(
                Check(
                    name,
                    "ok",
                    "off every link of this box: a backend answers it by its route back, as it answers clients",
                )
            )
    if out:
        caught = []
        for rule in checks.rules():
            if "fwmark" in rule:
                value, mask = int(rule["fwmark"], 0), int(rule.get("fwmask", "0xffffffff"), 0)
                if plan.PATH_PROBE_MARK & mask == value:
                    caught.append(f"{rule['fwmark']}/{rule.get('fwmask', '0xffffffff')} -> table {rule.get('table')}")
        mark = f"{plan.PATH_PROBE_MARK:#x}"
        out.append(
            Check(
                "path_mark",
                "warn",
                f"policy routing rules catch the path probes' mark {mark}: {checks.examples(caught)}",
            )
            if caught
            else Check("path_mark", "ok", f"no policy routing rule catches the path probes' mark {mark}")
        )
    return out


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def listeners(pools: list[schema.Pool], local_vips: set[Address]) -> list[Check]:
    try:
        socks = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError) as e:
        return [Check("listeners", "warn", f"cannot list this box's sockets ({e}): run as root")]
    out = []
    for pool in pools:
        wild = (
            set()
            if pool.vip not in local_vips
            else {ipaddress.ip_address("::")} | ({ipaddress.ip_address("0.0.0.0")} if pool.vip.version == 4 else set())
        )
        hits = []
        for s in socks:
            if not s.laddr or s.laddr.port != pool.port:
                continue
            if pool.protocol == "tcp" and not (s.type == socket.SOCK_STREAM and s.status == psutil.CONN_LISTEN):
                continue
            if pool.protocol == "udp" and not (s.type == socket.SOCK_DGRAM and not s.raddr):
                continue
            addr = ipaddress.ip_address(s.laddr.ip.split("%")[0])
            addr = getattr(addr, "ipv4_mapped", None) or addr
            if addr == pool.vip or addr in wild:
                try:
                    who = f"{psutil.Process(s.pid).name()} (pid {s.pid})" if s.pid else "a process (pid unknown)"
                except psutil.Error:
                    who = f"pid {s.pid}"
                hits.append(f"{who} listens on {_endpoint(s.laddr.ip, s.laddr.port)}")
        if hits:
            out.append(
                Check(
                    f"listener {_endpoint(str(pool.vip), pool.port)}/{pool.protocol}",
                    "warn",
                    f"DNAT shadows it: {', '.join(sorted(set(hits)))}; its clients through the VIP "
                    "will reach the backends instead",
                )
            )
    return out or [Check("listeners", "ok", "no local process listens on a pool's VIP:port")]
