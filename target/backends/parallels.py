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

import builtins
import os
import struct
from array import array
from collections.abc import Iterator

from .base import SECTOR, Backend, BackendError, Buffer, Extent, MediumError
from .raw import pread_into, punch_hole, pwrite_all
from .registry import ImageBackend, ImageInfo, check_range, merge_extents, parse_size

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


class ParallelsImage(ImageBackend):
    """An open Parallels expandable image."""

    _cs: int
    _size: int
    _mult: int
    _data_start: int
    _end_slot: int

    def __init__(self, path: str, *, read_only: bool = False, write_through: bool = False) -> None:
        self.path = path
        self._read_only = read_only
        self._fd = -1
        self._restore_in_use: int | None = None
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if write_through and not read_only:
            flags |= os.O_DSYNC
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BackendError(f"{path}: no such file") from None
        except OSError as e:
            raise BackendError(f"{path}: cannot open: {e.strerror or e}") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _bad(self, why: str) -> BackendError:
        return BackendError(f"{self.path}: parallels: {why}")

    def _pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        try:
            pread_into(self._fd, memoryview(buf), offset)
        except OSError as e:
            raise MediumError(f"{self.path}: read error at {offset}: {e.strerror or e}") from None
        return buf

    def _write(self, data: Buffer, offset: int) -> None:
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as e:
            raise MediumError(f"{self.path}: write error at {offset}: {e.strerror or e}") from None

    def _open(self) -> None:
        file_size = os.fstat(self._fd).st_size
        head = self._pread(0, min(file_size, 64 * 1024))
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
            data_start = -(-bat_end // SECTOR) * SECTOR
        else:
            data_start = data_off * SECTOR
        if data_start < bat_end:
            raise self._bad(f"data area at {data_start} overlaps the BAT")
        self._data_start = data_start
        bat: array[int] = array("I")
        bat.frombytes(self._pread(_HDR.size, nb_bat * 4))
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
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def thin(self) -> bool:
        return True

    @property
    def zero_after_discard(self) -> bool:
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

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        # Clusters of 63 sectors exist (parallels.txt), so no bit tricks.
        cs = self._cs
        pos, end = offset, offset + length
        while pos < end:
            idx, inner = divmod(pos, cs)
            n = min(cs - inner, end - pos)
            yield idx, inner, n, pos - offset
            pos += n

    def _host(self, idx: int) -> int:
        return self._bat[idx] * self._mult

    def read(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        out = bytearray(length)
        mv = memoryview(out)
        run_host = run_at = run_len = 0
        for idx, inner, n, at in self._pieces(offset, length):
            host = self._host(idx)
            if host == 0:
                continue
            h = host + inner
            if run_len and run_host + run_len == h and run_at + run_len == at:
                run_len += n
                continue
            self._fill(mv, run_host, run_at, run_len)
            run_host, run_at, run_len = h, at, n
        self._fill(mv, run_host, run_at, run_len)
        return out

    def _fill(self, mv: memoryview, host: int, at: int, n: int) -> None:
        if n:
            try:
                pread_into(self._fd, mv[at : at + n], host)
            except OSError as e:
                raise MediumError(f"{self.path}: read error at {host}: {e.strerror or e}") from None

    def _check_writable(self) -> None:
        if self._read_only:
            raise BackendError(f"{self.path}: opened read-only")

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
        self._check_writable()
        view = memoryview(data).cast("B")
        check_range(self, offset, len(view))
        cs = self._cs
        run_host = run_at = run_len = 0
        for idx, inner, n, at in self._pieces(offset, len(view)):
            host = self._host(idx)
            if host:
                h = host + inner
                if run_len and run_host + run_len == h and run_at + run_len == at:
                    run_len += n
                    continue
                if run_len:
                    self._write(view[run_at : run_at + run_len], run_host)
                run_host, run_at, run_len = h, at, n
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
        if run_len:
            self._write(view[run_at : run_at + run_len], run_host)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(self, offset, length)
        cs = self._cs
        freed: list[int] = []
        for idx, inner, n, at in self._pieces(offset, length):
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

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        return merge_extents(
            Extent(offset + at, n, self._bat[idx] != 0) for idx, _, n, at in self._pieces(offset, length)
        )

    def flush(self) -> None:
        if self._read_only:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise MediumError(f"{self.path}: flush failed: {e.strerror or e}") from None

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._restore_in_use is not None:
                self._write(_U32.pack(self._restore_in_use), _IN_USE_OFFSET)
                os.fdatasync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1


# -- registry format interface ---------------------------------------------


def probe(head: bytes, path: str) -> bool:
    """Parallels magic, or a Parallels DiskDescriptor.xml (refused by open
    with a clear message rather than served as raw)."""
    return head[:16] in (MAGIC_OLD, MAGIC_EXT) or _is_descriptor(head)


def open(path: str, *, read_only: bool = False, write_through: bool = False) -> ParallelsImage:
    """Open a Parallels expandable image."""
    return ParallelsImage(path, read_only=read_only, write_through=write_through)


def create(
    path: str,
    size: int,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Create an empty expandable image ("WithouFreSpacExt"). Option
    ``cluster_size`` (bytes, a multiple of 512; default 1 MiB)."""
    if backing is not None:
        raise BackendError(f"{path}: parallels images cannot have a backing file")
    opts = dict(options or {})
    try:
        cs = parse_size(opts.pop("cluster_size", str(DEFAULT_CLUSTER)), "cluster_size")
    except BackendError as e:
        raise BackendError(f"{path}: parallels: {e}") from None
    if opts:
        raise BackendError(f"{path}: unknown parallels option(s): {', '.join(sorted(opts))}")
    if cs < SECTOR or cs % SECTOR or cs > 1 << 30:
        raise BackendError(f"{path}: parallels cluster_size {cs} must be a multiple of 512 up to 1 GiB")
    if size <= 0 or size % SECTOR:
        raise BackendError(f"{path}: size {size} is not a positive multiple of {SECTOR}")
    nb_sectors = size // SECTOR
    nb_bat = -(-size // cs)
    data_start = -(-(_HDR.size + nb_bat * 4) // cs) * cs
    if nb_bat > 0xFFFFFFFF or data_start // SECTOR > 0xFFFFFFFF:
        raise BackendError(f"{path}: size {size} is too large for a Parallels image")
    header = _HDR.pack(
        MAGIC_EXT, 2, HEADS, nb_sectors // (HEADS * SECTORS_PER_TRACK), cs // SECTOR, nb_bat,
        nb_sectors, 0, data_start // SECTOR, 0, 0,
    )
    try:
        with builtins.open(path, "wb") as f:
            f.write(header)
            f.truncate(data_start)
            os.fsync(f.fileno())
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None
