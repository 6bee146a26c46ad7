"""The administration commands of ``iscsi-target``, talking to a running
target over its control socket (:mod:`target.control`)::

    iscsi-target show [--json]                 targets, LUNs, portals, ACLs, sessions, counters
    iscsi-target sessions [--json]
    iscsi-target kick TSIH | --initiator IQN [--target IQN]
    iscsi-target lun add TARGET PATH [--lun N] [--read-only] [--mode M] ...
    iscsi-target lun remove TARGET LUN
    iscsi-target target add NAME [--lun PATH ...] [--allow IQN ...]
    iscsi-target target remove NAME
    iscsi-target acl add|remove TARGET INITIATOR
    iscsi-target chap set TARGET|--discovery USER:SECRET [--mutual USER:SECRET] | --clear
    iscsi-target resize TARGET LUN [SIZE]      grow a LUN online
    iscsi-target media TARGET LUN PATH|--eject CD/DVD media change
    iscsi-target alua TAG STATE [--target IQN]  ALUA state of a portal group
    iscsi-target reload                        apply the config file's changes (= SIGHUP)
    iscsi-target saveconfig [FILE]             the running state as TOML
    iscsi-target farm list|reset|delete|commit|switch   a boot farm's overlays (farm_admin.py)

Each takes ``--control PATH`` (or ``--state-dir DIR``) to find the target,
and ``--json`` for machine-readable output. Failures are one line on
stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import farm_admin
from .backends.nbd import is_nbd_uri
from .control import ControlError, RemoteError, default_control_path, request

#: The subcommands this module handles.
COMMANDS = ("show", "sessions", "kick", "lun", "target", "acl", "chap", "resize", "media",
            "alua", "reload", "saveconfig", "farm")


def add_subparsers(sub: Any) -> None:
    """Add the administration subcommands to ``iscsi-target``'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", metavar="PATH",
                        help="control socket of the running target (default: "
                             f"{default_control_path()})")
    common.add_argument("--state-dir", metavar="DIR",
                        help="the target's --state-dir (its control socket is DIR/control.sock)")
    common.add_argument("--json", action="store_true", help="print JSON")

    def cmd(name: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, parents=[common])
        return p

    cmd("show", "show the running target: targets, LUNs, portals, ACLs, sessions, counters")
    cmd("sessions", "list the sessions logged in")
    k = cmd("kick", "end a session, or all sessions of an initiator")
    k.add_argument("tsih", nargs="?", type=int, metavar="TSIH")
    k.add_argument("--initiator", "-i", metavar="IQN")
    k.add_argument("--target", "-t", metavar="IQN")
    lun = sub.add_parser("lun", help="add or remove a LUN while serving")
    lsub = lun.add_subparsers(dest="action", required=True)
    la = cmd("add", "open an image or device and add it as a LUN", lsub)
    la.add_argument("target_name", metavar="TARGET")
    la.add_argument("path", metavar="PATH", nargs="?", help="image file or block device")
    la.add_argument("--lun", type=int, help="LUN number (default: the lowest free)")
    la.add_argument("--memory", metavar="SIZE", help="a RAM disk of SIZE instead of PATH")
    la.add_argument("--backend", default=None, help="format (default: detected)")
    la.add_argument("--read-only", action="store_true")
    la.add_argument("--block-size", type=int, choices=(512, 4096))
    la.add_argument("--write-through", action="store_true")
    la.add_argument("--device-type", choices=("auto", "disk", "cdrom"))
    la.add_argument("--mode", choices=("normal", "writethrough", "immutable", "multiattach",
                                       "shareable", "readonly"))
    lr = cmd("remove", "remove a LUN (initiators see REPORTED LUNS DATA HAS CHANGED)", lsub)
    lr.add_argument("target_name", metavar="TARGET")
    lr.add_argument("lun", type=int, metavar="LUN")
    tgt = sub.add_parser("target", help="add or remove a target while serving")
    tsub = tgt.add_subparsers(dest="action", required=True)
    ta = cmd("add", "add a target", tsub)
    ta.add_argument("name", metavar="NAME")
    ta.add_argument("--lun", action="append", metavar="PATH", default=[],
                    help="an image for the next LUN (repeatable)")
    ta.add_argument("--alias")
    ta.add_argument("--allow", action="append", metavar="IQN", default=[],
                    help="initiator allowed to log in (repeatable; none: any)")
    ta.add_argument("--portal-group", type=int, action="append", metavar="TAG")
    tr = cmd("remove", "remove a target (its sessions end)", tsub)
    tr.add_argument("name", metavar="NAME")
    acl = sub.add_parser("acl", help="allow or disallow an initiator")
    asub = acl.add_subparsers(dest="action", required=True)
    for action, text in (("add", "allow an initiator (the first one restricts the target)"),
                         ("remove", "disallow an initiator (its sessions end)")):
        a = cmd(action, text, asub)
        a.add_argument("target_name", metavar="TARGET")
        a.add_argument("initiator", metavar="INITIATOR")
    chap = sub.add_parser("chap", help="set a target's CHAP credentials")
    csub = chap.add_subparsers(dest="action", required=True)
    c = cmd("set", "set (or --clear) CHAP for a target or for discovery", csub)
    c.add_argument("target_name", metavar="TARGET", nargs="?")
    c.add_argument("credentials", metavar="USER:SECRET", nargs="?")
    c.add_argument("--mutual", metavar="USER:SECRET", help="the target's credentials")
    c.add_argument("--discovery", action="store_true", help="discovery sessions' CHAP")
    c.add_argument("--clear", action="store_true", help="turn CHAP off")
    r = cmd("resize", "grow a LUN online (initiators see CAPACITY DATA HAS CHANGED)")
    r.add_argument("target_name", metavar="TARGET")
    r.add_argument("lun", type=int, metavar="LUN")
    r.add_argument("size", nargs="?", metavar="SIZE",
                   help="new size, e.g. 2G (default: the size the file or device has now)")
    m = cmd("media", "load another image into a CD/DVD LUN, or eject it")
    m.add_argument("target_name", metavar="TARGET")
    m.add_argument("lun", type=int, metavar="LUN")
    m.add_argument("path", metavar="PATH", nargs="?")
    m.add_argument("--eject", action="store_true")
    a = cmd("alua", "set a portal group's ALUA state (multipath initiators follow it)")
    a.add_argument("portal_group", type=int, metavar="TAG")
    a.add_argument("state", metavar="STATE",
                   help="active/optimized, active/non-optimized, standby, unavailable or offline")
    a.add_argument("--target", metavar="IQN", help="only this target (default: every target)")
    cmd("reload", "apply the configuration file's changes (as SIGHUP does)")
    s = cmd("saveconfig", "write the running configuration as TOML (stdout without FILE)")
    s.add_argument("file", metavar="FILE", nargs="?")
    farm_admin.add_subparser(sub, common)


