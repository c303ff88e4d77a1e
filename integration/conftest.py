"""pytest glue for the network-namespace lab.

* Not root: every test under integration/ is skipped -- unless the CI
  environment variable is set, in which case each one errors loudly.
* ``lab_factory`` (function scope): ``lab_factory(backends=3,
  routed_backends=True, prefix=None)`` returns a ready :class:`Lab`; all Labs
  it made are torn down when the test ends, pass or fail.
* ``lab``: shorthand for ``lab_factory()`` with servers started on the default
  ports (TCP 8080, UDP 5353).
* Session start deletes namespaces left by dead test processes
  (``nlb<deadpid>x...``); session finish deletes any namespace still carrying
  this process's prefix.
"""

import os

import pytest

from integration import lab as labmod

HERE = os.path.dirname(os.path.abspath(__file__))
IS_ROOT = os.geteuid() == 0
IN_CI = bool(os.environ.get("CI"))
NOT_ROOT_MSG = "integration tests need root (network namespaces, nftables)"


def _ours(item) -> bool:
    path = str(getattr(item, "path", None) or item.fspath)
    return os.path.commonpath([os.path.abspath(path), HERE]) == HERE


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if IS_ROOT or not _ours(item):
        return
    if IN_CI:
        pytest.fail(f"{NOT_ROOT_MSG}; CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(NOT_ROOT_MSG)


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_namespaces():
    # A fixture rather than pytest_sessionstart: this conftest may only be
    # loaded during collection, after sessionstart has already run.
    if IS_ROOT:
        labmod.sweep_dead_processes()
    yield


@pytest.fixture(scope="session", autouse=True)
def _root_namespace_untouched():
    """Guard: the kernel tests never change the root namespace's ruleset or named namespaces."""
    if not IS_ROOT:
        yield
        return
    before = labmod._run(["nft", "list", "ruleset"], check=False).stdout
    yield
    after = labmod._run(["nft", "list", "ruleset"], check=False).stdout
    assert after == before, "the root namespace's nftables ruleset changed during the tests"


def pytest_sessionfinish(session, exitstatus):
    if IS_ROOT:
        labmod.sweep(labmod.PROCESS_PREFIX)


@pytest.fixture
def lab_factory(request):
    labs = []

    def finalize():
        errors = []
        for lab in reversed(labs):
            try:
                lab.teardown()
            except Exception as exc:  # noqa: BLE001 - tear down the others too
                errors.append(exc)
        if errors:
            raise errors[0]

    request.addfinalizer(finalize)

    def make(**kwargs) -> labmod.Lab:
        lab = labmod.Lab(**kwargs)  # cleans up after itself if building fails
        labs.append(lab)
        return lab

    return make


@pytest.fixture
def lab(lab_factory):
    lab = lab_factory()
    lab.start_servers()
    return lab
