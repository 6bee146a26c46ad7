"""``iscsi-initiator copy`` (a LUN or image to another, skipping holes) and
``bench`` (IOPS and throughput of a LUN)."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from iscsi.scsi.constants import SenseKey
from iscsi.scsi.sbc import ProvisioningStatus

from .blockdev import BlockDevice
from .errors import InitiatorError
from .scsi import SCSICheckCondition

from .cli_common import CHUNK, DEPTH, human_size, session_options, with_creds


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-6)
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}% {human_size(self.done)} "
                             f"{human_size(int(rate))}/s ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclass
class _Extent:
    offset: int
    length: int
    mapped: bool


class _Source(Protocol):
    """Where a copy reads from: its size, its extents in order, their data."""

    size: int

    def extents(self) -> AsyncIterator[_Extent]: ...

    async def readinto(self, offset: int, buf: bytearray) -> None: ...


class _LUNSource:
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.size = dev.size

    async def extents(self) -> AsyncIterator[_Extent]:
        bs = self.dev.block_size
        blocks = self.size // bs
        if not self.dev.capacity.lbpme:
            yield _Extent(0, self.size, True)
            return
        lba = 0
        while lba < blocks:
            try:
                descs = await self.dev.lun.get_lba_status(lba)
            except SCSICheckCondition as exc:
                if exc.key != SenseKey.ILLEGAL_REQUEST:
                    raise
                yield _Extent(lba * bs, self.size - lba * bs, True)
                return
            advanced = False
            for d in descs:
                if d.lba != lba or d.blocks == 0:
                    break
                n = min(d.blocks, blocks - lba)
                yield _Extent(lba * bs, n * bs, d.status == ProvisioningStatus.MAPPED)
                lba += n
                advanced = True
            if not advanced:
                # A target that answers nothing useful: copy the rest as mapped.
                yield _Extent(lba * bs, self.size - lba * bs, True)
                return

    async def readinto(self, offset: int, buf: bytearray) -> None:
        await self.dev.readinto(offset, buf)


class _FileSource:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    async def extents(self) -> AsyncIterator[_Extent]:
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains (or no SEEK_DATA)
                data = self.size
            if data > pos:
                yield _Extent(pos, data - pos, False)
            if data >= self.size:
                return
            try:
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            except OSError:
                hole = self.size
            yield _Extent(data, hole - data, True)
            pos = hole

    async def readinto(self, offset: int, buf: bytearray) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            raise InitiatorError(f"short read from the source file at {offset}")

    def close(self) -> None:
        os.close(self.fd)


async def _copy(src: _Source, write: _Writer, progress: _Progress) -> tuple[int, int]:
    """Copy mapped, non-zero chunks; zero the rest on the destination only
    where it may hold old data. Returns (bytes written, bytes skipped)."""
    zero = bytes(CHUNK)
    sem = asyncio.Semaphore(DEPTH)
    written = skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    async def one(off: int, n: int) -> None:
        nonlocal written, skipped
        try:
            buf = bytearray(n)
            await src.readinto(off, buf)
            # bytearray == bytes is a memcmp (memoryview comparison is not).
            if buf == (zero if n == CHUNK else bytes(n)):
                await write.zeroes(off, n)
                skipped += n
            else:
                await write.data(off, buf)
                written += n
            progress.add(n)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)
        finally:
            sem.release()

    async for ext in src.extents():
        if not ext.mapped:
            await write.zeroes(ext.offset, ext.length)
            skipped += ext.length
            progress.add(ext.length)
            continue
        for off in range(ext.offset, ext.offset + ext.length, CHUNK):
            if errors:
                break
            await sem.acquire()
            n = min(CHUNK, ext.offset + ext.length - off)
            t = asyncio.ensure_future(one(off, n))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if errors:
        raise errors[0]
    return written, skipped


class _Writer(Protocol):
    """Where a copy writes to: data, and zeros for the source's holes."""

    async def data(self, offset: int, buf: bytearray) -> None: ...

    async def zeroes(self, offset: int, length: int) -> None: ...


class _LUNWriter:
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev

    async def data(self, offset: int, buf: bytearray) -> None:
        await self.dev.write(offset, buf)

    async def zeroes(self, offset: int, length: int) -> None:
        # WRITE SAME: the LUN may hold old data, and no zeros go on the wire.
        await self.dev.write_zeroes(offset, length, unmap=self.dev.capacity.lbpme)


