"""Backends whose I/O completes later: a network store (Ceph RBD) cannot
answer on the event loop the way a page-cache ``pread`` does.

An :class:`AsyncBackend` keeps the synchronous :class:`~.base.Backend`
methods (image tools, XCOPY and other rare paths use them) and adds
``aio_*`` methods that *submit at call time* and return an awaitable for
the completion. Submitting before returning keeps the order commands
arrived in, and lets the caller drop its Data-Out buffer at once. The SCSI
layer serves such a backend with :class:`target.scsi.lu_async.AsyncLogicalUnit`,
which awaits instead of blocking.

:class:`WriteGate` makes a COMPARE AND WRITE emulated from a read and a
write atomic against every other write of this process (SBC-3 §5.2): the
compare waits for writes in flight to finish, and writes that arrive
while it runs wait for it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .base import Backend, Buffer, Extent


class AsyncBackend(Backend):
    """A backend with completion-based I/O (see the module docstring)."""

    @abc.abstractmethod
    def aio_read(self, offset: int, length: int) -> Awaitable[Buffer]:
        """Submit a read of ``length`` bytes at ``offset``."""

    @abc.abstractmethod
    def aio_write(self, offset: int, data: Buffer) -> Awaitable[None]:
        """Submit a write; ``data`` may be reused once this returns."""

    @abc.abstractmethod
    def aio_flush(self) -> Awaitable[None]:
        """Make every completed write durable (SYNCHRONIZE CACHE, FUA)."""

    @abc.abstractmethod
    def aio_discard(self, offset: int, length: int) -> Awaitable[None]:
        """Deallocate a range (UNMAP); it then reads as zeroes when
        ``zero_after_discard``."""

    @abc.abstractmethod
    def aio_write_zeroes(self, offset: int, length: int) -> Awaitable[None]:
        """Make a range read as zeroes, keeping it allocated."""

    @abc.abstractmethod
    def aio_write_same(self, offset: int, length: int, block: bytes) -> Awaitable[None]:
        """Write ``block`` repeatedly over ``length`` bytes (WRITE SAME)."""

    @abc.abstractmethod
    def aio_compare_and_write(self, offset: int, compare: Buffer, data: Buffer) -> Awaitable[int]:
        """Atomically: when the medium at ``offset`` equals ``compare``
        write ``data`` and return -1, else write nothing and return the
        offset of the first differing byte."""

    @abc.abstractmethod
    def aio_extents(self, offset: int, length: int) -> Awaitable[list[Extent]]:
        """Mapped/deallocated runs covering the range (GET LBA STATUS)."""


def first_difference(a: Buffer, b: Buffer) -> int:
    """Offset of the first differing byte of two equal-length buffers, or
    -1 when equal (big-integer XOR: no per-byte Python loop)."""
    if a == b:
        return -1
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    if x == 0:
        return n
    return n - 1 - (x.bit_length() - 1) // 8


class WriteGate:
    """Orders writes around an emulated COMPARE AND WRITE (one event loop)."""

    def __init__(self) -> None:
        self._inflight = 0
        self._drained: asyncio.Future[None] | None = None
        self._busy: asyncio.Future[None] | None = None
        self._lock: asyncio.Lock | None = None

    def write(self, submit: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """Run ``submit`` (which starts a write and returns its completion)
        now, or after the COMPARE AND WRITE that is running."""
        if self._busy is None:
            return self._track(submit())
        return self._after(submit)

    def _track(self, pending: Awaitable[Any]) -> Awaitable[Any]:
        fut = asyncio.ensure_future(pending)
        self._inflight += 1
        fut.add_done_callback(self._retire)
        return fut

    def _retire(self, _: object) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    async def _after(self, submit: Callable[[], Awaitable[Any]]) -> Any:
        while self._busy is not None:
            await asyncio.shield(self._busy)
        return await self._track(submit())

    async def exclusive(self, body: Callable[[], Awaitable[int]]) -> int:
        """Run ``body`` with no other write of this gate in flight."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            loop = asyncio.get_running_loop()
            self._busy = loop.create_future()
            try:
                while self._inflight:
                    if self._drained is None:
                        self._drained = loop.create_future()
                    await asyncio.shield(self._drained)
                return await body()
            finally:
                busy, self._busy = self._busy, None
                busy.set_result(None)
