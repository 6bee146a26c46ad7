"""The contract between the SCSI device emulation and the disk backends.

A backend is a flat array of bytes of a fixed virtual size. Offsets and
lengths are in bytes and are always multiples of ``SECTOR`` (512) when the
SCSI layer calls; formats with larger clusters do their own read-modify-write.

The methods are synchronous: DESIGN.md measured inline ``pread`` at ~1 µs per
4 KiB, far cheaper than a thread hop, so the target calls ``read``/``write``
on the event loop and pushes only ``flush`` (fsync) to a thread. A backend
whose I/O completes later (Ceph RBD over the network) also implements
:class:`target.backends.aio.AsyncBackend`, and its LUN awaits instead.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self, Protocol

SECTOR = 512

Buffer = bytes | bytearray | memoryview


class BackendError(Exception):
    """An image or device cannot be opened, created or used.

    The message is one line a user can act on: which file, what was found,
    and why it is refused.
    """


class OutOfResources(BackendError):
    """A limit the administrator set was reached (e.g. the overlays of a
    multiattach LUN); the SCSI answer is INSUFFICIENT RESOURCES, not a
    medium error, and other initiators are unaffected."""


class BackendUnavailable(BackendError):
    """The medium is out of reach (a network backend lost its server): the
    SCSI answer is NOT READY, LOGICAL UNIT COMMUNICATION FAILURE (SPC-4
    ASC 08h/00h) rather than a medium error, since nothing on the medium is
    known to be bad and a later command may succeed."""


class MediumError(BackendError):
    """An I/O error while reading or writing the medium (maps to SCSI
    MEDIUM ERROR / unrecovered read error or write fault)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes that is either mapped (holds data) or deallocated."""

    offset: int
    length: int
    mapped: bool


class Releasable(Protocol):
    """Something held until released (an image lock)."""

    def release(self) -> None:
        """Give it back."""


class Backend(abc.ABC):
    """A virtual disk. Subclasses implement the abstract methods; the
    defaults describe a plain, fully allocated, writable medium."""

    #: The file this backend serves, for messages (may be "" for memory).
    path: str = ""
    #: The image lock held while it is open (target/backends/locking.py);
    #: set by the registry, released by :meth:`release_image_lock`.
    image_lock: Releasable | None = None

    def release_image_lock(self) -> None:
        """Give back the image lock (part of closing; idempotent)."""
        lock, self.image_lock = self.image_lock, None
        if lock is not None:
            lock.release()

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Virtual size in bytes (a multiple of SECTOR)."""

    @property
    def read_only(self) -> bool:
        """True when writes must be refused (SBC-3: DATA PROTECT)."""
        return False

    @property
    def thin(self) -> bool:
        """True when ``discard`` really deallocates (SBC-3 LBPME=1)."""
        return False

    @property
    def zero_after_discard(self) -> bool:
        """True when a discarded range reads back as zeroes (SBC-3 LBPRZ)."""
        return self.thin

    @property
    def slow_io(self) -> bool:
        """True when ``read``/``write``/... wait on something slow (a network
        server): the logical unit then runs its backend commands in a worker
        thread of its own, never on the event loop."""
        return False

    @property
    def native_fua(self) -> bool:
        """True when :meth:`write_fua` makes one write durable by itself
        (NBD's FUA flag), cheaper than a whole :meth:`flush`."""
        return False

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> Buffer:
        """Return ``length`` bytes at ``offset``.

        May return a view (e.g. of an mmap) instead of a copy: the caller
        must not keep it past the next ``write`` of the same range.
        """

    @abc.abstractmethod
    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``. Dynamic formats allocate here, with
        metadata ordered so a crash never exposes unwritten data."""

    def write_fua(self, offset: int, data: Buffer) -> None:
        """Write ``data`` and make it durable before returning (SBC-3 FUA).
        Default: write, then flush everything."""
        self.write(offset, data)
        self.flush()

    def flush(self) -> None:
        """Make every completed write durable (data and metadata): the
        backing for SYNCHRONIZE CACHE and FUA. Blocking; the target calls it
        from a thread."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the range if the format can (UNMAP). A backend that
        cannot deallocate writes zeroes when ``zero_after_discard`` is
        promised, else does nothing."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (WRITE SAME with a zero block)."""
        chunk = bytes(min(length, 1 << 20))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            self.write(pos, memoryview(chunk)[:n])
            pos += n

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Yield mapped/deallocated runs covering [offset, offset+length)
        in order (GET LBA STATUS, NBD block status). Default: all mapped."""
        yield Extent(offset, length, True)

    def close(self) -> None:
        """Release files and maps. Idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DelegatingBackend(Backend):
    """A backend that forwards everything to ``inner`` (base for wrappers)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.path = inner.path

    def __enter__(self) -> Self:
        return self

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def thin(self) -> bool:
        return self.inner.thin

    @property
    def zero_after_discard(self) -> bool:
        return self.inner.zero_after_discard

    @property
    def slow_io(self) -> bool:
        return self.inner.slow_io

    @property
    def native_fua(self) -> bool:
        return self.inner.native_fua

    def read(self, offset: int, length: int) -> Buffer:
        return self.inner.read(offset, length)

    def write_fua(self, offset: int, data: Buffer) -> None:
        self.inner.write_fua(offset, data)

    def write(self, offset: int, data: Buffer) -> None:
        self.inner.write(offset, data)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self.inner.extents(offset, length)

    def close(self) -> None:
        self.inner.close()
