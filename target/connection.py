"""One iSCSI connection on the target: the asyncio adapter around the
sans-I/O login (:mod:`iscsi.login`) and full-feature engine
(:mod:`iscsi.ffp.target`).

It moves bytes and time and runs SCSI work; the protocol is the engine's.
Receive: the kernel writes into :class:`iscsi.framing.PDUReader` buffers and
Data-Out payloads land straight in the task's write buffer through the
engine's placement callback. Send: everything the engine queued while
handling one receive or one completion is written with a single
``writelines`` on the next loop iteration (DESIGN.md: one syscall per
batch); read data goes out as memoryview slices of what the backend
returned (an mmap view for raw files).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any, Protocol, cast

from iscsi.errors import ProtocolError
from iscsi.ffp.target import (
    HW_ERROR_SENSE,
    CloseConnection,
    Event,
    ExecuteCommand,
    LogoutRequested,
    ManageTasks,
    Task,
    TargetConnectionEngine,
    TargetParams,
    TextRequested,
    WriteBudget,
)
from iscsi.framing import SMALL_STAGE, PDUReader
from iscsi.keys import NegotiatedParams
from iscsi.login import TargetLogin
from iscsi.pdu import PDU, Buffer, LoginRequest, Reject
from iscsi.scsi.constants import Status

from .config import ServerConfig

from .faults import LOGOUT_WAIT, FaultInjector
from .inline import run_inline
from .runtime import CommandResult

from .session import Session


class ConnectionServer(Protocol):
    """What a connection asks of the server it belongs to: the narrow
    interface between the per-connection adapter and everything that spans
    connections (sessions, logins, task management, discovery)."""

    config: ServerConfig
    write_budget: WriteBudget
    connections: set[TargetConnection]
    inflight: set[asyncio.Future[Any]]
    #: ``serve --fault``: misbehave on purpose (None: never).
    faults: FaultInjector | None

    def new_login(self, conn: TargetConnection) -> TargetLogin:
        """A fresh login state machine for ``conn``."""

    def handle_login(self, conn: TargetConnection, req: LoginRequest) -> None:
        """Feed a Login Request to ``conn``'s login."""

    def login_out_of_order(self, conn: TargetConnection, pdu: PDU) -> None:
        """A non-login PDU arrived before login completed."""

    def login_protocol_error(self, conn: TargetConnection, exc: ProtocolError) -> None:
        """A malformed PDU during login."""

    def retain_tasks(self, sess: Session, conn: TargetConnection, tasks: list[Task]) -> None:
        """ERL 2: keep a failed connection's tasks for TASK REASSIGN."""

    def admit_connection(self, conn: TargetConnection) -> bool:
        """Whether a new TCP connection may proceed (the connection limit)."""

    def connection_closed(self, conn: TargetConnection) -> None:
        """``conn`` went away."""

    def manage_tasks(self, conn: TargetConnection, ev: ManageTasks) -> None:
        """Carry out a Task Management Function."""

    def answer_text(self, conn: TargetConnection, pairs: list[tuple[str, str]]) -> bytes:
        """The answer to a Text Request's keys."""

    def logout(self, conn: TargetConnection, ev: LogoutRequested) -> None:
        """A Logout Request's turn came."""

#: What finishes a command: (task, start time, result, exception).
_Done = Callable[[Task, int, CommandResult | None, BaseException | None], None]

log = logging.getLogger("aioiscsi.target")

#: Staging buffer once logged in: many small PDUs per system call.
FULL_STAGE = 256 << 10


