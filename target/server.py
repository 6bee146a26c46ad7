"""The iSCSI target server: listening portals, targets, sessions.

It owns everything that spans connections -- the session table (TSIH,
reinstatement, MaxConnections), discovery answers, the login policy the
sans-I/O login state machine consults (ACLs, CHAP secrets, limits) -- and
leaves the per-connection protocol to :mod:`target.connection`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from dataclasses import replace
from typing import Any

from iscsi.discovery import select_targets, send_targets_answer
from iscsi.errors import ProtocolError
from iscsi.ffp.target import Task, WriteBudget
from iscsi.login import TargetLogin
from target.malloc import release_memory, tune_malloc
from iscsi.names import Portal, format_portal
from iscsi.pdu import PDU, LoginRequest
from iscsi.text import encode_text
from target.backends.bandwidth import BandwidthGroups
from target.backends.base import BackendError
from target.isns import IsnsRegistrar, Snapshot
from target.scsi.types import Nexus

from .admin import Administration
from .farm_admin import FarmAdministration
from .faults import FaultInjector
from .config import ServerConfig, TargetSpec
from .config_toml import dump_config
from .connection import TargetConnection
from .control import ControlError, ControlServer
from .login_glue import abandon_login, handle_login, make_target_login, reject_login
from .media import MediaWatcher, open_medium
from .reload import ReloadReport, reload_server
from .runtime import TargetRuntime, build_target
from .sdnotify import notify
from .session_requests import SessionRequests
from .session import Member, Session, SessionTable
from .stats import IOCounters, login_failures

log = logging.getLogger("aioiscsi.target")

#: Seconds stop() waits for executing SCSI commands before flushing.
INFLIGHT_WAIT = 30.0
#: Closed connections between two returns of freed heap to the system.
TRIM_EVERY = 256


class TargetServer(Administration, FarmAdministration, SessionRequests):
    """Serves the targets of a :class:`ServerConfig` on its portals.

    ``control`` is the path of a control socket to open on :meth:`start`
    (``iscsi-target show`` and friends talk to it; see
    :mod:`target.control`); None opens none. Use as ``async with
    TargetServer(config) as server:`` to start and stop it. The live
    administration methods (:meth:`show`, :meth:`kick`, :meth:`add_lun`,
    :meth:`remove_lun`, :meth:`resize_lun`, :meth:`add_target`, ...) come
    from :class:`target.admin.Administration`; a boot farm's
    (:meth:`farm_list`, :meth:`farm_reset`, :meth:`farm_delete`,
    :meth:`farm_commit`, :meth:`farm_switch`, :meth:`farm_boot`) from
    :class:`target.farm_admin.FarmAdministration`.
    """

    def __init__(self, config: ServerConfig, *, control: str | None = None) -> None:
        self.config = config
        self.targets: dict[str, TargetRuntime] = {}
        self.connections: set[TargetConnection] = set()
        self.sessions = SessionTable()
        self._servers: list[asyncio.AbstractServer] = []
        self.media: MediaWatcher | None = None
        self.bandwidth = BandwidthGroups()
        self.bound: list[tuple[int, str, int]] = []  # (tpgt, host, port) actually bound
        #: SCSI commands executing (asyncio futures); stop() waits for them.
        self.inflight: set[asyncio.Future[Any]] = set()
        #: All sessions' write data in flight shares this budget.
        self.write_budget = WriteBudget(config.write_budget)
        self._refused = 0
        self._refused_logged = float("-inf")
        self._closed_since_trim = 0
        self._trim_scheduled = False
        self._stopped = False
        self.retired_counters: dict[tuple[str, int], IOCounters] = {}
        self.retiring: set[asyncio.Future[None]] = set()
        self._control_request = control
        #: Logins in progress, by connection (until their verdict).
        self._logins: dict[TargetConnection, TargetLogin] = {}
        self.control: ControlServer | None = None
        self.control_path: str | None = None
        #: Keeps an iSNS server's view current ([server] isns).
        self.isns: IsnsRegistrar | None = None
        #: ``serve --fault PROFILE``: misbehave on purpose (target/faults.py).
        self.faults: FaultInjector | None = (
            FaultInjector.from_text(config.fault_profile) if config.fault_profile else None)

    async def __aenter__(self) -> TargetServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --------------------------------------------------------------- startup
    def open(self) -> None:
        """Open every LUN (errors are one line: BackendError)."""
        for name, limit in self.config.bandwidth_groups:
            self.bandwidth.add(name, limit)
        for spec in self.config.targets:
            self.targets[spec.name] = build_target(spec, self.config.state_dir, self.bandwidth,
                                                   self.config.portal_groups)

    def set_bandwidth(self, group: str, limit: int | str | None) -> None:
        """Change a bandwidth group's limit while serving (VirtualBox's
        ``bandwidthctl set``); None = unlimited, 0 = paused."""
        self.bandwidth.set(group, limit)
        log.info("bandwidth group %s: limit %s", group, "unlimited" if limit is None else limit)

    def reload(self) -> ReloadReport:
        """SIGHUP / ``iscsi-target reload``: re-read the configuration file
        and apply its differences (targets, LUNs, ACLs, CHAP, limits,
        bandwidth groups); the report (also logged) lists what was applied
        and what needs a restart (see :mod:`target.reload`)."""
        return reload_server(self)

    def save_config(self, path: str | None = None) -> str:
        """The running configuration as TOML (``iscsi-target saveconfig``),
        written to ``path`` (mode 0600: it holds CHAP secrets) when given."""
        text = dump_config(replace(self.config, targets=tuple(
            rt.spec for rt in self.targets.values())))
        if path is not None:
            tmp = f"{path}.tmp{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a crash leaves the old file or the new one
            log.info("configuration saved to %s", path)
        return text

    async def start_control(self, path: str) -> None:
        """Open the control socket at ``path`` (ControlError when it is
        taken by a live target or cannot be created)."""
        control = ControlServer(self, path)
        await control.start()
        self.control, self.control_path = control, control.path

    async def start(self) -> None:
        """Open LUNs if needed and listen on every portal."""
        tune_malloc()  # per-command buffers without page-fault churn
        if not self.targets:
            self.open()
        loop = asyncio.get_running_loop()
        for group in self.config.portal_groups:
            for host, port in group.portals:
                tag = group.tag
                srv = await loop.create_server(
                    functools.partial(TargetConnection, self, tag),
                    host=host or None, port=port, reuse_address=True)
                self._servers.append(srv)
                for sock in srv.sockets:
                    addr = sock.getsockname()
                    self.bound.append((tag, addr[0], addr[1]))
        for tag, host, port in self.bound:
            log.info("listening on %s (portal group %d)", format_portal(host, port), tag)
        self.media = MediaWatcher(self)
        self.media.start()
        if self.config.isns:
            self.isns = IsnsRegistrar(self.config.isns, self._isns_snapshot)
            self.isns.start()
        if self._control_request is not None:
            await self.start_control(self._control_request)

    def _isns_snapshot(self) -> Snapshot:
        """What the iSNS registration carries: bound portals, and each
        target's name, alias and portal groups."""
        return (list(self.bound),
                [(rt.name, rt.spec.alias, rt.spec.portal_groups) for rt in self.targets.values()])

    def _isns_changed(self) -> None:
        if self.isns is not None:
            self.isns.changed()

    def change_medium(self, target: str, lun: int, path: str | None) -> bool:
        """Put the image at ``path`` in CD/DVD LUN ``lun`` of ``target``
        (None ejects). Returns False when the new image cannot be opened
        (the LUN then reports no medium)."""
        from target.backends.base import BackendError
        from target.scsi.mmc import CdromUnit


        rt = self.targets[target]
        unit = rt.scsi.luns[lun]
        if not isinstance(unit, CdromUnit):
            log.warning("LUN %d of %s is not a CD/DVD: no medium to change", lun, target)
            return False
        backend = None
        if path is not None:
            try:
                backend = open_medium(path)
            except BackendError as exc:
                log.warning("LUN %d of %s: cannot load new medium: %s", lun, target, exc)
        unit.change_medium(backend)  # closes the old image
        if backend is not None:
            rt.backends[lun] = backend
        else:
            rt.backends.pop(lun, None)
        log.info("LUN %d of %s: %s", lun, target,
                 f"medium changed to {path}" if backend is not None else "medium removed")
        return backend is not None

    async def stop(self, logout_wait: float = 2.0) -> None:
        """Stop accepting, ask every initiator to log out (Async Message),
        wait briefly for them, let commands already executing finish, then
        flush and close every backend. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.isns is not None:
            # Deregister first: initiators asking iSNS now must not be sent
            # to a target that is going away (RFC 4171 §5.6.5.4).
            await self.isns.stop()
        for srv in self._servers:
            srv.close()
        if self.control is not None:
            await self.control.close()
            self.control = self.control_path = None
        if self.media is not None:
            self.media.stop()
        conns = [c for c in self.connections if c.session is not None and not c.closed]
        for c in conns:
            c.request_logout(int(logout_wait))
        deadline = asyncio.get_running_loop().time() + logout_wait
        while any(not c.closed for c in conns) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.close("target shutting down")
        if self.inflight:
            # A write the backend is still executing must land before the
            # flush below, or an acknowledged-looking write could be lost
            # (DESIGN.md: nothing acknowledged is lost). Bounded, so a hung
            # backend cannot keep the process from exiting.
            _, pending = await asyncio.wait(set(self.inflight), timeout=INFLIGHT_WAIT)
            if pending:
                log.warning("%d command(s) still executing after %.0f s; flushing anyway",
                            len(pending), INFLIGHT_WAIT)
        if self.retiring:
            await asyncio.wait(set(self.retiring), timeout=INFLIGHT_WAIT)
        for rt in self.targets.values():
            for b in rt.backends.values():
                try:
                    await asyncio.to_thread(b.flush)
                except BackendError as exc:
                    # A network backend whose server is gone: say so and
                    # still close the others.
                    log.error("flushing %s at stop failed: %s", b.path or "a LUN", exc)
                b.close()
        for srv in self._servers:
            await srv.wait_closed()
        log.info("target stopped")

    # ------------------------------------------------------------ sessions
    def allocate_tsih(self) -> int:
        """A fresh TSIH (see :meth:`SessionTable.allocate_tsih`)."""
        return self.sessions.allocate_tsih()

    def release_tsih(self, tsih: int) -> None:
        """The login that reserved ``tsih`` has made its session."""
        self.sessions.release_tsih(tsih)

    def nexus_for(self, conn: TargetConnection) -> Nexus:
        """The SCSI I_T nexus of a connection's session."""
        assert conn.session is not None
        return conn.session.get_nexus()

    def tasks_for_lun(self, rt: TargetRuntime,
                      lun: int | None) -> list[tuple[Member, Task]]:
        """Every task on any session of ``rt`` addressed to ``lun`` (or all),
        with the connection that owns it (which must do the aborting)."""
        out: list[tuple[Member, Task]] = []
        for sess in self.sessions.of_target(rt):
            for c in sess.connections.values():
                if c.engine is not None:
                    out.extend((c, t) for t in c.engine.tasks.values()
                               if lun is None or t.lun == lun)
        return out

    def end_session(self, sess: Session, keep: Any = None, cause: str = "closed",
                    detail: str = "") -> None:
        """Close a session and all its connections (except ``keep``);
        ``cause`` (a key of :data:`target.session.END_CAUSES`) and
        ``detail`` are the reason its log line gives."""
        self.sessions.end(sess, keep, cause, detail)
        self.fold_counters(sess)

    def drop_all_sessions(self, rt: TargetRuntime) -> None:
        """After TARGET COLD RESET every session of the target ends."""
        for sess in self.sessions.of_target(rt):
            self.end_session(sess, cause="cold_reset")

    def admit_connection(self, conn: TargetConnection) -> bool:
        """A new TCP connection: refused beyond ``max_connections`` (one log
        line a second at most, however many are refused), so a flood of
        connections that never log in cannot exhaust memory or descriptors."""
        if len(self.connections) >= self.config.max_connections:
            self._refused += 1
            now = asyncio.get_running_loop().time()
            if now - self._refused_logged >= 1.0:
                log.warning("%s: connection refused: %d connections open (server.max_connections"
                            " = %d); %d refused since the last report", conn.peer,
                            len(self.connections), self.config.max_connections, self._refused)
                self._refused_logged, self._refused = now, 0
            return False
        self.connections.add(conn)
        return True

    def retain_tasks(self, sess: Session, conn: TargetConnection, tasks: list[Task]) -> None:
        """ERL 2: keep a failed connection's tasks for TASK REASSIGN
        (:meth:`SessionTable.retain`)."""
        self.sessions.retain(sess, conn, tasks)

    def connection_closed(self, conn: TargetConnection) -> None:
        """A connection went away (see :meth:`SessionTable.connection_closed`).
        After a burst of closes the freed heap goes back to the system."""
        login = self._logins.pop(conn, None)
        if login is not None and conn.session is None:
            abandon_login(login)
            # A login that never reached the state machine's verdict: it
            # ran out of time, or the initiator walked away (connection.py
            # logs how far it got). Counted for the metrics.
            if conn.end_reason == "login timeout":
                login_failures["login timeout"] += 1
            elif login.started and not login.complete and login.failed_status is None and \
                    conn.end_reason.startswith("connection"):
                login_failures["abandoned"] += 1
        if conn.session is not None:
            self.sessions.connection_closed(conn, conn.session)
            if conn.session.closed:
                self.fold_counters(conn.session)
        self._closed_since_trim += 1
        if (not self.connections or self._closed_since_trim >= TRIM_EVERY) and \
                not self._trim_scheduled:
            self._trim_scheduled = True
            asyncio.get_running_loop().call_soon(self._trim)

    def _trim(self) -> None:
        self._trim_scheduled = False
        self._closed_since_trim = 0
        release_memory()

    # ---------------------------------------------------------- discovery
    def portals_for(self, spec: TargetSpec, conn: TargetConnection) -> list[Portal]:
        """Every portal of every portal group of ``spec`` (RFC 7143 §13.8 TargetAddress);
        wildcard listeners report the address the initiator reached us on."""
        out: list[Portal] = []
        for tag, host, port in self.bound:
            if tag not in spec.portal_groups:
                continue
            if host in ("0.0.0.0", "::", ""):
                host = conn.local[0]
            portal = Portal(host, port, tag)
            if portal not in out:
                out.append(portal)
        return out

    def send_targets(self, conn: TargetConnection, value: str, initiator: str,
                     session_target: str | None) -> list[tuple[str, str]]:
        """The SendTargets answer (RFC 7143 §12.3): only targets this
        initiator may log in to, each with all its portals."""
        names = select_targets(value, self.targets, session_target)
        return send_targets_answer(
            (name, self.portals_for(self.targets[name].spec, conn)) for name in names
            if name in self.targets and self.targets[name].spec.allows(initiator))

    def answer_text(self, conn: TargetConnection, pairs: list[tuple[str, str]]) -> bytes:
        """Text Request in full feature phase: SendTargets; any other key is
        answered NotUnderstood (X- keys) or Reject (RFC 7143 §6.2)."""
        sess = conn.session
        assert sess is not None
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer.extend(self.send_targets(
                    conn, value, sess.initiator_name,
                    None if sess.discovery else sess.target_name))
            elif key.startswith(("X-", "X#")):
                answer.append((key, "NotUnderstood"))
            else:
                answer.append((key, "Reject"))
        return encode_text(answer)

    # --------------------------------------------------------------- login
    def new_login(self, conn: TargetConnection) -> TargetLogin:
        """Create the sans-I/O login state machine for a new connection."""
        login = make_target_login(self, conn)
        # Kept until the login's verdict (or the connection's end), so a
        # login that times out or is abandoned is counted by reason.
        self._logins[conn] = login
        return login

    def handle_login(self, conn: TargetConnection, req: LoginRequest) -> None:
        """Feed one Login Request to the connection's login state machine."""
        handle_login(self, conn, req)
        login = self._logins.get(conn)
        if login is not None and (login.complete or login.failed_status is not None):
            del self._logins[conn]

    def login_out_of_order(self, conn: TargetConnection, pdu: PDU) -> None:
        """A non-login PDU before login completed: Login reject with
        "invalid during login" is not possible without a Login Request, so
        the connection is dropped (RFC 7143 §6.3)."""
        log.warning("%s: %s before login completed; dropping", conn.peer, type(pdu).__name__,
                    extra={"event": "login_failed", "reason": "PDU before login",
                           "address": conn.peer})
        self._logins.pop(conn, None)
        login_failures["PDU before login"] += 1
        conn.abort("PDU before login")

    def login_protocol_error(self, conn: TargetConnection, exc: ProtocolError) -> None:
        """A malformed PDU during login ends it with an initiator error."""
        self._logins.pop(conn, None)
        reject_login(self, conn, exc)


