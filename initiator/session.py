"""The initiator's session: an asyncio adapter around the sans-I/O core.

One :class:`Session` is one iSCSI session, with one TCP connection like
open-iscsi and libiscsi, or several (``SessionOptions.connections``, MC/S:
:mod:`initiator.session_mcs`). The protocol of the full feature phase
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
  us spin (the decisions are
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
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TypeVar, cast

from iscsi.constants import (
    RESERVED_TAG,
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
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)
from iscsi.ffp.initiator_recovery import RecoveryPolicy
from iscsi.keys import NegotiatedParams
from iscsi.pdu import PDU, Buffer
from iscsi.text import encode_text

from target.malloc import tune_malloc

from .errors import (
    CommandTimedOut,
    InitiatorError,
    SessionFailed,
    TargetProtocolError,
)
from .options import ScsiResult, SessionOptions
from .session_link import Answer, State
from .session_mcs import ConnectionSet, Link
from .transport import Connection

log = logging.getLogger("initiator.session")


T = TypeVar("T")


def _random_isid() -> int:
    # §11.12.5 / RFC 3720 §10.12.5: T=01b "random"; 22 random bits in A/B/C.
    return (0x40 << 40) | int.from_bytes(os.urandom(5), "big")


class Session(ConnectionSet):
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
        self._state = State.NEW
        self._conn: Connection | None = None
        self._engine: InitiatorEngine | None = None
        self._where = (host, port)
        self._links: dict[int, Link] = {}
        self._orphans: list[Command] = []
        self._jobs: set[asyncio.Task[None]] = set()
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
        #: Number of times a lost connection was recovered at ERL 2 (§7.2.2).
        self.connection_recoveries = 0

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

    @classmethod
    async def connect_discovery(cls, host: str, port: int = 3260,
                                options: SessionOptions | None = None) -> Session:
        """Connect to ``host:port`` and log in to a Discovery session
        (SessionType=Discovery, RFC 7143 §13.21), which takes only SendTargets
        and Logout; raises as :meth:`connect` does."""
        session = cls(host, port, None, options, discovery=True)
        await session._start()
        return session

    async def _start(self) -> None:
        try:
            await self._establish()
            if self.options.connections > 1 and not self.discovery:
                await self._add_connections()
        except BaseException:
            self._state = State.CLOSED
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
        return sum(len(e.tasks) for e in self.engines())

    @property
    def target_pings(self) -> int:
        """Number of the target's NOP-In pings we answered."""
        return self._pings + sum(e.target_pings for e in self.engines())

    async def logout(self) -> None:
        """Log out (close the session, §11.14) and close the connection.

        Commands still queued or in flight fail with :class:`SessionFailed`.
        """
        if self._state in (State.CLOSED, State.FAILED):
            return
        was_ready = self._state is State.READY
        self._state = State.CLOSING
        self._stop_background()
        engine = self._engine
        if was_ready and engine is not None and self._conn is not None:
            try:
                rsp = await self._exchange(lambda now: engine.logout(now), 5.0,
                                           when=State.CLOSING)
                if isinstance(rsp, LogoutDone) and rsp.response != LogoutResponseCode.SUCCESS:
                    log.warning("logout answered with response %d", rsp.response)
            except (TimeoutError, InitiatorError):
                log.warning("no logout response from %s; closing anyway", self.portal)
        self._finish(SessionFailed("session logged out"), State.CLOSED)

    async def close(self) -> None:
        """Log out if possible, then release everything."""
        await self.logout()

    def abort(self) -> None:
        """Drop the connection and fail everything without logging out."""
        self._stop_background()
        self._finish(SessionFailed("session aborted"), State.CLOSED)

    def _stop_background(self) -> None:
        task = self._recovery
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._recovery = None
        for job in list(self._jobs):
            if job is not asyncio.current_task():
                job.cancel()

    def _finish(self, error: InitiatorError, state: State) -> None:
        self._state = state
        self._failure = error
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        cmds = self._drop_links() + list(self._backlog)
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
        if self._state in (State.CLOSED, State.FAILED, State.CLOSING):
            raise self._failure or SessionFailed("session is closed")
        if self.discovery:
            raise InitiatorError("a discovery session cannot run SCSI commands")
        fut: asyncio.Future[ScsiResult] = self._loop.create_future()
        self._seq += 1
        cmd = Command(lun, cdb, data_out=data_out, data_in=data_in, attr=attr, seq=self._seq,
                      internal=internal, handle=fut)
        self._luns_used.add(lun)
        engine = self._engine if internal else self._pick()
        if engine is not None and (self._state is State.READY or internal):
            engine.submit(cmd, self._loop.time())
            self._schedule_flush()
        else:
            self._backlog.append(cmd)
        return fut

    # ----------------------------------------------------------- sending

    def _schedule_flush(self) -> None:
        if not self._in_rx and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything the engine queued with one ``writelines`` and
        re-arm the engine's timer."""
        self._flush_scheduled = False
        engine, conn = self._engine, self._conn
        if engine is None:
            return
        if engine.outbox and conn is not None and not conn.write_paused:
            conn.send(engine.outbox.take())
        at = engine.get_timer()
        for link in self._links.values():
            # Each connection writes its own PDUs (allegiance, §4.2.2).
            e = link.engine
            if e.outbox and not link.conn.write_paused:
                link.conn.send(e.outbox.take())
            t = e.get_timer()
            if t is not None and (at is None or t < at):
                at = t
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
        if self._engine is None:
            return
        self._in_rx = True
        try:
            for engine in self.engines():
                conn = self._conn_of(engine)
                if conn is not None:
                    self._handle(engine.handle_timer(self._loop.time()), conn)
        finally:
            self._in_rx = False
        self.flush()

    # --------------------------------------------------------- receiving

    def placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """PDUReader hook before login (after it, each connection's reader
        places Data-In through its own engine)."""
        return None

    def deliver(self, conn: Connection, pdus: list[PDU]) -> None:
        engine = self._engine_of(conn)
        if engine is None:
            return
        now = self._loop.time()
        self._in_rx = True
        try:
            for pdu in pdus:
                if engine.closed:
                    break
                self._handle(engine.receive_pdu(pdu, now), conn)
            if self._links:
                # The session-wide window this connection's responses moved
                # may let commands queued on the others go (§4.2.2.1).
                for other in self.engines():
                    if other is not engine and other.queue:
                        other.pump(now)
        finally:
            self._in_rx = False
        self.flush()

    def protocol_error(self, conn: Connection, exc: ProtocolError) -> bool:
        """A PDU failed to decode: at ErrorRecoveryLevel 1 a data digest
        error is recovered by the engine (SNACK, §7.8) and the connection
        goes on; anything else is the caller's to fail (False)."""
        # The engine of the connection it arrived on (MC/S: any of them;
        # recovery stays within that connection, §4.2.2 allegiance).
        engine = self._engine_of(conn)
        if engine is None or not engine.recovers(exc):
            return False
        log.info("%s: %s; asking the target again (ErrorRecoveryLevel 1)", self.portal, exc)
        self._in_rx = True
        try:
            self._handle(engine.protocol_error(exc, self._loop.time()), conn)
        finally:
            self._in_rx = False
        self.flush()
        return True

    def _dispatch(self, pdu: PDU) -> None:
        """Feed one PDU as if it had been received (tests inject with it)."""
        if self._conn is not None:
            self.deliver(self._conn, [pdu])

    def _handle(self, events: list[Event], conn: Connection | None = None) -> None:
        for ev in events:
            if isinstance(ev, CommandCompleted):
                self._completed(ev)
            elif isinstance(ev, CommandFailed):
                self._command_failed(ev)
            elif isinstance(ev, ConnectionFailed):
                conn = conn or self._conn
                if conn is not None:
                    err: BaseException = (TargetProtocolError(ev.reason) if ev.violation
                                          else TimeoutError(ev.reason))
                    self.connection_failed(conn, err)
            elif isinstance(ev, AsyncNotice):
                self._on_async(ev, conn or self._conn)
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
        engine = self._pick()
        if ev.kind == "reset" and self._policy.reissue(cmd) and engine is not None:
            # Ended by the LU reset of another command's timeout: retry.
            engine.submit(cmd, self._loop.time())
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

    # --------------------------------------------------- other exchanges

    async def _exchange(self, start: Callable[[float], int], timeout: float = 30.0, *,
                        when: State = State.READY) -> Answer:
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

from .loop import new_event_loop, run  # noqa: E402  (re-exported)


__all__ = ["Session", "SessionOptions", "ScsiResult", "run", "new_event_loop",
           "DiscoveredTarget"]
