"""Prometheus metrics of a running target (``serve --metrics HOST:PORT``),
through the optional ``prometheus_client`` package (the ``metrics`` extra).

Nothing is counted for it on the I/O path: a custom collector reads, at
scrape time, the per-(session, LUN) counters the target keeps anyway
(:mod:`target.stats`), the sessions and connections, and the login
refusals by reason. The snapshot is taken on the event loop's thread (the
HTTP server has its own), so it never sees a half-updated table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from iscsi.names import parse_portal

from .stats import login_failures

if TYPE_CHECKING:
    from .server import TargetServer

MISSING = ("--metrics needs the prometheus_client package: "
           "pip install 'aioiscsi[metrics]'")


class MetricsUnavailable(Exception):
    """prometheus_client is not installed (one line for the user)."""


def _snapshot(server: TargetServer) -> dict[str, Any]:
    doc = server.show()
    doc["login_failures"] = dict(login_failures)
    return doc


class _Collector:
    """Yields the metric families from one snapshot per scrape."""

    def __init__(self, server: TargetServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        async def take() -> dict[str, Any]:
            return _snapshot(self._server)

        doc = asyncio.run_coroutine_threadsafe(take(), self._loop).result(timeout=10)
        labels = ["target", "lun"]
        fams = {
            "commands": CounterMetricFamily("aioiscsi_lun_commands", "SCSI commands", labels=labels),
            "read_bytes": CounterMetricFamily("aioiscsi_lun_read_bytes", "Bytes read (Data-In)",
                                              labels=labels),
            "written_bytes": CounterMetricFamily("aioiscsi_lun_written_bytes",
                                                 "Bytes written (Data-Out)", labels=labels),
            "errors": CounterMetricFamily("aioiscsi_lun_errors",
                                          "Commands ended with a status other than GOOD",
                                          labels=labels),
            "latency": CounterMetricFamily("aioiscsi_lun_latency_seconds",
                                           "Summed command latency", labels=labels),
        }
        size = GaugeMetricFamily("aioiscsi_lun_size_bytes", "LUN capacity", labels=labels)
        for t in doc["targets"]:
            for lun in t["luns"]:
                lv = [t["name"], str(lun["lun"])]
                c = lun["counters"]
                for key in ("commands", "read_bytes", "written_bytes", "errors"):
                    fams[key].add_metric(lv, c[key])
                fams["latency"].add_metric(lv, c["latency_ns_sum"] / 1e9)
                size.add_metric(lv, lun["size"])
        yield from fams.values()
        yield size
        sessions = GaugeMetricFamily("aioiscsi_sessions", "Sessions logged in",
                                     labels=["target"])
        conns = GaugeMetricFamily("aioiscsi_connections", "Connections of logged-in sessions",
                                  labels=["target"])
        per: dict[str, list[int]] = {}
        for s in doc["sessions"]:
            key = s["target"] or "(discovery)"
            n = per.setdefault(key, [0, 0])
            n[0] += 1
            n[1] += len(s["connections"])
        for t in doc["targets"]:
            per.setdefault(t["name"], [0, 0])
        for name, (ns, nc) in sorted(per.items()):
            sessions.add_metric([name], ns)
            conns.add_metric([name], nc)
        yield sessions
        yield conns
        failures = CounterMetricFamily("aioiscsi_login_failures", "Login refusals by reason",
                                       labels=["reason"])
        for reason, n in sorted(doc["login_failures"].items()):
            failures.add_metric([reason], n)
        yield failures


def serve_metrics(server: TargetServer, listen: str) -> Callable[[], None]:
    """Serve /metrics on ``listen`` (HOST:PORT); returns the function that
    stops it. Raises :class:`MetricsUnavailable` without prometheus_client,
    ValueError for a bad address, OSError when the port cannot be bound."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise MetricsUnavailable(MISSING) from None
    portal = parse_portal(listen, bare_v6=False)
    registry = CollectorRegistry()
    registry.register(_Collector(server, asyncio.get_running_loop()))
    httpd, thread = start_http_server(portal.port, addr=portal.host, registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    return stop
