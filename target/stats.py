"""Per-LUN and per-session I/O counters the target keeps for ``show``.

They are cheap by construction: one :class:`IOCounters` per (session, LUN)
pair, updated with plain integer increments where a command completes
(``TargetConnection._done``), one dictionary lookup per command. Totals
per LUN and per session are summed only when someone asks (``show``), and
the pairs of a session that ended are folded into per-LUN totals then.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from typing import Any

#: Upper bounds (nanoseconds, inclusive) of the latency histogram's buckets,
#: from a page-cache hit (tens of µs) to a stalled disk (10 s); a last,
#: unbounded bucket follows. Prometheus' ``le`` labels are these in seconds.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(us * 1000) for us in (25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000,
                              50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
                              10_000_000))

#: Login refusals by reason (RFC 7143 §11.13.5 status words), process-wide,
#: for the metrics endpoint.
login_failures: Counter[str] = Counter()


class IOCounters:
    """Commands, Data-In/Data-Out bytes, failed commands and the summed
    latency (nanoseconds from the command starting to execute to its
    status) of some set of commands, with its histogram (``buckets[i]``
    counts latencies in (``LATENCY_BOUNDS_NS[i-1]``, ``LATENCY_BOUNDS_NS[i]``];
    the last bucket is everything slower)."""

    __slots__ = ("commands", "read_bytes", "written_bytes", "errors", "latency_ns", "buckets")

    def __init__(self) -> None:
        self.commands = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.errors = 0
        self.latency_ns = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)

    def record(self, status: int, read_bytes: int, written_bytes: int, latency_ns: int) -> None:
        """Count one finished command (status 0 is GOOD; anything else an
        error, whose bytes are not counted)."""
        self.commands += 1
        self.latency_ns += latency_ns
        self.buckets[bisect_left(LATENCY_BOUNDS_NS, latency_ns)] += 1
        if status:
            self.errors += 1
        else:
            self.read_bytes += read_bytes
            self.written_bytes += written_bytes

    def add(self, other: IOCounters) -> None:
        """Add ``other``'s counts to these."""
        self.commands += other.commands
        self.read_bytes += other.read_bytes
        self.written_bytes += other.written_bytes
        self.errors += other.errors
        self.latency_ns += other.latency_ns
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]

    @classmethod
    def total(cls, parts: Iterable[IOCounters]) -> IOCounters:
        """The sum of ``parts``."""
        out = cls()
        for p in parts:
            out.add(p)
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the counters plus the mean latency in microseconds
        (``latency_count`` is the number of commands the sum covers) and
        the histogram's per-bucket counts (bounds: :data:`LATENCY_BOUNDS_NS`)."""
        mean = self.latency_ns / self.commands / 1000 if self.commands else 0.0
        return {"commands": self.commands, "read_bytes": self.read_bytes,
                "written_bytes": self.written_bytes, "errors": self.errors,
                "latency_ns_sum": self.latency_ns, "latency_count": self.commands,
                "latency_us_avg": round(mean, 1), "latency_buckets": list(self.buckets)}
