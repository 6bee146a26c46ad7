"""``iscsi-initiator``: discover, list, inquire, copy, benchmark, attach and detach LUNs.

Every failure prints one line -- what went wrong and what to try -- and exits
non-zero; ``-v`` adds logging for the details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iscsi.discovery import DiscoveredTarget
from iscsi.names import parse_portal, parse_url
from iscsi.scsi.constants import PeripheralType, SenseKey
from iscsi.scsi.sbc import ProvisioningStatus

from .blockdev import BlockDevice, options_from_url
from .errors import InitiatorError, LUNNotFound
from .scsi import LUN, SCSICheckCondition
from .session import Session, SessionOptions, discover, run

PROG = "iscsi-initiator"
CHUNK = 1 << 20
DEPTH = 8


def _options(args: argparse.Namespace) -> SessionOptions:
    opts = SessionOptions(nop_interval=None, replacement_timeout=args.replacement_timeout,
                          connect_timeout=args.connect_timeout,
                          command_timeout=args.command_timeout or None)
    if args.initiator_name:
        opts.initiator_name = args.initiator_name
    if args.header_digest:
        opts.header_digest = args.header_digest
    if args.data_digest:
        opts.data_digest = args.data_digest
    if args.chap_algorithms:
        opts.chap_algorithms = tuple(int(a) for a in args.chap_algorithms.split(","))
    return opts


def _with_creds(url: str, opts: SessionOptions) -> SessionOptions:
    u = parse_url(url)
    if u.user is not None:
        opts.chap_user, opts.chap_secret = u.user, u.password
    if u.target_user is not None:
        opts.target_chap_user, opts.target_chap_secret = u.target_user, u.target_password
    return opts


# ------------------------------------------------------------- discover, ls


async def _discover(host: str, port: int, opts: SessionOptions) -> list[DiscoveredTarget]:
    # The URL's credentials are usually the target's: let a portal without
    # discovery CHAP answer without them (see discover()).
    return await discover(host, port, opts, chap_optional=True)


async def cmd_discover(args: argparse.Namespace) -> int:
    text = args.portal
    if text.startswith("iscsi://"):
        u = parse_url(text)
        host, port = u.host, u.port
        opts = _with_creds(text, _options(args))
    else:
        p = parse_portal(text)
        host, port, opts = p.host, p.port, _options(args)
    targets = await _discover(host, port, opts)
    if not targets:
        print(f"{PROG}: the portal {text} lists no targets", file=sys.stderr)
        return 1
    for t in targets:
        for portal in t.portals:
            print(f"{t.name} {portal}")
    return 0


_TYPES = {int(v): v.name.lower().replace("_", "-") for v in PeripheralType}
_TYPES[0x0C] = "storage-array-controller"


async def _describe_lun(session: Session, lun_no: int) -> str:
    lun = LUN(session, lun_no)
    inq = await lun.inquiry()
    kind = _TYPES.get(inq.peripheral_type, f"type-{inq.peripheral_type}")
    line = f"  lun {lun_no}: {kind} {inq.vendor} {inq.product} {inq.revision}".rstrip()
    if inq.peripheral_type in (PeripheralType.DISK, PeripheralType.CDROM):
        try:
            cap = await lun.read_capacity()
        except SCSICheckCondition as exc:
            return f"{line}, no medium ({exc.asc_name})"
        prov = "thin" if cap.lbpme else "full"
        line += f", {_size(cap.size)} ({cap.blocks} x {cap.block_size} B), {prov}-provisioned"
    return line


async def cmd_ls(args: argparse.Namespace) -> int:
    u = parse_url(args.url)
    opts = _with_creds(args.url, _options(args))
    names = [u.target] if u.target else [t.name for t in await _discover(u.host, u.port, opts)]
    for name in names:
        assert name is not None
        async with await Session.connect(u.host, u.port, name, opts) as s:
            luns = await LUN(s, 0).report_luns()
            if u.lun is not None:
                if u.lun not in luns:
                    raise LUNNotFound(f"LUN {u.lun} does not exist on {name} (it has {luns})")
                luns = [u.lun]
            print(name)
            for n in luns:
                print(await _describe_lun(s, n))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ------------------------------------------------------------------ inquiry


async def cmd_inquiry(args: argparse.Namespace) -> int:
    host, port, target, lun_no, opts = options_from_url(args.url, _options(args))
    async with await Session.connect(host, port, target, opts) as s:
        lun = LUN(s, lun_no)
        inq = await lun.inquiry()
        if inq.qualifier == 3:
            raise LUNNotFound(f"LUN {lun_no} does not exist on {target}")
        print(f"vendor: {inq.vendor}")
        print(f"product: {inq.product}")
        print(f"revision: {inq.revision}")
        print(f"peripheral type: {_TYPES.get(inq.peripheral_type, inq.peripheral_type)}")
        print(f"version: 0x{inq.version:02x}  removable: {inq.rmb}  cmdque: {inq.cmdque}"
              f"  tpgs: {inq.tpgs}  3pc: {inq.three_pc}")
        pages = await lun.vpd_pages()
        print("vpd pages: " + " ".join(f"0x{p:02x}" for p in pages))
        if 0x80 in pages:
            print(f"serial: {await lun.unit_serial_number()}")
        if 0x83 in pages:
            for d in await lun.device_identification():
                value = d.text if d.code_set in (2, 3) else d.value.hex()
                print(f"designator: type {d.designator_type} assoc {d.association} {value}")
        if 0xB0 in pages:
            bl = await lun.block_limits()
            if bl is not None:
                print(f"block limits: max transfer {bl.max_transfer_length} blocks, "
                      f"optimal {bl.optimal_transfer_length}, max unmap "
                      f"{bl.max_unmap_lba_count} blocks")
        if inq.peripheral_type == PeripheralType.DISK:
            cap = await lun.read_capacity()
            print(f"capacity: {cap.size} bytes ({cap.blocks} x {cap.block_size} B), "
                  f"thin: {cap.lbpme}, unmapped reads zero: {cap.lbprz}")
    return 0


# --------------------------------------------------------------------- copy


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-6)
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}% {_size(self.done)} "
                             f"{_size(int(rate))}/s ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclass
class _Extent:
    offset: int
    length: int
    mapped: bool


class _Source:
    size: int

    async def extents(self) -> AsyncIterator[_Extent]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def readinto(self, offset: int, buf: bytearray) -> None:
        raise NotImplementedError


class _LUNSource(_Source):
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.size = dev.size

    async def extents(self) -> AsyncIterator[_Extent]:
        bs = self.dev.block_size
        blocks = self.size // bs
        if not self.dev.capacity.lbpme:
            yield _Extent(0, self.size, True)
            return
        lba = 0
        while lba < blocks:
            try:
                descs = await self.dev.lun.get_lba_status(lba)
            except SCSICheckCondition as exc:
                if exc.key != SenseKey.ILLEGAL_REQUEST:
                    raise
                yield _Extent(lba * bs, self.size - lba * bs, True)
                return
            advanced = False
            for d in descs:
                if d.lba != lba or d.blocks == 0:
                    break
                n = min(d.blocks, blocks - lba)
                yield _Extent(lba * bs, n * bs, d.status == ProvisioningStatus.MAPPED)
                lba += n
                advanced = True
            if not advanced:
                # A target that answers nothing useful: copy the rest as mapped.
                yield _Extent(lba * bs, self.size - lba * bs, True)
                return

    async def readinto(self, offset: int, buf: bytearray) -> None:
        await self.dev.readinto(offset, buf)


class _FileSource(_Source):
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    async def extents(self) -> AsyncIterator[_Extent]:
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains (or no SEEK_DATA)
                data = self.size
            if data > pos:
                yield _Extent(pos, data - pos, False)
            if data >= self.size:
                return
            try:
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            except OSError:
                hole = self.size
            yield _Extent(data, hole - data, True)
            pos = hole

    async def readinto(self, offset: int, buf: bytearray) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            raise InitiatorError(f"short read from the source file at {offset}")

    def close(self) -> None:
        os.close(self.fd)


async def _copy(src: _Source, write: _Writer, progress: _Progress) -> tuple[int, int]:
    """Copy mapped, non-zero chunks; zero the rest on the destination only
    where it may hold old data. Returns (bytes written, bytes skipped)."""
    zero = bytes(CHUNK)
    sem = asyncio.Semaphore(DEPTH)
    written = skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    async def one(off: int, n: int) -> None:
        nonlocal written, skipped
        try:
            buf = bytearray(n)
            await src.readinto(off, buf)
            # bytearray == bytes is a memcmp (memoryview comparison is not).
            if buf == (zero if n == CHUNK else bytes(n)):
                await write.zeroes(off, n)
                skipped += n
            else:
                await write.data(off, buf)
                written += n
            progress.add(n)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)
        finally:
            sem.release()

    async for ext in src.extents():
        if not ext.mapped:
            await write.zeroes(ext.offset, ext.length)
            skipped += ext.length
            progress.add(ext.length)
            continue
        for off in range(ext.offset, ext.offset + ext.length, CHUNK):
            if errors:
                break
            await sem.acquire()
            n = min(CHUNK, ext.offset + ext.length - off)
            t = asyncio.ensure_future(one(off, n))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if errors:
        raise errors[0]
    return written, skipped


class _Writer:
    async def data(self, offset: int, buf: bytearray) -> None:
        raise NotImplementedError

    async def zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError


class _LUNWriter(_Writer):
    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev

    async def data(self, offset: int, buf: bytearray) -> None:
        await self.dev.write(offset, buf)

    async def zeroes(self, offset: int, length: int) -> None:
        # WRITE SAME: the LUN may hold old data, and no zeros go on the wire.
        await self.dev.write_zeroes(offset, length, unmap=self.dev.capacity.lbpme)


class _FileWriter(_Writer):
    def __init__(self, path: str, size: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        if self.regular:
            # A fresh sparse file reads as zeros: skipped ranges stay holes.
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)

    async def data(self, offset: int, buf: bytearray) -> None:
        if os.pwritev(self.fd, [buf], offset) != len(buf):
            raise InitiatorError(f"short write to the destination at {offset}")

    async def zeroes(self, offset: int, length: int) -> None:
        if not self.regular:
            zero = bytes(min(length, CHUNK))
            for off in range(offset, offset + length, CHUNK):
                n = min(CHUNK, offset + length - off)
                os.pwrite(self.fd, zero[:n], off)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


async def cmd_copy(args: argparse.Namespace) -> int:
    opts = _options(args)
    src_dev: BlockDevice | None = None
    dst_dev: BlockDevice | None = None
    src: _Source | None = None
    dst: _Writer | None = None
    try:
        if args.src.startswith("iscsi://"):
            src_dev = await BlockDevice.open(args.src, _with_creds(args.src, _options(args)))
            src = _LUNSource(src_dev)
        else:
            src = _FileSource(args.src)
        if args.dst.startswith("iscsi://"):
            dst_dev = await BlockDevice.open(args.dst, _with_creds(args.dst, opts))
            if dst_dev.size < src.size:
                raise InitiatorError(f"the destination LUN ({dst_dev.size} bytes) is smaller "
                                     f"than the source ({src.size} bytes)",
                                     hint="use a larger LUN")
            if src.size % dst_dev.block_size:
                raise InitiatorError(f"source size {src.size} is not a multiple of the "
                                     f"LUN's block size {dst_dev.block_size}")
            dst = _LUNWriter(dst_dev)
        else:
            dst = _FileWriter(args.dst, src.size)
        enabled = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = _Progress(src.size, enabled)
        start = time.monotonic()
        written, skipped = await _copy(src, dst, progress)
        if dst_dev is not None:
            await dst_dev.flush()
        progress.finish()
        took = max(time.monotonic() - start, 1e-6)
        print(f"copied {_size(src.size)} in {took:.1f} s ({_size(int(src.size / took))}/s): "
              f"{_size(written)} written, {_size(skipped)} zero or unmapped skipped",
              file=sys.stderr)
    finally:
        for dev in (src_dev, dst_dev):
            if dev is not None:
                await dev.close()
        if isinstance(src, _FileSource):
            src.close()
        if isinstance(dst, _FileWriter):
            dst.close()
    return 0


# -------------------------------------------------------------------- bench


async def cmd_bench(args: argparse.Namespace) -> int:
    if args.rw == "write" and not args.force:
        raise InitiatorError("a write benchmark overwrites the LUN",
                             hint="add --force if the data on it may be destroyed")
    dev = await BlockDevice.open(args.url, _with_creds(args.url, _options(args)))
    try:
        result = await bench(dev, rw=args.rw, pattern=args.pattern, block_size=args.bs,
                             depth=args.qd, seconds=args.seconds)
    finally:
        await dev.close()
    print(result)
    return 0


@dataclass(frozen=True)
class BenchResult:
    """Figures of one benchmark run."""

    rw: str
    pattern: str
    block_size: int
    depth: int
    ops: int
    seconds: float

    @property
    def iops(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes)."""
        return self.ops * self.block_size / self.seconds / 1e6

    def __str__(self) -> str:
        return (f"{self.rw} {self.pattern} bs={self.block_size} qd={self.depth}: "
                f"{self.iops:,.0f} IOPS, {self.mb_per_s:,.1f} MB/s "
                f"({self.ops} ops in {self.seconds:.2f} s)")


