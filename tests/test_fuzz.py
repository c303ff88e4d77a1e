"""Hardening against bad input, property-based (hypothesis).

1. Every broken pools file -- generated configs with one field broken, valid files mangled as
   text, random bytes, unicode junk, deep nesting, alias and merge-key bombs, unsafe tags, empty
   and oversized files -- makes every command that reads a pools file exit 2 with one
   `FILE:LINE: field: message` (or `FILE: message`) line per problem on stderr: no traceback, no
   "internal error", nothing sent to the (fake) kernel, no state dir created or changed.
2. Valid generated configs validate, render, and apply (to the fake kernel; the real one is
   integration/test_fuzz_kernel.py, which takes its configs from here).
3. Nothing from the file can inject nft syntax or unit-file lines: adversarial strings are
   refused by validation, and the render layer refuses them again when validation is bypassed.

The commands: validate, render, apply, apply --dry-run, diff, explain FILE POOL, systemd FILE,
doctor FILE and watch FILE --once. Each runs in-process through cli.main() with a Fake kernel,
as in test_cli.py. Hypothesis functions take no pytest fixtures: each example makes its own
temporary directory. The one known gap is an xfail below: `watch --once` takes its lock in the
state dir before it reads FILE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import typing
from pathlib import Path
from unittest import mock

import pytest
import typer
import typer.main
import yaml
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import nftlb.kernel as kernel_seam
from nftlb import cli, errors, plan, pools_file, render, schema, units, update, yamltree
from nftlb.errors import ConfigError
from nftlb.kernel.fake import Fake

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "rules" / "web.yaml"

# hypothesis keeps caches (constants, unicode tables) in ./.hypothesis: not in the source tree
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "nftlb-hypothesis"))

SCHEDULERS = typing.get_args(schema.Pool.model_fields["scheduler"].annotation)
MODES = typing.get_args(schema.Pool.model_fields["mode"].annotation)
PROTOCOLS = typing.get_args(schema.Pool.model_fields["protocol"].annotation)

def fuzz(examples: int) -> settings:
    """Modest example counts (the whole file runs in well under 40 s), no deadline (one example runs
    eight commands), and no example database written into the source tree."""
    # CI: the same examples every run (a red CI must be reproducible); elsewhere: new ones each run
    return settings(max_examples=examples, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- valid configs (also used by integration/test_fuzz_kernel.py) -------------------

V4_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "10.0.0.0/8")]
V6_NETS = [ipaddress.ip_network(n) for n in ("2001:db8::/32", "fd00::/8")]
# YAML 1.1 reads some of these as booleans or null unless quoted; nft reads some as keywords
ODD_POOL_NAMES = ["a", "z", "on", "off", "yes", "no", "y", "n", "true", "null", "nan", "inf", "tcp", "udp", "ip",
                  "ip6", "table", "flush", "delete", "map", "set", "chain", "counter", "accept", "drop", "a-",
                  "a_", "a--b", "a-_-9", "x" * 31, "rr", "hash4_tcp_53", "direct4_tcp"]
ODD_TABLE_NAMES = ["nftlb", "a", "lb", "x" * 31, "nftlb_test", "lb_tcp", "ipv4", "ipv6", "nat", "filter", "t0", "a_"]


def addresses(version: int) -> st.SearchStrategy[str]:
    nets = V4_NETS if version == 4 else V6_NETS
    return st.sampled_from(nets).flatmap(
        lambda n: st.integers(1, min(n.num_addresses - 2, 2**64)).map(lambda i: str(n[i])))


pool_names = st.sampled_from(ODD_POOL_NAMES) | st.from_regex(r"[a-z][a-z0-9_-]{0,30}", fullmatch=True)
table_names = st.sampled_from(ODD_TABLE_NAMES) | st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True).filter(
    lambda n: n not in schema.NFT_KEYWORDS)
PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 53, 97, 251, 509, 1021, 4099]
DURATIONS = st.sampled_from(["1s", "2s", "5s", "1m", 3, 2.5])  # every one at least every timeout below
TIMEOUTS = st.sampled_from(["100ms", "500ms", "1s", 1, 0.25])


@st.composite
def backend_entries(draw, version: int, pool_port: int, n: int, small: bool = False) -> list:
    endpoints = draw(st.lists(st.tuples(addresses(version), st.one_of(st.none(), st.integers(1, 65535))),
                              min_size=n, max_size=n, unique_by=lambda e: (e[0], e[1] or pool_port)))
    out = []
    for address, port in endpoints:
        if draw(st.booleans()):  # the short forms
            shown = f"[{address}]" if version == 6 else address
            out.append(address if port is None else f"{shown}:{port}")
            continue
        entry: dict = {"address": address}
        if port is not None:
            entry["port"] = port
        weight = draw(st.one_of(st.none(), st.integers(1, 10), st.sampled_from([1000, 999, 500] if not small else [7])))
        if weight is not None:
            entry["weight"] = weight
        if draw(st.integers(0, 4)) == 0:
            entry["state"] = draw(st.sampled_from(["drain", "active"]))
        if draw(st.integers(0, 4)) == 0:
            entry["backup"] = draw(st.booleans())
        out.append(entry)
    return out


@st.composite
def pool_configs(draw, name: str, version: int | None = None, small: bool = False) -> dict:
    version = version or draw(st.sampled_from([4, 6]))
    port = draw(st.integers(1, 65535))
    n = draw(st.integers(1, 5))
    pool: dict = {"name": name, "vip": draw(addresses(version)), "port": port}
    if draw(st.booleans()):
        pool["protocol"] = draw(st.sampled_from(PROTOCOLS))
    if draw(st.booleans()):
        pool["scheduler"] = draw(st.sampled_from(SCHEDULERS))
    if draw(st.booleans()):
        pool["mode"] = draw(st.sampled_from(MODES))
    pool["backends"] = draw(backend_entries(version, port, n, small))
    if draw(st.integers(0, 3)) == 0:
        pool["table_size"] = draw(st.sampled_from([p for p in PRIMES if p >= n and (p <= 251 or not small)]))
    if version == 4 and draw(st.integers(0, 3)) == 0:  # persistence: IPv4 only
        pool["persistence"] = draw(st.sampled_from(["30s", "5m", "1h", "7d", 90, "off"]))
    health = draw(st.sampled_from(["none", "off", "false", "override"]))
    if health == "off":
        pool["health"] = "off"
    elif health == "false":
        pool["health"] = False
    elif health == "override":
        pool["health"] = draw(st.fixed_dictionaries({}, optional={
            "port": st.integers(1, 65535), "interval": DURATIONS, "timeout": TIMEOUTS,
            "rise": st.integers(1, 100), "fall": st.integers(1, 100)}))
    if draw(st.booleans()):
        pool["on_down"] = draw(st.sampled_from(["keep", "reset"]))
    if draw(st.booleans()):
        pool["when_all_down"] = draw(st.sampled_from(["reject", "keep-last"]))
    return pool


@st.composite
def valid_configs(draw, max_pools: int = 4, small: bool = False) -> dict:
    """A valid pools file as plain data: the kernel must accept whatever it renders. `small`
    keeps slot tables small (the fake kernel's element lists are slow beyond a few thousand)."""
    names = draw(st.lists(pool_names, min_size=1, max_size=max_pools, unique=True))
    pools, services = [], set()
    for name in names:
        pool = draw(pool_configs(name, small=small))
        service = (ipaddress.ip_address(pool["vip"]), pool["port"], pool.get("protocol", "tcp"))
        if service not in services:  # one pool per vip/port/protocol
            services.add(service)
            pools.append(pool)
    config: dict = {"table": draw(table_names)}
    seed = draw(st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
    if seed is not None:
        config["seed"] = hex(seed) if draw(st.booleans()) else seed
    if draw(st.booleans()):
        config["health"] = draw(st.fixed_dictionaries({"interval": DURATIONS, "timeout": TIMEOUTS}, optional={
            "rise": st.integers(1, 100), "fall": st.integers(1, 100)}))
    config["pools"] = pools
    return config


def dump(draw, config) -> str:
    """The config as YAML (block, flow or mixed style) or as JSON."""
    style = draw(st.sampled_from(["block", "flow", "mixed", "json"]))
    if style == "json":
        return json.dumps(config, indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=draw(st.booleans()),
                          default_flow_style={"block": False, "flow": True, "mixed": None}[style])


@st.composite
def valid_files(draw, max_pools: int = 4, small: bool = False) -> tuple[dict, str]:
    config = draw(valid_configs(max_pools, small))
    return config, dump(draw, config)


# -- running the commands -------------------------------------------------------------


def commands(file: Path, state_dir: Path) -> list[list[str]]:
    """Every command that reads a pools file (watch --once last: see the xfail below)."""
    f, s = str(file), str(state_dir)
    return [["validate", f], ["render", f], ["apply", f, "--state-dir", s], ["apply", "--dry-run", f, "--state-dir", s],
            ["diff", f, "--state-dir", s], ["explain", f, "web", "--state-dir", s], ["systemd", f, "--state-dir", s],
            ["doctor", f], ["watch", f, "--once", "--state-dir", s]]


class _App:
    """cli.app with its click command built once: Typer rebuilds it on every call, which is 17 of
    the 21 ms a command takes here. The same command tree runs, under the same cli.main()."""

    app = cli.app
    command = None

    def __call__(self, *args, **kwargs):
        if _App.command is None:
            _App.command = typer.main.get_command(_App.app)
        return _App.command(*args, **kwargs)


def run(argv: list, kernel: Fake, state_dir: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(kernel_seam, "make", lambda name=None: kernel), mock.patch.object(cli, "app", _App()), \
            mock.patch.dict(os.environ, {"NFTLB_STATE_DIR": str(state_dir)}), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def snapshot(directory: Path) -> dict | None:
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def check_report(err: str, file: Path, n_lines: int) -> None:
    """stderr: one problem per line, each `FILE:LINE: field: message` or `FILE: message`."""
    lines = err.splitlines()
    assert lines, "exit 2 without a message"
    pattern = re.compile(rf"{re.escape(str(file))}:(?:(\d+): \S[^\n]*?: \S.*| \S.*)")
    for line in lines:
        m = pattern.fullmatch(line)
        assert m, f"not FILE:LINE: field: message: {line!r}"
        if m[1] is not None:
            assert 1 <= int(m[1]) <= n_lines + 1, line


def assert_refused(data: bytes, *, existing_state: bool = False) -> str:
    """Every file-reading command exits 2 on `data`, says why, and touches nothing."""
    with tempfile.TemporaryDirectory(prefix="nftlb-fuzz-") as tmp:
        file, state_dir = Path(tmp) / "pools.yaml", Path(tmp) / "state"
        kernel = Fake()
        if existing_state:  # something applied before: the bad file must leave it all as it was
            assert run(["apply", WEB, "--state-dir", state_dir], kernel, state_dir)[0] == 0
        before_state, before_tables, before_scripts = snapshot(state_dir), json.dumps(kernel.tables), len(kernel.scripts)
        file.write_bytes(data)
        text = data.decode("utf-8", "replace")  # YAML also breaks lines at \r, U+0085, U+2028, U+2029
        n_lines = sum(text.count(c) for c in "\n\r\x85\u2028\u2029") + 1
        first_err = ""
        for argv in commands(file, state_dir):
            code, out, err = run(argv, kernel, state_dir)
            assert code == 2, (argv, code, out[:300], err[:600])
            assert "Traceback" not in out + err and "internal error" not in err, err[:600]
            assert out == "", out[:300]
            check_report(err, file, n_lines)
            first_err = first_err or err
            assert len(kernel.scripts) == before_scripts, f"{argv[0]} sent a script to the kernel"
            if argv[0] != "watch":  # watch takes its lock first: test_watch_once_bad_file_state_dir
                assert snapshot(state_dir) == before_state, f"{argv[0]} changed the state dir"
        assert json.dumps(kernel.tables) == before_tables and kernel.commits == (1 if existing_state else 0)
        return first_err


# -- 1a. one field broken ----------------------------------------------------------------

INJECTION = ['a"; flush ruleset; "', "a\nflush ruleset", "a}", "a{", "a#", "a;b", "a\\b", 'a"b', "a'b", "a$b",
             "a`id`", "a b", "a\tb", "a\rb", "$(reboot)", "a\x00b", "a\x1b[31m", "\u202eweb", "w\u200beb", "web\U0001F600",
             "wéb", "ｗｅｂ", "web\n", " web", "a" * 32, "a" * 100_000, "", "-a", "_a", "1a", "Web", "WEB"]
BAD_ADDRESSES = ["198.51.100.300", "", "example.com", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "127.0.0.1", "::1",
                 "fe80::1", "169.254.1.1", "::ffff:10.0.0.1", "255.255.255.255", "2001:db8::1%eth0",
                 "2001:db8::1%x;flush ruleset", "fd00::1%}\ntable inet evil {", "10.0.0.1/24", "10.0.0.1:80:80",
                 "١٩٨.51.100.1", "１０.0.0.1", "10.0.0.1\x00", "10.0.0.1; flush ruleset", 167772161, 1.5, True,
                 None, [], {}, ["10.0.0.1"]]
BAD_PORTS = [0, -1, 65536, 2**16 + 80, 2**64, 10**30, -(2**63), "80", "８０", 80.0, 80.5, True, None, [], {},
             float("nan"), float("inf"), "80; flush ruleset"]
BAD_FIELDS: dict[str, list] = {
    "name": INJECTION + [5, 5.0, True, False, None, [], {}, ["a"]],
    "vip": BAD_ADDRESSES,
    "port": BAD_PORTS,
    "protocol": ["sctp", "TCP", "", 6, None, ["tcp"], "tcp; flush ruleset", "tcp\n"],
    "scheduler": ["fastest", "", None, 1, "hash\n", "Hash"],
    "mode": ["snat", "", None, "dnat; flush ruleset"],
    "backends": [[], None, "10.0.0.1", {}, 5, [None], [[]], [{}]],
    "health": ["on", 5, [], {"interval": "50ms"}, {"rise": 0}, {"fall": 101}, {"port": 0}, {"port": 70000},
               {"bogus": 1}, {"interval": "2 weeks"}, {"timeout": "1h"}, {"interval": "٥s"}, {"interval": -1}],
    "on_down": ["explode", True, 1, ""],
    "when_all_down": ["panic", None, True, ""],
    "table_size": [0, 1, 4, 6, 9, 65539, 10**30, -7, "251", 251.0, True],
    "persistence": ["5 min", -1, 0.5, "1.5s", "8d", 10**30, [], {}, "forever", "٥m", float("nan")],
    "bogus": [1, "x", None],
}
BAD_BACKEND_FIELDS: dict[str, list] = {
    "address": BAD_ADDRESSES,
    "port": BAD_PORTS,
    "weight": [0, -1, 1001, 10**30, 2**64, "1", 1.5, True, None],
    "state": ["up", "", None, "Drain", 1],
    "backup": ["yes", "true", 1, None, []],
    "bogus": [1],
}
BAD_SHORT_BACKENDS = ["10.0.0.1:x", "10.0.0.1:-1", "10.0.0.1:99999999999", "10.0.0.1:" + "9" * 5000,
                      "10.0.0.1:80:90", "10.0.0.1:", "10.0.0.1:８０", "10.0.0.1:٨٠", "[10.0.0.1", "[]:80", ":80",
                      "10.0.0.1 80", "10.0.0.1:80; flush ruleset", "[2001:db8::1%x]:80", "[2001:db8::1]:80}"]
BAD_TOP: dict[str, list] = {
    "table": ["", "Nftlb", "1a", "a-b", "a" * 32, "tcp", "flush", "table", "ip", "x; flush ruleset", "x\ny", 'x"',
              5, None, [], True, "nftlb "],
    "seed": [-1, 2**32, 2**64, "0xZZ", "1e3", 1.5, True, "0x" + "f" * 5000, "9" * 5000, [], None, "-0x1"],
    "health": [[], "off", {"interval": "0s"}, {"timeout": "2s", "interval": "1s"}, {"rise": 101}, {"x": 1}],
    "pools": [None, {}, "x", 5, [None], [5], [[]], ["web"]],
    "bogus": [1],
}


@st.composite
def broken_configs(draw) -> tuple[str, object]:
    """(what was broken, the config as data), broken in exactly one way that validation must catch."""
    config = draw(valid_configs(max_pools=3, small=True))
    pools = config["pools"]
    where = draw(st.sampled_from(["top", "pool", "pool", "backend", "short", "family", "missing", "twice",
                                  "persistence6", "not a mapping"]))
    i = draw(st.integers(0, len(pools) - 1))
    pool = pools[i]
    if where == "top":
        key = draw(st.sampled_from(sorted(BAD_TOP)))
        config[key] = draw(st.sampled_from(BAD_TOP[key]))
        return f"{key}: {config[key]!r:.60}", config
    if where == "pool":
        key = draw(st.sampled_from(sorted(BAD_FIELDS)))
        values = BAD_FIELDS[key] + ([draw(st.text(max_size=40).filter(lambda s: not schema.POOL_NAME.fullmatch(s)))]
                                    if key == "name" else [])
        pool[key] = draw(st.sampled_from(values))
        return f"pools[{i}].{key}: {pool[key]!r:.60}", config
    j = draw(st.integers(0, len(pool["backends"]) - 1))
    version = ipaddress.ip_address(pool["vip"]).version
    if where == "backend":
        entry = pool["backends"][j]
        if isinstance(entry, str):
            entry = pool["backends"][j] = {"address": schema._parse_short(entry)["address"].strip("[]")}
        key = draw(st.sampled_from(sorted(BAD_BACKEND_FIELDS)))
        entry[key] = draw(st.sampled_from(BAD_BACKEND_FIELDS[key]))
        return f"pools[{i}].backends[{j}].{key}: {entry[key]!r:.60}", config
    if where == "short":
        pool["backends"][j] = draw(st.sampled_from(BAD_SHORT_BACKENDS))
        return f"pools[{i}].backends[{j}]: {pool['backends'][j]!r:.60}", config
    if where == "family":  # a backend of the other address family
        pool["backends"][j] = draw(addresses(10 - version))
        return f"pools[{i}].backends[{j}]: IPv{10 - version}", config
    if where == "missing":
        whose = draw(st.sampled_from(["top", "pool"]))
        if whose == "top":
            del config["pools"]
            return "pools missing", config
        key = draw(st.sampled_from(["name", "vip", "port", "backends"]))
        del pool[key]
        return f"pools[{i}].{key} missing", config
    if where == "twice":  # the same name, service or backend twice
        what = draw(st.sampled_from(["name", "service", "backend"]))
        twin = json.loads(json.dumps(pool))
        if what == "backend":
            pool["backends"].append(pool["backends"][j])
        else:
            twin["vip" if what == "name" else "name"] = (
                draw(addresses(version)) if what == "name" else pool["name"] + "x" if len(pool["name"]) < 31 else "b")
            if what == "name" and twin["vip"] == pool["vip"]:
                assume(False)
            pools.append(twin)
        return f"{what} twice", config
    if where == "persistence6":
        if version == 4:
            pool["persistence"] = draw(st.sampled_from(["10m", 45, "1.5s", -3]))
            if pool["persistence"] in ("10m", 45):  # valid on IPv4: put it on an IPv6 pool instead
                pool["vip"] = draw(addresses(6))
                pool["backends"] = [draw(addresses(6))]
        else:
            pool["persistence"] = "10m"
        return f"pools[{i}].persistence on IPv{ipaddress.ip_address(pool['vip']).version}", config
    target = draw(st.sampled_from(["config", "pool", "backend"]))
    junk = draw(st.sampled_from([[1, 2], "pools", 5, None, True, 1.5]))
    if target == "config":
        return f"file is {junk!r}", junk
    if target == "pool":
        pools[i] = junk
        return f"pools[{i}] is {junk!r}", config
    pool["backends"][j] = draw(st.sampled_from([[1, 2], 5, None, True, 1.5, {}]))
    return f"pools[{i}].backends[{j}] is not a backend", config


@fuzz(150)
@given(st.data())
def test_a_broken_field_is_refused_by_every_command(data):
    what, config = data.draw(broken_configs())
    text = dump(data.draw, config)
    err = assert_refused(text.encode("utf-8", "surrogatepass"))
    assert err, what


# -- 1b. valid files mangled as text, and junk -----------------------------------------

BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xc0\xaf",
             b"\x80", b"\xf4\x90\x80\x80"]
YAML_FORBIDDEN = ["\x00", "\x01", "\x07", "\x1b", "\x7f", "\ufffe", "\uffff", "\x08"]
TAGS = ["!!python/object:os.system", "!!python/object/apply:os.system", "!!python/name:os.system",
        "!!python/module:os", "!!python/object/new:type", "!!binary", "!!set", "!!omap", "!!pairs", "!foo",
        "!<tag:example.com,2000:x>", "!!seq", "!!map", "!!int", "!!float", "!!bool", "!!timestamp", "!!null"]
UNICODE_ESCAPES = ["\\ud800", "\\udfff", "\\ud83d", "\\U00110000", "\\x00", "\\0", "\\u202e", "\\U0001F600",
                   "\\e", "\\N", "\\_", "\\L", "\\P", "\\uffff"]


def still_valid(data: bytes) -> bool:
    try:
        pools_file.parse(data.decode("utf-8"), "f")
    except (ConfigError, UnicodeDecodeError):
        return False
    return True


@st.composite
def mangled_texts(draw) -> tuple[str, bytes]:
    config = draw(valid_configs(max_pools=2, small=True))
    config["table"] = config.get("table", "nftlb")  # always there: "duplicate" needs a key to repeat
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    raw = text.encode()
    how = draw(st.sampled_from(["invalid utf-8", "forbidden char", "tag", "escape", "duplicate", "truncate",
                                "bom", "junk", "deep", "anchor"]))
    at = draw(st.integers(0, len(raw)))
    if how == "invalid utf-8":
        return how, raw[:at] + draw(st.sampled_from(BAD_BYTES)) + raw[at:]
    if how == "forbidden char":
        return how, raw[:at] + draw(st.sampled_from(YAML_FORBIDDEN)).encode() + raw[at:]
    if how == "tag":  # on the pools list, or on a scalar (a vip)
        spot = draw(st.sampled_from(["pools:", "  vip:"]))
        tag = draw(st.sampled_from([t for t in TAGS if not (spot == "pools:" and t == "!!seq")]))
        return how, text.replace(spot, f"{spot} {tag}", 1).encode()
    if how == "escape":  # a double-quoted scalar with an escape: in a name, or an address
        field = draw(st.sampled_from(["name", "vip"]))
        escape = draw(st.sampled_from(UNICODE_ESCAPES))
        return how, re.sub(rf"(\n\s*-?\s*{field}: )(\S+)", lambda m: f'{m[1]}"{m[2]}{escape}"', text, count=1).encode()
    if how == "duplicate":  # a top-level key, or a pool's port, given twice
        if draw(st.booleans()):
            return how, (text + draw(st.sampled_from(["table: lb\n", "pools: []\n"]))).encode()
        return how, text.replace("  vip:", "  port: 1\n  vip:", 1).encode()
    if how in ("truncate", "bom", "junk"):
        if how == "truncate":
            data = raw[:at]
        elif how == "bom":  # UTF-16's byte order mark, or UTF-8's where YAML does not take it
            data = b"\xfe\xff" + raw if draw(st.booleans()) else raw[:at] + "\ufeff".encode() + raw[at:]
        else:
            data = raw[:at] + draw(st.binary(min_size=1, max_size=64)) + raw[at:] if draw(st.booleans()) \
                else draw(st.binary(max_size=256))
        assume(not still_valid(data))  # cut between two pools, or junk in a comment: a valid file
        return how, data
    if how == "deep":
        n = draw(st.sampled_from([yamltree.MAX_DEPTH, yamltree.MAX_DEPTH + 1, 1000, 10_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return how, text.replace("pools:", f"x_deep: {opener * n}{closer * n}\npools:", 1).encode()
    # an alias to nothing, or an anchor given twice
    return how, (text + "x: *nowhere\n").encode() if draw(st.booleans()) else \
        text.replace("pools:", "a: &dup 1\nb: &dup 2\npools:", 1).encode()


@fuzz(120)
@given(mangled_texts())
def test_a_mangled_file_is_refused_by_every_command(case):
    how, data = case
    assert_refused(data)


@fuzz(80)
@given(st.one_of(
    st.binary(max_size=512),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200).map(lambda s: ("pools:\n" + s).encode()),
    st.text(alphabet="[]{}:,-&*!|>'\"#%@` \n\tpoolsvip0123456789.", max_size=200).map(str.encode),
))
@example(b"")
@example(b"   \n\t\n")
@example(b"\xff\xfe\x00\x00")
@example(b"pools: [\x00]")
def test_junk_is_refused_by_every_command(data):
    assume(not still_valid(data))  # "pools:\n []" is junk too, and valid
    assert_refused(data)


# -- 1c. the explicit nasty files ---------------------------------------------------------

def _laughs(levels: int = 9) -> str:
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels + 1]):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    return text + f"pools: *{names[levels]}\n"


def _merge_bomb(levels: int = 40) -> str:
    text = "m0: &m0 {k0: 1, k1: 2}\n"
    for i in range(1, levels):
        text += f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}\n"
    return text + "pools: []\n"


NASTY = {
    "empty": (b"", "file is empty"),
    "whitespace": (b"   \n\t\n  \n", "file is empty"),
    "comment only": (b"# nothing here\n", "file is empty"),
    "document markers": (b"---\n...\n", "file is empty"),
    "null": (b"~\n", "file is empty"),
    "bom only": (b"\xef\xbb\xbf", "file is empty"),
    "a list": (b"- 1\n- 2\n", "file is a list"),
    "a string": (b"pools\n", "file is a str"),
    "two documents": (b"pools: []\n---\npools: []\n", "expected a single document"),
    "not utf-8": (b"pools: []\n# caf\xe9\n", ":2: file: not UTF-8 text"),
    "utf-16": ("pools: []\n".encode("utf-16"), "not UTF-8"),
    "nul": (b"pools: []\x00\n", "is not allowed in YAML"),
    "lone surrogate escape": (b'pools:\n  - {name: "\\ud800", vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}\n',
                              "invalid Unicode character escape"),
    "lone surrogate bytes": (b'pools:\n  - {name: "\xed\xa0\x80"}\n', "not UTF-8"),
    "rtl name": ('pools:\n  - {name: "\u202eweb", vip: 198.51.100.1, port: 80, backends: [10.0.0.1]}\n'.encode(),
                 "is not a pool name"),
    "emoji address": ('pools:\n  - {name: web, vip: "198.51.100.1\U0001F600", port: 80, backends: [10.0.0.1]}\n'
                      .encode(), "is not an IPv4 or IPv6 address"),
    "duplicate keys": (b"pools: []\npools: []\n", ":2: pools: duplicate key (first given on line 1)"),
    "duplicate pool keys": (b"pools:\n  - name: a\n    name: b\n", "duplicate key"),
    "port 2**64": (b"pools:\n  - {name: web, vip: 198.51.100.1, port: 18446744073709551616, backends: [10.0.0.1]}\n",
                   "less than or equal to 65535"),
    "weight 10**30": (b"pools:\n  - {name: web, vip: 198.51.100.1, port: 80, backends: [{address: 10.0.0.1, "
                      b"weight: 1000000000000000000000000000000}]}\n", "less than or equal to 1000"),
    "negative weight": (b"pools:\n  - {name: web, vip: 198.51.100.1, port: 80, backends: "
                        b"[{address: 10.0.0.1, weight: -1}]}\n", "greater than or equal to 1"),
    "5000-digit port": (b"pools:\n  - {name: web, vip: 198.51.100.1, port: " + b"9" * 5000 + b", backends: [10.0.0.1]}\n",
                        "(too many digits)"),
    "5000-digit seed": (b"seed: " + b"9" * 5000 + b"\npools: []\n", "(too many digits)"),
    "huge hex seed": (b"seed: 0x" + b"f" * 5000 + b"\npools: []\n", "less than or equal to 4294967295"),
    "sexagesimal seed": (b"seed: " + b"59:" * 3000 + b"59\npools: []\n", "less than or equal to 4294967295"),
    "zone index injection": (b'pools:\n  - {name: web, vip: "2001:db8::1%x;flush ruleset", port: 80, '
                             b'backends: ["2001:db8::2"]}\n', "has a zone index"),
    "zone index newline": (b'pools:\n  - {name: web, vip: "2001:db8::1", port: 80, '
                           b'backends: ["[2001:db8::2%x }\\n}\\ntable inet evil {]:80"]}\n', "has a zone index"),
    "fullwidth port": ('pools:\n  - {name: web, vip: 198.51.100.1, port: 80, backends: ["10.0.0.1:８０"]}\n'.encode(),
                       "is not a number"),
    "keyword table": (b"table: flush\npools: []\n", "is an nftables keyword"),
    "python object": (b"pools: !!python/object/apply:os.system ['touch /tmp/nftlb-fuzz-pwned']\n",
                      "unsupported YAML tag"),
    "python name": (b"pools: !!python/name:os.system\n", "unsupported YAML tag"),
    "set tag": (b"pools: !!set {a, b}\n", "unsupported YAML tag"),
    "seq tag on a scalar": (b"pools: !!seq abc\n", "unsupported YAML tag"),
    "bool tag": (b"pools: !!bool maybe\n", "cannot read 'maybe' as a bool"),
    "timestamp tag": (b"pools: !!timestamp nope\n", "cannot read 'nope' as a timestamp"),
    "undefined alias": (b"pools: *nothing\n", "found undefined alias"),
    "10,000 nested lists": (b"pools: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "nested more than 64 deep"),
    "10,000 nested maps": (b"pools: " + b"{a: " * 10_000 + b"1" + b"}" * 10_000 + b"\n", "nested more than 64 deep"),
    "10,000 nested block lists": (b"- " * 10_000 + b"x\n", "nested more than 64 deep"),
    "1,000 indented block maps": ("".join(" " * i + "a:\n" for i in range(1000)).encode(), "nested more than 64 deep"),
    "a million nested lists": (b"[" * 1_000_000 + b"]" * 1_000_000, "nested more than 64 deep"),  # libyaml: SIGSEGV
    "alias inside itself": (b"pools: &a [*a]\n", "nested more than 64 deep"),
    "merge of itself": (b"a: &a {<<: *a}\npools: []\n", "nested more than 64 deep"),
    "billion laughs": (_laughs().encode(), f"more than {yamltree.MAX_NODES} YAML nodes"),
    "merge-key bomb": (_merge_bomb().encode(), f"more than {yamltree.MAX_NODES} YAML nodes"),
    "deep json": (b'{"pools": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 64 deep"),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_file_is_refused_by_every_command(name):
    data, message = NASTY[name]
    err = assert_refused(data)
    assert message in err, err[:500]
    assert not os.path.exists("/tmp/nftlb-fuzz-pwned")


def test_limits_are_exact():
    """MAX_DEPTH lists nest; one more does not."""
    fits = "x: " + "[" * (yamltree.MAX_DEPTH - 1) + "]" * (yamltree.MAX_DEPTH - 1) + "\npools: []\n"
    with pytest.raises(ConfigError) as e:
        pools_file.parse(fits, "f")
    assert [p.message for p in e.value.problems] == ["unknown key"]
    with pytest.raises(ConfigError, match="nested more than 64 deep"):
        pools_file.parse("x: " + "[" * yamltree.MAX_DEPTH + "]" * yamltree.MAX_DEPTH + "\npools: []\n", "f")


def test_a_50_megabyte_file_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.write(b"pools:\n")
        f.write((b"# " + b"x" * 1021 + b"\n") * (50 * 1024))
    size = big.stat().st_size
    assert size > 50 * 2**20 > pools_file.MAX_FILE_BYTES
    kernel, state_dir = Fake(), tmp_path / "state"
    for argv in commands(big, state_dir):
        code, out, err = run(argv, kernel, state_dir)
        assert code == 2 and out == ""
        assert err == f"{big}: {size} bytes, larger than the limit of {pools_file.MAX_FILE_BYTES} bytes (32 MiB)\n"
        if argv[0] != "watch":
            assert not state_dir.exists()
    assert kernel.scripts == []


def test_a_device_that_never_ends_is_refused(tmp_path):
    code, out, err = run(["validate", "/dev/zero"], Fake(), tmp_path / "state")
    assert code == 2 and err == f"/dev/zero: more bytes, larger than the limit of {pools_file.MAX_FILE_BYTES} bytes (32 MiB)\n"


@pytest.mark.parametrize("name", ["duplicate keys", "billion laughs", "not utf-8", "10,000 nested lists", "python object"])
def test_bad_file_leaves_an_applied_state_and_table_alone(name):
    assert_refused(NASTY[name][0], existing_state=True)


def test_watch_once_with_a_bad_file_leaves_no_state_dir(tmp_path):
    bad, state_dir = tmp_path / "pools.yaml", tmp_path / "state"
    bad.write_text("pools: [\n")
    code, _, _ = run(["watch", bad, "--once", "--state-dir", state_dir], Fake(), state_dir)
    assert code == 2
    assert not state_dir.exists()


# -- 2. valid configs go through ---------------------------------------------------------

NFT_TEXT = re.compile(r"[\x20-\x7e\t\n]*")


def check_ruleset(text: str, config: dict) -> None:
    """Only printable ASCII; every quote is a comment holding a pool name; `;` only after policies."""
    assert NFT_TEXT.fullmatch(text)
    names = {p["name"] for p in config["pools"]}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        quoted = re.findall(r'"([^"]*)"', line)
        assert line.count('"') == 2 * len(quoted) and all(q in names for q in quoted), line
        assert all(f'comment "{q}"' in line for q in quoted), line
        assert ";" not in line.replace("policy accept;", "").replace("priority filter;", "").replace(
            "priority dstnat;", "").replace("priority srcnat;", "").replace("priority -100;", ""), line


@fuzz(40)
@given(valid_files(small=True))
def test_valid_configs_validate_render_and_apply(case):
    config, text = case
    parsed = pools_file.parse(text, "pools.yaml")
    assert [p.name for p in parsed.pools] == [p["name"] for p in config["pools"]]
    script = render.ruleset(plan.build(parsed))
    check_ruleset(script, config)
    with tempfile.TemporaryDirectory(prefix="nftlb-fuzz-") as tmp:
        file, state_dir = Path(tmp) / "pools.yaml", Path(tmp) / "state"
        file.write_text(text)
        kernel = Fake()
        code, out, err = run(["render", file], kernel, state_dir)
        assert (code, err) == (0, "") and out == script
        assert run(["apply", file, "--state-dir", state_dir], kernel, state_dir)[0] == 0
        assert list(kernel.tables) == [parsed.table]
        code, out, _ = run(["apply", file, "--state-dir", state_dir], kernel, state_dir)
        assert code == 0 and "in sync" in out


# -- 3. no injection: validation refuses, render refuses again ---------------------------

ADVERSARIAL = st.one_of(
    st.sampled_from(INJECTION),
    st.text(alphabet='"};{#\\\n\r\t $`\'%!&|<>()[]*?~=+,.:/@^\x00\x0b\x0c\x1b\u2028\u202eabcz09_-', min_size=1,
            max_size=40),
    st.text(min_size=1, max_size=40),
)


@fuzz(100)
@given(st.sampled_from(["pool name", "table", "protocol", "scheduler", "mode", "vip", "backend", "backend address",
                        "seed", "health port", "persistence", "on_down"]), ADVERSARIAL)
def test_adversarial_strings_are_refused_by_validation(field, value):
    base = {"table": "nftlb", "pools": [{"name": "web", "vip": "198.51.100.1", "port": 80,
                                         "backends": ["10.0.0.1", {"address": "10.0.0.2"}]}]}
    pool = base["pools"][0]
    target = {"pool name": (pool, "name"), "table": (base, "table"), "protocol": (pool, "protocol"),
              "scheduler": (pool, "scheduler"), "mode": (pool, "mode"), "vip": (pool, "vip"),
              "backend": (pool["backends"], 0), "backend address": (pool["backends"][1], "address"),
              "seed": (base, "seed"), "persistence": (pool, "persistence"), "on_down": (pool, "on_down")}
    if field == "health port":
        pool["health"] = {"port": value}
    else:
        container, key = target[field]
        container[key] = value
    text = yaml.safe_dump(base, allow_unicode=True)
    data = text.encode("utf-8", "surrogatepass")
    if still_valid(data):  # "5" is a fine persistence, "0x5eed" a seed: what passes must be harmless
        assert re.fullmatch(r"[A-Za-z0-9_.:+\[\] \t\r\n-]*", value), f"{field}: accepted {value!r}"
        return
    assert_refused(data)


def _plan() -> plan.Plan:
    return plan.build(pools_file.parse("""
pools:
  - {name: web, vip: 198.51.100.10, port: 80, persistence: 5m, mode: masquerade, backends: [10.0.0.1, 10.0.0.2]}
  - {name: rr, vip: 198.51.100.10, port: 81, scheduler: round-robin, backends: [10.0.0.1, 10.0.0.2]}
  - {name: six, vip: "2001:db8::1", port: 53, protocol: udp, backends: ["fd00::1"]}
  - {name: down, vip: 198.51.100.11, port: 80, backends: [{address: 10.0.0.3, state: drain}]}
"""))


EVIL = 'a"; flush ruleset; "'
SCOPED = ipaddress.IPv6Address("2001:db8::1%x;flush ruleset")


def _endpoint(address, port) -> plan.Endpoint:
    """An Endpoint holding what its constructor would not take (it spells itself from an ipaddress)."""
    e = plan.Endpoint(ipaddress.IPv4Address("10.0.0.1"), 80)
    for name, value in (("address", address), ("port", port), ("nft", f"{address} . {port}"),
                        ("display", f"{address}:{port}")):
        object.__setattr__(e, name, value)
    return e


def _bypass(plan: plan.Plan, what: str) -> plan.Plan:
    """`plan` with one value that validation would have refused, as if it had been bypassed."""
    pools = list(plan.pools)
    if what == "table":
        return dataclasses.replace(plan, table=EVIL)
    if what == "keyword table":
        return dataclasses.replace(plan, table="flush")
    if what == "seed":
        return dataclasses.replace(plan, seed="1 ; flush ruleset")
    if what == "bool seed":
        return dataclasses.replace(plan, seed=True)
    change = {
        "pool name": (0, {"name": EVIL}),
        "round-robin name (chain)": (1, {"name": "rr\nflush ruleset"}),
        "refused pool name (comment)": (3, {"name": 'down" ; flush ruleset ; "'}),
        "protocol": (0, {"protocol": "tcp; flush ruleset"}),
        "family": (0, {"family": "ip; flush ruleset"}),
        "scheduler": (0, {"scheduler": "hash }"}),
        "mode": (0, {"mode": "masquerade\n"}),
        "persistence": (0, {"persistence": "300; flush ruleset"}),
        "persistence bool": (0, {"persistence": True}),
        "vip as text": (0, {"vip": "198.51.100.10 ; flush ruleset"}),
        "vip with zone index": (2, {"vip": SCOPED}),
        "vip of the other family": (2, {"vip": ipaddress.IPv4Address("198.51.100.1")}),
        "port as text": (0, {"port": "80; flush ruleset"}),
        "port out of range": (0, {"port": 70000}),
        "slot with a text address": (0, {"slots": (_endpoint("10.0.0.1 }", 80),) * 2}),
        "slot with a zone index": (2, {"slots": (_endpoint(SCOPED, 53),)}),
        "backend port as text": (1, {"backends": (_endpoint(ipaddress.IPv4Address("10.0.0.1"), "8;0"),)}),
    }
    i, fields = change[what]
    pools[i] = dataclasses.replace(pools[i], **fields)
    return dataclasses.replace(plan, pools=tuple(pools))


BYPASSES = ["table", "keyword table", "seed", "bool seed", "pool name", "round-robin name (chain)",
            "refused pool name (comment)", "protocol", "family", "scheduler", "mode", "persistence", "persistence bool",
            "vip as text", "vip with zone index", "vip of the other family", "port as text", "port out of range",
            "slot with a text address", "slot with a zone index", "backend port as text"]


def test_the_plan_renders_as_it_is():
    check_ruleset(render.ruleset(_plan()), {"pools": [{"name": n} for n in ("web", "rr", "six", "down")]})


@pytest.mark.parametrize("what", BYPASSES)
def test_render_refuses_what_validation_would_have(what):
    bad = _bypass(_plan(), what)
    with pytest.raises(errors.RenderError, match="refusing to render"):
        render.ruleset(bad)
    assert issubclass(errors.RenderError, ValueError) and errors.RenderError.exit_code == 2
    if what in ("vip of the other family", "port out of range", "backend port as text"):
        return  # a small transaction spells these harmlessly (plain addresses and digits); the kernel refuses them
    good = _plan()
    # a small transaction from a good plan: render refuses it (a scheduler that is none fails in plan.kind first)
    with pytest.raises(KeyError if what == "scheduler" else errors.RenderError):
        if (good.table, good.seed) == (bad.table, bad.seed):
            update.script(good, bad)
        else:
            render.update(bad.table, bad.seed, update.Changes())


def test_render_refuses_elements_and_names_of_a_forged_transaction():
    ok = update.Changes(add_elements=[("services4", ['198.51.100.1 . tcp . 80 comment "web" : goto hash4_tcp_53'])])
    assert "add element inet nftlb services4" in render.update("nftlb", 1, ok)
    forged = [
        update.Changes(add_elements=[("services4", ['198.51.100.1 . tcp . 80 } ; flush ruleset ; add element inet '
                                                    'nftlb services4 { 198.51.100.2 . tcp . 80'])]),
        update.Changes(add_elements=[("services4", ['198.51.100.1 . tcp . 80 comment "x\\" ; flush ruleset"'])]),
        update.Changes(delete_elements=[("sticky4_tcp_300", ["203.0.113.5 . 198.51.100.1 . 80\nflush ruleset"])]),
        update.Changes(delete_elements=[("services4 ; flush ruleset", ["198.51.100.1 . tcp . 80"])]),
        update.Changes(flush_chains=["remember; flush ruleset"]),
        update.Changes(delete_chains=["x}"]),
        update.Changes(delete_sets=["x\n"]),
        update.Changes(delete_maps=['x"']),
        update.Changes(add_sticky=[("4", "tcp", "300 ; flush ruleset")]),
        update.Changes(add_chains=[("rr_web\nflush ruleset", _plan().pools[1])]),
        update.Changes(add_elements=[("slots4_tcp", [7])]),
    ]
    for changes in forged:
        with pytest.raises(errors.RenderError, match="refusing to"):
            render.update("nftlb", 1, changes)
    with pytest.raises(errors.RenderError):
        render.update("nftlb; flush ruleset", 1, ok)


@fuzz(200)
@given(ADVERSARIAL)
def test_render_refuses_any_pool_name_but_a_plain_one(name):
    plan = _plan()
    for i in range(len(plan.pools)):  # a hash pool, a round-robin pool (its chain), an IPv6 one, a refused one
        pools = list(plan.pools)
        pools[i] = dataclasses.replace(pools[i], name=name)
        forged = dataclasses.replace(plan, pools=tuple(pools))
        if schema.POOL_NAME.fullmatch(name):
            check_ruleset(render.ruleset(forged), {"pools": [{"name": p.name} for p in pools]})
        else:
            with pytest.raises(errors.RenderError):
                render.ruleset(forged)


# -- 3b. systemd units ----------------------------------------------------------------

def _unquote_exec(line: str, dollars: bool = True) -> list[str]:
    """A systemd command line (or path list) back to its words: quotes, backslash escapes,
    then %% (specifiers) and, on command lines, $$ (environment variables)."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word, quoted = "", line[i] == '"'
        i += quoted
        while i < len(line) and (quoted or line[i] != " "):
            c = line[i]
            if c == "\\":
                word += line[i + 1]
                i += 2
                continue
            if quoted and c == '"':
                i += 1
                break
            word += c
            i += 1
        words.append(re.sub(r"%%|\$\$" if dollars else "%%", lambda m: m[0][0], word))
    return words


def _setting(unit: str, key: str) -> str:
    [line] = [x for x in unit.splitlines() if x.startswith(key + "=")]
    return line[len(key) + 1:]


PATH_CHARS = st.text(alphabet=" \"'%$\\;#{}()*?!&|<>`~=+,.:@^-_aZ09é\u202e", min_size=1, max_size=20).filter(
    lambda s: "/" not in s and s not in (".", ".."))


@fuzz(100)
@given(PATH_CHARS, PATH_CHARS)
@example("my pools.yaml", "st ate")
@example('a"b', "c'd")
@example("100%.yaml", "$HOME")
@example("a\\b", "x;y")
@example("%n", "${PATH}")
def test_systemd_units_quote_any_printable_path(file_name, state_name):
    config = Path("/etc/nftlb") / file_name
    state_dir = Path("/var/tmp/nftlb-fuzz") / state_name
    rendered = units.render_units(config, state_dir, every="10s")
    assert len(rendered) == 3
    for name, unit in rendered.items():
        lines = unit.splitlines()
        for line in lines:  # no line was split or added: each is a comment, a section or key=value
            assert re.fullmatch(r"#.*|\[[A-Za-z]+\]|[A-Za-z]+=.*|", line), line
        description = _setting(unit, "Description")
        assert "%" not in description.replace("%%", "") and str(config).replace("%", "%%") in description
        if name.endswith(".service"):
            words = _unquote_exec(_setting(unit, "ExecStart"))
            assert words[words.index("watch") + 1] == str(config)
            assert words[words.index("--state-dir") + 1] == str(state_dir)
            assert _unquote_exec(_setting(unit, "ReadWritePaths"), dollars=False) == [str(state_dir)]


@pytest.mark.parametrize("bad", ["a\nExecStartPre=/bin/sh -c reboot", "a\rb", "tab\there", "esc\x1b[0m", "del\x7f"])
def test_systemd_refuses_control_characters_in_paths(bad, tmp_path):
    with pytest.raises(errors.RenderError, match="systemd unit"):
        units.render_units(Path("/etc/nftlb") / bad, tmp_path / "state")
    with pytest.raises(errors.RenderError, match="systemd unit"):
        units.render_units(tmp_path / "pools.yaml", Path("/var/lib") / bad)


@pytest.mark.parametrize("bad", ["pools\n.yaml", "state\nExecStartPre=/bin/sh"])
def test_systemd_command_refuses_a_newline_with_exit_2(tmp_path, bad):
    good = WEB.read_bytes()
    file = tmp_path / ("pools\n.yaml" if bad.startswith("pools") else "pools.yaml")
    file.write_bytes(good)
    state_dir = tmp_path / (bad if bad.startswith("state") else "state")
    units_dir = tmp_path / "units"
    for extra in ([], ["--install", "--unit-dir", units_dir]):
        code, out, err = run(["systemd", file, "--state-dir", state_dir, *extra], Fake(), state_dir)
        assert code == 2 and out == "" and "refusing to put" in err and "newline" in err
        assert "Traceback" not in err and "internal error" not in err
    assert not units_dir.exists() and not state_dir.exists()


def test_state_directory_only_for_plain_names_under_var_lib(tmp_path):
    plain = units.render_units(tmp_path / "p.yaml", Path("/var/lib/nftlb"))["nftlb-watch.service"]
    assert "StateDirectory=nftlb\n" in plain and "ReadWritePaths" not in plain
    for odd in ("my state", "a:b", "100%", "x$y", 'q"'):
        unit = units.render_units(tmp_path / "p.yaml", Path("/var/lib") / odd)["nftlb-watch.service"]
        assert "StateDirectory=" not in unit
        assert _unquote_exec(_setting(unit, "ReadWritePaths"), dollars=False) == [f"/var/lib/{odd}"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_units_with_odd_paths(tmp_path):
    for n, (file_name, state_name) in enumerate([("my pools %n.yaml", 'st"ate $HOME'), ("a\\b;c.yaml", "x'y")]):
        out = tmp_path / f"u{n}"
        out.mkdir()
        for name, text in units.render_units(Path("/etc/nftlb") / file_name, tmp_path / state_name).items():
            (out / name).write_text(text)
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in out.iterdir())],
                           capture_output=True, text=True, timeout=60)
        problems = [line for line in (r.stdout + r.stderr).splitlines()
                    if "nftlb-watch" in line and not re.search(r"Failed to open|not loaded|Unit .* not found", line)]
        assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_every_string_in_the_templates_passes_a_filter():
    """Each {{ ... }} in an nft template names a loop variable of the template itself, or passes
    an allow-list filter (ident, table_name, token, num, address), or is a list of elements that
    allowlist.check_elements() has matched: nothing reaches nft unchecked."""
    loop_vars = {"family", "addr_type", "n", "f", "proto", "what", "nfproto", "hook", "priority"}
    for path in sorted((ROOT / "templates").glob("*.nft.j2")):
        for expr in re.findall(r"{{(.*?)}}", path.read_text(), re.S):
            expr = expr.strip()
            if re.fullmatch(r"[a-z_]+", expr) and expr in loop_vars:
                continue
            if re.fullmatch(r"[a-z_]+\(.*\)", expr):  # a macro call: its own output is checked inside
                continue
            if "|" in expr and re.search(r"\| *(ident|table_name|token|num|address)\b", expr):
                continue
            if re.match(r"(items|keys) \| join", expr) or expr.startswith('"ip" if f == "4"') or \
                    expr.startswith("raise(") or expr.startswith('"0x%x" % (seed | num'):
                continue
            pytest.fail(f"{path.name}: {{{{ {expr} }}}} reaches the output unchecked")
