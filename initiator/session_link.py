"""How an initiator session gets and keeps its connection: connect, log in
(following redirections, RFC 7143 §11.13.5), clear the unit attentions a
reinstatement leaves, and recover after a failure by logging in again with
the same ISID (session reinstatement, ErrorRecoveryLevel 0, §6.3.5 and
§7.1.4.3), within the replacement timeout and paced by
:class:`iscsi.ffp.initiator_recovery.RecoveryPolicy`.

A mixin of :class:`initiator.session.Session`, which holds the state it
declares below and the command path it calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from iscsi.constants import RESERVED_TAG, TaskAttribute
from iscsi.errors import ProtocolError
from iscsi.ffp.initiator import (
    Command,
    InitiatorEngine,
    InitiatorParams,
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)
from iscsi.ffp.initiator_recovery import RecoveryPolicy
from iscsi.keys import NegotiatedParams
from iscsi.pdu import PDU

from .errors import (
    CommandTimedOut,
    ConnectionLost,
    InitiatorError,
    LoginFailed,
    PortalUnreachable,
    SessionFailed,
    TargetProtocolError,
)
from .login import (
    LoginDriver,
    LoginRedirected,
    LoginResult,
    LoginSettings,
    login_offers,
    parse_target_address,
)
from .options import ScsiResult, SessionOptions
from .transport import Connection

if TYPE_CHECKING:
    from .session_mcs import Link

log = logging.getLogger("initiator.session")

Answer = PingAnswered | TaskManagementDone | TextDone | LogoutDone

_TUR = bytes(6)
# SAM-5 §5.3.1: CHECK CONDITION with UNIT ATTENTION (sense key 6).
_CHECK_CONDITION = 0x02
_UNIT_ATTENTION = 0x6


class State(enum.Enum):
    """Where a session stands."""

    NEW = "new"
    LOGGING_IN = "logging in"
    READY = "full feature phase"
    RECOVERING = "recovering"
    CLOSING = "logging out"
    CLOSED = "closed"
    FAILED = "failed"


def describe(exc: BaseException) -> str:
    """An exception as "Type: message" for log and error lines."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SessionLink:
    """Connecting, logging in and recovering (see the module docstring)."""

    host: str
    port: int
    target_name: str | None
    options: SessionOptions
    discovery: bool
    isid: int
    tsih: int
    params: NegotiatedParams
    recoveries: int
    connection_recoveries: int
    _loop: asyncio.AbstractEventLoop
    _state: State
    _conn: Connection | None
    _engine: InitiatorEngine | None
    _cid: int
    _cmdsn: int
    _next_itt: int
    _backlog: deque[Command]
    _luns_used: set[int]
    _policy: RecoveryPolicy
    _recovery: asyncio.Task[None] | None
    _retry_delay: float | None
    _next_wait: float
    _pings: int
    _waiters: dict[int, asyncio.Future[Answer]]
    #: (host, port) the leading connection logged in at (after redirection).
    _where: tuple[str, int]

    if TYPE_CHECKING:
        # Provided by Session (its command path and the transport's
        # callbacks, initiator.transport.ConnectionOwner); declared for the
        # type checker only, so nothing here can shadow or stand in for them.
        @property
        def portal(self) -> str: ...

        def _submit(self, lun: int, cdb: bytes, data_out: memoryview | None,
                    data_in: memoryview | None, attr: int, *,
                    internal: bool = False) -> asyncio.Future[ScsiResult]: ...

        def _schedule_flush(self) -> None: ...

        # Provided by initiator.session_mcs.ConnectionSet (MC/S).
        _links: dict[int, Link]

        def _link_failed(self, link: Link, exc: BaseException) -> None: ...

        def _promote(self, exc: BaseException) -> bool: ...

        def _drop_links(self) -> list[Command]: ...

        def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

        async def _recover_connection(self, old: InitiatorEngine, cmds: list[Command],
                                      cause: BaseException) -> None: ...

        async def _add_connections(self) -> None: ...

        def placement(self, hdr: bytes, dlen: int) -> memoryview | None: ...

        def deliver(self, conn: Connection, pdus: list[PDU]) -> None: ...

        def protocol_error(self, conn: Connection, exc: ProtocolError) -> bool: ...

        def flush(self) -> None: ...

        def _cancel_timer(self) -> None: ...

        def _finish(self, error: InitiatorError, state: State) -> None: ...

        @staticmethod
        def _fail(cmd: Command, err: InitiatorError) -> None: ...

        async def _exchange(self, start: Callable[[float], int], timeout: float = 30.0, *,
                            when: State = State.READY) -> Answer: ...

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
        self._state = State.LOGGING_IN
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            _transport, conn = await asyncio.wait_for(
                self._loop.create_connection(lambda: Connection(self), host, port),
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
        self._where = (host, port)
        try:
            await asyncio.wait_for(self._login(conn), self.options.login_timeout)
        except TimeoutError:
            conn.abort()
            raise LoginFailed(f"login to {where} timed out after "
                              f"{self.options.login_timeout:g} s: the portal accepts "
                              "connections but does not answer",
                              hint="check that HOST:PORT is an iSCSI target (not another "
                                   "service) and that it is not overloaded") from None
        except BaseException:
            conn.abort()
            if self._conn is conn:
                self._conn = None
            raise
        if self._conn is not conn:
            raise ConnectionLost(f"connection to {where} lost during login")
        self._state = State.READY
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

    async def _login(self, conn: Connection, cid: int | None = None) -> LoginResult:
        """Log in on ``conn``: the leading login of the session (``cid``
        None), which sets up the session's engine, or a non-leading one
        adding connection ``cid`` to it (same ISID and TSIH, §6.3.5)."""
        o = self.options
        itt = self._next_itt
        self._next_itt = (itt + 1) % RESERVED_TAG or 1
        leading = cid is None
        cmdsn = self._cmdsn if leading or self._engine is None else self._engine.cmdsn
        settings = LoginSettings(
            target_name=None if self.discovery else self.target_name, isid=self.isid,
            cid=self._cid if cid is None else cid, cmdsn=cmdsn, itt=itt, portal=self.portal,
            tsih=0 if leading else self.tsih,
            initiator_name=o.initiator_name, initiator_alias=o.initiator_alias,
            offers=login_offers(
                header_digest=o.header_digest, data_digest=o.data_digest,
                max_recv_data_segment_length=o.max_recv_data_segment_length,
                max_burst_length=o.max_burst_length, first_burst_length=o.first_burst_length,
                initial_r2t=o.initial_r2t, immediate_data=o.immediate_data,
                max_outstanding_r2t=o.max_outstanding_r2t, keys=o.keys,
                max_connections=1 if self.discovery else o.connections,
                error_recovery_level=o.error_recovery_level),
            chap_user=o.chap_user, chap_secret=o.chap_secret,
            target_chap_user=o.target_chap_user, target_chap_secret=o.target_chap_secret,
            chap_algorithms=o.chap_algorithms)
        result = await LoginDriver(settings, conn.send, conn.login_queue.get).run()
        if not leading:
            return result
        self.params = p = result.params
        self.tsih = result.tsih
        self._cmdsn = result.cmdsn
        self._engine = self._new_engine(p, result, self._cid, None)
        self._set_reader(conn, p, self._engine)
        log.info("logged in to %s at %s (TSIH %d): %s", self.target_name or "discovery",
                 self.portal, self.tsih, p)
        return result

    def _new_engine(self, p: NegotiatedParams, result: LoginResult, cid: int,
                    share: InitiatorEngine | None) -> InitiatorEngine:
        """The full-feature engine of a connection that logged in; ``share``
        is another connection of the session (MC/S) whose CmdSN, window
        and ITTs it shares."""
        o = self.options
        return InitiatorEngine(
            InitiatorParams(
                max_xmit=p.max_xmit_data_segment_length, max_burst=p.max_burst_length,
                first_burst=p.first_burst_length, initial_r2t=p.initial_r2t,
                immediate_data=p.immediate_data, max_outstanding_r2t=p.max_outstanding_r2t,
                header_digest=p.header_digest, data_digest=p.data_digest,
                error_recovery_level=p.error_recovery_level),
            cmdsn=result.cmdsn, expcmdsn=result.expcmdsn, maxcmdsn=result.maxcmdsn,
            exp_statsn=result.exp_statsn, now=self._loop.time(), cid=cid,
            nop_interval=None if self.discovery else o.nop_interval,
            nop_timeout=o.nop_timeout, command_timeout=o.command_timeout,
            tmf_timeout=o.tmf_timeout, queue_depth=o.queue_depth, share=share)

    @staticmethod
    def _set_reader(conn: Connection, p: NegotiatedParams, engine: InitiatorEngine) -> None:
        """Digests and the receive limit take effect after the final Login
        Response (§13.1, §13.12); Data-In lands through the engine."""
        conn.reader.header_digest = p.header_digest
        conn.reader.data_digest = p.data_digest
        conn.reader.discard_bad_headers = p.error_recovery_level >= 1
        conn.reader.max_data_segment_length = p.max_recv_data_segment_length
        conn.reader.placement = engine.placement

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

    async def _logout_and_reconnect(self) -> None:
        conn, engine = self._conn, self._engine
        if conn is None or engine is None or self._state is not State.READY:
            return
        with contextlib.suppress(TimeoutError, InitiatorError):
            await self._exchange(lambda now: engine.logout(now), 5.0)
        if self._conn is conn:
            self.connection_failed(conn, ConnectionResetError(
                "logged out at the target's request"))

    def connection_failed(self, conn: Connection, exc: BaseException) -> None:
        if conn is not self._conn:
            link = self._links.get(conn.cid)
            if link is not None and link.conn is conn:
                # One of several connections (MC/S): the others carry on.
                self._link_failed(link, exc)
            return
        if self._promote(exc):
            return
        self._conn = None
        conn.abort()
        engine, self._engine = self._engine, None
        self._cancel_timer()
        if self._state is not State.READY:
            # During login _establish sees the failure through the login
            # queue; while closing there is nothing to recover.
            if engine is not None:
                self._pings += engine.target_pings
                self._backlog.extendleft(reversed(engine.close() + self._drop_links()))
            return
        log.warning("connection to %s failed (%s); recovering", self.portal, describe(exc))
        self._state = State.RECOVERING
        lost = ConnectionLost(f"connection to {self.portal} lost")
        self._next_wait = self._policy.connection_failed(self._loop.time())
        cmds = engine.close() if engine is not None else []
        if engine is not None:
            self._pings += engine.target_pings
        # Other connections (if the leading one was the last to go, none).
        cmds = sorted(cmds + self._drop_links(), key=lambda c: c.seq)
        if engine is not None and self.params.error_recovery_level >= 2 and \
                not self.discovery and not isinstance(exc, TargetProtocolError):
            # ERL 2: connection recovery -- a new connection to the same
            # session takes over the tasks (§7.2.2), not a new session.
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._waiters.clear()
            if self._recovery is None or self._recovery.done():
                self._recovery = self._loop.create_task(
                    self._recover_connection(engine, cmds, exc))
            return
        self._session_recovery(cmds, exc)

    def _session_recovery(self, cmds: list[Command], exc: BaseException) -> None:
        """ERL 0 session recovery of ``cmds`` (every command the session's
        connections had): reissue what may be, then log in again."""
        lost = ConnectionLost(f"connection to {self.portal} lost")
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
                # A bounded number of reissues, then a clear error.
                why = cmd.violation or describe(exc)
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
            # rather than at the replacement timeout.
            gone = ConnectionLost(
                f"{self._policy.failures} connections to {self.portal} in a row failed "
                f"without completing a command (last: {describe(exc)})")
            while self._backlog:
                self._fail(self._backlog.popleft(), gone)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(lost)
        self._waiters.clear()
        if self.discovery:
            self._finish(SessionFailed(f"connection to {self.portal} lost"), State.FAILED)
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
        log.warning("connection to %s lost (%s), retrying (%.0f s left)", self.portal,
                    describe(cause), opts.replacement_timeout)
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
                log.warning("reconnect to %s failed: %s, retrying (%.0f s left)", self.portal,
                            exc, max(0.0, deadline - self._loop.time()))
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.abort()
                engine, self._engine = self._engine, None
                if engine is not None:
                    self._pings += engine.target_pings
                    self._backlog.extendleft(reversed(
                        [c for c in engine.close() if not c.internal]))
                self._state = State.RECOVERING
                delay = self._policy.login_retry_delay(delay)
                wait = delay
                continue
            self.recoveries += 1
            log.info("session to %s recovered", self.portal)
            self._recovery = None
            if self.options.connections > 1:
                self._spawn(self._add_connections())
            return
        self._recovery = None
        self._finish(SessionFailed(
            f"connection to {self.portal} lost ({describe(cause)}) and not restored within "
            f"the replacement timeout of {opts.replacement_timeout:g} s (last: {describe(last)})"),
            State.FAILED)
