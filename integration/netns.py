"""Network namespaces for nftlb's kernel tests and benchmarks: the one toolkit both use.

Standard library only; needs root and the `ip` tool (iproute2). It only adds, enters and
deletes namespaces of its own, and kills processes living in them: nothing here touches the
root network namespace. Every command and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable

IP = shutil.which("ip") or "/usr/sbin/ip"
SYSCTL = shutil.which("sysctl") or "/usr/sbin/sysctl"
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL


class NetnsError(RuntimeError):
    """A namespace operation failed."""


class Timeout(NetnsError):
    """A bounded wait or command ran out of time."""


class CommandError(NetnsError):
    """A command exited non-zero; the message carries its stdout and stderr."""

    def __init__(self, argv, returncode, stdout, stderr):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout or ""
        self.stderr = stderr or ""
        super().__init__(
            f"command {' '.join(map(str, self.argv))!r} exited {returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run(argv, *, check: bool = True, timeout: float = 30.0, input: str | None = None, env=None,
        cwd=None) -> subprocess.CompletedProcess:
    """Run argv (text, output captured), bounded by `timeout`; CommandError on a non-zero exit when `check`."""
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise Timeout(f"command {' '.join(argv)!r} timed out after {timeout}s\n--- stdout ---\n{out}\n"
                      f"--- stderr ---\n{err}") from None
    if check and cp.returncode != 0:
        raise CommandError(argv, cp.returncode, cp.stdout, cp.stderr)
    return cp


def nsexec(ns: str, *argv, **kw) -> subprocess.CompletedProcess:
    """`ip netns exec ns argv...` through run()."""
    return run([IP, "netns", "exec", ns, *argv], **kw)


def batch(ns: str, commands: list[str], timeout: float = 30.0) -> None:
    """`ip -n ns -batch -`: one `ip` command a line, all inside ns."""
    run([IP, "-n", ns, "-batch", "-"], input="".join(c + "\n" for c in commands), timeout=timeout)


def sysctl(ns: str, *settings: str) -> None:
    """Set sysctls inside ns (a namespace's own net.* values; never the root namespace's)."""
    nsexec(ns, SYSCTL, "-q", "-w", *settings, timeout=10)


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = run([IP, "netns", "list"], timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add(namespaces: Iterable[str], created: list[str] | None = None) -> None:
    """Create the namespaces; each is appended to `created` before it exists, so that a
    teardown after a partial failure covers it too."""
    namespaces = list(namespaces)
    clash = set(namespaces) & set(list_netns())
    if clash:
        raise NetnsError(f"namespaces already exist: {sorted(clash)}")
    for ns in namespaces:
        if created is not None:
            created.append(ns)
        run([IP, "netns", "add", ns], timeout=10)


def pid_alive(pid: int) -> bool:
    """Is `pid` running (a zombie child of ours counts as gone, and is reaped)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pids(namespaces: Iterable[str], grace: float = KILL_GRACE, deadline: float | None = None) -> None:
    """SIGTERM, then SIGKILL, every process living in the namespaces (never this one)."""
    me = os.getpid()
    pids = set()
    for ns in namespaces:
        cp = run([IP, "netns", "pids", ns], check=False, timeout=10)
        pids |= {int(p) for p in cp.stdout.split() if p.isdigit() and int(p) != me}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        until = time.monotonic() + grace if deadline is None else min(deadline, time.monotonic() + grace)
        while pids and time.monotonic() < until:
            pids = {p for p in pids if pid_alive(p)}
            if pids:
                time.sleep(0.02)  # polling interval of a bounded wait
        if not pids:
            return


def delete(namespaces: Iterable[str], timeout: float = 15.0) -> list[str]:
    """Kill the processes in, then delete, the namespaces. Returns the names still there."""
    namespaces = list(namespaces)
    if not namespaces:
        return []
    deadline = time.monotonic() + timeout
    todo = [ns for ns in namespaces if ns in set(list_netns())]
    if not todo:
        return []
    kill_pids(todo, deadline=deadline)
    run([IP, "-force", "-batch", "-"], input="".join(f"netns delete {ns}\n" for ns in todo), check=False,
        timeout=max(1.0, deadline - time.monotonic()))
    left = [ns for ns in todo if ns in set(list_netns())]
    for ns in left:  # one more try, one at a time
        run([IP, "netns", "delete", ns], check=False, timeout=10)
    return [ns for ns in left if ns in set(list_netns())]


def wait_links_ready(namespaces: Iterable[str], timeout: float = 5.0) -> None:
    """Poll until every link but lo has its carrier and no IPv6 address is tentative."""
    deadline = time.monotonic() + timeout
    pending, last = list(namespaces), ""
    while True:
        still = []
        for ns in pending:
            links = json.loads(run([IP, "-n", ns, "-j", "link", "show"], timeout=10).stdout or "[]")
            down = [link["ifname"] for link in links
                    if link["ifname"] != "lo" and "LOWER_UP" not in link.get("flags", [])]
            tentative = run([IP, "-n", ns, "-6", "addr", "show", "tentative"], timeout=10).stdout.strip()
            if down or tentative:
                still.append(ns)
                last = f"{ns}: no carrier on {down}; tentative: {tentative!r}"
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            raise Timeout(f"links not ready after {timeout}s: {last}")
        time.sleep(0.02)  # polling interval of a bounded wait


def stop_process(proc: subprocess.Popen, grace: float = KILL_GRACE, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace`; `group`: its whole process group (a session of its own)."""
    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            if group:
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
