"""Connects the sans-I/O :class:`iscsi.login.TargetLogin` to the server:
the policy callbacks (targets, ACLs, CHAP, session table) and what happens
when a login ends -- a new session, session reinstatement, a connection
joining or reinstating in an existing session (RFC 7143 §6.3.5).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from iscsi.chap import ChapCredentials
from iscsi.constants import LoginStatus
from iscsi.errors import LoginError, ProtocolError
from iscsi.keys import NegotiatedParams
from iscsi.login import LoginRedirect, LoginTarget, TargetAuth, TargetLogin, join_connection
from iscsi.pdu import LoginRequest, LoginResponse
from target.backends.base import OutOfResources
from target.farm import FarmBusy

from .config import ChapConfig, Limits, ServerConfig, TargetSpec
from iscsi.ffp.window import CmdSNWindow

from .session import Session
from .stats import login_failures

from .connection import TargetConnection
from .runtime import TargetRuntime
from .session import SessionTable


class LoginServer(Protocol):
    """What a login needs of the server: its targets, configuration and
    session table."""

    config: ServerConfig
    targets: dict[str, TargetRuntime]
    sessions: SessionTable

    def allocate_tsih(self) -> int:
        """A fresh TSIH."""

    def end_session(self, sess: Session, keep: TargetConnection | None = None,
                    cause: str = "closed", detail: str = "") -> None:
        """End ``sess`` and its connections (``cause``: why, for the log)."""

log = logging.getLogger("aioiscsi.target")


def target_auth(chap: ChapConfig | None) -> TargetAuth | None:
    """The login's view of a CHAP configuration."""
    if chap is None:
        return None
    outgoing = None
    if chap.mutual_user and chap.mutual_secret:
        outgoing = ChapCredentials(chap.mutual_user, chap.mutual_secret)
    return TargetAuth(incoming=ChapCredentials(chap.user, chap.secret), outgoing=outgoing)


def limits_offers(limits: Limits) -> dict[str, str]:
    """Operational keys the target offers/accepts, from its configured limits."""
    yes = {True: "Yes", False: "No"}
    return {
        "HeaderDigest": ",".join(limits.header_digests),
        "DataDigest": ",".join(limits.data_digests),
        "MaxConnections": str(limits.max_connections),
        "InitialR2T": yes[limits.initial_r2t],
        "ImmediateData": yes[limits.immediate_data],
        "MaxRecvDataSegmentLength": str(limits.max_recv_data_segment_length),
        "MaxBurstLength": str(limits.max_burst_length),
        "FirstBurstLength": str(limits.first_burst_length),
        "MaxOutstandingR2T": str(limits.max_outstanding_r2t),
        # Up to the configured level (RFC 7143 §7.1.5, §13.20: the lower of
        # both offers wins, so initiators asking 0 get 0); 1 adds SNACK and
        # recovery R2Ts, 2 connection recovery (TASK REASSIGN).
        "ErrorRecoveryLevel": str(limits.error_recovery_level),
        "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes",
    }


@dataclass(frozen=True)
class _Target:
    """A configured target as the login sees it."""

    spec: TargetSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alias(self) -> str | None:
        return self.spec.alias

    @property
    def auth(self) -> TargetAuth | None:
        return target_auth(self.spec.chap)

    @property
    def offers(self) -> Mapping[str, str]:
        return limits_offers(self.spec.limits)

    def initiator_allowed(self, initiator_name: str) -> bool:
        return self.spec.allows(initiator_name)


