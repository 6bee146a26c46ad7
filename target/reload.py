"""``iscsi-target reload`` / SIGHUP: apply what changed in the configuration
file to the running server, and say what could not be applied.

Applied live: targets added or removed, LUNs added or removed, ACLs, CHAP
(target and discovery), limits and aliases (for the next login), portal
groups a target is reachable on (among those already listening), bandwidth
groups, and the server's NOP and login timeouts and connection limit (for
new connections). Needing a restart: listening portals, ``state_dir``,
``write_budget``, ``log_format``, ``log_file``, ``metrics``, ``isns``, and a LUN whose settings changed (remove and add it to
change it live, which initiators see as a different LU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from target.backends.base import BackendError

from .admin import AdminError
from .config import ConfigError, ServerConfig, load_config

if TYPE_CHECKING:
    from .server import TargetServer

log = logging.getLogger("aioiscsi.target")

#: Server settings read when a connection or login starts: a new value
#: applies to the next one.
_LIVE_SETTINGS = ("nop_interval", "nop_timeout", "login_timeout", "max_connections")
#: Server settings fixed at start.
_RESTART_SETTINGS = ("state_dir", "write_budget", "log_format", "log_file", "metrics", "isns")


@dataclass
class ReloadReport:
    """What a reload did: changes applied, changes that need a restart,
    changes that failed (each one line), and the error that stopped it
    (a configuration file that does not load: then nothing changed)."""

    applied: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"applied": self.applied, "needs_restart": self.restart,
                "failed": self.failed, "error": self.error}


def reload_server(server: TargetServer) -> ReloadReport:
    """Re-read ``server.config.source`` and apply the differences; every
    line of the report is logged too."""
    report = ReloadReport()
    source = server.config.source
    if source.startswith("<"):
        report.error = "started without --config: there is no configuration file to reload"
    else:
        try:
            fresh = load_config(source)
        except ConfigError as exc:
            report.error = f"reload refused, nothing changed: {exc}"
        else:
            _apply(server, fresh, report)
    if report.error:
        log.warning("%s", report.error)
    for line in report.applied:
        log.info("reload: applied: %s", line)
    for line in report.restart:
        log.warning("reload: needs a restart: %s", line)
    for line in report.failed:
        log.warning("reload: failed: %s", line)
    if not (report.error or report.applied or report.restart or report.failed):
        log.info("reload: %s: no changes", source)
    return report


def _apply(server: TargetServer, fresh: ServerConfig, report: ReloadReport) -> None:
    old = server.config
    if old.portal_groups != fresh.portal_groups:
        report.restart.append("listening portals (server.portals / [[portal_group]])")
    for key in _RESTART_SETTINGS:
        if getattr(old, key) == getattr(fresh, key):
            continue
        if key in old.cli_overrides:
            # The command line set it over the file at start; a reload of
            # the file does not undo the command line.
            report.restart.append(f"server.{key}: the command line's --{key.replace('_', '-')} "
                                  "stays in force until a restart without it")
        else:
            report.restart.append(f"server.{key}")
    live = {k: getattr(fresh, k) for k in _LIVE_SETTINGS if getattr(old, k) != getattr(fresh, k)}
    if live:
        server.config = replace(server.config, **live)
        report.applied += [f"server.{k} = {v} (new connections)" for k, v in live.items()]
    if old.discovery_chap != fresh.discovery_chap:
        _try(report, partial(server.set_chap, None, fresh.discovery_chap),
             "discovery CHAP " + ("set" if fresh.discovery_chap else "cleared"))
    _bandwidth(server, fresh, report)
    _targets(server, fresh, report)
    server.config = replace(server.config, source=fresh.source)


def _bandwidth(server: TargetServer, fresh: ServerConfig, report: ReloadReport) -> None:
    current = dict(server.bandwidth.list())
    for name, limit in fresh.bandwidth_groups:
        if name not in current:
            server.bandwidth.add(name, limit)
            report.applied.append(f"bandwidth group {name} added")
        elif current[name] != limit:
            server.set_bandwidth(name, limit)
            report.applied.append(f"bandwidth group {name}: limit "
                                  f"{'unlimited' if limit is None else limit}")
    server.config = replace(server.config, bandwidth_groups=tuple(server.bandwidth.list()))


def _targets(server: TargetServer, fresh: ServerConfig, report: ReloadReport) -> None:
    wanted = {t.name: t for t in fresh.targets}
    for name in [n for n in server.targets if n not in wanted]:
        _try(report, partial(server.remove_target, name), f"target {name} removed")
    for name, spec in wanted.items():
        rt = server.targets.get(name)
        if rt is None:
            _try(report, partial(server.add_target, spec), f"target {name} added")
            continue
        cur = rt.spec
        configure = partial(server.configure_target, name)
        if cur.portal_groups != spec.portal_groups:
            _try(report, partial(configure, portal_groups=spec.portal_groups),
                 f"{name}: portal groups {list(spec.portal_groups)}", restart_on_error=True)
        if cur.alias != spec.alias:
            _try(report, partial(configure, alias=spec.alias, clear_alias=spec.alias is None),
                 f"{name}: alias")
        if cur.limits != spec.limits:
            _try(report, partial(configure, limits=spec.limits), f"{name}: limits (next login)")
        for ini in [a for a in spec.allow if a not in cur.allow]:
            _try(report, partial(server.add_acl, name, ini), f"{name}: ACL + {ini}")
        for ini in [a for a in cur.allow if a not in spec.allow]:
            _try(report, partial(server.remove_acl, name, ini), f"{name}: ACL - {ini}")
        if cur.chap != spec.chap:
            _try(report, partial(server.set_chap, name, spec.chap),
                 f"{name}: CHAP {'set' if spec.chap else 'cleared'} (next login)")
        if cur.farm is not None or spec.farm is not None:
            # A boot farm's LUN is its golden image and overlays: never
            # reopened as a plain LUN (its overlays would be orphaned).
            if cur.farm != spec.farm:
                report.restart.append(f"{name}: boot farm settings changed (a new golden image "
                                      "applies live with: iscsi-target farm switch)")
            continue
        have = {ls.lun: ls for ls in cur.luns}
        want = {ls.lun: ls for ls in spec.luns}
        for lun in sorted(set(have) - set(want)):
            _try(report, partial(server.remove_lun, name, lun), f"{name}: LUN {lun} removed")
        for lun in sorted(set(want) - set(have)):
            _try(report, partial(server.add_lun, name, want[lun]),
                 f"{name}: LUN {lun} added ({want[lun].path or 'memory'})")
        for lun in sorted(set(want) & set(have)):
            if want[lun] != have[lun]:
                report.restart.append(f"{name}: LUN {lun} settings changed (or: iscsi-target "
                                      f"lun remove, then lun add)")


def _try(report: ReloadReport, action: Callable[[], object], what: str, *, restart_on_error: bool = False) -> None:
    try:
        action()
    except (AdminError, BackendError) as exc:
        (report.restart if restart_on_error else report.failed).append(f"{what}: {exc}")
    else:
        report.applied.append(what)
