"""qcow2 images, versions 2 and 3 (qemu docs/interop/qcow2.txt).

Layout recap (all numbers big-endian): a header in cluster 0; a two-level
map of guest clusters (L1 table -> L2 tables -> host cluster offsets); a
two-level refcount structure (refcount table -> refcount blocks) counting
the references to every host cluster. Guest clusters may be unallocated
(read through to the backing file), zero (v3 flag bit 0), normal, or
compressed (raw deflate, read only).

What we write, and in which order (qcow2.txt "Host cluster management"):
a new data cluster is written whole first, then its refcount is set, then
the L2 entry points at it (and for a new L2 table: table written, its
refcount set, then the L1 entry). A crash in between leaks a cluster at
worst (``qemu-img check -r leaks`` reclaims it); it never exposes a cluster
that holds stale data. ``write_through`` opens the file ``O_DSYNC`` so that
order is also the order things reach the disk.

Not supported (refused with a one-line BackendError): encryption, external
data files, extended L2 entries (subclusters), zstd without a zstd module,
writing to images with internal snapshots, or to images marked dirty
(lazy refcounts) or corrupt - those open read-only.
"""

from __future__ import annotations

import os
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator

from .base import SECTOR, Backend, BackendError, Buffer, MediumError
from .raw import pread_padded
from .registry import ImageInfo, cluster_pieces, open_backing, open_file
from .mapped import RUN_BYTES, RUN_DATA, RUN_PARENT, RUN_ZERO, MappedImage, Run, RunWriter
from .mapped import pwrite_all as pwrite_medium
from .qcow2_format import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSED,
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_NAMES,
    EXT_HEADER,
    Extensions,
    HDR2,
    HDR3,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_NAMES,
    L2_CACHE_BYTES,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    NAME,
    NORMAL,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    RefBlock,
    U64,
    UNALLOC,
    ZERO,
    be_array,
    be_bytes,
)
from .qcow2_create import create
from .qcow2_refcount import Qcow2Refcounts

__all__ = ["NAME", "Qcow2Image", "create", "open", "probe"]

