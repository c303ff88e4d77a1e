"""What nftlb says when it cannot reach the kernel: no CAP_NET_ADMIN, no bindings, no nft
binary, neither. Each is one clear message naming what is missing, exit 3, no traceback.

Runs inside a namespace of its own; capabilities are dropped with setpriv, the nft
binary is hidden in a private mount namespace (unshare -m), the bindings by a module
on PYTHONPATH that refuses to import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = f"nlbpriv{os.getpid()}"
POOLS = "pools:\n  - {name: web, vip: 198.51.100.10, port: 80, backends: [10.0.0.11:8080]}\n"


@pytest.fixture(scope="module")
def ns():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    yield NS
    subprocess.run(["ip", "netns", "delete", NS], check=False)


@pytest.fixture
def files(tmp_path):
    pools = tmp_path / "pools.yaml"
    pools.write_text(POOLS)
    blocker = tmp_path / "noimport"
    blocker.mkdir()
    (blocker / "nftables.py").write_text("raise ImportError('No module named nftables (hidden by the test)')\n")
    return pools, tmp_path / "state", blocker


def nftlb(ns: str, *args, prefix=(), env=None) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", ns, *prefix, sys.executable, "-m", "nftlb", *map(str, args)]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                        env={**os.environ, **(env or {})})
    assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr, cp.stderr
    return cp


NO_CAP = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--")
HIDE_NFT = ("unshare", "-m", "--propagation", "private", "--", sys.executable, "-c",
            "import os, subprocess, sys\n"
            "for p in ('/usr/sbin/nft', '/sbin/nft'):\n"
            "    if os.path.exists(p) and not os.path.islink(p):\n"
            "        subprocess.run(['mount', '--bind', '/dev/null', p], check=True)\n"
            "os.execvp(sys.argv[1], sys.argv[1:])\n")


@pytest.mark.parametrize("backend", ["libnftables", "nft"])
def test_without_cap_net_admin(ns, files, backend):
    pools, state, _ = files
    cp = nftlb(ns, "apply", pools, "--backend", backend, "--state-dir", state, prefix=NO_CAP)
    assert cp.returncode == 3 and "CAP_NET_ADMIN" in cp.stderr, cp.stderr
    assert not (state / "applied.json").exists()
    # with the capability the same command works: the failure was the capability
    assert nftlb(ns, "apply", pools, "--backend", backend, "--state-dir", state).returncode == 0
    applied = (state / "applied.json").read_bytes()
    changed = pools.with_name("changed.yaml")
    changed.write_text(POOLS.replace("10.0.0.11", "10.0.0.12"))
    for args in (("apply", changed), ("status",), ("diff", changed), ("drain", "web", "10.0.0.11:8080"),
                 ("rollback",), ("remove",)):
        cp = nftlb(ns, *args, "--backend", backend, "--state-dir", state, prefix=NO_CAP)
        assert cp.returncode in (2, 3) if args == ("rollback",) else cp.returncode == 3, (args, cp.stderr)
        if args != ("rollback",):  # rollback: nothing to roll back to is found before the kernel is asked
            assert "nftlb needs CAP_NET_ADMIN (run it as root)" in cp.stderr, (args, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1 and cp.stdout == "", (args, cp.stderr)
    assert (state / "applied.json").read_bytes() == applied  # nothing was lost
    assert not (state / "overrides.json").exists()  # the refused drain left no override behind
    assert nftlb(ns, "remove", "--state-dir", state).returncode == 0


def test_without_the_bindings(ns, files):
    pools, state, blocker = files
    env = {"PYTHONPATH": str(blocker)}
    cp = nftlb(ns, "apply", pools, "--backend", "libnftables", "--state-dir", state, env=env)
    assert cp.returncode == 3
    assert "python nftables bindings are not importable" in cp.stderr and "python3-nftables" in cp.stderr
    # the default falls back to the nft binary, and works
    assert nftlb(ns, "apply", pools, "--state-dir", state, env=env).returncode == 0
    assert nftlb(ns, "remove", "--state-dir", state, env=env).returncode == 0


def test_without_the_nft_binary(ns, files):
    pools, state, blocker = files
    cp = nftlb(ns, "apply", pools, "--backend", "nft", "--state-dir", state, prefix=HIDE_NFT)
    assert cp.returncode == 3
    assert "nft binary was not found" in cp.stderr and "nftables" in cp.stderr
    # the bindings do not need it
    assert nftlb(ns, "apply", pools, "--state-dir", state, prefix=HIDE_NFT).returncode == 0
    assert nftlb(ns, "remove", "--state-dir", state).returncode == 0


def test_without_either(ns, files):
    pools, state, blocker = files
    cp = nftlb(ns, "apply", pools, "--state-dir", state, prefix=HIDE_NFT, env={"PYTHONPATH": str(blocker)})
    assert cp.returncode == 3
    assert "no way into the kernel" in cp.stderr
    assert "python3-nftables" in cp.stderr and "nft binary was not found" in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr  # one message