class _Policy:
    """Per-connection login policy backed by the server."""

    def __init__(self, server: LoginServer, conn: TargetConnection) -> None:
        self.server = server
        self.conn = conn
        # The login holds this policy; a weak reference back keeps the pair
        # out of a reference cycle, so a connection that closes mid-login is
        # freed by reference counting alone.
        self._login: weakref.ref[TargetLogin] | None = None
        #: The boot farm overlay the new session uses (allocate_tsih), and
        #: the farm that admitted it until the session exists.
        self.overlay_key: str | None = None
        self.admitted: tuple[TargetRuntime, int] | None = None

    @property
    def login(self) -> TargetLogin | None:
        """The login this policy serves (while it exists)."""
        return self._login() if self._login is not None else None

    @login.setter
    def login(self, login: TargetLogin) -> None:
        self._login = weakref.ref(login)

    def find_target(self, name: str) -> LoginTarget | None:
        rt = self.server.targets.get(name)
        if rt is None:
            return None
        # Only targets in this connection's portal group are reachable here.
        if self.conn.portal_group_tag not in rt.spec.portal_groups:
            return None
        if rt.spec.redirect is not None:
            # §11.13.5: status class 1 with TargetAddress; the initiator
            # logs in there instead.
            raise LoginRedirect(rt.spec.redirect, permanent=rt.spec.redirect_permanent)
        login = self.login
        if login is not None:
            login.cmd_window = rt.spec.limits.queue_depth
        return _Target(rt.spec)

    def discovery_auth(self, initiator_name: str) -> TargetAuth | None:
        return target_auth(self.server.config.discovery_chap)

    def session_exists(self, isid: int, tsih: int, initiator_name: str,
                       target_name: str | None) -> bool:
        sess = self.server.sessions.get(tsih)
        # A non-leading login joins exactly one I_T nexus (RFC 7143 §6.3.5):
        # the same initiator port (name + ISID), the same target -- whose
        # CHAP and ACL this login has just passed -- and the same portal
        # group (all connections of a session share one, §4.4.1). Anything
        # else is "session does not exist", never a way into another
        # target's session.
        if sess is None or sess.closed or sess.isid != isid or \
                sess.initiator_name != initiator_name or \
                sess.discovery != (target_name is None) or \
                (target_name is not None and sess.target_name != target_name) or \
                sess.portal_group_tag != self.conn.portal_group_tag:
            return False
        login = self.login
        cid = login.cid if login is not None else -1
        if login is not None:
            window = sess.window
            login.session_window = lambda: (window.expcmdsn, window.maxcmdsn)
        limit = sess.params.max_connections if sess.params is not None else 1
        if cid not in sess.connections and len(sess.connections) >= limit:
            raise LoginError(f"session TSIH {tsih} already has {limit} connection(s)",
                             LoginStatus.TOO_MANY_CONNECTIONS)
        return True

    def allocate_tsih(self, isid: int, initiator_name: str,
                      target_name: str | None = None) -> int:
        tsih = self.server.allocate_tsih()
        rt = self.server.targets.get(target_name) if target_name else None
        if rt is not None and rt.farm is not None:
            # A boot farm makes the machine's overlay now, after CHAP and
            # the ACL passed: a limit refuses the login with "out of
            # resources" (RFC 7143 §11.13.5, 0x0302), not its first write.
            try:
                self.overlay_key = rt.session_started(tsih, initiator_name, isid)
                self.admitted = (rt, tsih)
            except OutOfResources as exc:
                self.server.sessions.release_tsih(tsih)
                raise LoginError(f"boot farm: {exc}", LoginStatus.OUT_OF_RESOURCES) from None
            except FarmBusy as exc:
                self.server.sessions.release_tsih(tsih)
                raise LoginError(f"boot farm: {exc}", LoginStatus.SERVICE_UNAVAILABLE) from None
        return tsih


def make_target_login(server: LoginServer, conn: TargetConnection) -> TargetLogin:
    """A fresh login state machine for ``conn``."""
    policy = _Policy(server, conn)
    login = TargetLogin(policy, conn.portal_group_tag, initial_statsn=conn.statsn,
                        now=conn.loop.time(), timeout=server.config.login_timeout)
    policy.login = login
    return login


def handle_login(server: LoginServer, conn: TargetConnection, req: LoginRequest) -> None:
    """Feed one Login Request; send the response; act on the outcome."""
    login = conn.login
    assert login is not None
    resp = login.receive(req)
    conn.send(resp)
    if login.failed_status is not None:
        _log_refusal(conn, login, resp)
        abandon_login(login)
        conn.close()
        return
    if login.complete:
        _complete(server, conn, login, req)


def _log_refusal(conn: TargetConnection, login: TargetLogin, resp: LoginResponse) -> None:
    status = login.failed_status
    assert status is not None
    login_failures[status.words] += 1
    # A redirection (status class 1) is this target's configuration doing
    # its job, not a failure: said at INFO.
    level = logging.INFO if status.value >> 8 == 1 else logging.WARNING
    log.log(level, "%s: login refused: %s (status 0x%04x) for initiator %s target %s: %s",
                conn.peer, status.words, status.value, login.initiator_name or "?",
                login.target_name or ("(discovery)" if login.session_type == "Discovery" else "?"),
                login.failure_reason,
                extra={"event": "login_failed", "reason": status.words,
                       "status": f"0x{status.value:04x}", "address": conn.peer,
                       "initiator": login.initiator_name, "target": login.target_name,
                       "detail": login.failure_reason})


def abandon_login(login: TargetLogin) -> None:
    """A login that a boot farm admitted ended without a session (it
    failed after allocating the TSIH, or its connection went away): the
    farm forgets it, so its overlay is not held for a session that never
    existed."""
    policy = login.policy
    if isinstance(policy, _Policy) and policy.admitted is not None:
        rt, tsih = policy.admitted
        policy.admitted = None
        rt.session_ended(tsih)


def reject_login(server: LoginServer, conn: TargetConnection, exc: ProtocolError) -> None:
    """A malformed PDU during login: answer with a Login reject when we can
    build one (we know the ITT from the header), then close."""
    status = exc.login_status or LoginStatus.INITIATOR_ERROR
    hdr = exc.header
    if hdr is not None and len(hdr) >= 48 and (hdr[0] & 0x3F) == 0x03:
        itt = int.from_bytes(hdr[16:20], "big")
        isid = int.from_bytes(hdr[8:14], "big")
        conn.send(LoginResponse(itt=itt, isid=isid, statsn=conn.statsn,
                                status_class=status.status_class,
                                status_detail=status.status_detail))
    log.warning("%s: login refused: malformed PDU: %s", conn.peer, exc,
                extra={"event": "login_failed", "reason": "malformed PDU",
                       "address": conn.peer, "detail": str(exc)})
    login_failures["malformed PDU"] += 1
    conn.close()


