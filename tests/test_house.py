"""Guards that keep the house in order; each fails when the code drifts:

- no import cycle, and every module imports on its own;
- the pure modules import nothing that touches the kernel, the state dir, other programs or
  the network, directly or through another module;
- no module over MAX_LINES; every CLI command short: parse options, call one library
  function, print a view;
- the README's Layout section names every module and every command.

(ruff and mypy run from `make test` before pytest: lint, format and types.)
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nftlb"
MAX_LINES = 400
MAX_COMMAND_STATEMENTS = 4  # options parsed by Typer; then: check, call, print, (exit code)

# Pure: values in, values out. Their imports, however deep, stay among them.
PURE = {"nftlb.schema", "nftlb.yamltree", "nftlb.plan", "nftlb.maglev", "nftlb.names", "nftlb.elements",
        "nftlb.allowlist", "nftlb.render", "nftlb.update", "nftlb.diff", "nftlb.decide", "nftlb.health",
        "nftlb.errors"}
# what touches the kernel, the state dir, other programs, the network, or the process
IMPURE_STDLIB = {"subprocess", "socket", "asyncio", "fcntl", "select", "signal", "ctypes", "shutil", "tempfile",
                 "http", "urllib", "ssl", "psutil", "prometheus_client", "os"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def _imports(path: Path, *, anywhere: bool) -> tuple[set[str], set[str]]:
    """(nftlb modules, other top-level modules) imported by `path`: at module level, or anywhere.
    `if TYPE_CHECKING:` blocks import nothing at run time and do not count."""
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree)) if anywhere else [
        n for stmt in tree.body for n in ([stmt] if not isinstance(stmt, ast.If) else [])]
    ours, theirs = set(), set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("nftlb") else theirs).add(alias.name.split(".")[0]
                                                                          if not alias.name.startswith("nftlb")
                                                                          else alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if not node.module.startswith("nftlb"):
                theirs.add(node.module.split(".")[0])
                continue
            for alias in node.names:  # `from nftlb import plan` imports the module nftlb.plan
                sub = f"{node.module}.{alias.name}"
                ours.add(sub if sub in MODULES else node.module)
    ours.discard("nftlb")  # the package's __init__ holds only __version__
    return ours, theirs


def test_no_import_cycles():
    graph = {name: _imports(path, anywhere=False)[0] for name, path in MODULES.items()}
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_every_module_imports_on_its_own():
    """Each in a fresh interpreter: a cycle shows when the module is the first one imported."""
    def load(name: str) -> tuple[str, int, str]:
        cp = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
        return name, cp.returncode, cp.stderr[-500:]

    names = sorted(n for n in MODULES if n != "nftlb.__main__")  # that one runs the CLI: `python -m nftlb`
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(n, err) for n, code, err in pool.map(load, names) if code != 0]
    assert not failed, failed


def test_pure_modules_touch_nothing():
    assert PURE <= set(MODULES), PURE - set(MODULES)
    for name in sorted(PURE):
        ours, theirs = _imports(MODULES[name], anywhere=True)
        assert ours <= PURE, f"{name} imports {sorted(ours - PURE)}, which are not pure"
        assert not theirs & IMPURE_STDLIB, f"{name} imports {sorted(theirs & IMPURE_STDLIB)}"


def test_the_purity_guard_catches_a_stray_import(tmp_path, monkeypatch):
    """The control: the guard above fails on a pure module that reaches for the state dir."""
    stray = tmp_path / "stray.py"
    stray.write_text("from nftlb import plan, state\nimport subprocess\n")
    ours, theirs = _imports(stray, anywhere=True)
    assert ours - PURE == {"nftlb.state"} and theirs & IMPURE_STDLIB == {"subprocess"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by concern"


def _commands() -> dict[str, ast.FunctionDef]:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "command":
                    name = dec.args[0].value if dec.args else node.name
                    out[name] = node
    return out


def test_cli_commands_are_short():
    from nftlb import cli  # here, not at the top: the static guards above run even when an import breaks

    commands = _commands()
    registered = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert set(commands) == registered and len(commands) >= 15
    for name, fn in commands.items():
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert len(body) <= MAX_COMMAND_STATEMENTS, f"nftlb {name}: {len(body)} statements; move logic to the library"
        loops = [n for n in ast.walk(fn) if isinstance(n, ast.For | ast.While | ast.Try | ast.With)]
        assert not loops, f"nftlb {name}: a loop or try in a command body; move it to the library"


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Layout\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    return m.group(1)


def test_readme_layout_names_every_module_and_command():
    layout = _layout()
    for name, path in MODULES.items():
        shown = str(path.relative_to(ROOT))
        if path.name == "__main__.py" or name == "nftlb":
            continue
        assert re.search(rf"^{re.escape(shown)}\s", layout, re.M), f"README Layout does not list {shown}"
    for name in _commands():
        assert re.search(rf"^nftlb {re.escape(name)}\b", layout, re.M), f"README Layout does not list `nftlb {name}`"
