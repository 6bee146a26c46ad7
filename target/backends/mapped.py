"""The block-mapped image engine the VDI, VHD, VHDX, VMDK, qcow2 and
Parallels backends share.

A format only says, for a virtual range, which runs are stored where
(``_runs``); :class:`MappedImage` coalesces the runs into as few ``preadv``
calls as possible, falls through to the parent image for unallocated runs,
and answers ``extents``, range checks, ``flush`` and ``close``.
:class:`RunWriter` does the same coalescing for the in-place part of writes.
"""

from __future__ import annotations

import abc
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, NamedTuple, Self

from .base import Backend, BackendError, Buffer, Extent, MediumError
from .raw import pread_into
from .raw import pwrite_all as _pwrite_fd
from .registry import (
    ImageBackend,
    check_range,
    cluster_pieces,
    merge_extents,
    sync_files,
)


#: Run kinds returned by ``MappedImage._runs``.
RUN_ZERO = 0  # reads as zeroes, not from the parent
RUN_DATA = 1  # stored in file ``fd`` at byte ``pos``
RUN_PARENT = 2  # not stored here: the parent's data (or zeroes without one)
RUN_BYTES = 3  # already in memory (e.g. a decompressed grain): ``data``


class Run(NamedTuple):
    """One piece of a virtual range: ``length`` bytes of ``kind``."""

    length: int
    kind: int
    fd: int = -1
    pos: int = 0
    data: Buffer | None = None


def pread_exact(fd: int, length: int, pos: int, path: str, what: str) -> bytes:
    """Read exactly ``length`` bytes or raise a one-line BackendError."""
    try:
        data = os.pread(fd, length, pos)
    except OSError as e:
        raise MediumError(f"{path}: cannot read {what} at {pos}: {e.strerror}") from None
    if len(data) != length:
        raise BackendError(
            f"{path}: truncated image: {what} at {pos} needs {length} bytes, file has {len(data)}"
        )
    return data


def pwrite_all(fd: int, data: Buffer, pos: int, path: str) -> None:
    """Write all of ``data`` at ``pos`` (retrying short writes); an OS
    error becomes a one-line MediumError naming ``path``."""
    try:
        _pwrite_fd(fd, data, pos)
    except OSError as e:
        raise MediumError(f"{path}: write at {pos} failed: {e.strerror or e}") from None


class RunWriter:
    """Pieces of one write request that follow each other both in the
    request and in the file become one pwrite. The in-place half of a
    dynamic format's write feeds ``add``; pieces that need a new block go
    their own way in between; ``flush`` writes what is pending."""

    __slots__ = ("_at", "_emit", "_n", "_pos")

    def __init__(self, emit: Callable[[int, int, int], None]) -> None:
        """``emit(file position, offset in the request, length)`` writes."""
        self._emit = emit
        self._pos = self._at = self._n = 0

    def add(self, pos: int, at: int, n: int) -> None:
        """Queue ``n`` bytes from request offset ``at`` for file position ``pos``."""
        if self._n and self._pos + self._n == pos and self._at + self._n == at:
            self._n += n
            return
        self.flush()
        self._pos, self._at, self._n = pos, at, n

    def flush(self) -> None:
        """Write the pending run, if any."""
        if self._n:
            self._emit(self._pos, self._at, self._n)
            self._n = 0


