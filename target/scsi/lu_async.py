"""A logical unit over an :class:`~target.backends.aio.AsyncBackend`
(Ceph RBD): the same SCSI emulation, with the backend's I/O awaited
instead of blocking the event loop.

The command handlers of :class:`~target.scsi.lu.LogicalUnit` stay the one
implementation of every CDB check (SPC-4 §5.14 order, SBC-3 fields). What
they see as ``self.backend`` here is a :class:`_Deferring` stand-in: the
writes, discards and zeroings a handler makes are recorded, and once the
handler returns they are submitted to the backend in that order and the
command completes when they do. A READ gets a placeholder that the data
replaces on completion; a flush (FUA, SYNCHRONIZE CACHE) is the backend's
``aio_flush`` awaited after the command's writes completed.

COMPARE AND WRITE goes to the backend's own atomic ``aio_compare_and_write``
(SBC-3 §5.2). GET LBA STATUS and VERIFY, which need the medium's contents
or map while the handler runs, run in a worker thread. The rare paths that
read outside a command (the partial last block of a short Data-Out,
ORWRITE, EXTENDED COPY) use the backend's blocking calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Any

from iscsi.scsi.sense import miscompare
from target.backends.aio import AsyncBackend
from target.backends.base import Backend, BackendError, Buffer, DelegatingBackend, Extent

from .lu import LogicalUnit
from .lu_base import HandlerResult
from .pr_shared import SharedReservations
from .types import SIMPLE, LUConfig, Nexus, ScsiResult

log = logging.getLogger("aioiscsi.target")

#: Recorded operations: (kind, offset, length or data).
_Op = tuple[str, int, Any]

#: The Data-In of a deferred READ, replaced by the data when it arrives.
_PENDING_READ = memoryview(b"")


class _AgreesWithAll(bytes):
    """The medium's side of a deferred COMPARE AND WRITE: the handler's
    compare must pass so that it records the write; the backend compares."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = bytes.__hash__


