"""Prometheus metrics, with prometheus-client: served by `nftlb watch --metrics HOST:PORT`, or
written as a node_exporter textfile by `nftlb metrics --textfile PATH` (cron setups).

Every scrape reads the same sources as `nftlb status` (nftlb.status.collect): the kernel's
counters and conntrack are the truth, so a restarted watcher loses nothing. Only the probe
duration histogram lives in the watcher's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nftlb import status
from nftlb.errors import NftlbError, StateError, UsageError
from nftlb.kernel import Kernel

log = logging.getLogger("nftlb")
DEFAULT_PORT = 9650


class StatusCollector:
    """Turns one status.collect() into metric families at each scrape."""

    def __init__(self, make_kernel: Callable[[], Kernel], state_dir: Path, conntrack: str | None = None):
        self.make_kernel, self.state_dir, self.conntrack = make_kernel, Path(state_dir), conntrack
        self._nft: Kernel | None = None

    def collect(self):
        ok = GaugeMetricFamily("nftlb_status_ok", "1 when the last scrape could read the state dir and the kernel")
        try:
            if self._nft is None:
                self._nft = self.make_kernel()  # its own kernel handle: scrapes run in another thread
            doc = status.collect(self._nft, self.state_dir, conntrack=self.conntrack)
        except NftlbError as e:
            log.error("metrics: %s", e)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        labels = ["pool", "backend"]
        up = GaugeMetricFamily(
            "nftlb_backend_up",
            "1 when the health watcher sees the backend up (or does not probe it), 0 when down",
            labels=labels,
        )
        serving = GaugeMetricFamily(
            "nftlb_backend_serving", "1 when the backend takes new connections now", labels=labels
        )
        conns = CounterMetricFamily(
            "nftlb_backend_connections",
            "New connections sent to the backend since the table was loaded (kernel counter)",
            labels=labels,
        )
        packets = CounterMetricFamily(
            "nftlb_backend_packets",
            "Packets of the backend's connections, both directions (kernel counter)",
            labels=labels,
        )
        bytes_ = CounterMetricFamily(
            "nftlb_backend_bytes", "Bytes of the backend's connections, both directions (kernel counter)", labels=labels
        )
        opened = GaugeMetricFamily("nftlb_backend_open_connections", "Connections open now (conntrack)", labels=labels)
        transitions = CounterMetricFamily(
            "nftlb_backend_transitions", "Health state changes seen by the watcher", labels=[*labels, "to"]
        )
        reason = GaugeMetricFamily(
            "nftlb_backend_down_reason",
            "1 for a backend the watcher has down, with why its last probe failed (e.g. 'no reply by the client path')",
            labels=[*labels, "reason"],
        )
        for p in doc["pools"]:
            for b in p["backends"]:
                key = [p["name"], b["backend"]]
                h = b["health"]
                up.add_metric(key, 0 if h is not None and not h["up"] else 1)
                if h is not None and not h["up"]:
                    reason.add_metric([*key, h["last_error"] or "unknown"], 1)
                serving.add_metric(key, 1 if b["serving"] else 0)
                conns.add_metric(key, b["connections"])
                packets.add_metric(key, b["packets"])
                bytes_.add_metric(key, b["bytes"])
                if b["open"] is not None:
                    opened.add_metric(key, b["open"])
                counts = doc["transitions"].get(f"{p['name']}|{b['backend']}", {})
                for to in ("up", "down"):
                    transitions.add_metric([*key, to], counts.get(to, 0))
        yield from (up, serving, conns, packets, bytes_, opened, transitions, reason)
        applies = CounterMetricFamily("nftlb_applies", "Successful applies and rollbacks")
        applies.add_metric([], doc["applies"])
        failures = CounterMetricFamily(
            "nftlb_apply_failures", "Applies and rollbacks the kernel or the state dir refused"
        )
        failures.add_metric([], doc["apply_failures"])
        last = GaugeMetricFamily("nftlb_last_apply_success_timestamp_seconds", "Unix time of the last successful apply")
        last.add_metric([], doc["last_apply_success"] or 0)
        loaded = GaugeMetricFamily("nftlb_table_loaded", "1 when nftlb's table is in the kernel")
        loaded.add_metric([], 1 if doc["live"] else 0)
        yield from (applies, failures, last, loaded)


def registry(make_kernel: Callable[[], Kernel], state_dir: Path) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(StatusCollector(make_kernel, state_dir))
    return reg


def probe_histogram(reg: CollectorRegistry) -> Histogram:
    return Histogram(
        "nftlb_probe_duration_seconds",
        "Health probe duration (TCP connect or failure)",
        ["result"],
        registry=reg,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or PORT (loopback): where to serve the metrics."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UsageError(f"--metrics {text!r}: expected HOST:PORT, [V6]:PORT or PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return host, number


def serve(reg: CollectorRegistry, address: str) -> None:
    host, port = listen_address(address)
    try:
        start_http_server(port, addr=host, registry=reg)
    except OSError as e:
        raise StateError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
    log.info("metrics on http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def textfile(reg: CollectorRegistry, path: Path) -> None:
    """Written to a temp file and renamed (prometheus-client does both): node_exporter never
    reads half a file."""
    try:
        write_to_textfile(str(path), reg)
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror or e}") from None


def write_textfile(nft: Kernel, state_dir: Path, path: Path) -> None:
    """`nftlb metrics --textfile PATH`: fail loudly (exit 3) rather than write a file that says 0."""
    status.collect(nft, state_dir)
    textfile(registry(lambda: nft, state_dir), path)
