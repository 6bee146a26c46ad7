"""The session-wide requests a connection's engine hands up to the server:
Logout (RFC 7143 §11.14, including "remove the connection for recovery" at
ERL 2) and Task Management Functions (§11.5, SAM-5 §7), which reach tasks on
every connection of a session or of every session.

:class:`SessionRequests` is a mixin of :class:`target.server.TargetServer`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from iscsi.constants import LogoutReason, LogoutResponseCode, TMFunction, TMResponse
from iscsi.ffp.target import LogoutRequested, ManageTasks, Task
from target.scsi.sanitize import DETACHED_ON_ABORT
from target.scsi.types import Nexus

from .connection import TargetConnection
from .faults import FaultInjector
from .runtime import TargetRuntime
from .session import Member, Session

log = logging.getLogger("aioiscsi.target")


class SessionRequests:
    """Logout and task management, for every connection of the server."""

    #: SCSI commands executing (asyncio futures); a TMF answer waiting for
    #: its tasks joins them.
    inflight: set[asyncio.Future[Any]]
    #: ``serve --fault``: told about logouts for its report.
    faults: FaultInjector | None

    if TYPE_CHECKING:  # provided by the server
        def nexus_for(self, conn: TargetConnection) -> Nexus: ...
        def tasks_for_lun(self, rt: TargetRuntime,
                          lun: int | None) -> list[tuple[Member, Task]]: ...
        def end_session(self, sess: Session, keep: Any = None, cause: str = "closed",
                        detail: str = "") -> None: ...
        def drop_all_sessions(self, rt: TargetRuntime) -> None: ...

    def logout(self, conn: TargetConnection, ev: LogoutRequested) -> None:
        """A Logout Request's turn came (RFC 7143 §11.14): answer it and end
        the session or the named connection."""
        sess = conn.session
        engine = conn.engine
        assert sess is not None and engine is not None
        if ev.reason == LogoutReason.CLOSE_CONNECTION and ev.cid not in sess.connections:
            engine.logout_answer(ev.itt, LogoutResponseCode.CID_NOT_FOUND)
            return
        if ev.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            self._remove_for_recovery(conn, sess, ev)
            return
        named = sess.connections.get(ev.cid)
        if ev.reason == LogoutReason.CLOSE_CONNECTION and named is not None and named is not conn:
            # Closing another connection (the initiator cleaning up one it
            # lost) terminates its commands, acknowledged or not, before we
            # answer (§11.14.1): the commands it held for their CmdSN turn
            # are forgotten, so the initiator may retry them here (§7.2.1).
            named.end_tasks()
        engine.logout_answer(ev.itt, LogoutResponseCode.SUCCESS)
        what = ("close the session" if ev.reason == LogoutReason.CLOSE_SESSION else
                f"close connection CID {ev.cid}" if ev.reason == LogoutReason.CLOSE_CONNECTION
                else f"remove connection CID {ev.cid} for recovery")
        target = "discovery" if sess.discovery else sess.target_name
        if self.faults is not None:
            self.faults.on_logout(sess.initiator_name, asyncio.get_running_loop().time())
        log.info("logout: %s from %s of %s (TSIH %d, ISID 0x%012x, CID %d): %s",
                 sess.initiator_name, conn.peer, target, sess.tsih, sess.isid, conn.cid, what,
                 extra={"event": "logout", "initiator": sess.initiator_name,
                        "address": conn.peer, "target": None if sess.discovery else target,
                        "tsih": sess.tsih, "isid": f"0x{sess.isid:012x}", "cid": conn.cid,
                        "logout_reason": int(ev.reason), "closes_cid": ev.cid})
        if ev.reason == LogoutReason.CLOSE_SESSION:
            self.end_session(sess, keep=conn, cause="logout")
        other = sess.connections.get(ev.cid, conn)
        # When it was the session's last connection, the session ends
        # with it for this reason (target/session.py).
        other.end_reason = other.end_reason or "logged out"
        other.close()
        if other is not conn and ev.reason == LogoutReason.CLOSE_SESSION:
            conn.close()

    def _remove_for_recovery(self, conn: TargetConnection, sess: Session,
                             ev: LogoutRequested) -> None:
        """Logout reason 2 at ERL 2 (§11.14.1): the named connection goes,
        its tasks stay for TASK REASSIGN (requests it sent that were not yet
        acknowledged are discarded), and the answer gives Time2Wait and
        Time2Retain. A connection that already failed has done all that."""
        engine = conn.engine
        assert engine is not None
        p = sess.params
        t2w, t2r = (p.default_time2wait, p.default_time2retain) if p is not None else (2, 20)
        named = sess.connections.get(ev.cid)
        if named is None:
            known = any(cid == ev.cid for _, _, cid in sess.retained.values())
            engine.logout_answer(ev.itt, LogoutResponseCode.SUCCESS if known
                                 else LogoutResponseCode.CID_NOT_FOUND, t2w, t2r)
            return
        named.end_tasks(retain=True)
        engine.logout_answer(ev.itt, LogoutResponseCode.SUCCESS, t2w, t2r)
        log.info("logout: %s from %s (TSIH %d, CID %d): remove connection CID %d for recovery",
                 sess.initiator_name, conn.peer, sess.tsih, conn.cid, ev.cid,
                 extra={"event": "logout", "initiator": sess.initiator_name,
                        "address": conn.peer, "tsih": sess.tsih, "cid": conn.cid,
                        "logout_reason": int(ev.reason), "closes_cid": ev.cid})
        named.end_reason = named.end_reason or "removed for recovery"
        named.close()

    def manage_tasks(self, conn: TargetConnection, ev: ManageTasks) -> None:
        """Carry out a Task Management Function (RFC 7143 §11.5, SAM-5 §7)
        across the tasks it reaches, then answer once every affected task
        has ended (§4.2.3.3), so the initiator can rely on them being gone."""
        sess = conn.session
        assert sess is not None and sess.target is not None and conn.engine is not None
        rt = sess.target
        fn, lun = ev.function, ev.lun
        nexus = self.nexus_for(conn)
        response = TMResponse.FUNCTION_COMPLETE
        # (owning connection, task): a TMF reaches tasks on every connection
        # of its session (ABORT TASK, ABORT TASK SET, I_T NEXUS RESET) or of
        # every session (CLEAR TASK SET, the resets), and each must leave the
        # connection -- and CmdSN window -- it belongs to.
        mine = [(c, t) for c in list(sess.connections.values()) if c.engine is not None
                for t in c.engine.tasks.values()]
        affected: list[tuple[Member, Task]] = []
        if fn in (TMFunction.ABORT_TASK_SET, TMFunction.CLEAR_TASK_SET,
                  TMFunction.LOGICAL_UNIT_RESET, TMFunction.CLEAR_ACA) and \
                lun not in rt.scsi_luns:
            # Functions addressed to a logical unit answer "LUN does not
            # exist" for one we do not have (§11.6.1), CLEAR ACA included
            # (it names a LUN, SAM-5 §7.4).
            response = TMResponse.LUN_DOES_NOT_EXIST
        elif fn == TMFunction.ABORT_TASK:
            affected = [(c, t) for c, t in mine if t.itt == ev.referenced_task_tag]
            if not affected and not sess.window.cancel(ev.refcmdsn, ev.cmdsn):
                response = TMResponse.TASK_DOES_NOT_EXIST
        elif fn == TMFunction.ABORT_TASK_SET:
            affected = [(c, t) for c, t in mine if t.lun == lun]  # SAM-5 §7.3
            rt.scsi.abort_task_set(nexus, lun)
        elif fn == TMFunction.CLEAR_TASK_SET:
            affected = self.tasks_for_lun(rt, lun)  # the shared task set, SAM-5 §7.5
            rt.scsi.clear_task_set(nexus, lun)
        elif fn == TMFunction.LOGICAL_UNIT_RESET:
            affected = self.tasks_for_lun(rt, lun)
            rt.scsi.lu_reset(nexus, lun)
        elif fn in (TMFunction.TARGET_WARM_RESET, TMFunction.TARGET_COLD_RESET):
            affected = self.tasks_for_lun(rt, None)
            rt.scsi.target_reset(nexus, fn == TMFunction.TARGET_COLD_RESET)
        elif fn == TMFunction.CLEAR_ACA:
            rt.scsi.clear_aca(nexus, lun)
        elif fn == TMFunction.I_T_NEXUS_RESET:
            affected = mine
            rt.scsi.nexus_lost(nexus)
        elif fn == TMFunction.TASK_REASSIGN:
            # ERL 2 (§11.5.1, §7.2.2): a task of a failed connection moves
            # here; one whose connection is alive is "still allegiant".
            reassign = sess.retained.pop(ev.referenced_task_tag, None)
            if reassign is None:
                response = TMResponse.TASK_STILL_ALLEGIANT if any(
                    t.itt == ev.referenced_task_tag for _, t in mine) \
                    else TMResponse.TASK_DOES_NOT_EXIST
        if fn != TMFunction.TASK_REASSIGN:
            reassign = None
        pending: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for owner, task in affected:
            assert owner.engine is not None
            if owner.engine.abort_task(task):
                if task.cmd.cdb[:1] and task.cmd.cdb[0] in DETACHED_ON_ABORT:
                    # Its work goes on without it (a SANITIZE, SBC-3
                    # §4.11.1); nothing of the command is left to wait for.
                    continue
                if not isinstance(task.waiter, asyncio.Future):
                    task.waiter = loop.create_future()
                pending.append(task.waiter)

        def respond() -> None:
            if sess.closed or conn.closed or conn.engine is None:
                return
            conn.engine.tmf_done(ev.itt, response)
            if reassign is not None:
                # After the answer, the task's data and status (§11.5.1).
                task, old, _ = reassign
                task.home = conn
                conn.engine.adopt(task, old, ev.expdatasn)
            conn.schedule_flush()
            if fn == TMFunction.TARGET_COLD_RESET and response == TMResponse.FUNCTION_COMPLETE:
                # A cold reset also ends every session (§11.5.1).
                self.drop_all_sessions(rt)

        if not pending:
            respond()
            return

        async def wait_then_respond() -> None:
            await asyncio.gather(*pending, return_exceptions=True)
            respond()
        fut = asyncio.ensure_future(wait_then_respond())
        self.inflight.add(fut)  # keep a reference until it is done
        fut.add_done_callback(self.inflight.discard)
