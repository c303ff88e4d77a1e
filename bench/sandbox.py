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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

IP = shutil.which("ip") or "/usr/sbin/ip"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

NAME = ""  # e.g. "nlbhash"; set by init()
PREFIX = ""  # NAME + "<pid>-"

live_ns: list[str] = []  # created and not yet deleted, in creation order
live_procs: list[subprocess.Popen] = []
tmpdirs: list[str] = []


class BenchError(RuntimeError):
    pass


def init(name: str) -> str:
    """Name this run's namespaces and temp dirs name<pid>-...; clean up at exit.  Returns the prefix."""
    global NAME, PREFIX
    NAME, PREFIX = name, f"{name}{os.getpid()}-"
    atexit.register(cleanup_all)
    return PREFIX


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(argv, *, timeout: float, check: bool = True, input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {' '.join(argv)[:300]}") from None
    if check and cp.returncode != 0:
        raise BenchError(f"exit {cp.returncode}: {' '.join(argv)[:300]}\n"
                         f"stdout: {cp.stdout[-2000:]}\nstderr: {cp.stderr[-2000:]}")
    return cp


def nsexec(ns: str, *argv, timeout: float = 30, check: bool = True, input: str | None = None, cwd=None):
    return run([IP, "netns", "exec", ns, *argv], timeout=timeout, check=check, input=input, cwd=cwd)


def popen(ns: str, argv, **kwargs) -> subprocess.Popen:
    """Start argv in namespace ns, in a session of its own (so stop_proc can kill its group); recorded."""
    proc = subprocess.Popen([IP, "netns", "exec", ns, *map(str, argv)], stdin=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)
    live_procs.append(proc)
    return proc


def list_netns() -> list[str]:
    out = run([IP, "netns", "list"], timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_proc(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: `ip netns exec` and what runs under it
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    if proc in live_procs:
        live_procs.remove(proc)


def add_namespaces(namespaces) -> None:
    clash = set(namespaces) & set(list_netns())
    if clash:
        raise BenchError(f"namespaces already exist: {sorted(clash)}")
    for ns in namespaces:
        live_ns.append(ns)  # recorded first: a partial failure is cleaned up too
        run([IP, "netns", "add", ns], timeout=10)


def ip_batch(ns: str, cmds: list[str]) -> None:
    """`ip -n ns -batch -`: one `ip` command a line, all inside ns."""
    run([IP, "-n", ns, "-batch", "-"], input="".join(c + "\n" for c in cmds), timeout=30)


def wait_carrier(namespaces, timeout: float = 5.0) -> None:
    """Wait (bounded) until every link but lo in the namespaces has its carrier."""
    deadline = time.monotonic() + timeout
    while True:
        down = []
        for ns in namespaces:
            links = json.loads(run([IP, "-n", ns, "-j", "link", "show"], timeout=10).stdout or "[]")
            down += [f"{ns}:{l['ifname']}" for l in links
                     if l["ifname"] != "lo" and "LOWER_UP" not in l.get("flags", [])]
        if not down:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"no carrier after {timeout}s: {down}")
        time.sleep(0.05)  # polling interval of a bounded wait


def _is_dead_run_ns(ns: str) -> bool:
    if not NAME:
        raise BenchError("sandbox.init() was not called")
    m = re.match(rf"{re.escape(NAME)}(\d+)-", ns)
    return bool(m) and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))


def stale_namespaces() -> list[str]:
    """Namespaces of an earlier run of the same script whose process is dead."""
    return [ns for ns in list_netns() if _is_dead_run_ns(ns)]


def kill_ns_pids(namespaces, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, whatever still runs in OUR namespaces."""
    me = os.getpid()
    pids = set()
    for ns in namespaces:
        cp = run([IP, "netns", "pids", ns], timeout=10, check=False)
        pids |= {int(p) for p in cp.stdout.split() if p.isdigit() and int(p) != me}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            pids = {p for p in pids if pid_alive(p)}
            if pids:
                time.sleep(0.05)  # polling interval of a bounded wait
        if not pids:
            return


def delete_namespaces(namespaces) -> list[str]:
    """Kill processes in and delete the given namespaces (only ever ours). Returns leftovers."""
    if not PREFIX:
        raise BenchError("sandbox.init() was not called")
    todo = [ns for ns in namespaces if ns.startswith(PREFIX) or _is_dead_run_ns(ns)]
    if not todo:
        return []
    existing = set(list_netns())
    todo = [ns for ns in todo if ns in existing]
    kill_ns_pids(todo)
    for ns in todo:
        run([IP, "netns", "delete", ns], timeout=15, check=False)
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
