"""The update engine on the real kernel: after each small transaction the live table is
exactly the new plan loaded whole (compared as normalized JSON listings)."""

import os
import sys
from pathlib import Path

import pytest

from integration.lab import IP, _run
from nftlb import render, update
from nftlb.diff import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from plans import random_plans  # noqa: E402


@pytest.fixture
def two_namespaces(request):
    names = [f"nlbu{os.getpid()}s{request.node.callspec.params['seed']}-{x}" for x in "ab"]
    for ns in names:
        _run([IP, "netns", "add", ns])
    yield names
    for ns in names:
        _run([IP, "netns", "delete", ns], check=False)


def nft(ns, *args, input=None):
    return _run([IP, "netns", "exec", ns, "nft", *args], input=input).stdout


@pytest.mark.parametrize("seed", range(12))
def test_small_transactions_equal_whole_loads(two_namespaces, seed):
    walked, fresh = two_namespaces
    plans = list(random_plans(seed, 8))
    nft(walked, "-f", "-", input=render.ruleset(plans[0]))
    for old, new in zip(plans, plans[1:]):
        script, _ = update.script(old, new)
        if script:
            nft(walked, "-f", "-", input=script)
        nft(fresh, "-f", "-", input=render.ruleset(new))
        assert normalize(nft(walked, "-j", "list", "table", "inet", "nftlb")) == \
            normalize(nft(fresh, "-j", "list", "table", "inet", "nftlb")), script
