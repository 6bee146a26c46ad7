"""Parallels "expandable" disk images, version 2 (qemu docs/interop/parallels.txt).

A 64-byte little-endian header, then the BAT (one 32-bit entry per guest
cluster; 0 = unallocated, reads as zeroes), then the data area. In
"WithoutFreeSpace" images BAT entries count 512-byte sectors, in
"WithouFreSpacExt" images whole clusters (parallels.txt "BAT").

Writing: a new cluster is written whole at the end of the data area (or in
a slot freed by discard) first, and only then does its BAT entry point at
it, so a crash leaves at worst an unreferenced cluster. The header's in_use
field is set while the image is open read-write (parallels.txt: 0x746F6E59)
and restored on close; an image found "in use" was not closed cleanly and
only opens read-only.

The header's "empty image" flag (bit 0 of flags) is ignored, as qemu does:
the BAT is authoritative.

Out of scope (refused with a one-line message): descriptor-based images
(DiskDescriptor.xml with "plain"/"expanded" data files), writing to images
with a format extension cluster (dirty bitmaps we would not keep in step).
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator

from .base import SECTOR, Backend, BackendError, Buffer, MediumError
from .raw import punch_hole
from .registry import (
    CreateRequest,
    ImageInfo,
    align_up,
    cluster_pieces,
    create_file,
    image_creator,
    open_file,
    parse_size,
)
from .mapped import (
    RUN_DATA,
    RUN_ZERO,
    MappedImage,
    Run,
    RunWriter,
    pread_exact,
    pwrite_all,
)

__all__ = ["NAME", "ParallelsImage", "create", "open", "probe"]

NAME = "parallels"
MAGIC_OLD = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
_HDR = struct.Struct("<16sIIIIIQIIIQ")
_U32 = struct.Struct("<I")
_IN_USE_OFFSET = 44
IN_USE = 0x746F6E59
CLOSED = 0x312E3276
DEFAULT_CLUSTER = 1 << 20
HEADS, SECTORS_PER_TRACK = 16, 32  # geometry written by create (as qemu does)

_BIG_ENDIAN_HOST = struct.pack("=I", 1) != struct.pack("<I", 1)


def _is_descriptor(head: bytes) -> bool:
    return head.lstrip()[:5] == b"<?xml" and b"<Parallels_disk_image" in head


class ParallelsImage(MappedImage):
    """An open Parallels expandable image."""

    _cs: int
    _mult: int
    _data_start: int
    _end_slot: int
    # A cluster the BAT points at past the end of the file reads as zeroes.
    _short_reads_zero = True

    def __init__(self, path: str, *, read_only: bool = False, write_through: bool = False) -> None:
        super().__init__(path, 0, read_only=read_only, write_through=write_through, parent=None)
        self._restore_in_use: int | None = None
        self._fd = open_file(path, read_only=read_only, write_through=write_through)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _bad(self, why: str) -> BackendError:
        return BackendError(f"{self.path}: parallels: {why}")

    def _write(self, data: Buffer, offset: int) -> None:
        pwrite_all(self._fd, data, offset, self.path)

    def _open(self) -> None:
        file_size = os.fstat(self._fd).st_size
        head = pread_exact(self._fd, min(file_size, 64 * 1024), 0, self.path, "header")
        if _is_descriptor(bytes(head)):
            raise self._bad(
                "this is a DiskDescriptor.xml; descriptor-based (plain/expanded) images are not "
                "supported - open the .hds data file instead"
            )
        if len(head) < _HDR.size:
            raise self._bad("file too short for a header")
        (magic, version, _heads, _cyls, tracks, nb_bat, nb_sectors, in_use, data_off, _flags,
         ext_off) = _HDR.unpack_from(head)
        if magic not in (MAGIC_OLD, MAGIC_EXT):
            raise self._bad("not a Parallels image (bad magic)")
        if version != 2:
            raise self._bad(f"unsupported version {version} (only 2)")
        if tracks == 0 or tracks > (1 << 31) // SECTOR:
            raise self._bad(f"bad cluster size of {tracks} sectors")
        if magic == MAGIC_OLD:
            nb_sectors &= 0xFFFFFFFF  # parallels.txt: only the low 32 bits count
        cs = tracks * SECTOR
        self._ext = magic == MAGIC_EXT
        self._cs = cs
        self._mult = tracks * SECTOR if self._ext else SECTOR  # bytes per BAT unit
        self._size = nb_sectors * SECTOR
        self._nb_bat = nb_bat
        if nb_bat * cs < self._size:
            raise self._bad(f"{nb_bat} BAT entries of {cs} bytes cannot map {self._size} bytes")
        bat_end = _HDR.size + nb_bat * 4
        if bat_end > file_size:
            raise self._bad("BAT lies beyond the end of the file")
        if data_off == 0:
            if self._ext:
                raise self._bad("data_off is 0 in a WithouFreSpacExt image")
            data_start = align_up(bat_end, SECTOR)
        else:
            data_start = data_off * SECTOR
        if data_start < bat_end:
            raise self._bad(f"data area at {data_start} overlaps the BAT")
        self._data_start = data_start
        bat: array[int] = array("I")
        bat.frombytes(pread_exact(self._fd, nb_bat * 4, _HDR.size, self.path, "BAT"))
        if _BIG_ENDIAN_HOST:
            bat.byteswap()
        self._bat = bat
        # Validate every entry once (parallels.txt lists the rules) and
        # find the end of the data area and the free slots in it.
        unit = self._mult
        slots: set[int] = set()
        high = data_start
        for i, e in enumerate(bat):
            if e == 0:
                continue
            host = e * unit
            if host < data_start or (host - data_start) % cs:
                raise self._bad(f"BAT entry {i} points at {host:#x}, outside the data area")
            slot = (host - data_start) // cs
            if slot in slots:
                raise self._bad(f"BAT entry {i} shares cluster {host:#x} with another entry")
            slots.add(slot)
            high = max(high, host + cs)
        if ext_off:
            ext = ext_off * SECTOR
            if ext >= data_start and (ext - data_start) % cs == 0:
                slots.add((ext - data_start) // cs)
                high = max(high, ext + cs)
        self._ext_off = ext_off
        self._end_slot = (high - data_start) // cs
        self._free = sorted(set(range(self._end_slot)) - slots, reverse=True)
        self._in_use = in_use
        if not self._read_only:
            if in_use == IN_USE:
                raise self._bad("not closed cleanly (in use); repair with qemu-img check -r all or open read-only")
            if ext_off:
                raise self._bad("has a format extension (dirty bitmap) that writing would make stale; open read-only")
            if in_use not in (0, CLOSED):
                raise self._bad(f"bad in_use value {in_use:#x}")
            self._write(_U32.pack(IN_USE), _IN_USE_OFFSET)
            self._restore_in_use = in_use

    # -- properties -------------------------------------------------------------

    @property
    def thin(self) -> bool:
        return True

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return self._cs

    def info(self) -> ImageInfo:
        st = os.fstat(self._fd)
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=st.st_blocks * 512,
            subformat="expandable",
            extra={
                "cluster_size": str(self._cs),
                "magic": (MAGIC_EXT if self._ext else MAGIC_OLD).decode(),
            },
        )

    # -- mapping ----------------------------------------------------------------

    def _host(self, idx: int) -> int:
        return self._bat[idx] * self._mult

    def _runs(self, offset: int, length: int) -> Iterator[Run]:
        # The cluster walk of cluster_pieces, inlined: this is the read path.
        cs, bat, mult, fd = self._cs, self._bat, self._mult, self._fd
        pos, end = offset, offset + length
        while pos < end:
            idx, inner = divmod(pos, cs)
            n = min(cs - inner, end - pos)
            host = bat[idx] * mult
            yield Run(n, RUN_DATA, fd, host + inner) if host else Run(n, RUN_ZERO)
            pos += n

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._end_slot
        self._end_slot += 1
        return slot

    def _set_bat(self, idx: int, host: int) -> None:
        value = host // self._mult
        if value > 0xFFFFFFFF:
            raise MediumError(f"{self.path}: parallels: cluster offset {host:#x} does not fit the BAT")
        self._bat[idx] = value
        self._write(_U32.pack(value), _HDR.size + idx * 4)

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        cs = self._cs
        runs = RunWriter(lambda host, at, n: self._write(view[at : at + n], host))
        for idx, inner, n, at in cluster_pieces(offset, len(view), cs):
            host = self._host(idx)
            if host:
                runs.add(host + inner, at, n)
                continue
            buf: Buffer
            if n == cs:
                buf = view[at : at + n]
            else:
                full = bytearray(cs)
                full[inner : inner + n] = view[at : at + n]
                buf = full
            new = self._data_start + self._alloc_slot() * cs
            self._write(buf, new)  # data first, then the BAT entry
            self._set_bat(idx, new)
        runs.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        cs = self._cs
        freed: list[int] = []
        for idx, inner, n, at in cluster_pieces(offset, length, cs):
            host = self._host(idx)
            if host == 0:
                continue
            whole = n == cs or (inner == 0 and offset + at + n >= self._size)
            if not whole:
                Backend.write_zeroes(self, offset + at, n)
                continue
            self._set_bat(idx, 0)  # unmap first, then reclaim
            slot = (host - self._data_start) // cs
            freed.append(slot)
            try:
                punch_hole(self._fd, host, cs)
            except OSError:
                pass  # best effort: the slot is free either way
        if freed:
            self._free = sorted(set(self._free) | set(freed), reverse=True)
            self._trim_tail()

    def _trim_tail(self) -> None:
        """Give back free slots at the end of the file, so the data area
        ends at the last used cluster (what qemu-img check expects)."""
        end = self._end_slot
        free = self._free
        while free and free[0] == end - 1:
            free.pop(0)
            end -= 1
        if end != self._end_slot:
            self._end_slot = end
            try:
                os.ftruncate(self._fd, self._data_start + end * self._cs)
            except OSError as e:
                raise MediumError(f"{self.path}: truncate failed: {e.strerror or e}") from None

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)

    def close(self) -> None:
        try:
            if self._restore_in_use is not None and not self._closed and self._fd >= 0:
                self._write(_U32.pack(self._restore_in_use), _IN_USE_OFFSET)
                os.fdatasync(self._fd)
        finally:
            super().close()


# -- registry format interface ---------------------------------------------


def probe(head: bytes, path: str) -> bool:
    """Parallels magic, or a Parallels DiskDescriptor.xml (refused by open
    with a clear message rather than served as raw)."""
    return head[:16] in (MAGIC_OLD, MAGIC_EXT) or _is_descriptor(head)


def open(path: str, *, read_only: bool = False, write_through: bool = False) -> ParallelsImage:
    """Open a Parallels expandable image."""
    return ParallelsImage(path, read_only=read_only, write_through=write_through)


@image_creator
def create(req: CreateRequest) -> None:
    """Create an empty expandable image ("WithouFreSpacExt"). Option
    ``cluster_size`` (bytes, a multiple of 512; default 1 MiB)."""
    path, size = req.path, req.size
    req.refuse_backing(NAME)
    opts = req.checked_options({"cluster_size"})
    try:
        cs = parse_size(opts.get("cluster_size", str(DEFAULT_CLUSTER)), "cluster_size")
    except BackendError as e:
        raise BackendError(f"{path}: parallels: {e}") from None
    if cs < SECTOR or cs % SECTOR or cs > 1 << 30:
        raise BackendError(f"{path}: parallels cluster_size {cs} must be a multiple of 512 up to 1 GiB")
    req.check_size(size)
    nb_sectors = size // SECTOR
    nb_bat = -(-size // cs)
    data_start = align_up(_HDR.size + nb_bat * 4, cs)
    if nb_bat > 0xFFFFFFFF or data_start // SECTOR > 0xFFFFFFFF:
        raise BackendError(f"{path}: size {size} is too large for a Parallels image")
    header = _HDR.pack(
        MAGIC_EXT, 2, HEADS, nb_sectors // (HEADS * SECTORS_PER_TRACK), cs // SECTOR, nb_bat,
        nb_sectors, 0, data_start // SECTOR, 0, 0,
    )
    fd = create_file(path)
    try:
        pwrite_all(fd, header, 0, path)
        os.ftruncate(fd, data_start)
        os.fsync(fd)
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None
    finally:
        os.close(fd)
