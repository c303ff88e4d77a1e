"""The state dir: what nftlb last loaded, the health view, operator overrides, and locks.

Layout (dir 0700, files 0600, every file written atomically):
  applied.json    what is live: the pools file's text and the status (health, drains) the
                  table was built from, the kernel's ruleset generation after nftlb's last
                  commit, and (for tables small enough to list cheaply) a normalized listing
  health.json     the watcher's view: per backend up/down, streaks, since, last probe
  overrides.json  operator drains (`nftlb drain`), kept across restarts and re-applies
  stats.json      counts for the metrics: applies, failed applies, last success, transitions
  history/N.json  the last HISTORY_KEEP applied pools files (`nftlb history`, `nftlb rollback`)
  lock            flock()ed around every change to the kernel or to these files
  watch.lock      held by the one running watcher ("PID watch"), or by a `watch --once` round
                  ("PID once"), which the next round waits for
  .NAME.XXXXXXXX  a temp file of a writer killed before its rename: never read; removed by the
                  next write of NAME once STALE_TEMP seconds old
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nftlb.errors import StateError

DEFAULT_DIR = "/var/lib/nftlb"
APPLIED = "applied.json"
HEALTH = "health.json"
OVERRIDES = "overrides.json"
STATS = "stats.json"
HISTORY = "history"
HISTORY_KEEP = 10
FORMAT = 1


@dataclass
class Applied:
    table: str
    applied_at: float  # unix time of the last change nftlb made to the table
    source: str  # path of the pools file as given
    source_text: str
    conditions: dict  # nftlb.plan.Conditions.as_dict() the live plan was built with
    generation: int | None  # the kernel's ruleset generation right after that change (None: unsure)
    snapshot: dict | None  # normalized JSON listing of the table then (None: too large to list cheaply)
    kernel: str  # how nftlb reached the kernel: libnftables | nft
    version: str
    history_id: int | None = None  # the history entry of the file that is live (None: before history)


def _ensure_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"cannot create state dir {state_dir}: {e.strerror}") from None


STALE_TEMP = 10.0  # seconds: a temp file this old was left by a writer that died before its rename
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")  # tempfile.mkstemp(prefix=".NAME."): 8 random characters


def sweep_temps(folder: Path, names=None) -> list[str]:
    """Delete the temp files of writers killed between mkstemp and rename (".NAME.XXXXXXXX",
    NAME in `names`, or any NAME when None), once they are STALE_TEMP seconds old: younger
    ones may belong to a writer still at work. Readers never look at them. Returns those removed."""
    cutoff = time.time() - STALE_TEMP
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or (names is not None and m["name"] not in names):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass  # gone already, or not ours to remove: readers ignore it either way
    return removed


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same dir, fsync, rename, fsync the dir: a crash leaves the old or the new
    file, and at worst a stale temp file, which the next write of the same file removes."""
    _ensure_dir(path.parent)
    sweep_temps(path.parent, {path.name})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateError(f"cannot write {path}: {e.strerror}") from None


def read_doc(state_dir: Path, name: str) -> dict | None:
    """One state file's payload, None when absent; StateError when unreadable or foreign."""
    path = Path(state_dir) / name
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read {path}: {e}; move it aside to start over") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("data"), dict):
        raise StateError(f"{path} is not a state file this nftlb understands (format {FORMAT})")
    return doc["data"]


def write_doc(state_dir: Path, name: str, data: dict) -> None:
    # compact: json's C encoder; an indented dump of a 10,000-pool record is several times slower
    write_atomic(Path(state_dir) / name, json.dumps({"format": FORMAT, "data": data}, separators=(",", ":")).encode())


def remove_doc(state_dir: Path, name: str) -> None:
    try:
        os.unlink(Path(state_dir) / name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"cannot remove {Path(state_dir) / name}: {e.strerror}") from None


_loaded: dict[Path, tuple[tuple, Applied]] = {}  # path -> (stat stamp, record): a watcher re-reads it often