async def bench(dev: BlockDevice, *, rw: str = "read", pattern: str = "rand",
                block_size: int = 4096, depth: int = 32, seconds: float = 5.0) -> BenchResult:
    """Run ``depth`` workers of aligned ``block_size`` I/O for ``seconds``."""
    import random

    bs = dev.block_size
    if block_size % bs:
        raise InitiatorError(f"block size {block_size} is not a multiple of {bs}")
    blocks_per_io = block_size // bs
    slots = dev.size // block_size
    if slots <= 0:
        raise InitiatorError("the LUN is smaller than one benchmark block")
    lun = dev.lun
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ops = 0
    seq = 0
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal ops, seq
        buf = bytearray(os.urandom(block_size)) if rw == "write" else bytearray(block_size)
        while loop.time() < deadline:
            if pattern == "seq":
                slot = seq % slots
                seq += 1
            else:
                slot = rng.randrange(slots)
            if rw == "read":
                await lun.read(slot * blocks_per_io, blocks_per_io, buf)
            else:
                await lun.write(slot * blocks_per_io, buf)
            ops += 1

    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(depth)))
    return BenchResult(rw, pattern, block_size, depth, ops, loop.time() - start)


# ------------------------------------------------------------ attach, detach
#
# An attach serves until Ctrl-C/SIGTERM or until ``iscsi-initiator detach``
# asks it over its control socket: a Unix socket in a private directory,
# named after the export, speaking one line each way ("detach" -> "ok ..." or
# "error ..."). A socket rather than a pid file because detach then learns
# whether the flush and the logout succeeded, and a stale socket cannot
# point at an unrelated process the way a reused pid can.

