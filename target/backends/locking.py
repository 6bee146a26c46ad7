"""Image locking compatible with qemu's (its file-posix driver), so that
qemu, qemu-img, qemu-nbd and our target and image tools exclude each other
both ways, and two of our processes never write one image at once.

qemu expresses what a user of an image does and tolerates as permissions
(read, write, write-unchanged, resize) and publishes them as open file
description (OFD) locks, all shared (read) locks on single bytes:
byte 100 + n says "I hold permission n", byte 200 + n says "I do not let
others hold permission n". Before using a permission one checks that
nobody holds its 200 + n byte, and before refusing one to others that
nobody holds its 100 + n byte; ``F_OFD_GETLK`` with a write lock tests
exactly that, ignoring our own open file description. We take the same
two shapes qemu takes (checked with ``/proc/locks`` against qemu 7.2):

* writer (an image served read-write, an image tool that writes): holds
  read, write and resize; shares neither write nor resize;
* reader (a read-only LUN, a backing file, ``image info``): holds read;
  shares neither write nor resize -- so nobody writes under it;
* shared writer (a LUN in ``shareable`` mode, under :func:`sharing_writes`;
  qemu's ``share-rw=on``): holds read and write, shares write but not
  resize -- so several gateways may serve one fixed-size image for a
  cluster file system, while a plain writer or a reader still excludes them.

The registry locks every file an image is made of (a VMDK's extents too,
as qemu does) and every backing file of its chain as a reader.

Within one process a writer excludes every other user of the file too
(two LUNs on one image would each cache metadata the other changes),
except under :func:`reopening` (the target reopens an image it grows while
the old handle drains); readers are counted and share.
OFD locks belong to the open file description, so one descriptor per file
is kept open while held; closing it releases them, also when the process
dies. Under ``force_share()`` (``-U``/``--force-share`` of the image
tools) a reader holds the read permission and shares everything, as
``qemu-img -U`` does, so only a user that refuses to share reading stops it.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .base import BackendError

log = logging.getLogger("aioiscsi.image")

# qemu's permission bits (include/block/block-common.h) and lock offsets
# (block/file-posix.c).
PERM_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
_PERM_NAMES = {PERM_READ: "consistent read", PERM_WRITE: "write",
               PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
_PERM_BASE = 100
_SHARED_BASE = 200

# struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len,
# l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("@hhqqi4x")


@dataclass(frozen=True)
class Access:
    """The permissions a user holds and the ones it does not share."""

    perms: frozenset[int]
    unshared: frozenset[int]


WRITER = Access(frozenset({PERM_READ, PERM_WRITE, PERM_RESIZE}),
                frozenset({PERM_WRITE, PERM_RESIZE}))
READER = Access(frozenset({PERM_READ}), frozenset({PERM_WRITE, PERM_RESIZE}))
#: ``-U``: reads, shares everything (qemu-io -r -U still holds byte 100).
SHARED_READER = Access(frozenset({PERM_READ}), frozenset())
#: ``shareable`` LUNs (qemu's share-rw=on): write, and let others write.
SHARED_WRITER = Access(frozenset({PERM_READ, PERM_WRITE}), frozenset({PERM_RESIZE}))


class ImageInUse(BackendError):
    """Another process uses the image in a way ours cannot coexist with."""


class ImageOpenHere(ImageInUse):
    """This process already uses the image in a way the new use cannot
    coexist with (e.g. written here while it backs another image here)."""


_sharing: contextvars.ContextVar[bool] = contextvars.ContextVar("image_force_share",
                                                                default=False)
_reopening: contextvars.ContextVar[bool] = contextvars.ContextVar("image_reopening",
                                                                  default=False)
_sharing_writes: contextvars.ContextVar[bool] = contextvars.ContextVar("image_share_writes",
                                                                      default=False)


@contextlib.contextmanager
def sharing_writes() -> Iterator[None]:
    """Open images for writing as a writer that lets other processes write
    too (``shareable`` LUNs: the initiators coordinate, e.g. a cluster file
    system). Within this process one writer per image still holds."""
    token = _sharing_writes.set(True)
    try:
        yield
    finally:
        _sharing_writes.reset(token)


@contextlib.contextmanager
def reopening() -> Iterator[None]:
    """Open an image this process already has open for writing, to replace
    that handle (the target reopens an image it grew while the old handle
    drains). Anywhere else a second in-process writer is refused."""
    token = _reopening.set(True)
    try:
        yield
    finally:
        _reopening.reset(token)


@contextlib.contextmanager
def force_share() -> Iterator[None]:
    """Open images as a reader that shares everything (qemu-img ``-U``):
    only for reading, and what is read may be changing underneath."""
    token = _sharing.set(True)
    try:
        yield
    finally:
        _sharing.reset(token)


def _set(fd: int, byte: int, ltype: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))


def _held_elsewhere(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return bool(_FLOCK.unpack(out)[0] != fcntl.F_UNLCK)


def _bytes(access: Access) -> set[int]:
    return {_PERM_BASE + p for p in access.perms} | {_SHARED_BASE + p for p in access.unshared}


def _conflict(fd: int, access: Access) -> str | None:
    """Why another process's locks forbid ``access`` now, or None."""
    for p in sorted(access.perms):
        if _held_elsewhere(fd, _SHARED_BASE + p):
            return f"it does not share {_PERM_NAMES[p]} access"
    for p in sorted(access.unshared):
        if _held_elsewhere(fd, _PERM_BASE + p):
            return f"it has {_PERM_NAMES[p]} access"
    return None