class MappedImage(ImageBackend):
    """A virtual disk made of runs that are stored, zero, or inherited.

    Subclasses implement ``_runs`` (and writes); reads, parent fall-through,
    read coalescing, ``extents``, range checks, ``flush`` and ``close`` of
    the files ``_files`` names live here. Formats that allocate in fixed
    blocks (``_bs`` bytes) get ``discard``/``write_zeroes`` through
    ``_zero_range`` by implementing ``_drop_block`` and ``_block_reads_zero``.
    """

    #: The image file, for the formats that have one (-1: none or closed).
    _fd: int = -1
    #: Block size of the formats that use ``_zero_range``.
    _bs: int = 0
    #: A data run ending past the end of its file reads as zeroes there
    #: (qcow2 and Parallels: a preallocated, never written tail); for the
    #: other formats that is a truncated image and a MediumError.
    _short_reads_zero: ClassVar[bool] = False
    #: Reads that are one contiguous run of one file come back as views of
    #: a read-only map of it (no copy; the transport sends the page cache),
    #: as raw images do. Only for formats that never shrink or move data in
    #: their files while open (qcow2, VHD, VMDK): a view must stay valid
    #: until the transport has sent it. VDI and Parallels compact on
    #: discard (move a block, truncate), so they copy.
    _mmap_reads: ClassVar[bool] = False
    #: fd -> (map, bytes mapped); replaced (never closed early: views of
    #: the old map keep it alive) when a read reaches past the mapped end.
    _maps: dict[int, tuple[mmap.mmap, int]]

    def __init__(
        self,
        path: str,
        size: int,
        *,
        read_only: bool,
        write_through: bool,
        parent: Backend | None,
    ) -> None:
        self.path = path
        self._size = size
        self._read_only = read_only
        self._write_through = write_through
        self.parent = parent
        self._closed = False
        self._maps = {}

    def __enter__(self) -> Self:
        return self

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @abc.abstractmethod
    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        """Yield runs covering exactly [offset, offset+length) in order."""

    def _files(self) -> Iterable[int]:
        """The descriptors this image owns (flushed and closed here)."""
        return (self._fd,) if self._fd >= 0 else ()

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise BackendError(f"{self.path}: image is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            check_range(self, offset, length)  # raises, with the message

    def _check_write(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if self._read_only:
            raise BackendError(f"{self.path}: opened read-only")

    def _parent_read(self, offset: int, length: int) -> Buffer | None:
        """The parent's bytes for a range (shorter or None past its end)."""
        parent = self.parent
        if parent is None or offset >= parent.size:
            return None
        return parent.read(offset, min(length, parent.size - offset))

    def _view(self, fd: int, pos: int, length: int) -> memoryview | None:
        """``length`` bytes at ``pos`` of ``fd`` as a view of its map, or
        None (past the end of the file: the copying path reports it)."""
        end = pos + length
        m = self._maps.get(fd)
        if m is None or end > m[1]:
            try:
                size = os.fstat(fd).st_size
                if end > size:
                    return None
                m = (mmap.mmap(fd, size, access=mmap.ACCESS_READ), size)
            except (OSError, ValueError):
                return None
            self._maps[fd] = m
        return memoryview(m[0])[pos:end]

    def _fill(self, out: memoryview, vpos: int, run: Run) -> None:
        n = len(out)
        if run.kind == RUN_DATA:
            try:
                got = os.preadv(run.fd, [out], run.pos)
                if 0 < got < n:  # a short read: finish it (or hit the end)
                    got += pread_into(run.fd, out[got:], run.pos + got)
            except OSError as e:
                raise MediumError(f"{self.path}: read error at {run.pos}: {e.strerror or e}") from None
            if got != n and not self._short_reads_zero:
                raise MediumError(
                    f"{self.path}: image file ends inside allocated data at {run.pos + got} (truncated?)"
                )
        elif run.kind == RUN_PARENT:
            data = self._parent_read(vpos, n)
            if data is not None:
                out[: len(data)] = data
        elif run.kind == RUN_BYTES:
            assert run.data is not None
            out[:] = run.data
        # RUN_ZERO: the buffer is already zero-filled.

    def read(self, offset: int, length: int) -> Buffer:
        self._check_range(offset, length)
        if length == 0:
            return b""
        runs = self._runs(offset, length)
        first = next(runs)
        if first.length == length:
            # One run: no intermediate buffer (the common case for reads
            # inside one block).
            if first.kind == RUN_DATA:
                view = self._view(first.fd, first.pos, length) if self._mmap_reads else None
                if view is not None:
                    return view
                buf = bytearray(length)
                self._fill(memoryview(buf), offset, first)
                return buf
            if first.kind == RUN_PARENT:
                data = self._parent_read(offset, length)
                if data is not None and len(data) == length:
                    return data
            if first.kind == RUN_BYTES and first.data is not None:
                return first.data
            if first.kind == RUN_ZERO:
                return bytearray(length)
        if self._mmap_reads and first.kind == RUN_DATA:
            # Many runs that may all be one contiguous stretch of one file
            # (clusters allocated in order): then a view, no copy.
            rest = list(runs)
            end = first.pos + first.length
            for run in rest:
                if run.kind != RUN_DATA or run.fd != first.fd or run.pos != end:
                    break
                end += run.length
            else:
                view = self._view(first.fd, first.pos, length)
                if view is not None:
                    return view
            runs = iter(rest)
        out = bytearray(length)
        mv = memoryview(out)
        # Coalesce: neighbouring DATA runs contiguous in one file become
        # one preadv; neighbouring PARENT runs one parent read. (The run
        # length is tracked apart: NamedTuple._replace per run is slow.)
        cur = first
        cur_start = 0
        cur_len = pos = first.length
        for run in runs:
            kind = run.kind
            if kind == cur.kind and (
                (kind == RUN_DATA and run.fd == cur.fd and run.pos == cur.pos + cur_len)
                or kind == RUN_ZERO
                or kind == RUN_PARENT
            ):
                cur_len += run.length
            else:
                self._fill(mv[cur_start : cur_start + cur_len], offset + cur_start, cur)
                cur, cur_start, cur_len = run, pos, run.length
            pos += run.length
        self._fill(mv[cur_start : cur_start + cur_len], offset + cur_start, cur)
        return out

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        self._check_range(offset, length)
        return merge_extents(self._run_extents(offset, length))

    def _run_extents(self, offset: int, length: int) -> Iterator[Extent]:
        # Runs of one state are joined here already: an Extent per run
        # would cost more than the walk itself for small clusters.
        pos = start = offset
        state: bool | None = None  # mapped-ness of the pending run
        for run in self._runs(offset, length):
            kind = run.kind
            if kind == RUN_PARENT:
                if state is not None:
                    yield Extent(start, pos - start, state)
                    state = None
                yield from self._backing_extents(pos, run.length)
            else:
                mapped = kind == RUN_DATA or kind == RUN_BYTES
                if mapped is not state:
                    if state is not None:
                        yield Extent(start, pos - start, state)
                    start, state = pos, mapped
            pos += run.length
        if state is not None:
            yield Extent(start, pos - start, state)

    def _after_write(self, *fds: int) -> None:
        """write_through: make each write durable before it is acknowledged."""
        if self._write_through:
            for fd in fds:
                os.fdatasync(fd)

    # -- whole-block deallocation (VDI, VHD) ---------------------------------

    def _drop_block(self, blk: int) -> None:
        """Deallocate block ``blk`` so that it reads as zeroes."""
        raise NotImplementedError

    def _block_reads_zero(self, blk: int) -> bool:
        """True when block ``blk`` already reads as zeroes."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if self.thin:
            self._zero_range(offset, length)
        # Not thin: no zero promise, nothing to do (SBC-3 5.28).

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.thin:
            self._zero_range(offset, length)
        else:
            super().write_zeroes(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        """Whole blocks are dropped; parts of blocks that do not read as
        zeroes already are written with zeroes."""
        self._check_write(offset, length)
        size = self._size
        for blk, within, n, at in cluster_pieces(offset, length, self._bs):
            if n == min(self._bs, size - blk * self._bs):
                self._drop_block(blk)
            elif not self._block_reads_zero(blk):
                self.write(offset + at, bytes(n))
        self._after_write(*self._files())

    # -- flush / close -------------------------------------------------------

    def flush(self) -> None:
        if not self._closed and not self._read_only:
            sync_files(self.path, self._files())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        maps, self._maps = self._maps, {}
        for m, _ in maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still being sent; the map goes with it
        try:
            for fd in set(self._files()):
                os.close(fd)
        finally:
            self._fd = -1
            self.release_image_lock()
            self._close_parent()


# ---------------------------------------------------------------------------
# VDI
# ---------------------------------------------------------------------------
