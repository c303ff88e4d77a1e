"""The wheel carries templates/ inside the package, and renders from there."""

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_templates_and_renders_without_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=120)
    wheel = next(tmp_path.glob("nftlb-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nftlb/templates/ruleset.nft.j2" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; from nftlb import pools_file, plan, render; "
            "assert str(render.template_dir()).startswith(sys.argv[1]), render.template_dir(); "
            "print(render.ruleset(plan.build(pools_file.load(sys.argv[2]))), end='')")
    out = subprocess.run([sys.executable, "-c", code, str(site), str(ROOT / "rules" / "web.yaml")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "tests" / "golden" / "web.nft").read_text()
