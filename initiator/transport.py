"""The initiator's TCP connection: an ``asyncio.BufferedProtocol`` that
reads PDUs with :class:`iscsi.framing.PDUReader` (Data-In placed straight
into the caller's buffer through the owner's placement callback) and hands
them to its session; during login they queue for the login driver.
DESIGN.md: TCP_NODELAY, reading paused while the peer does not read ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Protocol, cast

from iscsi.errors import ProtocolError
from iscsi.framing import PDUReader
from iscsi.pdu import PDU, Buffer

log = logging.getLogger("initiator.session")


class ConnectionOwner(Protocol):
    """What a connection needs of its session."""

    @property
    def portal(self) -> str:
        """host:port, for log lines."""
        ...

    def placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """Where a PDU's data segment should land (Data-In into the
        caller's buffer), or None."""
        ...

    def deliver(self, conn: Connection, pdus: list[PDU]) -> None:
        """PDUs received in full feature phase."""
        ...

    def connection_failed(self, conn: Connection, exc: BaseException) -> None:
        """The connection broke (or its peer misbehaved)."""
        ...

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> bool:
        """A PDU failed to decode; True if the session recovered from it
        and the connection goes on (a data digest error at
        ErrorRecoveryLevel 1, RFC 7143 §7.8)."""
        ...

    def flush(self) -> None:
        """The transport can take more: write what is queued."""
        ...


class Connection(asyncio.BufferedProtocol):
    """One TCP connection; feeds received PDUs to its session."""

    def __init__(self, session: ConnectionOwner) -> None:
        self.session = session
        self.reader = PDUReader(placement=session.placement)
        self.transport: asyncio.Transport | None = None
        self.login_queue: asyncio.Queue[PDU | BaseException] = asyncio.Queue()
        self.logged_in = False
        self.closed = False
        self.write_paused = False
        #: The connection's CID in its session (RFC 7143 §11.12.7).
        self.cid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # DESIGN.md: a PDU split over two writes under Nagle ran at 23 ops/s.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._parse(lambda: self.reader.buffer_updated(nbytes))

    def resume_parsing(self) -> None:
        """Parse bytes that arrived behind the last Login Response (the
        reader stops there so digests can be switched first)."""
        self._parse(self.reader.parse)

    def _parse(self, step: Callable[[], list[PDU]]) -> None:
        again = False  # True once step is a plain re-parse of what is staged
        while True:
            try:
                pdus = step()
            except ProtocolError as exc:
                # A data digest error at ERL 1 leaves the stream in sync:
                # the session asks for the PDU again and parsing goes on.
                if self.logged_in and not self.closed and not exc.drop_connection and \
                        self.session.protocol_error(self, exc):
                    step, again = self.reader.parse, True
                    continue
                self._error(exc)
                return
            except Exception as exc:  # noqa: BLE001 - nothing may escape into the transport
                # Any error while reading (not only our ProtocolError) ends
                # this connection, never the event loop's "Fatal error on
                # transport".
                self._error(exc)
                return
            if not self.logged_in:
                for pdu in pdus:
                    self.login_queue.put_nowait(pdu)
                return
            if not pdus and again:
                return
            try:
                self.session.deliver(self, pdus)
            except Exception as exc:  # noqa: BLE001
                log.exception("error handling PDUs from %s", self.session.portal)
                self._error(exc)
                return
            if self.closed:
                return
            # A recoverable error behind these PDUs waits in the reader
            # (raised by the next parse): take it now, not at the next
            # receive -- nothing more may come until we ask again.
            step, again = self.reader.parse, True

    def _error(self, exc: BaseException) -> None:
        if not self.logged_in:
            self.login_queue.put_nowait(exc)
        self.session.connection_failed(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        # DESIGN.md: a peer that does not read must not grow our buffers.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self.session.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        err: BaseException = exc or ConnectionResetError("connection closed by the target")
        if not self.logged_in:
            self.login_queue.put_nowait(err)
        self.closed = True
        self.session.connection_failed(self, err)

    def send(self, buffers: list[Buffer]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(buffers)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
