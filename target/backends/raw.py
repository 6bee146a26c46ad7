"""Raw disks: a regular file (sparse) or a block device.

Reads of a regular file return memoryview slices of a shared ``mmap``:
DESIGN.md measured those, sent with ``writelines``, as the fastest way to
put file data on the wire. The map's known hazard is SIGBUS when the file
is truncated under us, so each read compares the range with the file's
current size (one ``fstat``) and falls back to ``os.pread`` past the end;
a file that grew is remapped. (A truncation racing with the transport still
holding a view cannot be caught in Python; do not shrink a served file.)

Writes use ``os.pwrite``; the page cache keeps them coherent with the map.
``write_through`` opens the file ``O_DSYNC``: each write returns once its
data is durable, in the same syscall. ``O_DIRECT`` was not chosen: it needs
buffers aligned to the device block, and the payloads we get are arbitrary
slices of network buffers, so it would cost a copy per write (and it would
bypass the page cache the mmap reads from).

Discard punches holes (``fallocate(PUNCH_HOLE|KEEP_SIZE)``), so the file is
thin and discarded ranges read back as zeroes; ``extents`` walks
``SEEK_DATA``/``SEEK_HOLE``. Block devices use ``BLKDISCARD`` /
``BLKZEROOUT`` and report no holes.

This module is also the ``raw`` image format of the registry; its probe
accepts anything, so detection tries it last.
"""

from __future__ import annotations

import builtins
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Iterator

from .base import SECTOR, Backend, BackendError, Buffer, Extent, MediumError
from .registry import (
    CreateRequest,
    ImageBackend,
    ImageInfo,
    align_up,
    check_range,
    create_file,
    image_creator,
    open_file,
    sync_files,
)

__all__ = ["NAME", "RawFileBackend", "create", "open", "probe", "punch_hole"]

