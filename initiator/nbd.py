"""Serve a LUN over NBD (the Network Block Device protocol, fixed newstyle).

``nbd-client`` turns the export into /dev/nbdX where the kernel module exists;
libnbd's ``nbdinfo``/``nbdcopy``/``nbdfuse`` and ``qemu-img`` talk to it
directly. Implemented from the NBD protocol document (proto.md of the NBD
project): fixed-newstyle handshake with NO_ZEROES, options EXPORT_NAME, INFO,
GO, LIST, ABORT and STRUCTURED_REPLY; commands READ, WRITE (with FUA), FLUSH,
TRIM, WRITE_ZEROES, CACHE and DISC; block size constraints advertised with
NBD_INFO_BLOCK_SIZE; structured replies for reads and errors once negotiated.

Requests are served concurrently (the initiator keeps many SCSI commands in
flight); replies go out whole, in one write each, in completion order, as the
protocol allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
from collections.abc import Awaitable, Callable

from iscsi.pdu import Buffer

from .blockdev import BlockDevice
from .errors import InitiatorError
from .scsi import SCSICheckCondition, SCSIStatusError

log = logging.getLogger("initiator.nbd")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_SEND_CACHE = 1 << 10
# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
# Info types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3
# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
# Structured reply types / flags.
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) + 1

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCT = struct.Struct(">IHHQI")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

#: Largest request we accept (the protocol suggests 32 MiB as the common max).
MAX_REQUEST = 32 << 20
#: Largest option payload we read.
MAX_OPTION = 64 << 10


class NBDProtocolError(Exception):
    """The client broke the NBD protocol; the connection is dropped."""


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, PermissionError):
        return errno.EPERM
    if isinstance(exc, ValueError):
        return errno.EINVAL
    if isinstance(exc, SCSICheckCondition):
        # DATA PROTECT = write protected, ILLEGAL REQUEST = out of range etc.
        return {0x7: errno.EPERM, 0x5: errno.EINVAL, 0xD: errno.ENOSPC}.get(exc.key, errno.EIO)
    if isinstance(exc, SCSIStatusError | InitiatorError):
        return errno.EIO
    return errno.EIO


class NBDServer:
    """Serves one BlockDevice to any number of NBD clients."""

    def __init__(self, device: BlockDevice, *, name: str = "", description: str = "",
                 read_only: bool = False) -> None:
        self.device = device
        self.name = name
        self.description = description
        self.read_only = read_only
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def transmission_flags(self) -> int:
        """What this export supports (NBD transmission flags)."""
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_SEND_DF
        if self.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    async def start(self, listen: str) -> str:
        """Listen on ``unix:PATH`` or ``HOST:PORT``; returns the address as
        an NBD URI (``nbd+unix:///?socket=PATH`` or ``nbd://HOST:PORT``)."""
        if listen.startswith("unix:"):
            path = listen[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server = await asyncio.start_unix_server(self._client, path)
            return f"nbd+unix:///{self.name}?socket={path}"
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._server = await asyncio.start_server(self._client, host, int(port))
        sock = self._server.sockets[0]
        actual = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        return f"nbd://{shown}:{actual}/{self.name}"

    async def close(self) -> None:
        """Stop listening and drop every client."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            conn = _Conn(self, reader, writer)
            await conn.run()
        except (NBDProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("NBD client dropped: %s", exc or type(exc).__name__)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Conn:
    def __init__(self, server: NBDServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.dev = server.device
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.no_zeroes = False
        self.inflight: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ handshake

    async def run(self) -> None:
        self.writer.write(_U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT)
                          + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = _U32.unpack(await self.reader.readexactly(4))
        if not cflags & FLAG_FIXED_NEWSTYLE:
            raise NBDProtocolError("client does not speak fixed newstyle")
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        if await self._options():
            await self._transmission()

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.writer.write(_OPT_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    async def _options(self) -> bool:
        """Option haggling; True when transmission starts."""
        while True:
            magic, opt, length = _OPT_HDR.unpack(await self.reader.readexactly(16))
            if magic != IHAVEOPT:
                raise NBDProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise NBDProtocolError(f"option of {length} bytes")
            data = await self.reader.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.server.name:
                    # No error reply exists for EXPORT_NAME: close.
                    raise NBDProtocolError(f"unknown export {data!r}")
                tail = b"" if self.no_zeroes else bytes(124)
                self.writer.write(_U64.pack(self.dev.size)
                                  + _U16.pack(self.server.transmission_flags) + tail)
                return True
            if opt == OPT_ABORT:
                self._reply(opt, REP_ACK)
                await self.writer.drain()
                return False
            if opt == OPT_LIST:
                name = self.server.name.encode()
                self._reply(opt, REP_SERVER, _U32.pack(len(name)) + name)
                self._reply(opt, REP_ACK)
            elif opt == OPT_STRUCTURED_REPLY:
                if length:
                    self._reply(opt, REP_ERR_INVALID)
                else:
                    self.structured = True
                    self._reply(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._info(opt, data) and opt == OPT_GO:
                    await self.writer.drain()
                    return True
            else:
                self._reply(opt, REP_ERR_UNSUP)
            await self.writer.drain()

    def _info(self, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            self._reply(opt, REP_ERR_INVALID)
            return False
        (nlen,) = _U32.unpack_from(data)
        if 4 + nlen + 2 > len(data):
            self._reply(opt, REP_ERR_INVALID)
            return False
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        (nreq,) = _U16.unpack_from(data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            self._reply(opt, REP_ERR_INVALID)
            return False
        if name != self.server.name:
            self._reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return False
        bs = self.dev.block_size
        # Minimum 1: BlockDevice does read-modify-write for unaligned edges.
        self._reply(opt, REP_INFO, _U16.pack(INFO_EXPORT) + _U64.pack(self.dev.size)
                    + _U16.pack(self.server.transmission_flags))
        self._reply(opt, REP_INFO, _U16.pack(INFO_BLOCK_SIZE) + _U32.pack(1)
                    + _U32.pack(max(bs, 4096)) + _U32.pack(MAX_REQUEST))
        if self.server.description:
            self._reply(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION)
                        + self.server.description.encode())
        self._reply(opt, REP_ACK)
        return True

    # ---------------------------------------------------------- transmission

    async def _transmission(self) -> None:
        try:
            while True:
                hdr = await self.reader.readexactly(_REQUEST.size)
                magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(hdr)
                if magic != REQUEST_MAGIC:
                    raise NBDProtocolError(f"bad request magic {magic:#x}")
                if cmd == CMD_DISC:
                    break
                payload: bytes | None = None
                if cmd == CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise NBDProtocolError(f"write of {length} bytes")
                    payload = await self.reader.readexactly(length)
                task = asyncio.ensure_future(self._serve(flags, cmd, cookie, offset, length,
                                                         payload))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
        finally:
            # NBD_CMD_DISC: finish what is in flight, then flush (proto.md).
            if self.inflight:
                await asyncio.gather(*self.inflight, return_exceptions=True)
            with contextlib.suppress(InitiatorError):
                if not self.server.read_only:
                    await self.dev.flush()

    async def _serve(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                     payload: bytes | None) -> None:
        try:
            data = await self._execute(flags, cmd, offset, length, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes an NBD error reply
            log.info("NBD command %d at %d+%d failed: %s", cmd, offset, length, exc)
            self._error(cookie, _errno_of(exc), str(exc))
            return
        if data is None:
            self._done(cookie)
        elif self.structured:
            hdr = _STRUCT.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                               cookie, 8 + len(data)) + _U64.pack(offset)
            self.writer.writelines([hdr, data])
        else:
            self.writer.writelines([_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data])
        await self.writer.drain()

    async def _execute(self, flags: int, cmd: int, offset: int, length: int,
                       payload: bytes | None) -> Buffer | None:
        dev = self.dev
        if offset + length > dev.size:
            raise ValueError(f"request {offset}+{length} beyond the end ({dev.size})")
        writing = cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
        if writing and self.server.read_only:
            raise PermissionError("read-only export")
        fua = bool(flags & CMD_FLAG_FUA)
        if cmd == CMD_READ:
            if length > MAX_REQUEST:
                raise ValueError(f"read of {length} bytes")
            buf = bytearray(length)
            await dev.readinto(offset, buf)
            return buf
        if cmd == CMD_WRITE:
            assert payload is not None
            await dev.write(offset, payload, fua=fua)
        elif cmd == CMD_FLUSH:
            await dev.flush()
        elif cmd == CMD_TRIM:
            await dev.discard(offset, length)
            if fua:
                await dev.flush()
        elif cmd == CMD_WRITE_ZEROES:
            # NO_HOLE asks for allocated zeros; otherwise let a thin LU unmap.
            await dev.write_zeroes(offset, length,
                                   unmap=not flags & CMD_FLAG_NO_HOLE and dev.capacity.lbpme)
            if fua:
                await dev.flush()
        elif cmd == CMD_CACHE:
            pass  # a prefetch hint; the target's cache is not ours to fill
        else:
            raise ValueError(f"unknown NBD command {cmd}")
        return None

    def _done(self, cookie: int) -> None:
        if self.structured:
            self.writer.write(_STRUCT.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                           REPLY_TYPE_NONE, cookie, 0))
        else:
            self.writer.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def _error(self, cookie: int, code: int, message: str) -> None:
        if self.structured:
            msg = message.encode()[:4096]
            self.writer.write(_STRUCT.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                           REPLY_TYPE_ERROR, cookie, 6 + len(msg))
                              + _U32.pack(code) + _U16.pack(len(msg)) + msg)
        else:
            self.writer.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, code, cookie))


async def serve_until(device: BlockDevice, listen: str, stop: Awaitable[object], *,
                      name: str = "", read_only: bool = False,
                      ready: Callable[[str], None] | None = None) -> None:
    """Serve ``device`` on ``listen`` until ``stop`` completes, then close
    clients and flush (the CLI's ``attach``)."""
    server = NBDServer(device, name=name, read_only=read_only)
    uri = await server.start(listen)
    if ready is not None:
        ready(uri)
    try:
        await stop
    finally:
        await server.close()
        if not read_only:
            await device.flush()


__all__ = ["NBDServer", "NBDProtocolError", "serve_until"]