class Qcow2Image(Qcow2Refcounts, MappedImage):
    """An open qcow2 image (see the module docstring for what is supported)."""

    _mmap_reads = True  # never shrinks or moves data while open (mapped.py)

    version: int
    _cb: int
    _cs: int
    _size: int
    _vsize: int
    _file_size: int
    _l1_size: int
    _l1_off: int
    _rt_off: int
    _rt_clusters: int
    _l2n: int
    # A cluster allocated past the end of the file (preallocated, never
    # written) reads as zeroes.
    _short_reads_zero = True

    def __init__(self, path: str, *, read_only: bool = False, write_through: bool = False) -> None:
        super().__init__(path, 0, read_only=read_only, write_through=write_through, parent=None)
        # O_DSYNC orders the writes below on the disk (module docstring).
        self._fd = open_file(path, read_only=read_only, write_through=write_through)
        try:
            self._parse_header()
            self._load_tables()
            if self._backing is not None:
                self.parent = open_backing(path, self._backing, self._backing_format)
        except BaseException:
            self.close()
            raise

    # -- opening --------------------------------------------------------------

    def _bad(self, why: str) -> BackendError:
        return BackendError(f"{self.path}: qcow2: {why}")

    def _pread(self, offset: int, length: int) -> bytearray:
        return pread_padded(self._fd, offset, length, self.path)

    def _parse_header(self) -> None:
        file_size = os.fstat(self._fd).st_size
        self._file_size = file_size
        head = self._pread(0, min(max(file_size, 0), 1 << MAX_CLUSTER_BITS))
        if len(head) < HDR2.size or head[:4] != MAGIC:
            raise self._bad("not a qcow2 image (bad magic or too short)")
        (
            _,
            version,
            backing_off,
            backing_len,
            cluster_bits,
            size,
            crypt,
            l1_size,
            l1_off,
            rt_off,
            rt_clusters,
            nb_snapshots,
            _snap_off,
        ) = HDR2.unpack_from(head)
        if version not in (2, 3):
            raise self._bad(f"unsupported version {version} (only 2 and 3)")
        if not 9 <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._bad(f"cluster_bits {cluster_bits} outside 9..{MAX_CLUSTER_BITS}")
        cs = 1 << cluster_bits
        self.version = version
        self._cb = cluster_bits
        self._cs = cs
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = HDR2.size
        if version == 3:
            if len(head) < HDR2.size + HDR3.size:
                raise self._bad("v3 header truncated")
            incompat, compat, autoclear, refcount_order, header_length = HDR3.unpack_from(head, HDR2.size)
            if header_length < 104 or header_length % 8 or header_length > cs:
                raise self._bad(f"bad header_length {header_length}")
        if refcount_order > 6:
            raise self._bad(f"refcount_order {refcount_order} > 6")
        if crypt != 0:
            kind = {1: "AES", 2: "LUKS"}.get(crypt, f"method {crypt}")
            raise self._bad(f"encrypted ({kind}) images are not supported")
        exts = self._parse_extensions(head, header_length, backing_off)
        names = exts.feature_names
        unknown = incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
        if unknown:
            bits = [b for b in range(64) if unknown >> b & 1]
            label = ", ".join(str(names.get(b) or INCOMPAT_NAMES.get(b) or f"bit {b}") for b in bits)
            raise self._bad(f"uses incompatible feature(s) not supported here: {label}")
        compression_type = 0
        if header_length > 104:
            compression_type = head[104]
        if incompat & INCOMPAT_COMPRESSION:
            if compression_type == 1:
                raise self._bad("compressed with zstd, and no zstd module is available")
            raise self._bad(f"unknown compression_type {compression_type}")
        elif compression_type != 0:
            raise self._bad(f"compression_type {compression_type} set without its feature bit")
        if not self._read_only:
            if nb_snapshots:
                raise self._bad(f"has {nb_snapshots} internal snapshot(s); open it read-only")
            if incompat & INCOMPAT_CORRUPT:
                raise self._bad("marked corrupt; open read-only or repair with qemu-img check -r all")
            if incompat & INCOMPAT_DIRTY:
                raise self._bad("marked dirty (lazy refcounts); repair with qemu-img check -r all or open read-only")
        # Virtual size: served rounded up to whole sectors.
        self._vsize = size
        self._size = -(-size // SECTOR) * SECTOR
        self._l2n = cs // 8
        need_l1 = -(-size // (cs * self._l2n))
        if l1_size < need_l1:
            raise self._bad(f"L1 table of {l1_size} entries cannot map {size} bytes (needs {need_l1})")
        if l1_size * 8 > MAX_L1_BYTES:
            raise self._bad(f"L1 table of {l1_size} entries is too large")
        for what, off in (("L1 table", l1_off), ("refcount table", rt_off)):
            if off & (cs - 1) or off == 0 and what == "refcount table":
                raise self._bad(f"{what} offset {off:#x} is not cluster aligned")
        if l1_size and l1_off + l1_size * 8 > file_size:
            raise self._bad(f"L1 table at {l1_off:#x} lies beyond the end of the file")
        if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise self._bad(f"refcount table of {rt_clusters} clusters")
        if rt_off + rt_clusters * cs > file_size:
            raise self._bad(f"refcount table at {rt_off:#x} lies beyond the end of the file")
        self._l1_size = l1_size
        self._l1_off = l1_off
        self._rt_off = rt_off
        self._rt_clusters = rt_clusters
        self._refbits = 1 << refcount_order
        self._refcount_order = refcount_order
        self._rb_entries = cs * 8 // self._refbits
        self._incompat = incompat
        self._compat = compat
        self._autoclear = autoclear
        self._nb_snapshots = nb_snapshots
        self._backing_format: str | None = exts.backing_format
        self._backing: str | None = None
        # Compressed cluster descriptor (qcow2.txt "Compressed Clusters").
        self._csize_shift = 62 - (cluster_bits - 8)
        self._csize_mask = (1 << (cluster_bits - 8)) - 1
        self._coff_mask = (1 << self._csize_shift) - 1
        if backing_off:
            if backing_len == 0 or backing_len > 1023:
                raise self._bad(f"backing file name length {backing_len} outside 1..1023")
            if backing_off + backing_len > file_size:
                raise self._bad("backing file name lies beyond the end of the file")
            raw = self._pread(backing_off, backing_len)
            self._backing = os.fsdecode(bytes(raw))
        if not self._read_only and autoclear:
            # qcow2.txt: a writer that does not maintain the auto-clear
            # features (bitmaps...) must clear their bits before writing.
            self._meta_write(U64.pack(0), 88)
            self._autoclear = 0

    def _parse_extensions(self, head: bytearray, start: int, backing_off: int) -> Extensions:
        out = Extensions()
        limit = min(len(head), self._cs)
        if backing_off and backing_off < limit:
            limit = backing_off
        pos = start
        while pos + EXT_HEADER.size <= limit:
            etype, elen = EXT_HEADER.unpack_from(head, pos)
            if etype == EXT_END:
                break
            data_start = pos + EXT_HEADER.size
            if data_start + elen > limit:
                raise self._bad(f"header extension {etype:#x} runs past the header cluster")
            data = bytes(head[data_start : data_start + elen])
            if etype == EXT_BACKING_FORMAT:
                out.backing_format = data.decode("ascii", "replace")
            elif etype == EXT_FEATURE_NAMES:
                names: dict[int, str] = {}
                for i in range(0, elen - 47, 48):
                    if data[i] == 0:  # incompatible features only
                        names[data[i + 1]] = data[i + 2 : i + 48].rstrip(b"\0").decode("ascii", "replace")
                out.feature_names = names
            pos = data_start + ((elen + 7) & ~7)
        return out

    def _load_tables(self) -> None:
        self._l1 = be_array("Q", self._pread(self._l1_off, self._l1_size * 8))
        self._reftable = be_array("Q", self._pread(self._rt_off, self._rt_clusters * self._cs))
        self._refblocks: dict[int, RefBlock] = {}
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cache_max = max(16, L2_CACHE_BYTES // self._cs)
        self._free_hint = 0
        self._last_compressed: tuple[int, bytes] | None = None

    # -- properties -----------------------------------------------------------

    @property
    def thin(self) -> bool:
        # v2 with a backing file cannot say "zero" without writing zeroes.
        return self.version >= 3 or self.parent is None

    @property
    def zero_after_discard(self) -> bool:
        return True

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return self._cs

    def info(self) -> ImageInfo:
        st = os.fstat(self._fd)
        extra = {
            "cluster_size": str(self._cs),
            "refcount_bits": str(self._refbits),
            "compression_type": "zlib",
        }
        if self._incompat & INCOMPAT_DIRTY:
            extra["dirty"] = "true"
        if self._incompat & INCOMPAT_CORRUPT:
            extra["corrupt"] = "true"
        if self._compat & COMPAT_LAZY_REFCOUNTS:
            extra["lazy_refcounts"] = "true"
        if self._nb_snapshots:
            extra["snapshots"] = str(self._nb_snapshots)
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._vsize,
            allocated_size=st.st_blocks * 512,
            backing=self._backing,
            backing_format=self._backing_format,
            subformat="1.1" if self.version >= 3 else "0.10",
            extra=extra,
        )

    # -- low-level metadata I/O -----------------------------------------------

    def _meta_write(self, data: Buffer, offset: int) -> None:
        pwrite_medium(self._fd, data, offset, self.path)
        end = offset + len(data)
        self._file_size = max(self._file_size, end)

    def _l2_table(self, l1i: int) -> array[int] | None:
        if l1i >= self._l1_size:
            return None
        off = self._l1[l1i] & OFFSET_MASK
        if off == 0:
            return None
        cache = self._l2_cache
        table = cache.get(off)
        if table is not None:
            cache.move_to_end(off)
            return table
        if off & (self._cs - 1) or off + self._cs > self._file_size:
            raise MediumError(f"{self.path}: qcow2: corrupt L1 entry {l1i} (L2 table at {off:#x})")
        table = be_array("Q", self._pread(off, self._cs))
        cache[off] = table
        if len(cache) > self._l2_cache_max:
            cache.popitem(last=False)
        return table

    def _entry(self, gc: int) -> int:
        l1i, l2i = divmod(gc, self._l2n)
        table = self._l2_table(l1i)
        return 0 if table is None else table[l2i]

    def _classify(self, entry: int) -> tuple[int, int]:
        """(kind, host cluster offset) of an L2 entry."""
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED, entry & self._coff_mask
        host = entry & OFFSET_MASK
        if entry & OFLAG_ZERO and self.version >= 3:
            return ZERO, host
        if host == 0:
            return UNALLOC, 0
        if host & (self._cs - 1):
            raise MediumError(f"{self.path}: qcow2: corrupt L2 entry {entry:#x} (unaligned cluster)")
        return NORMAL, host

    def _decompress(self, entry: int) -> bytes:
        cached = self._last_compressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        coff = entry & self._coff_mask
        nsect = ((entry >> self._csize_shift) & self._csize_mask) + 1
        csize = nsect * SECTOR - (coff & (SECTOR - 1))
        data = self._pread(coff, csize)
        try:
            out = zlib.decompressobj(-12).decompress(data, self._cs)
        except zlib.error as e:
            raise MediumError(f"{self.path}: qcow2: corrupt compressed cluster at {coff:#x}: {e}") from None
        if len(out) != self._cs:
            raise MediumError(f"{self.path}: qcow2: compressed cluster at {coff:#x} is short")
        self._last_compressed = (entry, out)
        return out

    # -- reads (MappedImage) ----------------------------------------------------

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        cs = self._cs
        span = cs * self._l2n
        free_kind = RUN_PARENT if self.parent is not None else RUN_ZERO
        pos, end = offset, offset + length
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            table = self._l2_table(l1i)
            if table is None:
                # No L2 table: one run for its whole span (a whole-disk GET
                # LBA STATUS or read of an empty image is quick).
                yield Run(stop - pos, free_kind)
                pos = stop
                continue
            # The cluster walk of cluster_pieces inlined, entries taken from
            # the one L2 table: this is the read path.
            first = l1i * self._l2n
            while pos < stop:
                gc, inner = divmod(pos, cs)
                n = min(cs - inner, stop - pos)
                entry = table[gc - first]
                kind, host = self._classify(entry)
                if kind == NORMAL:
                    yield Run(n, RUN_DATA, self._fd, host + inner)
                elif kind == UNALLOC:
                    yield Run(n, free_kind)
                elif kind == ZERO:
                    yield Run(n, RUN_ZERO)
                else:
                    data = memoryview(self._decompress(entry))[inner : inner + n]
                    yield Run(n, RUN_BYTES, data=data)
                pos += n

    # -- writes ---------------------------------------------------------------

    def _cluster_base(self, gc: int, kind: int, entry: int, host: int) -> bytearray:
        """The current contents of guest cluster ``gc`` (for copy-on-write
        of a partial write)."""
        cs = self._cs
        if kind == NORMAL:
            return self._pread(host, cs)
        if kind == COMPRESSED:
            return bytearray(self._decompress(entry))
        if kind == UNALLOC and self.parent is not None:
            return bytearray(self._read_backing(gc * cs, cs))
        return bytearray(cs)

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        cs = self._cs
        updates: dict[int, int] = {}
        frees: list[int] = []
        runs = RunWriter(lambda host, at, n: self._meta_write(view[at : at + n], host))
        for gc, inner, n, at in cluster_pieces(offset, len(view), cs):
            entry = self._entry(gc)
            kind, host = self._classify(entry)
            if kind == NORMAL and (entry & OFLAG_COPIED or self._refcount(host >> self._cb) == 1):
                runs.add(host + inner, at, n)
                continue
            buf: Buffer
            if n == cs:
                buf = view[at : at + n]
            else:
                base = self._cluster_base(gc, kind, entry, host)
                base[inner : inner + n] = view[at : at + n]
                buf = base
            if kind == ZERO and host and self._refcount(host >> self._cb) == 1:
                # A preallocated zero cluster: fill it in place.
                self._meta_write(buf, host)
                updates[gc] = host | OFLAG_COPIED
                continue
            c = self._pick_free()
            self._meta_write(buf, c * cs)  # data first ...
            self._set_refcount(c, 1)  # ... then its refcount ...
            updates[gc] = (c * cs) | OFLAG_COPIED
            if kind in (NORMAL, COMPRESSED) or host:
                frees.append(entry)
        runs.flush()
        if updates:
            self._update_l2(updates)  # ... then the mapping
        for entry in frees:
            self._release(entry)

    def _update_l2(self, updates: dict[int, int]) -> None:
        groups: dict[int, dict[int, int]] = {}
        for gc, value in updates.items():
            l1i, l2i = divmod(gc, self._l2n)
            groups.setdefault(l1i, {})[l2i] = value
        for l1i, entries in sorted(groups.items()):
            table = self._l2_table(l1i)
            if table is None:
                if not any(entries.values()):
                    continue
                table = array("Q", bytes(self._cs))
                for l2i, value in entries.items():
                    table[l2i] = value
                c = self._pick_free()
                off = c * self._cs
                self._meta_write(be_bytes(table), off)
                self._set_refcount(c, 1)
                self._l1[l1i] = off | OFLAG_COPIED
                self._meta_write(U64.pack(off | OFLAG_COPIED), self._l1_off + l1i * 8)
                self._l2_cache[off] = table
                continue
            for l2i, value in entries.items():
                table[l2i] = value
            lo, hi = min(entries), max(entries) + 1
            off = self._l1[l1i] & OFFSET_MASK
            self._meta_write(be_bytes(table, lo, hi), off + lo * 8)

    def _zero_range(self, offset: int, length: int) -> None:
        """Make [offset, +length) read as zeroes, deallocating whole clusters
        (the caller has checked the range)."""
        cs = self._cs
        updates: dict[int, int] = {}
        frees: list[int] = []
        partial: list[tuple[int, int]] = []
        # Without a parent an unallocated cluster reads as zeroes; with one,
        # v3 says so with the zero flag; v2 has to write zeroes.
        zero_entry = 0 if self.parent is None else (OFLAG_ZERO if self.version >= 3 else -1)
        span = cs * self._l2n
        pos, end = offset, offset + length
        while pos < end:
            # One L2 table's worth at a time; a range with no L2 table and
            # no parent already reads as zeroes (a whole-disk UNMAP is quick).
            stop = min(end, (pos // span + 1) * span)
            if zero_entry == 0 and self._l2_table(pos // span) is None:
                pos = stop
                continue
            for gc, inner, n, at in cluster_pieces(pos, stop - pos, cs):
                entry = self._entry(gc)
                kind, host = self._classify(entry)
                whole = n == cs or (inner == 0 and pos + at + n >= self._size)
                reads_zero = kind == ZERO or (kind == UNALLOC and self.parent is None)
                if reads_zero and not (whole and host):
                    continue
                if not whole or zero_entry < 0:
                    partial.append((pos + at, n))
                    continue
                updates[gc] = zero_entry
                if kind != UNALLOC:
                    frees.append(entry)
            if updates:
                self._update_l2(updates)  # unmap first ...
            for entry in frees:
                self._release(entry)  # ... then drop the references
            updates.clear()
            frees.clear()
            pos = stop
        for off, n in partial:
            Backend.write_zeroes(self, off, n)

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        self._zero_range(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        self._zero_range(offset, length)


# -- registry format interface -------------------------------------------------


def probe(head: bytes, path: str) -> bool:
    """The qcow magic (any version: ``open`` refuses versions other than 2
    and 3 by name rather than letting the file pass as raw)."""
    return head[:4] == MAGIC


def open(path: str, *, read_only: bool = False, write_through: bool = False) -> Qcow2Image:
    """Open a qcow2 image and its backing chain."""
    return Qcow2Image(path, read_only=read_only, write_through=write_through)
