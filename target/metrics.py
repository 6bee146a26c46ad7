"""Prometheus metrics of a running target (``serve --metrics HOST:PORT``),
through the optional ``prometheus_client`` package (the ``metrics`` extra).

Nothing is counted for it on the I/O path: a custom collector reads, at
scrape time, the per-(session, LUN) counters the target keeps anyway
(:mod:`target.stats`), the sessions and connections, and the login
failures by reason (refusals by their status words, ``malformed PDU``,
``PDU before login``, ``login timeout``, ``abandoned``).

Families: ``aioiscsi_lun_{commands,read_bytes,written_bytes,errors}_total``
and the histogram ``aioiscsi_lun_latency_seconds`` {target, lun}; the same as
``aioiscsi_session_*`` {target, lun, initiator, isid, tsih} while a session
lives; ``aioiscsi_lun_size_bytes``; ``aioiscsi_sessions`` and
``aioiscsi_connections`` {target}; ``aioiscsi_login_failures_total``
{reason}. Per target: ``sum by (target)`` of the LUN families. The snapshot is taken on the event loop's thread (the
HTTP server has its own), so it never sees a half-updated table.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import parse_metrics_address
from .stats import LATENCY_BOUNDS_NS, login_failures

log = logging.getLogger("aioiscsi.target")

if TYPE_CHECKING:
    from .server import TargetServer

MISSING = ("--metrics needs the prometheus_client package: "
           "pip install 'aioiscsi[metrics]'")


class MetricsUnavailable(Exception):
    """prometheus_client is not installed (one line for the user)."""


def _snapshot(server: TargetServer) -> dict[str, Any]:
    doc = server.show()
    doc["login_failures"] = dict(login_failures)
    doc["connections_total"] = len(server.connections)
    return doc


#: (counter key in target/stats.py, metric name part, help text)
_IO = (("commands", "commands", "SCSI commands completed"),
       ("read_bytes", "read_bytes", "Bytes read (Data-In)"),
       ("written_bytes", "written_bytes", "Bytes written (Data-Out and immediate data)"),
       ("errors", "errors", "Commands ended with a status other than GOOD"))


class _Families:
    """The I/O counter families of one scope (``lun`` or ``session``):
    commands, bytes, errors and a latency histogram (the time from a
    command starting to execute to its status, in the buckets of
    :data:`target.stats.LATENCY_BOUNDS_NS`; the mean is
    ``rate(_sum) / rate(_count)``, percentiles ``histogram_quantile``)."""

    def __init__(self, scope: str, what: str, labels: list[str]) -> None:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        self.counters = {key: CounterMetricFamily(f"aioiscsi_{scope}_{name}", f"{doc} {what}",
                                                  labels=labels) for key, name, doc in _IO}
        self.latency = HistogramMetricFamily(
            f"aioiscsi_{scope}_latency_seconds",
            f"Time from a command starting to execute to its status {what}", labels=labels)

    def add(self, labels: list[str], c: dict[str, Any]) -> None:
        for key, _, _ in _IO:
            self.counters[key].add_metric(labels, c[key])
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BOUNDS_NS, None), c["latency_buckets"]):
            cumulative += n
            buckets.append((repr(bound / 1e9) if bound is not None else "+Inf", cumulative))
        self.latency.add_metric(labels, buckets, c["latency_ns_sum"] / 1e9)

    def __iter__(self) -> Iterator[Any]:
        yield from self.counters.values()
        yield self.latency


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
        luns = _Families("lun", "per LUN (sessions that ended included)", labels)
        size = GaugeMetricFamily("aioiscsi_lun_size_bytes", "LUN capacity", labels=labels)
        for t in doc["targets"]:
            for lun in t["luns"]:
                lv = [t["name"], str(lun["lun"])]
                luns.add(lv, lun["counters"])
                size.add_metric(lv, lun["size"])
        yield from luns
        yield size
        # Per live session and LUN: the series of a session end with it;
        # the LUN families above keep its counts.
        per_session = _Families("session", "per live session and LUN",
                                ["target", "lun", "initiator", "isid", "tsih"])
        sessions = GaugeMetricFamily("aioiscsi_sessions", "Sessions logged in",
                                     labels=["target"])
        conns = GaugeMetricFamily("aioiscsi_connections",
                                  "Connections of logged-in sessions; target=\"(login)\": "
                                  "connections still logging in", labels=["target"])
        per: dict[str, list[int]] = {}
        for s in doc["sessions"]:
            key = s["target"] or "(discovery)"
            n = per.setdefault(key, [0, 0])
            n[0] += 1
            n[1] += len(s["connections"])
            for lun, c in s["luns"].items():
                per_session.add([key, lun, s["initiator"], s["isid"], str(s["tsih"])], c)
        for t in doc["targets"]:
            per.setdefault(t["name"], [0, 0])
        for name, (ns, nc) in sorted(per.items()):
            sessions.add_metric([name], ns)
            conns.add_metric([name], nc)
        conns.add_metric(["(login)"], max(0, doc["connections_total"] -
                                          sum(nc for _, nc in per.values())))
        yield from per_session
        yield sessions
        yield conns
        failures = CounterMetricFamily("aioiscsi_login_failures", "Login refusals by reason",
                                       labels=["reason"])
        for reason, n in sorted(doc["login_failures"].items()):
            failures.add_metric([reason], n)
        yield failures


class MetricsEndpoint:
    """A /metrics HTTP server running on its own thread."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = str(httpd.server_address[0]), int(httpd.server_address[1])
        #: Where it listens, ``host:port`` (``[v6]:port``), the port as bound.
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(server: TargetServer, listen: str) -> MetricsEndpoint:
    """Serve /metrics on ``listen`` (HOST:PORT; port 0 picks a free one).
    Raises :class:`MetricsUnavailable` without prometheus_client,
    ValueError for a bad address, OSError when the port cannot be bound.
    Call it on the loop's thread: the collector snapshots ``server`` there."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise MetricsUnavailable(MISSING) from None
    host, port = parse_metrics_address(listen)
    registry = CollectorRegistry()
    registry.register(_Collector(server, asyncio.get_running_loop()))
    # (server, thread) is returned since prometheus_client 0.20.
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(httpd, thread)
    log.info("metrics on http://%s/metrics", endpoint.address,
             extra={"event": "metrics_listening", "address": endpoint.address})
    return endpoint
