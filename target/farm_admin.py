"""Boot farm administration (target/farm.py is the LUN side):

- ``[target.farm]`` in the TOML config and ``serve --boot-farm GOLDEN``;
- the iPXE script and DHCP root-path that boot a machine from a farm
  (:func:`boot_info`);
- :class:`FarmAdministration`, the ``farm_*`` methods of
  :class:`~target.server.TargetServer`, and the control-socket operations
  and ``iscsi-target farm list|reset|delete|commit|switch`` commands that
  call them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ChapConfig, ConfigError, FarmSpec, LunSpec, parse_size

if TYPE_CHECKING:
    from .farm import FarmBackend
    from .runtime import TargetRuntime
    from .server import TargetServer

FARM_MODES = ("persistent", "reset")
_FARM_KEYS = {"golden", "mode", "max_overlays", "max_overlay_bytes"}


# ---------------------------------------------------------------- configuration
def farm_from_table(table: Any, luns: list[Any], where: str,
                    fail: Callable[[str, str], ConfigError], base: str
                    ) -> tuple[FarmSpec, list[Any]]:
    """``[target.farm]`` of a TOML config: the FarmSpec and the LUN table
    it implies (LUN 0 = the golden image; a farm target has no other)."""
    if not isinstance(table, dict):
        raise fail(where, "must be a table {golden, mode, max_overlays, max_overlay_bytes}")
    for key in table:
        if key not in _FARM_KEYS:
            raise fail(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_FARM_KEYS))})")
    if luns:
        raise fail(where, "a boot farm target has no [[target.lun]]: its LUN 0 is the golden image")
    golden = table.get("golden")
    if not isinstance(golden, str) or not golden:
        raise fail(f"{where}.golden", "missing (the golden image file)")
    golden = os.path.expanduser(golden)
    golden = golden if os.path.isabs(golden) else os.path.normpath(os.path.join(base, golden))
    mode = table.get("mode", "persistent")
    if mode not in FARM_MODES:
        raise fail(f"{where}.mode", f"{mode!r} is not allowed ({', '.join(FARM_MODES)})")
    n = table.get("max_overlays", 64)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100000:
        raise fail(f"{where}.max_overlays", f"{n!r} is not allowed (an integer 1..100000)")
    raw = table.get("max_overlay_bytes")
    limit: int | None = None
    if raw is not None:
        try:
            limit = raw if isinstance(raw, int) and not isinstance(raw, bool) else \
                parse_size(str(raw))
        except ValueError as exc:
            raise fail(f"{where}.max_overlay_bytes", str(exc)) from None
        if limit < 1 << 20:
            raise fail(f"{where}.max_overlay_bytes", f"{raw!r} is not allowed (at least 1M)")
    spec = FarmSpec(golden=golden, mode=mode, max_overlays=n, max_overlay_bytes=limit)
    return spec, [{"lun": 0, "path": golden, "mode": "multiattach", "max_overlays": n}]


def farm_lun(farm: FarmSpec) -> LunSpec:
    """The LUN a farm serves (what ``show`` and ``saveconfig`` see)."""
    return LunSpec(lun=0, path=farm.golden, mode="multiattach", max_overlays=farm.max_overlays)


def farm_toml(farm: FarmSpec) -> list[str]:
    """``[target.farm]`` lines for ``saveconfig``."""
    out = ["", "[target.farm]", f"golden = {_q(farm.golden)}", f"mode = {_q(farm.mode)}",
           f"max_overlays = {farm.max_overlays}"]
    if farm.max_overlay_bytes is not None:
        out.append(f"max_overlay_bytes = {farm.max_overlay_bytes}")
    return out


def _q(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``serve``'s boot farm flags."""
    p.add_argument("--boot-farm", metavar="GOLDEN",
                   help="serve GOLDEN (any format) to many machines, each through its own "
                        "copy-on-write overlay made at its first login")
    p.add_argument("--farm-mode", choices=FARM_MODES, default="persistent",
                   help="persistent: a machine's overlay is kept across reboots (default); "
                        "reset: a fresh overlay at each new session")
    p.add_argument("--max-overlays", type=int, default=64, metavar="N",
                   help="overlays the farm keeps at most (default 64); more logins are refused")
    p.add_argument("--max-overlay-size", metavar="SIZE",
                   help="bytes one overlay may hold, e.g. 2G (default: unbounded)")
    p.add_argument("--boot-script", metavar="FILE",
                   help="write the iPXE script that boots a machine from the farm to FILE")
    p.add_argument("--boot-host", metavar="HOST",
                   help="the address machines reach the target at, for the boot script "
                        "(default: the portal's, or this host's when listening on all)")


