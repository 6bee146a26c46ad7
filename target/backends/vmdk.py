"""VMware VMDK images, read and write (streamOptimized read-only).

Per VMware's "Virtual Disk Format 1.1" (and qemu's block/vmdk.c behaviour):

* A **descriptor** (text): ``version=1``, ``CID`` (content id, 8 hex digits,
  changed on the first write of a session), ``parentCID`` (ffffffff: no
  parent), ``createType``, ``parentFileNameHint``, extent lines
  ``ACCESS SECTORS TYPE ["FILE" [OFFSET]]`` (access RW / RDONLY / NOACCESS;
  type SPARSE, FLAT, ZERO, VMFS...) and ``ddb.*`` keys. It is a file of its
  own (monolithicFlat, twoGbMaxExtent*) or embedded in a sparse extent
  (monolithicSparse, streamOptimized).
* A **hosted sparse extent** starts with a 512-byte little-endian header:
  magic "KDMV", version, flags (bit 0 valid new-line test, bit 1 redundant
  grain table, bit 2 zeroed-grain GTEs, bit 16 compressed grains, bit 17
  markers), capacity, grain size (sectors, 128 by default), descriptor
  offset/size, GTEs per GT (512), redundant GD offset, GD offset, overhead.
  The grain directory (GD) lists grain tables (GT); a GT entry is the
  sector of a grain: 0 unallocated (parent or zeroes), 1 a zeroed grain.
  streamOptimized: grains are deflate-compressed, each preceded by
  ``lba u64, size u32``; the GD offset in the header may be all ones, the
  real header being the footer 1024 bytes before the end of the file.

Writes: a new grain is appended at the end of its extent file (filled from
the parent, or zeroes, around the written part); its GT entry is written
after the data, in the GT and then in the redundant GT. A missing GT is
allocated (both copies) before the GD entries that point at it.

Chains: ``parentCID`` must equal the parent's ``CID`` - a parent written
after the child was made has a new CID, and the child is refused.
"""

from __future__ import annotations

import array
import builtins
import os
import random
import re
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .base import SECTOR, BackendError, Buffer, MediumError
from .registry import (
    CreateRequest,
    ImageBackend,
    ImageInfo,
    align_up,
    cluster_pieces,
    create_file,
    image_creator,
    open_backing,
    open_file,
    parent_for_create,
    resolve_backing,
)
from .mapped import (
    RUN_BYTES,
    RUN_DATA,
    RUN_PARENT,
    RUN_ZERO,
    MappedImage,
    Run,
    pread_exact,
    pwrite_all,
)

NAME = "vmdk"

MAGIC = 0x564D444B  # "KDMV" little-endian
COWD = b"COWD"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_TEST = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
NO_PARENT = 0xFFFFFFFF
DEFAULT_GRAIN = 128  # sectors (64 KiB)
GTES = 512
DESC_SECTORS = 20
#: The largest descriptor we read as text (a real one is a few hundred bytes).
MAX_DESCRIPTOR = 1 << 20
TWO_GB = 2 << 30

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")

_HDR = struct.Struct("<IIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")
_U32 = struct.Struct("<I")

_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_KV_RE = re.compile(r'^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$')


@dataclass
class _Header:
    version: int
    flags: int
    capacity: int  # sectors
    grain: int  # sectors
    desc_offset: int
    desc_size: int
    gtes: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress: int


def _parse_header(path: str, raw: bytes) -> _Header:
    if len(raw) < _HDR.size:
        raise BackendError(f"{path}: truncated VMDK sparse header ({len(raw)} bytes)")
    (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
     _unclean, _chars, compress) = _HDR.unpack_from(raw)
    if magic != MAGIC:
        raise BackendError(f"{path}: not a VMDK sparse extent: magic {raw[:4]!r}, expected b'KDMV'")
    if version not in (1, 2, 3):
        raise BackendError(f"{path}: unsupported VMDK sparse extent version {version}")
    if grain < 1 or grain & (grain - 1) or grain > 1 << 18:
        raise BackendError(f"{path}: damaged VMDK header: grain size {grain} sectors is not a power of two")
    if gtes < 1 or gtes > 1 << 16:
        raise BackendError(f"{path}: damaged VMDK header: {gtes} entries per grain table")
    if capacity > 1 << 40:
        raise BackendError(f"{path}: damaged VMDK header: capacity {capacity} sectors")
    if flags & FLAG_COMPRESSED and compress != 1:
        raise BackendError(f"{path}: unsupported VMDK compression algorithm {compress} (deflate only)")
    return _Header(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, compress)


