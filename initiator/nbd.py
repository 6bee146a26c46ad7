"""Serve a LUN over NBD, the Network Block Device protocol (fixed newstyle).

``nbd-client`` turns the export into /dev/nbdX where the kernel module
exists; libnbd's ``nbdinfo``/``nbdcopy``/``nbdfuse`` and ``qemu-img``/``qemu-io``
talk to it directly. Written from the protocol document (doc/proto.md of the
NBD project, cited below as "proto.md §section"):

* Handshake: fixed newstyle with NO_ZEROES; options EXPORT_NAME, INFO, GO
  (NBD_INFO_EXPORT, _NAME, _DESCRIPTION, _BLOCK_SIZE), LIST, ABORT,
  STRUCTURED_REPLY, LIST_META_CONTEXT/SET_META_CONTEXT ("base:allocation");
  anything else gets NBD_REP_ERR_UNSUP.
* Transmission: READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES and
  BLOCK_STATUS; FUA is a flush after the command; structured replies
  (OFFSET_DATA, NONE, ERROR, BLOCK_STATUS) once negotiated, simple ones
  otherwise.

The data path follows DESIGN.md: an ``asyncio.BufferedProtocol`` reads
request headers into a small staging buffer and a WRITE payload straight into
its own buffer; requests run concurrently (the initiator keeps many SCSI
commands in flight) and replies go out in completion order, which proto.md
§Transmission allows, gathered into one ``writelines`` per loop iteration.
Reading stops while too many requests or bytes are in flight, or while the
client does not read our replies, so a client cannot grow our memory without
bound.

The exported device is anything with the :class:`~initiator.nbd_export.ExportDevice` shape; an
iSCSI :class:`~initiator.blockdev.BlockDevice` is adapted by
:class:`BlockDeviceExport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Self, cast

from .nbd_export import BlockDeviceExport, BlockStatusFn, ExportDevice
from .nbd_options import DONE, HANDSHAKE, OPTIONS, TRANSMISSION, OptionHaggling
from .nbd_proto import (  # the protocol values and layouts (proto.md)
    BytesLike, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE,
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_INFLIGHT,
    MAX_INFLIGHT_BYTES, MAX_OPTION, MAX_PAYLOAD, NBDMAGIC, NBD_EINVAL, REP_ERR_TOO_BIG,
    REQUEST_MAGIC, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_CACHE, TF_SEND_DF,
    TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, _STAGING, _pow2_or, block_status_reply, error_reply, nbd_errno, ok_reply, read_reply,
)
from iscsi.nbdproto import HELLO as _HELLO, OPT_HDR as _OPT_HDR, REQUEST as _REQUEST, U32 as _U32

if TYPE_CHECKING:
    from .blockdev import Device

log = logging.getLogger("initiator.nbd")


# ------------------------------------------------------------------ server


class NBDServer:
    """Serves one device as one export to any number of NBD clients.

    Use :func:`serve_nbd`, or construct and :meth:`start`. :meth:`close`
    stops listening, lets each connection finish the requests it has in
    flight, and closes it; :meth:`wait_closed` waits for that.
    """

    def __init__(self, device: ExportDevice, *, export_name: str = "",
                 description: str = "", read_only: bool | None = None,
                 max_payload: int = MAX_PAYLOAD) -> None:
        self.device = device
        self.export_name = export_name
        self.description = description
        self.read_only = device.read_only if read_only is None else read_only
        self.max_payload = max_payload
        bs = device.block_size
        # proto.md §Size constraints: powers of two, minimum <= 64 KiB,
        # preferred >= max(minimum, 512). A byte-addressed device could take
        # minimum 1, but the LU's block size is what avoids read-modify-write.
        self.minimum_block = _pow2_or(bs, 1, 1 << 16)
        self.preferred_block = max(_pow2_or(bs, 4096, max_payload), 4096, self.minimum_block)
        self.uri = ""
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: str | None = None
        self._unix_ino: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()
        self._closing = False

    @property
    def connections(self) -> int:
        """Number of open client connections."""
        return len(self._conns)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called (late arrivals are shut down)."""
        return self._closing

    def transmission_flags(self, structured: bool) -> int:
        """The export's NBD transmission flags (proto.md §Transmission flags)."""
        # CAN_MULTI_CONN: we keep no cache per connection and FLUSH flushes
        # the whole device, so a flush on one connection covers all of them.
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN
        if structured:
            flags |= TF_SEND_DF  # we always answer a read with one chunk
        if self.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    async def start(self, listen: str) -> str:
        """Listen on ``unix:PATH`` or ``HOST:PORT`` (port 0 picks one) and
        return the export's URI (``nbd+unix:///NAME?socket=PATH`` or
        ``nbd://HOST:PORT/NAME``), also kept in :attr:`uri`."""
        loop = asyncio.get_running_loop()
        name = self.export_name
        if listen.startswith("unix:"):
            path = listen[5:]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/lun.sock")
            with contextlib.suppress(FileNotFoundError):
                # Replace a stale socket, but never a file that is not one.
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            self._server = await loop.create_unix_server(self._new_connection, path)
            st = os.lstat(path)
            self._unix_path, self._unix_ino = path, (st.st_dev, st.st_ino)
            self.uri = f"nbd+unix:///{name}?socket={path}"
            return self.uri
        host, sep, port_text = listen.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{listen!r}: listen on unix:PATH or HOST:PORT")
        host = host.strip("[]") or "127.0.0.1"
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(host).is_loopback:
                log.warning("NBD has no authentication: %s exposes the LUN beyond "
                            "this host", listen)
        self._server = await loop.create_server(self._new_connection, host, int(port_text))
        port = self._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.uri = f"nbd://{shown}:{port}/{name}"
        return self.uri

    def _new_connection(self) -> _Connection:
        conn = _Connection(self)
        self._conns.add(conn)
        conn.finished.add_done_callback(lambda _f: self._conns.discard(conn))
        return conn

    def close(self) -> None:
        """Stop listening; connections finish their in-flight requests and
        close (proto.md §Terminating the transmission phase)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.shutdown()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self._unix_path)
            self._unix_path = None

    async def wait_closed(self) -> None:
        """Wait until every connection has finished and closed."""
        while self._conns:
            await asyncio.gather(*(c.finished for c in list(self._conns)),
                                 return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve_nbd(device: ExportDevice, listen: str, *, export_name: str = "",
                    description: str = "", read_only: bool | None = None,
                    ready: Callable[[str], object] | None = None) -> NBDServer:
    """Serve ``device`` on ``listen`` (``unix:PATH`` or ``HOST:PORT``);
    ``ready`` is called with the export's URI once it accepts clients."""
    server = NBDServer(device, export_name=export_name, description=description,
                       read_only=read_only)
    uri = await server.start(listen)
    if ready is not None:
        ready(uri)
    return server


