"""Bandwidth groups: LUNs in a group share one byte-rate limit (VirtualBox
manual §5.8, "Limiting bandwidth for disk images", and ``VBoxManage
bandwidthctl``).

The limit is a token bucket in *debt* form. Every transfer is charged to
the group when it happens (``charge``), which may drive the balance below
zero; whoever wants to start the next transfer first waits until the debt
is paid back at the group's rate (``wait`` / ``wait_blocking``). So the
data path itself never blocks, the sum over all LUNs of a group never
exceeds the limit over any interval longer than the burst, and a LUN that
is idle leaves the whole rate to the others (the manual: "if one disk does
not require bandwidth the other can use the remaining bandwidth").

The limit can be changed while serving (``set_limit``, the seed's
``bandwidthctl set``): waiters are woken and recompute their delay at once.
A limit of 0 pauses the group's I/O until it is raised; ``None`` is no
limit.

Wiring into the asyncio SCSI layer: wrap the LUN's backend in
:class:`ThrottledBackend`; before running a READ/WRITE the logical unit does
``await backend.throttle()`` (present only on throttled backends), and the
wrapper's ``read``/``write`` charge the bytes. Code without an event loop
(benchmarks, threads) passes ``blocking=True`` and the wrapper waits inside
``read``/``write`` itself.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable

from .base import Backend, BackendError, Buffer, DelegatingBackend

__all__ = [
    "BandwidthGroup",
    "BandwidthGroups",
    "ThrottledBackend",
    "parse_limit",
]

_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*$")
# VBoxManage bandwidthctl --limit: the default unit is megabytes per second;
# k/m/g are kilo/mega/gigabits, K/M/G kilo/mega/gigabytes per second.
_UNITS = {"": 1_000_000, "K": 1_000, "M": 1_000_000, "G": 1_000_000_000,
          "k": 125, "m": 125_000, "g": 125_000_000}


def parse_limit(text: str) -> int:
    """Parse a ``bandwidthctl`` limit (``20``, ``20M``, ``500K``, ``100m``)
    into bytes per second; BackendError when malformed."""
    m = _LIMIT_RE.match(text)
    if not m:
        raise BackendError(f"bandwidth limit {text!r} is not allowed (e.g. 20M, 500K, 100m; plain = MB/s)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class BandwidthGroup:
    """One shared limit (bytes per second) and its token bucket.

    ``burst`` is the most the bucket saves up while idle (default: a
    quarter second's worth, at least 1 MiB so one large command is not
    split across waits). ``clock`` is injectable for tests. Thread-safe:
    one group may serve LUNs on the event loop and admin calls from another
    thread.
    """

    def __init__(self, name: str, limit: int | None, *, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit is not None and limit < 0:
            raise BackendError(f"bandwidth group {name}: limit {limit} is negative")
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._limit = limit
        self._burst_cfg = burst
        self._tokens = float(self._burst())
        self._stamp = clock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        #: Bytes charged since creation (for statistics and tests).
        self.total = 0

    def _burst(self) -> int:
        if self._burst_cfg is not None:
            return self._burst_cfg
        if not self._limit:
            return 0
        return max(self._limit // 4, 1 << 20)

    @property
    def limit(self) -> int | None:
        """Bytes per second; None is unlimited, 0 is paused."""
        return self._limit

    def _refill(self) -> None:
        now = self._clock()
        if self._limit:
            self._tokens = min(float(self._burst()), self._tokens + (now - self._stamp) * self._limit)
        self._stamp = now

    def set_limit(self, limit: int | None) -> None:
        """Change the limit now (``bandwidthctl set``); waiters re-evaluate."""
        if limit is not None and limit < 0:
            raise BackendError(f"bandwidth group {self.name}: limit {limit} is negative")
        with self._lock:
            self._refill()
            self._limit = limit
            if limit is None:
                self._tokens = max(self._tokens, 0.0)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, set()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` transferred (never blocks)."""
        with self._lock:
            self.total += nbytes
            if self._limit is None:
                return
            self._refill()
            self._tokens -= nbytes

    def delay(self) -> float:
        """Seconds until the debt is paid: 0 when a transfer may start now,
        ``inf`` while the group is paused with a debt."""
        with self._lock:
            return self._delay_locked()

    def _delay_locked(self) -> float:
        if self._limit is None:
            return 0.0
        self._refill()
        if self._tokens >= 0:
            return 0.0
        if self._limit == 0:
            return float("inf")
        return -self._tokens / self._limit

    async def wait(self) -> None:
        """Wait (without blocking the loop) until a transfer may start."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                d = self._delay_locked()
                if d <= 0:
                    return
                fut: asyncio.Future[None] = loop.create_future()
                entry = (loop, fut)
                self._waiters.add(entry)
            try:
                # A rate limiter has to wait for time to pass; set_limit
                # resolves the future early so a new limit applies at once.
                await asyncio.wait([fut], timeout=None if d == float("inf") else d)
            finally:
                with self._lock:
                    self._waiters.discard(entry)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Thread version of :meth:`wait`; False when ``timeout`` ran out."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                d = self._delay_locked()
                if d <= 0:
                    return True
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return False
                    d = min(d, left)
                self._cond.wait(None if d == float("inf") else d)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BandwidthGroups:
    """The named groups of a server (``bandwidthctl add|set|remove|list``)."""

    def __init__(self) -> None:
        self._groups: dict[str, BandwidthGroup] = {}

    def add(self, name: str, limit: int | str | None) -> BandwidthGroup:
        """Create group ``name``; a string limit is parsed as bandwidthctl does."""
        if name in self._groups:
            raise BackendError(f"bandwidth group {name!r} already exists")
        value = parse_limit(limit) if isinstance(limit, str) else limit
        group = BandwidthGroup(name, value)
        self._groups[name] = group
        return group

    def get(self, name: str) -> BandwidthGroup:
        """The group ``name``; BackendError listing the groups if unknown."""
        try:
            return self._groups[name]
        except KeyError:
            known = ", ".join(sorted(self._groups)) or "none defined"
            raise BackendError(f"bandwidth group {name!r} does not exist ({known})") from None

    def set(self, name: str, limit: int | str | None) -> None:
        """Change a group's limit while serving."""
        value = parse_limit(limit) if isinstance(limit, str) else limit
        self.get(name).set_limit(value)

    def remove(self, name: str) -> None:
        """Forget a group (LUNs still holding it keep its last limit)."""
        self.get(name)
        del self._groups[name]

    def list(self) -> list[tuple[str, int | None]]:
        """(name, bytes per second) of every group, sorted by name."""
        return [(n, g.limit) for n, g in sorted(self._groups.items())]


class ThrottledBackend(DelegatingBackend):
    """A backend whose reads and writes are charged to a bandwidth group.

    With ``blocking=False`` (the target) the asyncio caller awaits
    :meth:`throttle` before each transfer; with ``blocking=True`` the wrapper
    waits in ``read``/``write`` (threads, benchmarks). UNMAP and WRITE SAME
    move no data over the wire, so they are not charged (VirtualBox limits
    transferred bytes)."""

    def __init__(self, inner: Backend, group: BandwidthGroup, *, blocking: bool = False) -> None:
        super().__init__(inner)
        self.group = group
        self.blocking = blocking

    async def throttle(self) -> None:
        """Wait until the group allows the next transfer."""
        await self.group.wait()

    def read(self, offset: int, length: int) -> Buffer:
        if self.blocking:
            self.group.wait_blocking()
        data = self.inner.read(offset, length)
        self.group.charge(length)
        return data

    def write(self, offset: int, data: Buffer) -> None:
        if self.blocking:
            self.group.wait_blocking()
        self.inner.write(offset, data)
        self.group.charge(memoryview(data).nbytes)
