"""qcow2 reference counting (qemu docs/interop/qcow2.txt "Host cluster
management"): the refcount table and its blocks, finding free clusters,
growing the table, and dropping the references of a replaced L2 entry.

A mixin of :class:`target.backends.qcow2.Qcow2Image`, which opens the image
and owns the state declared below. Ordering rule kept here: a cluster's
refcount is raised before anything points at it and lowered only after
nothing does, so a crash leaks clusters at worst.
"""

from __future__ import annotations

from array import array

from .base import SECTOR, Buffer, MediumError
from .raw import punch_hole
from .qcow2_format import (
    COMPRESSED, MAX_REFTABLE_BYTES, REFTABLE_HDR, REFT_OFFSET_MASK, RefBlock, U64, be_bytes,
)


class Qcow2Refcounts:
    """Refcount table and blocks of an open qcow2 image."""

    path: str
    _fd: int
    _cs: int
    _cb: int
    _refbits: int
    _rb_entries: int
    _rt_off: int
    _rt_clusters: int
    _reftable: array[int]
    _refblocks: dict[int, RefBlock]
    _free_hint: int
    _file_size: int
    _csize_shift: int
    _csize_mask: int
    _last_compressed: tuple[int, bytes] | None

    # Provided by Qcow2Image.
    def _pread(self, offset: int, length: int) -> bytearray:
        raise NotImplementedError

    def _meta_write(self, data: Buffer, offset: int) -> None:
        raise NotImplementedError

    def _classify(self, entry: int) -> tuple[int, int]:
        raise NotImplementedError

    def _refblock(self, ti: int) -> RefBlock | None:
        if ti >= len(self._reftable):
            return None
        off = self._reftable[ti] & REFT_OFFSET_MASK
        if off == 0:
            return None
        block = self._refblocks.get(ti)
        if block is None:
            if off & (self._cs - 1) or off + self._cs > self._file_size:
                raise MediumError(f"{self.path}: qcow2: corrupt refcount table entry {ti} ({off:#x})")
            block = RefBlock(off, self._refbits, self._pread(off, self._cs))
            self._refblocks[ti] = block
        return block

    def _refcount(self, cluster: int) -> int:
        ti, bi = divmod(cluster, self._rb_entries)
        block = self._refblock(ti)
        return 0 if block is None else block.get(bi)

    def _set_refcount(self, cluster: int, value: int) -> None:
        ti, bi = divmod(cluster, self._rb_entries)
        if ti >= len(self._reftable):
            self._grow_reftable(ti + 1, cluster)
        block = self._refblock(ti)
        if block is None:
            block = self._new_refblock(ti, cluster)
        at, data = block.set(bi, value)
        self._meta_write(data, block.offset + at)
        if value == 0 and cluster < self._free_hint:
            self._free_hint = cluster

    def _new_refblock(self, ti: int, pending: int) -> RefBlock:
        """Allocate refcount block ``ti`` inside the range it covers: all
        of that range has refcount 0 (free), except ``pending``, the
        cluster whose refcount is being set."""
        first = ti * self._rb_entries
        home = first if first != pending else first + 1
        block = RefBlock(home * self._cs, self._refbits, bytes(self._cs))
        block.set(home - first, 1)
        self._meta_write(block.to_bytes(), block.offset)
        self._reftable[ti] = block.offset
        self._meta_write(U64.pack(block.offset), self._rt_off + ti * 8)
        self._refblocks[ti] = block
        return block

    def _end_cluster(self) -> int:
        return -(-self._file_size // self._cs)

    def _grow_reftable(self, min_entries: int, pending: int) -> None:
        """Move the refcount table to a larger one at the end of the file.

        New table and the refcount blocks that cover it (and themselves) are
        written first; then the header points at them; then the old table's
        clusters are freed."""
        cs, per, E = self._cs, self._cs // 8, self._rb_entries
        old = self._reftable
        start = max(self._end_cluster(), pending + 1)
        entries = max(min_entries, len(old) + len(old) // 2 + per)
        while True:
            entries = -(-entries // per) * per
            tclusters = entries // per
            k = 0
            while True:
                lo, hi = start // E, (start + tclusters + k - 1) // E
                missing = [t for t in range(lo, hi + 1) if t >= len(old) or not old[t] & REFT_OFFSET_MASK]
                if len(missing) == k:
                    break
                k = len(missing)
            if hi < entries:
                break
            entries = hi + 1
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise MediumError(f"{self.path}: qcow2: refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
        table: array[int] = array("Q", bytes(entries * 8))
        table[: len(old)] = old
        used = range(start, start + tclusters + k)
        new_blocks: dict[int, RefBlock] = {}
        for j, t in enumerate(missing):
            off = (start + tclusters + j) * cs
            table[t] = off
            new_blocks[t] = RefBlock(off, self._refbits, bytes(cs))
        for c in used:
            t, bi = divmod(c, E)
            blk = new_blocks.get(t)
            if blk is not None:
                blk.set(bi, 1)
            else:
                existing = self._refblock(t)
                assert existing is not None
                at, data = existing.set(bi, 1)
                self._meta_write(data, existing.offset + at)
        for blk in new_blocks.values():
            self._meta_write(blk.to_bytes(), blk.offset)
        self._meta_write(be_bytes(table), start * cs)
        old_off, old_clusters = self._rt_off, self._rt_clusters
        self._meta_write(REFTABLE_HDR.pack(start * cs, tclusters), 48)
        self._reftable = table
        self._rt_off, self._rt_clusters = start * cs, tclusters
        self._refblocks.update(new_blocks)
        for c in range(old_off // cs, old_off // cs + old_clusters):
            self._unref(c)

    def _unref(self, cluster: int) -> None:
        value = self._refcount(cluster)
        if value == 0:
            raise MediumError(f"{self.path}: qcow2: freeing cluster {cluster} whose refcount is already 0")
        self._set_refcount(cluster, value - 1)
        if value == 1:
            try:
                punch_hole(self._fd, cluster * self._cs, self._cs)
            except OSError:
                pass  # reclaiming space is best effort; the cluster is free

    def _pick_free(self) -> int:
        """A cluster with refcount 0 (its refcount is set by the caller
        before any other allocation)."""
        c = self._free_hint
        E = self._rb_entries
        while True:
            ti, bi = divmod(c, E)
            block = self._refblock(ti)
            if block is None:
                break
            z = block.find_zero(bi)
            if z >= 0:
                c = ti * E + z
                break
            c = (ti + 1) * E
        self._free_hint = c + 1
        return c

    def _release(self, entry: int) -> None:
        """Drop the references an L2 entry held."""
        kind, host = self._classify(entry)
        self._last_compressed = None
        if kind == COMPRESSED:
            nsect = ((entry >> self._csize_shift) & self._csize_mask) + 1
            start = host & ~(SECTOR - 1)
            for c in range(start >> self._cb, ((start + nsect * SECTOR - 1) >> self._cb) + 1):
                self._unref(c)
        elif host:
            self._unref(host >> self._cb)