async def serve(config: ServerConfig, *, ready: Any = None, control: str | None = None,
                control_required: bool = False) -> int:
    """Run a server until SIGINT/SIGTERM; returns the exit status.

    ``control`` is the control socket's path. When it is taken by another
    live target, ``control_required`` (the path was asked for) makes that
    an error (ControlError); otherwise (the default path) the server runs
    without one and says so in one warning line."""
    server = TargetServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a signal that arrives while we start must still stop
    # us cleanly (exit 0 after logging sessions out).
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    try:
        if control is not None:
            try:
                await server.start_control(control)
            except ControlError as exc:
                if control_required:
                    raise
                log.warning("%s; running without a control socket", exc)
        await server.start()
    except BaseException:
        if server.control is not None:
            await server.control.close()
        raise
    if os.path.exists(config.source):
        def reload() -> None:
            # MONOTONIC_USEC lets systemd 253+ tell this reload from an
            # earlier one (sd_notify(3); Type=notify-reload requires it).
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")
            try:
                server.reload()
            finally:
                notify("READY=1", _status(server))

        try:
            loop.add_signal_handler(signal.SIGHUP, reload)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    if ready is not None:
        ready(server)
    notify("READY=1", _status(server))  # systemd Type=notify
    await stop.wait()
    log.info("signal received: stopping")
    notify("STOPPING=1", "STATUS=logging sessions out")
    await server.stop()
    return 0


def _status(server: TargetServer) -> str:
    """The one-line STATUS systemctl status shows."""
    portals = ", ".join(dict.fromkeys(format_portal(h, p) for _, h, p in server.bound))
    return (f"STATUS=serving {len(server.config.targets)} target(s) on {portals}; "
            f"{len(server.sessions)} session(s)")
