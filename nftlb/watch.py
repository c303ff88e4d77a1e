"""nftlb watch: probe every backend over TCP and, on each up/down change, commit one small
transaction that rewrites only the affected pools.

The watcher keeps no private copy of the ruleset. Each change goes through ops.refresh()
under the state lock: re-plan the applied file with the new health view and drains, and
commit the difference. So `nftlb apply`, `drain` and the watcher never undo each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from nftlb import desired, health, ops, plan, probes, schema, state
from nftlb.errors import ConfigError, ExitStatus, NftlbError
from nftlb.kernel import Kernel

log = logging.getLogger("nftlb")
SAVE_EVERY = 10.0  # seconds between health.json writes when only probe times changed


class Watcher:
    def __init__(
        self,
        nft: Kernel,
        state_dir: Path,
        *,
        probe: probes.Probe = probes.tcp_probe,
        path_probe: probes.Probe | None = None,
        concurrency: int = 256,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        observe: Callable[[bool, float], None] | None = None,
    ):
        self.nft, self.state_dir, self.probe = nft, Path(state_dir), probe
        # `health: path` backends: by the clients' path, and when that fails, `probe` says why
        self.path_probe = path_probe or probes.by_path(probes.path_probe, probe)
        self.observe = observe  # (ok, seconds) of every probe: the metrics' histogram
        self.concurrency, self.monotonic, self.wall = concurrency, monotonic, wall
        doc = state.read_doc(self.state_dir, state.HEALTH) or {}
        self.records = health.load(doc)
        self.retry_whole_table = bool(doc.get("retry_whole_table"))
        self._written, self._written_at = self._essence(doc), 0.0
        self._applied_stat: tuple[int, int, int] | None = None
        self.targets: dict[str, health.Target] = {}
        self.due: dict[str, float] = {}
        self.config: schema.Config | None = None
        self._source: tuple[str, str] | None = None
        self._idle = False
        self.transactions = 0  # committed by this watcher (tests and metrics count them)
        self.sync()

    # -- what to probe ------------------------------------------------------

    def sync(self) -> None:
        """Follow the applied file: probe its backends; forget backends it no longer has."""
        try:
            st = os.stat(self.state_dir / state.APPLIED)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self._applied_stat:
            return  # applied.json unchanged since the last look: nothing to re-read
        applied = state.load(self.state_dir)
        self._applied_stat = stamp  # only once read: a failed read is tried again next round
        if applied is None:
            if not self._idle:
                log.error("nothing applied in %s (removed?): probing nothing until `nftlb apply`", self.state_dir)
            self._idle, self._source, self.config, self.targets, self.due = True, None, None, {}, {}
            return
        self._idle = False
        if (applied.source, applied.source_text) == self._source:
            return
        self._source = (applied.source, applied.source_text)
        self.config = desired.parse(applied.source_text, applied.source)
        now = self.monotonic()
        self.targets = {t.key: t for t in health.targets(self.config)}
        self.records = {k: self.records.get(k) or health.Record() for k in self.targets}
        self.due = {k: self.due.get(k, now) for k in self.targets}
        log.info("watching %d backends in %d pools", len(self.targets), len({t.pool for t in self.targets.values()}))

    # -- probing ------------------------------------------------------------

    async def probe_round(self, keys: list[str]) -> list[health.Transition]:
        """Probe `keys` concurrently (bounded) and fold the results into the records."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(key: str):
            t = self.targets[key]
            async with gate:
                started = time.monotonic()
                try:
                    result = await (self.path_probe if t.path else self.probe)(t.address, t.port, t.settings.timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    result = (False, f"probe error: {type(e).__name__}: {e}", None)
                if self.observe is not None:
                    self.observe(result[0], time.monotonic() - started)
                return key, result

        began = self.monotonic()
        results = await asyncio.gather(*(one(k) for k in keys))
        wall = self.wall()
        out = []
        for key, (ok, detail, latency) in results:
            t = self.targets[key]
            # next probe one interval after this round began, not after it ended: a round lasts as
            # long as its slowest probe (a black hole: the whole timeout), and counting from its
            # end would stretch every other backend's interval by that much
            self.due[key] = began + t.settings.interval
            transition = health.observe(self.records[key], t, ok, detail, latency, wall)
            if transition:
                out.append(transition)
        return out

    # -- committing ---------------------------------------------------------

    def commit(self, transitions: list[health.Transition]) -> bool:
        """Persist the health view; if it changed what should be live, commit the difference.

        A failed transaction is logged and retried on the next round with the whole table.
        """
        for t in transitions:
            (log.info if t.up else log.warning)("%s", t)
        if transitions:
            try:
                state.bump_stats(
                    self.state_dir, transitions=[(t.target.pool, t.target.backend, t.up) for t in transitions]
                )
            except NftlbError as e:
                log.error("cannot count transitions: %s", e)
        if not transitions and not self.retry_whole_table:
            self._save_logged()
            return True
        try:
            with state.lock(self.state_dir):
                # the new health view and the transaction it asks for, under the one lock that
                # apply, drain/enable and rollback take: none of them sees the one without the other
                self._save()
                result = ops.refresh(self.nft, self.state_dir, whole_table=self.retry_whole_table)
        except NftlbError as e:
            log.error("transaction failed; will retry with the whole table: %s", e)
            self.retry_whole_table = True
            self._save_logged()
            return False
        self.retry_whole_table = False
        self._save_logged()
        if result.changed:
            self.transactions += 1
            what = "the whole table" if result.whole_table else "pools " + ", ".join(result.changed)
            log.info("committed %s", what)
        self._report(result.plan, {t.target.pool for t in transitions})
        return True

    @staticmethod
    def _essence(doc: dict) -> dict:
        """What must reach the disk at once: all but probe times and latencies."""
        return {
            "retry_whole_table": bool(doc.get("retry_whole_table")),
            "backends": {
                k: {f: v for f, v in r.items() if f not in ("checked", "latency")}
                for k, r in (doc.get("backends") or {}).items()
            },
        }

    def _save(self, force: bool = False) -> None:
        """health.json: at once when a state changes, else at most every SAVE_EVERY seconds."""
        doc = health.dump(self.records)
        doc["retry_whole_table"] = self.retry_whole_table
        essence = self._essence(doc)
        if force or essence != self._written or self.wall() - self._written_at >= SAVE_EVERY:
            state.write_doc(self.state_dir, state.HEALTH, doc)
            self._written, self._written_at = essence, self.wall()

    def _save_logged(self) -> None:
        """_save(), a failure logged: the next round writes again (its essence still differs)."""
        try:
            self._save()
        except NftlbError as e:
            log.error("cannot record the health view: %s", e)

    def _report(self, committed: plan.Plan, pools: set[str]) -> None:
        for name in sorted(pools):
            p = committed.pool(name)
            if p is None:
                continue
            if not p.slots:
                log.error("pool %s: no backend up; refusing new connections to %s", name, p.service)
            elif p.fallback == "keep-last":
                log.error(
                    "pool %s: ALL BACKENDS DOWN; keep-last leaves %s in place",
                    name,
                    ", ".join(b.display for b in p.active),
                )
            elif p.fallback == "backups":
                log.warning(
                    "pool %s: no primary up; serving from backups %s", name, ", ".join(b.display for b in p.active)
                )

    def close(self) -> None:
        """On the way out: the gateway's conntrack entries of path probes go (they would time out
        within seconds anyway: probes end with a reset)."""
        for address in self.config.path_sources() if self.config is not None else ():
            try:
                self.nft.conntrack.forget_replies_to(str(address))
            except NftlbError as e:
                log.error("cannot delete the path probes' conntrack entries: %s", e)

    # -- loops --------------------------------------------------------------

    async def step(self) -> list[health.Transition]:
        """Follow the applied file, probe the backends that are due, commit what changed."""
        self.sync()
        now = self.monotonic()
        due = [k for k, at in self.due.items() if at <= now]
        transitions = await self.probe_round(due) if due else []
        if due or self.retry_whole_table:
            self.commit(transitions)
        return transitions

    def once(self) -> bool:
        """One round of every backend, for cron: counters persist in the state dir."""
        transitions = asyncio.run(self.probe_round(list(self.targets)))
        ok = self.commit(transitions)
        self._save(force=True)  # the next run starts from this round's streaks and times
        return ok

    async def run(
        self,
        stop: asyncio.Event,
        reload: Callable[[], None] | None = None,
        reload_requested: asyncio.Event | None = None,
    ) -> None:
        """Probe each backend every `interval` until `stop` is set."""
        while not stop.is_set():
            if reload_requested is not None and reload_requested.is_set():
                reload_requested.clear()
                if reload:
                    reload()
            try:
                await self.step()
                wait = min(self.due.values(), default=self.monotonic() + 1.0) - self.monotonic()
            except NftlbError as e:  # e.g. an unreadable state file: say so, keep watching
                log.error("watch round failed: %s", e)
                wait = 1.0
            events = [e for e in (stop, reload_requested) if e is not None]
            waiters = [asyncio.ensure_future(e.wait()) for e in events]
            await asyncio.wait(waiters, timeout=max(0.0, min(wait, 1.0)), return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()


def serve(file: Path, nft: Kernel, state_dir: Path, *, metrics_at: str | None = None, **kw) -> ExitStatus:
    """`nftlb watch FILE`: apply FILE, then watch until SIGTERM; SIGHUP re-applies FILE.
    With `metrics_at` (HOST:PORT), serve Prometheus metrics there."""
    state_dir = Path(state_dir)
    desired.check(file)  # a bad file is refused before the state dir is touched
    fd = state.watch_lock(state_dir)
    try:
        if metrics_at is not None:
            from nftlb import (
                kernel,  # prometheus-client only when asked
                metrics,
            )

            reg = metrics.registry(lambda: kernel.make(nft.name), state_dir)
            histogram = metrics.probe_histogram(reg)
            kw["observe"] = lambda ok, seconds: histogram.labels("ok" if ok else "failed").observe(seconds)
            metrics.serve(reg, metrics_at)
        r = ops.apply(file, nft, state_dir)
        log.info(
            "nftlb watch (pid %d): %s table inet %s from %s",
            os.getpid(),
            "applied" if r.action == "applied" else "in sync:",
            r.summary["table"],
            file,
        )
        watcher = Watcher(nft, state_dir, **kw)

        def reload() -> None:
            try:
                r = ops.apply(file, nft, state_dir)
            except ConfigError as e:
                log.error("SIGHUP: %s is not valid; keeping the running config:\n%s", file, e)
                return
            except NftlbError as e:
                log.error("SIGHUP: applying %s failed; keeping the running config: %s", file, e)
                return
            log.info("SIGHUP: %s %s", file, "applied" if r.action == "applied" else "unchanged")

        async def main() -> None:
            stop, hup = asyncio.Event(), asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, hup.set)
            await watcher.run(stop, reload, hup)

        try:
            asyncio.run(main())
        finally:
            watcher.close()
        log.info("nftlb watch stopped")
        return ExitStatus.OK
    finally:
        os.close(fd)


def run_once(file: Path, nft: Kernel, state_dir: Path, **kw) -> bool:
    """`nftlb watch FILE --once`: bring the table to FILE (a no-op when in sync), then one
    probe round of every backend; streaks persist in the state dir between runs."""
    desired.check(file)  # a bad file is refused before the state dir is touched
    fd = state.watch_lock(Path(state_dir), once=True)  # waits for another --once round to end
    try:
        ops.apply(file, nft, state_dir)
        watcher = Watcher(nft, state_dir, **kw)
        try:
            return watcher.once()
        finally:
            watcher.close()
    finally:
        os.close(fd)


def command(
    file: Path,
    nft: Kernel,
    state_dir: Path,
    *,
    once: bool = False,
    concurrency: int = 256,
    metrics_at: str | None = None,
) -> ExitStatus:
    """`nftlb watch FILE`: the daemon, or with `once` a single round for cron."""
    if once:
        return ExitStatus.OK if run_once(file, nft, state_dir, concurrency=concurrency) else ExitStatus.SYSTEM
    if metrics_at is not None:
        from nftlb import metrics

        metrics.listen_address(metrics_at)  # a bad address is a usage error before anything starts
    return serve(file, nft, state_dir, concurrency=concurrency, metrics_at=metrics_at)