def farm_spec_from_args(args: argparse.Namespace) -> FarmSpec:
    """The FarmSpec of ``serve --boot-farm GOLDEN ...`` (ConfigError)."""
    golden = os.path.abspath(args.boot_farm)
    if not os.path.isfile(golden):
        raise ConfigError(f"--boot-farm {args.boot_farm}: no such file")
    if not 1 <= args.max_overlays <= 100000:
        raise ConfigError(f"--max-overlays {args.max_overlays}: not allowed (1..100000)")
    limit = None
    if args.max_overlay_size is not None:
        try:
            limit = parse_size(args.max_overlay_size)
        except ValueError as exc:
            raise ConfigError(f"--max-overlay-size: {exc}") from None
        if limit < 1 << 20:
            raise ConfigError(f"--max-overlay-size {args.max_overlay_size}: at least 1M")
    return FarmSpec(golden=golden, mode=args.farm_mode, max_overlays=args.max_overlays,
                    max_overlay_bytes=limit)


# ---------------------------------------------------------------- boot script
def root_path(host: str, port: int, target: str, lun: int = 0) -> str:
    """The DHCP root-path of an iSCSI disk, RFC 4173 §5:
    ``iscsi:<servername>:<protocol>:<port>:<LUN>:<targetname>`` (protocol
    empty = TCP; an IPv6 address in brackets, as iPXE reads it)."""
    h = f"[{host}]" if ":" in host else host
    return f"iscsi:{h}::{port}:{lun:x}:{target}"


def ipxe_script(host: str, port: int, target: str, chap: ChapConfig | None, *,
                show_secrets: bool = True) -> str:
    """An iPXE script that SAN-boots the farm: DHCP unless done, a per-machine initiator
    name (the SMBIOS UUID: each machine gets its own overlay), CHAP
    (``username``/``password``, mutual as ``reverse-username``/
    ``reverse-password``) and ``sanboot`` of the root-path."""
    # DHCP only when the network is not up yet: chainloaded from a NIC ROM
    # it already is (a second DHCP costs seconds); embedded in ipxe.lkrn or
    # a USB image it is not.
    lines = ["#!ipxe", "isset ${ip} || dhcp",
             "# Each machine needs its own initiator name: its overlay is keyed by it.",
             "set initiator-iqn iqn.2010-04.org.ipxe:${uuid}"]
    if chap is not None:
        def secret(s: str) -> str:
            return s if show_secrets else "SECRET"

        lines += [f"set username {chap.user}", f"set password {secret(chap.secret)}"]
        if chap.mutual_user is not None and chap.mutual_secret is not None:
            lines += [f"set reverse-username {chap.mutual_user}",
                      f"set reverse-password {secret(chap.mutual_secret)}"]
    lines.append(f"sanboot {root_path(host, port, target)}")
    return "\n".join(lines) + "\n"


def default_host(bound_host: str) -> str:
    """The address to put in a boot script: the portal's own, or for a
    wildcard one the address this host would use to reach other hosts
    (a UDP connect sends no packet)."""
    if bound_host not in ("0.0.0.0", "::", ""):
        return bound_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:  # no route at all
        return "127.0.0.1"


