"""A RAM disk that only spends memory on what was written.

The disk is cut into fixed chunks (64 KiB by default); a chunk exists only
once written, so a large, mostly empty memory disk costs little. Discarding
a whole chunk frees it, which makes the disk thin with LBPRZ semantics
(SBC-3 4.7.3.4: deallocated blocks read as zeroes).
"""

from __future__ import annotations

from collections.abc import Iterator

from .base import SECTOR, Backend, BackendError, Buffer, Extent
from .registry import cluster_pieces

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """A sparse, bytearray-backed disk of ``size`` bytes."""

    def __init__(self, size: int, block_size: int = SECTOR, *, chunk_size: int = 64 * 1024) -> None:
        if block_size <= 0 or block_size % SECTOR or block_size & (block_size - 1):
            raise BackendError(f"memory disk: block size {block_size} is not a power-of-two multiple of {SECTOR}")
        if size < 0 or size % block_size:
            raise BackendError(f"memory disk: size {size} is not a multiple of the block size {block_size}")
        if chunk_size < block_size or chunk_size & (chunk_size - 1):
            raise BackendError(f"memory disk: chunk size {chunk_size} must be a power of two >= {block_size}")
        self._size = size
        #: Logical block size the SCSI layer should report.
        self.block_size = block_size
        self._chunk = chunk_size
        self._chunks: dict[int, bytearray] = {}
        self._zero = bytes(chunk_size)
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def thin(self) -> bool:
        return True

    @property
    def allocated(self) -> int:
        """Bytes of RAM held by chunks."""
        return len(self._chunks) * self._chunk

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise BackendError("memory disk: closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise BackendError(f"memory disk: request [{offset}, +{length}) is outside the {self._size}-byte disk")

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk index, offset in chunk, length, offset in request)."""
        return cluster_pieces(offset, length, self._chunk)

    def read(self, offset: int, length: int) -> Buffer:
        self._check(offset, length)
        cs = self._chunk
        idx, inner = divmod(offset, cs)
        if inner + length <= cs:
            chunk = self._chunks.get(idx)
            if chunk is None:
                return self._zero[:length] if length < cs else self._zero
            # A view: valid until the next write of this range (base.py).
            return memoryview(chunk)[inner : inner + length]
        out = bytearray(length)
        for idx, inner, n, at in self._pieces(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is not None:
                out[at : at + n] = memoryview(chunk)[inner : inner + n]
        return out

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        for idx, inner, n, at in self._pieces(offset, len(view)):
            chunk = self._chunks.get(idx)
            if chunk is None:
                chunk = self._chunks[idx] = bytearray(self._chunk)
            chunk[inner : inner + n] = view[at : at + n]

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for idx, inner, n, _ in self._pieces(offset, length):
            chunk = self._chunks.get(idx)
            if chunk is None:
                continue
            if n == self._chunk:
                del self._chunks[idx]
                continue
            chunk[inner : inner + n] = self._zero[:n]
            if chunk == self._zero:
                del self._chunks[idx]

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        self._check(offset, length)
        run_start = offset
        run_mapped: bool | None = None
        for idx, _, n, at in self._pieces(offset, length):
            mapped = idx in self._chunks
            if run_mapped is None:
                run_mapped = mapped
            elif mapped != run_mapped:
                yield Extent(run_start, offset + at - run_start, run_mapped)
                run_start, run_mapped = offset + at, mapped
        if run_mapped is not None:
            yield Extent(run_start, offset + length - run_start, run_mapped)

    def close(self) -> None:
        self._chunks.clear()
        self._closed = True
