"""`nftlb doctor [FILE]`: is this box able to balance, and what stands in the way?

Each check gives one line: ok, warn, or fail (something blocks traffic). Kernel features are
tested with a dry-run transaction (checked by the kernel, never committed); sysctls are read
under `proc`, so tests can point it at a fake tree. Here: the box (kernel, tools, sysctls);
the checks against a pools file are in nftlb.doctor_vips. Nothing here changes the system.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from nftlb import checks, doctor_vips, kernel, pools_file, schema
from nftlb.checks import Address, Check, Verdict
from nftlb.errors import ExitStatus, KernelError, NftlbError
from nftlb.kernel import programs

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
        out = programs.run("nft", ["--version"], timeout=10)
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
    missing: Verdict = "fail" if binary is None and bindings is None else "warn"
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
    value = checks.read(proc / rel)
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
            f"({checks.examples(remote)}) are dropped; {how}",
        )
    why = f"no IPv{version} pools" if not mine else "every backend is local"
    return Check(name, "ok", f"{key} = 0, not needed: {why}")


def _rp_filter(proc: Path) -> Check:
    conf = proc / "sys/net/ipv4/conf"
    try:
        names = sorted(p.name for p in conf.iterdir() if p.name not in ("all", "lo"))
    except OSError:
        return Check("rp_filter", "warn", f"cannot read {conf}")
    top = int(checks.read(conf / "all/rp_filter") or 0)
    strict = [n for n in names if max(top, int(checks.read(conf / n / "rp_filter") or 0)) == 1]
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
    count, top = checks.read(base / "nf_conntrack_count"), checks.read(base / "nf_conntrack_max")
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


def run(config: schema.Config | None, nft: kernel.Kernel | None, *, proc: Path = Path("/proc")) -> list[Check]:
    """Every check, in a fixed order; `config` None skips the per-pool ones."""
    pools = None if config is None else config.pools
    local = checks.local_addresses()
    found = [
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
            check, where = doctor_vips.vip(vip, local)
            found += [check, doctor_vips.refusal(vip, where, {p.protocol for p in pools if p.vip == vip}, proc)]
            if where == "local":
                local_vips.add(vip)
        found += doctor_vips.listeners(pools, local_vips)
        found += doctor_vips.path_probes(config, local) if config is not None else []
    return found


def exit_code(found: list[Check]) -> ExitStatus:
    return ExitStatus.CHECK_FAILED if any(c.verdict == "fail" for c in found) else ExitStatus.OK


def examine(file: Path | None, kernel_name: str | None) -> tuple[list[Check], ExitStatus]:
    """`nftlb doctor [FILE]`: every check (a bad FILE is exit 2 first), and the exit status."""
    config = pools_file.load(file) if file is not None else None
    try:
        nft = kernel.make(kernel_name)
    except NftlbError:
        nft = None  # the kernel check says why
    found = run(config, nft)
    return found, exit_code(found)
