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
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .base import SECTOR, BackendError, Buffer, MediumError
from .registry import (
    ImageBackend,
    ImageInfo,
    align_up,
    cluster_pieces,
    open_backing,
    open_file,
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
from .vmdk_format import (
    COWD, Descriptor, ExtentLine, FLAG_COMPRESSED, FLAG_RGD, GD_AT_END, GRAIN_MARKER, Header,
    MAGIC, MAX_DESCRIPTOR, NAME, NO_PARENT, U32, hexkey, parse_descriptor, parse_header, probe,
)
from .vmdk_create import create

#: The registry's format interface (target/backends/registry.py).
__all__ = ["NAME", "VmdkImage", "create", "open", "probe"]

# ---------------------------------------------------------------------------
# Extents
# ---------------------------------------------------------------------------


class _Sparse:
    """A hosted sparse extent: GD/GT cached in memory once read."""

    def __init__(self, path: str, fd: int, hdr: Header, writable: bool) -> None:
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
        head = pread_exact(self.fd, GRAIN_MARKER.size, sector * SECTOR, self.path, "VMDK grain marker")
        _lba, size = GRAIN_MARKER.unpack(head)
        if size == 0 or size > 2 * self.grain_bytes + 4096:
            raise BackendError(f"{self.path}: damaged VMDK compressed grain at sector {sector}: size {size}")
        blob = pread_exact(self.fd, size, sector * SECTOR + GRAIN_MARKER.size, self.path, "VMDK grain")
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
        pwrite_all(self.fd, U32.pack(value), self.gd[i] * SECTOR + 4 * j, self.path)
        if self.rgd is not None and self.rgd[i]:
            pwrite_all(self.fd, U32.pack(value), self.rgd[i] * SECTOR + 4 * j, self.path)

    def _new_gt(self, i: int) -> array.array[int]:
        """Allocate grain table ``i`` (and its redundant copy) at the end of
        the file; the tables exist (zeroed) before a GD entry names them."""
        copies = 2 if self.rgd is not None else 1
        at = self.file_end
        os.ftruncate(self.fd, at + copies * self.gt_space)
        self.file_end = at + copies * self.gt_space
        sector = at // SECTOR
        pwrite_all(self.fd, U32.pack(sector), self.hdr.gd_offset * SECTOR + 4 * i, self.path)
        self.gd[i] = sector
        if self.rgd is not None:
            rsector = sector + self.gt_space // SECTOR
            pwrite_all(self.fd, U32.pack(rsector), self.hdr.rgd_offset * SECTOR + 4 * i, self.path)
            self.rgd[i] = rsector
        t = array.array("I", [0]) * self.hdr.gtes
        self.gts[i] = t
        return t


@dataclass
class _Extent:
    line: ExtentLine
    start: int  # virtual byte offset
    length: int  # bytes
    fd: int = -1
    file_offset: int = 0  # bytes (FLAT)
    sparse: _Sparse | None = None
    path: str = ""


class VmdkImage(MappedImage):
    """An open VMDK (descriptor plus extents)."""

    _mmap_reads = True  # never shrinks or moves data while open (mapped.py)

    def __init__(
        self,
        path: str,
        desc: Descriptor,
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

    def member_files(self) -> list[str]:
        return [self.path, *(e.path for e in self._extents if e.path)]

    def info(self) -> ImageInfo:
        d = self._desc
        hint = d.keys.get("parentFileNameHint") if hexkey(d, "parentCID") != NO_PARENT else None
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
                "cid": f"{hexkey(d, 'CID'):08x}",
                "parent_cid": f"{hexkey(d, 'parentCID'):08x}",
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


def _read_sparse_header(path: str, fd: int) -> Header:
    hdr = parse_header(path, pread_exact(fd, SECTOR, 0, path, "VMDK header"))
    if hdr.gd_offset == GD_AT_END:
        # streamOptimized: the footer (a header copy with the real GD
        # offset) sits before the end-of-stream marker.
        size = os.fstat(fd).st_size
        if size < 3 * SECTOR:
            raise BackendError(f"{path}: truncated streamOptimized VMDK: no footer")
        foot = parse_header(path, pread_exact(fd, SECTOR, size - 2 * SECTOR, path, "VMDK footer"))
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
        own_hdr: Header | None = None
        if head[:4] == COWD:
            raise BackendError(f"{path}: unsupported VMDK: ESX VMFS sparse (COWD) extents")
        if len(head) >= 4 and U32.unpack_from(head)[0] == MAGIC:
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
        desc = parse_descriptor(path, text)
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
        pcid = hexkey(desc, "parentCID")
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
