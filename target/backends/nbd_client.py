"""An asyncio NBD client: fixed newstyle negotiation and transmission, as
doc/proto.md of the NBD project describes them ("proto.md §section").

What the target's NBD backend (:mod:`target.backends.nbd`) needs, no more:
``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_SET_META_CONTEXT`` for
``base:allocation``, ``NBD_OPT_GO`` with the block-size info; then READ,
WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE), BLOCK_STATUS
and DISC, any number in flight, matched to their replies by cookie. No
TLS (``nbds://`` is refused by the URI parser).

Everything the server sends is checked before it is trusted (magic,
cookie, chunk lengths within the request); a violation closes the
connection with :class:`NbdProtocolError` and fails what was in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from dataclasses import dataclass, field

from iscsi.nbdproto import (
    CHUNK,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    HELLO,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    META_BASE_ALLOCATION,
    NBDMAGIC,
    OPT_GO,
    OPT_HDR,
    OPT_REPLY,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
)

__all__ = ["NbdAddress", "NbdClient", "NbdError", "NbdProtocolError", "NbdServerError"]

Buffer = bytes | bytearray | memoryview

#: NBD_REPLY_TYPE_OFFSET_HOLE (proto.md §Structured reply types).
_REPLY_TYPE_OFFSET_HOLE = 2
#: Error chunk types have bit 15 set; ERROR_OFFSET adds an offset.
_REPLY_TYPE_ERROR_BIT = 1 << 15
#: A reply chunk bigger than this is refused (proto.md §Size constraints:
#: 32 MiB of data plus headers is what a sane peer sends).
_MAX_CHUNK = (32 << 20) + 4096
#: Option replies bigger than this are refused (strings are <= 4 KiB).
_MAX_OPT_REPLY = 64 << 10
_ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
                95: "ENOTSUP", 108: "ESHUTDOWN"}


class NbdError(Exception):
    """Base of the client's failures (one line a user can act on)."""


class NbdProtocolError(NbdError):
    """The server broke the protocol, or the connection is gone."""


class NbdServerError(NbdError):
    """The server answered a request with an error value (proto.md §Error values)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: TCP host and port, or a Unix socket, and its name."""

    export: str
    host: str = ""
    port: int = 10809
    socket: str = ""

    def __str__(self) -> str:
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


@dataclass
class _Pending:
    """One request awaiting its reply."""

    command: int
    offset: int
    length: int
    future: asyncio.Future[None]
    buf: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: NbdServerError | None = None


