"""`nftlb doctor [FILE]`: is this box able to balance, and what stands in the way?

Each check gives one line: ok, warn, or fail (something blocks traffic). Kernel
features are tested with a dry-run transaction (checked by the kernel, never
committed); sysctls are read under `proc`, so tests can point it at a fake tree.
Nothing here changes the system. Programs run through nftlb.kernel.exec (argv lists, no shell).
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from nftlb import kernel, schema
from nftlb import plan as planlib
from nftlb.errors import KernelError
from nftlb.kernel import exec as exec_

PROBE_TABLE = "nftlb_doctor"
_MAP = "map { 0 : 192.0.2.1, 1 : 192.0.2.2 }"
# feature -> (prerouting nat rules, postrouting nat rules); nf_tables alone gets a plain filter chain
_FEATURES: dict[str, tuple[list[str], list[str]]] = {
    "nf_tables": ([], []),
    "nat": (["meta l4proto tcp ip daddr 198.51.100.1 dnat ip to 192.0.2.1"], []),
    "numgen": ([f"meta l4proto tcp ip daddr 198.51.100.2 dnat ip to numgen inc mod 2 {_MAP}"], []),
    "jhash": ([f"ip daddr 198.51.100.3 dnat ip to jhash ip saddr . tcp sport mod 2 seed 0x1 {_MAP}"], []),
    "conntrack": (["ct state new counter"], []),
    "masquerade": ([], ["meta l4proto tcp masquerade"]),
    # refused pools: reject in the nat chains, before routing (kernels before 5.x refuse it at prerouting)
    "reject": (["meta l4proto tcp reject with tcp reset", "reject"], []),
}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Check:
    name: str  # short id: "kernel", "ip_forward", "vip 198.51.100.10", ...
    verdict: str  # "ok" | "warn" | "fail" (fail: something blocks traffic)
    detail: str  # one line: what is wrong and what to do

    def as_dict(self) -> dict:
        return asdict(self)


def _probe(features: list[str]) -> str:
    pre = [r for f in features for r in _FEATURES[f][0]]
    post = [r for f in features for r in _FEATURES[f][1]]
    chains = (
        [("filter", "input", "0", [])]
        if features == ["nf_tables"]
        else [("nat", "prerouting", "dstnat", pre), ("nat", "postrouting", "srcnat", post)]
    )
    lines = [f"table inet {PROBE_TABLE} {{"]
    for kind, hook, prio, rules in chains:
        lines += [
            f"\tchain {hook} {{",
            f"\t\ttype {kind} hook {hook} priority {prio}; policy accept;",
            *(f"\t\t{r}" for r in rules),
            "\t}",
        ]
    return "\n".join(lines + ["}"]) + "\n"


def _said(e: Exception) -> str:
    """What nft said: the first line after nftlb's own "...failed:" header."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else "no message"


def _kernel(nft: kernel.Kernel | None) -> Check:
    if nft is None:
        return Check("kernel", "fail", "no way into the kernel: install python3-nftables or nftables")
    names = list(_FEATURES)
    try:
        nft.run(_probe(names), check=True)
        return Check("kernel", "ok", f"{', '.join(names[:-1])} and {names[-1]} accepted (kernel dry-run)")
    except KernelError as whole:
        failed: list[tuple[str, KernelError]] = []
        for name in names:  # which feature is it?
            try:
                nft.run(_probe([name]), check=True)
            except KernelError as e:
                failed.append((name, e))
        what = ", ".join(n for n, _ in failed) or "the probe"
        return Check("kernel", "fail", f"the kernel refused {what}: {_said(failed[0][1] if failed else whole)}")


def _nft_version() -> str | None:
    try:
        out = exec_.run("nft", ["--version"], timeout=10)
    except KernelError:  # not installed, or it would not run
        return None
    return (out.stdout.strip() or "unknown version") if out.returncode == 0 else None


def _bindings() -> str | None:
    try:
        import nftables

        nftables.Nftables()  # also loads libnftables.so
    except (ImportError, OSError):
        return None
    try:
        return importlib.metadata.version("nftables")
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _tools() -> list[Check]:
    binary, bindings = _nft_version(), _bindings()
    missing = "fail" if binary is None and bindings is None else "warn"
    return [
        Check("nft", "ok", binary)
        if binary
        else Check("nft", missing, "the nft binary was not found: install the Debian package nftables"),
        Check("bindings", "ok", f"python nftables bindings {bindings} importable (default backend)")
        if bindings
        else Check(
            "bindings",
            missing,
            "python nftables bindings not importable: install python3-nftables (the nft binary is used instead)"
            if binary
            else "python nftables bindings not importable",
        ),
    ]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _local_addresses() -> dict[Address, str]:
    """Every address on this box's interfaces (in this network namespace) -> its interface."""
    out: dict[Address, str] = {}
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.setdefault(ipaddress.ip_address(a.address.split("%")[0]), ifname)
                except ValueError:
                    pass
    return out


