"""The initiator's session: an asyncio adapter around the sans-I/O core.

One :class:`Session` is one iSCSI session with one TCP connection (MC/S is not
used, like open-iscsi and libiscsi). It logs in, keeps the CmdSN window, moves
data, answers the target's NOP-Ins and pings it when idle, and -- the point of
an initiator that keeps a disk attached -- survives connection loss:

* on connection loss, a framing error, or a NOP timeout the session logs in
  again with the same ISID and TSIH 0, which reinstates it (RFC 7143 §6.3.5,
  ErrorRecoveryLevel 0 "session recovery", §7.1.4.3): the target discards the
  old session's tasks, and we reissue every command that had not completed,
  in the order it was first issued, after clearing unit attentions with TEST
  UNIT READY so that no old command can be retried after a newer one;
* while the session is down new commands wait; when the replacement timeout
  (default 120 s, like open-iscsi's ``replacement_timeout``) expires, every
  waiting command fails with :class:`SessionFailed`.

The data path follows DESIGN.md: ``asyncio.BufferedProtocol`` with
:class:`iscsi.framing.PDUReader`, Data-In received straight into the caller's
buffer through the reader's placement callback, Data-Out sent as memoryview
slices of the caller's buffer, and one ``transport.writelines`` per batch of
PDUs produced in one loop iteration. TCP_NODELAY is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from iscsi.constants import (
    RESERVED_TAG,
    AsyncEvent,
    ISCSIResponse,
    LoginStatus,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    RejectReason,
    TaskAttribute,
    TMFunction,
)
from iscsi.errors import ProtocolError
from iscsi.framing import PDUReader
from iscsi.keys import NegotiatedParams
from target.malloc import tune_malloc
from iscsi.pdu import (
    PDU,
    R2T,
    AsyncMessage,
    Buffer,
    DataIn,
    DataOut,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    encode_lun,
)
from iscsi.serial import sn_add, sn_gt, sn_le

from .errors import (
    ConnectionLost,
    InitiatorError,
    LoginFailed,
    LoginRefused,
    PortalUnreachable,
    SessionFailed,
    TargetProtocolError,
)
from .login import (
    DiscoveredTarget,
    LoginDriver,
    LoginRedirected,
    parse_send_targets,
    parse_target_address,
)

log = logging.getLogger("initiator.session")

_U32 = struct.Struct(">I")
_MASK32 = 0xFFFFFFFF
_OP_DATA_IN = int(Opcode.SCSI_DATA_IN)
_TUR = bytes(6)
# SAM-5 §5.3.1: CHECK CONDITION with UNIT ATTENTION (sense key 6).
_CHECK_CONDITION = 0x02
_UNIT_ATTENTION = 0x6

T = TypeVar("T")


@dataclass
class SessionOptions:
    """Everything configurable about a session (defaults follow open-iscsi).

    ``keys`` holds any further negotiable key in wire syntax and wins over
    the typed fields; ``header_digest``/``data_digest`` are offered lists
    such as ``"None,CRC32C"`` (we prefer no digest but accept one) or
    ``"CRC32C"`` (insist).
    """

    initiator_name: str | None = None
    initiator_alias: str | None = None
    #: One-way CHAP: the name and secret we prove ourselves with.
    chap_user: str | None = None
    chap_secret: str | None = None
    #: Mutual CHAP: the name and secret the target must prove.
    target_chap_user: str | None = None
    target_chap_secret: str | None = None
    #: CHAP_A values offered, in preference order (IANA: 5 MD5, 6 SHA-1,
    #: 7 SHA-256, 8 SHA3-256). MD5 only by default, like open-iscsi's
    #: ``chap_algs``: tgt 1.0.x accepts 7 but computes SHA-1 for it, so
    #: offering 7 first breaks CHAP against tgt.
    chap_algorithms: tuple[int, ...] = (5,)
    header_digest: str = "None,CRC32C"
    data_digest: str = "None,CRC32C"
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    keys: dict[str, str] = field(default_factory=dict)
    #: Seconds of receive silence before a NOP-Out ping; None disables pings.
    nop_interval: float | None = 5.0
    #: Seconds to wait for the ping's answer before declaring the connection dead.
    nop_timeout: float = 5.0
    #: Seconds a broken session may take to come back before commands fail.
    replacement_timeout: float = 120.0
    #: Seconds allowed for TCP connect (first connect: reported this fast).
    connect_timeout: float = 5.0
    #: Seconds allowed for a whole login exchange.
    login_timeout: float = 15.0
    #: The 48-bit ISID; a random one of type "random" (§11.12.5) if None.
    isid: int | None = None
    #: Upper bound on commands in flight besides the target's window.
    queue_depth: int = 128


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """How a SCSI command ended (status GOOD or not; checks are the caller's).

    ``data`` is the Data-In actually transferred (a view of the caller's
    buffer when one was given); ``residual`` is the residual count with
    ``underflow``/``overflow`` saying which (RFC 7143 §11.4.5).
    """

    status: int
    sense: bytes = b""
    data: memoryview | None = None
    residual: int = 0
    underflow: bool = False
    overflow: bool = False

    @property
    def good(self) -> bool:
        """True for status GOOD (or CONDITION MET)."""
        return self.status in (0x00, 0x04)


class _State(enum.Enum):
    NEW = "new"
    LOGGING_IN = "logging in"
    READY = "full feature phase"
    RECOVERING = "recovering"
    CLOSING = "logging out"
    CLOSED = "closed"
    FAILED = "failed"


class _Task:
    """One SCSI command from submission to status (reissued as a whole on
    session recovery)."""

    __slots__ = ("itt", "lun", "cdb", "attr", "data_out", "data_in", "in_len", "edtl",
                 "future", "seq", "cmdsn", "received", "error", "internal")

    def __init__(self, itt: int, lun: int, cdb: bytes, attr: int, data_out: memoryview | None,
                 data_in: memoryview | None, future: asyncio.Future[ScsiResult], seq: int,
                 internal: bool) -> None:
        self.itt = itt
        self.lun = lun
        self.cdb = cdb
        self.attr = attr
        self.data_out = data_out
        self.data_in = data_in
        self.in_len = data_in.nbytes if data_in is not None else 0
        self.edtl = data_out.nbytes if data_out is not None else self.in_len
        self.future = future
        self.seq = seq
        self.cmdsn = 0
        self.received = 0
        self.error: InitiatorError | None = None
        self.internal = internal


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection; feeds received PDUs to its session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reader = PDUReader(placement=session._placement)
        self.transport: asyncio.Transport | None = None
        self.login_queue: asyncio.Queue[PDU | BaseException] = asyncio.Queue()
        self.logged_in = False
        self.closed = False
        self.write_paused = False

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
        try:
            pdus = self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._error(exc)
            return
        self._deliver(pdus)

    def resume_parsing(self) -> None:
        """Parse bytes that arrived behind the last Login Response (the
        reader stops there so digests can be switched first)."""
        try:
            pdus = self.reader.parse()
        except ProtocolError as exc:
            self._error(exc)
            return
        self._deliver(pdus)

    def _deliver(self, pdus: list[PDU]) -> None:
        s = self.session
        s._last_rx = s._loop.time()
        if not self.logged_in:
            for pdu in pdus:
                self.login_queue.put_nowait(pdu)
            return
        s._in_rx = True
        try:
            for pdu in pdus:
                if self.closed:
                    break
                s._dispatch(pdu)
        except ProtocolError as exc:
            self._error(exc)
        finally:
            s._in_rx = False
            s._flush()

    def _error(self, exc: BaseException) -> None:
        if not self.logged_in:
            self.login_queue.put_nowait(exc)
        self.session._connection_failed(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        # DESIGN.md: a peer that does not read must not grow our buffers.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self.session._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        err: BaseException = exc or ConnectionResetError("connection closed by the target")
        if not self.logged_in:
            self.login_queue.put_nowait(err)
        self.closed = True
        self.session._connection_failed(self, err)

    def send(self, buffers: list[Buffer]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(buffers)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _random_isid() -> int:
    # §11.12.5 / RFC 3720 §10.12.5: T=01b "random"; 22 random bits in A/B/C.
    return (0x40 << 40) | int.from_bytes(os.urandom(5), "big")


class Session:
    """An iSCSI session to one target (or a discovery session).

    Create with :meth:`connect` (normal) or use :func:`discover`. The session
    is an async context manager; leaving it logs out.
    """

    def __init__(self, host: str, port: int = 3260, target_name: str | None = None,
                 options: SessionOptions | None = None, *, discovery: bool = False) -> None:
        self.host = host
        self.port = port
        self.target_name = target_name
        self.options = options or SessionOptions()
        self.discovery = discovery
        if not discovery and not target_name:
            raise ValueError("a normal session needs a target name")
        self.isid = self.options.isid if self.options.isid is not None else _random_isid()
        self.tsih = 0
        self.params = NegotiatedParams()
        self._loop = asyncio.get_running_loop()
        self._state = _State.NEW
        self._conn: _Connection | None = None
        self._cid = 0
        self._cmdsn = 1
        self._expcmdsn = 1
        self._maxcmdsn = 1
        self._exp_statsn = 0
        self._hd = False
        self._dd = False
        self._mxdsl = 8192
        self._next_itt = 1
        self._seq = 0
        self._tasks: dict[int, _Task] = {}
        self._queue: deque[_Task] = deque()
        self._urgent: deque[_Task] = deque()
        self._waiters: dict[int, asyncio.Future[PDU]] = {}
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._in_rx = False
        self._last_rx = self._loop.time()
        self._recovery: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._failure: InitiatorError | None = None
        self._luns_used: set[int] = set()
        self._retry_delay: float | None = None
        self._hold = False
        #: Called with each SCSI Async Event's sense data (AsyncEvent 0).
        self.on_async_event: Callable[[int, bytes], None] | None = None
        #: Number of times the session was re-established after a failure.
        self.recoveries = 0
        #: Number of the target's NOP-In pings we answered.
        self.target_pings = 0

    # ----------------------------------------------------------- lifecycle

    @classmethod
    async def connect(cls, host: str, port: int = 3260, target_name: str | None = None,
                      options: SessionOptions | None = None) -> Session:
        """Connect to ``host:port`` and log in to ``target_name``.

        Raises :class:`PortalUnreachable` within ``connect_timeout`` when the
        portal does not accept connections, :class:`LoginRefused` with the
        target's status, or :class:`LoginFailed`.
        """
        tune_malloc()  # Data-In buffers reused without page faults
        session = cls(host, port, target_name, options)
        await session._start()
        return session

    async def _start(self) -> None:
        try:
            await self._establish()
        except BaseException:
            self._state = _State.CLOSED
            raise
        if self.options.nop_interval and not self.discovery:
            self._keepalive = self._loop.create_task(self._keepalive_loop())

    @property
    def portal(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def state(self) -> str:
        """The session state in words (for logs and the CLI)."""
        return self._state.value

    @property
    def in_flight(self) -> int:
        """Commands sent and not yet completed."""
        return len(self._tasks)

    async def _establish(self) -> None:
        """Connect and log in (first time or reinstatement, same ISID),
        following up to four login redirections (status class 1, §11.13.5)."""
        host, port = self.host, self.port
        for _ in range(5):
            try:
                await self._establish_at(host, port)
                return
            except LoginRedirected as exc:
                moved = parse_target_address(exc.address, self.port)
                log.info("target %s redirects us to %s", self.portal, moved)
                host, port = moved.host, moved.port
        raise LoginFailed(f"too many login redirections from {self.portal}")

    async def _establish_at(self, host: str, port: int) -> None:
        self._state = _State.LOGGING_IN
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            _transport, conn = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Connection(self), host, port),
                self.options.connect_timeout)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.options.connect_timeout:g} s"
            elif exc.errno:
                reason = os.strerror(exc.errno).lower()
            else:
                reason = exc.strerror or str(exc)
            raise PortalUnreachable(f"cannot connect to portal {where}: {reason}") from exc
        self._conn = conn
        try:
            await asyncio.wait_for(self._login(conn), self.options.login_timeout)
        except TimeoutError:
            conn.abort()
            raise LoginFailed(f"login to {where} timed out after "
                              f"{self.options.login_timeout:g} s") from None
        except BaseException:
            conn.abort()
            if self._conn is conn:
                self._conn = None
            raise
        if self._conn is not conn:
            raise ConnectionLost(f"connection to {where} lost during login")
        self._state = _State.READY
        # Hold the ordinary queue until unit attentions are consumed.
        self._hold = bool(self._luns_used) and not self.discovery
        conn.logged_in = True
        conn.resume_parsing()
        if self._conn is not conn:
            raise ConnectionLost(f"connection to {where} lost right after login")
        if self._hold:
            await self._clear_unit_attentions()
            self._hold = False
        self._pump()

    async def _login(self, conn: _Connection) -> None:
        driver = LoginDriver(self, conn)
        result = await driver.run()
        self.params = result.params
        self.tsih = result.tsih
        p = self.params
        self._hd, self._dd = p.header_digest, p.data_digest
        self._mxdsl = p.max_xmit_data_segment_length
        conn.reader.header_digest = p.header_digest
        conn.reader.data_digest = p.data_digest
        conn.reader.max_data_segment_length = p.max_recv_data_segment_length
        self._cmdsn = result.cmdsn
        self._expcmdsn = result.expcmdsn
        self._maxcmdsn = result.maxcmdsn
        self._exp_statsn = result.exp_statsn
        log.info("logged in to %s at %s (TSIH %d): %s", self.target_name or "discovery",
                 self.portal, self.tsih, p)

    async def _clear_unit_attentions(self) -> None:
        """After reinstatement the target reports I_T nexus loss / reset as a
        UNIT ATTENTION to the next command of each LU (SAM-5 §6.2). Consume it
        with TEST UNIT READY before reissuing, so a reissued write is never
        refused (and retried later, after a newer one) because of it."""
        for lun in sorted(self._luns_used):
            for _ in range(8):
                result = await self._submit(lun, _TUR, None, None, TaskAttribute.SIMPLE,
                                            internal=True)
                if not (result.status == _CHECK_CONDITION and len(result.sense) > 2
                        and result.sense[2] & 0x0F == _UNIT_ATTENTION):
                    break

    async def logout(self) -> None:
        """Log out (close the session, §11.14) and close the connection.

        Commands still queued or in flight fail with :class:`SessionFailed`.
        """
        if self._state in (_State.CLOSED, _State.FAILED):
            return
        was_ready = self._state is _State.READY
        self._state = _State.CLOSING
        self._stop_background()
        conn = self._conn
        if was_ready and conn is not None:
            itt = self._alloc_itt()
            fut: asyncio.Future[PDU] = self._loop.create_future()
            self._waiters[itt] = fut
            self._send([LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=itt, cid=self._cid,
                                      cmdsn=self._cmdsn, expstatsn=self._exp_statsn,
                                      immediate=True)])
            self._flush()
            try:
                rsp = await asyncio.wait_for(fut, 5.0)
                if isinstance(rsp, LogoutResponse) and rsp.response != LogoutResponseCode.SUCCESS:
                    log.warning("logout answered with response %d", rsp.response)
            except (TimeoutError, InitiatorError):
                log.warning("no logout response from %s; closing anyway", self.portal)
            finally:
                self._waiters.pop(itt, None)
        self._finish(SessionFailed("session logged out"), _State.CLOSED)

    async def close(self) -> None:
        """Log out if possible, then release everything."""
        await self.logout()

    def abort(self) -> None:
        """Drop the connection and fail everything without logging out."""
        self._stop_background()
        self._finish(SessionFailed("session aborted"), _State.CLOSED)

    def _stop_background(self) -> None:
        for task in (self._keepalive, self._recovery):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._keepalive = self._recovery = None

    def _finish(self, error: InitiatorError, state: _State) -> None:
        self._state = state
        self._failure = error
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        tasks = list(self._tasks.values()) + list(self._urgent) + list(self._queue)
        self._tasks.clear()
        self._urgent.clear()
        self._queue.clear()
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(error)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.logout()

    # ------------------------------------------------------------ commands

    async def execute(self, lun: int, cdb: bytes, *, data_out: Buffer | None = None,
                      data_in: Buffer | int | None = None,
                      attr: int = TaskAttribute.SIMPLE) -> ScsiResult:
        """Run one SCSI command and return its status.

        ``data_out`` is sent (never copied) for a write; ``data_in`` is a
        writable buffer that Data-In lands in directly, or a byte count for
        which a buffer is allocated. Bidirectional commands are not supported.
        The buffers must stay untouched until the command completes.
        """
        out_view = memoryview(data_out).cast("B") if data_out is not None else None
        in_view: memoryview | None = None
        if isinstance(data_in, int):
            in_view = memoryview(bytearray(data_in)) if data_in else None
        elif data_in is not None:
            in_view = memoryview(data_in).cast("B")
            if in_view.readonly:
                raise ValueError("data_in buffer is read-only")
        if out_view is not None and in_view is not None:
            raise ValueError("bidirectional commands are not supported")
        return await self._submit(lun, bytes(cdb), out_view, in_view, attr)

    def _submit(self, lun: int, cdb: bytes, data_out: memoryview | None,
                data_in: memoryview | None, attr: int, *,
                internal: bool = False) -> asyncio.Future[ScsiResult]:
        if self._state in (_State.CLOSED, _State.FAILED, _State.CLOSING):
            raise self._failure or SessionFailed("session is closed")
        if self.discovery:
            raise InitiatorError("a discovery session cannot run SCSI commands")
        fut: asyncio.Future[ScsiResult] = self._loop.create_future()
        self._seq += 1
        task = _Task(RESERVED_TAG, encode_lun(lun), cdb, attr, data_out, data_in, fut,
                     self._seq, internal)
        self._luns_used.add(lun)
        (self._urgent if internal else self._queue).append(task)
        self._pump()
        return fut

    def _alloc_itt(self) -> int:
        itt = self._next_itt
        while itt == RESERVED_TAG or itt in self._tasks or itt in self._waiters:
            itt = (itt + 1) & _MASK32
        self._next_itt = (itt + 1) & _MASK32
        return itt

    # ----------------------------------------------------------- sending

    def _send(self, pdus: list[PDU]) -> None:
        out = self._out
        for pdu in pdus:
            out.extend(pdu.encode(self._hd, self._dd))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._in_rx and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            out, self._out = self._out, []
            if self._conn is not None:
                self._conn.send(out)

    def _pump(self) -> None:
        """Send queued commands while the CmdSN window (§4.2.2.1) allows."""
        conn = self._conn
        if conn is None or not conn.logged_in or conn.write_paused:
            return
        if self._state is not _State.READY and not self._urgent:
            return
        limit = self.options.queue_depth
        sent = False
        for queue in (self._urgent, self._queue):
            if queue is self._queue and (self._state is not _State.READY or self._hold):
                break
            while queue and sn_le(self._cmdsn, self._maxcmdsn) and len(self._tasks) < limit:
                task = queue.popleft()
                if task.future.done():
                    continue
                self._issue(task)
                sent = True
        if sent:
            self._schedule_flush()

    def _issue(self, task: _Task) -> None:
        p = self.params
        # Tags are per issue: a command reissued after recovery gets a fresh
        # one, and a queued command never holds a tag another may take.
        task.itt = self._alloc_itt()
        task.cmdsn = self._cmdsn
        self._cmdsn = sn_add(self._cmdsn, 1)
        task.received = 0
        edtl = task.edtl
        data_out = task.data_out
        imm = unsol = 0
        if data_out is not None and edtl:
            # §13.10/§13.11/§13.14: immediate data up to FirstBurstLength in
            # the command PDU, and with InitialR2T=No unsolicited Data-Out up
            # to FirstBurstLength in all.
            if p.immediate_data:
                imm = min(edtl, p.first_burst_length, self._mxdsl)
            unsol = imm if p.initial_r2t else min(edtl, p.first_burst_length)
        self._tasks[task.itt] = task
        out = self._out
        out.extend(ScsiCommand(
            itt=task.itt, lun=task.lun, cdb=task.cdb, expected_data_transfer_length=edtl,
            cmdsn=task.cmdsn, expstatsn=self._exp_statsn, read=task.data_in is not None,
            write=data_out is not None, final=unsol == imm, attr=task.attr,
            data=data_out[:imm] if imm and data_out is not None else b"",
        ).encode(self._hd, self._dd))
        if unsol > imm:
            self._emit_data(task, RESERVED_TAG, imm, unsol)

    def _emit_data(self, task: _Task, ttt: int, start: int, end: int) -> None:
        """Data-Out PDUs for [start, end) of the task's buffer, each at most
        the target's MaxRecvDataSegmentLength (§13.12), DataSN from 0 per
        sequence (§11.7.5), F on the last (§11.7.1)."""
        data = task.data_out
        assert data is not None
        out = self._out
        step = self._mxdsl
        datasn = 0
        hd, dd = self._hd, self._dd
        for off in range(start, end, step):
            stop = min(off + step, end)
            out.extend(DataOut(final=stop == end, lun=task.lun, itt=task.itt, ttt=ttt,
                               expstatsn=self._exp_statsn, datasn=datasn, buffer_offset=off,
                               data=data[off:stop]).encode(hd, dd))
            datasn += 1

    # --------------------------------------------------------- receiving

    def _placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """PDUReader hook: where a Data-In payload goes -- straight into the
        command's buffer at its Buffer Offset (§11.7.6)."""
        if hdr[0] & 0x3F != _OP_DATA_IN:
            return None
        task = self._tasks.get(_U32.unpack_from(hdr, 16)[0])
        if task is None or task.data_in is None or task.future.done():
            # A cancelled command's buffer is the caller's again: let the
            # reader allocate and the payload be dropped.
            return None
        off = _U32.unpack_from(hdr, 40)[0]
        if off + dlen > task.in_len:
            return None
        return task.data_in[off : off + dlen]

    def _window(self, expcmdsn: int, maxcmdsn: int) -> None:
        # §4.2.2.1: ignore a window with MaxCmdSN < ExpCmdSN - 1; only ever
        # move ExpCmdSN and MaxCmdSN forward.
        if sn_gt(expcmdsn, sn_add(maxcmdsn, 1)):
            return
        if sn_gt(expcmdsn, self._expcmdsn):
            self._expcmdsn = expcmdsn
        if sn_gt(maxcmdsn, self._maxcmdsn):
            self._maxcmdsn = maxcmdsn
            self._pump()

    def _status_seen(self, statsn: int) -> None:
        nxt = sn_add(statsn, 1)
        if sn_gt(nxt, self._exp_statsn):
            self._exp_statsn = nxt

    def _dispatch(self, pdu: PDU) -> None:
        if isinstance(pdu, DataIn):
            self._on_data_in(pdu)
        elif isinstance(pdu, ScsiResponse):
            self._on_response(pdu)
        elif isinstance(pdu, R2T):
            self._on_r2t(pdu)
        elif isinstance(pdu, NopIn):
            self._on_nop_in(pdu)
        elif isinstance(pdu, (TextResponse, LogoutResponse, TaskMgmtResponse)):
            self._status_seen(pdu.statsn)
            self._window(pdu.expcmdsn, pdu.maxcmdsn)
            fut = self._waiters.pop(pdu.itt, None)
            if fut is not None and not fut.done():
                fut.set_result(pdu)
        elif isinstance(pdu, AsyncMessage):
            self._on_async(pdu)
        elif isinstance(pdu, Reject):
            self._on_reject(pdu)
        else:
            raise TargetProtocolError(f"unexpected {type(pdu).__name__} in full feature phase")

    def _on_data_in(self, pdu: DataIn) -> None:
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        task = self._tasks.get(pdu.itt)
        if task is None:
            log.debug("Data-In for unknown ITT 0x%08x", pdu.itt)
            return
        dlen = len(pdu.data) if not isinstance(pdu.data, memoryview) else pdu.data.nbytes
        if dlen:
            end = pdu.buffer_offset + dlen
            if task.data_in is None or end > task.in_len:
                if not task.future.done() and task.error is None:
                    task.error = TargetProtocolError(
                        f"target sent Data-In beyond the expected length {task.in_len}")
            elif end > task.received:
                task.received = end
        if pdu.status_present:
            self._status_seen(pdu.statsn)
            self._complete(task, pdu.status, b"", pdu.residual_count,
                           pdu.residual_underflow, pdu.residual_overflow)

    def _on_response(self, pdu: ScsiResponse) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        task = self._tasks.get(pdu.itt)
        if task is None:
            log.debug("SCSI Response for unknown ITT 0x%08x", pdu.itt)
            return
        if pdu.response != ISCSIResponse.COMMAND_COMPLETED:
            task.error = TargetProtocolError(
                f"target failure (iSCSI response 0x{pdu.response:02x}) for CDB "
                f"0x{task.cdb[0]:02x}", hint="check the target's logs")
        self._complete(task, pdu.status, pdu.sense, pdu.residual_count,
                       pdu.residual_underflow, pdu.residual_overflow)

    def _complete(self, task: _Task, status: int, sense: bytes, residual: int,
                  underflow: bool, overflow: bool) -> None:
        del self._tasks[task.itt]
        fut = task.future
        if not fut.done():
            if task.error is not None:
                fut.set_exception(task.error)
            else:
                data: memoryview | None = None
                if task.data_in is not None:
                    n = task.in_len - residual if underflow else task.in_len
                    data = task.data_in[: max(0, min(n, task.in_len))]
                fut.set_result(ScsiResult(status, sense, data, residual, underflow, overflow))
        self._pump()

    def _on_r2t(self, pdu: R2T) -> None:
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        task = self._tasks.get(pdu.itt)
        if task is None:
            log.debug("R2T for unknown ITT 0x%08x", pdu.itt)
            return
        start, length = pdu.buffer_offset, pdu.desired_data_transfer_length
        if task.data_out is None or start + length > task.edtl:
            raise TargetProtocolError(
                f"R2T asks for bytes {start}..{start + length} of a {task.edtl}-byte write")
        if length > self.params.max_burst_length:
            # §11.8.4: Desired Data Transfer Length must not exceed MaxBurstLength.
            raise TargetProtocolError(
                f"R2T asks for {length} bytes, over MaxBurstLength {self.params.max_burst_length}")
        self._emit_data(task, pdu.ttt, start, start + length)

    def _on_nop_in(self, pdu: NopIn) -> None:
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        if pdu.itt != RESERVED_TAG:
            # The answer to our ping: it carries a StatSN (§11.19.2).
            self._status_seen(pdu.statsn)
            fut = self._waiters.pop(pdu.itt, None)
            if fut is not None and not fut.done():
                fut.set_result(pdu)
        if pdu.ttt != RESERVED_TAG:
            # §11.18.1: the target's ping; answer with its TTT and data,
            # ITT reserved, immediate, CmdSN not advanced.
            self.target_pings += 1
            self._send([NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self._cmdsn,
                               expstatsn=self._exp_statsn, immediate=True, data=bytes(pdu.data))])

    def _on_async(self, pdu: AsyncMessage) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        event = pdu.async_event
        if event == AsyncEvent.SCSI_ASYNC_EVENT:
            sense = bytes(pdu.data[2:]) if len(pdu.data) >= 2 else b""
            log.info("SCSI asynchronous event from %s", self.portal)
            if self.on_async_event is not None:
                self.on_async_event(pdu.lun, sense)
        elif event == AsyncEvent.LOGOUT_REQUEST:
            # §11.9.1: the target wants us gone within Parameter3 seconds.
            # We log the connection out and reinstate the session at once,
            # reissuing what was in flight (an orderly "recovery").
            log.info("target %s requests logout; reconnecting", self.portal)
            self._loop.create_task(self._logout_and_reconnect())
        elif event in (AsyncEvent.CONNECTION_DROP, AsyncEvent.SESSION_DROP):
            # Parameter2 is Time2Wait: do not reconnect sooner (§11.9.1).
            log.info("target %s drops the %s", self.portal,
                     "connection" if event == AsyncEvent.CONNECTION_DROP else "session")
            self._retry_delay = float(pdu.parameter2)
            if self._conn is not None:
                self._connection_failed(self._conn, ConnectionResetError(
                    "target announced it drops the connection"))
        elif event == AsyncEvent.NEGOTIATION_REQUEST:
            # We have nothing to renegotiate; an empty Text exchange would do,
            # but the target may equally live with our current values.
            log.info("target %s requests renegotiation; keeping current values", self.portal)
        else:
            log.info("asynchronous event %d from %s ignored", event, self.portal)

    async def _logout_and_reconnect(self) -> None:
        conn = self._conn
        if conn is None or self._state is not _State.READY:
            return
        itt = self._alloc_itt()
        fut: asyncio.Future[PDU] = self._loop.create_future()
        self._waiters[itt] = fut
        self._send([LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=itt, cid=self._cid,
                                  cmdsn=self._cmdsn, expstatsn=self._exp_statsn, immediate=True)])
        with contextlib.suppress(TimeoutError, InitiatorError):
            await asyncio.wait_for(fut, 5.0)
        self._waiters.pop(itt, None)
        if self._conn is conn:
            self._connection_failed(conn, ConnectionResetError("logged out at the target's request"))

    def _on_reject(self, pdu: Reject) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu.expcmdsn, pdu.maxcmdsn)
        try:
            reason = RejectReason(pdu.reason).name.lower().replace("_", " ")
        except ValueError:
            reason = f"reason 0x{pdu.reason:02x}"
        itt = pdu.rejected_itt
        err = TargetProtocolError(f"target rejected a PDU: {reason}")
        if itt is not None:
            task = self._tasks.get(itt)
            if task is not None and pdu.rejected_opcode == Opcode.SCSI_COMMAND:
                # §7.4.1 (ERL 0): a rejected command will not get a response.
                self._complete_error(task, err)
                return
            fut = self._waiters.pop(itt, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)
                return
        if pdu.reason == RejectReason.DATA_DIGEST_ERROR:
            # ERL 0 cannot resend the data: recover the session (§7.8).
            if self._conn is not None:
                self._connection_failed(self._conn, err)
            return
        log.warning("%s", err)

    def _complete_error(self, task: _Task, err: InitiatorError) -> None:
        self._tasks.pop(task.itt, None)
        if not task.future.done():
            task.future.set_exception(err)
        self._pump()

    # --------------------------------------------------- other exchanges

    async def _exchange(self, build: Callable[[int], PDU], timeout: float = 30.0) -> PDU:
        if self._state is not _State.READY:
            raise self._failure or SessionFailed(f"session is {self._state.value}")
        itt = self._alloc_itt()
        fut: asyncio.Future[PDU] = self._loop.create_future()
        self._waiters[itt] = fut
        self._send([build(itt)])
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(itt, None)

    async def ping(self, data: bytes = b"", timeout: float = 30.0) -> float:
        """Send a NOP-Out ping (§11.18) and return the round trip in seconds."""
        start = self._loop.time()

        def build(itt: int) -> PDU:
            return NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=self._cmdsn,
                          expstatsn=self._exp_statsn, immediate=True, data=data)

        rsp = await self._exchange(build, timeout)
        if bytes(rsp.data) != data:
            raise TargetProtocolError("NOP-In did not echo the ping data (§11.19)")
        return self._loop.time() - start

    async def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """A Text Request/Response exchange (§11.10), following continuations."""
        from iscsi.text import TextAssembler, decode_text, encode_text, split_text

        segments = split_text(encode_text(pairs), self._mxdsl)
        assembler = TextAssembler()
        ttt = RESERVED_TAG
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            rsp = await self._text_pdu(seg, final=last, ttt=ttt)
            ttt = rsp.ttt
        while True:
            whole = assembler.feed(rsp.data, rsp.cont)
            if whole is not None:
                if not rsp.final:
                    raise TargetProtocolError("Text Response without F or C bit")
                return decode_text(whole)
            # §11.11.4: ask for the rest with an empty request carrying its TTT.
            rsp = await self._text_pdu(b"", final=True, ttt=rsp.ttt)

    async def _text_pdu(self, data: bytes, *, final: bool, ttt: int) -> TextResponse:
        cmdsn = self._cmdsn

        def build(itt: int) -> PDU:
            self._cmdsn = sn_add(cmdsn, 1)
            return TextRequest(final=final, cont=not final, itt=itt, ttt=ttt, cmdsn=cmdsn,
                               expstatsn=self._exp_statsn, data=data)

        rsp = await self._exchange(build)
        if not isinstance(rsp, TextResponse):
            raise TargetProtocolError(f"expected a Text Response, got {type(rsp).__name__}")
        return rsp

    async def send_targets(self, which: str = "All") -> list[DiscoveredTarget]:
        """SendTargets (RFC 7143 Appendix C): the targets and their portals."""
        pairs = await self.text([("SendTargets", which)])
        return parse_send_targets(pairs, default_host=self.host, default_port=self.port)

    async def task_management(self, function: TMFunction, lun: int = 0,
                              referenced_itt: int = RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5); return the
        response code (iscsi.constants.TMResponse)."""
        cmdsn = self._cmdsn
        rsp = await self._exchange(lambda itt: TaskMgmtRequest(
            function=function, lun=encode_lun(lun), itt=itt, referenced_task_tag=referenced_itt,
            cmdsn=cmdsn, expstatsn=self._exp_statsn, immediate=True))
        assert isinstance(rsp, TaskMgmtResponse)
        return rsp.response

    # ----------------------------------------------------------- recovery

    def _connection_failed(self, conn: _Connection, exc: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        conn.abort()
        self._out.clear()
        if self._state is not _State.READY:
            # During login _establish sees the failure through the login
            # queue; while closing there is nothing to recover.
            return
        log.warning("connection to %s failed (%s); recovering", self.portal, _describe(exc))
        self._state = _State.RECOVERING
        self._hold = False
        lost = ConnectionLost(f"connection to {self.portal} lost")
        inflight = sorted(self._tasks.values(), key=lambda t: t.seq)
        self._tasks.clear()
        # Internal commands (unit attention clearing) belong to the attempt
        # that just failed; it is retried as a whole.
        internal = [t for t in inflight if t.internal] + list(self._urgent)
        self._urgent.clear()
        for task in internal:
            if not task.future.done():
                task.future.set_exception(lost)
        # ERL 0 session recovery (§7.1.4.3): reissue what had not completed,
        # in the order it was first issued, ahead of commands not yet sent.
        for task in reversed(inflight):
            if not task.internal and not task.future.done():
                task.error = None
                self._queue.appendleft(task)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(lost)
        self._waiters.clear()
        if self.discovery:
            self._finish(SessionFailed(f"connection to {self.portal} lost"), _State.FAILED)
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = self._loop.create_task(self._recover(exc))

    async def _recover(self, cause: BaseException) -> None:
        opts = self.options
        deadline = self._loop.time() + opts.replacement_timeout
        # Time2Wait from an Async Message, else retry at once and back off.
        wait = self._retry_delay if self._retry_delay is not None else 0.0
        self._retry_delay = None
        delay = 0.05
        last: BaseException = cause
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            if wait > 0:
                await asyncio.sleep(min(wait, remaining))
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
            try:
                await asyncio.wait_for(self._establish(), remaining)
            except (InitiatorError, OSError, ProtocolError, TimeoutError) as exc:
                last = exc
                log.info("reconnect to %s failed: %s", self.portal, exc)
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.abort()
                self._state = _State.RECOVERING
                self._hold = False
                wait, delay = delay, min(delay * 2, 1.0)
                continue
            self.recoveries += 1
            log.info("session to %s recovered", self.portal)
            self._recovery = None
            return
        self._recovery = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._finish(SessionFailed(
            f"connection to {self.portal} lost ({_describe(cause)}) and not restored within "
            f"the replacement timeout of {opts.replacement_timeout:g} s (last: {_describe(last)})"),
            _State.FAILED)

    async def _keepalive_loop(self) -> None:
        """NOP-Out pings after ``nop_interval`` seconds of silence; no answer
        (and no other traffic) within ``nop_timeout`` means a dead connection."""
        interval = self.options.nop_interval
        assert interval
        while True:
            idle_until = self._last_rx + interval
            now = self._loop.time()
            if now < idle_until:
                await asyncio.sleep(idle_until - now)
                continue
            conn = self._conn
            if self._state is not _State.READY or conn is None:
                await asyncio.sleep(interval)
                continue
            sent_at = now
            try:
                await self.ping(timeout=self.options.nop_timeout)
            except TimeoutError:
                if conn is self._conn and self._last_rx <= sent_at:
                    self._connection_failed(conn, TimeoutError(
                        f"no NOP-In within {self.options.nop_timeout:g} s"))
            except InitiatorError:
                pass
            # A successful ping refreshed _last_rx.
            if self._last_rx <= sent_at:
                await asyncio.sleep(interval)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def discover(host: str, port: int = 3260, options: SessionOptions | None = None,
                   which: str = "All", *, chap_optional: bool = False
                   ) -> list[DiscoveredTarget]:
    """SendTargets discovery (with discovery CHAP when ``options`` has
    credentials): log in to a discovery session, ask, log out.

    With credentials we insist on CHAP. ``chap_optional`` relaxes that for
    one-way CHAP: when the portal refuses our CHAP (many targets protect
    only normal sessions, so the credentials in a URL are the target's), try
    once more without. Nothing is lost by it: one-way CHAP proves us to the
    target, never the target to us. Mutual CHAP is never dropped; if both
    attempts fail the first refusal is raised.
    """
    try:
        return await _discover_once(host, port, options, which)
    except LoginRefused as exc:
        o = options
        if (not chap_optional or o is None or o.chap_user is None
                or o.target_chap_user is not None
                or exc.status != LoginStatus.AUTHENTICATION_FAILURE):
            raise
        plain = dataclasses.replace(o, chap_user=None, chap_secret=None)
        try:
            return await _discover_once(host, port, plain, which)
        except LoginRefused:
            raise exc from None


async def _discover_once(host: str, port: int, options: SessionOptions | None,
                         which: str) -> list[DiscoveredTarget]:
    session = Session(host, port, None, options, discovery=True)
    await session._start()
    try:
        return await session.send_targets(which)
    finally:
        await session.logout()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when importable (DESIGN.md: 3.11's default
    transport copies large writes; uvloop does not)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, uvloop's when importable."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


__all__ = ["Session", "SessionOptions", "ScsiResult", "discover", "run", "new_event_loop",
           "DiscoveredTarget"]