def _header_bytes(h: _Header) -> bytes:
    raw = bytearray(SECTOR)
    _HDR.pack_into(raw, 0, MAGIC, h.version, h.flags, h.capacity, h.grain, h.desc_offset, h.desc_size,
                   h.gtes, h.rgd_offset, h.gd_offset, h.overhead, 0, b"\n \r\n", h.compress)
    return bytes(raw)


def _looks_like_descriptor(head: bytes) -> bool:
    if b"\0" in head[:1024]:
        return False
    text = head[:4096].decode("latin-1")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        return re.match(r"version\s*=\s*\d", line) is not None and "createType" in text
    return False


def probe(head: bytes, path: str) -> bool:
    """A sparse extent ("KDMV"/"COWD" magic) or a text descriptor."""
    if len(head) >= 4 and (_U32.unpack_from(head)[0] == MAGIC or head[:4] == COWD):
        return True
    return head.lstrip().startswith(b"# Disk DescriptorFile") or _looks_like_descriptor(head)


# ---------------------------------------------------------------------------
# Descriptor
# ---------------------------------------------------------------------------


@dataclass
class _ExtentLine:
    access: str
    sectors: int
    kind: str
    file: str | None
    offset: int  # sectors into the file (FLAT/VMFS)


@dataclass
class _Descriptor:
    keys: dict[str, str] = field(default_factory=dict)
    extents: list[_ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    text: str = ""


def _parse_descriptor(path: str, text: str) -> _Descriptor:
    d = _Descriptor(text=text)
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, kind, fname, off = m.groups()
            if kind != "ZERO" and fname is None:
                raise BackendError(f"{path}: VMDK descriptor line {lineno}: {kind} extent without a file name")
            d.extents.append(_ExtentLine(access, int(sectors), kind, fname, int(off or 0)))
            continue
        m = _KV_RE.match(line)
        if m is None:
            raise BackendError(f"{path}: VMDK descriptor line {lineno} is not understood: {line[:60]!r}")
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        (d.ddb if key.startswith("ddb.") else d.keys)[key] = value
    if d.keys.get("version") not in ("1", "2", "3"):
        raise BackendError(f"{path}: unsupported VMDK descriptor version {d.keys.get('version')!r}")
    if not d.extents:
        raise BackendError(f"{path}: VMDK descriptor lists no extents")
    for key in ("CID", "parentCID"):
        v = d.keys.get(key, "ffffffff")
        if not re.fullmatch(r"[0-9a-fA-F]{1,8}", v):
            raise BackendError(f"{path}: VMDK descriptor {key}={v!r} is not a 32-bit hex number")
    return d


def _hexkey(d: _Descriptor, key: str) -> int:
    return int(d.keys.get(key, "ffffffff"), 16)


# ---------------------------------------------------------------------------
# Extents
# ---------------------------------------------------------------------------


class _Sparse:
    """A hosted sparse extent: GD/GT cached in memory once read."""

    def __init__(self, path: str, fd: int, hdr: _Header, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.hdr = hdr
        self.writable = writable
        self.grain_bytes = hdr.grain * SECTOR
        self.gt_bytes = hdr.gtes * 4
        self.gt_space = align_up(self.gt_bytes, SECTOR)
        self.compressed = bool(hdr.flags & FLAG_COMPRESSED)
        file_size = os.fstat(fd).st_size
        self.file_end = align_up(file_size, SECTOR)
        grains = -(-hdr.capacity // hdr.grain)
        self.n_gt = -(-grains // hdr.gtes)
        if hdr.gd_offset in (0, GD_AT_END) or hdr.gd_offset * SECTOR + 4 * self.n_gt > file_size:
            raise BackendError(f"{path}: damaged VMDK: grain directory at sector {hdr.gd_offset} is outside the file")
        self.gd = self._read_dir(hdr.gd_offset, "grain directory")
        self.rgd: array.array[int] | None = None
        if hdr.flags & FLAG_RGD and hdr.rgd_offset not in (0, GD_AT_END):
            self.rgd = self._read_dir(hdr.rgd_offset, "redundant grain directory")
        limit = file_size // SECTOR
        bad = max(self.gd, default=0)
        if bad and bad + self.gt_space // SECTOR > limit + 1:
            raise BackendError(f"{path}: damaged VMDK: grain table at sector {bad} is outside the file")
        self.gts: dict[int, array.array[int]] = {}
        self._grain_cache: tuple[int, bytes] | None = None

    def _read_dir(self, sector: int, what: str) -> array.array[int]:
        a = array.array("I")
        a.frombytes(pread_exact(self.fd, 4 * self.n_gt, sector * SECTOR, self.path, f"VMDK {what}"))
        if sys.byteorder != "little":
            a.byteswap()
        return a

    def gt(self, i: int) -> array.array[int] | None:
        t = self.gts.get(i)
        if t is None:
            sector = self.gd[i]
            if sector == 0:
                return None
            t = array.array("I")
            t.frombytes(pread_exact(self.fd, self.gt_bytes, sector * SECTOR, self.path, "VMDK grain table"))
            if sys.byteorder != "little":
                t.byteswap()
            self.gts[i] = t
        return t

    def entry(self, grain_index: int) -> int:
        t = self.gt(grain_index // self.hdr.gtes)
        return 0 if t is None else t[grain_index % self.hdr.gtes]

    def grain_data(self, sector: int) -> bytes:
        """The decompressed grain stored at ``sector`` (streamOptimized)."""
        cached = self._grain_cache
        if cached is not None and cached[0] == sector:
            return cached[1]
        head = pread_exact(self.fd, _GRAIN_MARKER.size, sector * SECTOR, self.path, "VMDK grain marker")
        _lba, size = _GRAIN_MARKER.unpack(head)
        if size == 0 or size > 2 * self.grain_bytes + 4096:
            raise BackendError(f"{self.path}: damaged VMDK compressed grain at sector {sector}: size {size}")
        blob = pread_exact(self.fd, size, sector * SECTOR + _GRAIN_MARKER.size, self.path, "VMDK grain")
        try:
            d = zlib.decompressobj()
            data = d.decompress(blob, self.grain_bytes)
        except zlib.error as e:
            raise MediumError(f"{self.path}: corrupt compressed grain at sector {sector}: {e}") from None
        if len(data) < self.grain_bytes:
            data += bytes(self.grain_bytes - len(data))
        self._grain_cache = (sector, data)
        return data

    def set_entry(self, grain_index: int, value: int) -> None:
        """Point a grain at ``value``: the GT first, then the redundant GT."""
        i, j = divmod(grain_index, self.hdr.gtes)
        t = self.gt(i)
        if t is None:
            t = self._new_gt(i)
        t[j] = value
        pwrite_all(self.fd, _U32.pack(value), self.gd[i] * SECTOR + 4 * j, self.path)
        if self.rgd is not None and self.rgd[i]:
            pwrite_all(self.fd, _U32.pack(value), self.rgd[i] * SECTOR + 4 * j, self.path)

    def _new_gt(self, i: int) -> array.array[int]:
        """Allocate grain table ``i`` (and its redundant copy) at the end of
        the file; the tables exist (zeroed) before a GD entry names them."""
        copies = 2 if self.rgd is not None else 1
        at = self.file_end
        os.ftruncate(self.fd, at + copies * self.gt_space)
        self.file_end = at + copies * self.gt_space
        sector = at // SECTOR
        pwrite_all(self.fd, _U32.pack(sector), self.hdr.gd_offset * SECTOR + 4 * i, self.path)
        self.gd[i] = sector
        if self.rgd is not None:
            rsector = sector + self.gt_space // SECTOR
            pwrite_all(self.fd, _U32.pack(rsector), self.hdr.rgd_offset * SECTOR + 4 * i, self.path)
            self.rgd[i] = rsector
        t = array.array("I", [0]) * self.hdr.gtes
        self.gts[i] = t
        return t


@dataclass
class _Extent:
    line: _ExtentLine
    start: int  # virtual byte offset
    length: int  # bytes
    fd: int = -1
    file_offset: int = 0  # bytes (FLAT)
    sparse: _Sparse | None = None
    path: str = ""


class VmdkImage(MappedImage):
    """An open VMDK (descriptor plus extents)."""

    def __init__(
        self,
        path: str,
        desc: _Descriptor,
        extents: list[_Extent],
        fds: dict[str, int],
        desc_fd: int,
        desc_area: tuple[int, int] | None,
        *,
        read_only: bool,
        write_through: bool,
        parent: ImageBackend | None,
    ) -> None:
        size = sum(e.length for e in extents)
        super().__init__(path, size, read_only=read_only, write_through=write_through, parent=parent)
        self._desc = desc
        self._extents = extents
        self._starts = [e.start for e in extents]
        self._fds = fds
        self._desc_fd = desc_fd
        self._desc_area = desc_area  # (byte offset, byte size) if embedded
        self._cid_updated = False
        self._create_type = desc.keys.get("createType", "")
        self._stream = any(e.sparse is not None and e.sparse.compressed for e in extents)

    def info(self) -> ImageInfo:
        d = self._desc
        hint = d.keys.get("parentFileNameHint") if _hexkey(d, "parentCID") != NO_PARENT else None
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=sum(os.fstat(fd).st_blocks * 512 for fd in self._fds.values()),
            uuid=d.ddb.get("ddb.uuid.image"),
            parent_uuid=d.ddb.get("ddb.uuid.parent"),
            backing=hint,
            backing_format=NAME if hint else None,
            subformat=self._create_type,
            extra={
                "cid": f"{_hexkey(d, 'CID'):08x}",
                "parent_cid": f"{_hexkey(d, 'parentCID'):08x}",
                "extents": str(len(self._extents)),
                "adapter_type": d.ddb.get("ddb.adapterType", ""),
            },
        )

    def _extent_at(self, pos: int) -> int:
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _extent_pieces(self, offset: int, length: int) -> Iterator[tuple[_Extent, int, int, int]]:
        """Split [offset, offset+length) at extent boundaries: yields
        (extent, offset in the extent, length, virtual offset)."""
        end = offset + length
        pos = offset
        i = self._extent_at(pos)
        while pos < end:
            ext = self._extents[i]
            rel = pos - ext.start
            n = min(ext.length - rel, end - pos)
            if n > 0:
                yield ext, rel, n, pos
                pos += n
            i += 1

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        free_kind = RUN_PARENT if self.parent is not None else RUN_ZERO
        for ext, rel, n, pos in self._extent_pieces(offset, length):
            kind = ext.line.kind
            if ext.line.access == "NOACCESS":
                raise MediumError(f"{self.path}: read of NOACCESS extent {ext.line.file or ''} at {pos}")
            if kind == "ZERO":
                yield Run(n, RUN_ZERO)
            elif ext.sparse is None:
                yield Run(n, RUN_DATA, ext.fd, ext.file_offset + rel)
            else:
                sp = ext.sparse
                for g, within, m, _ in cluster_pieces(rel, n, sp.grain_bytes):
                    e = sp.entry(g)
                    if e == 0:
                        yield Run(m, free_kind)
                    elif e == 1:
                        yield Run(m, RUN_ZERO)
                    elif sp.compressed:
                        yield Run(m, RUN_BYTES, data=memoryview(sp.grain_data(e))[within : within + m])
                    else:
                        yield Run(m, RUN_DATA, sp.fd, e * SECTOR + within)

    # -- writes -------------------------------------------------------------
    def _check_write(self, offset: int, length: int) -> None:
        if self._stream:
            raise BackendError(
                f"{self.path}: streamOptimized VMDK (compressed grains) is read-only here; "
                "convert it to monolithicSparse to write"
            )
        super()._check_write(offset, length)

    def _update_cid(self) -> None:
        """A new CID on the first write of a session (as VMware and qemu do),
        written before any data so children made earlier see the change."""
        if self._cid_updated:
            return
        cid = random.randrange(0, 0xFFFFFFFE)
        text, n = re.subn(r"(?m)^CID\s*=.*$", f"CID={cid:08x}", self._desc.text, count=1)
        if n == 0:
            text = f"CID={cid:08x}\n" + text
        data = text.encode("utf-8")
        if self._desc_area is not None:
            at, size = self._desc_area
            if len(data) > size:
                raise BackendError(f"{self.path}: the embedded VMDK descriptor has no room for a new CID")
            pwrite_all(self._desc_fd, data + bytes(size - len(data)), at, self.path)
        else:
            tmp = self.path + ".tmp-descriptor"
            with builtins.open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._desc.text = text
        self._desc.keys["CID"] = f"{cid:08x}"
        self._cid_updated = True

    def write(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        self._update_cid()
        touched: set[int] = set()
        for ext, rel, n, pos in self._extent_pieces(offset, len(mv)):
            piece = mv[pos - offset : pos - offset + n]
            if ext.line.access != "RW" or ext.line.kind == "ZERO":
                raise BackendError(
                    f"{self.path}: write to a {ext.line.access} {ext.line.kind} extent at {pos} refused"
                )
            if ext.sparse is None:
                pwrite_all(ext.fd, piece, ext.file_offset + rel, self.path)
            else:
                self._write_sparse(ext, ext.sparse, rel, piece)
            touched.add(ext.fd)
        self._after_write(*touched)

    def _write_sparse(self, ext: _Extent, sp: _Sparse, rel: int, piece: memoryview) -> None:
        for g, within, m, done in cluster_pieces(rel, len(piece), sp.grain_bytes):
            part = piece[done : done + m]
            e = sp.entry(g)
            if e > 1:
                pwrite_all(sp.fd, part, e * SECTOR + within, self.path)
            else:
                self._allocate_grain(ext, sp, g, within, part, e)

    def _allocate_grain(self, ext: _Extent, sp: _Sparse, g: int, within: int, part: memoryview, e: int) -> None:
        gb = sp.grain_bytes
        at = sp.file_end
        vstart = ext.start + g * gb
        base = None
        if e == 0 and self.parent is not None:
            base = self._parent_read(vstart, min(gb, ext.start + ext.length - vstart))
        if base is None:
            # Zeroes around the written part: growing the file provides them.
            os.ftruncate(sp.fd, at + gb)
            pwrite_all(sp.fd, part, at + within, self.path)
        else:
            buf = bytearray(gb)
            buf[: len(base)] = base
            buf[within : within + len(part)] = part
            pwrite_all(sp.fd, buf, at, self.path)
        sp.file_end = at + gb
        if self._write_through:
            os.fdatasync(sp.fd)  # the grain is durable before a GTE points at it
        sp.set_entry(g, at // SECTOR)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        pos = offset
        for run in list(self._runs(offset, length)):
            if run.kind != RUN_ZERO and not (run.kind == RUN_PARENT and self.parent is None):
                super().write_zeroes(pos, run.length)
            pos += run.length

    def _files(self) -> Iterable[int]:
        return set(self._fds.values()) | {self._desc_fd}


# ---------------------------------------------------------------------------
# open
# ---------------------------------------------------------------------------


def _read_sparse_header(path: str, fd: int) -> _Header:
    hdr = _parse_header(path, pread_exact(fd, SECTOR, 0, path, "VMDK header"))
    if hdr.gd_offset == GD_AT_END:
        # streamOptimized: the footer (a header copy with the real GD
        # offset) sits before the end-of-stream marker.
        size = os.fstat(fd).st_size
        if size < 3 * SECTOR:
            raise BackendError(f"{path}: truncated streamOptimized VMDK: no footer")
        foot = _parse_header(path, pread_exact(fd, SECTOR, size - 2 * SECTOR, path, "VMDK footer"))
        if foot.gd_offset == GD_AT_END:
            raise BackendError(f"{path}: damaged streamOptimized VMDK: footer has no grain directory offset")
        hdr.gd_offset, hdr.rgd_offset = foot.gd_offset, foot.rgd_offset
    return hdr


def open(path: str, *, read_only: bool, write_through: bool = False) -> VmdkImage:
    """Open a VMDK (descriptor or monolithic sparse file) and its extents."""
    desc_fd = open_file(path, read_only=read_only)
    fds: dict[str, int] = {os.path.realpath(path): desc_fd}
    parent: ImageBackend | None = None
    try:
        head = os.pread(desc_fd, SECTOR, 0)
        desc_area: tuple[int, int] | None = None
        own_hdr: _Header | None = None
        if head[:4] == COWD:
            raise BackendError(f"{path}: unsupported VMDK: ESX VMFS sparse (COWD) extents")
        if len(head) >= 4 and _U32.unpack_from(head)[0] == MAGIC:
            own_hdr = _read_sparse_header(path, desc_fd)
            if own_hdr.desc_offset and own_hdr.desc_size:
                at, size = own_hdr.desc_offset * SECTOR, own_hdr.desc_size * SECTOR
                raw = pread_exact(desc_fd, size, at, path, "VMDK embedded descriptor")
                text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
                desc_area = (at, size)
            else:
                text = ""
            if not text.strip():
                # A bare sparse extent: one extent, the file itself.
                kind = "streamOptimized" if own_hdr.flags & FLAG_COMPRESSED else "monolithicSparse"
                text = (
                    f'version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{kind}"\n'
                    f'RW {own_hdr.capacity} SPARSE "{os.path.basename(path)}"\n'
                )
                desc_area = None
        else:
            size = os.fstat(desc_fd).st_size
            if size > MAX_DESCRIPTOR or not probe(head, path):
                raise BackendError(f"{path}: not a VMDK: no KDMV magic and no text descriptor")
            raw = pread_exact(desc_fd, size, 0, path, "VMDK descriptor")
            # qemu pads descriptor files with NULs: the text ends at the first.
            text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        desc = _parse_descriptor(path, text)
        ctype = desc.keys.get("createType", "")
        if ctype in ("vmfsSparse", "vmfsRaw", "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap", "seSparse"):
            raise BackendError(f"{path}: unsupported VMDK createType {ctype}")
        if ctype == "streamOptimized":
            read_only = True
        extents: list[_Extent] = []
        start = 0
        for line in desc.extents:
            ext = _Extent(line, start, line.sectors * SECTOR)
            if line.access != "RW":
                read_only = True  # RDONLY/NOACCESS parts make the disk read-only
            if line.kind in ("FLAT", "VMFS", "SPARSE"):
                assert line.file is not None
                if own_hdr is not None and line.kind == "SPARSE" and len(desc.extents) == 1:
                    # An embedded descriptor describes its own file, whatever
                    # the file has been renamed to since.
                    fpath = path
                else:
                    fpath = resolve_backing(path, line.file)
                real = os.path.realpath(fpath)
                fd = fds.get(real)
                if fd is None:
                    try:
                        fd = os.open(fpath, os.O_RDONLY if read_only or line.access != "RW" else os.O_RDWR)
                    except OSError as e:
                        raise BackendError(f"{path}: cannot open extent {line.file}: {e.strerror}") from None
                    fds[real] = fd
                ext.fd, ext.path = fd, fpath
                if line.kind == "SPARSE":
                    hdr = own_hdr if fd == desc_fd and own_hdr is not None else _read_sparse_header(fpath, fd)
                    if hdr.capacity < line.sectors:
                        raise BackendError(
                            f"{path}: extent {line.file} holds {hdr.capacity} sectors, descriptor says {line.sectors}"
                        )
                    ext.sparse = _Sparse(fpath, fd, hdr, line.access == "RW" and not read_only)
                else:
                    ext.file_offset = line.offset * SECTOR
            elif line.kind != "ZERO":
                raise BackendError(f"{path}: unsupported VMDK extent type {line.kind} ({line.file or ''})")
            extents.append(ext)
            start += ext.length
        pcid = _hexkey(desc, "parentCID")
        if pcid != NO_PARENT:
            hint = desc.keys.get("parentFileNameHint")
            if not hint:
                raise BackendError(f"{path}: VMDK has parentCID {pcid:08x} but no parentFileNameHint")
            parent = open_backing(path, hint, None)
            pinfo = parent.info()
            if pinfo.format != NAME:
                raise BackendError(f"{path}: parent {hint} is {pinfo.format}; a VMDK parent must be a VMDK")
            if int(pinfo.extra.get("cid", "ffffffff"), 16) != pcid:
                raise BackendError(
                    f"{path}: parent {hint} has CID {pinfo.extra.get('cid')}, this image expects {pcid:08x} "
                    "(the parent changed after this image was made)"
                )
        return VmdkImage(
            path, desc, extents, fds, desc_fd, desc_area,
            read_only=read_only, write_through=write_through, parent=parent,
        )
    except BaseException:
        for fd in set(fds.values()):
            os.close(fd)
        if parent is not None:
            parent.close()
        raise


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------


def _sparse_layout(capacity: int, with_desc: bool, zeroed: bool) -> tuple[_Header, bytes, bytes]:
    """Header, metadata (GDs and preallocated GTs, from sector 1) for a new
    hosted sparse extent, laid out like VMware/qemu: header, descriptor,
    redundant GD + GTs, GD + GTs, grains from a grain-aligned overhead."""
    grain = DEFAULT_GRAIN
    grains = -(-capacity // grain)
    n_gt = -(-grains // GTES)
    gd_sectors = align_up(4 * n_gt, SECTOR) // SECTOR
    gt_sectors = align_up(4 * GTES, SECTOR) // SECTOR
    desc_off, desc_size = (1, DESC_SECTORS) if with_desc else (0, 0)
    rgd = 1 + desc_size
    rgt = rgd + gd_sectors
    gd = rgt + n_gt * gt_sectors
    gt = gd + gd_sectors
    overhead = align_up(gt + n_gt * gt_sectors, grain)
    hdr = _Header(2 if zeroed else 1, FLAG_NL_TEST | FLAG_RGD | (FLAG_ZERO_GTE if zeroed else 0),
                  capacity, grain, desc_off, desc_size, GTES, rgd, gd, overhead, 0)

    def directory(first: int) -> bytes:
        a = array.array("I", range(first, first + n_gt * gt_sectors, gt_sectors))
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()

    return hdr, directory(rgt), directory(gt)


def _write_sparse(path: str, capacity: int, desc_text: str | None, zeroed: bool) -> None:
    hdr, rgd_bytes, gd_bytes = _sparse_layout(capacity, desc_text is not None, zeroed)
    fd = create_file(path)
    try:
        os.ftruncate(fd, hdr.overhead * SECTOR)
        pwrite_all(fd, _header_bytes(hdr), 0, path)
        if desc_text is not None:
            data = desc_text.encode("utf-8")
            if len(data) > DESC_SECTORS * SECTOR:
                raise BackendError(f"{path}: VMDK descriptor too long to embed ({len(data)} bytes)")
            pwrite_all(fd, data, SECTOR, path)
        pwrite_all(fd, rgd_bytes, hdr.rgd_offset * SECTOR, path)
        pwrite_all(fd, gd_bytes, hdr.gd_offset * SECTOR, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _descriptor(ctype: str, cid: int, pcid: int, hint: str | None, lines: list[str], size: int,
                adapter: str) -> str:
    sectors = size // SECTOR
    heads, secs = (16, 63) if adapter == "ide" else (255, 63)
    cyl = min(sectors // (heads * secs), 16383)
    out = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={pcid:08x}",
        f'createType="{ctype}"',
    ]
    if hint is not None:
        out.append(f'parentFileNameHint="{hint}"')
    out += ["", "# Extent description", *lines, "", "# The Disk Data Base", "#DDB", "",
            'ddb.virtualHWVersion = "4"', f'ddb.geometry.cylinders = "{cyl}"',
            f'ddb.geometry.heads = "{heads}"', f'ddb.geometry.sectors = "{secs}"',
            f'ddb.adapterType = "{adapter}"', ""]
    return "\n".join(out)


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VMDK. Options: ``subformat`` (monolithicSparse default,
    monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat),
    ``adapter_type`` (ide, lsilogic, buslogic, legacyESX), ``zeroed_grain``
    (on/off), ``extent_size`` (bytes per extent of the twoGbMaxExtent kinds,
    default 2 GiB). ``backing`` (a VMDK) records parentCID and
    parentFileNameHint; only sparse subformats can have one."""
    path, size = req.path, req.size
    opts = req.checked_options({"subformat", "adapter_type", "zeroed_grain", "extent_size"})
    backing = req.backing
    sub = opts.get("subformat", "monolithicSparse")
    if sub not in SUBFORMATS:
        if sub == "streamOptimized":
            raise BackendError(f"{path}: creating streamOptimized VMDKs is not supported (read-only format here)")
        raise BackendError(f"{path}: unknown VMDK subformat {sub!r} (known: {', '.join(SUBFORMATS)})")
    adapter = opts.get("adapter_type", "ide")
    if adapter not in ("ide", "lsilogic", "buslogic", "legacyESX"):
        raise BackendError(f"{path}: unknown VMDK adapter type {adapter!r}")
    zeroed = opts.get("zeroed_grain", "off") == "on"
    try:
        extent_size = int(opts.get("extent_size", str(TWO_GB)))
    except ValueError:
        raise BackendError(f"{path}: extent_size {opts['extent_size']!r} is not a number") from None
    if extent_size < 1 << 20 or extent_size % (DEFAULT_GRAIN * SECTOR):
        raise BackendError(f"{path}: extent_size {extent_size} must be a multiple of 64 KiB >= 1 MiB")
    pcid = NO_PARENT
    hint: str | None = None
    if backing is not None:
        if "Flat" in sub:
            raise BackendError(f"{path}: a {sub} VMDK cannot have a backing file")
        pinfo, psize = parent_for_create(path, backing, req.backing_format, NAME, "a VMDK")
        pcid = int(pinfo.extra.get("cid", "ffffffff"), 16)
        if size == 0:
            size = psize
        full = resolve_backing(path, backing)
        hint = os.path.relpath(full, os.path.dirname(os.path.abspath(path)))
    req.check_size(size, "VMDK")
    cid = random.randrange(0, 0xFFFFFFFE)
    sectors = size // SECTOR
    base = path[:-5] if path.lower().endswith(".vmdk") else path
    name = os.path.basename(base)
    directory = os.path.dirname(os.path.abspath(path))
    if sub == "monolithicSparse":
        text = _descriptor(sub, cid, pcid, hint, [f'RW {sectors} SPARSE "{os.path.basename(path)}"'], size, adapter)
        _write_sparse(path, sectors, text, zeroed)
        return
    lines: list[str] = []
    if sub == "monolithicFlat":
        pieces = [(f"{name}-flat.vmdk", sectors)]
    else:
        per = extent_size // SECTOR
        letter = "s" if sub == "twoGbMaxExtentSparse" else "f"
        pieces = [
            (f"{name}-{letter}{i + 1:03d}.vmdk", min(per, sectors - i * per))
            for i in range(-(-sectors // per))
        ]
    for fname, n in pieces:
        fpath = os.path.join(directory, fname)
        if sub.endswith("Sparse"):
            _write_sparse(fpath, n, None, zeroed)
            lines.append(f'RW {n} SPARSE "{fname}"')
        else:
            try:
                with builtins.open(fpath, "wb") as f:
                    f.truncate(n * SECTOR)
            except OSError as e:
                raise BackendError(f"{fpath}: cannot create: {e.strerror}") from None
            lines.append(f'RW {n} FLAT "{fname}" 0')
    text = _descriptor(sub, cid, pcid, hint, lines, size, adapter)
    try:
        with builtins.open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror}") from None