def _examples(items: list, most: int = 3) -> str:
    return ", ".join(map(str, items[:most])) + (f" and {len(items) - most} more" if len(items) > most else "")


def _forwarding(proc: Path, version: int, pools: list[schema.Pool] | None, local: dict[Address, str]) -> Check:
    name, key, rel = (
        ("ip_forward", "net.ipv4.ip_forward", "sys/net/ipv4/ip_forward")
        if version == 4
        else ("ipv6_forwarding", "net.ipv6.conf.all.forwarding", "sys/net/ipv6/conf/all/forwarding")
    )
    mine = None if pools is None else [p for p in pools if p.vip.version == version]
    if version == 6 and not (proc / "sys/net/ipv6").is_dir():
        if mine:
            return Check(
                name,
                "fail",
                f"IPv6 is disabled in this kernel, so the {len(mine)} IPv6 pools cannot "
                "work: boot without ipv6.disable=1",
            )
        return Check(name, "ok", "IPv6 is disabled in this kernel" + ("; no IPv6 pools" if mine is not None else ""))
    value = _read(proc / rel)
    if value is None:
        return Check(name, "warn", f"cannot read {key} under {proc}")
    if value != "0":
        return Check(name, "ok", f"{key} = {value}: forwarded traffic passes")
    how = f"run sysctl -w {key}=1 and persist it in /etc/sysctl.d/"
    if mine is None:
        return Check(
            name,
            "warn" if version == 4 else "ok",
            f"{key} = 0: connections DNATed to backends on other hosts would be dropped; {how}"
            if version == 4
            else f"{key} = 0: fine without IPv6 pools; IPv6 pools would need 1",
        )
    remote = sorted({b.address for p in mine for b in p.backends if b.address not in local}, key=int)
    if remote:
        return Check(
            name,
            "fail",
            f"{key} = 0: clients' connections DNATed to backends on other hosts "
            f"({_examples(remote)}) are dropped; {how}",
        )
    why = f"no IPv{version} pools" if not mine else "every backend is local"
    return Check(name, "ok", f"{key} = 0, not needed: {why}")


def _rp_filter(proc: Path) -> Check:
    conf = proc / "sys/net/ipv4/conf"
    try:
        names = sorted(p.name for p in conf.iterdir() if p.name not in ("all", "lo"))
    except OSError:
        return Check("rp_filter", "warn", f"cannot read {conf}")
    top = int(_read(conf / "all/rp_filter") or 0)
    strict = [n for n in names if max(top, int(_read(conf / n / "rp_filter") or 0)) == 1]
    if strict:
        named = ", ".join("default (new interfaces)" if n == "default" else n for n in strict)
        return Check(
            "rp_filter",
            "warn",
            f"strict (1) on {named}: asymmetric routes will be dropped; "
            "use 2 (loose) if replies can come back another way",
        )
    return Check("rp_filter", "ok", f"loose or off on every interface (all = {top})")


def _conntrack(proc: Path, pools: list[schema.Pool] | None) -> Check:
    base = proc / "sys/net/netfilter"
    count, top = _read(base / "nf_conntrack_count"), _read(base / "nf_conntrack_max")
    if count is None or top is None:
        return Check(
            "conntrack",
            "warn",
            "conntrack module not loaded (nf_conntrack loads with the first NAT "
            "rule); run doctor again after nftlb apply",
        )
    n, limit = int(count), int(top)
    if limit <= 0:
        return Check("conntrack", "ok", f"{n} entries, no limit (nf_conntrack_max = 0)")
    used = f"{n} of {limit} entries in use ({100 * n // limit}%)"
    raise_it = f"raise it with sysctl -w net.netfilter.nf_conntrack_max={max(2 * limit, 262144)}"
    if n >= 0.9 * limit:
        return Check("conntrack", "fail", f"{used}: new connections are dropped when it fills; {raise_it}")
    if n >= 0.75 * limit:
        return Check("conntrack", "warn", f"{used}: close to full; {raise_it}")
    if pools and limit < 65536:
        return Check("conntrack", "warn", f"{used}: nf_conntrack_max is small for a balancer; {raise_it}")
    return Check("conntrack", "ok", used)


def _ip(*argv: str) -> tuple[int, list] | None:
    """`ip -j ARGV`: (exit status, parsed output), None when unknown (no ip tool, no answer)."""
    try:
        out = exec_.run("ip", ["-j", *argv], timeout=10)
        return out.returncode, json.loads(out.stdout or "[]")
    except (KernelError, ValueError):
        return None