class _Held:
    """The locks this process holds on one file, counted per access."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.counts: dict[Access, int] = {}

    def writing(self) -> bool:
        return any(PERM_WRITE in a.perms for a in self.counts)

    def locked(self) -> set[int]:
        out: set[int] = set()
        for access in self.counts:
            out |= _bytes(access)
        return out


_held: dict[tuple[int, int], _Held] = {}
_mutex = threading.Lock()


class ImageLock:
    """One hold on an image file; :meth:`release` gives it back."""

    def __init__(self, key: tuple[int, int], access: Access) -> None:
        self._key = key
        self._access = access
        self._released = False

    def release(self) -> None:
        """Drop this hold (idempotent); the file's locks go with the last."""
        with _mutex:
            if self._released:
                return
            self._released = True
            held = _held.get(self._key)
            if held is None:
                return
            before = held.locked()
            held.counts[self._access] -= 1
            if not held.counts[self._access]:
                del held.counts[self._access]
            if not held.counts:
                del _held[self._key]
                os.close(held.fd)  # releases every OFD lock on it
                return
            for byte in before - held.locked():
                _set(held.fd, byte, fcntl.F_UNLCK)


class LockSet:
    """Several holds given back together (an image and its extent files)."""

    def __init__(self, locks: list[ImageLock]) -> None:
        self._locks = locks

    def add(self, lock: ImageLock) -> None:
        """Hold ``lock`` too until :meth:`release`."""
        self._locks.append(lock)

    def release(self) -> None:
        """Give every hold back (idempotent)."""
        locks, self._locks = self._locks, []
        for lock in reversed(locks):
            lock.release()


def lock_image(path: str, *, write: bool) -> ImageLock | None:
    """Take qemu's writer or reader locks on ``path`` (see the module
    docstring). Raises :class:`ImageInUse` with one line naming the file
    when another process's use forbids it; returns None under
    :func:`force_share`."""
    if _sharing.get():
        if write:
            raise BackendError(f"{path}: --force-share is for reading only")
        access = SHARED_READER
    elif write:
        access = SHARED_WRITER if _sharing_writes.get() else WRITER
    else:
        access = READER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # the format module reports a missing/unreadable file
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    key = (st.st_dev, st.st_ino)
    with _mutex:
        held = _held.get(key)
        if held is not None:
            os.close(fd)
            if (write or held.writing()) and not _reopening.get():
                # Two LUNs (or a LUN and a tool) of this process on one
                # image, one of them writing: each would cache metadata the
                # other changes, or one writes the backing file of another.
                raise ImageOpenHere(_open_here(path, held))
            fd = held.fd
        new = _bytes(access) - (held.locked() if held is not None else set())
        try:
            for byte in sorted(new):
                _set(fd, byte, fcntl.F_RDLCK)
            # Locks first, then the check: of two processes racing for an
            # image, at least one sees the other (what qemu does too).
            reason = _conflict(fd, access)
        except OSError as exc:
            # A file system without OFD locks: like qemu's locking=auto,
            # go on unlocked and say so once.
            if held is None:
                os.close(fd)
            _warn_unlocked(path, exc)
            return None
        if reason is not None:
            for byte in new:
                _set(fd, byte, fcntl.F_UNLCK)
            if held is None:
                os.close(fd)
            raise ImageInUse(f"{path} is in use by another process ({reason}); stop it "
                             "first (the image tools can still look with -U/--force-share)")
        if held is None:
            held = _held[key] = _Held(fd)
        held.counts[access] = held.counts.get(access, 0) + 1
        return ImageLock(key, access)


def _open_here(path: str, held: _Held) -> str:
    if held.writing():
        return (f"{path} is already open in this process for writing; one image can back "
                "one read-write LUN only")
    return (f"{path} is already open in this process, read-only (a LUN or a backing file), "
            "and cannot also be written")


_warned: set[str] = set()


def _warn_unlocked(path: str, exc: OSError) -> None:
    fs = os.path.dirname(os.path.abspath(path))
    if fs not in _warned:
        _warned.add(fs)
        log.warning("%s: image locking is not supported here (%s); other processes are "
                    "not kept from writing this image", path, exc.strerror or exc)
