"""Target-side sessions: TSIH, ISID, the CmdSN window and the connections
that belong to one I_T nexus (RFC 7143 §4.2, §6.3.5).

A session orders non-immediate commands by CmdSN across its connections
with :class:`iscsi.ffp.window.CmdSNWindow`, whose size is the configured
queue depth (RFC 7143 §4.2.2.1).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from iscsi.constants import LoginStatus
from iscsi.errors import LoginError
from iscsi.ffp.target import Event, TargetConnectionEngine, Task
from iscsi.ffp.window import CmdSNWindow
from iscsi.keys import NegotiatedParams
from target.scsi.types import Nexus

from .runtime import TargetRuntime
from .stats import IOCounters


class Member(Protocol):
    """What a session needs of one of its connections."""

    cid: int
    peer: str
    closed: bool
    #: Why the connection ended ("" while it has not).
    end_reason: str
    engine: TargetConnectionEngine | None
    session: Session | None

    def close(self, reason: str = "") -> None:
        """Flush and close the connection."""

    def abort(self, reason: str) -> None:
        """Drop the connection at once."""

    def end_tasks(self, retain: bool = False) -> None:
        """End the connection's tasks (ERL 0, RFC 7143 §7.1.4), or with
        ``retain`` at ERL 2 keep them for reassignment (§7.2.2)."""

    def deliver(self, events: list[Event]) -> None:
        """Act on events its engine produced."""

    def schedule_flush(self) -> None:
        """Write what its engine queued on the next loop turn."""

log = logging.getLogger("aioiscsi.target")

#: Why a session ends: the short code logged as the JSON field ``cause``,
#: and its words in the text line.
END_CAUSES = {
    "logout": "logged out",
    "connection_lost": "connection lost",
    "kicked": "ended by the administrator",
    "reinstated": "reinstated",
    "nop_timeout": "NOP timeout",
    "protocol_error": "protocol error",
    "shutdown": "target shutting down",
    "target_removed": "target removed",
    "acl": "initiator no longer in the ACL",
    "cold_reset": "TARGET COLD RESET",
    "closed": "connection closed",
}


def connection_end_cause(reason: str) -> tuple[str, str]:
    """The END_CAUSES code and the words for a connection's ``end_reason``.
    Besides our own reasons (shutdown; the peer closing or resetting the
    TCP connection), the full-feature engine ends a connection for two
    things only: an unanswered NOP-In (iscsi/ffp/target_control.py,
    RFC 7143 §11.19) and a PDU that leaves the stream untrustworthy
    (iscsi/ffp/target.py ``protocol_error``: digest or framing errors at
    ERL 0, §7.1.4)."""
    if not reason:
        return "closed", END_CAUSES["closed"]
    if reason.startswith(("connection lost", "connection closed by")):
        return "connection_lost", reason
    if reason == "target shutting down":
        return "shutdown", reason
    if reason == "logged out":
        return "logout", reason
    if reason.startswith("no NOP-Out answer"):
        return "nop_timeout", f"NOP timeout: {reason}"
    return "protocol_error", f"protocol error: {reason}"


@dataclass(eq=False)
class Session:
    """One iSCSI session on the target."""

    tsih: int
    isid: int
    initiator_name: str
    target_name: str
    discovery: bool
    portal_group_tag: int
    window: CmdSNWindow
    params: NegotiatedParams | None = None
    #: The target this session logged in to (None for Discovery).
    target: TargetRuntime | None = None
    nexus: Nexus | None = None  # built on first use
    connections: dict[int, Member] = field(default_factory=dict)
    closed: bool = False
    #: LUN -> I/O counters of this session's commands to it (target/stats.py).
    counters: dict[int, IOCounters] = field(default_factory=dict)
    #: time.monotonic() at login, for the session's age when it ends.
    started: float = field(default_factory=time.monotonic)
    #: The differencing image its commands use on a boot farm (target/farm.py;
    #: None: keyed by the initiator name, as multiattach LUNs are).
    overlay_key: str | None = None
    #: ERL 2: ITT -> (task, the engine of its failed connection, its CID),
    #: kept for TASK REASSIGN until DefaultTime2Retain passes (§7.2.2).
    retained: dict[int, tuple[Task, TargetConnectionEngine, int]] = field(default_factory=dict)

    @property
    def initiator_port(self) -> str:
        """The SCSI initiator port name (RFC 7143 §4.4.2)."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    def get_nexus(self) -> Nexus:
        """The SCSI I_T nexus of this session (built on first use)."""
        if self.nexus is None:
            tpgt = self.portal_group_tag
            self.nexus = Nexus.create(self.initiator_name, self.isid, self.target_name, tpgt,
                                      relative_port_id=tpgt, target_port_group=tpgt)
        return self.nexus

    def counters_for(self, lun: int) -> IOCounters:
        """The I/O counters of this session's commands to ``lun``."""
        counters = self.counters.get(lun)
        if counters is None:
            counters = self.counters[lun] = IOCounters()
        return counters

    def announce_drop(self, member: Member) -> None:
        """``member`` is being dropped for a reason of ours (NOP timeout,
        protocol error): when the session has other connections, say so on
        one of them (Async Message "connection drop", RFC 7143 §11.9.1), so
        the initiator recovers it at once rather than when it notices."""
        wait = self.params.default_time2wait if self.params is not None else 2
        for other in self.connections.values():
            if other is not member and other.engine is not None and not other.closed:
                other.engine.announce_drop(member.cid, wait, 0)
                other.schedule_flush()
                return

    def wake_others(self, member: Member | None) -> None:
        """After ``member`` moved the session's CmdSN window, commands held
        for it on the other connections may have become runnable (the
        window orders commands across connections, RFC 7143 §4.2.2.1): let
        those connections act on what their engines queued."""
        if member is not None and len(self.connections) < 2 and \
                self.connections.get(member.cid) is member:
            return
        for other in list(self.connections.values()):
            if other is member or other.engine is None or other.closed:
                continue
            pending = other.engine.take_events()
            if pending:
                other.deliver(pending)
            elif other.engine.outbox:
                other.schedule_flush()