class _Deferring(DelegatingBackend):
    """The backend as handlers see it: records mutations while a command
    is being decoded, passes everything through otherwise."""

    def __init__(self, inner: AsyncBackend) -> None:
        super().__init__(inner)
        self.aio = inner
        #: Operations of the command being decoded (None: not recording).
        self.ops: list[_Op] | None = None
        #: "read": defer reads (READ); "caw": reads agree (COMPARE AND WRITE).
        self.mode = ""

    def read(self, offset: int, length: int) -> Buffer:
        if self.ops is not None and self.mode == "read":
            self.ops.append(("read", offset, length))
            return _PENDING_READ
        if self.ops is not None and self.mode == "caw":
            self.ops.append(("read", offset, length))
            return _AgreesWithAll()
        return self.inner.read(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        if self.ops is None:
            self.inner.write(offset, data)
        else:
            self.ops.append(("write", offset, data))

    def discard(self, offset: int, length: int) -> None:
        if self.ops is None:
            self.inner.discard(offset, length)
        else:
            self.ops.append(("discard", offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.ops is None:
            self.inner.write_zeroes(offset, length)
        else:
            self.ops.append(("zeroes", offset, length))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self.inner.extents(offset, length)


class AsyncLogicalUnit(LogicalUnit):
    """A disk LU whose backend completes I/O asynchronously."""

    _deferring: _Deferring

    def __init__(self, backend: AsyncBackend, config: LUConfig | None = None) -> None:
        self._shared: SharedReservations | None = None
        super().__init__(backend, config)
        self._share_reservations()

    def bind(self, target_name: str, lun: int) -> None:
        super().bind(target_name, lun)
        self._share_reservations()

    def _share_reservations(self) -> None:
        """Persistent reservations kept in the backend's cluster when it
        offers a store (Ceph RBD), so every gateway of the image enforces
        them (target/scsi/pr_shared.py); else the unit's own."""
        if self._shared is None:
            make = getattr(self._deferring.aio, "pr_store", None)
            if make is None:
                return
            try:
                self._shared = SharedReservations(make())
            except BackendError as exc:
                log.warning("%s; persistent reservations are this process's only", exc)
                return
        self.reservations = self._shared

    @property
    def backend(self) -> Backend:
        """The recording stand-in; assigning a backend wraps it."""
        return self._deferring

    @backend.setter
    def backend(self, value: Backend) -> None:
        if isinstance(value, _Deferring):
            value = value.aio
        if not isinstance(value, AsyncBackend):
            raise TypeError(f"{type(value).__name__} has no asynchronous I/O")
        self._deferring = _Deferring(value)

    # ----- the entry point ---------------------------------------------------

    def execute_now(
        self,
        nexus: Nexus,
        cdb: bytes,
        data_out: Buffer | None = None,
        attr: int = SIMPLE,
        *,
        expected_length: int | None = None,
    ) -> ScsiResult | Awaitable[ScsiResult]:
        d = self._deferring
        ops: list[_Op] = []
        d.ops = ops
        try:
            result = super().execute_now(nexus, cdb, data_out, attr,
                                         expected_length=expected_length)
        finally:
            d.ops, d.mode = None, ""
        if not ops:
            return result
        caw = ops[0][0] == "read" and len(ops) == 2 and cdb[0] == 0x89
        try:
            pending = self._submit(ops, data_out, caw)
        except Exception as exc:  # noqa: BLE001 - mapped to SCSI status
            if not isinstance(result, ScsiResult):
                _discard(result)
            return self._failed(cdb, exc)
        return self._complete(cdb, pending, result, caw)

    def _submit(self, ops: list[_Op], data_out: Buffer | None, caw: bool
                ) -> list[asyncio.Future[Any]]:
        """Start the recorded operations in the order the handler made them."""
        aio = self._deferring.aio
        if caw:
            (_, off, n), (_, _, new) = ops
            assert data_out is not None
            return [asyncio.ensure_future(
                aio.aio_compare_and_write(off, memoryview(data_out)[:n], new))]
        started: list[asyncio.Future[Any]] = []
        for kind, off, arg in ops:
            if kind == "read":
                aw: Awaitable[Any] = aio.aio_read(off, arg)
            elif kind == "write":
                aw = aio.aio_write(off, arg)
            elif kind == "discard":
                aw = aio.aio_discard(off, arg)
            else:
                aw = aio.aio_write_zeroes(off, arg)
            started.append(asyncio.ensure_future(aw))
        return started

    async def _complete(self, cdb: bytes, pending: list[asyncio.Future[Any]],
                        result: ScsiResult | Awaitable[ScsiResult], caw: bool) -> ScsiResult:
        # Every operation runs to its end before the command does (none is
        # left writing after CHECK CONDITION); the first error answers.
        done: list[Any] = list(await asyncio.gather(*pending, return_exceptions=True))
        try:
            for d in done:
                if isinstance(d, BaseException):
                    raise d
            if caw and done[0] >= 0:
                raise miscompare(done[0])
        except Exception as exc:  # noqa: BLE001 - mapped to SCSI status
            if not isinstance(result, ScsiResult):
                _discard(result)
            return self._failed(cdb, exc)
        if not isinstance(result, ScsiResult):
            result = await result  # the flush of FUA / write-through, after the writes
        if result.data is _PENDING_READ:
            return ScsiResult(result.status, result.sense, done[0])
        return result

    # ----- handlers with a different shape --------------------------------------

    def _read(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        self._deferring.mode = "read"
        return super()._read(nexus, cdb, data, el)

    def _compare_and_write(self, nexus: Nexus, cdb: bytes, data: Buffer | None,
                           el: int | None) -> HandlerResult:
        self._deferring.mode = "caw"
        return super()._compare_and_write(nexus, cdb, data, el)

    def _get_lba_status(self, nexus: Nexus, cdb: bytes, data: Buffer | None,
                        el: int | None) -> HandlerResult:
        # The map walk (diff_iterate) blocks: a thread, as for a flush.
        return self._in_thread(LogicalUnit._get_lba_status, nexus, cdb, data, el)

    def _verify(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        return self._in_thread(LogicalUnit._verify, nexus, cdb, data, el)

    async def _in_thread(self, handler: Any, nexus: Nexus, cdb: bytes, data: Buffer | None,
                         el: int | None) -> ScsiResult:
        """Run a synchronous handler (one that reads the medium while it
        decides) in a worker thread; it reads through to the backend."""
        result: HandlerResult = await asyncio.to_thread(handler, self, nexus, cdb, data, el)
        return result if isinstance(result, ScsiResult) else await result

    def _pr_out(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        shared = self._shared
        if shared is None or self.reservations is not shared:
            return super()._pr_out(nexus, cdb, data, el)

        async def run() -> ScsiResult:
            result = await shared.run_out(lambda: LogicalUnit._pr_out(self, nexus, cdb, data, el))
            assert isinstance(result, ScsiResult)
            return result

        return run()

    async def _flush_then(self, result: ScsiResult) -> ScsiResult:
        await self._deferring.aio.aio_flush()
        return result


def _discard(pending: Awaitable[ScsiResult]) -> None:
    """Close a coroutine that will not be awaited (no 'never awaited' warning)."""
    close = getattr(pending, "close", None)
    if close is not None:
        close()