NAME = "raw"

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 119), _IO(0x12, 127)
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_RANGE = struct.Struct("=QQ")
_U64 = struct.Struct("=Q")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _falloc(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode``; False when the file system cannot."""
    if _fallocate is None or length <= 0:
        return _fallocate is not None
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOT_SUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range of a regular file, keeping its size; the
    range then reads as zeroes. Returns False when not supported (the
    caller decides whether zeroes must be written instead)."""
    return _falloc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """``os.pwrite`` until everything is written (short writes happen on
    signals and near ENOSPC)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def pread_padded(fd: int, offset: int, length: int, path: str) -> bytearray:
    """``length`` bytes from ``offset``, zeroes past the end of the file;
    an OS error becomes a one-line MediumError naming ``path``."""
    buf = bytearray(length)
    try:
        pread_into(fd, memoryview(buf), offset)
    except OSError as e:
        raise MediumError(f"{path}: read error at {offset}: {e.strerror or e}") from None
    return buf


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; bytes past end of file stay as they
    are (callers pass zeroed buffers). Returns the bytes read."""
    total = 0
    while total < len(buf):
        n = os.preadv(fd, [buf[total:]], offset + total)
        if n <= 0:
            break
        total += n
    return total


class RawFileBackend(ImageBackend):
    """A raw disk: a regular file or a block device, byte for byte."""

    def __init__(self, path: str, *, read_only: bool = False, write_through: bool = False) -> None:
        self.path = path
        self._read_only = read_only
        self._write_through = write_through
        self._map: mmap.mmap | None = None
        self._mapped = 0
        self._fd = open_file(path, read_only=read_only, write_through=write_through)
        try:
            st = os.fstat(self._fd)
            self._block = stat.S_ISBLK(st.st_mode)
            if not self._block and not stat.S_ISREG(st.st_mode):
                raise BackendError(f"{path}: neither a regular file nor a block device")
            if self._block:
                self._size = self._device_size()
                self._can_discard = self._device_discards(st.st_rdev)
            else:
                # A file whose length is not a whole number of sectors is
                # served rounded up; the tail reads as zeroes.
                self._size = align_up(st.st_size, SECTOR)
                self._can_discard = _fallocate is not None
                self._remap(st.st_size)
        except BaseException:
            os.close(self._fd)
            raise

    # -- properties ---------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def thin(self) -> bool:
        return self._can_discard

    @property
    def zero_after_discard(self) -> bool:
        # Punched holes read as zeroes; a device's discard promises nothing.
        return not self._block

    def fileno(self) -> int:
        """The open file descriptor (for sendfile/splice paths)."""
        return self._fd

    # -- device helpers -----------------------------------------------------

    def _device_size(self) -> int:
        buf = bytearray(8)
        try:
            fcntl.ioctl(self._fd, BLKGETSIZE64, buf)
            return int(_U64.unpack(buf)[0])
        except OSError:
            return os.lseek(self._fd, 0, os.SEEK_END)

    @staticmethod
    def _device_discards(rdev: int) -> bool:
        sysfs = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/discard_max_bytes"
        try:
            with builtins.open(sysfs) as f:
                return int(f.read().strip() or 0) > 0
        except (OSError, ValueError):
            return False

    # -- mapping ------------------------------------------------------------

    def _remap(self, file_size: int) -> None:
        """Map the whole file (again); the old map dies with its last view."""
        old, self._map, self._mapped = self._map, None, 0
        if old is not None:
            try:
                old.close()
            except BufferError:
                pass  # a caller still holds a view; GC closes it later
        if file_size <= 0:
            return
        access = mmap.ACCESS_READ if self._read_only else mmap.ACCESS_WRITE
        try:
            self._map = mmap.mmap(self._fd, file_size, access=access)
        except (OSError, ValueError):
            return  # pread fallback
        self._mapped = file_size

    def _file_size(self) -> int:
        return os.fstat(self._fd).st_size

    # -- I/O ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        end = offset + length
        if not self._block:
            if self._map is None or end > self._mapped or self._file_size() < self._mapped:
                fsize = self._file_size()
                if fsize != self._mapped:
                    self._remap(fsize)
            if self._map is not None and end <= self._mapped:
                return memoryview(self._map)[offset:end]
        return pread_padded(self._fd, offset, length, self.path)

    def _check_writable(self) -> None:
        if self._read_only:
            raise BackendError(f"{self.path}: opened read-only")

    def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        check_range(self, offset, len(data))
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as e:
            raise MediumError(f"{self.path}: write error at {offset}: {e.strerror or e}") from None

    def flush(self) -> None:
        if not self._read_only:
            sync_files(self.path, (self._fd,))

    def _ioctl_range(self, req: int, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self._fd, req, _RANGE.pack(offset, length))
            return True
        except OSError as e:
            if e.errno in _NOT_SUPPORTED:
                return False
            raise MediumError(f"{self.path}: ioctl failed at {offset}: {e.strerror or e}") from None

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(self, offset, length)
        if length == 0:
            return
        if self._block:
            if self._can_discard:
                self._ioctl_range(BLKDISCARD, offset, length)
            return
        try:
            if punch_hole(self._fd, offset, length):
                return
        except OSError as e:
            raise MediumError(f"{self.path}: discard failed at {offset}: {e.strerror or e}") from None
        # We promised zero_after_discard: without hole punching, zero it.
        Backend.write_zeroes(self, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(self, offset, length)
        if length == 0:
            return
        if self._block:
            if self._ioctl_range(BLKZEROOUT, offset, length):
                return
        else:
            try:
                # ZERO_RANGE keeps the blocks allocated (WRITE SAME without
                # UNMAP, SBC-3 5.42); punching is the next best thing.
                fsize = self._file_size()
                inside = max(0, min(offset + length, fsize) - offset)
                if inside == 0 or _falloc(
                    self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, inside
                ) or punch_hole(self._fd, offset, inside):
                    return
            except OSError as e:
                raise MediumError(f"{self.path}: write zeroes failed at {offset}: {e.strerror or e}") from None
        Backend.write_zeroes(self, offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        end = offset + length
        if self._block or length == 0:
            if length:
                yield Extent(offset, length, True)
            return
        fsize = self._file_size()
        pos = offset
        while pos < end:
            if pos >= fsize:
                yield Extent(pos, end - pos, False)
                return
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to EOF
                    yield Extent(pos, end - pos, False)
                    return
                if e.errno in _NOT_SUPPORTED:
                    yield Extent(pos, end - pos, True)
                    return
                raise MediumError(f"{self.path}: SEEK_DATA failed: {e.strerror or e}") from None
            if data > pos:
                yield Extent(pos, min(data, end) - pos, False)
                pos = data
                if pos >= end:
                    return
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            yield Extent(pos, stop - pos, True)
            pos = stop

    def info(self) -> ImageInfo:
        st = os.fstat(self._fd)
        return ImageInfo(
            format=NAME,
            path=self.path,
            virtual_size=self._size,
            allocated_size=self._size if self._block else st.st_blocks * 512,
            subformat="block-device" if self._block else "file",
        )

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._remap(0)
            os.close(self._fd)
        finally:
            self._fd = -1
            self.release_image_lock()


# -- registry format interface ---------------------------------------------


def probe(head: bytes, path: str) -> bool:
    """Raw accepts anything: detection tries it last."""
    return True


def open(path: str, *, read_only: bool = False, write_through: bool = False) -> RawFileBackend:
    """Open a raw file or block device."""
    return RawFileBackend(path, read_only=read_only, write_through=write_through)


@image_creator
def create(req: CreateRequest) -> None:
    """Create a sparse raw file of ``size`` bytes. Option
    ``preallocation=falloc|full`` allocates the blocks up front."""
    path, size = req.path, req.size
    req.refuse_backing(NAME)
    prealloc = req.checked_options({"preallocation"}).get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full"):
        raise BackendError(f"{path}: preallocation={prealloc!r}: expected off, falloc or full")
    fd = create_file(path)
    try:
        os.ftruncate(fd, size)
        if prealloc == "falloc":
            os.posix_fallocate(fd, 0, size)
        elif prealloc == "full":
            chunk = bytes(1 << 20)
            for off in range(0, size, len(chunk)):
                pwrite_all(fd, memoryview(chunk)[: min(len(chunk), size - off)], off)
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None
    finally:
        os.close(fd)