def _route(vip: Address) -> dict | None:
    """The kernel's route to vip (`ip -j route get`), {} when there is none, None when unknown."""
    got = _ip("route", "get", str(vip))
    if got is None:
        return None
    return (got[1] or [{}])[0] if got[0] == 0 else {}


def _rules() -> list[dict]:
    """Policy routing rules, IPv4 and IPv6 (`ip -j rule show`)."""
    out = []
    for family in ("-4", "-6"):
        got = _ip(family, "rule", "show")
        out += got[1] if got is not None and got[0] == 0 else []
    return out


def _vip(vip: Address, local: dict[Address, str]) -> tuple[Check, str]:
    """Where the VIP lives on this box: "local", "routed", "none" (no route) or "unknown"."""
    name = f"vip {vip}"
    route = None if vip in local else _route(vip)
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
        ms, mask = _read(proc / "sys/net/ipv4/icmp_ratelimit"), _read(proc / "sys/net/ipv4/icmp_ratemask")
        if mask is not None and mask.isdigit() and not int(mask) & (1 << 3):  # 3: destination unreachable
            return "not rate-limited (net.ipv4.icmp_ratemask leaves out unreachables)"
        if ms == "0":
            return "not rate-limited (net.ipv4.icmp_ratelimit = 0)"
        return f"rate-limited per client: a burst of 6, then one per {ms or '?'} ms (net.ipv4.icmp_ratelimit)"
    ms = _read(proc / "sys/net/ipv6/icmp/ratelimit")
    return (
        f"rate-limited per client: one per {ms or '?'} ms, less for a client behind a wider route "
        "(net.ipv6.icmp.ratelimit)"
    )


def _refusal(vip: Address, where: str, protocols: set[str], proc: Path) -> Check:
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


def _path_probes(config: schema.Config, local: dict[Address, str]) -> list[Check]:
    """Path probes leave from each path source: it must not be on a link of this box (backends
    there would look for it on the link, not route it back through the gateway), and no policy
    routing rule may catch the probes' socket mark."""
    out = []
    for source in config.path_sources():
        name = f"path_source {source}"
        route = _route(source)
        if source in local or (route or {}).get("type") == "local":
            out.append(
                Check(
                    name,
                    "fail",
                    f"{source} is an address of this box (dev {local.get(source) or route.get('dev')}): "
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
        for rule in _rules():
            if "fwmark" in rule:
                mark, mask = int(rule["fwmark"], 0), int(rule.get("fwmask", "0xffffffff"), 0)
                if planlib.PATH_PROBE_MARK & mask == mark:
                    caught.append(f"{rule['fwmark']}/{rule.get('fwmask', '0xffffffff')} -> table {rule.get('table')}")
        mark = f"{planlib.PATH_PROBE_MARK:#x}"
        out.append(
            Check("path_mark", "warn", f"policy routing rules catch the path probes' mark {mark}: {_examples(caught)}")
            if caught
            else Check("path_mark", "ok", f"no policy routing rule catches the path probes' mark {mark}")
        )
    return out


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _listeners(pools: list[schema.Pool], local_vips: set[Address]) -> list[Check]:
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


def run(config: schema.Config | None, nft: kernel.Kernel | None, *, proc: Path = Path("/proc")) -> list[Check]:
    """Every check, in a fixed order; `config` None skips the per-pool ones."""
    pools = None if config is None else config.pools
    local = _local_addresses()
    checks = [
        _kernel(nft),
        *_tools(),
        _forwarding(proc, 4, pools, local),
        _forwarding(proc, 6, pools, local),
        _rp_filter(proc),
        _conntrack(proc, pools),
    ]
    if pools:
        local_vips: set[Address] = set()
        for vip in dict.fromkeys(p.vip for p in pools):
            check, where = _vip(vip, local)
            checks += [check, _refusal(vip, where, {p.protocol for p in pools if p.vip == vip}, proc)]
            if where == "local":
                local_vips.add(vip)
        checks += _listeners(pools, local_vips)
        checks += _path_probes(config, local)
    return checks


def text(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{c.verdict:<5} {c.name:<{width}}  {c.detail}" for c in checks]
    counts = {v: sum(c.verdict == v for c in checks) for v in ("fail", "warn", "ok")}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    verdict = "traffic is blocked" if counts["fail"] else ("works, with warnings" if counts["warn"] else "ready")
    return "\n".join(lines + [f"doctor: {verdict} ({summary})"]) + "\n"


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.verdict == "fail" for c in checks) else 0
