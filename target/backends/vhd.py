"""Microsoft VHD images (fixed, dynamic, differencing), read and write.

Layout per Microsoft's "Virtual Hard Disk Image Format Specification"
(v1.0, 2006); every field is big-endian.

* Hard disk footer (512 bytes) at the end of the file - and, for dynamic and
  differencing disks, a copy at offset 0: cookie "conectix", features,
  version 1.0, data offset (the dynamic header; all ones for fixed disks),
  time stamp (seconds since 2000-01-01 UTC), creator application/version/
  host OS, original and current size, CHS geometry, disk type (2 fixed,
  3 dynamic, 4 differencing), checksum, unique id, saved state.
* Dynamic disk header (1024 bytes): cookie "cxsparse", table offset, version,
  max table entries, block size (2 MiB), checksum, and for differencing disks
  the parent's unique id, time stamp, UTF-16BE name and eight parent locator
  entries (platform code, data space, data length, data offset).
* Block allocation table (BAT): one u32 per block, the sector of the block's
  sector bitmap (followed by the block data), 0xFFFFFFFF when unallocated.
* A checksum is the one's complement of the byte sum of the structure with
  the checksum field taken as zero.

Choices (documented because the spec leaves them open):

* The size is the footer's current size (rounded down to a sector). qemu by
  default uses the CHS geometry for images of unknown creators, so ``create``
  rounds the size up to a CHS-representable one like qemu and Virtual PC do,
  unless ``force_size=on`` (then qemu needs ``force_size_calc=current_size``).
* Dynamic disks: new blocks are zero-filled with every bitmap bit set (as
  qemu does); the bitmap is only consulted for differencing disks, where a
  clear bit means "read the parent" and a write sets the bits it covers.
* Parent of a differencing disk, first that exists of: locator W2ru
  (relative Windows path, UTF-16LE), W2ku (absolute path, UTF-16LE), MacX
  (file URL, UTF-8), then the parent unicode name in the child's directory.
  Its footer unique id must equal the parent id recorded in the child (else
  refused); a differing parent time stamp is only reported in ``info`` (any
  copy of the file changes it). ``create`` writes W2ru and W2ku locators.
* A new block goes where the footer was; the footer is first written at the
  new end of file, then the block's bitmap and data, then the BAT entry, so
  a crash leaves at worst an unused block, never a footer-less file.
* Discard (dynamic disks only) unmaps whole blocks and moves the physically
  last block into the hole, shrinking the file; partial blocks get zeroes.
"""

from __future__ import annotations

import array
import builtins
import os
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import NamedTuple

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
    RUN_DATA,
    RUN_PARENT,
    RUN_ZERO,
    MappedImage,
    Run,
    pread_exact,
    pwrite_all,
)

NAME = "vhd"

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFF = 4
_TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
BAT_FREE = 0xFFFFFFFF
DEFAULT_BLOCK = 2 << 20
#: Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800
CREATOR_APP = b"aioi"
MAX_CHS_SECTORS = 65535 * 16 * 255

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_DYN = struct.Struct(">8sQQIIII16sII512s192s256s")
_LOC = struct.Struct(">4sIIIQ")
_U32 = struct.Struct(">I")
assert _FOOTER.size == 512 and _DYN.size == 1024 and _LOC.size == 24
_FOOTER_CSUM = 64
_DYN_CSUM = 36


