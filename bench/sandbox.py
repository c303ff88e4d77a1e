"""Sandbox plumbing shared by the benchmark scripts in bench/ (stdlib only).

A script calls init("nlbxyz") once: its namespaces and temporary directories are then named
nlbxyz<pid>-..., and cleanup_all() runs at exit.  Every namespace, process and temporary
directory made through this module is recorded, so cleanup_all() (from `finally`, atexit, or
after a signal turned into KeyboardInterrupt by catch_signals()) can kill and delete them.
Nothing here touches the root network namespace: it only adds, enters and deletes namespaces
of its own.  Every command and every wait is bounded.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: integration/netns.py
from integration import netns  # noqa: E402 - the path above first

IP = netns.IP
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

NAME = ""  # e.g. "nlbhash"; set by init()
PREFIX = ""  # NAME + "<pid>-"

live_ns: list[str] = []  # created and not yet deleted, in creation order
live_procs: list[subprocess.Popen] = []
tmpdirs: list[str] = []


BenchError = netns.NetnsError


def init(name: str) -> str:
    """Name this run's namespaces and temp dirs name<pid>-...; clean up at exit.  Returns the prefix."""
    global NAME, PREFIX
    NAME, PREFIX = name, f"{name}{os.getpid()}-"
    atexit.register(cleanup_all)
    return PREFIX


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, *, timeout: float, check: bool = True, input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return netns.run(argv, timeout=timeout, check=check, input=input, cwd=cwd)


def nsexec(ns: str, *argv, timeout: float = 30, check: bool = True, input: str | None = None, cwd=None):
    return netns.nsexec(ns, *argv, timeout=timeout, check=check, input=input, cwd=cwd)


def popen(ns: str, argv, **kwargs) -> subprocess.Popen:
    """Start argv in namespace ns, in a session of its own (so stop_proc can kill its group); recorded."""
    proc = subprocess.Popen([IP, "netns", "exec", ns, *map(str, argv)], stdin=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)
    live_procs.append(proc)
    return proc


list_netns = netns.list_netns
pid_alive = netns.pid_alive


def stop_proc(proc: subprocess.Popen, grace: float = 3.0) -> None:
    netns.stop_process(proc, grace, group=True)  # its own session: `ip netns exec` and what runs under it
    if proc in live_procs:
        live_procs.remove(proc)


def add_namespaces(namespaces) -> None:
    netns.add(namespaces, created=live_ns)  # recorded first: a partial failure is cleaned up too


def ip_batch(ns: str, cmds: list[str]) -> None:
    """`ip -n ns -batch -`: one `ip` command a line, all inside ns."""
    netns.batch(ns, cmds)


def wait_carrier(namespaces, timeout: float = 5.0) -> None:
    """Wait (bounded) until every link but lo in the namespaces has its carrier."""
    netns.wait_links_ready(namespaces, timeout)


def _is_dead_run_ns(ns: str) -> bool:
    if not NAME:
        raise BenchError("sandbox.init() was not called")
    m = re.match(rf"{re.escape(NAME)}(\d+)-", ns)
    return bool(m) and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))


def stale_namespaces() -> list[str]:
    """Namespaces of an earlier run of the same script whose process is dead."""
    return [ns for ns in list_netns() if _is_dead_run_ns(ns)]


def delete_namespaces(namespaces) -> list[str]:
    """Kill processes in and delete the given namespaces (only ever ours). Returns leftovers."""
    if not PREFIX:
        raise BenchError("sandbox.init() was not called")
    todo = [ns for ns in namespaces if ns.startswith(PREFIX) or _is_dead_run_ns(ns)]
    if not todo:
        return []
    netns.delete(todo)
    left = set(list_netns())
    for ns in namespaces:
        if ns not in left and ns in live_ns:
            live_ns.remove(ns)
    return [ns for ns in todo if ns in left]


def mkdtemp(tag: str = "") -> str:
    """A temporary directory PREFIX[tag-]..., removed by cleanup_all."""
    d = tempfile.mkdtemp(prefix=PREFIX + (f"{tag}-" if tag else ""))
    tmpdirs.append(d)
    return d


def remove_tmpdir(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    if d in tmpdirs:
        tmpdirs.remove(d)


def cleanup_all() -> None:
    for proc in list(live_procs):
        try:
            stop_proc(proc)
        except Exception:  # noqa: BLE001 - keep cleaning
            pass
    try:
        left = delete_namespaces(list(live_ns))
        if left:
            log(f"WARNING: could not delete namespaces {left}")
    except Exception as exc:  # noqa: BLE001
        log(f"WARNING: cleanup failed: {exc}")
    for d in list(tmpdirs):
        remove_tmpdir(d)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def catch_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise KeyboardInterrupt, so `finally` blocks clean up."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second signal must not cut the cleanup short."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
