"""Security properties that can be checked without a kernel."""

import ast
import stat
from pathlib import Path

from nftlb import metrics, ops, state
from nftlb.kernel.fake import Fake

PACKAGE = Path(__file__).resolve().parent.parent / "nftlb"


def test_no_shell_anywhere_in_nftlb():
    """nft, conntrack and ip run from argv lists; rulesets go on stdin or through the bindings."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path}:{node.lineno}"
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "getoutput", "getstatusoutput"):
                assert not (isinstance(node.value, ast.Name) and node.value.id in ("os", "subprocess")), \
                    f"{path}:{node.lineno}: {node.value.id}.{node.attr}"


def test_state_dir_0700_and_every_file_0600(tmp_path):
    sd = tmp_path / "state"
    pools = tmp_path / "pools.yaml"
    kernel = Fake()
    for port in (80, 81):
        pools.write_text(f"pools:\n  - {{name: web, vip: 198.51.100.10, port: {port}, backends: [10.0.0.1]}}\n")
        ops.apply(pools, kernel, sd)
    ops.set_drain(kernel, sd, "web", "10.0.0.1:81", True)
    state.bump_stats(sd, transitions=[("web", "10.0.0.1:80", False)])
    dirs = [sd, sd / state.HISTORY]
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs)
    files = [p for p in sd.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"applied.json", "overrides.json", "stats.json", "lock", "stats.lock",
                                       "000001.json", "000002.json"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_metrics_listen_on_loopback_unless_told():
    assert metrics.listen_address("9650")[0] == "127.0.0.1"
    assert metrics.listen_address(":9650")[0] == "127.0.0.1"