class _FileWriter:
    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        if self.regular:
            # A fresh sparse file reads as zeros: skipped ranges stay holes.
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)

    async def data(self, offset: int, buf: bytearray) -> None:
        if os.pwritev(self.fd, [buf], offset) != len(buf):
            raise InitiatorError(f"short write to the destination at {offset}")

    async def zeroes(self, offset: int, length: int) -> None:
        if not self.regular:
            zero = bytes(min(length, CHUNK))
            for off in range(offset, offset + length, CHUNK):
                n = min(CHUNK, offset + length - off)
                os.pwrite(self.fd, zero[:n], off)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


async def cmd_copy(args: argparse.Namespace) -> int:
    opts = session_options(args)
    src_dev: BlockDevice | None = None
    dst_dev: BlockDevice | None = None
    src: _Source | None = None
    dst: _Writer | None = None
    try:
        if args.src.startswith("iscsi://"):
            src_dev = await BlockDevice.open(args.src, with_creds(args.src, session_options(args)))
            src = _LUNSource(src_dev)
        else:
            src = _FileSource(args.src)
        if args.dst.startswith("iscsi://"):
            dst_dev = await BlockDevice.open(args.dst, with_creds(args.dst, opts))
            if dst_dev.size < src.size:
                raise InitiatorError(f"the destination LUN ({dst_dev.size} bytes) is smaller "
                                     f"than the source ({src.size} bytes)",
                                     hint="use a larger LUN")
            if src.size % dst_dev.block_size:
                raise InitiatorError(f"source size {src.size} is not a multiple of the "
                                     f"LUN's block size {dst_dev.block_size}")
            dst = _LUNWriter(dst_dev)
        else:
            dst = _FileWriter(args.dst, src.size)
        enabled = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = _Progress(src.size, enabled)
        start = time.monotonic()
        written, skipped = await _copy(src, dst, progress)
        if dst_dev is not None:
            await dst_dev.flush()
        progress.finish()
        took = max(time.monotonic() - start, 1e-6)
        print(f"copied {human_size(src.size)} in {took:.1f} s ({human_size(int(src.size / took))}/s): "
              f"{human_size(written)} written, {human_size(skipped)} zero or unmapped skipped",
              file=sys.stderr)
    finally:
        for dev in (src_dev, dst_dev):
            if dev is not None:
                await dev.close()
        if isinstance(src, _FileSource):
            src.close()
        if isinstance(dst, _FileWriter):
            dst.close()
    return 0


# -------------------------------------------------------------------- bench


async def cmd_bench(args: argparse.Namespace) -> int:
    if args.rw == "write" and not args.force:
        raise InitiatorError("a write benchmark overwrites the LUN",
                             hint="add --force if the data on it may be destroyed")
    dev = await BlockDevice.open(args.url, with_creds(args.url, session_options(args)))
    try:
        result = await bench(dev, rw=args.rw, pattern=args.pattern, block_size=args.bs,
                             depth=args.qd, seconds=args.seconds)
    finally:
        await dev.close()
    print(result)
    return 0


@dataclass(frozen=True)
class BenchResult:
    """Figures of one benchmark run."""

    rw: str
    pattern: str
    block_size: int
    depth: int
    ops: int
    seconds: float

    @property
    def iops(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes)."""
        return self.ops * self.block_size / self.seconds / 1e6

    def __str__(self) -> str:
        return (f"{self.rw} {self.pattern} bs={self.block_size} qd={self.depth}: "
                f"{self.iops:,.0f} IOPS, {self.mb_per_s:,.1f} MB/s "
                f"({self.ops} ops in {self.seconds:.2f} s)")


async def bench(dev: BlockDevice, *, rw: str = "read", pattern: str = "rand",
                block_size: int = 4096, depth: int = 32, seconds: float = 5.0) -> BenchResult:
    """Run ``depth`` workers of aligned ``block_size`` I/O for ``seconds``."""
    import random

    bs = dev.block_size
    if block_size % bs:
        raise InitiatorError(f"block size {block_size} is not a multiple of {bs}")
    blocks_per_io = block_size // bs
    slots = dev.size // block_size
    if slots <= 0:
        raise InitiatorError("the LUN is smaller than one benchmark block")
    lun = dev.lun
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ops = 0
    seq = 0
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal ops, seq
        buf = bytearray(os.urandom(block_size)) if rw == "write" else bytearray(block_size)
        while loop.time() < deadline:
            if pattern == "seq":
                slot = seq % slots
                seq += 1
            else:
                slot = rng.randrange(slots)
            if rw == "read":
                await lun.read(slot * blocks_per_io, blocks_per_io, buf)
            else:
                await lun.write(slot * blocks_per_io, buf)
            ops += 1

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(depth)))
    return BenchResult(rw, pattern, block_size, depth, ops, loop.time() - start)