class TargetConnection(asyncio.BufferedProtocol):
    """The per-connection protocol object."""

    def __init__(self, server: ConnectionServer, portal_group_tag: int) -> None:
        self.server = server
        self.portal_group_tag = portal_group_tag
        self.loop = asyncio.get_event_loop()
        # Small until login: a connection that never logs in costs little.
        self.reader = PDUReader(stage_size=SMALL_STAGE)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.local: tuple[str, int] = ("", 0)
        self.closed = False
        self.session: Session | None = None
        #: ERL 2: the session that keeps this (failed) connection's tasks.
        self.retained_by: Session | None = None
        self.engine: TargetConnectionEngine | None = None
        self.cid = 0
        #: StatSN for the login responses (random start, RFC 7143 §4.2.2.2).
        self.statsn = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        self.login: TargetLogin | None = None
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._delivering = False
        self._later: list[Event] = []
        #: Why the connection ended, for the session-end log line.
        self.end_reason = ""

    # ------------------------------------------------------------------ I/O
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but
        # provide the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # DESIGN.md: never let Nagle delay a response.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"[{peer[0]}]:{peer[1]}" if peer and ":" in peer[0] else (
            f"{peer[0]}:{peer[1]}" if peer else "?")
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if local else ("", 0)
        if not self.server.admit_connection(self):
            self.closed = True
            self.transport.abort()
            return
        self.login = self.server.new_login(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        login = self.login
        if login is not None and login.started and not login.complete \
                and login.failed_status is None and not self.closed:
            # The initiator went away mid-login, e.g. after refusing our
            # mutual CHAP answer: say how far it got, as an admin needs.
            log.info("%s: login abandoned by %s for %s at %s", self.peer,
                     login.initiator_name or "an unnamed initiator",
                     login.target_name or ("discovery" if login.session_type == "Discovery"
                                           else "no target"),
                     login.progress)
        if not self.closed and not self.end_reason:
            self.end_reason = (f"connection lost ({exc})" if exc is not None
                               else "connection closed by the initiator")
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A connection that failed (not one logged out) keeps its tasks for
        # reassignment at ERL 2.
        self.end_tasks(retain=self.end_reason != "logged out")
        # Break the references back to us (login policy, placement
        # callback), so a closed connection is freed by reference counting
        # alone, without waiting for a full garbage collection.
        self.login = None
        self.reader.placement = None
        self.server.connection_closed(self)

    def end_tasks(self, retain: bool = False) -> None:
        """At ErrorRecoveryLevel 0 the tasks of a connection end with it
        (RFC 7143 §7.1.4, §6.3.5): their CmdSN slots go back to the session
        and whoever waits on one of them (a TMF) is released. With
        ``retain`` at ErrorRecoveryLevel 2 (a failure, or removal for
        recovery) the session keeps them for TASK REASSIGN (§7.2.2)."""
        engine = self.engine
        if engine is None or engine.closed:
            return
        sess = self.session
        if retain and sess is not None and not sess.closed and \
                engine.params.error_recovery_level >= 2:
            self.retained_by = sess
            self.server.retain_tasks(sess, self, engine.detach())
            return
        for task in engine.close():
            _wake(task)

    def pause_writing(self) -> None:
        # DESIGN.md: a peer that does not read must not grow our buffers.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            pdus = self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            if not self._on_protocol_error(exc):
                return
            pdus = []
        while not self.closed:
            for pdu in pdus:
                self._handle(pdu)
                if self.closed:
                    return
            try:
                pdus = self.reader.parse()
            except ProtocolError as exc:
                if not self._on_protocol_error(exc):
                    return
                continue
            if not pdus:
                break
        self._arm_timer()

    def eof_received(self) -> bool | None:
        return None

    def _placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        return self.engine.placement(hdr, dlen) if self.engine is not None else None

    def send(self, pdu: PDU) -> None:
        """Queue a login-phase PDU; everything queued in one loop turn is
        one write."""
        self._out.extend(pdu.encode())
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if self.engine is not None and self.engine.outbox:
            out.extend(self.engine.outbox.take())
        if out and self.transport is not None and not self.transport.is_closing():
            self._out = []
            self.transport.writelines(out)
        else:
            out.clear()

    def close(self, reason: str = "") -> None:
        """Flush what is queued and close the TCP connection."""
        if self.closed:
            return
        if reason:
            log.info("%s: closing connection: %s", self.peer, reason)
            self.end_reason = self.end_reason or reason
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (RFC 7143: ERL 0 recovery)."""
        log.warning("%s: dropping connection: %s", self.peer, reason)
        self.end_reason = self.end_reason or reason
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --------------------------------------------------------------- timers
    def _arm_timer(self) -> None:
        """One loop timer at the engine's (or, before it, the login's)
        next deadline: they never read the clock."""
        if self.closed:
            return
        when = (self.engine.get_timer() if self.engine is not None
                else self.login.get_timer() if self.login is not None else None)
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self.closed:
            return
        now = self.loop.time()
        if self.engine is not None:
            self.deliver(self.engine.handle_timer(now))
        elif self.login is not None and self.login.handle_timer(now):
            log.warning("%s: login not completed within %.0f s; dropping", self.peer,
                        self.server.config.login_timeout)
            self.abort("login timeout")
            return
        self._arm_timer()

    # --------------------------------------------------------------- errors
    def _on_protocol_error(self, exc: ProtocolError) -> bool:
        """Answer a decoding error as the RFC says. Returns True if the
        connection goes on."""
        log.warning("%s: protocol error: %s", self.peer, exc)
        if self.engine is None:
            # During login any malformed PDU ends the login (RFC 7143 §6.3).
            self.server.login_protocol_error(self, exc)
            return False
        self.deliver(self.engine.protocol_error(exc))
        return not self.closed

    def send_reject(self, reason: int, header: bytes) -> None:
        """Send a Reject carrying the offending header (§11.17)."""
        if self.engine is not None:
            self.engine.reject(reason, header)
            self.schedule_flush()
        else:
            self.send(Reject(reason=reason, statsn=self.statsn, data=header[:48]))

    # ---------------------------------------------------------------- login
    def login_complete(self, session: Session, params: NegotiatedParams) -> None:
        """Called when the final Login Response is queued: the full feature
        phase starts, digests with the next PDU (RFC 7143 §13.1)."""
        self.session = session
        self.login = None
        if self.server.faults is not None and not session.discovery:
            self.server.faults.on_login(session.initiator_name, self.loop.time())
        cfg = self.server.config
        tp = TargetParams.from_negotiated(params)
        self.engine = TargetConnectionEngine(
            session.window, tp, statsn=self.statsn, now=self.loop.time(),
            discovery=session.discovery, budget=self.server.write_budget,
            nop_interval=cfg.nop_interval, nop_timeout=cfg.nop_timeout)
        self.reader.placement = self._placement
        self.reader.resize_stage(FULL_STAGE)
        self.reader.header_digest = tp.header_digest
        self.reader.data_digest = tp.data_digest
        self.reader.discard_bad_headers = tp.error_recovery_level >= 1
        self.reader.max_data_segment_length = params.max_recv_data_segment_length
        self._arm_timer()

    # ------------------------------------------------------------- dispatch
    def _handle(self, pdu: PDU) -> None:
        engine = self.engine
        if engine is None:
            if isinstance(pdu, LoginRequest):
                self.server.handle_login(self, pdu)
            else:
                # RFC 7143 §6.3: only Login Requests before login completes.
                self.server.login_out_of_order(self, pdu)
            return
        self.deliver(engine.receive_pdu(pdu, self.loop.time()))

    def deliver(self, events: list[Event]) -> None:
        """Act on events of this connection's engine, in order. A command
        that completes inline can free a window slot and so produce more
        events while this runs: those are taken in this same loop rather
        than by a nested call, so the stack stays flat."""
        if self._delivering:
            self._later.extend(events)
            return
        self._delivering = True
        try:
            while events:
                for ev in events:
                    _HANDLERS[type(ev)](self, ev)
                events, self._later = self._later, []
                if self.engine is not None and self.engine.events:
                    events += self.engine.take_events()
        finally:
            self._delivering = False
        if not self._flush_scheduled and self.engine is not None and self.engine.outbox.buffers:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.session is not None:
            self.session.wake_others(self)

    def _on_execute(self, ev: ExecuteCommand) -> None:
        sess = self.session
        assert sess is not None and sess.target is not None
        task = ev.task
        started = perf_counter_ns()
        faults = self.server.faults
        if faults is not None and self._fault(faults, sess, task, started):
            return
        self._run(task, started, self._done)

    def _run(self, task: Task, started: int, done: _Done) -> None:
        sess = self.session
        assert sess is not None and sess.target is not None
        # A command the backend answers synchronously (an mmap read) is
        # done here, with no coroutine; one that waits is stepped without a
        # Task (target/inline.py).
        try:
            result = sess.target.run_command_now(sess.get_nexus(),
                                                  sess.overlay_key or sess.initiator_name, task)
        except Exception as exc:  # noqa: BLE001 - answered, never lost
            done(task, started, None, exc)
            return
        if type(result) is tuple:
            done(task, started, result, None)
            return
        fut = run_inline(cast(Coroutine[Any, Any, CommandResult], result),
                         functools.partial(done, task, started), self.loop)
        if fut is not None:
            # Still running: the server waits for these on shutdown, so
            # in-flight writes reach the backend before it is flushed.
            inflight = self.server.inflight
            inflight.add(fut)
            fut.add_done_callback(inflight.discard)

    def _fault(self, faults: FaultInjector, sess: Session, task: Task, started: int) -> bool:
        """``serve --fault``: misbehave with this command on purpose
        (target/faults.py). True when the command is dealt with here."""
        v = faults.on_command(id(self), sess.initiator_name, self.peer, task.cmd.cdb,
                              self.loop.time())
        if v is None:
            return False
        log.warning("%s: fault injected on CDB 0x%s: %s", self.peer, task.cmd.cdb[:1].hex(),
                    "drop the connection" if v.drop else "request logout" if v.logout else
                    f"status 0x{v.status:02x}" if v.status is not None else
                    f"status delayed {v.delay:g} s")
        if v.drop:
            self.abort("fault injected: drop")
            return True
        if v.logout and self.engine is not None:
            self.engine.request_logout(LOGOUT_WAIT)
            self.schedule_flush()
        if v.status is not None:
            result: CommandResult = (v.status, v.sense, None, 0, task.edtl if task.cmd.read
                                     else 0)
            if v.delay:
                self.loop.call_later(v.delay, self._done, task, started, result, None)
            else:
                self._done(task, started, result, None)
            return True
        if v.delay:
            # Run it now, answer later: the status is what is late.
            delay = v.delay

            def later(t: Task, s: int, r: CommandResult | None, e: BaseException | None) -> None:
                self.loop.call_later(delay, self._done, t, s, r, e)
            self._run(task, started, later)
            return True
        return False

    def _done(self, task: Task, started: int, result: CommandResult | None,
              exc: BaseException | None) -> None:
        home = task.home
        if isinstance(home, TargetConnection) and home is not self:
            # Reassigned to another connection (ERL 2): it answers there.
            home._done(task, started, result, exc)
            return
        if task.waiter is not None:
            _wake(task)
        engine = self.engine
        if engine is None:
            return
        if result is None:
            # The SCSI layer must never take the target down.
            log.error("%s: SCSI command %s failed", self.peer, task.cmd.cdb[:1].hex(),
                      exc_info=exc)
            result = (Status.CHECK_CONDITION, HW_ERROR_SENSE, None, 0, 0)
        status, sense, data, overflow, underflow = result
        if self.session is not None:
            # The counters `show` reports (target/stats.py): plain increments.
            self.session.counters_for(task.lun).record(
                status, len(data) if data is not None else 0,
                task.edtl - underflow if task.cmd.write else 0, perf_counter_ns() - started)
        engine.command_done(task, status, sense, data, overflow=overflow, underflow=underflow)
        if engine.closed:
            # A retained task (ERL 2) of this failed connection ended: the
            # window slot it gave back may let the others' held commands run.
            sess = self.session or self.retained_by
            if sess is not None:
                sess.wake_others(self)
            return
        if engine.events:
            # Its window slot let held commands run.
            self.deliver(engine.take_events())
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _on_tmf(self, ev: ManageTasks) -> None:
        self.server.manage_tasks(self, ev)

    def _on_text(self, ev: TextRequested) -> None:
        engine = self.engine
        assert engine is not None
        engine.text_answer(ev.itt, self.server.answer_text(self, ev.pairs))

    def _on_logout(self, ev: LogoutRequested) -> None:
        self.server.logout(self, ev)

    def _on_close(self, ev: CloseConnection) -> None:
        if self.session is not None and not self.closed:
            self.session.announce_drop(self)
        if ev.abort:
            self.abort(ev.reason)
        else:
            self.close(ev.reason)

    def request_logout(self, wait: int) -> None:
        """Ask the initiator to log out (Async Message, event 1, §11.9.1)."""
        if self.engine is not None and not self.closed:
            self.engine.request_logout(wait)
            self.schedule_flush()


def _wake(task: Task) -> None:
    """Release whoever waits for ``task`` to end (a TMF's future)."""
    fut = task.waiter
    if isinstance(fut, asyncio.Future) and not fut.done():
        fut.set_result(None)


_HANDLERS: dict[type, Callable[[TargetConnection, Event], None]] = {
    ExecuteCommand: TargetConnection._on_execute,  # type: ignore[dict-item]
    ManageTasks: TargetConnection._on_tmf,  # type: ignore[dict-item]
    TextRequested: TargetConnection._on_text,  # type: ignore[dict-item]
    LogoutRequested: TargetConnection._on_logout,  # type: ignore[dict-item]
    CloseConnection: TargetConnection._on_close,  # type: ignore[dict-item]
}