def write_boot_script(path: str, text: str) -> None:
    """Write the boot script 0600 (it may hold the CHAP secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------- live administration
class FarmAdministration:
    """The ``farm_*`` methods of :class:`TargetServer` (a mixin)."""

    targets: dict[str, TargetRuntime]
    bound: list[tuple[int, str, int]]

    if TYPE_CHECKING:
        def _set_spec(self, rt: TargetRuntime, spec: Any) -> None: ...

    def _farm(self, target: str | None) -> tuple[TargetRuntime, FarmBackend]:
        from .admin import AdminError

        farms = [(rt, rt.farm) for rt in self.targets.values() if rt.farm is not None]
        if target is not None:
            farms = [(rt, f) for rt, f in farms if rt.name == target.lower() or rt.name == target]
        if not farms:
            raise AdminError(f"no boot farm target{' ' + target if target else ''} "
                             "(serve one with --boot-farm GOLDEN)")
        if len(farms) > 1:
            raise AdminError("several boot farms: name one with --target "
                             f"({', '.join(rt.name for rt, _f in farms)})")
        rt, farm = farms[0]
        assert farm is not None
        return rt, farm

    def farm_list(self, target: str | None = None) -> dict[str, Any]:
        """The farm's golden image, mode, limits and overlays (initiator,
        size on disk, last use, base and whether that base is current)."""
        rt, farm = self._farm(target)
        return {"target": rt.name, "golden": farm.golden, "mode": farm.mode.value,
                "max_overlays": farm.max_overlays, "max_overlay_bytes": farm.max_overlay_bytes,
                "overlays": [o.as_dict() for o in farm.list_overlays()]}

    def farm_reset(self, initiator: str, target: str | None = None) -> None:
        """Discard a machine's changes (refused while it has a session)."""
        self._farm(target)[1].reset_overlay(initiator)

    def farm_delete(self, initiator: str, target: str | None = None) -> None:
        """Delete a machine's overlay (refused while it has a session)."""
        self._farm(target)[1].delete_overlay(initiator)

    async def farm_commit(self, initiator: str, new_golden: str, fmt: str | None = None,
                          target: str | None = None) -> dict[str, Any]:
        """Write a machine's disk (its overlay over its base) into a new
        image ``new_golden`` (format ``fmt``, else from its extension, else
        qcow2), e.g. to ``farm switch`` to it. The copy runs in a thread;
        the machine must have no session, and its logins are refused with
        "service unavailable" (0x0301) until the copy is done."""
        from .admin import AdminError
        from .image_cli import CLIError, convert

        _rt, farm = self._farm(target)
        new_golden = os.path.abspath(new_golden)
        start = time.monotonic()
        with farm.committing(initiator) as overlay:
            out_fmt = fmt or _format_for(new_golden) or "qcow2"
            try:
                await asyncio.to_thread(convert, overlay, new_golden, out_fmt)
            except CLIError as exc:
                raise AdminError(f"farm commit: {exc}") from None
        return {"path": new_golden, "format": out_fmt, "seconds": round(time.monotonic() - start, 3)}

    def farm_switch(self, new_golden: str, target: str | None = None) -> dict[str, Any]:
        """New sessions get ``new_golden``; running ones keep theirs."""
        rt, farm = self._farm(target)
        farm.switch(new_golden)
        spec = rt.spec
        assert spec.farm is not None
        new = dataclasses.replace(spec.farm, golden=farm.golden)
        self._set_spec(rt, dataclasses.replace(spec, farm=new, luns=(farm_lun(new),)))
        return {"golden": farm.golden}

    def farm_boot(self, target: str | None = None, host: str | None = None,
                  show_secrets: bool = False) -> dict[str, str]:
        """The iPXE script and DHCP root-path that boot a machine from the
        farm (the CHAP secrets as SECRET unless ``show_secrets``)."""
        rt, _farm = self._farm(target)
        bound = [(h, p) for tag, h, p in self.bound if tag in rt.spec.portal_groups]
        bhost, port = bound[0] if bound else ("0.0.0.0", 3260)
        host = host or default_host(bhost)
        return {"root_path": root_path(host, port, rt.name),
                "ipxe": ipxe_script(host, port, rt.name, rt.spec.chap,
                                    show_secrets=show_secrets)}


def _format_for(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"img": "raw", "raw": "raw", "qcow2": "qcow2", "vdi": "vdi", "vhd": "vhd",
            "vmdk": "vmdk"}.get(ext)


def boot_help(server: TargetServer, host: str | None) -> str:
    """What ``serve`` prints for each boot farm: the root-path and the
    iPXE script."""
    out = []
    for rt in server.targets.values():
        if rt.farm is None:
            continue
        info = server.farm_boot(rt.name, host=host)
        out.append(f"Boot farm {rt.name} ({rt.farm.mode.value}): machines boot with DHCP "
                   f"option 17 (root-path)\n  {info['root_path']}\n"
                   "or with this iPXE script (--boot-script FILE writes it with the secret):\n"
                   + "".join(f"  {line}\n" for line in info["ipxe"].splitlines()))
    return "".join(out)


