"""Show a LUN as one file in a FUSE mount (``iscsi-initiator attach --fuse``).

Like VirtualBox's ``vboximg-mount`` (its ``vhdd`` node), the mountpoint holds
a single regular file, by default ``lun``, whose bytes are the LU's; reads,
writes and fsync go to the device. ``losetup`` then turns the file into
/dev/loopN for ``mkfs``/``mount`` where the nbd kernel module is missing.

Threading, and why: pyfuse3 drives its request loop with trio, while the
device lives in an asyncio loop (the iSCSI session). The FUSE loop therefore
runs ``trio.run`` in a thread of its own, and each FUSE request hands its
device call to the asyncio loop with :func:`asyncio.run_coroutine_threadsafe`;
the trio task sleeps on a ``trio.Event`` that the future's completion
callback sets through the trio token, so no thread blocks per request and
pyfuse3's worker tasks keep many requests in flight. pyfuse3 also ships an
asyncio shim (``pyfuse3.asyncio.enable()``), but that switches the backend
for the whole process and puts FUSE request decoding on the loop that carries
the iSCSI traffic; a thread keeps the two apart and uses pyfuse3 as its
authors test it.

Caveats: pyfuse3 holds one session per process, so one FUSE export per
process. Code in the process that owns the export must not do blocking I/O on
the exported file from the asyncio loop's thread (it would wait on itself);
use a thread (``asyncio.to_thread``) or another process. Detach a loop
device (``losetup -d``) before closing the export: the unmount is lazy, and a
loop device still holding the file would wait for answers nobody gives.
pyfuse3 has no fallocate handler, so a loop device on the file cannot pass
discards down.

pyfuse3 is the optional extra ``fuse`` (``pip install 'aioiscsi[fuse]'``; it
builds against libfuse3: Debian ``libfuse3-dev pkg-config fuse3``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import importlib
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from .nbd_export import BlockDeviceExport, ExportDevice
from .nbd_proto import nbd_errno

if TYPE_CHECKING:
    from .blockdev import Device

from .errors import InitiatorError

log = logging.getLogger("initiator.fuse")

T = TypeVar("T")

MISSING_PYFUSE3 = ("FUSE export needs pyfuse3: pip install 'aioiscsi[fuse]' "
                   "(Debian: apt-get install libfuse3-dev pkg-config fuse3)")

#: The file's inode (the root directory is pyfuse3.ROOT_INODE, 1).
FILE_INODE = 2
#: How long the kernel may cache names and attributes: the LU never changes
#: size while it is exported.
_ATTR_TIMEOUT = 60.0

# pyfuse3 keeps one session per process (module globals).
_active_lock = threading.Lock()
_active: FuseExport | None = None


class FuseUnavailable(InitiatorError):
    """The optional FUSE support (pyfuse3) is not installed."""


def load_pyfuse3() -> tuple[ModuleType, ModuleType]:
    """Import (pyfuse3, trio), or raise :class:`FuseUnavailable` saying how
    to install them (one line on the command line, not a traceback)."""
    # import_module keeps mypy from requiring the optional extra's stubs.
    try:
        pyfuse3 = importlib.import_module("pyfuse3")
        trio = importlib.import_module("trio")
    except ImportError as exc:
        raise FuseUnavailable(MISSING_PYFUSE3) from exc
    return pyfuse3, trio


def _fuse_errno(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EFBIG):
        return exc.errno
    return nbd_errno(exc)  # EPERM / EIO / EINVAL / ENOSPC, as for NBD


class FuseExport:
    """A device shown as the file ``MOUNTPOINT/NAME`` (see the module
    docstring). :meth:`start` mounts, :meth:`close` asks the FUSE loop to
    stop, :meth:`wait_closed` waits for it and unmounts."""

    def __init__(self, device: ExportDevice, mountpoint: str, *, name: str = "lun",
                 read_only: bool | None = None, allow_other: bool = False,
                 direct_io: bool = False) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        self.device = device
        self.mountpoint = os.path.abspath(mountpoint)
        self.name = name
        self.path = os.path.join(self.mountpoint, name)
        self.read_only = device.read_only if read_only is None else read_only
        self.allow_other = allow_other
        self.direct_io = direct_io
        self._pyfuse3, self._trio = load_pyfuse3()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: Any = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def mounted(self) -> bool:
        """True between a successful :meth:`start` and the unmount."""
        return self._started.done() and not self._stopped.done()

    async def start(self) -> str:
        """Mount; returns the path of the file."""
        global _active
        if not os.path.isdir(self.mountpoint):
            raise FileNotFoundError(errno.ENOENT, "mountpoint is not a directory",
                                    self.mountpoint)
        with _active_lock:
            if _active is not None:
                raise RuntimeError("pyfuse3 allows one FUSE export per process; "
                                   f"{_active.mountpoint} is still mounted")
            _active = self
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="fuse-export",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(self._started)
        except BaseException:
            await asyncio.wrap_future(self._stopped)
            raise
        return self.path

    def close(self) -> None:
        """Ask the FUSE loop to end (the unmount follows); idempotent."""
        token, trio = self._token, self._trio
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._pyfuse3.terminate)

    async def wait_closed(self) -> None:
        """Wait until the FUSE loop has ended and the mount is gone."""
        if self._thread is not None:
            await asyncio.wrap_future(self._stopped)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # ------------------------------------------------------- FUSE thread

    def _thread_main(self) -> None:
        global _active
        pyfuse3, trio = self._pyfuse3, self._trio
        try:
            options = set(pyfuse3.default_options)
            options |= {"fsname=aioiscsi", "subtype=aioiscsi"}
            if self.read_only:
                options.add("ro")
            if self.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(_operations(self, pyfuse3), self.mountpoint, options)
            except BaseException as exc:  # noqa: BLE001 -- reported to start()
                self._started.set_exception(
                    RuntimeError(f"cannot mount FUSE on {self.mountpoint}: {exc} "
                                 "(is /dev/fuse usable and fusermount3 installed?)"))
                return
            try:
                trio.run(self._trio_main)
            except BaseException as exc:  # noqa: BLE001 -- the loop died: report, unmount
                log.error("FUSE loop for %s failed: %s", self.mountpoint, exc)
                if not self._started.done():
                    self._started.set_exception(exc)
            finally:
                self._token = None
                pyfuse3.close(unmount=True)
        finally:
            with _active_lock:
                _active = None
            self._stopped.set_result(None)

    async def _trio_main(self) -> None:
        self._token = self._trio.lowlevel.current_trio_token()
        self._started.set_result(None)
        # Several worker tasks: the kernel sends requests concurrently
        # (readahead, writeback), and each waits on the iSCSI round trip.
        await self._pyfuse3.main(min_tasks=4, max_tasks=64)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the device's asyncio loop; await it from trio."""
        trio, pyfuse3 = self._trio, self._pyfuse3
        assert self._loop is not None
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError as exc:  # the device's loop is closed: nothing can answer
            coro.close()
            raise pyfuse3.FUSEError(errno.EIO) from exc
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_f: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:  # trio.Cancelled: the request is abandoned
            fut.cancel()
            raise
        try:
            return fut.result()
        except Exception as exc:
            code = _fuse_errno(exc)
            log.info("FUSE request failed (errno %d): %s", code, exc)
            raise pyfuse3.FUSEError(code) from exc