def _stamp(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


_RENAMED = {"status": "conditions", "backend": "kernel"}  # fields of applied.json, old name -> new


def load(state_dir: Path) -> Applied | None:
    path = Path(state_dir) / APPLIED
    stamp = _stamp(path)
    cached = _loaded.get(path)
    if cached and stamp is not None and cached[0] == stamp:
        return cached[1]
    data = read_doc(state_dir, APPLIED)
    if data is None:
        return None
    for was, now in _RENAMED.items():  # written by nftlb 0.2 or earlier
        if was in data and now not in data:
            data[now] = data.pop(was)
    try:
        applied = Applied(**data)
    except TypeError as e:
        raise StateError(f"{path} is incomplete ({e}); move it aside to start over") from None
    if stamp is not None:
        _loaded[path] = (stamp, applied)
    return applied


def save(state_dir: Path, applied: Applied) -> None:
    path = Path(state_dir) / APPLIED
    write_doc(state_dir, APPLIED, dict(vars(applied)))  # shallow: asdict() deep-copies a large status
    stamp = _stamp(path)
    if stamp is not None:
        _loaded[path] = (stamp, applied)


def clear(state_dir: Path) -> None:
    remove_doc(state_dir, APPLIED)


def _flock(path: Path, timeout: float, busy: str) -> int:
    _ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise StateError(f"cannot lock {path}: {e.strerror}") from None
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StateError(busy) from None
            time.sleep(0.05)  # flock has no timed wait; poll the lock itself


def lock_if_present(state_dir: Path):
    """The state lock for read-only commands, which must not create the state dir."""
    return lock(state_dir) if Path(state_dir).is_dir() else contextlib.nullcontext()


@contextmanager
def lock(state_dir: Path, timeout: float = 30.0):
    """Exclusive lock on the state dir; waits up to `timeout` seconds for another nftlb to finish."""
    path = Path(state_dir) / "lock"
    fd = _flock(path, timeout, f"another nftlb holds {path} (waited {timeout:.0f} s)")
    try:
        yield
    finally:
        os.close(fd)


def watch_lock(state_dir: Path, *, once: bool = False, timeout: float = 30.0) -> int:
    """Held for a watcher's lifetime (the fd); the file says who holds it: "PID watch" or
    "PID once". A running daemon watcher refuses any other at once; a `watch --once` round
    (seconds long) is waited for, up to `timeout` seconds, by the next one or by a daemon."""
    path = Path(state_dir) / "watch.lock"
    busy = f"another nftlb watch is running on {state_dir} (holds {path})"
    _ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise StateError(f"cannot lock {path}: {e.strerror}") from None
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()
        except OSError:
            holder = []
        # "PID watch" (and a pre-"once" nftlb's bare "PID") is a daemon: it does not finish
        daemon = len(holder) == 1 or (len(holder) >= 2 and holder[1] != "once")
        if daemon or time.monotonic() >= deadline:
            os.close(fd)
            raise StateError(busy + (f"; waited {timeout:.0f} s for its round to end" if not daemon else ""))
        time.sleep(0.05)  # flock has no timed wait; poll the lock itself
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {'once' if once else 'watch'}\n".encode(), 0)
    return fd


def bump_stats(
    state_dir: Path, *, applied: bool = False, failed: bool = False, transitions: Sequence[tuple[str, str, bool]] = ()
) -> None:
    """Count an apply (successful or failed) and health transitions (pool, backend, up) in
    stats.json, under a lock of its own: the watcher and the CLI both count."""
    fd = _flock(Path(state_dir) / "stats.lock", 10.0, f"cannot lock {state_dir}/stats.lock")
    try:
        try:
            doc = read_doc(state_dir, STATS) or {}
        except StateError:
            doc = {}  # unreadable counts start over rather than block an apply
        if applied:
            doc["applies"] = doc.get("applies", 0) + 1
            doc["last_apply_success"] = time.time()
        if failed:
            doc["apply_failures"] = doc.get("apply_failures", 0) + 1
        counts = doc.setdefault("transitions", {})
        for pool, backend, up in transitions:
            entry = counts.setdefault(f"{pool}|{backend}", {"up": 0, "down": 0})
            entry["up" if up else "down"] += 1
        write_doc(state_dir, STATS, doc)
    finally:
        os.close(fd)


# -- history: the applied files, for `nftlb history` and `nftlb rollback` ------------


def history(state_dir: Path) -> list[dict]:
    """The kept entries, oldest first: {id, applied_at, source, sha256, summary, source_text}."""
    folder = Path(state_dir) / HISTORY
    try:
        names = sorted((int(p.stem), p) for p in folder.glob("*.json") if p.stem.isdigit())
    except OSError as e:
        raise StateError(f"cannot read {folder}: {e.strerror}") from None
    out = []
    for _, path in names:
        doc = read_doc(folder, path.name)
        if doc is not None:
            out.append(doc)
    return out


def next_history_id(state_dir: Path) -> int:
    folder = Path(state_dir) / HISTORY
    ids = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()] if folder.is_dir() else []
    return max(ids, default=0) + 1


def add_history(state_dir: Path, entry: dict, new: int, after: int | None) -> None:
    """Record a newly applied file as entry `new`; entries newer than `after` (the one live
    before, when it was rolled back to) are dropped, as is everything beyond the newest
    HISTORY_KEEP."""
    folder = Path(state_dir) / HISTORY
    _ensure_dir(folder)
    sweep_temps(folder)  # a writer killed mid-write may have left one for any entry
    ids = sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit() and int(p.stem) != new)
    write_doc(folder, f"{new:06d}.json", {**entry, "id": new})
    stale = [i for i in ids if after is not None and i > after]
    kept = [i for i in ids if i not in stale] + [new]
    stale += kept[:-HISTORY_KEEP]
    for i in stale:
        remove_doc(folder, f"{i:06d}.json")