class NbdClient:
    """One connection to one export. Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 address: NbdAddress) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        #: Export size in bytes and transmission flags (proto.md §Transmission flags).
        self.size = 0
        self.flags = 0
        #: Block size constraints (proto.md §Block size constraints).
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = 32 << 20
        self.structured = False
        #: Context ID of base:allocation, or None when the server has none.
        self.allocation_context: int | None = None
        self._pending: dict[int, _Pending] = {}
        self._cookies = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._failure: NbdError | None = None

    # ------------------------------------------------------------ handshake

    @classmethod
    async def connect(cls, address: NbdAddress) -> NbdClient:
        """Open the connection and negotiate (proto.md §Fixed newstyle
        negotiation); raises OSError or NbdError."""
        if address.socket:
            reader, writer = await asyncio.open_unix_connection(address.socket)
        else:
            reader, writer = await asyncio.open_connection(address.host, address.port)
        client = cls(reader, writer, address)
        try:
            await client._negotiate()
        except BaseException:
            writer.close()
            raise
        client._reader_task = asyncio.get_running_loop().create_task(client._read_replies())
        return client

    async def _negotiate(self) -> None:
        try:
            magic, opt_magic, hflags = HELLO.unpack(await self._reader.readexactly(HELLO.size))
        except asyncio.IncompleteReadError:
            raise NbdProtocolError(f"{self.address}: the server closed the connection during "
                                   "the handshake") from None
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdProtocolError(f"{self.address}: not an NBD newstyle server "
                                   "(oldstyle servers are not supported)")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(f"{self.address}: the server does not speak fixed newstyle")
        cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if hflags & FLAG_NO_ZEROES else 0)
        self._writer.write(U32.pack(cflags))
        # proto.md §NBD_OPT_STRUCTURED_REPLY: needed for BLOCK_STATUS and
        # for reads with holes; a server that refuses it gets simple replies.
        replies = await self._option(OPT_STRUCTURED_REPLY, b"")
        self.structured = replies[-1][0] == REP_ACK
        name = self.address.export.encode()
        if self.structured:
            # proto.md §NBD_OPT_SET_META_CONTEXT: ask for base:allocation.
            q = META_BASE_ALLOCATION.encode()
            data = U32.pack(len(name)) + name + U32.pack(1) + U32.pack(len(q)) + q
            for rtype, payload in await self._option(OPT_SET_META_CONTEXT, data):
                if rtype == REP_META_CONTEXT and len(payload) >= 4 and \
                        payload[4:] == q:
                    self.allocation_context = U32.unpack_from(payload)[0]
        # proto.md §NBD_OPT_GO: export name, then the info requests
        # (INFO_BLOCK_SIZE tells the server we honour its constraints).
        data = U32.pack(len(name)) + name + U16.pack(1) + U16.pack(INFO_BLOCK_SIZE)
        got_export = False
        for rtype, payload in await self._option(OPT_GO, data):
            if rtype != REP_INFO or len(payload) < 2:
                continue
            itype = U16.unpack_from(payload)[0]
            if itype == INFO_EXPORT and len(payload) >= 12:
                self.size, self.flags = struct.unpack_from(">QH", payload, 2)
                got_export = True
            elif itype == INFO_BLOCK_SIZE and len(payload) >= 14:
                mn, pref, mx = struct.unpack_from(">III", payload, 2)
                if mn and pref and mx:
                    self.min_block, self.preferred_block, self.max_block = mn, pref, mx
        if not got_export:
            raise NbdProtocolError(f"{self.address}: the server sent no export size in NBD_OPT_GO")

    async def _option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option and collect its replies up to the final one
        (proto.md §Option reply). An error reply ends the list; for GO it
        is raised, for the optional options the caller sees it."""
        self._writer.write(OPT_HDR.pack(IHAVEOPT, option, len(data)) + data)
        await self._writer.drain()
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                head = await self._reader.readexactly(OPT_REPLY.size)
                magic, opt, rtype, length = OPT_REPLY.unpack(head)
                if magic != OPT_REPLY_MAGIC or opt != option or length > _MAX_OPT_REPLY:
                    raise NbdProtocolError(f"{self.address}: malformed option reply")
                payload = await self._reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise NbdProtocolError(f"{self.address}: the server closed the connection "
                                       "during negotiation") from None
            out.append((rtype, payload))
            if rtype & (1 << 31):
                if option == OPT_GO:
                    why = payload.decode("utf-8", "replace") or _rep_error(rtype)
                    raise NbdProtocolError(f"{self.address}: the server refused export "
                                           f"{self.address.export!r}: {why}")
                return out
            if rtype == REP_ACK:
                return out

    # --------------------------------------------------------- transmission

    @property
    def closed(self) -> bool:
        """True once the connection failed or was closed."""
        return self._failure is not None

    async def read(self, offset: int, length: int) -> bytearray:
        """NBD_CMD_READ (holes arrive as zeroes)."""
        p = await self._request(CMD_READ, 0, offset, length, None)
        assert p.buf is not None
        return p.buf

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """NBD_CMD_WRITE, durable before the reply with ``fua``."""
        await self._request(CMD_WRITE, CMD_FLAG_FUA if fua else 0, offset,
                            memoryview(data).nbytes, data)

    async def flush(self) -> None:
        """NBD_CMD_FLUSH: every completed write is durable."""
        await self._request(CMD_FLUSH, 0, 0, 0, None)

    async def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: the server may deallocate (contents unspecified)."""
        await self._request(CMD_TRIM, 0, offset, length, None)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool) -> None:
        """NBD_CMD_WRITE_ZEROES; ``no_hole`` keeps the range allocated."""
        await self._request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE if no_hole else 0,
                            offset, length, None)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """NBD_CMD_BLOCK_STATUS for base:allocation: ``(length, flags)``
        runs from ``offset``, possibly covering less than asked."""
        p = await self._request(CMD_BLOCK_STATUS, 0, offset, length, None)
        return p.extents

    async def close(self) -> None:
        """NBD_CMD_DISC (proto.md §Terminating the transmission phase), then
        close the socket. Idempotent."""
        if self._failure is None:
            try:
                self._writer.write(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                await asyncio.wait_for(self._writer.drain(), 2)
            except (OSError, asyncio.TimeoutError):
                pass
        self._fail(NbdProtocolError(f"{self.address}: connection closed"))
        self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _request(self, command: int, flags: int, offset: int, length: int,
                       data: Buffer | None) -> _Pending:
        if self._failure is not None:
            raise self._failure
        cookie = next(self._cookies)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        p = _Pending(command, offset, length, fut,
                     bytearray(length) if command == CMD_READ else None)
        self._pending[cookie] = p
        head = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._writer.writelines([head, data] if data is not None else [head])
        try:
            await self._writer.drain()
            await fut
        except OSError as exc:
            self._fail(NbdProtocolError(f"{self.address}: connection lost: {exc}"))
            raise self._failure from None  # type: ignore[misc]
        finally:
            self._pending.pop(cookie, None)
        if p.error is not None:
            raise p.error
        return p

    def _fail(self, exc: NbdError) -> None:
        if self._failure is None:
            self._failure = exc
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(self._failure)
        self._pending.clear()

    async def _read_replies(self) -> None:
        """Match each reply to its request until the connection ends."""
        try:
            while True:
                magic = U32.unpack(await self._reader.readexactly(4))[0]
                if magic == SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == STRUCTURED_REPLY_MAGIC and self.structured:
                    await self._chunk()
                else:
                    raise NbdProtocolError(f"{self.address}: bad reply magic {magic:#x}")
        except asyncio.IncompleteReadError:
            self._fail(NbdProtocolError(f"{self.address}: the server closed the connection"))
        except OSError as exc:
            self._fail(NbdProtocolError(f"{self.address}: connection lost: {exc}"))
        except NbdProtocolError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(NbdProtocolError(f"{self.address}: connection closed"))
            raise
        self._writer.close()

    def _take(self, cookie: int) -> _Pending:
        p = self._pending.get(cookie)
        if p is None:
            raise NbdProtocolError(f"{self.address}: reply for unknown cookie {cookie}")
        return p

    async def _simple_reply(self) -> None:
        # proto.md §Simple reply message: error, cookie, then a READ's data.
        err, cookie = struct.unpack(">IQ", await self._reader.readexactly(SIMPLE.size - 4))
        p = self._take(cookie)
        if self.structured and p.command == CMD_READ:
            # proto.md: with structured replies a READ MUST NOT get a simple
            # reply (its data could not be told from the next header).
            if not err:
                raise NbdProtocolError(f"{self.address}: simple reply to a structured READ")
        if err:
            p.error = _server_error(self.address, p, err, "")
        elif p.command == CMD_READ:
            assert p.buf is not None
            await self._readinto(memoryview(p.buf))
        self._done(cookie, p)

    async def _chunk(self) -> None:
        # proto.md §Structured reply chunk message.
        flags, rtype, cookie, length = struct.unpack(
            ">HHQI", await self._reader.readexactly(CHUNK.size - 4))
        if length > _MAX_CHUNK:
            raise NbdProtocolError(f"{self.address}: reply chunk of {length} bytes is too big")
        p = self._take(cookie)
        if rtype == REPLY_TYPE_OFFSET_DATA and p.command == CMD_READ and length >= 8:
            off = U64.unpack(await self._reader.readexactly(8))[0]
            n = length - 8
            rel = off - p.offset
            if rel < 0 or rel + n > p.length:
                raise NbdProtocolError(f"{self.address}: read data outside the request")
            assert p.buf is not None
            await self._readinto(memoryview(p.buf)[rel:rel + n])
        else:
            payload = await self._reader.readexactly(length)
            if rtype == _REPLY_TYPE_OFFSET_HOLE and p.command == CMD_READ and length == 12:
                off, n = struct.unpack(">QI", payload)
                if off < p.offset or off + n > p.offset + p.length:
                    raise NbdProtocolError(f"{self.address}: read hole outside the request")
                # The buffer starts zeroed: nothing to do.
            elif rtype == REPLY_TYPE_BLOCK_STATUS and p.command == CMD_BLOCK_STATUS:
                if length < 12 or (length - 4) % 8:
                    raise NbdProtocolError(f"{self.address}: malformed block status chunk")
                if U32.unpack_from(payload)[0] == self.allocation_context:
                    p.extents.extend(struct.iter_unpack(">II", payload[4:]))
            elif rtype & _REPLY_TYPE_ERROR_BIT:
                if length < 6:
                    raise NbdProtocolError(f"{self.address}: malformed error chunk")
                err, mlen = struct.unpack_from(">IH", payload)
                msg = payload[6:6 + mlen].decode("utf-8", "replace")
                p.error = _server_error(self.address, p, err or 5, msg)
            elif rtype != REPLY_TYPE_NONE:
                raise NbdProtocolError(f"{self.address}: unexpected reply chunk type {rtype}")
        if flags & REPLY_FLAG_DONE:
            self._done(cookie, p)

    async def _readinto(self, view: memoryview) -> None:
        # StreamReader has no readinto; reading in bounded pieces keeps
        # the copy count at one.
        pos = 0
        while pos < len(view):
            piece = await self._reader.readexactly(min(len(view) - pos, 1 << 20))
            view[pos:pos + len(piece)] = piece
            pos += len(piece)

    def _done(self, cookie: int, p: _Pending) -> None:
        self._pending.pop(cookie, None)
        if not p.future.done():
            p.future.set_result(None)


def _rep_error(rtype: int) -> str:
    names = {1: "not supported", 2: "forbidden by policy", 3: "invalid",
             5: "TLS required", 6: "no such export", 7: "server shutting down",
             8: "block size constraints", 9: "too big"}
    return names.get(rtype & 0xFFFF, f"error {rtype:#x}")


def _server_error(address: NbdAddress, p: _Pending, err: int, msg: str) -> NbdServerError:
    names = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim",
             CMD_WRITE_ZEROES: "write zeroes", CMD_BLOCK_STATUS: "block status"}
    what = names.get(p.command, f"command {p.command}")
    text = f"{address}: {what} of {p.length} bytes at {p.offset} failed: " \
           f"{_ERRNO_NAMES.get(err, f'error {err}')}" + (f" ({msg})" if msg else "")
    return NbdServerError(text, err)