def check_boot_flags(args: argparse.Namespace, farms: int) -> None:
    """``--boot-script``/``--boot-host`` need exactly one boot farm."""
    for flag, value in (("--boot-script", args.boot_script), ("--boot-host", args.boot_host)):
        if value is not None and farms == 0:
            raise ConfigError(f"{flag} needs a boot farm (--boot-farm GOLDEN, or [target.farm] "
                              "in the config file)")
    if args.boot_script is not None and farms > 1:
        raise ConfigError(f"--boot-script: the config file has {farms} boot farms; "
                          "iscsi-target prints each one's script, copy the one you need")


# ---------------------------------------------------------------- control socket + CLI
def _s(req: dict[str, Any], key: str, required: bool = True) -> Any:
    from .admin import AdminError

    v = req.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise AdminError(f"{req['op']}: {key} is missing")
    return v


#: Control-socket operations (merged into target.control's table).
FARM_OPS: dict[str, Callable[[TargetServer, dict[str, Any]], Any]] = {
    "farm_list": lambda s, r: s.farm_list(_s(r, "target", False)),
    "farm_reset": lambda s, r: s.farm_reset(_s(r, "initiator"), _s(r, "target", False)),
    "farm_delete": lambda s, r: s.farm_delete(_s(r, "initiator"), _s(r, "target", False)),
    "farm_commit": lambda s, r: s.farm_commit(_s(r, "initiator"), _s(r, "path"),
                                              _s(r, "format", False), _s(r, "target", False)),
    "farm_switch": lambda s, r: s.farm_switch(_s(r, "path"), _s(r, "target", False)),
}


def add_subparser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``iscsi-target farm list|reset|delete|commit|switch``."""
    farm = sub.add_parser("farm", help="manage a running boot farm's overlays")
    fsub = farm.add_subparsers(dest="action", required=True)

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = fsub.add_parser(name, help=text, parents=[common])
        p.add_argument("--target", "-t", metavar="IQN", help="the farm (when several)")
        return p

    cmd("list", "overlays: initiator, size, last use, base")
    for name, text in (("reset", "discard a machine's changes (not while it runs)"),
                       ("delete", "delete a machine's overlay (not while it runs)")):
        cmd(name, text).add_argument("initiator", metavar="INITIATOR")
    c = cmd("commit", "write a machine's disk into a new golden image")
    c.add_argument("initiator", metavar="INITIATOR")
    c.add_argument("path", metavar="NEW_GOLDEN")
    c.add_argument("--format", "-O", help="image format (default: from the extension)")
    s = cmd("switch", "serve a new golden image to new sessions")
    s.add_argument("path", metavar="NEW_GOLDEN")


def farm_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control operation of a ``farm`` command line."""
    params: dict[str, Any] = {"target": args.target}
    if args.action in ("reset", "delete", "commit"):
        params["initiator"] = args.initiator
    if args.action in ("commit", "switch"):
        params["path"] = os.path.abspath(args.path)
    if args.action == "commit":
        params["format"] = args.format
    return f"farm_{args.action}", params


def render_farm(op: str, result: Any) -> str:
    """Human-readable output of the ``farm`` commands."""
    from .admin_format import human_size

    if op == "farm_list":
        head = (f"Boot farm {result['target']}: golden {result['golden']} ({result['mode']}; "
                f"{len(result['overlays'])}/{result['max_overlays']} overlays"
                + (f", at most {human_size(result['max_overlay_bytes'])} each"
                   if result["max_overlay_bytes"] else "") + ")")
        rows = [["INITIATOR", "SIZE", "LAST USE", "SESSIONS", "BASE"]]
        for o in result["overlays"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["last_use"]))
            base = o["base"] + ("" if o["base_state"] == "current" else f" ({o['base_state']})")
            rows.append([o["initiator"], human_size(o["size"]), when, str(o["sessions"]), base])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join([head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                   for r in rows])
    if op == "farm_commit":
        return f"wrote {result['path']} ({result['format']}) in {result['seconds']} s"
    if op == "farm_switch":
        return f"new sessions boot {result['golden']}"
    return "done"


__all__ = ["FARM_OPS", "FarmAdministration", "add_serve_arguments", "add_subparser",
           "boot_help", "farm_from_table", "farm_lun", "farm_request", "farm_spec_from_args",
           "farm_toml", "ipxe_script", "render_farm", "root_path", "write_boot_script"]