class SessionTable:
    """Every session of the server by TSIH: allocation, lookup, ending.

    One owner for the rules: a TSIH is never 0 and never reused while a
    session or a login in progress holds it (RFC 7143 §11.12.6); a session
    ends with its last connection at ERL 0 (§7.1.4), and its I_T nexus is
    then lost to the SCSI layer (its reservations' unit attentions)."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._reserved: set[int] = set()

    def __len__(self) -> int:
        return len(self._by_tsih)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))

    def values(self) -> list[Session]:
        """The live sessions."""
        return list(self._by_tsih.values())

    def get(self, tsih: int) -> Session | None:
        """The session with ``tsih``, or None."""
        return self._by_tsih.get(tsih)

    def __getitem__(self, tsih: int) -> Session:
        return self._by_tsih[tsih]

    def of_target(self, rt: TargetRuntime) -> list[Session]:
        """The live sessions logged in to ``rt``."""
        return [s for s in self._by_tsih.values() if s.target is rt]

    def allocate_tsih(self) -> int:
        """A TSIH not in use or reserved by a login in progress."""
        # Random, not 1, 2, 3...: a TSIH is one of the three things a
        # non-leading login must name to reach a session, so it should not
        # be guessable from one's own (defence in depth beside the target
        # and authentication checks in the login policy).
        if len(self._by_tsih) + len(self._reserved) >= 0xFFFF:
            raise LoginError("no free TSIH: 65535 sessions exist", LoginStatus.OUT_OF_RESOURCES)
        while True:
            tsih = secrets.randbelow(0xFFFF) + 1
            if tsih not in self._by_tsih and tsih not in self._reserved:
                self._reserved.add(tsih)
                return tsih

    def release_tsih(self, tsih: int) -> None:
        """The login that reserved ``tsih`` made its session (or failed)."""
        self._reserved.discard(tsih)

    def add(self, sess: Session) -> None:
        """Register a new session under its TSIH."""
        self._by_tsih[sess.tsih] = sess
        self._reserved.discard(sess.tsih)

    def end(self, sess: Session, keep: Member | None = None, cause: str = "closed",
            detail: str = "") -> None:
        """Close a session and all its connections (except ``keep``, which
        closes itself after its last response). ``cause`` (a key of
        :data:`END_CAUSES`) and ``detail`` are the reason logged."""
        reason = END_CAUSES.get(cause, cause) + (f" ({detail})" if detail else "")
        if self._forget(sess, cause, reason, [c.peer for c in sess.connections.values()]):
            for c in list(sess.connections.values()):
                if c is not keep:
                    c.close()

    def _forget(self, sess: Session, cause: str, reason: str, peers: list[str]) -> bool:
        if sess.closed:
            return False
        sess.closed = True
        self._by_tsih.pop(sess.tsih, None)
        for task, owner, _ in sess.retained.values():
            owner.drop_retained(task)  # their slots and write budget return
        sess.retained.clear()
        if sess.target is not None and not sess.discovery and sess.nexus is not None:
            sess.target.scsi.nexus_lost(sess.nexus)
        if sess.target is not None and not sess.discovery:
            sess.target.session_ended(sess.tsih)
        log_session_end(sess, cause, reason, peers)
        return True

    def connection_closed(self, conn: Member, sess: Session | None) -> None:
        """A connection went away: at ERL 0 its session ends with it when it
        was the last one (RFC 7143 §7.1.4), for the connection's reason; at
        ERL 2 a session whose tasks wait for reassignment lives on until
        DefaultTime2Retain passes (§7.2.2)."""
        if sess is None:
            return
        if sess.connections.get(conn.cid) is conn:
            del sess.connections[conn.cid]
        if not sess.connections and not sess.retained:
            self._forget(sess, *connection_end_cause(conn.end_reason), [conn.peer])

    def retain(self, sess: Session, conn: Member, tasks: list[Task]) -> None:
        """ERL 2: a failed connection's tasks wait for TASK REASSIGN on
        another connection of the session for DefaultTime2Retain seconds
        (§7.2.2, §13.16), then end; so does the session if it has no
        connection left by then."""
        engine = conn.engine
        if engine is None:
            return
        for task in tasks:
            sess.retained[task.itt] = (task, engine, conn.cid)
        wait = sess.params.default_time2retain if sess.params is not None else 20
        asyncio.get_running_loop().call_later(wait, self._expire, sess, engine, conn.peer,
                                              conn.end_reason)

    def _expire(self, sess: Session, engine: TargetConnectionEngine, peer: str,
                reason: str) -> None:
        dropped = False
        for itt, (task, owner, _) in list(sess.retained.items()):
            if owner is engine:
                del sess.retained[itt]
                owner.drop_retained(task)
                dropped = True
        if dropped and not sess.closed:
            # Their window slots are free: held commands may run now.
            sess.wake_others(None)
        if not sess.connections and not sess.retained:
            self._forget(sess, *connection_end_cause(reason), [peer])


def log_session_end(sess: Session, cause: str, reason: str, peers: list[str]) -> None:
    """The one INFO line every session end gets: why, who, how long, how
    much; the JSON log format carries each as a field (``event`` is
    ``session_end``, ``cause`` a key of :data:`END_CAUSES`)."""
    total = IOCounters.total(sess.counters.values())
    age = time.monotonic() - sess.started
    address = ", ".join(dict.fromkeys(peers)) or "?"
    target = "discovery" if sess.discovery else sess.target_name
    log.info("session ended: %s; %s from %s to %s, TSIH %d, ISID 0x%012x, after %.1f s, "
             "%d commands", reason, sess.initiator_name, address, target, sess.tsih, sess.isid,
             age, total.commands,
             extra={"event": "session_end", "cause": cause, "reason": reason,
                    "initiator": sess.initiator_name, "address": address,
                    "target": None if sess.discovery else sess.target_name,
                    "session_type": "Discovery" if sess.discovery else "Normal",
                    "tsih": sess.tsih, "isid": f"0x{sess.isid:012x}",
                    "duration_s": round(age, 3), "commands": total.commands,
                    "read_bytes": total.read_bytes, "written_bytes": total.written_bytes,
                    "errors": total.errors})