def _complete(server: LoginServer, conn: TargetConnection, login: TargetLogin,
              req: LoginRequest) -> None:
    params = login.params
    initiator = login.initiator_name or ""
    discovery = params.discovery
    rt = None if discovery else server.targets.get(login.target_name or "")
    if login.leading:
        # Session reinstatement (§6.3.5): a new leading login with the ISID
        # of an existing session of the same initiator and target ends it.
        for old in list(server.sessions.values()):
            if old.isid == login.isid and old.initiator_name == initiator and \
                    old.target_name == (login.target_name or "") and not old.closed:
                server.end_session(old, cause="reinstated",
                                   detail=f"new login from {conn.peer}")
        sess = Session(
            tsih=login.tsih, isid=login.isid, initiator_name=initiator,
            target_name=login.target_name or "", discovery=discovery,
            portal_group_tag=conn.portal_group_tag,
            window=CmdSNWindow(req.cmdsn, rt.spec.limits.queue_depth if rt is not None else 8),
            params=params, target=rt)
        policy = login.policy
        if isinstance(policy, _Policy):
            sess.overlay_key = policy.overlay_key
            policy.admitted = None  # the session ends it from now on
        server.sessions.add(sess)
    else:
        # The login checked the session (same initiator port, target and
        # portal group) just before its final response, on this same turn
        # of the loop, so it is still there.
        sess = server.sessions[login.tsih]
        if sess.params is not None:
            params = join_connection(sess.params, params)
        old_conn = sess.connections.get(login.cid)
        if old_conn is not None:
            # Connection reinstatement: the old connection's tasks end at
            # ERL 0 (kept for TASK REASSIGN at ERL 2) and the connection is
            # dropped (§6.3.4, §6.3.5, §7.1.4).
            log.info("%s: reinstating connection CID %d", conn.peer, login.cid)
            del sess.connections[login.cid]
            # Its tasks end here, while it still knows its session, so their
            # CmdSN slots return to the window the new connection uses.
            old_conn.end_tasks(retain=True)
            old_conn.session = None
            old_conn.abort("connection reinstated")
    conn.cid = login.cid
    sess.connections[login.cid] = conn
    conn.statsn = login.next_statsn
    # The policy holds the connection: break that cycle now the login is done.
    conn.login = None
    log_login(conn.peer, sess, login.cid, params, login.leading)
    conn.login_complete(sess, params)
    if rt is not None and login.leading:
        rt.scsi.add_nexus(sess.get_nexus())


def log_login(peer: str, sess: Session, cid: int, params: NegotiatedParams,
              leading: bool = True) -> None:
    """One INFO line per login with what an administrator checks first:
    who, from where, to what, which session and connection, digests and
    the data-size limits (RFC 7143 §13); every negotiated value at DEBUG.
    The JSON log format carries each as a field (``event`` is ``login``)."""
    digest = {True: "CRC32C", False: "None"}
    kind = "Discovery" if sess.discovery else "Normal"
    fields: dict[str, object] = {
        "event": "login", "initiator": sess.initiator_name, "address": peer,
        "target": None if sess.discovery else sess.target_name, "session_type": kind,
        "tsih": sess.tsih, "isid": f"0x{sess.isid:012x}", "cid": cid, "leading": leading,
        "header_digest": digest[params.header_digest], "data_digest": digest[params.data_digest],
        "max_recv_data_segment_length": params.max_recv_data_segment_length,
        "max_xmit_data_segment_length": params.max_xmit_data_segment_length,
        "max_burst_length": params.max_burst_length,
        "first_burst_length": params.first_burst_length,
    }
    log.info("login: %s from %s to %s (%s session, TSIH %d, ISID 0x%012x, CID %d%s): "
             "HeaderDigest=%s DataDigest=%s MaxRecvDataSegmentLength=%d (initiator's %d) "
             "MaxBurstLength=%d FirstBurstLength=%d", sess.initiator_name, peer,
             "discovery" if sess.discovery else sess.target_name, kind, sess.tsih, sess.isid,
             cid, "" if leading else ", joining the session", fields["header_digest"],
             fields["data_digest"], params.max_recv_data_segment_length,
             params.max_xmit_data_segment_length, params.max_burst_length,
             params.first_burst_length, extra=fields)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("login parameters of TSIH %d CID %d: %s", sess.tsih, cid, params,
                  extra={"event": "login_parameters", "tsih": sess.tsih, "cid": cid,
                         "parameters": dataclasses.asdict(params)})
