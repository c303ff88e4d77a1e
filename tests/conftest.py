import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def write(tmp_path):
    """write(text) -> path of a pools file holding the dedented text."""

    def _write(text: str, name: str = "pools.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return _write


@pytest.fixture
def kernel(monkeypatch):
    """The in-memory kernel, also what `nftlb.kernel.make()` returns (for CLI tests)."""
    from nftlb import kernel
    from nftlb.kernel.fake import Fake

    fake = Fake()
    monkeypatch.setattr(kernel, "make", lambda name=None: fake)
    return fake
