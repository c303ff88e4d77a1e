"""Every valid pools file renders a ruleset the kernel accepts (property-based, hypothesis).

Configs come from tests/test_fuzz.py's strategy: IPv4 and IPv6 pools, tcp and udp, every
scheduler and mode of nftlb.model, weights, backups, drains, persistence, prime table sizes,
health overrides, on_down, when_all_down, several pools, and unusual but valid names (YAML 1.1
booleans, nft keywords as pool names, 31-character names, random table names).

Each ruleset is committed for real with `nft -f -` (the kernel validates chains only on a real
commit; `nft -c` can miss some errors) inside one throwaway network namespace for the module,
then its table is listed and deleted. A few configs go through `nftlb apply` in that
namespace too: apply, apply again (in sync), a second config on the same table (a small
transaction), diff, remove. Nothing here touches the root namespace's ruleset.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from integration.lab import IP, PROCESS_PREFIX, _run
from nftlb import desired, schema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_fuzz import dump, valid_configs  # noqa: E402  (the same strategy as the unit tests)

NS = f"{PROCESS_PREFIX}fuzz"  # nlb<pid>x...: swept at session end, and by later sessions if this one dies
PYTHON = sys.executable


def kernel_settings(examples: int) -> settings:
    # no explain phase: it reruns a failing example dozens of times, each a few processes
    # CI: the same examples every run (a red CI must be reproducible); elsewhere: new ones each run
    return settings(max_examples=examples, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def netns(request):
    """One namespace for the module: each example loads its table, lists it and deletes it."""
    _run([IP, "netns", "delete", NS], check=False)
    _run([IP, "netns", "add", NS])
    request.addfinalizer(lambda: _run([IP, "netns", "delete", NS], check=False))
    _run([IP, "-n", NS, "link", "set", "lo", "up"])
    return NS


def nft(ns: str, *args: str, input: str | None = None, check: bool = False):
    return _run([IP, "netns", "exec", ns, "nft", *args], input=input, check=check)


def nftlb(ns: str, *args, state_dir: Path):
    env = dict(os.environ, NFTLB_STATE_DIR=str(state_dir))
    return _run([IP, "netns", "exec", ns, PYTHON, "-m", "nftlb", *map(str, args)], check=False, env=env, timeout=60)


def tables(ns: str) -> str:
    return nft(ns, "list", "tables", check=True).stdout


def load_and_delete(ns: str, config: dict, text: str) -> None:
    """Render through ops.desired (as `nftlb render` does), commit with `nft -f -`, list, delete."""
    with tempfile.TemporaryDirectory(prefix="nftlb-fuzz-") as tmp:
        path = Path(tmp) / "pools.yaml"
        path.write_text(text)
        want = desired.of_file(path)
    table = want.plan.table
    assert table == config["table"]
    loaded = nft(ns, "-f", "-", input=want.script)
    try:
        assert loaded.returncode == 0, f"the kernel refused the ruleset of\n{text}\n{loaded.stderr}"
        listed = nft(ns, "list", "table", "inet", table)
        assert listed.returncode == 0, listed.stderr
        for pool in want.plan.pools:  # every pool is in the table, by its comment
            assert f'comment "{pool.name}"' in listed.stdout
    finally:
        nft(ns, "delete", "table", "inet", table)
    assert f"table inet {table}\n" not in tables(ns)


@kernel_settings(80)
@given(st.data())
def test_every_valid_config_loads_into_the_kernel(netns, data):
    config = data.draw(valid_configs(max_pools=5))
    load_and_delete(netns, config, dump(data.draw, config))


LARGE = {
    "table": "x" * 31,
    "seed": "0xffffffff",
    "pools": [
        {"name": "tcp", "vip": "198.51.100.1", "port": 65535, "table_size": 65537, "persistence": "7d",
         "mode": "masquerade", "backends": [f"10.1.0.{i}:1" for i in range(1, 11)]},
        {"name": "udp", "vip": "2001:db8::1", "port": 1, "protocol": "udp", "scheduler": "round-robin",
         "backends": [{"address": "fd00::1", "weight": 1000}, {"address": "fd00::2", "weight": 999},
                      {"address": "fd00::3", "weight": 1, "backup": True}]},
        {"name": "off", "vip": "2001:db8::2", "port": 80, "scheduler": "source-hash",
         "backends": [{"address": "fd00::1", "state": "drain"}]},
        {"name": "on", "vip": "203.0.113.9", "port": 53, "protocol": "udp", "scheduler": "random",
         "persistence": 1, "when_all_down": "keep-last", "health": "off",
         "backends": [{"address": "10.255.255.254", "backup": True}, {"address": "192.0.2.1", "backup": True}]},
    ],
}


def test_the_largest_values_load_into_the_kernel(netns):
    """A 65,537-slot Maglev table, weights 1000:999:1, 7 days of persistence, a 31-character table."""
    load_and_delete(netns, LARGE, yaml.safe_dump(LARGE))


@kernel_settings(4)
@given(st.data())
def test_nftlb_apply_in_a_namespace(netns, data):
    first = data.draw(valid_configs(max_pools=4))
    second = data.draw(valid_configs(max_pools=4))
    second["table"] = first["table"]  # the same table: the second apply is a small transaction
    second["seed"] = first.get("seed", schema.DEFAULT_SEED)
    backend = data.draw(st.sampled_from(["libnftables", "nft"]))
    with tempfile.TemporaryDirectory(prefix="nftlb-fuzz-") as tmp:
        state_dir, a, b = Path(tmp) / "state", Path(tmp) / "a.yaml", Path(tmp) / "b.json"
        a.write_text(yaml.safe_dump(first, sort_keys=False))
        b.write_text(dump(data.draw, second))
        table = first["table"]
        try:
            r = nftlb(netns, "apply", a, "--backend", backend, state_dir=state_dir)
            assert r.returncode == 0 and r.stdout.startswith(f"applied table inet {table}:"), r.stdout + r.stderr
            r = nftlb(netns, "apply", a, "--backend", backend, state_dir=state_dir)
            assert r.returncode == 0 and "in sync" in r.stdout, r.stdout + r.stderr
            r = nftlb(netns, "apply", b, "--backend", backend, state_dir=state_dir)
            assert r.returncode == 0 and ("applied" in r.stdout or "in sync" in r.stdout), r.stdout + r.stderr
            r = nftlb(netns, "diff", b, "--backend", backend, state_dir=state_dir)
            assert r.returncode == 0 and "in sync" in r.stdout, r.stdout + r.stderr
            r = nftlb(netns, "remove", "--backend", backend, state_dir=state_dir)
            assert r.returncode == 0 and r.stdout == f"deleted table inet {table}\n", r.stdout + r.stderr
        finally:
            nft(netns, "delete", "table", "inet", table)
    assert tables(netns) == ""


def test_bad_input_leaves_the_namespace_alone(netns, tmp_path):
    """The CLI end to end (a real process, the real kernel): every bad file exits 2, no table appears."""
    before = tables(netns)
    bad = tmp_path / "bad.yaml"
    for text, commands in (
            ("pools: [\n", ("apply", "diff")),
            ("pools: " + "[" * 100_000, ("apply", "--dry-run")),  # libyaml's own composer: a segfault
            ("table: flush\npools: []\n", ("apply",)),  # nft cannot name a table `flush`
            ('pools:\n  - {name: web, vip: "2001:db8::1%x;flush ruleset", port: 80, backends: ["2001:db8::2"]}\n',
             ("apply",))):
        bad.write_text(text)
        for command in commands:
            args = ["apply", "--dry-run", bad] if command == "--dry-run" else [command, bad]
            r = nftlb(netns, *args, state_dir=tmp_path / "state")
            assert r.returncode == 2 and r.stderr.startswith(f"{bad}:") and "Traceback" not in r.stderr, r.stderr
    assert tables(netns) == before and not (tmp_path / "state").exists()