def checksum(buf: Buffer, at: int) -> int:
    """The spec's checksum: one's complement of the byte sum, the 4-byte
    checksum field at ``at`` counted as zero."""
    mv = memoryview(buf).cast("B")
    total = sum(mv) - sum(mv[at : at + 4])
    return ~total & 0xFFFFFFFF


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for a disk of ``total_sectors`` (the spec's appendix algorithm)."""
    ts = min(total_sectors, MAX_CHS_SECTORS)
    if ts >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = ts // spt
    else:
        spt = 17
        cth = ts // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = ts // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = ts // spt
    return cth // heads, heads, spt


def chs_size(size: int) -> int:
    """The smallest CHS-representable size >= ``size`` (qemu and Virtual PC
    agree on it); sizes beyond the CHS range stay as they are."""
    total = -(-size // SECTOR)
    if total >= MAX_CHS_SECTORS:
        return total * SECTOR
    want = total
    while True:
        c, h, s = chs_geometry(want)
        if c * h * s >= total:
            return c * h * s * SECTOR
        want += 1


class _Footer(NamedTuple):
    features: int
    data_offset: int
    timestamp: int
    creator: bytes
    current_size: int
    geometry: tuple[int, int, int]
    disk_type: int
    uuid: uuid.UUID


def _parse_footer(path: str, raw: bytes, where: str) -> _Footer:
    (cookie, features, version, data_offset, ts, app, _cver, _cos, _orig, cur,
     cyl, heads, spt, dtype, csum, uid, _saved, _res) = _FOOTER.unpack(raw)
    if cookie != COOKIE:
        raise BackendError(f"{path}: not a VHD image: no \"conectix\" cookie {where} (found {cookie!r})")
    want = checksum(raw, _FOOTER_CSUM)
    if csum != want:
        raise BackendError(f"{path}: damaged VHD footer {where}: checksum {csum:#010x}, computed {want:#010x}")
    if version >> 16 != 1:
        raise BackendError(f"{path}: unsupported VHD version {version >> 16}.{version & 0xFFFF}")
    if dtype not in _TYPE_NAMES:
        raise BackendError(f"{path}: unsupported VHD disk type {dtype} (fixed, dynamic, differencing only)")
    return _Footer(features, data_offset, ts, app, cur, (cyl, heads, spt), dtype, uuid.UUID(bytes_le=uid))


def _footer_bytes(f: _Footer, orig_size: int) -> bytes:
    c, h, s = f.geometry
    raw = bytearray(_FOOTER.pack(
        COOKIE, f.features, 0x00010000, f.data_offset, f.timestamp, f.creator, 0x00010000,
        b"Wi2k", orig_size, f.current_size, c, h, s, f.disk_type, 0, f.uuid.bytes_le, 0, b"",
    ))
    _U32.pack_into(raw, _FOOTER_CSUM, checksum(raw, _FOOTER_CSUM))
    return bytes(raw)


def probe(head: bytes, path: str) -> bool:
    """Dynamic/differencing disks start with the footer copy; a fixed disk
    has its footer only at the end, so that is read (content, not name)."""
    if head[:8] == COOKIE:
        return True
    try:
        with builtins.open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 1024:
                return False
            f.seek(size - 512)
            tail = f.read(512)
    except OSError:
        return False
    if tail[:8] != COOKIE:
        return False
    try:
        foot = _parse_footer(path, tail, "at the end")
    except BackendError:
        return False
    return foot.disk_type == TYPE_FIXED and foot.current_size <= size - 512


class _Dyn(NamedTuple):
    table_offset: int
    max_entries: int
    block_size: int
    parent_uuid: uuid.UUID
    parent_ts: int
    parent_name: str
    locators: list[tuple[bytes, bytes]]  # (platform code, data)


def _parse_dyn(path: str, fd: int, at: int, file_size: int) -> _Dyn:
    raw = pread_exact(fd, 1024, at, path, "VHD dynamic header")
    (cookie, _doff, table, version, entries, bsize, csum, puid, pts, _r, pname, locs, _r2) = _DYN.unpack(raw)
    if cookie != DYN_COOKIE:
        raise BackendError(f"{path}: damaged VHD: no \"cxsparse\" cookie at {at} (found {cookie!r})")
    want = checksum(raw, _DYN_CSUM)
    if csum != want:
        raise BackendError(f"{path}: damaged VHD dynamic header: checksum {csum:#010x}, computed {want:#010x}")
    if version >> 16 != 1:
        raise BackendError(f"{path}: unsupported VHD dynamic header version {version >> 16}.{version & 0xFFFF}")
    if bsize < SECTOR or bsize & (bsize - 1) or bsize > 1 << 28:
        raise BackendError(f"{path}: damaged VHD dynamic header: block size {bsize} is not a power of two")
    if table % SECTOR or table + 4 * entries > file_size:
        raise BackendError(f"{path}: damaged VHD: BAT at {table} ({entries} entries) is outside the file")
    name = pname.decode("utf-16-be", errors="replace").split("\0", 1)[0]
    locators: list[tuple[bytes, bytes]] = []
    for i in range(8):
        code, _space, length, _res, off = _LOC.unpack_from(locs, 24 * i)
        if code == b"\0\0\0\0" or length == 0:
            continue
        if length > 65536 or off + length > file_size:
            raise BackendError(f"{path}: damaged VHD parent locator {code!r}: {length} bytes at {off}")
        locators.append((code, pread_exact(fd, length, off, path, "VHD parent locator")))
    return _Dyn(table, entries, bsize, uuid.UUID(bytes_le=puid), pts, name, locators)


def _locator_paths(child: str, dyn: _Dyn) -> list[str]:
    """Candidate parent paths in the order the module docstring gives."""
    out: list[str] = []
    order = {b"W2ru": 0, b"W2ku": 1, b"MacX": 2}
    for code, data in sorted(dyn.locators, key=lambda cd: order.get(cd[0], 9)):
        if code in (b"W2ru", b"W2ku"):
            text = data.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            if len(text) >= 2 and text[1] == ":":
                # A Windows drive path cannot name a file here: try its name
                # next to the child.
                out.append(resolve_backing(child, text.replace("\\", "/").rsplit("/", 1)[-1]))
                continue
            out.append(resolve_backing(child, text.replace("\\", "/")))
        elif code == b"MacX":
            text = data.decode("utf-8", errors="replace").split("\0", 1)[0]
            if text.startswith("file://"):
                text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
            out.append(resolve_backing(child, text))
    if dyn.parent_name:
        out.append(resolve_backing(child, dyn.parent_name.replace("\\", "/").rsplit("/", 1)[-1]))
    return [os.path.normpath(p) for p in out]


def _vhd_time(unix: float) -> int:
    return max(0, int(unix) - VHD_EPOCH) & 0xFFFFFFFF


class VhdImage(MappedImage):
    """An open VHD image (see the module docstring)."""

    def __init__(
        self,
        path: str,
        fd: int,
        footer: _Footer,
        footer_raw: bytes,
        footer_at: int,
        dyn: _Dyn | None,
        bat: array.array[int] | None,
        *,
        read_only: bool,
        write_through: bool,
        parent: ImageBackend | None,
        parent_path: str | None,
        parent_ts_ok: bool,
    ) -> None:
        size = footer.current_size // SECTOR * SECTOR
        super().__init__(path, size, read_only=read_only, write_through=write_through, parent=parent)
        self._fd = fd
        self._footer = footer
        self._footer_raw = footer_raw
        self._footer_at = footer_at
        self._dyn = dyn
        self._bat = bat if bat is not None else array.array("I")
        self._bs = dyn.block_size if dyn else 0
        self._bitmap_size = align_up(self._bs // SECTOR // 8, SECTOR) if dyn else 0
        self._nbits = self._bitmap_size * 8
        self._bitmaps: dict[int, int] = {}
        self._parent_path = parent_path
        self._parent_ts_ok = parent_ts_ok
        self._file_size = os.fstat(fd).st_size

    @property
    def thin(self) -> bool:
        return self._footer.disk_type == TYPE_DYNAMIC

    def info(self) -> ImageInfo:
        f = self._footer
        c, h, s = f.geometry
        extra = {
            "creator": f.creator.decode("latin-1"),
            "geometry": f"{c}/{h}/{s}",
            "timestamp": str(f.timestamp + VHD_EPOCH),
        }
        if self._dyn is not None:
            extra["block_size"] = str(self._bs)
        diff = f.disk_type == TYPE_DIFF and self._dyn is not None
        if diff:
            extra["parent_name"] = self._dyn.parent_name if self._dyn else ""
            extra["parent_timestamp_matches"] = "yes" if self._parent_ts_ok else "no"
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=os.fstat(self._fd).st_blocks * 512,
            uuid=str(f.uuid),
            parent_uuid=str(self._dyn.parent_uuid) if diff and self._dyn else None,
            backing=self._parent_path,
            backing_format=NAME if diff else None,
            subformat=_TYPE_NAMES[f.disk_type],
            extra=extra,
        )

    # -- mapping ------------------------------------------------------------
    def _bitmap(self, blk: int, entry: int) -> int:
        bits = self._bitmaps.get(blk)
        if bits is None:
            raw = pread_exact(self._fd, self._bitmap_size, entry * SECTOR, self.path, "VHD sector bitmap")
            bits = int.from_bytes(raw, "big")
            self._bitmaps[blk] = bits
        return bits

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        if self._dyn is None:
            yield Run(length, RUN_DATA, self._fd, offset)
            return
        bs = self._bs
        diff = self._footer.disk_type == TYPE_DIFF
        free_kind = RUN_PARENT if diff and self.parent is not None else RUN_ZERO
        nb = self._nbits
        end = offset + length
        pos = offset
        while pos < end:
            blk, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            e = self._bat[blk]
            if e == BAT_FREE:
                yield Run(n, free_kind)
            elif not diff:
                yield Run(n, RUN_DATA, self._fd, e * SECTOR + self._bitmap_size + within)
            else:
                # Differencing: each sector's bitmap bit picks child or
                # parent; find the run of equal bits with integer arithmetic
                # (no per-sector loop).
                bits = self._bitmap(blk, e)
                s = within // SECTOR
                left = nb - s
                v = bits & ((1 << left) - 1)
                if (v >> (left - 1)) & 1:
                    inv = ~v & ((1 << left) - 1)
                    run = left if inv == 0 else left - inv.bit_length()
                    kind = RUN_DATA
                else:
                    run = left if v == 0 else left - v.bit_length()
                    kind = free_kind
                n = min(n, run * SECTOR - within % SECTOR)
                if kind == RUN_DATA:
                    yield Run(n, RUN_DATA, self._fd, e * SECTOR + self._bitmap_size + within)
                else:
                    yield Run(n, kind)
            pos += n

    # -- writes -------------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        if self._dyn is None:
            pwrite_all(self._fd, mv, offset, self.path)
            self._after_write(self._fd)
            return
        if self._footer.disk_type == TYPE_DIFF and (offset % SECTOR or len(mv) % SECTOR):
            # The bitmap has sector granularity: widen to whole sectors.
            start = offset // SECTOR * SECTOR
            stop = min(align_up(offset + len(mv), SECTOR), self._size)
            buf = bytearray(self.read(start, stop - start))
            buf[offset - start : offset - start + len(mv)] = mv
            offset, mv = start, memoryview(buf)
        for blk, within, n, at in cluster_pieces(offset, len(mv), self._bs):
            piece = mv[at : at + n]
            e = self._bat[blk]
            if e == BAT_FREE:
                self._allocate(blk, within, piece)
            else:
                pwrite_all(self._fd, piece, e * SECTOR + self._bitmap_size + within, self.path)
                if self._footer.disk_type == TYPE_DIFF:
                    self._set_bits(blk, e, within, n)
        self._after_write(self._fd)

    def _bits_for(self, within: int, n: int) -> int:
        s0 = within // SECTOR
        s1 = -(-(within + n) // SECTOR)
        return ((1 << (s1 - s0)) - 1) << (self._nbits - s1)

    def _set_bits(self, blk: int, entry: int, within: int, n: int) -> None:
        mask = self._bits_for(within, n)
        bits = self._bitmap(blk, entry)
        if bits & mask == mask:
            return
        bits |= mask
        if self._write_through:
            os.fdatasync(self._fd)  # the data before the bits that expose it
        pwrite_all(self._fd, bits.to_bytes(self._bitmap_size, "big"), entry * SECTOR, self.path)
        self._bitmaps[blk] = bits

    def _allocate(self, blk: int, within: int, piece: memoryview) -> None:
        assert self._dyn is not None
        new_off = self._footer_at
        total = self._bitmap_size + self._bs
        if (new_off + total) // SECTOR >= BAT_FREE:
            raise MediumError(f"{self.path}: VHD is full: block offset beyond the 32-bit BAT range")
        if self._footer.disk_type == TYPE_DIFF:
            bits = self._bits_for(within, len(piece))
        else:
            bits = (1 << self._nbits) - 1
        bitmap = bits.to_bytes(self._bitmap_size, "big")
        # 1. The footer at the new end of file: the file stays valid.
        pwrite_all(self._fd, self._footer_raw, new_off + total, self.path)
        # 2. Bitmap and data where the footer was. Past the old end of file
        #    the extension reads as zeroes already.
        if new_off + SECTOR >= self._file_size:
            pwrite_all(self._fd, bitmap, new_off, self.path)
            pwrite_all(self._fd, piece, new_off + self._bitmap_size + within, self.path)
        else:
            buf = bytearray(total)
            buf[: self._bitmap_size] = bitmap
            at = self._bitmap_size + within
            buf[at : at + len(piece)] = piece
            pwrite_all(self._fd, buf, new_off, self.path)
        self._file_size = max(self._file_size, new_off + total + SECTOR)
        self._footer_at = new_off + total
        if self._write_through:
            os.fdatasync(self._fd)
        # 3. The BAT entry last.
        self._set_bat(blk, new_off // SECTOR)
        self._bitmaps[blk] = bits

    def _set_bat(self, blk: int, value: int) -> None:
        assert self._dyn is not None
        self._bat[blk] = value
        pwrite_all(self._fd, _U32.pack(value), self._dyn.table_offset + 4 * blk, self.path)

    # -- discard / zeroes (MappedImage._zero_range; dynamic disks only) -------
    def _drop_block(self, blk: int) -> None:
        if self._bat[blk] != BAT_FREE:
            self._unmap_block(blk)

    def _block_reads_zero(self, blk: int) -> bool:
        return self._bat[blk] == BAT_FREE

    def _unmap_block(self, blk: int) -> None:
        e = self._bat[blk]
        self._set_bat(blk, BAT_FREE)
        self._bitmaps.pop(blk, None)
        total = self._bitmap_size + self._bs
        last = max(filter(BAT_FREE.__gt__, self._bat), default=-1)
        last = max(last, e)  # the freed block itself was the last one
        if last * SECTOR + total != self._footer_at:
            return  # not our dense layout: leave the hole (space leaks)
        if last != e:
            mover = self._bat.index(last)
            block = pread_exact(self._fd, total, last * SECTOR, self.path, "VHD block")
            pwrite_all(self._fd, block, e * SECTOR, self.path)
            if self._write_through:
                os.fdatasync(self._fd)
            self._set_bat(mover, e)
            self._bitmaps.pop(mover, None)
        new_end = last * SECTOR
        pwrite_all(self._fd, self._footer_raw, new_end, self.path)
        if self._write_through:
            os.fdatasync(self._fd)
        os.ftruncate(self._fd, new_end + SECTOR)
        self._footer_at = new_end
        self._file_size = new_end + SECTOR


def open(path: str, *, read_only: bool, write_through: bool = False) -> VhdImage:
    """Open a VHD image (and the parent chain of a differencing disk)."""
    fd = open_file(path, read_only=read_only)
    parent: ImageBackend | None = None
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 512:
            raise BackendError(f"{path}: not a VHD image: file is only {file_size} bytes")
        footer_at = file_size - 512
        raw = pread_exact(fd, 512, footer_at, path, "VHD footer")
        try:
            footer = _parse_footer(path, raw, "at the end of the file")
        except BackendError:
            # The copy at offset 0 of a dynamic disk recovers a lost footer
            # (e.g. the file was truncated); new blocks go after the data.
            head = pread_exact(fd, 512, 0, path, "VHD footer copy")
            if head[:8] != COOKIE:
                raise
            footer = _parse_footer(path, head, "at offset 0")
            if footer.disk_type == TYPE_FIXED:
                raise
            raw = head
            footer_at = align_up(file_size, SECTOR)
        if footer.current_size < SECTOR:
            raise BackendError(f"{path}: damaged VHD footer: current size {footer.current_size}")
        dyn: _Dyn | None = None
        bat: array.array[int] | None = None
        parent_path: str | None = None
        ts_ok = True
        if footer.disk_type == TYPE_FIXED:
            if footer.current_size > footer_at:
                raise BackendError(
                    f"{path}: truncated fixed VHD: size {footer.current_size} but only {footer_at} data bytes"
                )
        else:
            if footer.data_offset % SECTOR or footer.data_offset + 1024 > file_size:
                raise BackendError(f"{path}: damaged VHD footer: dynamic header offset {footer.data_offset}")
            dyn = _parse_dyn(path, fd, footer.data_offset, file_size)
            blocks = -(-footer.current_size // dyn.block_size)
            if dyn.max_entries < blocks:
                raise BackendError(
                    f"{path}: damaged VHD: BAT has {dyn.max_entries} entries, size needs {blocks}"
                )
            bat = array.array("I")
            bat.frombytes(pread_exact(fd, 4 * dyn.max_entries, dyn.table_offset, path, "VHD BAT"))
            if sys.byteorder == "little":
                bat.byteswap()
            top = max(filter(BAT_FREE.__gt__, bat), default=-1)
            bitmap_size = align_up(dyn.block_size // SECTOR // 8, SECTOR)
            if top >= 0 and top * SECTOR + bitmap_size + dyn.block_size > footer_at:
                raise BackendError(
                    f"{path}: truncated VHD: block at sector {top} runs past the footer at {footer_at}"
                )
            if footer.disk_type == TYPE_DIFF:
                candidates = _locator_paths(path, dyn)
                found = next((c for c in candidates if os.path.exists(c)), None)
                if found is None:
                    raise BackendError(
                        f"{path}: parent {dyn.parent_name!r} {{{dyn.parent_uuid}}} not found "
                        f"(tried {', '.join(candidates) or 'no locators'})"
                    )
                parent_path = found
                parent = open_backing(path, found, None)
                pinfo = parent.info()
                if pinfo.uuid != str(dyn.parent_uuid):
                    raise BackendError(
                        f"{path}: parent {found} has id {{{pinfo.uuid}}}, expected {{{dyn.parent_uuid}}}"
                    )
                if parent.size != footer.current_size:
                    raise BackendError(
                        f"{path}: parent {found} has size {parent.size}, differencing disk {footer.current_size}"
                    )
                ts_ok = _vhd_time(os.stat(found).st_mtime) == dyn.parent_ts
        return VhdImage(
            path, fd, footer, bytes(raw), footer_at, dyn, bat, read_only=read_only,
            write_through=write_through, parent=parent, parent_path=parent_path, parent_ts_ok=ts_ok,
        )
    except BaseException:
        os.close(fd)
        if parent is not None:
            parent.close()
        raise


def _locator_entry(code: bytes, data: bytes, at: int) -> tuple[bytes, bytes]:
    space = align_up(len(data), SECTOR)
    # Data space in sectors, as the spec says (readers use length + offset).
    return _LOC.pack(code, space // SECTOR, len(data), 0, at), data + bytes(space - len(data))


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VHD: options {"type": "dynamic" (default) | "fixed",
    "force_size": "on" | "off" (default off: round up to CHS geometry)};
    with ``backing`` a differencing disk of that VHD."""
    path, size = req.path, req.size
    opts = req.checked_options({"type", "force_size", "subformat"})
    backing = req.backing
    kind = opts.get("type", opts.get("subformat", "dynamic"))
    if kind not in ("dynamic", "fixed"):
        raise BackendError(f"{path}: VHD type must be dynamic or fixed, not {kind!r}")
    force = opts.get("force_size", "off")
    if force not in ("on", "off"):
        raise BackendError(f"{path}: force_size must be on or off, not {force!r}")
    dtype = TYPE_FIXED if kind == "fixed" else TYPE_DYNAMIC
    parent_uuid = uuid.UUID(int=0)
    parent_ts = 0
    parent_name = ""
    locators: list[tuple[bytes, bytes]] = []
    if backing is not None:
        if kind == "fixed":
            raise BackendError(f"{path}: a differencing VHD cannot be fixed")
        pinfo, psize = parent_for_create(path, backing, req.backing_format, NAME, "a differencing VHD")
        if size == 0 or size == chs_size(psize) and force == "off":
            size = psize
        if size != psize:
            raise BackendError(f"{path}: a differencing VHD has its parent's size {psize}, not {size}")
        assert pinfo.uuid is not None
        parent_uuid = uuid.UUID(pinfo.uuid)
        full = os.path.abspath(resolve_backing(path, backing))
        parent_ts = _vhd_time(os.stat(full).st_mtime)
        parent_name = os.path.basename(full)
        rel = os.path.relpath(full, os.path.dirname(os.path.abspath(path)))
        rel_win = rel.replace("/", "\\")
        if not rel_win.startswith("."):
            rel_win = ".\\" + rel_win
        locators = [(b"W2ru", rel_win.encode("utf-16-le")), (b"W2ku", full.encode("utf-16-le"))]
        dtype = TYPE_DIFF
        force = "on"  # the parent's size is already what readers see
    req.check_size(size, "VHD")
    if force == "off":
        size = chs_size(size)
    geometry = chs_geometry(size // SECTOR)
    now = _vhd_time(time.time())
    bs = DEFAULT_BLOCK
    footer = _Footer(2, NO_OFFSET if dtype == TYPE_FIXED else 512, now, CREATOR_APP, size, geometry,
                     dtype, uuid.uuid4())
    fd = create_file(path)
    try:
        if dtype == TYPE_FIXED:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                pass  # sparse is still correct
            pwrite_all(fd, _footer_bytes(footer, size), size, path)
        else:
            entries = -(-size // bs)
            at = 512 + 1024
            loc_raw = bytearray(192)
            loc_data = bytearray()
            for i, (code, data) in enumerate(locators):
                entry, padded = _locator_entry(code, data, at)
                loc_raw[24 * i : 24 * i + 24] = entry
                loc_data += padded
                at += len(padded)
            table = at
            bat_bytes = align_up(4 * entries, SECTOR)
            dyn = bytearray(_DYN.pack(
                DYN_COOKIE, NO_OFFSET, table, 0x00010000, entries, bs, 0, parent_uuid.bytes_le,
                parent_ts, 0, parent_name[:256].encode("utf-16-be"), bytes(loc_raw), b"",
            ))
            _U32.pack_into(dyn, _DYN_CSUM, checksum(dyn, _DYN_CSUM))
            fbytes = _footer_bytes(footer, size)
            pwrite_all(fd, fbytes + bytes(dyn) + bytes(loc_data), 0, path)
            pwrite_all(fd, b"\xff" * (4 * entries) + bytes(bat_bytes - 4 * entries), table, path)
            pwrite_all(fd, fbytes, table + bat_bytes, path)
        os.fsync(fd)
    finally:
        os.close(fd)
