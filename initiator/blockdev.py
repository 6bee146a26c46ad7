"""A LUN as a byte-addressed block device, async and as a Python file.

:class:`BlockDevice` reads and writes at any byte offset: the block-aligned
middle of a request goes straight between the caller's buffer and the wire
(Data-In lands in it, Data-Out is sent from it), split into transfers of at
most the LU's MAXIMUM TRANSFER LENGTH (Block Limits VPD, SBC-3 §6.5.3) that run
concurrently; partial blocks at the edges are read-modify-written under a
per-block lock so two writes to different bytes of one block never lose
each other's data.

:class:`LUNFile` is a synchronous seekable ``io.RawIOBase`` over a
BlockDevice whose event loop runs in a background thread, so ordinary code can
``open`` a LUN and ``read``/``write``/``seek`` it (wrap it in
``io.BufferedRandom`` for small I/O).
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from iscsi.names import parse_url
from iscsi.pdu import Buffer
from iscsi.scsi.constants import SenseKey

from .errors import InitiatorError
from .scsi import LUN, Capacity, SCSICheckCondition
from .session import Session, SessionOptions, new_event_loop

T = TypeVar("T")

#: Largest single transfer when the LU states no limit.
DEFAULT_MAX_TRANSFER = 1 << 20


def options_from_url(url: str, options: SessionOptions | None = None
                     ) -> tuple[str, int, str, int, SessionOptions]:
    """(host, port, target, lun, options) of an ``iscsi://host/target/lun``
    URL; credentials in the URL fill the CHAP fields of ``options``."""
    u = parse_url(url)
    if u.target is None or u.lun is None:
        raise InitiatorError(f"{url}: the URL names no target and LUN",
                             hint="use iscsi://host[:port]/target-iqn/lun")
    opts = options or SessionOptions()
    if u.user is not None:
        opts.chap_user, opts.chap_secret = u.user, u.password
    if u.target_user is not None:
        opts.target_chap_user, opts.target_chap_secret = u.target_user, u.target_password
    if u.header_digest is not None:
        opts.header_digest = "CRC32C" if u.header_digest == "crc32c" else "None"
    return u.host, u.port, u.target, u.lun, opts


class _BlockLocks:
    """Per-LBA asyncio locks for read-modify-write of edge blocks."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, lba: int) -> None:
        lock, users = self._locks.get(lba, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[lba] = (lock, users + 1)
        await lock.acquire()

    def release(self, lba: int) -> None:
        lock, users = self._locks[lba]
        lock.release()
        if users == 1:
            del self._locks[lba]
        else:
            self._locks[lba] = (lock, users - 1)


class Device(Protocol):
    """What the exports (NBD, FUSE) and copies need of a LUN: implemented
    by :class:`BlockDevice` (one session) and by
    :class:`~initiator.multipath.MultipathDevice` (every path)."""

    @property
    def lun(self) -> LUN: ...
    @property
    def capacity(self) -> Capacity: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    async def read(self, offset: int, length: int) -> bytes: ...
    async def readinto(self, offset: int, buffer: Buffer) -> int: ...
    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> int: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> int: ...
    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None: ...
    async def close(self) -> None: ...


class BlockDevice:
    """Byte-addressed access to one LUN (see the module docstring)."""

    def __init__(self, lun: LUN, *, max_transfer: int = DEFAULT_MAX_TRANSFER,
                 max_unmap_blocks: int = 1 << 22, owns_session: bool = False) -> None:
        if lun.capacity is None:
            raise InitiatorError("the LUN's capacity is not known (use LUN.open)")
        self.lun = lun
        self.capacity: Capacity = lun.capacity
        bs = self.capacity.block_size
        self.max_transfer = max(bs, max_transfer // bs * bs)
        self._owns_session = owns_session
        self._locks = _BlockLocks()
        self._unmap_supported: bool | None = None
        if max_unmap_blocks < 1:
            raise ValueError("max_unmap_blocks must be at least 1")
        # Blocks per UNMAP descriptor: the LU's MAXIMUM UNMAP LBA COUNT (SBC-3 §6.6.4).
        self._max_unmap_blocks = max_unmap_blocks

    @classmethod
    async def open(cls, url: str, options: SessionOptions | None = None) -> BlockDevice:
        """Connect to ``iscsi://[user%secret@]host[:port]/target/lun``."""
        host, port, target, lun_no, opts = options_from_url(url, options)
        session = await Session.connect(host, port, target, opts)
        try:
            return await cls.from_session(session, lun_no, owns_session=True)
        except BaseException:
            await session.logout()
            raise

    @classmethod
    async def from_session(cls, session: Session, lun: int, *,
                           owns_session: bool = False) -> BlockDevice:
        """A BlockDevice on LUN ``lun`` of an existing session."""
        unit = await LUN.open(session, lun)
        max_transfer = DEFAULT_MAX_TRANSFER
        limits = await unit.block_limits()
        dev_unmap = 1 << 22
        if limits is not None:
            bs = unit.block_size
            if limits.max_transfer_length:
                max_transfer = min(max_transfer, limits.max_transfer_length * bs)
            if limits.optimal_transfer_length:
                max_transfer = min(max_transfer, max(limits.optimal_transfer_length * bs, bs))
            if limits.max_unmap_lba_count:
                dev_unmap = min(dev_unmap, limits.max_unmap_lba_count)
        return cls(unit, max_transfer=max_transfer, max_unmap_blocks=dev_unmap,
                   owns_session=owns_session)

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.capacity.size

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        return self.capacity.block_size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} is outside the device "
                             f"(size {self.size})")

    # ----------------------------------------------------------------- read

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at byte ``offset``."""
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def readinto(self, offset: int, buffer: Buffer) -> int:
        """Fill ``buffer`` from byte ``offset``; returns its length."""
        mv = memoryview(buffer).cast("B")
        length = mv.nbytes
        self._check_range(offset, length)
        if not length:
            return 0
        bs = self.block_size
        end = offset + length
        a_start = -(-offset // bs) * bs
        a_end = end // bs * bs
        jobs: list[Coroutine[Any, Any, None]] = []
        if a_start >= a_end:
            # Inside one or two blocks: read them whole and copy the part.
            jobs.append(self._read_partial(offset, mv))
        else:
            if offset < a_start:
                jobs.append(self._read_partial(offset, mv[: a_start - offset]))
            for pos in range(a_start, a_end, self.max_transfer):
                stop = min(pos + self.max_transfer, a_end)
                jobs.append(self._read_direct(pos, mv[pos - offset : stop - offset]))
            if a_end < end:
                jobs.append(self._read_partial(a_end, mv[a_end - offset :]))
        await _gather(jobs)
        return length

    async def _read_direct(self, pos: int, dest: memoryview) -> None:
        got = await self.lun.read(pos // self.block_size, dest.nbytes // self.block_size, dest)
        if got.nbytes != dest.nbytes:
            raise InitiatorError(f"short read at {pos}: {got.nbytes} of {dest.nbytes} bytes")

    async def _read_partial(self, pos: int, dest: memoryview) -> None:
        bs = self.block_size
        first = pos // bs
        last = (pos + dest.nbytes - 1) // bs
        tmp = bytearray((last - first + 1) * bs)
        await self._read_direct(first * bs, memoryview(tmp))
        skip = pos - first * bs
        dest[:] = memoryview(tmp)[skip : skip + dest.nbytes]

    # ---------------------------------------------------------------- write

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> int:
        """Write ``data`` at byte ``offset`` (read-modify-write at unaligned
        edges); returns its length. ``data`` must not change until done."""
        mv = memoryview(data).cast("B")
        length = mv.nbytes
        self._check_range(offset, length)
        if not length:
            return 0
        bs = self.block_size
        end = offset + length
        a_start = -(-offset // bs) * bs
        a_end = end // bs * bs
        jobs: list[Coroutine[Any, Any, None]] = []
        if a_start >= a_end:
            jobs.append(self._write_partial(offset, mv, fua))
        else:
            if offset < a_start:
                jobs.append(self._write_partial(offset, mv[: a_start - offset], fua))
            for pos in range(a_start, a_end, self.max_transfer):
                stop = min(pos + self.max_transfer, a_end)
                jobs.append(self.lun.write(pos // bs, mv[pos - offset : stop - offset], fua=fua))
            if a_end < end:
                jobs.append(self._write_partial(a_end, mv[a_end - offset :], fua))
        await _gather(jobs)
        return length

    async def _write_partial(self, pos: int, src: memoryview, fua: bool) -> None:
        bs = self.block_size
        first = pos // bs
        last = (pos + src.nbytes - 1) // bs
        lbas = list(range(first, last + 1))
        for lba in lbas:
            await self._locks.acquire(lba)
        try:
            tmp = bytearray(len(lbas) * bs)
            await self._read_direct(first * bs, memoryview(tmp))
            skip = pos - first * bs
            tmp[skip : skip + src.nbytes] = src
            await self.lun.write(first, tmp, fua=fua)
        finally:
            for lba in lbas:
                self._locks.release(lba)

    # ------------------------------------------------------ flush, discard

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE for the whole LU (SBC-3 §5.22)."""
        await self.lun.synchronize_cache()

    async def discard(self, offset: int, length: int) -> int:
        """Unmap the whole blocks inside [offset, offset+length) (SBC-3
        §5.28); partial edge blocks are left alone, as discard is advisory.
        Returns the bytes unmapped (0 when the LU does not support UNMAP)."""
        self._check_range(offset, length)
        bs = self.block_size
        first = -(-offset // bs)
        last = (offset + length) // bs
        if first >= last or self._unmap_supported is False:
            return 0
        step = self._max_unmap_blocks
        try:
            await _gather([self.lun.unmap([(lba, min(step, last - lba))])
                           for lba in range(first, last, step)])
        except SCSICheckCondition as exc:
            if exc.key == SenseKey.ILLEGAL_REQUEST and self._unmap_supported is None:
                self._unmap_supported = False
                return 0
            raise
        self._unmap_supported = True
        return (last - first) * bs

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range: WRITE SAME for whole blocks (no zero buffers on the
        wire), ordinary writes for the edges."""
        self._check_range(offset, length)
        bs = self.block_size
        end = offset + length
        a_start = -(-offset // bs) * bs
        a_end = end // bs * bs
        if a_start >= a_end:
            await self.write(offset, bytes(length))
            return
        jobs: list[Coroutine[Any, Any, Any]] = []
        if offset < a_start:
            jobs.append(self.write(offset, bytes(a_start - offset)))
        step = 1 << 16  # blocks per WRITE SAME (conservative vs MAXIMUM WRITE SAME LENGTH)
        for lba in range(a_start // bs, a_end // bs, step):
            jobs.append(self.lun.write_same(lba, min(step, a_end // bs - lba), unmap=unmap))
        if a_end < end:
            jobs.append(self.write(a_end, bytes(end - a_end)))
        await _gather(jobs)

    async def close(self) -> None:
        """Flush-free close: log out if this device opened the session."""
        if self._owns_session:
            await self.lun.session.logout()

    async def __aenter__(self) -> BlockDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _gather(jobs: list[Coroutine[Any, Any, Any]]) -> None:
    if len(jobs) == 1:
        await jobs[0]
        return
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # Do not leave siblings writing into a buffer the caller owns again.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# --------------------------------------------------------------- sync file


class _LoopThread:
    """An event loop (uvloop when importable) running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="iscsi-loop",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class LUNFile(io.RawIOBase):
    """A LUN as a seekable binary file (synchronous).

    ``LUNFile.open("iscsi://host/iqn.../1", "r+b")``; ``mode`` is ``"rb"``
    or ``"r+b"`` (a LUN cannot be created or truncated). Reads stop at the
    end of the LUN; writes past it raise OSError (no space).
    """

    def __init__(self, device: BlockDevice, runner: _LoopThread, *, writable: bool) -> None:
        super().__init__()
        self._dev = device
        self._runner = runner
        self._writable = writable
        self._pos = 0
        self._stopped = False

    @classmethod
    def open(cls, url: str, mode: str = "rb", options: SessionOptions | None = None) -> LUNFile:
        """Connect and return the file; see the class docstring for ``mode``."""
        if mode not in ("rb", "r+b", "rb+"):
            raise ValueError(f"mode {mode!r}: use 'rb' or 'r+b'")
        runner = _LoopThread()
        try:
            dev = runner.call(BlockDevice.open(url, options))
        except BaseException:
            runner.stop()
            raise
        return cls(dev, runner, writable=mode != "rb")

    @property
    def device(self) -> BlockDevice:
        """The underlying BlockDevice (use only from its loop)."""
        return self._dev

    @property
    def size(self) -> int:
        """Size of the LUN in bytes."""
        return self._dev.size

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._dev.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        self._check_closed()
        mv = memoryview(buffer).cast("B")
        n = max(0, min(mv.nbytes, self._dev.size - self._pos))
        if n:
            self._runner.call(self._dev.readinto(self._pos, mv[:n]))
            self._pos += n
        return n

    def write(self, data: Any) -> int:
        self._check_closed()
        if not self._writable:
            raise io.UnsupportedOperation("LUN opened read-only")
        mv = memoryview(data).cast("B")
        n = min(mv.nbytes, self._dev.size - self._pos)
        if n <= 0 and mv.nbytes:
            raise OSError(28, "no space left on the LUN")
        if n:
            self._runner.call(self._dev.write(self._pos, mv[:n]))
            self._pos += n
        return n

    def flush(self) -> None:
        if not self.closed and self._writable and not self._stopped:
            self._runner.call(self._dev.flush())

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            try:
                self._runner.call(self._dev.close())
            finally:
                self._stopped = True
                self._runner.stop()
                super().close()

    def _check_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed LUN file")


__all__ = ["BlockDevice", "LUNFile", "options_from_url", "DEFAULT_MAX_TRANSFER"]
