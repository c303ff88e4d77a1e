import multiprocessing
import os
import stat

import pytest
from test_diff import applied as _applied

from nftlb import state
from nftlb.errors import StateError


def applied(ruleset=None):
    return _applied(generation=3 if ruleset is None else len(ruleset))


def test_save_load_roundtrip_and_permissions(tmp_path):
    d = tmp_path / "st"
    assert state.load(d) is None
    state.save(d, applied())
    assert state.load(d) == applied()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / state.APPLIED).st_mode) == 0o600
    assert [p.name for p in d.iterdir()] == [state.APPLIED]  # no temp file left behind
    state.clear(d)
    assert state.load(d) is None


def test_corrupt_or_foreign_state_is_a_clear_error(tmp_path):
    (tmp_path / state.APPLIED).write_text("{half a file")
    with pytest.raises(StateError, match="cannot read .*move it aside"):
        state.load(tmp_path)
    (tmp_path / state.APPLIED).write_text('{"format": 99}')
    with pytest.raises(StateError, match="not a state file"):
        state.load(tmp_path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    state.save(tmp_path, applied(ruleset="old\n"))

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StateError, match="No space left"):
        state.save(tmp_path, applied(ruleset="new\n"))
    monkeypatch.undo()
    assert state.load(tmp_path).generation == len("old\n")
    assert [p.name for p in tmp_path.iterdir()] == [state.APPLIED]


def _hold(path, ready, release):
    with state.lock(path):
        ready.set()
        release.wait(10)


def test_lock_excludes_a_second_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(StateError, match="another nftlb holds"):
            with state.lock(tmp_path, timeout=0.2):
                pass
    finally:
        release.set()
        holder.join(10)
    with state.lock(tmp_path, timeout=1):
        pass


def test_a_record_written_by_nftlb_0_2_still_loads(tmp_path):
    """applied.json named two fields otherwise before 0.3: `status` (now `conditions`) and
    `backend` (now `kernel`)."""
    doc = dict(vars(applied()))
    doc["status"], doc["backend"] = doc.pop("conditions"), doc.pop("kernel")
    state.write_doc(tmp_path, state.APPLIED, doc)
    assert state.load(tmp_path) == applied()