_CONTROL_TIMEOUT = 2.0


def runtime_dir() -> str:
    """Where attach keeps its control sockets (mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "aioiscsi")
    return os.path.join(tempfile.gettempdir(), f"aioiscsi-{os.getuid()}")


def export_key(*, nbd: str | None = None, fuse: str | None = None) -> str:
    """The canonical name of an export (Unix paths made absolute; a TCP
    address as written, so detach must spell it the same way)."""
    if fuse is not None:
        return "fuse:" + os.path.abspath(fuse)
    if nbd is None:
        raise ValueError("an export is an NBD address or a FUSE mountpoint")
    if nbd.startswith("unix:"):
        return "unix:" + os.path.abspath(nbd[5:])
    return "tcp:" + nbd


def control_path(key: str) -> str:
    """The control socket of the attach serving export ``key`` (hashed: a
    Unix socket path must stay under 108 bytes)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"attach-{digest}.sock")


def _public_url(url: str) -> str:
    """The URL without its CHAP credentials (for messages and status)."""
    u = parse_url(url)
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"iscsi://{host}:{u.port}/{u.target}/{u.lun}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _ask(path: str, command: str, timeout: float) -> str:
    """Send one command line to an attach's control socket; its answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                            _CONTROL_TIMEOUT)
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    if not line.endswith(b"\n"):
        raise InitiatorError("the attach closed its control connection without an answer",
                             hint="it may have crashed; check its output")
    return line.decode(errors="replace").rstrip("\n")


class _Control:
    """The attach side of the control socket."""

    def __init__(self, path: str, describe: Callable[[], str], stop: Callable[[], None]) -> None:
        self.path = path
        self.describe = describe
        self.stop = stop
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen; refuse when another attach already serves this export."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            try:
                await _ask(self.path, "status", _CONTROL_TIMEOUT)
            except (OSError, TimeoutError, InitiatorError):
                os.unlink(self.path)  # stale: its attach is gone
            else:
                raise InitiatorError(f"another attach already uses the control socket "
                                     f"{self.path}", hint="detach it first, or pick another "
                                     "export address or --control")
        self.server = await asyncio.start_unix_server(self._client, self.path)
        os.chmod(self.path, 0o600)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            command = line.decode(errors="replace").strip()
            if command == "status":
                reply = "ok " + self.describe()
            elif command == "detach":
                self.stop()
                reply = await asyncio.shield(self.done)
            else:
                reply = f"error unknown control command {command!r} (detach, status)"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass  # a client that went away gets no answer
        finally:
            writer.close()
            if task is not None:
                self.clients.discard(task)

    async def finish(self, outcome: str) -> None:
        """Answer waiting detach requests with ``outcome``, then close."""
        if not self.done.done():
            self.done.set_result(outcome)
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=5.0)
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def cmd_attach(args: argparse.Namespace) -> int:
    import signal

    where = args.nbd if args.nbd is not None else args.fuse
    path = args.control or control_path(export_key(nbd=args.nbd, fuse=args.fuse))
    opts = _with_creds(args.url, _options(args))
    # An attach stays up for hours: idle NOP-Out pings (RFC 7143 §11.18)
    # notice a dead connection before the next I/O does.
    opts.nop_interval = SessionOptions().nop_interval
    dev = await BlockDevice.open(args.url, opts)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    public = _public_url(args.url)

    def _stop() -> None:
        if not stop.done():
            stop.set_result(None)

    control: _Control | None = None
    candidate = _Control(
        path, lambda: f"attached {public} on {where} (session {dev.lun.session.state})", _stop)
    try:
        await candidate.start()
        control = candidate
    except (OSError, InitiatorError) as exc:
        if args.control or isinstance(exc, InitiatorError):
            await dev.close()
            raise
        # Without a usable runtime directory, Ctrl-C/SIGTERM still detach.
        print(f"{PROG}: no control socket ({_one_line(exc)}); detach with Ctrl-C or SIGTERM",
              file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop)

    def ready(uri: str) -> None:
        # The one stdout line a script waits for: the NBD URI (nbdinfo,
        # nbd-client and qemu take it) or the FUSE file's path.
        print(uri, flush=True)
        how = f"{PROG} detach {where}" + (f" --control {path}" if args.control else "")
        print(f"{PROG}: attached {public}; detach with: {how}", file=sys.stderr, flush=True)

    error: BaseException | None = None
    try:
        if args.nbd is not None:
            from .nbd import serve_until

            await serve_until(dev, args.nbd, stop, name=args.name or "",
                              read_only=args.read_only, ready=ready)
        else:
            from .fuse import serve_fuse_until

            await serve_fuse_until(dev, args.fuse, stop, name=args.name or "lun",
                                   read_only=args.read_only, ready=ready)
    except BaseException as exc:  # noqa: BLE001 -- reported to detach, then re-raised
        error = exc
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    try:
        await dev.close()  # logs out (RFC 7143 §11.14)
    except InitiatorError as exc:
        error = error or exc
    if control is not None:
        await control.finish(
            f"error {_one_line(error)}" if error is not None else
            f"ok detached {public} from {where}: flushed and logged out")
    if error is not None:
        raise error
    return 0


async def _running_attaches() -> list[tuple[str, str]]:
    """(control socket, status) of every live attach; stale sockets go."""
    out: list[tuple[str, str]] = []
    d = runtime_dir()
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.startswith("attach-") and name.endswith(".sock")):
            continue
        path = os.path.join(d, name)
        try:
            answer = await _ask(path, "status", _CONTROL_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        except (OSError, TimeoutError, InitiatorError):
            continue
        out.append((path, answer.removeprefix("ok ")))
    return out


async def cmd_detach(args: argparse.Namespace) -> int:
    if args.control:
        path, what = args.control, args.control
    elif args.export:
        key = (export_key(fuse=args.export) if os.path.isdir(args.export)
               else export_key(nbd=args.export))
        path, what = control_path(key), args.export
    else:
        running = await _running_attaches()
        if not running:
            raise InitiatorError("no attach is running",
                                 hint=f"start one with '{PROG} attach URL --nbd ...'")
        if len(running) > 1:
            listed = "; ".join(status for _, status in running)
            raise InitiatorError(f"{len(running)} attaches are running ({listed})",
                                 hint="name the export: detach unix:PATH, HOST:PORT or "
                                 "MOUNTPOINT")
        path, what = running[0][0], running[0][1]
    try:
        answer = await _ask(path, "detach", args.timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        if os.path.exists(path) and not args.control:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise InitiatorError(f"no attach is running for {what}",
                             hint="give the --nbd address or --fuse mountpoint exactly as "
                             "attach was given it") from None
    except TimeoutError:
        raise InitiatorError(f"the attach for {what} did not finish within {args.timeout:g} s",
                             hint="the target may be unreachable; the attach keeps trying "
                             "until its --replacement-timeout") from None
    status, _, text = answer.partition(" ")
    if status != "ok":
        raise InitiatorError(f"detach of {what} failed: {text}",
                             hint="data written since the last flush may not be on the target")
    print(text)
    return 0


# --------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="iSCSI initiator tools")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--initiator-name", help="our iSCSI name (default: derived from the host)")
    p.add_argument("--header-digest", help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--data-digest", help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--chap-algorithms", help="CHAP_A values to offer, e.g. 5 or 7,5")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--replacement-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--command-timeout", type=float, default=30.0, metavar="S",
                   help="abort a SCSI command unanswered this long: ABORT TASK, then "
                        "LUN RESET, then reconnect, as Linux does (0 = wait forever)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("discover", help="list the targets of a portal (SendTargets)")
    d.add_argument("portal", metavar="HOST[:PORT]")
    d.set_defaults(func=cmd_discover)
    ls = sub.add_parser("ls", help="list targets and LUNs with size, vendor, provisioning")
    ls.add_argument("url", metavar="URL", help="iscsi://host[:port][/target[/lun]]")
    ls.set_defaults(func=cmd_ls)
    q = sub.add_parser("inquiry", help="INQUIRY and VPD pages of a LUN")
    q.add_argument("url", metavar="URL")
    q.set_defaults(func=cmd_inquiry)
    c = sub.add_parser("copy", help="copy between iscsi:// URLs and files")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    c.set_defaults(func=cmd_copy)
    a = sub.add_parser("attach", help="serve a LUN as an NBD export (or a FUSE file) until "
                       "detached or interrupted")
    a.add_argument("url", metavar="URL")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument("--nbd", metavar="unix:PATH|HOST:PORT",
                       help="NBD listen address (e.g. unix:/run/lun1.sock or 127.0.0.1:10809)")
    where.add_argument("--fuse", metavar="MOUNTPOINT",
                       help="show the LUN as the file MOUNTPOINT/lun (needs pyfuse3)")
    a.add_argument("--name", default=None,
                   help="NBD export name (default: empty) or FUSE file name (default: lun)")
    a.add_argument("--read-only", action="store_true")
    a.add_argument("--control", metavar="PATH",
                   help="control socket 'detach' talks to (default: in $XDG_RUNTIME_DIR/"
                   "aioiscsi, named after the export)")
    a.set_defaults(func=cmd_attach)
    dt = sub.add_parser("detach", help="stop an attach: flush, log out, close the export")
    dt.add_argument("export", nargs="?", metavar="EXPORT",
                    help="the attach's --nbd address or --fuse mountpoint (default: the "
                    "only attach running)")
    dt.add_argument("--control", metavar="PATH", help="the attach's control socket")
    dt.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="how long to wait for the flush and logout (default 60)")
    dt.set_defaults(func=cmd_detach)
    b = sub.add_parser("bench", help="measure IOPS and MB/s")
    b.add_argument("url", metavar="URL")
    b.add_argument("--rw", choices=("read", "write"), default="read")
    b.add_argument("--pattern", choices=("rand", "seq"), default="rand")
    b.add_argument("--bs", type=int, default=4096, help="bytes per I/O (default 4096)")
    b.add_argument("--qd", type=int, default=32, help="I/Os in flight (default 32)")
    b.add_argument("--seconds", type=float, default=5.0)
    b.add_argument("--force", action="store_true", help="allow a write benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iscsi-initiator`` console script."""
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (
        logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    if args.verbose == 0:
        # Recovery chatter is for -v; failures are reported as one line.
        logging.getLogger("initiator").setLevel(logging.ERROR)
    try:
        code: int = run(args.func(args))
        return code
    except InitiatorError as exc:
        hint = f" -- try: {exc.hint}" if exc.hint else ""
        print(f"{PROG}: {exc}{hint}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