def _operations(export: FuseExport, pyfuse3: Any) -> Any:
    """The pyfuse3.Operations for ``export`` (built here because the base
    class exists only once pyfuse3 is imported)."""
    dev = export.device
    name_b = export.name.encode()
    started_ns = time.time_ns()
    uid, gid = os.getuid(), os.getgid()

    def fail(code: int) -> BaseException:
        return pyfuse3.FUSEError(code)  # type: ignore[no-any-return]

    def attrs(inode: int) -> Any:
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_size = 0
        elif inode == FILE_INODE:
            e.st_mode = stat.S_IFREG | (0o444 if export.read_only else 0o644)
            e.st_nlink = 1
            e.st_size = dev.size
            e.st_blksize = max(dev.block_size, 4096)
            e.st_blocks = -(-dev.size // 512)  # st_blocks counts 512-byte units
        else:
            raise fail(errno.ENOENT)
        e.st_ino = inode
        e.st_uid, e.st_gid = uid, gid
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = started_ns
        e.entry_timeout = e.attr_timeout = _ATTR_TIMEOUT
        return e

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return attrs(inode)

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            if parent_inode != pyfuse3.ROOT_INODE or name != name_b:
                raise fail(errno.ENOENT)
            return attrs(FILE_INODE)

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            # A LU has a fixed size; truncating to it (O_TRUNC by a tool
            # that writes an image) is the one size change we can honour.
            if fields.update_size and (inode != FILE_INODE or attr.st_size != dev.size):
                raise fail(errno.EINVAL if inode == FILE_INODE else errno.EISDIR)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise fail(errno.EPERM)
            return attrs(inode)  # times: accepted and forgotten

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise fail(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, name_b, attrs(FILE_INODE), 1)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            if inode != FILE_INODE:
                raise fail(errno.EISDIR)
            if export.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
                raise fail(errno.EROFS)
            # keep_cache off: the LU may change under us through other paths.
            return pyfuse3.FileInfo(fh=inode, direct_io=export.direct_io, keep_cache=False)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            n = max(0, min(size, dev.size - off))
            if not n:
                return b""
            data = await export.call(dev.read(off, n))
            return data if isinstance(data, bytes) else bytes(data)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            if export.read_only:
                raise fail(errno.EROFS)
            n = min(len(buf), dev.size - off)
            if n <= 0:
                raise fail(errno.ENOSPC)  # the file cannot grow
            await export.call(dev.write(off, memoryview(buf)[:n]))
            return n

        async def fsync(self, fh: int, datasync: bool) -> None:
            if not export.read_only:
                await export.call(dev.flush())

        async def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            bs = max(dev.block_size, 512)
            s.f_bsize = s.f_frsize = bs
            s.f_blocks = dev.size // bs
            s.f_bfree = s.f_bavail = 0
            s.f_files, s.f_ffree, s.f_favail = 2, 0, 0
            s.f_namemax = 255
            return s

    return Ops()


async def serve_fuse(device: ExportDevice, mountpoint: str, *, name: str = "lun",
                     read_only: bool | None = None, allow_other: bool = False,
                     ready: Callable[[str], object] | None = None) -> FuseExport:
    """Mount ``device`` as ``MOUNTPOINT/NAME``; ``ready`` gets the file's path.
    Raises RuntimeError when pyfuse3 is missing or the mount fails."""
    export = FuseExport(device, mountpoint, name=name, read_only=read_only,
                        allow_other=allow_other)
    path = await export.start()
    if ready is not None:
        ready(path)
    return export


async def serve_fuse_until(device: Device, mountpoint: str, stop: Awaitable[object], *,
                           name: str = "lun", read_only: bool = False,
                           allow_other: bool = False,
                           ready: Callable[[str], object] | None = None) -> None:
    """Mount an iSCSI BlockDevice until ``stop`` completes, then unmount and
    flush (``iscsi-initiator attach --fuse``)."""
    export = await serve_fuse(BlockDeviceExport(device, read_only=read_only), mountpoint,
                              name=name, read_only=read_only, allow_other=allow_other,
                              ready=ready)
    try:
        await stop
    finally:
        export.close()
        await export.wait_closed()
        if not read_only:
            await device.flush()


__all__ = [
    "FILE_INODE",
    "MISSING_PYFUSE3",
    "FuseExport",
    "load_pyfuse3",
    "serve_fuse",
    "serve_fuse_until",
]
