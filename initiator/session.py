"""The initiator's session: an asyncio adapter around the sans-I/O core.

One :class:`Session` is one iSCSI session with one TCP connection (MC/S is not
used, like open-iscsi and libiscsi). The protocol of the full feature phase
-- CmdSN window, tags, Data-Out/Data-In, R2Ts, status, NOP, TMF, Text,
Logout, command timeouts -- lives in :class:`iscsi.ffp.initiator.InitiatorEngine`;
this module does I/O, timers, the reconnect policy and the public API:

* on connection loss, a framing error, a target protocol violation or a NOP
  timeout the session logs in again with the same ISID and TSIH 0, which
  reinstates it (RFC 7143 §6.3.5, ErrorRecoveryLevel 0 "session recovery",
  §7.1.4.3): the target discards the old session's tasks, and we reissue
  every command that had not completed, in the order it was first issued,
  after clearing unit attentions with TEST UNIT READY so that no old command
  can be retried after a newer one;
* a command is sent at most ``1 + command_retries`` times; reconnects after
  a failure that follows a login too closely are paced by an exponential
  backoff, so a target that breaks the protocol on every login cannot make
  us spin (issue 9 item 7; the decisions are
  :class:`iscsi.ffp.initiator_recovery.RecoveryPolicy`);
* a command without status after ``command_timeout`` is aborted and fails
  with :class:`CommandTimedOut` (the engine escalates ABORT TASK, LOGICAL
  UNIT RESET, session recovery);
* while the session is down new commands wait; when the replacement timeout
  (default 120 s, like open-iscsi's ``replacement_timeout``) expires, every
  waiting command fails with :class:`SessionFailed`.

The data path follows DESIGN.md: ``asyncio.BufferedProtocol`` with
:class:`iscsi.framing.PDUReader`, Data-In received straight into the caller's
buffer through the engine's placement callback, Data-Out sent as memoryview
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
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from iscsi.constants import (
    RESERVED_TAG,
    AsyncEvent,
    LoginStatus,
    LogoutResponseCode,
    TaskAttribute,
    TMFunction,
)
from iscsi.discovery import DiscoveredTarget, parse_send_targets
from iscsi.errors import ProtocolError
from iscsi.ffp.initiator import (
    AsyncNotice,
    Command,
    CommandCompleted,
    CommandFailed,
    ConnectionFailed,
    Event,
    ExchangeFailed,
    InitiatorEngine,
    InitiatorParams,
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)
from iscsi.ffp.initiator_recovery import RecoveryPolicy
from iscsi.framing import PDUReader
from iscsi.keys import NegotiatedParams
from iscsi.pdu import PDU, Buffer
from iscsi.text import encode_text

from target.malloc import tune_malloc

from .errors import (
    CommandTimedOut,
    ConnectionLost,
    InitiatorError,
    LoginFailed,
    LoginRefused,
    PortalUnreachable,
    SessionFailed,
    TargetProtocolError,
)
from .login import (
    LoginDriver,
    LoginRedirected,
    LoginSettings,
    login_offers,
    parse_target_address,
)

log = logging.getLogger("initiator.session")

_TUR = bytes(6)
# SAM-5 §5.3.1: CHECK CONDITION with UNIT ATTENTION (sense key 6).
_CHECK_CONDITION = 0x02
_UNIT_ATTENTION = 0x6

T = TypeVar("T")
Answer = PingAnswered | TaskManagementDone | TextDone | LogoutDone


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
    #: Seconds from submission to status before a command is aborted and
    #: fails with CommandTimedOut (open-iscsi/Linux: 30 s); None: no limit.
    command_timeout: float | None = 30.0
    #: Seconds for each task management step of that abort.
    tmf_timeout: float = 10.0
    #: Times a command is reissued after connection failures before it
    #: fails (the SCSI midlayer's retries, 5 in Linux).
    command_retries: int = 5
    #: Upper bound of the pause between logins after repeated failures.
    reconnect_backoff_max: float = 5.0


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
        self._parse(lambda: self.reader.buffer_updated(nbytes))

    def resume_parsing(self) -> None:
        """Parse bytes that arrived behind the last Login Response (the
        reader stops there so digests can be switched first)."""
        self._parse(self.reader.parse)

    def _parse(self, step: Callable[[], list[PDU]]) -> None:
        try:
            pdus = step()
        except Exception as exc:  # noqa: BLE001 - nothing may escape into the transport
            # Issue 9 item 7: any error while reading (not only our
            # ProtocolError) ends this connection, never the event loop's
            # "Fatal error on transport".
            self._error(exc)
            return
        if not self.logged_in:
            for pdu in pdus:
                self.login_queue.put_nowait(pdu)
            return
        try:
            self.session._deliver(self, pdus)
        except Exception as exc:  # noqa: BLE001
            log.exception("error handling PDUs from %s", self.session.portal)
            self._error(exc)

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
        self.session._flush()

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
        self._engine: InitiatorEngine | None = None
        self._cid = 0
        self._cmdsn = 1
        self._next_itt = 1
        self._seq = 0
        #: Commands waiting for a connection (recovery), in issue order.
        self._backlog: deque[Command] = deque()
        self._waiters: dict[int, asyncio.Future[Answer]] = {}
        self._text_lock = asyncio.Lock()
        self._flush_scheduled = False
        self._in_rx = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._failure: InitiatorError | None = None
        self._luns_used: set[int] = set()
        self._retry_delay: float | None = None
        o = self.options
        self._policy = RecoveryPolicy(command_retries=o.command_retries,
                                      backoff_max=o.reconnect_backoff_max)
        self._next_wait = 0.0
        self._pings = 0
        #: Called with each SCSI Async Event's sense data (AsyncEvent 0).
        self.on_async_event: Callable[[int, bytes], None] | None = None
        #: Number of times the session was re-established after a failure.
        self.recoveries = 0

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
        return len(self._engine.tasks) if self._engine is not None else 0

    @property
    def target_pings(self) -> int:
        """Number of the target's NOP-In pings we answered."""
        return self._pings + (self._engine.target_pings if self._engine is not None else 0)

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
        self._policy.logged_in(self._loop.time())
        engine = self._engine
        assert engine is not None
        # Hold the ordinary queue until unit attentions are consumed.
        engine.hold = bool(self._luns_used) and not self.discovery
        now = self._loop.time()
        backlog, self._backlog = self._backlog, deque()
        for cmd in backlog:
            engine.submit(cmd, now)
        conn.logged_in = True
        conn.resume_parsing()
        if self._conn is not conn:
            raise ConnectionLost(f"connection to {where} lost right after login")
        if engine.hold:
            await self._clear_unit_attentions()
            engine.hold = False
            engine.pump(self._loop.time())
        self._schedule_flush()

    async def _login(self, conn: _Connection) -> None:
        o = self.options
        itt = self._next_itt
        self._next_itt = (itt + 1) % RESERVED_TAG or 1
        settings = LoginSettings(
            target_name=None if self.discovery else self.target_name, isid=self.isid,
            cid=self._cid, cmdsn=self._cmdsn, itt=itt, portal=self.portal,
            initiator_name=o.initiator_name, initiator_alias=o.initiator_alias,
            offers=login_offers(
                header_digest=o.header_digest, data_digest=o.data_digest,
                max_recv_data_segment_length=o.max_recv_data_segment_length,
                max_burst_length=o.max_burst_length, first_burst_length=o.first_burst_length,
                initial_r2t=o.initial_r2t, immediate_data=o.immediate_data,
                max_outstanding_r2t=o.max_outstanding_r2t, keys=o.keys),
            chap_user=o.chap_user, chap_secret=o.chap_secret,
            target_chap_user=o.target_chap_user, target_chap_secret=o.target_chap_secret,
            chap_algorithms=o.chap_algorithms)
        result = await LoginDriver(settings, conn.send, conn.login_queue.get).run()
        self.params = p = result.params
        self.tsih = result.tsih
        conn.reader.header_digest = p.header_digest
        conn.reader.data_digest = p.data_digest
        conn.reader.max_data_segment_length = p.max_recv_data_segment_length
        self._cmdsn = result.cmdsn
        self._engine = InitiatorEngine(
            InitiatorParams(
                max_xmit=p.max_xmit_data_segment_length, max_burst=p.max_burst_length,
                first_burst=p.first_burst_length, initial_r2t=p.initial_r2t,
                immediate_data=p.immediate_data, max_outstanding_r2t=p.max_outstanding_r2t,
                header_digest=p.header_digest, data_digest=p.data_digest),
            cmdsn=result.cmdsn, expcmdsn=result.expcmdsn, maxcmdsn=result.maxcmdsn,
            exp_statsn=result.exp_statsn, now=self._loop.time(), cid=self._cid,
            nop_interval=None if self.discovery else o.nop_interval,
            nop_timeout=o.nop_timeout, command_timeout=o.command_timeout,
            tmf_timeout=o.tmf_timeout, queue_depth=o.queue_depth)
        # Data-In placement straight to the engine (one call less per PDU).
        conn.reader.placement = self._engine.placement
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
        engine = self._engine
        if was_ready and engine is not None and self._conn is not None:
            try:
                rsp = await self._exchange(lambda now: engine.logout(now), 5.0,
                                           when=_State.CLOSING)
                if isinstance(rsp, LogoutDone) and rsp.response != LogoutResponseCode.SUCCESS:
                    log.warning("logout answered with response %d", rsp.response)
            except (TimeoutError, InitiatorError):
                log.warning("no logout response from %s; closing anyway", self.portal)
        self._finish(SessionFailed("session logged out"), _State.CLOSED)

    async def close(self) -> None:
        """Log out if possible, then release everything."""
        await self.logout()

    def abort(self) -> None:
        """Drop the connection and fail everything without logging out."""
        self._stop_background()
        self._finish(SessionFailed("session aborted"), _State.CLOSED)

    def _stop_background(self) -> None:
        task = self._recovery
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._recovery = None

    def _finish(self, error: InitiatorError, state: _State) -> None:
        self._state = state
        self._failure = error
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        cmds = list(self._backlog)
        self._backlog.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            self._pings += engine.target_pings
            cmds = engine.close() + cmds
        self._cancel_timer()
        for cmd in cmds:
            self._fail(cmd, error)
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
        Raises :class:`CommandTimedOut` when no status arrives within
        ``command_timeout``, :class:`TargetProtocolError` when the target
        breaks the protocol on every retry or reports success for data it
        did not transfer.
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
        cmd = Command(lun, cdb, data_out=data_out, data_in=data_in, attr=attr, seq=self._seq,
                      internal=internal, handle=fut)
        self._luns_used.add(lun)
        engine = self._engine
        if engine is not None and (self._state is _State.READY or internal):
            engine.submit(cmd, self._loop.time())
            self._schedule_flush()
        else:
            self._backlog.append(cmd)
        return fut

    # ----------------------------------------------------------- sending

    def _schedule_flush(self) -> None:
        if not self._in_rx and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything the engine queued with one ``writelines`` and
        re-arm the engine's timer."""
        self._flush_scheduled = False
        engine, conn = self._engine, self._conn
        if engine is None:
            return
        if engine.outbox and conn is not None and not conn.write_paused:
            conn.send(engine.outbox.take())
        at = engine.get_timer()
        # Re-arm only for an earlier deadline: the oldest command's deadline
        # moves on with nearly every completion, and a timer that fires
        # early just finds nothing due and re-arms (no handle per batch).
        if at is not None and (self._timer_at is None or at < self._timer_at):
            self._cancel_timer()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        engine = self._engine
        if engine is None:
            return
        self._in_rx = True
        try:
            self._handle(engine.handle_timer(self._loop.time()))
        finally:
            self._in_rx = False
        self._flush()

    # --------------------------------------------------------- receiving

    def _placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """PDUReader hook: Data-In lands straight in the caller's buffer."""
        engine = self._engine
        return engine.placement(hdr, dlen) if engine is not None else None

    def _deliver(self, conn: _Connection, pdus: list[PDU]) -> None:
        engine = self._engine
        if engine is None or conn is not self._conn:
            return
        now = self._loop.time()
        self._in_rx = True
        try:
            for pdu in pdus:
                if self._engine is not engine:
                    break
                self._handle(engine.receive_pdu(pdu, now))
        finally:
            self._in_rx = False
        self._flush()

    def _dispatch(self, pdu: PDU) -> None:
        """Feed one PDU as if it had been received (tests inject with it)."""
        if self._conn is not None:
            self._deliver(self._conn, [pdu])

    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, CommandCompleted):
                self._completed(ev)
            elif isinstance(ev, CommandFailed):
                self._command_failed(ev)
            elif isinstance(ev, ConnectionFailed):
                if self._conn is not None:
                    err: BaseException = (TargetProtocolError(ev.reason) if ev.violation
                                          else TimeoutError(ev.reason))
                    self._connection_failed(self._conn, err)
            elif isinstance(ev, AsyncNotice):
                self._on_async(ev)
            elif isinstance(ev, ExchangeFailed):
                fut = self._waiters.pop(ev.itt, None)
                if fut is not None and not fut.done():
                    fut.set_exception(TargetProtocolError(ev.reason))
            else:
                fut = self._waiters.pop(ev.itt, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev)

    def _completed(self, ev: CommandCompleted) -> None:
        cmd = ev.command
        fut = cast("asyncio.Future[ScsiResult]", cmd.handle)
        self._policy.command_completed()
        if fut.done():
            return
        data: memoryview | None = None
        if cmd.data_in is not None:
            n = cmd.in_len - ev.residual if ev.underflow else cmd.in_len
            data = cmd.data_in[: max(0, min(n, cmd.in_len))]
        fut.set_result(ScsiResult(ev.status, ev.sense, data, ev.residual, ev.underflow,
                                  ev.overflow))

    def _command_failed(self, ev: CommandFailed) -> None:
        cmd = ev.command
        if ev.kind == "reset" and self._policy.reissue(cmd) and self._engine is not None:
            # Ended by the LU reset of another command's timeout: retry.
            self._engine.submit(cmd, self._loop.time())
            return
        err: InitiatorError
        if ev.kind == "timeout":
            err = CommandTimedOut(ev.reason)
        elif ev.kind == "target":
            err = TargetProtocolError(ev.reason, hint="check the target's logs")
        elif ev.kind in ("reset", "aborted"):
            err = InitiatorError(f"command aborted: {ev.reason}")
        else:
            err = TargetProtocolError(ev.reason)
        self._fail(cmd, err)

    @staticmethod
    def _fail(cmd: Command, err: InitiatorError) -> None:
        fut = cast("asyncio.Future[ScsiResult]", cmd.handle)
        if not fut.done():
            fut.set_exception(err)

    def _on_async(self, ev: AsyncNotice) -> None:
        event = ev.event
        if event == AsyncEvent.SCSI_ASYNC_EVENT:
            log.info("SCSI asynchronous event from %s", self.portal)
            if self.on_async_event is not None:
                self.on_async_event(ev.lun, ev.sense)
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
            self._retry_delay = float(ev.parameter2)
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
        conn, engine = self._conn, self._engine
        if conn is None or engine is None or self._state is not _State.READY:
            return
        with contextlib.suppress(TimeoutError, InitiatorError):
            await self._exchange(lambda now: engine.logout(now), 5.0)
        if self._conn is conn:
            self._connection_failed(conn, ConnectionResetError(
                "logged out at the target's request"))

    # --------------------------------------------------- other exchanges

    async def _exchange(self, start: Callable[[float], int], timeout: float = 30.0, *,
                        when: _State = _State.READY) -> Answer:
        engine = self._engine
        if self._state is not when or engine is None:
            raise self._failure or SessionFailed(f"session is {self._state.value}")
        itt = start(self._loop.time())
        fut: asyncio.Future[Answer] = self._loop.create_future()
        self._waiters[itt] = fut
        self._schedule_flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if self._waiters.pop(itt, None) is not None and self._engine is engine:
                engine.forget(itt)  # abandoned (timeout, cancel): free its tag

    async def ping(self, data: bytes = b"", timeout: float = 30.0) -> float:
        """Send a NOP-Out ping (§11.18) and return the round trip in seconds."""
        start = self._loop.time()
        engine = self._engine
        rsp = await self._exchange(lambda now: engine.ping(now, data) if engine else 0, timeout)
        if not isinstance(rsp, PingAnswered) or rsp.data != data:
            raise TargetProtocolError("NOP-In did not echo the ping data (§11.19)")
        return self._loop.time() - start

    async def text(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """A Text Request/Response exchange (§11.10), following continuations."""
        async with self._text_lock:
            engine = self._engine
            data = encode_text(pairs)
            rsp = await self._exchange(lambda now: engine.text(data, now) if engine else 0)
        assert isinstance(rsp, TextDone)
        return rsp.pairs

    async def send_targets(self, which: str = "All") -> list[DiscoveredTarget]:
        """SendTargets (RFC 7143 Appendix C): the targets and their portals."""
        pairs = await self.text([("SendTargets", which)])
        try:
            return parse_send_targets(pairs, default_host=self.host, default_port=self.port)
        except ProtocolError as exc:
            raise TargetProtocolError(f"bad SendTargets answer: {exc}") from None

    async def task_management(self, function: TMFunction, lun: int = 0,
                              referenced_itt: int = RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5); return the
        response code (iscsi.constants.TMResponse)."""
        engine = self._engine
        rsp = await self._exchange(lambda now: engine.task_management(
            function, now, lun, referenced_itt) if engine else 0)
        assert isinstance(rsp, TaskManagementDone)
        return rsp.response

    # ----------------------------------------------------------- recovery

    def _connection_failed(self, conn: _Connection, exc: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        conn.abort()
        engine, self._engine = self._engine, None
        self._cancel_timer()
        if self._state is not _State.READY:
            # During login _establish sees the failure through the login
            # queue; while closing there is nothing to recover.
            if engine is not None:
                self._pings += engine.target_pings
                self._backlog.extendleft(reversed(engine.close()))
            return
        log.warning("connection to %s failed (%s); recovering", self.portal, _describe(exc))
        self._state = _State.RECOVERING
        lost = ConnectionLost(f"connection to {self.portal} lost")
        self._next_wait = self._policy.connection_failed(self._loop.time())
        cmds = engine.close() if engine is not None else []
        if engine is not None:
            self._pings += engine.target_pings
        reissue: list[Command] = []
        for cmd in cmds:
            if cmd.internal:
                # Unit attention clearing belongs to the attempt that failed.
                self._fail(cmd, lost)
            elif cmd.timed_out:
                self._fail(cmd, CommandTimedOut(
                    f"no status for CDB 0x{cmd.cdb[0]:02x} within the command timeout; "
                    f"task management failed, the session was recovered"))
            elif not self._policy.reissue(cmd):
                # Issue 9 item 7: a bounded number of reissues, then a clear error.
                why = cmd.violation or _describe(exc)
                self._fail(cmd, TargetProtocolError(
                    f"CDB 0x{cmd.cdb[0]:02x} failed after {cmd.attempts} attempts: {why}")
                    if cmd.violation else ConnectionLost(
                    f"CDB 0x{cmd.cdb[0]:02x} failed after {cmd.attempts} attempts: {why}"))
            elif not cast("asyncio.Future[ScsiResult]", cmd.handle).done():
                reissue.append(cmd)
        # ERL 0 session recovery (§7.1.4.3): reissue what had not completed,
        # in the order it was first issued, ahead of commands not yet sent.
        self._backlog.extendleft(reversed(reissue))
        if self._policy.give_up():
            # Logins succeed but nothing completes: fail what waits now
            # rather than at the replacement timeout (issue 9 item 7).
            gone = ConnectionLost(
                f"{self._policy.failures} connections to {self.portal} in a row failed "
                f"without completing a command (last: {_describe(exc)})")
            while self._backlog:
                self._fail(self._backlog.popleft(), gone)
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
        # Time2Wait from an Async Message, else the backoff.
        wait = self._retry_delay if self._retry_delay is not None else self._next_wait
        self._retry_delay = None
        delay = 0.0
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
                engine, self._engine = self._engine, None
                if engine is not None:
                    self._pings += engine.target_pings
                    self._backlog.extendleft(reversed(
                        [c for c in engine.close() if not c.internal]))
                self._state = _State.RECOVERING
                delay = self._policy.login_retry_delay(delay)
                wait = delay
                continue
            self.recoveries += 1
            log.info("session to %s recovered", self.portal)
            self._recovery = None
            return
        self._recovery = None
        self._finish(SessionFailed(
            f"connection to {self.portal} lost ({_describe(cause)}) and not restored within "
            f"the replacement timeout of {opts.replacement_timeout:g} s (last: {_describe(last)})"),
            _State.FAILED)


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
