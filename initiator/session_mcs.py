"""Multiple connections per session (MC/S, RFC 7143 §4.2, §6.3.5) for the
initiator's :class:`initiator.session.Session`.

The leading connection (the session's ``_conn``/``_engine``) logs in first;
``SessionOptions.connections`` asks for more, each a non-leading login with
the session's ISID and TSIH and a new CID, authenticated again (§6.3.5).
Their engines share the session's CmdSN counter, command window and ITT
space (:class:`iscsi.ffp.initiator.SessionSeq`); everything of a task --
its R2Ts, Data-Out, Data-In and status -- stays on the connection it was
sent on (connection allegiance, §4.2.2). New commands go to the connection
with the fewest commands queued and in flight.

Losing one connection does not end the session while others remain
(ErrorRecoveryLevel 0, so its tasks end with it, §7.1.4):

* the lost connection is logged out from a surviving one (Logout reason
  "close the connection" naming its CID, §11.14.1), so the target has
  terminated its commands before anything is sent again;
* its commands the target never took (CmdSN not below the ExpCmdSN of that
  answer) are sent again with their original CmdSN and ITT on a surviving
  connection, plugging the session's CmdSN order (§7.2.1: allowed once the
  original connection is logged out); they run once, exactly as if the
  first copy had arrived;
* those the target took and terminated are reissued as new commands when
  that is safe (they write nothing: reads, TEST UNIT READY...), and writes
  fail with :class:`~initiator.errors.ConnectionLost` saying that the data
  may or may not have reached the medium -- at ERL 0 a write the target
  terminated cannot be replayed without possibly overtaking a newer write
  to the same blocks sent meanwhile on another connection;
* a new connection with the lost CID is then logged in behind the scenes.

When the leading connection is lost another takes its role; when the last
one is lost the session recovers as a whole (session reinstatement,
:mod:`initiator.session_link`) and adds its extra connections again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from iscsi.constants import (
    AsyncEvent,
    LoginStatus,
    LogoutReason,
    LogoutResponseCode,
    TMResponse,
)
from iscsi.errors import ProtocolError
from iscsi.ffp.initiator import (
    AsyncNotice,
    Command,
    InitiatorEngine,
    LogoutDone,
    TaskManagementDone,
)
from iscsi.login import join_connection
from iscsi.names import parse_portal
from iscsi.serial import sn_lt

from .errors import CommandTimedOut, ConnectionLost, InitiatorError, LoginRefused
from .login import LoginResult
from .options import ScsiResult
from .session_link import Answer, SessionLink, State, describe
from .transport import Connection

log = logging.getLogger("initiator.session")

#: Attempts to log in again a connection lost while others carried on.
_REPLACE_ATTEMPTS = 3


@dataclass(eq=False)
class Link:
    """One connection of the session besides the leading one."""

    cid: int
    conn: Connection
    engine: InitiatorEngine


class ConnectionSet(SessionLink):
    """The session's extra connections (see the module docstring)."""

    _links: dict[int, Link]
    #: Commands of lost connections awaiting the outcome of their cleanup.
    _orphans: list[Command]
    _jobs: set[asyncio.Task[None]]
    #: Called with each SCSI Async Event's sense data (AsyncEvent 0).
    on_async_event: Callable[[int, bytes], None] | None

    # ---------------------------------------------------------- queries
    def engines(self) -> list[InitiatorEngine]:
        """The engines of every logged-in connection, leading one first."""
        out = [self._engine] if self._engine is not None else []
        out += [link.engine for link in self._links.values()]
        return out

    @property
    def connection_count(self) -> int:
        """Connections logged in now."""
        return (self._engine is not None) + len(self._links)

    def connection(self, cid: int) -> tuple[Connection, InitiatorEngine] | None:
        """The logged-in connection ``cid`` and its engine, or None (for
        diagnostics and tests: which connection carries what)."""
        if cid == self._cid and self._conn is not None and self._engine is not None:
            return self._conn, self._engine
        link = self._links.get(cid)
        return (link.conn, link.engine) if link is not None else None

    def _pick(self) -> InitiatorEngine | None:
        """The connection for a new command: the least loaded (queued plus
        in flight), the leading one on a tie."""
        best = self._engine
        if best is None or not self._links:
            return best
        load = best.load
        for link in self._links.values():
            if link.engine.load < load:
                best, load = link.engine, link.engine.load
        return best

    def _engine_of(self, conn: Connection) -> InitiatorEngine | None:
        if conn is self._conn:
            return self._engine
        link = self._links.get(conn.cid)
        return link.engine if link is not None and link.conn is conn else None

    def _conn_of(self, engine: InitiatorEngine) -> Connection | None:
        if engine is self._engine:
            return self._conn
        link = self._links.get(engine.cid)
        return link.conn if link is not None and link.engine is engine else None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        job = self._loop.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _on_async(self, ev: AsyncNotice, conn: Connection | None = None) -> None:
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
            if self._links and conn is not None:
                # MC/S: only the connection it came on is logged out and
                # replaced; the session carries on over the others.
                self._spawn(self._logout_connection(conn))
            else:
                self._loop.create_task(self._logout_and_reconnect())
        elif event == AsyncEvent.CONNECTION_DROP and self._links:
            # MC/S: Parameter1 names the connection the target drops
            # (§11.9.1), not necessarily the one the message came on.
            pair = self.connection(ev.parameter1)
            log.info("target %s drops connection CID %d", self.portal, ev.parameter1)
            if pair is not None:
                self.connection_failed(pair[0], ConnectionResetError(
                    f"target announced it drops connection CID {ev.parameter1}"))
        elif event in (AsyncEvent.CONNECTION_DROP, AsyncEvent.SESSION_DROP):
            # Parameter2 is Time2Wait: do not reconnect sooner (§11.9.1).
            log.info("target %s drops the %s", self.portal,
                     "connection" if event == AsyncEvent.CONNECTION_DROP else "session")
            self._retry_delay = float(ev.parameter2)
            if event == AsyncEvent.SESSION_DROP:
                # Every connection goes: no promotion, one session recovery.
                self._orphans = self._drop_links()
            if self._conn is not None:
                self.connection_failed(self._conn, ConnectionResetError(
                    "target announced it drops the connection"))
        elif event == AsyncEvent.NEGOTIATION_REQUEST:
            # We have nothing to renegotiate; an empty Text exchange would do,
            # but the target may equally live with our current values.
            log.info("target %s requests renegotiation; keeping current values", self.portal)
        else:
            log.info("asynchronous event %d from %s ignored", event, self.portal)

    # ------------------------------------------------------- adding them
    async def _add_connections(self) -> None:
        """Log in connections until the session has what was asked for
        (``options.connections``, at most the negotiated MaxConnections,
        §13.2). A connection that cannot be added is logged and skipped:
        the session works with fewer."""
        want = min(self.options.connections, self.params.max_connections)
        # CIDs not in use (after a promotion the leading connection may
        # have any CID; a login with one in use would reinstate it, §6.3.4).
        free = (cid for cid in range(want * 2) if cid != self._cid and cid not in self._links)
        for cid in free:
            if self.connection_count >= want or self._state is not State.READY:
                break
            try:
                await self._add_link(cid)
            except (InitiatorError, OSError, ProtocolError, TimeoutError) as exc:
                log.warning("could not add connection CID %d to %s: %s", cid, self.portal,
                            describe(exc))
        if want > 1:
            log.info("session to %s has %d connection(s) (MaxConnections=%d)", self.portal,
                     self.connection_count, self.params.max_connections)

    async def _join(self, cid: int, share: InitiatorEngine
                    ) -> tuple[Connection, InitiatorEngine, LoginResult]:
        """One non-leading login (§6.3.5): same ISID and TSIH, CID ``cid``;
        its engine shares ``share``'s CmdSN, window and ITTs. The caller
        registers the connection, then lets it parse (``logged_in``)."""
        o = self.options
        host, port = self._where
        if o.portals and cid != 0:
            # Any portal of the session's portal group will do (§4.4.1).
            where = parse_portal(o.portals[(cid - 1) % len(o.portals)], default_port=port)
            host, port = where.host, where.port
        _transport, conn = await asyncio.wait_for(
            self._loop.create_connection(lambda: Connection(self), host, port),
            o.connect_timeout)
        conn.cid = cid
        try:
            result = await asyncio.wait_for(self._login(conn, cid=cid), o.login_timeout)
        except BaseException:
            conn.abort()
            raise
        if conn.closed:
            raise ConnectionLost("the connection closed right after its login")
        p = join_connection(self.params, result.params)
        engine = self._new_engine(p, result, cid, share)
        self._set_reader(conn, p, engine)
        return conn, engine, result

    async def _add_link(self, cid: int) -> None:
        """Add connection ``cid`` to the session."""
        share = self._engine
        if share is None:
            raise ConnectionLost("the session has no connection to join")
        conn, engine, _ = await self._join(cid, share)
        if self._engine is not share or self._state is not State.READY:
            conn.abort()
            raise ConnectionLost("the session changed while the connection logged in")
        old = self._links.get(cid)
        if old is not None:
            # Our own stale link under this CID (the target reinstated it).
            self._link_failed(old, ConnectionLost("replaced"))
        self._links[cid] = Link(cid, conn, engine)
        conn.logged_in = True
        conn.resume_parsing()
        self._schedule_flush()

    async def _recover_connection(self, old: InitiatorEngine, cmds: list[Command],
                                  cause: BaseException) -> None:
        """ERL 2, the session's last connection lost (§7.2.2): after
        DefaultTime2Wait, log in a connection with the same CID to the same
        session -- which implicitly removes the old one for recovery
        (§6.3.4) -- and move its commands there (sent again as they were,
        or TASK REASSIGN). If that fails within DefaultTime2Retain, the
        target has given the tasks up: recover the session instead."""
        cid = old.cid
        p = self.params
        deadline = self._loop.time() + min(p.default_time2retain, self.options.replacement_timeout)
        wait = float(p.default_time2wait)
        last: BaseException = cause
        joined: tuple[Connection, InitiatorEngine, LoginResult] | None = None
        while joined is None and self._loop.time() < deadline:
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - self._loop.time())))
            self._cmdsn = old.cmdsn
            try:
                joined = await self._join(cid, old)
            except (InitiatorError, OSError, ProtocolError, TimeoutError) as exc:
                last = exc
                log.warning("connection recovery to %s failed: %s", self.portal, describe(exc))
                if isinstance(exc, LoginRefused) and \
                        exc.status == LoginStatus.SESSION_DOES_NOT_EXIST:
                    break  # the target ended the session: nothing to join
                wait = max(wait, 1.0)
        if joined is None:
            log.warning("connection to %s not recovered (DefaultTime2Retain %d s; last: %s); "
                        "recovering the session", self.portal, p.default_time2retain,
                        describe(last))
            self._recovery = None
            self._session_recovery(cmds, last)
            return
        conn, engine, result = joined
        self._conn, self._engine, self._cid = conn, engine, cid
        engine.window.update(result.expcmdsn, result.maxcmdsn)
        self._state = State.READY
        self.connection_recoveries += 1
        self._recovery = None
        log.info("connection CID %d to %s recovered (ErrorRecoveryLevel 2)", cid, self.portal)
        now = self._loop.time()
        backlog, self._backlog = list(self._backlog), type(self._backlog)()
        conn.logged_in = True
        conn.resume_parsing()
        self._orphans += cmds
        taken = self._resend(cid, [c for c in cmds if c in self._orphans], True)
        self._orphans = [c for c in self._orphans if c not in cmds]
        for cmd in backlog:
            engine.submit(cmd, now)
        self._schedule_flush()
        if taken:
            await self._reassign(cid, taken)

    # ------------------------------------------------------- losing them
    def _drop_links(self) -> list[Command]:
        """Close every extra connection (session recovery or the end):
        return their commands and those of earlier losses."""
        cmds, self._orphans = self._orphans, []
        for link in list(self._links.values()):
            del self._links[link.cid]
            link.conn.abort()
            self._pings += link.engine.target_pings
            cmds += link.engine.close()
        return sorted(cmds, key=lambda c: c.seq)

    def _promote(self, exc: BaseException) -> bool:
        """The leading connection failed: hand its role to another one.
        Returns False when there is none (the session recovers whole)."""
        if not self._links or self._state is not State.READY:
            return False
        conn, engine = self._conn, self._engine
        assert conn is not None and engine is not None
        new = self._links.pop(min(self._links))
        self._conn, self._engine, self._cid = new.conn, new.engine, new.cid
        # Exchanges (ping, Text, TMF) went on the lost connection.
        lost = ConnectionLost(f"connection CID {engine.cid} to {self.portal} lost")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(lost)
        self._waiters.clear()
        self._lose(Link(engine.cid, conn, engine), exc)
        return True

    def _link_failed(self, link: Link, exc: BaseException) -> None:
        """An extra connection broke (or its engine gave up on it)."""
        if self._links.get(link.cid) is link:
            del self._links[link.cid]
        self._lose(link, exc)

    def _lose(self, link: Link, exc: BaseException) -> None:
        link.conn.abort()
        self._pings += link.engine.target_pings
        cmds = link.engine.close()
        if self._state is not State.READY:
            self._orphans += cmds
            return
        log.warning("connection CID %d to %s failed (%s); the session carries on over %d "
                    "other(s)", link.cid, self.portal, describe(exc), self.connection_count)
        self._orphans += cmds
        self._spawn(self._clean_up(link.cid, cmds))

    async def _logout_connection(self, conn: Connection) -> None:
        """Log one connection out (reason "close the connection", §11.14.1),
        as an Async Message asked; its commands are then handled as those
        of a lost connection, and it is replaced."""
        engine = self._engine_of(conn)
        if engine is None or self._state is not State.READY:
            return
        itt = engine.logout(self._loop.time(), LogoutReason.CLOSE_CONNECTION)
        fut: asyncio.Future[Answer] = self._loop.create_future()
        self._waiters[itt] = fut
        self._schedule_flush()
        with contextlib.suppress(TimeoutError, InitiatorError):
            await asyncio.wait_for(fut, self.options.tmf_timeout)
        self._waiters.pop(itt, None)
        if self._engine_of(conn) is engine:
            self.connection_failed(conn, ConnectionResetError(
                "logged out at the target's request"))

    async def _clean_up(self, cid: int, cmds: list[Command]) -> None:
        """Log the lost connection out from a surviving one, then send its
        commands again as the module docstring says, then replace it."""
        engine = self._engine
        ok = False
        # ERL 2: "remove the connection for recovery" keeps its tasks at
        # the target for TASK REASSIGN (§11.14.1, §7.2.2).
        erl2 = self.params.error_recovery_level >= 2
        reason = (LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY if erl2
                  else LogoutReason.CLOSE_CONNECTION)
        if engine is not None and self._state is State.READY:
            try:
                rsp = await self._exchange(lambda now: engine.logout(
                    now, reason, cid), self.options.tmf_timeout)
                # CID not found: the target already dropped it (and with it
                # its tasks): as good as logged out.
                ok = isinstance(rsp, LogoutDone) and rsp.response in (
                    LogoutResponseCode.SUCCESS, LogoutResponseCode.CID_NOT_FOUND)
            except (TimeoutError, InitiatorError):
                ok = False
        mine = [c for c in cmds if c in self._orphans]
        if (cmds and not mine) or self._state is not State.READY:
            return  # taken by a session recovery or the end meanwhile
        if not ok or self._state is not State.READY or self._engine is None:
            # The target could not confirm the connection is gone: the
            # commands wait for a recovery of the whole session.
            conn = self._conn
            if conn is not None and self._state is State.READY:
                # All connections go (no promotion): session reinstatement
                # then reissues everything in order (§7.1.4.3).
                self._orphans = self._drop_links()
                self.connection_failed(conn, ConnectionLost(
                    f"could not log out lost connection CID {cid}"))
            return
        self._orphans = [c for c in self._orphans if c not in mine]
        taken = self._resend(cid, mine, erl2)
        self._schedule_flush()
        if taken:
            await self._reassign(cid, taken)
        for attempt in range(_REPLACE_ATTEMPTS):
            if self._state is not State.READY or cid in self._links:
                return
            try:
                await self._add_link(cid)
                log.info("connection CID %d to %s replaced", cid, self.portal)
                return
            except (InitiatorError, OSError, ProtocolError, TimeoutError) as exc:
                log.warning("could not replace connection CID %d to %s: %s", cid,
                            self.portal, describe(exc))
                # Paced like the session's own logins (§6.1: Time2Wait).
                await asyncio.sleep(float(self.params.default_time2wait or 1) * (attempt + 1))

    def _resend(self, cid: int, cmds: list[Command], erl2: bool) -> list[Command]:
        """Send the lost connection's commands again (module docstring);
        at ERL 2 return those the target took, for TASK REASSIGN."""
        engine = self._engine
        assert engine is not None
        now = self._loop.time()
        exp = engine.window.exp_cmdsn
        tags = engine.tags
        retried = reissued = failed = 0
        taken: list[Command] = []
        for cmd in sorted(cmds, key=lambda c: c.seq):
            fut = cast("asyncio.Future[ScsiResult]", cmd.handle)
            target = self._pick()
            assert target is not None
            if fut.done():
                if cmd.sent:
                    tags.discard(cmd.itt)
            elif cmd.timed_out:
                if cmd.sent:
                    tags.discard(cmd.itt)
                failed += 1
                self._fail(cmd, CommandTimedOut(
                    f"no status for CDB 0x{cmd.cdb[0]:02x} within the command timeout; its "
                    f"connection CID {cid} was lost meanwhile"))
            elif not cmd.sent:
                target.submit(cmd, now)  # never left us: send it as new
            elif not sn_lt(cmd.cmdsn, exp):
                # The target never took it: the same command again (§7.2.1).
                target.retry(cmd, now)
                retried += 1
            elif erl2:
                taken.append(cmd)
            elif self._ended(cid, cmd, target, now):
                reissued += 1
            else:
                failed += 1
        log.info("lost connection CID %d: %d command(s) sent again as they were, "
                 "%d reissued, %d failed, %d to reassign", cid, retried, reissued, failed,
                 len(taken))
        return taken

    def _ended(self, cid: int, cmd: Command, target: InitiatorEngine, now: float) -> bool:
        """A command of a lost connection that the target took and ended
        (ERL 0, or a TASK REASSIGN refused): reissued when it writes nothing
        (True), else failed."""
        target.tags.discard(cmd.itt)
        if cmd.data_out is None and not cmd.internal and self._policy.reissue(cmd):
            target.submit(cmd, now)
            return True
        what = ", its data may or may not be written" if cmd.data_out else ""
        self._fail(cmd, ConnectionLost(
            f"connection CID {cid} to {self.portal} lost while CDB 0x{cmd.cdb[0]:02x} ran: "
            f"the target ended it{what}"))
        return False

    async def _reassign(self, cid: int, cmds: list[Command]) -> None:
        """ERL 2 connection recovery (§7.2.2): move each command the lost
        connection ``cid`` left at the target to a surviving connection with
        TASK REASSIGN (§11.5.1); one the target cannot reassign is treated
        as at ERL 0."""
        engine = self._pick()
        if engine is None:
            return
        now = self._loop.time()
        waits: list[tuple[Command, asyncio.Future[Answer]]] = []
        for cmd in cmds:
            itt = engine.reassign(cmd, now)
            fut: asyncio.Future[Answer] = self._loop.create_future()
            self._waiters[itt] = fut
            waits.append((cmd, fut))
        self._schedule_flush()
        moved = 0
        for cmd, fut in waits:
            try:
                rsp: Answer | None = await asyncio.wait_for(fut, self.options.tmf_timeout)
            except (TimeoutError, InitiatorError):
                rsp = None
            if isinstance(rsp, TaskManagementDone) and \
                    rsp.response == TMResponse.FUNCTION_COMPLETE:
                moved += 1
                continue
            log.debug("TASK REASSIGN of ITT 0x%x (CmdSN %d) answered %s", cmd.itt, cmd.cmdsn,
                     getattr(rsp, "response", rsp))
            if engine.closed or engine.tasks.get(cmd.itt) is not cmd:
                continue  # lost again, or ended meanwhile: handled there
            engine.disown(cmd)
            if not cast("asyncio.Future[ScsiResult]", cmd.handle).done():
                self._ended(cid, cmd, engine, self._loop.time())
        log.info("connection CID %d: %d of %d task(s) reassigned to CID %d", cid, moved,
                 len(cmds), engine.cid)
        self._schedule_flush()
