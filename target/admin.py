"""Live administration of a running :class:`~target.server.TargetServer`:
what ``iscsi-target show|kick|lun|target|acl|chap|resize|media`` do,
as typed methods (the control socket, :mod:`target.control`, only calls
these).

Every change takes effect at once and is reflected in ``config`` (so
``saveconfig`` writes the running state). Errors are :class:`AdminError`
with a one-line message; nothing is half-applied.

What initiators see (SPC-4 §7.8, SAM-5 §6.2 unit attentions):

- a LUN added or removed: REPORTED LUNS DATA HAS CHANGED (3F/0E) on the
  other LUNs of the target, for every I_T nexus; commands to a removed LUN
  get LOGICAL UNIT NOT SUPPORTED (25/00). Linux logs the 3F/0E and emits a
  uevent (SDEV_EVT_LUN_CHANGE_REPORTED); the new LUN appears after a rescan
  (``iscsiadm -m session --rescan``).
- a LUN grown: CAPACITY DATA HAS CHANGED (2A/09) for every I_T nexus
  (SBC-3 §4.10), then READ CAPACITY reports the new size. Linux logs it and
  emits a uevent (SDEV_EVT_CAPACITY_CHANGE_REPORTED); the disk takes the
  new size when rescanned (``iscsiadm -m session --rescan``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from iscsi.names import InvalidName, format_portal, normalize_name
from target.backends.bandwidth import BandwidthGroups, ThrottledBackend
from target.backends.base import Backend, BackendError, DelegatingBackend
from target.backends.locking import reopening

from .config import (
    ALUA_STATES,
    ChapConfig,
    ConfigError,
    Limits,
    LunSpec,
    ServerConfig,
    TargetSpec,
    check_chap,
)

from .runtime import TargetRuntime, _safe, build_target, open_lun
from .session import Session, SessionTable
from .stats import IOCounters

if TYPE_CHECKING:
    from .media import MediaWatcher

log = logging.getLogger("aioiscsi.target")

#: REPORTED LUNS DATA HAS CHANGED (SPC-4 §7.8, table of ASC/ASCQ).
REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
#: Seconds a removed LUN's backend waits for commands still executing on
#: it before it is flushed and closed.
RETIRE_WAIT = 30.0


class AdminError(Exception):
    """An administrative request that cannot be carried out (one line)."""


class Administration:
    """The live-administration half of :class:`TargetServer` (a mixin: the
    attributes below are the server's)."""

    config: ServerConfig
    targets: dict[str, TargetRuntime]
    sessions: SessionTable
    bound: list[tuple[int, str, int]]
    bandwidth: BandwidthGroups
    inflight: set[asyncio.Future[Any]]
    media: MediaWatcher | None
    #: (target, LUN) -> counters of sessions that have ended.
    retired_counters: dict[tuple[str, int], IOCounters]
    #: Backends of removed LUNs being flushed and closed.
    retiring: set[asyncio.Future[None]]

    def _isns_changed(self) -> None:
        """Targets changed: the iSNS registration follows (server.py)."""
    #: The control socket's path while one is open.
    control_path: str | None

    if TYPE_CHECKING:
        def end_session(self, sess: Session, keep: Any = None, cause: str = "closed",
                        detail: str = "") -> None: ...

        def change_medium(self, target: str, lun: int, path: str | None) -> bool: ...

    # ------------------------------------------------------------- lookups
    def _target(self, name: str) -> TargetRuntime:
        rt = self.targets.get(name) or self.targets.get(_normal(name, "target name"))
        if rt is None:
            raise AdminError(f"no target {name} (targets: {', '.join(self.targets) or 'none'})")
        return rt

    def _set_spec(self, rt: TargetRuntime, spec: TargetSpec) -> None:
        rt.spec = spec
        self.config = replace(self.config, targets=tuple(
            r.spec for r in self.targets.values()))

    def _restart_media_watch(self) -> None:
        """Watch the ISO files of the LUNs that exist now."""
        from .media import MediaWatcher

        if self.media is not None:
            self.media.stop()
            self.media = MediaWatcher(self)
            self.media.start()

    # ------------------------------------------------------------- show
    def show(self) -> dict[str, Any]:
        """Everything ``iscsi-target show`` prints, as JSON-ready data:
        targets (LUNs with backend, format, size, mode and counters;
        portals; ACL; CHAP user names, never secrets; limits), the bound
        portals and every session."""
        sessions = self.session_info()
        return {
            "portals": [{"portal_group": tag, "portal": format_portal(h, p)}
                        for tag, h, p in self.bound],
            "control": self.control_path,
            "targets": [self._target_info(rt) for rt in self.targets.values()],
            "sessions": sessions,
        }

    def _target_info(self, rt: TargetRuntime) -> dict[str, Any]:
        spec = rt.spec
        chap = None if spec.chap is None else {
            "user": spec.chap.user, "mutual_user": spec.chap.mutual_user}
        live = self.sessions.of_target(rt)
        return {
            "name": spec.name, "alias": spec.alias,
            "portals": [format_portal(h, p) for tag, h, p in self.bound
                        if tag in spec.portal_groups],
            "portal_groups": list(spec.portal_groups),
            "acl": list(spec.allow), "chap": chap,
            "limits": {f.name: (list(v) if isinstance(v := getattr(spec.limits, f.name), tuple)
                                else v) for f in fields(spec.limits)},
            "luns": [self._lun_info(rt, ls, live) for ls in sorted(spec.luns, key=lambda s: s.lun)],
            "sessions": [s.tsih for s in live],
        }

    def _lun_info(self, rt: TargetRuntime, ls: LunSpec, live: list[Session]) -> dict[str, Any]:
        from target.scsi.mmc import CdromUnit

        unit = rt.scsi.luns.get(ls.lun)
        backend = rt.backends.get(ls.lun)
        counters = IOCounters.total(
            [self.retired_counters.get((rt.name, ls.lun), IOCounters())] +
            [s.counters[ls.lun] for s in live if ls.lun in s.counters])
        cdrom = isinstance(unit, CdromUnit)
        return {
            "lun": ls.lun, "path": ls.path or None, "backend": ls.backend,
            "format": _format_of(backend) if backend is not None else None,
            "size": backend.size if backend is not None else 0,
            "block_size": unit.block_size if unit is not None else ls.block_size,
            "blocks": unit.num_blocks if unit is not None else 0,
            "mode": ls.mode, "read_only": bool(unit.write_protected) if unit else ls.read_only,
            "device_type": "cdrom" if cdrom else "disk",
            "medium": (backend is not None) if cdrom else None,
            "bandwidth_group": ls.bandwidth_group,
            "counters": counters.as_dict(),
        }

    def session_info(self) -> list[dict[str, Any]]:
        """Every session: TSIH, ISID, initiator, target, its connections
        (CID, initiator address, our address), the negotiated parameters
        (RFC 7143 §13) and its counters, in total and per LUN."""
        out = []
        for s in self.sessions.values():
            p = s.params
            params = {} if p is None else {
                f.name: getattr(p, f.name) for f in fields(p)
                if f.name not in ("target_name", "initiator_name", "session_type")}
            conns = []
            for cid, c in sorted(s.connections.items()):
                local = getattr(c, "local", ("", 0))
                conns.append({"cid": cid, "address": c.peer,
                              "local": format_portal(local[0], local[1]) if local[0] else None})
            out.append({
                "tsih": s.tsih, "isid": f"0x{s.isid:012x}", "initiator": s.initiator_name,
                "target": None if s.discovery else s.target_name, "discovery": s.discovery,
                "portal_group": s.portal_group_tag, "connections": conns, "params": params,
                "counters": IOCounters.total(s.counters.values()).as_dict(),
                "luns": {str(lun): c.as_dict() for lun, c in sorted(s.counters.items())},
            })
        return out

    def fold_counters(self, sess: Session) -> None:
        """An ended session's counters go to its LUNs' totals."""
        if sess.target is None or not sess.counters:
            return
        for lun, c in sess.counters.items():
            if lun in sess.target.scsi.luns:
                self.retired_counters.setdefault((sess.target.name, lun), IOCounters()).add(c)
        sess.counters.clear()

    # ------------------------------------------------------------- sessions
    def kick(self, *, tsih: int | None = None, initiator: str | None = None,
             target: str | None = None) -> list[int]:
        """End the session ``tsih``, or every session of ``initiator``
        (optionally only those logged in to ``target``). Returns the TSIHs
        ended. The initiator may log in again unless the ACL or CHAP is
        changed first."""
        if tsih is None and initiator is None:
            raise AdminError("kick: give a session (TSIH) or an initiator name")
        name = _normal(initiator, "initiator name") if initiator is not None else None
        rt = self._target(target) if target is not None else None
        chosen = [s for s in self.sessions.values()
                  if (tsih is None or s.tsih == tsih)
                  and (name is None or s.initiator_name.lower() == name)
                  and (rt is None or s.target is rt)]
        if not chosen:
            raise AdminError(f"kick: no session {'TSIH ' + str(tsih) if tsih is not None else ''}"
                             f"{' of ' + str(initiator) if initiator else ''}")
        for s in chosen:
            self.end_session(s, cause="kicked")
        return [s.tsih for s in chosen]

    # ------------------------------------------------------------- LUNs
    def add_lun(self, target: str, spec: LunSpec) -> dict[str, Any]:
        """Open ``spec`` and add it to ``target`` while serving; every I_T
        nexus gets REPORTED LUNS DATA HAS CHANGED on the other LUNs."""
        rt = self._target(target)
        if not 0 <= spec.lun <= 16383:
            raise AdminError(f"LUN {spec.lun} is not allowed (0..16383)")
        if spec.lun in rt.scsi.luns:
            raise AdminError(f"{rt.name} already has LUN {spec.lun} (remove it first)")
        if spec.path and not os.path.isabs(spec.path) and spec.backend != "nbd":
            spec = replace(spec, path=os.path.abspath(spec.path))
        try:
            # One LUN's worth of build_target: the same opening, write
            # mode, bandwidth wrapping and identifiers as at start.
            one = build_target(TargetSpec(name=rt.name, luns=(spec,)), self.config.state_dir,
                               self.bandwidth)
        except (BackendError, OSError) as exc:
            raise AdminError(f"cannot add LUN {spec.lun} to {rt.name}: {_line(exc)}") from None
        unit = one.scsi.luns[spec.lun]
        rt.scsi.add_lun(spec.lun, unit)  # posts 3F/0E on the other LUNs
        rt.backends[spec.lun] = one.backends[spec.lun]
        if spec.lun in one.throttles:
            rt.throttles[spec.lun] = one.throttles[spec.lun]
        rt.scsi_luns = frozenset(rt.scsi.luns)
        self._set_spec(rt, replace(rt.spec, luns=rt.spec.luns + (spec,)))
        self._restart_media_watch()
        log.info("LUN %d of %s added: %s (%d bytes)", spec.lun, rt.name,
                 spec.path or "memory", one.backends[spec.lun].size)
        return self._lun_info(rt, spec, self.sessions.of_target(rt))

    def remove_lun(self, target: str, lun: int) -> None:
        """Remove a LUN while serving: further commands to it get LOGICAL
        UNIT NOT SUPPORTED, every I_T nexus gets REPORTED LUNS DATA HAS
        CHANGED on the remaining LUNs, and its backend is flushed and
        closed once commands still executing on it are done."""
        rt = self._target(target)
        unit = rt.scsi.luns.pop(lun, None)
        if unit is None:
            raise AdminError(f"{rt.name} has no LUN {lun} (LUNs: "
                             f"{', '.join(map(str, sorted(rt.scsi.luns))) or 'none'})")
        rt.scsi_luns = frozenset(rt.scsi.luns)
        for other in rt.scsi.luns.values():
            other.post_unit_attention(REPORTED_LUNS_CHANGED)
        backend = rt.backends.pop(lun, None)
        rt.throttles.pop(lun, None)
        self.retired_counters.pop((rt.name, lun), None)
        for s in self.sessions.of_target(rt):
            s.counters.pop(lun, None)
        self._set_spec(rt, replace(rt.spec, luns=tuple(ls for ls in rt.spec.luns if ls.lun != lun)))
        self._restart_media_watch()
        if backend is not None:
            self._retire([backend])
        log.info("LUN %d of %s removed", lun, rt.name)

    def _retire(self, backends: list[Backend]) -> None:
        """Flush and close ``backends`` once the commands executing now are
        done (a write in flight must land first; DESIGN.md: nothing
        acknowledged is lost)."""
        pending = set(self.inflight)

        async def retire() -> None:
            if pending:
                await asyncio.wait(pending, timeout=RETIRE_WAIT)
            for b in backends:
                try:
                    await asyncio.to_thread(b.flush)
                except (BackendError, OSError) as exc:
                    log.warning("%s: flush after removal failed: %s", b.path or "memory",
                                _line(exc))
                b.close()

        fut = asyncio.ensure_future(retire())
        self.retiring.add(fut)
        fut.add_done_callback(self.retiring.discard)

    def set_alua_state(self, tag: int, state: str, target: str | None = None) -> list[str]:
        """Change the asymmetric access state (ALUA, SPC-4 §5.15) of
        portal group ``tag`` for one target or, without ``target``, for
        every target served on it (and in the configuration saveconfig
        writes). Every I_T nexus of the affected targets gets ASYMMETRIC
        ACCESS STATE CHANGED (2A/06), so multipath initiators re-read
        REPORT TARGET PORT GROUPS. Returns the targets changed."""
        from target.scsi.alua import ASYMMETRIC_ACCESS_STATE_CHANGED, AccessState

        if state not in ALUA_STATES:
            raise AdminError(f"ALUA state {state!r} is not allowed ({', '.join(ALUA_STATES)})")
        if tag not in {g.tag for g in self.config.portal_groups}:
            raise AdminError(f"portal group {tag} does not exist (tags: "
                             f"{', '.join(str(g.tag) for g in self.config.portal_groups)})")
        rts = [self._target(target)] if target is not None else list(self.targets.values())
        changed = []
        for rt in rts:
            if tag not in rt.spec.portal_groups:
                if target is not None:
                    raise AdminError(f"target {rt.name} is not served on portal group {tag}")
                continue
            ua = rt.scsi.alua.set_state(tag, AccessState(ALUA_STATES[state]))
            for unit in rt.scsi.luns.values():
                unit.post_unit_attention(ua if ua else ASYMMETRIC_ACCESS_STATE_CHANGED)
            changed.append(rt.name)
        if target is None:
            self.config = replace(self.config, portal_groups=tuple(
                replace(g, alua_state=state) if g.tag == tag else g
                for g in self.config.portal_groups))
        log.info("ALUA: portal group %d is %s for %s", tag, state,
                 ", ".join(changed) or "no target")
        return changed

    def resize_lun(self, target: str, lun: int, size: int | None = None) -> int:
        """Grow a LUN online to ``size`` bytes (None: take the size the
        file or device has now, after growing it outside). Raw files are
        extended (sparse); image formats and CD/DVD LUNs are refused.
        Every I_T nexus then gets CAPACITY DATA HAS CHANGED (2A/09) and
        READ CAPACITY reports the new size. Returns the new size."""
        from target.scsi.mmc import CdromUnit

        rt = self._target(target)
        unit = rt.scsi.luns.get(lun)
        backend = rt.backends.get(lun)
        spec = next((ls for ls in rt.spec.luns if ls.lun == lun), None)
        if unit is None or backend is None or spec is None:
            raise AdminError(f"{rt.name} has no LUN {lun}")
        where = f"LUN {lun} of {rt.name}"
        if isinstance(unit, CdromUnit):
            raise AdminError(f"{where} is a CD/DVD: change its medium instead (iscsi-target media)")
        fmt = _format_of(backend)
        if fmt != "raw" or spec.backend == "memory":
            raise AdminError(f"{where} is a {fmt} image, which cannot grow while served "
                             "(stop the target and resize it offline)")
        if spec.mode not in ("normal", "writethrough", "shareable", "readonly"):
            raise AdminError(f"{where} is in {spec.mode} mode: its differencing images "
                             "cannot grow while served")
        if size is not None:
            if _is_block(spec.path):
                raise AdminError(f"{where} is a block device: grow the device first (e.g. "
                                 "lvextend), then resize without a size")
            if size % unit.block_size:
                raise AdminError(f"{size} bytes is not a multiple of the block size "
                                 f"{unit.block_size}")
            if size < backend.size:
                raise AdminError(f"{where} is {backend.size} bytes: shrinking it would cut off "
                                 "data initiators may use; refused")
            try:
                if os.path.getsize(spec.path) < size:
                    os.truncate(spec.path, size)  # sparse growth (SBC-3 thin LU)
            except OSError as exc:
                raise AdminError(f"{spec.path}: cannot grow: {exc.strerror}") from None
        state = os.path.join(self.config.state_dir, _safe(rt.name), str(lun)) \
            if self.config.state_dir else None
        try:
            with reopening():
                fresh = open_lun(spec, state)
        except (BackendError, OSError) as exc:
            raise AdminError(f"{where}: cannot reopen after growing: {_line(exc)}") from None
        if isinstance(backend, ThrottledBackend):
            fresh = ThrottledBackend(fresh, backend.group)
            rt.throttles[lun] = fresh.throttle
        # Swap the medium under the unit; refresh_capacity re-reads its size
        # and posts 2A/09 to every I_T nexus when it changed.
        unit.backend = fresh
        rt.backends[lun] = fresh
        changed = unit.refresh_capacity()
        self._retire([backend])
        log.info("%s: %s (%d bytes)", where, "grown" if changed else "size unchanged", fresh.size)
        return fresh.size

    def set_medium(self, target: str, lun: int, path: str | None) -> bool:
        """Load the image at ``path`` into a CD/DVD LUN (None ejects), as
        inserting another disc: initiators see NOT READY TO READY CHANGE
        (28/00). Returns False when the image cannot be opened."""
        from target.scsi.mmc import CdromUnit

        rt = self._target(target)
        if not isinstance(rt.scsi.luns.get(lun), CdromUnit):
            raise AdminError(f"LUN {lun} of {rt.name} is not a CD/DVD LUN")
        if path is not None:
            path = os.path.abspath(path)
            if not os.path.exists(path):
                raise AdminError(f"{path}: no such file")
        ok = self.change_medium(rt.name, lun, path)
        if ok and path is not None:
            self._set_spec(rt, replace(rt.spec, luns=tuple(
                replace(ls, path=path) if ls.lun == lun else ls for ls in rt.spec.luns)))
            self._restart_media_watch()
        if not ok and path is not None:
            raise AdminError(f"{path}: cannot be loaded into LUN {lun} of {rt.name} "
                             "(see the target's log)")
        return ok

    # ------------------------------------------------------------- targets
    def add_target(self, spec: TargetSpec) -> None:
        """Open ``spec``'s LUNs and start accepting logins to it on its
        portal groups (which must be ones the server listens on)."""
        name = _normal(spec.name, "target name")
        if name in self.targets:
            raise AdminError(f"target {name} exists already")
        served = {g.tag for g in self.config.portal_groups}
        missing = [t for t in spec.portal_groups if t not in served]
        if missing:
            raise AdminError(f"portal group {missing[0]} is not served (served: "
                             f"{', '.join(map(str, sorted(served)))}); new portals need a restart")
        if spec.chap is not None:
            self._check_chap(spec.chap)
        spec = replace(spec, name=name, luns=tuple(
            replace(ls, path=os.path.abspath(ls.path)) if ls.path and ls.backend != "nbd" else ls
            for ls in spec.luns))
        try:
            rt = build_target(spec, self.config.state_dir, self.bandwidth,
                              self.config.portal_groups)
        except (BackendError, OSError) as exc:
            raise AdminError(f"cannot add target {name}: {_line(exc)}") from None
        self.targets[name] = rt
        self._set_spec(rt, spec)
        self._restart_media_watch()
        self._isns_changed()
        log.info("target %s added with %d LUN(s)", name, len(spec.luns))

    def remove_target(self, name: str) -> None:
        """End every session of a target, stop accepting logins to it and
        close its LUNs."""
        rt = self._target(name)
        del self.targets[rt.name]
        for s in self.sessions.of_target(rt):
            self.end_session(s, cause="target_removed")
        self.config = replace(self.config, targets=tuple(
            r.spec for r in self.targets.values()))
        for lun in rt.scsi.luns:
            self.retired_counters.pop((rt.name, lun), None)
        self._restart_media_watch()
        self._retire(list(rt.backends.values()))
        self._isns_changed()
        log.info("target %s removed", rt.name)

    def configure_target(self, target: str, *, alias: str | None = None,
                         limits: Limits | None = None,
                         portal_groups: tuple[int, ...] | None = None,
                         clear_alias: bool = False) -> None:
        """Change a target's alias, operational limits (RFC 7143 §13; they
        apply to the next login) or portal groups (served ones only)."""
        rt = self._target(target)
        spec = rt.spec
        if portal_groups is not None:
            served = {g.tag for g in self.config.portal_groups}
            missing = [t for t in portal_groups if t not in served]
            if missing or not portal_groups:
                raise AdminError(f"portal group {missing[0] if missing else '(none)'} is not "
                                 "served; new portals need a restart")
            spec = replace(spec, portal_groups=tuple(portal_groups))
        if limits is not None:
            spec = replace(spec, limits=limits)
        if alias is not None or clear_alias:
            spec = replace(spec, alias=alias)
        self._set_spec(rt, spec)
        if alias is not None or clear_alias or portal_groups is not None:
            self._isns_changed()  # the registration carries aliases and portal groups

    # ------------------------------------------------------------- ACL, CHAP
    def add_acl(self, target: str, initiator: str) -> list[str]:
        """Allow ``initiator`` to log in to ``target``. The first name
        listed restricts the target to the ACL: sessions of initiators not
        in it end. Returns the ACL."""
        rt = self._target(target)
        name = _normal(initiator, "initiator name")
        if name in rt.spec.allow:
            raise AdminError(f"{name} is already in the ACL of {rt.name}")
        self._set_spec(rt, replace(rt.spec, allow=rt.spec.allow + (name,)))
        log.info("ACL of %s: %s allowed", rt.name, name)
        self._enforce_acl(rt)
        return list(rt.spec.allow)

    def remove_acl(self, target: str, initiator: str) -> list[str]:
        """Stop allowing ``initiator`` (its sessions end). An empty ACL
        lets every initiator log in (logged as a warning). Returns the ACL."""
        rt = self._target(target)
        name = _normal(initiator, "initiator name")
        if name not in rt.spec.allow:
            raise AdminError(f"{name} is not in the ACL of {rt.name} "
                             f"(ACL: {', '.join(rt.spec.allow) or 'empty'})")
        self._set_spec(rt, replace(rt.spec, allow=tuple(a for a in rt.spec.allow if a != name)))
        log.info("ACL of %s: %s removed", rt.name, name)
        if not rt.spec.allow:
            log.warning("the ACL of %s is now empty: every initiator may log in", rt.name)
        self._enforce_acl(rt)
        return list(rt.spec.allow)

    def _enforce_acl(self, rt: TargetRuntime) -> None:
        for s in self.sessions.of_target(rt):
            if not rt.spec.allows(s.initiator_name):
                self.end_session(s, cause="acl", detail=rt.name)

    def set_chap(self, target: str | None, chap: ChapConfig | None) -> None:
        """Set (None: clear) the CHAP credentials of ``target``, or of
        discovery sessions when ``target`` is None. Sessions already
        logged in stay; the next login uses the new credentials."""
        if chap is not None:
            self._check_chap(chap)
        if target is None:
            self.config = replace(self.config, discovery_chap=chap)
            log.info("discovery CHAP %s", "set" if chap else "cleared")
            return
        rt = self._target(target)
        self._set_spec(rt, replace(rt.spec, chap=chap))
        log.info("CHAP of %s %s", rt.name, f"set (user {chap.user})" if chap else "cleared")

    @staticmethod
    def _check_chap(chap: ChapConfig) -> None:
        try:
            check_chap(chap)
        except ConfigError as exc:
            raise AdminError(f"CHAP: {exc}") from None


def _format_of(backend: Backend) -> str:
    """The image format behind wrappers (bandwidth, write modes)."""
    from target.backends.memory import MemoryBackend
    from target.backends.registry import ImageBackend

    b = backend
    while isinstance(b, DelegatingBackend) and not isinstance(b, ImageBackend):
        b = b.inner
    if isinstance(b, ImageBackend):
        try:
            return b.info().format
        except (BackendError, OSError):
            return "unknown"
    if isinstance(b, MemoryBackend):
        return "memory"
    return type(b).__name__.removesuffix("Backend").lower() or "unknown"


def _normal(name: str | None, what: str) -> str:
    try:
        return normalize_name(str(name))
    except (InvalidName, ValueError) as exc:
        raise AdminError(f"{what} {name!r}: {exc}") from None


def _line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


def _is_block(path: str) -> bool:
    import stat

    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