async def serve_until(device: Device, listen: str, stop: Awaitable[object], *,
                      name: str = "", read_only: bool = False,
                      ready: Callable[[str], object] | None = None) -> None:
    """Serve an iSCSI BlockDevice until ``stop`` completes, then close the
    clients and flush (``iscsi-initiator attach --nbd``)."""
    export = BlockDeviceExport(device, read_only=read_only)
    server = await serve_nbd(export, listen, export_name=name, ready=ready)
    try:
        await stop
    finally:
        server.close()
        await server.wait_closed()
        if not read_only:
            await device.flush()


# -------------------------------------------------------------- connection


class _Connection(OptionHaggling, asyncio.BufferedProtocol):
    """One client: handshake, option haggling, then transmission."""

    server: NBDServer  # more than the ExportTerms the option phase needs

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.dev = server.device
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        # Receive side: headers land in a staging buffer; a WRITE payload
        # goes straight into its own bytearray (DESIGN.md: data path).
        self._buf = bytearray(_STAGING)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._payload: bytearray | None = None
        self._payload_fill = 0
        self._payload_req: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._sink = 0  # bytes still to discard (refused oversized payload)
        self._after_sink: Callable[[], None] | None = None
        # Negotiated state.
        self.no_zeroes = False
        self.structured = False
        self.meta_allocation = False
        self.block_size_agreed = False
        # In flight.
        self._inflight: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._inflight_bytes = 0
        self._dirty = False
        # Send side: replies finished in one loop iteration go out in one
        # writelines call.
        self._out: list[BytesLike] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._reading_paused = False
        self._shutting_down = False
        self._lost = False
        self._finishing = False

    # ---------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have
        # the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # DESIGN.md: never let Nagle hold a reply back.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # proto.md §Newstyle negotiation: "NBDMAGIC", "IHAVEOPT", handshake flags.
        self._send([_HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)])
        if self.server.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.state = DONE
        self._out.clear()
        self._maybe_finish()

    def pause_writing(self) -> None:
        # DESIGN.md flow control: a client that does not read its replies
        # stops being read.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self._process()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_fill:]
        if self._start == self._end or self.state == DONE:
            # (After DISC or a protocol error, late bytes are dropped.)
            self._start = self._end = 0
        elif self._start:
            # Keep the unparsed tail (a partial header, at most one option) at
            # the front so the staging buffer always has room.
            n = self._end - self._start
            self._buf[:n] = bytes(self._view[self._start : self._end])  # may overlap
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload is not None:
            self._payload_fill += nbytes
            if self._payload_fill == len(self._payload):
                self._payload_done()
        else:
            self._end += nbytes
        self._process()

    def eof_received(self) -> bool | None:
        return False  # close our side too; in-flight work still completes

    # ------------------------------------------------------------- parsing

    def _blocked(self) -> bool:
        return (self._write_paused or self._shutting_down
                or len(self._inflight) >= MAX_INFLIGHT
                or self._inflight_bytes >= MAX_INFLIGHT_BYTES)

    def _update_reading(self) -> None:
        if self.transport is None or self._lost:
            return
        want_pause = self._blocked() or self.state == DONE
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _process(self) -> None:
        """Consume as much staged input as the current state allows."""
        while self._payload is None and self.state != DONE and not self._blocked():
            avail = self._end - self._start
            if self._sink:
                n = min(avail, self._sink)
                self._start += n
                self._sink -= n
                if self._sink:
                    break
                after, self._after_sink = self._after_sink, None
                if after is not None:
                    after()
                continue
            if self.state == TRANSMISSION:
                if avail < _REQUEST.size:
                    break
                self._request()
            elif self.state == OPTIONS:
                if avail < _OPT_HDR.size:
                    break
                magic, opt, length = _OPT_HDR.unpack_from(self._buf, self._start)
                if magic != IHAVEOPT:
                    self._hard_disconnect(f"bad option magic {magic:#x}")
                    break
                if length > MAX_OPTION:
                    self._start += _OPT_HDR.size
                    self._sink = length
                    self._after_sink = functools.partial(
                        self._opt_reply, opt, REP_ERR_TOO_BIG, b"option data too large")
                    continue
                if avail < _OPT_HDR.size + length:
                    break
                begin = self._start + _OPT_HDR.size
                data = bytes(self._view[begin : begin + length])
                self._start = begin + length
                self._option(opt, data)
            elif self.state == HANDSHAKE:
                if avail < 4:
                    break
                (cflags,) = _U32.unpack_from(self._buf, self._start)
                self._start += 4
                if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    # proto.md §Client flags: unknown flags MUST drop the connection.
                    self._hard_disconnect(f"unknown client flags {cflags:#x}")
                    break
                # A client without FIXED_NEWSTYLE is honoured anyway (proto.md
                # allows it); it will only ever send NBD_OPT_EXPORT_NAME.
                self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
                self.state = OPTIONS
        self._update_reading()

    # --------------------------------------------------------- transmission

    def _request(self) -> None:
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._buf, self._start)
        self._start += _REQUEST.size
        if magic != REQUEST_MAGIC:
            # Without a valid header the stream cannot be resynchronised.
            self._hard_disconnect(f"bad request magic {magic:#x}")
            return
        if cmd == CMD_DISC:
            # proto.md: finish outstanding requests, then close; no reply.
            self.state = DONE
            self._maybe_finish()
            return
        if cmd != CMD_WRITE:
            self._dispatch(flags, cmd, cookie, offset, length, None)
            return
        if length > self.server.max_payload:
            # Skip the payload to stay in step, then refuse (proto.md §Size
            # constraints: clients MUST NOT exceed the maximum payload).
            self._sink = length
            self._after_sink = lambda: self._error(
                cookie, cmd, NBD_EINVAL,
                f"write of {length} bytes exceeds the maximum payload {self.server.max_payload}")
            return
        payload = bytearray(length)
        have = min(self._end - self._start, length)
        payload[:have] = self._view[self._start : self._start + have]
        self._start += have
        self._payload_req = (flags, cmd, cookie, offset, length)
        self._payload = payload
        self._payload_fill = have
        if have == length:
            self._payload_done()

    def _payload_done(self) -> None:
        payload, self._payload = self._payload, None
        flags, cmd, cookie, offset, _length = self._payload_req
        self._dispatch(flags, cmd, cookie, offset, len(payload or b""), payload)

    def _dispatch(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                  payload: bytearray | None) -> None:
        bad = self._check(flags, cmd, offset, length)
        if bad is not None:
            self._error(cookie, cmd, *bad)
            return
        if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            self._dirty = True
        cost = length if cmd in (CMD_READ, CMD_WRITE) else 0
        task = self.loop.create_task(self._execute(flags, cmd, cookie, offset, length, payload))
        self._inflight.add(task)
        self._inflight_bytes += cost
        if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            self._writes.add(task)
        task.add_done_callback(lambda t: self._task_done(t, cost))

    def _task_done(self, task: asyncio.Task[None], cost: int) -> None:
        self._inflight.discard(task)
        self._writes.discard(task)
        self._inflight_bytes -= cost
        self._update_reading()
        self._process()
        self._maybe_finish()

    async def _execute(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                       payload: bytearray | None) -> None:
        dev = self.dev
        try:
            if cmd == CMD_READ:
                data = await dev.read(offset, length) if length else b""
                if len(data) != length:
                    raise OSError(errno.EIO, f"device returned {len(data)} of {length} bytes")
                self._read_reply(cookie, offset, data)
                return
            if cmd == CMD_WRITE:
                assert payload is not None
                if length:
                    await dev.write(offset, payload)
            elif cmd == CMD_FLUSH:
                # proto.md §Ordering: writes already answered must be durable;
                # we also wait for writes received before this flush.
                if self._writes:
                    await asyncio.wait(list(self._writes))
                await dev.flush()
            elif cmd == CMD_TRIM:
                if length:
                    await dev.discard(offset, length)
            elif cmd == CMD_WRITE_ZEROES:
                if length:
                    await dev.write_zeroes(offset, length,
                                           may_trim=not flags & CMD_FLAG_NO_HOLE)
            elif cmd == CMD_BLOCK_STATUS:
                await self._block_status(flags, cookie, offset, length)
                return
            # CMD_CACHE: a prefetch hint; there is no cache of ours to fill.
            if flags & CMD_FLAG_FUA and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                # proto.md §Ordering: no reply to FUA before the data is durable.
                await dev.flush()
            self._ok(cookie)
        except Exception as exc:  # noqa: BLE001 -- every device failure becomes an NBD error
            code = nbd_errno(exc)
            log.info("NBD command %d at %d+%d failed (errno %d): %s", cmd, offset, length,
                     code, exc)
            self._error(cookie, cmd, code, str(exc) or type(exc).__name__)

    async def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        fn: BlockStatusFn | None = getattr(self.dev, "block_status", None)
        extents: Sequence[tuple[int, bool]] = (
            await fn(offset, length) if fn is not None else [(length, True)])
        self._send(block_status_reply(
            cookie, length, extents, req_one=bool(flags & CMD_FLAG_REQ_ONE),
            unmapped_reads_zero=bool(getattr(self.dev, "unmapped_reads_zero", False))))

    # -------------------------------------------------------------- replies

    def _read_reply(self, cookie: int, offset: int, data: BytesLike) -> None:
        self._send(read_reply(self.structured, cookie, offset, data))

    def _ok(self, cookie: int) -> None:
        self._send(ok_reply(self.structured, cookie))

    def _error(self, cookie: int, cmd: int, code: int, message: str) -> None:
        self._send(error_reply(self.structured, cookie, code, message))

    def _send(self, parts: list[BytesLike]) -> None:
        if self.transport is None or self._lost or self.transport.is_closing():
            return
        # Never queue empty buffers: CPython 3.12's sendmsg-based writelines
        # keeps a trailing empty one forever, so close() never completes.
        self._out.extend(p for p in parts if len(p))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    # ---------------------------------------------------------------- ending

    def _hard_disconnect(self, why: str | None) -> None:
        if why:
            log.info("NBD client dropped: %s", why)
        self.state = DONE
        self._payload = None
        self._sink = 0
        self._maybe_finish()

    def shutdown(self) -> None:
        """Server shutdown: stop reading; close once in-flight work is done."""
        self._shutting_down = True
        if self.state != TRANSMISSION:
            self.state = DONE  # nothing in flight during the handshake
        self._update_reading()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        ending = self.state == DONE or self._shutting_down
        if not ending or self._inflight or self._finishing:
            return
        self._finishing = True
        self.loop.create_task(self._finish())

    async def _finish(self) -> None:
        try:
            if self._dirty and not self.server.read_only:
                # Clients that disconnect without NBD_CMD_FLUSH still get their
                # completed writes made durable.
                try:
                    await self.dev.flush()
                except Exception as exc:  # noqa: BLE001 -- nobody is left to tell
                    log.warning("NBD: flush at disconnect failed: %s", exc)
            self._flush_out()
            if self.transport is not None and not self._lost:
                self.transport.close()
        finally:
            if not self.finished.done():
                self.finished.set_result(None)


__all__ = ["MAX_PAYLOAD", "BlockDeviceExport", "ExportDevice", "NBDServer", "nbd_errno",
           "serve_nbd", "serve_until"]
