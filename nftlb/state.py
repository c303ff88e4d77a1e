"""The state dir: what nftlb last applied, written atomically, and the lock that serialises writers.

Layout (dir 0700, files 0600):
  applied.json   the last applied generation: source file text, rendered ruleset,
                 and the kernel's listing of our table right after the commit
  lock           flock()ed by every command that changes the kernel or the state
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from nftlb.errors import StateError

DEFAULT_DIR = "/var/lib/nftlb"
APPLIED = "applied.json"
FORMAT = 1


@dataclass
class Applied:
    table: str
    applied_at: float  # unix time
    source: str  # path of the pools file as given
    source_text: str
    ruleset: str  # the script nftlb loaded
    live: list  # normalized JSON listing of the table right after the commit
    live_text: str  # nft's text listing right after the commit
    backend: str
    version: str


def _ensure_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"cannot create state dir {state_dir}: {e.strerror}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same dir, fsync, rename, fsync the dir: a crash leaves the old or the new file."""
    _ensure_dir(path.parent)
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


def load(state_dir: Path) -> Applied | None:
    path = Path(state_dir) / APPLIED
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read {path}: {e}; move it aside to start over") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{path} is not a state file this nftlb understands (format {FORMAT})")
    try:
        return Applied(**doc["applied"])
    except (KeyError, TypeError) as e:
        raise StateError(f"{path} is incomplete ({e}); move it aside to start over") from None


def save(state_dir: Path, applied: Applied) -> None:
    doc = {"format": FORMAT, "applied": asdict(applied)}
    write_atomic(Path(state_dir) / APPLIED, json.dumps(doc, indent=1).encode())


def clear(state_dir: Path) -> None:
    try:
        os.unlink(Path(state_dir) / APPLIED)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateError(f"cannot remove {Path(state_dir) / APPLIED}: {e.strerror}") from None


@contextmanager
def lock(state_dir: Path, timeout: float = 30.0):
    """Exclusive lock on the state dir; waits up to `timeout` seconds for another nftlb to finish."""
    state_dir = Path(state_dir)
    _ensure_dir(state_dir)
    path = state_dir / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StateError(f"cannot lock {path}: {e.strerror}") from None
                if time.monotonic() > deadline:
                    raise StateError(f"another nftlb holds {path} (waited {timeout:.0f} s)") from None
                time.sleep(0.05)  # flock has no timed wait; poll the lock itself
        yield
    finally:
        os.close(fd)
