"""Ceph RBD images as LUNs, through librbd's Python bindings.

The bindings are Debian's ``python3-rbd``/``python3-rados`` (built for the
system Python; ``scripts/ceph-bindings`` exposes them to a venv). They are
imported when an RBD LUN is opened, so the rest of the target never needs
them, and a missing one is one line at serve time.

I/O uses librbd's asynchronous calls: each ``aio_*`` submits at once and
its completion, which librbd runs on one of its own threads, is handed
back to the event loop with ``call_soon_threadsafe``. Nothing blocks the
loop but the submission itself. The synchronous :class:`Backend` methods
(image tools, XCOPY) use librbd's blocking calls.

The Ceph 16 (Pacific) bindings have no writesame and no compare-and-write
(librbd's C API does, the Python wrapper does not): WRITE SAME writes the
repeated block in 1 MiB pieces, and COMPARE AND WRITE is a read, a compare
and a write under :class:`~.aio.WriteGate`, atomic against every other
write of this process. Another process cannot write meanwhile: a writable
image is opened with the RBD exclusive lock taken by ``lock_acquire()``,
which turns off librbd's automatic lock hand-over. (``rbd.Image(...,
exclusive=True)`` is not an argument of these bindings and crashes the
interpreter.)

Deallocation: UNMAP is ``discard``, with ``rbd_discard_granularity_bytes``
set to 0 so that a discard smaller than librbd's default 64 KiB granule is
not dropped: LBPRZ (discarded blocks read as zeroes, SBC-3 §4.7.3.4) then
holds for every range. GET LBA STATUS comes from ``diff_iterate`` against
no snapshot: the extents that hold data.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .aio import AsyncBackend, WriteGate, first_difference
from .base import BackendError, Buffer, Extent, MediumError
from .registry import check_range

__all__ = ["RbdBackend", "RbdSpec", "parse_rbd_spec"]

#: WRITE SAME payload per librbd write.
_SAME_CHUNK = 1 << 20


@dataclass(frozen=True)
class RbdSpec:
    """Which image, and how to reach its cluster."""

    pool: str
    image: str
    namespace: str = ""
    #: ceph.conf to read ("" = $CEPH_CONF, else librados' default search).
    ceph_conf: str = ""
    #: Client name without "client." ("" = admin, as the ceph tools).
    client_id: str = ""
    keyring: str = ""

    @property
    def label(self) -> str:
        """``rbd:POOL[/NAMESPACE]/IMAGE``, as qemu spells it."""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"rbd:{self.pool}/{ns}{self.image}"


def parse_rbd_spec(text: str, *, ceph_conf: str = "") -> RbdSpec:
    """Parse qemu's ``rbd:POOL[/NAMESPACE]/IMAGE[:id=ID][:conf=FILE][:keyring=FILE]``.
    Raises BackendError with the reason."""
    if not text.startswith("rbd:"):
        raise BackendError(f"{text}: not an RBD image (rbd:POOL/IMAGE)")
    name, *opts = text[4:].split(":")
    parts = name.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BackendError(f"{text}: give the image as rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")
    if "@" in parts[-1]:
        raise BackendError(f"{text}: snapshots are not served (give an image, not IMAGE@SNAP)")
    values = {"id": "", "conf": ceph_conf, "keyring": ""}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in values or not value:
            raise BackendError(f"{text}: option {opt!r} is not allowed (id=, conf=, keyring=)")
        values[key] = value
    return RbdSpec(pool=parts[0], image=parts[-1], namespace=parts[1] if len(parts) == 3 else "",
                   ceph_conf=values["conf"], client_id=values["id"], keyring=values["keyring"])


def _bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules, or one line saying what to install."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise BackendError(
            f"the rbd backend needs python3-rbd and python3-rados (Debian) importable by "
            f"{sys.executable} ({exc}); install them and run scripts/ceph-bindings with "
            "this Python to link them into its venv") from None


def _errno_of(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return os.strerror(abs(code)) if isinstance(code, int) and code else str(exc)


class RbdBackend(AsyncBackend):
    """One RBD image, opened with its own librados client."""

    def __init__(self, spec: RbdSpec, *, read_only: bool = False) -> None:
        rados, rbd = _bindings()
        self._rbd = rbd
        self.spec = spec
        self.path = spec.label
        self._read_only = read_only
        self._gate = WriteGate()
        self._closed = False
        self._pr_store: Any = None
        self._pr_ioctx: Any = None
        conf = spec.ceph_conf or os.environ.get("CEPH_CONF", "")
        if conf and not os.path.isfile(conf):
            raise BackendError(f"{self.path}: ceph.conf {conf}: no such file")
        if not conf and not os.path.isfile("/etc/ceph/ceph.conf"):
            raise BackendError(f"{self.path}: no ceph.conf: give --ceph-conf FILE (ceph_conf in "
                               "a config file) or set CEPH_CONF")
        extra = {"keyring": spec.keyring} if spec.keyring else {}
        try:
            self._cluster = rados.Rados(conffile=conf, rados_id=spec.client_id or None, conf=extra)
            # Discards below librbd's 64 KiB default granule would be dropped,
            # and partial ones skipped: LBPRZ needs every one applied.
            for key, value in (("rbd_discard_granularity_bytes", "0"),
                               ("rbd_skip_partial_discard", "false")):
                try:
                    self._cluster.conf_set(key, value)
                except Exception:  # noqa: BLE001 - an option this release lacks
                    pass
            self._cluster.connect(timeout=30)
        except Exception as exc:  # noqa: BLE001 - rados raises its own hierarchy
            raise BackendError(f"{self.path}: cannot connect to the Ceph cluster"
                               f"{' of ' + conf if conf else ''}: {_errno_of(exc)}") from None
        try:
            self._ioctx = self._cluster.open_ioctx(spec.pool)
            if spec.namespace:
                self._ioctx.set_namespace(spec.namespace)
            self._image = rbd.Image(self._ioctx, spec.image, read_only=read_only)
        except Exception as exc:  # noqa: BLE001
            self._cluster.shutdown()
            what = "no such pool or image" if isinstance(exc, (rados.ObjectNotFound,
                                                               rbd.ImageNotFound)) \
                else _errno_of(exc)
            raise BackendError(f"{self.path}: {what}") from None
        try:
            self._size = int(self._image.size())
            if not read_only:
                self._lock()
        except BaseException:
            self._shutdown()
            raise

    def _lock(self) -> None:
        """Take the exclusive lock for good, so no other client writes
        between our compare and our write (COMPARE AND WRITE)."""
        rbd = self._rbd
        if not self._image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
            return  # nothing to take; the administrator chose no locking
        try:
            self._image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"{self.path}: another client holds the image's exclusive lock "
                               f"({_errno_of(exc)}); stop it, or serve this LUN read-only") from None

    # -- properties -----------------------------------------------------------

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

    # -- completions ------------------------------------------------------------

    def _submit(self, start: Callable[[Callable[..., None]], Any], what: str, offset: int
                ) -> asyncio.Future[Any]:
        """Start one librbd aio call; its completion settles the future on
        the loop. ``start(callback)`` makes the call."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(completion: Any, data: Any = None) -> None:
            # A librbd thread: only hand the result over.
            ret = completion.get_return_value()
            try:
                loop.call_soon_threadsafe(self._settle, fut, ret, data, what, offset)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        if self._closed:
            fut.set_exception(BackendError(f"{self.path}: image is closed"))
            return fut
        try:
            start(done)
        except Exception as exc:  # noqa: BLE001 - the bindings' own errors
            fut.set_exception(MediumError(f"{self.path}: {what} at {offset}: {_errno_of(exc)}"))
        return fut

    def _settle(self, fut: asyncio.Future[Any], ret: int, data: Any, what: str,
                offset: int) -> None:
        if fut.done():
            return
        if ret < 0:
            fut.set_exception(MediumError(f"{self.path}: {what} at {offset}: "
                                          f"{os.strerror(-ret)}"))
        else:
            fut.set_result(data)

    def _check(self, offset: int, length: int, write: bool) -> None:
        check_range(self, offset, length)
        if write and self._read_only:
            raise BackendError(f"{self.path}: opened read-only")

    # -- asynchronous I/O -----------------------------------------------------------

    def aio_read(self, offset: int, length: int) -> Awaitable[Buffer]:
        self._check(offset, length, False)
        if length == 0:
            return _done(b"")
        return self._submit(lambda cb: self._image.aio_read(offset, length, cb), "read", offset)

    def _write_now(self, offset: int, data: bytes) -> asyncio.Future[Any]:
        return self._submit(lambda cb: self._image.aio_write(data, offset, cb), "write", offset)

    def aio_write(self, offset: int, data: Buffer) -> Awaitable[None]:
        self._check(offset, len(data), True)
        payload = bytes(data)  # the bindings take bytes; the caller's buffer is free after this
        return self._gate.write(lambda: self._write_now(offset, payload))

    def aio_flush(self) -> Awaitable[None]:
        if self._read_only:
            return _done(None)
        return self._submit(lambda cb: self._image.aio_flush(cb), "flush", 0)

    def aio_discard(self, offset: int, length: int) -> Awaitable[None]:
        self._check(offset, length, True)
        return self._gate.write(lambda: self._submit(
            lambda cb: self._image.aio_discard(offset, length, cb), "discard", offset))

    def aio_write_zeroes(self, offset: int, length: int) -> Awaitable[None]:
        self._check(offset, length, True)
        # THICK_PROVISION: WRITE SAME without UNMAP leaves the blocks mapped
        # (SBC-3 §5.43).
        flags = self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        return self._gate.write(lambda: self._submit(
            lambda cb: self._image.aio_write_zeroes(offset, length, cb, zero_flags=flags),
            "write zeroes", offset))

    def aio_write_same(self, offset: int, length: int, block: bytes) -> Awaitable[None]:
        self._check(offset, length, True)
        if block.count(0) == len(block):
            return self.aio_write_zeroes(offset, length)
        chunk = block * max(1, min(length, _SAME_CHUNK) // len(block))
        futs: list[Awaitable[Any]] = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            futs.append(self._write_piece(pos, chunk if n == len(chunk) else chunk[:n]))
            pos += n
        return _gathered(futs)

    def _write_piece(self, offset: int, data: bytes) -> Awaitable[Any]:
        return self._gate.write(lambda: self._write_now(offset, data))

    def aio_compare_and_write(self, offset: int, compare: Buffer, data: Buffer) -> Awaitable[int]:
        self._check(offset, len(compare), True)
        expect, payload = bytes(compare), bytes(data)

        async def body() -> int:
            current = await self._submit(
                lambda cb: self._image.aio_read(offset, len(expect), cb), "read", offset)
            diff = first_difference(current, expect)
            if diff >= 0:
                return diff
            await self._write_now(offset, payload)
            return -1

        return self._gate.exclusive(body)

    def aio_extents(self, offset: int, length: int) -> Awaitable[list[Extent]]:
        # diff_iterate blocks: a thread (GET LBA STATUS is rare).
        return asyncio.to_thread(lambda: list(self.extents(offset, length)))

    # -- synchronous I/O (image tools, XCOPY) ---------------------------------------

    def _sync(self, what: str, offset: int, call: Callable[[], Any]) -> Any:
        if self._closed:
            raise BackendError(f"{self.path}: image is closed")
        try:
            return call()
        except Exception as exc:  # noqa: BLE001
            raise MediumError(f"{self.path}: {what} at {offset}: {_errno_of(exc)}") from None

    def read(self, offset: int, length: int) -> Buffer:
        self._check(offset, length, False)
        return bytes(self._sync("read", offset, lambda: self._image.read(offset, length)))

    def write(self, offset: int, data: Buffer) -> None:
        self._check(offset, len(data), True)
        self._sync("write", offset, lambda: self._image.write(bytes(data), offset))

    def flush(self) -> None:
        if not self._read_only and not self._closed:
            self._sync("flush", 0, self._image.flush)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        self._sync("discard", offset, lambda: self._image.discard(offset, length))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        flags = self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._sync("write zeroes", offset,
                   lambda: self._image.write_zeroes(offset, length, zero_flags=flags))

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        check_range(self, offset, length)
        found: list[tuple[int, int]] = []

        def seen(off: int, n: int, exists: bool) -> int:
            if exists and n:
                found.append((off, n))
            return 0

        self._sync("diff_iterate", offset, lambda: self._image.diff_iterate(
            offset, length, None, seen, include_parent=True, whole_object=False))
        pos, end = offset, offset + length
        for off, n in sorted(found):
            off, stop = max(off, pos), min(off + n, end)
            if stop <= off:
                continue
            if off > pos:
                yield Extent(pos, off - pos, False)
            yield Extent(off, stop - off, True)
            pos = stop
        if pos < end:
            yield Extent(pos, end - pos, False)

    # -- shared SCSI state -------------------------------------------------------

    def pr_store(self) -> Any:
        """The RADOS object other gateways of this image share persistent
        reservations through (target/backends/rbd_pr.py), or None when this
        client may not create it (a read-only cephx user)."""
        from .rbd_pr import RadosPRStore

        if self._pr_store is None:
            rados = importlib.import_module("rados")
            try:
                io = self._cluster.open_ioctx(self.spec.pool)
                if self.spec.namespace:
                    io.set_namespace(self.spec.namespace)
                self._pr_store = RadosPRStore(rados, io, f"aioiscsi.pr.{self._image.id()}")
                self._pr_ioctx = io
            except Exception as exc:  # noqa: BLE001 - fall back to local reservations
                raise BackendError(f"{self.path}: cannot share persistent reservations in "
                                   f"the cluster: {_errno_of(exc)}") from None
        return self._pr_store

    # -- lifetime -----------------------------------------------------------------

    def _shutdown(self) -> None:
        if self._pr_store is not None:
            self._pr_store.close()
            self._pr_ioctx.close()
            self._pr_store = None
        try:
            self._image.close()  # waits for I/O in flight, releases the lock
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        finally:
            self._ioctx.close()
            self._cluster.shutdown()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._shutdown()
        finally:
            self.release_image_lock()


def _done(value: Any) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def _gathered(pending: list[Awaitable[Any]]) -> None:
    await asyncio.gather(*pending)


def open_rbd(spec: RbdSpec, *, read_only: bool) -> RbdBackend:
    """Open an RBD image for serving (BackendError in one line)."""
    return RbdBackend(spec, read_only=read_only)

