"""Show a device as files in a FUSE mount (``iscsi-initiator attach --fuse``,
``iscsi-target image mount``).

Like VirtualBox's ``vboximg-mount``, the mountpoint holds one regular file
for the whole device (``vhdd`` on the command lines; ``lun`` by default
here) and, when a partition table is given, one file per partition
(``vol0``, ``vol1``... see :mod:`iscsi.partitions`). Each file is a
:class:`FuseNode`: a byte range of the device, so reads stop and writes are
refused at the partition's bounds. Reads, writes and fsync go to the device.
``mount -o loop MOUNTPOINT/vol1 /mnt`` (or ``losetup``) then works where
kpartx or the nbd kernel module is missing. The device is anything shaped
like :class:`~initiator.nbd_export.ExportDevice` (async read/write/flush):
an iSCSI LU, or an image the target opens in-process.

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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from iscsi.partitions import PartitionTable

from .nbd_export import BlockDeviceExport, ExportDevice
from .nbd_proto import nbd_errno

if TYPE_CHECKING:
    from .blockdev import Device

from .errors import InitiatorError

log = logging.getLogger("initiator.fuse")

T = TypeVar("T")

MISSING_PYFUSE3 = ("FUSE export needs pyfuse3: pip install 'aioiscsi[fuse]' "
                   "(Debian: apt-get install libfuse3-dev pkg-config fuse3)")

#: The first file's inode (the root directory is pyfuse3.ROOT_INODE, 1);
#: node N of :attr:`FuseExport.nodes` has inode FILE_INODE + N.
FILE_INODE = 2
#: How long the kernel may cache names and attributes: the LU never changes
#: size while it is exported.
_ATTR_TIMEOUT = 60.0

# pyfuse3 keeps one session per process (module globals).
_active_lock = threading.Lock()
_active: FuseExport | None = None


class FuseUnavailable(InitiatorError):
    """The optional FUSE support (pyfuse3) is not installed."""


class FuseMountError(InitiatorError, RuntimeError):
    """The mount cannot be made (mountpoint busy, /dev/fuse unusable...)."""


@dataclass(frozen=True)
class FuseNode:
    """One file of the mount: ``length`` bytes of the device from ``offset``."""

    name: str
    offset: int
    length: int


def check_mountpoint(mountpoint: str) -> None:
    """Raise OSError (one line for the command lines) unless ``mountpoint``
    is an empty directory: FUSE 3 mounts over files without a word, which
    hides them for as long as the mount lives."""
    if not os.path.isdir(mountpoint):
        raise FileNotFoundError(errno.ENOENT, "mountpoint is not a directory", mountpoint)
    if os.path.ismount(mountpoint):
        raise OSError(errno.EBUSY, "something is already mounted there", mountpoint)
    if os.listdir(mountpoint):
        raise OSError(errno.ENOTEMPTY, "mountpoint is not empty", mountpoint)


def partition_nodes(table: PartitionTable | None, size: int, *,
                    name: str = "vhdd") -> list[FuseNode]:
    """The whole disk as ``name`` plus one node per partition of ``table``."""
    nodes = [FuseNode(name, 0, size)]
    if table is not None:
        for vol, part in table.volumes():
            if vol == name:
                raise ValueError(f"{name!r} is also the name of a partition node")
            nodes.append(FuseNode(vol, part.start, min(part.size, size - part.start)))
    return nodes


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
    """A device shown as the file ``MOUNTPOINT/NAME``, or as the files of
    ``nodes`` (see the module docstring; ``path`` is the first one's).
    :meth:`start` mounts, :meth:`close` asks the FUSE loop to stop,
    :meth:`wait_closed` waits for it and unmounts."""

    def __init__(self, device: ExportDevice, mountpoint: str, *, name: str = "lun",
                 read_only: bool | None = None, allow_other: bool = False,
                 direct_io: bool = False, nodes: Sequence[FuseNode] | None = None) -> None:
        self.nodes = list(nodes) if nodes is not None else [FuseNode(name, 0, device.size)]
        if not self.nodes:
            raise ValueError("a FUSE export needs at least one file")
        names = [n.name for n in self.nodes]
        for n in self.nodes:
            if not n.name or "/" in n.name or n.name in (".", ".."):
                raise ValueError(f"{n.name!r} is not a file name")
            if not (0 <= n.offset and 0 <= n.length and n.offset + n.length <= device.size):
                raise ValueError(f"{n.name}: bytes {n.offset}+{n.length} are outside the "
                                 f"device ({device.size} bytes)")
        if len(set(names)) != len(names):
            raise ValueError(f"file names repeat: {names}")
        self.device = device
        self.mountpoint = os.path.abspath(mountpoint)
        self.name = self.nodes[0].name
        self.paths = [os.path.join(self.mountpoint, n) for n in names]
        self.path = self.paths[0]
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
        """Mount; returns the path of the (first) file."""
        global _active
        check_mountpoint(self.mountpoint)
        with _active_lock:
            if _active is not None:
                raise FuseMountError("pyfuse3 allows one FUSE export per process; "
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

    async def wait_until(self, stop: Awaitable[object]) -> None:
        """Return when ``stop`` completes or the mount goes away by itself
        (``umount``/``fusermount3 -u`` by hand ends the FUSE loop)."""
        # shield both: cancelling the waiters must not cancel the caller's
        # ``stop`` nor _stopped, which the FUSE thread must still complete.
        waiters: list[asyncio.Future[Any]] = [
            asyncio.shield(stop), asyncio.shield(asyncio.wrap_future(self._stopped))]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

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
                    FuseMountError(f"cannot mount FUSE on {self.mountpoint}: {exc}",
                                   hint="is /dev/fuse usable and fusermount3 installed?"))
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
    nodes = export.nodes
    by_name = {n.name.encode(): FILE_INODE + i for i, n in enumerate(nodes)}
    started_ns = time.time_ns()
    uid, gid = os.getuid(), os.getgid()

    def fail(code: int) -> BaseException:
        return pyfuse3.FUSEError(code)  # type: ignore[no-any-return]

    def node(inode: int) -> FuseNode | None:
        i = inode - FILE_INODE
        return nodes[i] if 0 <= i < len(nodes) else None

    def file_node(inode: int) -> FuseNode:
        n = node(inode)
        if n is None:
            raise fail(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        return n

    def attrs(inode: int) -> Any:
        e = pyfuse3.EntryAttributes()
        n = node(inode)
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_size = 0
        elif n is not None:
            e.st_mode = stat.S_IFREG | (0o444 if export.read_only else 0o644)
            e.st_nlink = 1
            e.st_size = n.length
            e.st_blksize = max(dev.block_size, 4096)
            e.st_blocks = -(-n.length // 512)  # st_blocks counts 512-byte units
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
            inode = by_name.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
            if inode is None:
                raise fail(errno.ENOENT)
            return attrs(inode)

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            # A LU has a fixed size; truncating to it (O_TRUNC by a tool
            # that writes an image) is the one size change we can honour.
            if fields.update_size and attr.st_size != file_node(inode).length:
                raise fail(errno.EINVAL)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise fail(errno.EPERM)
            return attrs(inode)  # times: accepted and forgotten

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != pyfuse3.ROOT_INODE:
                raise fail(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            # start_id is the id of the entry after which to go on.
            for i in range(start_id, len(nodes)):
                if not pyfuse3.readdir_reply(token, nodes[i].name.encode(),
                                             attrs(FILE_INODE + i), i + 1):
                    return  # the kernel's buffer is full; it asks again

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            file_node(inode)
            if export.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
                raise fail(errno.EROFS)
            # keep_cache off: the LU may change under us through other paths.
            return pyfuse3.FileInfo(fh=inode, direct_io=export.direct_io, keep_cache=False)

        # fh is the inode (open() returns it): the node's range bounds
        # every transfer, so a partition file never reaches its neighbours.
        async def read(self, fh: int, off: int, size: int) -> bytes:
            nd = file_node(fh)
            n = max(0, min(size, nd.length - off))
            if not n:
                return b""
            data = await export.call(dev.read(nd.offset + off, n))
            return data if isinstance(data, bytes) else bytes(data)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            if export.read_only:
                raise fail(errno.EROFS)
            nd = file_node(fh)
            n = min(len(buf), nd.length - off)
            if n <= 0:
                raise fail(errno.ENOSPC)  # the file cannot grow
            await export.call(dev.write(nd.offset + off, memoryview(buf)[:n]))
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
            s.f_files, s.f_ffree, s.f_favail = 1 + len(nodes), 0, 0
            s.f_namemax = 255
            return s

    return Ops()


async def serve_fuse(device: ExportDevice, mountpoint: str, *, name: str = "lun",
                     read_only: bool | None = None, allow_other: bool = False,
                     ready: Callable[[str], object] | None = None,
                     nodes: Sequence[FuseNode] | None = None) -> FuseExport:
    """Mount ``device`` as ``MOUNTPOINT/NAME`` (or as ``nodes``); ``ready``
    gets the (first) file's path. Raises :class:`FuseUnavailable` when
    pyfuse3 is missing, OSError for a bad mountpoint and
    :class:`FuseMountError` when the mount fails."""
    export = FuseExport(device, mountpoint, name=name, read_only=read_only,
                        allow_other=allow_other, nodes=nodes)
    path = await export.start()
    if ready is not None:
        ready(path)
    return export


async def serve_fuse_until(device: Device, mountpoint: str, stop: Awaitable[object], *,
                           name: str = "lun", read_only: bool = False,
                           allow_other: bool = False,
                           ready: Callable[[str], object] | None = None,
                           partitions: bool = False) -> None:
    """Mount an iSCSI BlockDevice until ``stop`` completes, then unmount and
    flush (``iscsi-initiator attach --fuse``); with ``partitions``, one
    more file per partition of the LU's partition table."""
    export_dev = BlockDeviceExport(device, read_only=read_only)
    nodes = None
    if partitions:
        table = await read_partition_table(export_dev)
        nodes = partition_nodes(table, export_dev.size, name=name)
    export = await serve_fuse(export_dev, mountpoint, name=name, read_only=read_only,
                              allow_other=allow_other, ready=ready, nodes=nodes)
    try:
        await export.wait_until(stop)
    finally:
        export.close()
        await export.wait_closed()
        if not read_only:
            await device.flush()


async def read_partition_table(device: ExportDevice) -> PartitionTable:
    """The device's partition table, read in its logical block size (GPT
    and MBR count in logical blocks)."""
    from iscsi.partitions import read_table_async

    block = device.block_size if device.block_size >= 512 else 512
    return await read_table_async(device.read, device.size, block)


__all__ = [
    "FILE_INODE",
    "MISSING_PYFUSE3",
    "FuseExport",
    "FuseMountError",
    "FuseNode",
    "check_mountpoint",
    "load_pyfuse3",
    "partition_nodes",
    "read_partition_table",
    "serve_fuse",
    "serve_fuse_until",
]