class _Usage(Exception):
    """A command line the admin commands cannot use (one line)."""


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control operation and its arguments for a parsed command line."""
    c = args.command
    if c in ("show", "sessions", "reload"):
        return c, {}
    if c == "farm":
        return farm_admin.farm_request(args)
    if c == "kick":
        if args.tsih is None and args.initiator is None:
            raise _Usage("kick: give a TSIH or --initiator IQN")
        return "kick", {"tsih": args.tsih, "initiator": args.initiator, "target": args.target}
    if c == "lun" and args.action == "add":
        table: dict[str, Any] = {}
        if args.memory:
            table.update(backend="memory", size=args.memory)
        elif args.path and is_nbd_uri(args.path):
            table.update(backend="nbd", uri=args.path)
        elif args.path:
            table["path"] = os.path.abspath(args.path)
        else:
            raise _Usage("lun add: give the image PATH (or --memory SIZE)")
        for key in ("lun", "backend", "block_size", "device_type", "mode"):
            if getattr(args, key) is not None:
                table[key] = getattr(args, key)
        if args.read_only:
            table["read_only"] = True
        if args.write_through:
            table["write_cache"] = False
        return "lun_add", {"target": args.target_name, "lun": table}
    if c == "lun":
        return "lun_remove", {"target": args.target_name, "lun": args.lun}
    if c == "target" and args.action == "add":
        return "target_add", {"name": args.name, "alias": args.alias, "allow": args.allow,
                              "portal_groups": args.portal_group,
                              "luns": [{"lun": i, "backend": "nbd", "uri": p} if is_nbd_uri(p)
                                       else {"lun": i, "path": os.path.abspath(p)}
                                       for i, p in enumerate(args.lun)]}
    if c == "target":
        return "target_remove", {"name": args.name}
    if c == "acl":
        return f"acl_{args.action}", {"target": args.target_name, "initiator": args.initiator}
    if c == "chap":
        return "chap_set", _chap_args(args)
    if c == "resize":
        return "resize", {"target": args.target_name, "lun": args.lun, "size": args.size}
    if c == "media":
        if args.eject == (args.path is not None):
            raise _Usage("media: give the image PATH or --eject")
        return "media", {"target": args.target_name, "lun": args.lun,
                         "path": os.path.abspath(args.path) if args.path else None}
    if c == "alua":
        return "alua", {"portal_group": args.portal_group, "state": args.state,
                        "target": args.target}
    assert c == "saveconfig"
    return "saveconfig", {"path": os.path.abspath(args.file) if args.file else None}


def _chap_args(args: argparse.Namespace) -> dict[str, Any]:
    target = None if args.discovery else args.target_name
    creds = args.credentials
    if args.discovery and args.target_name and creds is None:
        creds = args.target_name  # "chap set --discovery USER:SECRET"
    if not args.discovery and not target:
        raise _Usage("chap set: give the TARGET (or --discovery)")
    if args.clear:
        return {"target": target, "clear": True}
    if not creds:
        raise _Usage("chap set: give USER:SECRET (or --clear)")
    out: dict[str, Any] = {"target": target}
    for key, text in (("", creds), ("mutual_", args.mutual)):
        if text is None:
            continue
        user, sep, secret = text.partition(":")
        if not sep or not user or not secret:
            raise _Usage(f"chap set: {text!r}: expected USER:SECRET")
        out[f"{key}user"], out[f"{key}secret"] = user, secret
    return out


def run(args: argparse.Namespace) -> int:
    """Run one administration command; returns the exit status."""
    path = args.control or default_control_path(args.state_dir)
    try:
        op, params = _request(args)
        result = request(path, op, params)
    except (ControlError, RemoteError, _Usage) as exc:
        print(f"iscsi-target: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from .admin_format import render

        if op == "reload" and result["error"]:
            print(f"iscsi-target: error: {result['error']}", file=sys.stderr)
            return 1
        print(farm_admin.render_farm(op, result) if op.startswith("farm_") else
              render(op, result))
    if op == "reload" and (result["error"] or result["failed"]):
        return 1
    return 0
