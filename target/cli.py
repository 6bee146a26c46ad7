"""``iscsi-target``: serve disk images over iSCSI.

    iscsi-target serve IMAGE [IMAGE ...] [--portal HOST:PORT] [--name IQN]
    iscsi-target serve --config FILE        (TOML, or an IET ietd.conf)
    iscsi-target demo                       (creates and serves demo/demo.img)
    iscsi-target image create|info|check|convert|commit|snapshot ...
    iscsi-target show|sessions|kick|lun|target|acl|chap|resize|media|reload|saveconfig
                                            (a running target, over its control socket:
                                            target/admin_cli.py)

Every failure is one line on stderr saying what is wrong and what to do,
with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import importlib.metadata
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from iscsi.names import InvalidName, generate_iqn, normalize_name

from .faults import KINDS as FAULT_KINDS
from .faults import FaultProfileError, parse_profile
from . import admin_cli, farm_admin, image_cli
from .image_info import human_size as _human
from .config import (
    ChapConfig,
    ConfigError,
    LunSpec,
    RBD_MODES,
    PortalGroup,
    ServerConfig,
    TargetSpec,
    check_chap,
    load_config,
    parse_listen,
    parse_metrics_address,
    physical_block_exponent,
)
from .backends.base import BackendError
from .backends.nbd import is_nbd_uri, parse_nbd_uri
from .logsetup import LOG_FORMATS, LogSetupError, setup_logging

DEMO_SIZE = 64 << 20


class CLIError(Exception):
    """A one-line user error."""


def _portals(values: list[str] | None, default: str) -> tuple[tuple[str, int], ...]:
    out = []
    for text in values or [default]:
        try:
            host, port = parse_listen(text)
        except ValueError as exc:
            raise CLIError(f"--portal {text}: {exc} (use HOST:PORT or [V6ADDR]:PORT)") from None
        out.append((host, port))
    return tuple(out)


def _chap(text: str | None, what: str) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, secret = text.partition(":")
    if not sep or not user or not secret:
        raise CLIError(f"{what} {text!r}: expected USER:SECRET")
    if len(secret.encode()) < 12:
        raise CLIError(f"{what}: the secret must be at least 12 bytes (RFC 7143 §12.1.3)")
    return user, secret


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the configuration of ``serve IMAGE...``."""
    if args.config:
        if args.images:
            raise CLIError("give either image files or --config FILE, not both")
        ignored = [flag for flag, given in (
            ("--name", args.name), ("--read-only", args.read_only),
            ("--chap", args.chap), ("--mutual-chap", args.mutual_chap),
            ("--write-through", args.write_through), ("--block-size", args.block_size != 512),
            ("--mode", args.mode != "normal"), ("--removable", args.removable),
            ("--physical-block-size", args.physical_block_size),
            ("--boot-farm", getattr(args, "boot_farm", None)),
            ("--ceph-conf", args.ceph_conf)) if given]
        if ignored:
            # Never silently ignored: the file says how the targets look.
            raise CLIError(f"{', '.join(ignored)} describe image files given on the command "
                           f"line; with --config {args.config} set them in the file instead")
        config = load_config(args.config)
        if args.portal:
            # --portal applies: an ietd.conf has no portals (ietd takes them
            # on its command line), and a TOML file's are replaced -- but
            # only when it has one portal group, so no target loses its own.
            if len(config.portal_groups) > 1:
                raise CLIError(f"{args.config} defines {len(config.portal_groups)} portal "
                               "groups; set their portals there rather than with --portal")
            tag = config.portal_groups[0].tag
            config = dataclasses.replace(config, portal_groups=(
                PortalGroup(tag, _portals(args.portal, "0.0.0.0:3260")),))
        # Server settings given on the command line apply over the file's
        # (a systemd unit names its StateDirectory this way).
        if args.state_dir is not None:
            config = dataclasses.replace(config, state_dir=os.path.abspath(args.state_dir))
        if args.nop_interval is not None:
            config = dataclasses.replace(config, nop_interval=args.nop_interval)
        return config
    farm = None
    if getattr(args, "boot_farm", None):
        if args.images:
            raise CLIError("give either image files or --boot-farm GOLDEN, not both")
        if args.mode != "normal" or args.read_only:
            raise CLIError("--mode/--read-only do not apply to --boot-farm (each machine "
                           "writes its own overlay; the golden image is never written)")
        farm = farm_admin.farm_spec_from_args(args)
    elif not args.images:
        raise CLIError("nothing to serve: give one or more image files, or --config FILE")
    try:
        physical_block_exponent(args.block_size, args.physical_block_size)
    except ValueError as exc:
        raise CLIError(f"--physical-block-size {exc}") from None
    luns = [] if farm is None else [farm_admin.farm_lun(farm)]
    for i, path in enumerate(args.images):
        if path.startswith("rbd:"):
            luns.append(_rbd_lun(i, path, args))
            continue
        if is_nbd_uri(path):
            # An NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
            try:
                parse_nbd_uri(path)
            except BackendError as exc:
                raise CLIError(str(exc)) from None
            luns.append(LunSpec(lun=i, path=path, backend="nbd", read_only=args.read_only,
                                block_size=args.block_size, write_cache=not args.write_through,
                                mode=args.mode))
            continue
        if not os.path.exists(path):
            raise CLIError(f"{path}: no such file (create one with: truncate -s 1G {path})")
        if not args.read_only and not os.access(path, os.W_OK):
            raise CLIError(f"{path} is read-only for this user: serve it with --read-only, or "
                           "make it writable")
        luns.append(LunSpec(lun=i, path=os.path.abspath(path), read_only=args.read_only,
                            block_size=args.block_size, write_cache=not args.write_through,
                            mode=args.mode, removable=args.removable,
                            physical_block_size=args.physical_block_size))
    first = farm.golden if farm else args.images[0]
    if is_nbd_uri(first):
        label = parse_nbd_uri(first).export or "nbd"
    else:
        label = os.path.splitext(os.path.basename(first.split(":")[1] if first.startswith("rbd:")
                                                  else first))[0]
    try:
        name = normalize_name(args.name) if args.name else generate_iqn(label)
    except (InvalidName, ValueError) as exc:
        raise CLIError(f"--name: {exc}") from None
    chap = _chap(args.chap, "--chap")
    mutual = _chap(args.mutual_chap, "--mutual-chap")
    if mutual and not chap:
        raise CLIError("--mutual-chap needs --chap too")
    chap_cfg = ChapConfig(chap[0], chap[1], *(mutual or (None, None))) if chap else None
    if chap_cfg is not None:
        try:
            check_chap(chap_cfg)  # the rules the TOML path applies (RFC 7143 §12.1.3)
        except ConfigError as exc:
            raise CLIError(f"--chap/--mutual-chap: {exc}") from None
    spec = TargetSpec(name=name, luns=tuple(luns), chap=chap_cfg, farm=farm)
    return ServerConfig(
        targets=(spec,), portal_groups=(PortalGroup(1, _portals(args.portal, "0.0.0.0:3260")),),
        nop_interval=30.0 if args.nop_interval is None else args.nop_interval,
        state_dir=args.state_dir)


def _rbd_lun(lun: int, text: str, args: argparse.Namespace) -> LunSpec:
    """A LUN of ``serve rbd:POOL[/NAMESPACE]/IMAGE[:id=..][:conf=..][:keyring=..]``
    (qemu's spelling); ``--ceph-conf`` or $CEPH_CONF name the cluster."""
    from target.backends.base import BackendError
    from target.backends.rbd import parse_rbd_spec

    try:
        rbd = parse_rbd_spec(text, ceph_conf=args.ceph_conf or "")
    except BackendError as exc:
        raise CLIError(str(exc)) from None
    if args.mode.replace("-", "") not in RBD_MODES:
        raise CLIError(f"{text}: --mode {args.mode} is not available for an RBD image "
                       f"({', '.join(RBD_MODES)})")
    conf, keyring = (os.path.abspath(p) if p else "" for p in (rbd.ceph_conf, rbd.keyring))
    return LunSpec(lun=lun, path="", backend="rbd", pool=rbd.pool, image=rbd.image,
                   namespace=rbd.namespace, ceph_conf=conf, client_id=rbd.client_id,
                   keyring=keyring, read_only=args.read_only, block_size=args.block_size,
                   write_cache=not args.write_through, mode=args.mode)


def open_access_warnings(config: ServerConfig) -> list[str]:
    """One line per target any initiator may use: no CHAP and no initiator
    ACL (what LIO calls demo mode), so the administrator sees it."""
    out = []
    for t in config.targets:
        if t.chap is None and not t.allow:
            access = "read" if all(lun.read_only for lun in t.luns) else "read and write"
            out.append(f"warning: {t.name} has no CHAP and no initiator ACL: any initiator "
                       f"that reaches the portal can {access} it (--chap USER:SECRET, or "
                       "allow = [...] in a config file)")
    return out


def attach_help(server: Any) -> str:
    """How to attach each target, for people and for copy-paste."""
    lines = []
    for rt in server.targets.values():
        name = rt.name
        lines.append(f"Target {name}")
        for lun, backend in sorted(rt.backends.items()):
            size = backend.size
            lines.append(f"  LUN {lun}: {getattr(backend, 'path', '') or 'memory'} "
                         f"({_human(size)}{', read-only' if backend.read_only else ''})")
        shown: list[tuple[str, int]] = []
        for tag, host, port in server.bound:
            if tag in rt.spec.portal_groups:
                shown.append((_reachable(host), port))
        host, port = shown[0] if shown else ("127.0.0.1", 3260)
        hp = f"[{host}]" if ":" in host else host
        portal = f"{hp}:{port}"
        lines.append("  Portals: " + ", ".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in dict.fromkeys(shown)))
        chap = rt.spec.chap
        # With CHAP the lines carry the user (the secret stays a placeholder,
        # so it is not left in terminal scrollback or logs).
        cred = f"{chap.user}%SECRET@" if chap is not None else ""
        lines.append("  Attach it with:" + (f" (CHAP user {chap.user}; put the secret for "
                                             "SECRET)" if chap is not None else ""))
        lines.append(f"    libiscsi:   iscsi-inq iscsi://{cred}{portal}/{name}/0")
        lines.append(f"    QEMU:       qemu-img info iscsi://{cred}{portal}/{name}/0")
        lines.append(f"    open-iscsi: iscsiadm -m discovery -t sendtargets -p {portal}")
        if chap is not None:
            for key, value in (("node.session.auth.authmethod", "CHAP"),
                               ("node.session.auth.username", chap.user),
                               ("node.session.auth.password", "SECRET")):
                lines.append(f"                iscsiadm -m node -T {name} -p {portal} "
                             f"--op update -n {key} -v {value}")
            if chap.mutual_user is not None:
                lines.append(f"                (mutual CHAP: node.session.auth.username_in "
                             f"{chap.mutual_user}, password_in MUTUAL_SECRET)")
        lines.append(f"                iscsiadm -m node -T {name} -p {portal} --login")
        lines.append("    VirtualBox: VBoxManage storageattach VM --storagectl SATA --port 0 "
                     f"--device 0 --type hdd --medium iscsi --server {host} --tport {port} "
                     f"--target {name} --lun 0"
                     + (f" --username {chap.user} --password SECRET" if chap is not None else ""))
        lines.append(f"    aioiscsi:   iscsi-initiator ls iscsi://{cred}{portal}/{name}/0")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def _reachable(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def make_demo_image(path: str) -> None:
    """Create the demo disk: a sparse 64 MiB raw image with an MBR holding
    one Linux partition, so an initiator sees a partitioned disk."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(DEMO_SIZE)
        mbr = bytearray(512)
        # One primary partition (type 0x83) from LBA 2048 to the end.
        start, count = 2048, DEMO_SIZE // 512 - 2048
        entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + start.to_bytes(4, "little") + \
            count.to_bytes(4, "little")
        mbr[446:462] = entry
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)


def _install_uvloop() -> None:
    # DESIGN.md: 3.11's stdlib transport copies large writes; uvloop does not.
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_server(config: ServerConfig, control: str | None = None,
               control_required: bool = False, metrics: str | None = None,
               boot_script: str | None = None, boot_host: str | None = None,
               fault_report: str | None = None) -> int:
    """Open, serve until a signal, print attach help once listening.
    ``control`` is the control socket's path (None: none)."""
    from target.backends.base import BackendError

    from .control import ControlError
    from .server import TargetServer, serve

    _install_uvloop()

    stops: list[Callable[[], None]] = []

    def ready(server: TargetServer) -> None:
        faults = server.faults
        if faults is not None:
            print(f"warning: misbehaving on purpose (--fault {config.fault_profile}): for "
                  "testing initiators only", file=sys.stderr, flush=True)
            if fault_report is not None:
                stops.append(lambda: faults.write_report(fault_report))
        if metrics is not None:
            from .metrics import serve_metrics

            try:
                stops.append(serve_metrics(server, metrics).stop)
            except OSError as exc:
                raise CLIError(f"--metrics {metrics}: cannot listen: {exc.strerror}") from None
        # Once it serves (an error before that stays the only line).
        for line in open_access_warnings(config):
            print(line, file=sys.stderr, flush=True)
        text = attach_help(server)
        if any(t.farm is not None for t in config.targets):
            farm = farm_admin.boot_help(server, boot_host)
            if boot_script is not None:
                script = server.farm_boot(host=boot_host, show_secrets=True)["ipxe"]
                try:
                    farm_admin.write_boot_script(boot_script, script)
                except OSError as exc:
                    raise CLIError(f"--boot-script {boot_script}: {exc.strerror}") from None
                farm += f"iPXE script written to {boot_script}\n"
            # Before the closing "Press Ctrl-C" line, which scripts wait for.
            head, _, last = text.rpartition("\n")
            text = f"{head}\n{farm}{last}"
        print(text, flush=True)

    try:
        return asyncio.run(serve(config, ready=ready, control=control,
                                 control_required=control_required))
    except CLIError:
        raise
    except (BackendError, ControlError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(start_failure(exc, config)) from None
    finally:
        for stop in stops:
            stop()


def _check_metrics(listen: str) -> None:
    """Before starting: the extra is installed and the address parses."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        from .metrics import MISSING

        raise CLIError(MISSING) from None
    try:
        parse_metrics_address(listen)
    except ValueError as exc:
        raise CLIError(f"--metrics {listen}: {exc}") from None


def observability(args: argparse.Namespace, config: ServerConfig) -> ServerConfig:
    """``--log-format``, ``--log-file`` and ``--metrics`` over the
    ``[server]`` keys of a config file: the command line wins."""
    given: dict[str, str] = {}
    if args.log_format is not None:
        given["log_format"] = args.log_format
    if args.log_file is not None:
        given["log_file"] = os.path.abspath(args.log_file)
    if args.metrics is not None:
        given["metrics"] = args.metrics
    if getattr(args, "isns", None) is not None:
        from .isns import parse_isns_address

        try:
            parse_isns_address(args.isns)
        except ValueError as exc:
            raise CLIError(f"--isns: {exc}") from None
        given["isns"] = args.isns
    if not given:
        return config
    return dataclasses.replace(config, **given,  # type: ignore[arg-type]
                               cli_overrides=config.cli_overrides | given.keys())


def start_failure(exc: OSError, config: ServerConfig) -> str:
    """One line saying why the target could not start, and what works."""
    portals = [p for g in config.portal_groups for p in g.portals]
    if isinstance(exc, socket.gaierror):
        hosts = ", ".join(h for h, _ in portals)
        return (f"cannot resolve the portal address {hosts}: {exc.strerror}; use an IP "
                "address or a name this host can resolve")
    if exc.filename is not None:
        # A file, not a socket: the state directory (APTPL, overlays) or a
        # path in it.
        what = "state directory" if config.state_dir and str(exc.filename).startswith(
            str(config.state_dir)) else "file"
        return (f"cannot use the {what} {exc.filename}: {exc.strerror}; choose a writable "
                "one with --state-dir DIR")
    ports = sorted({p for _, p in portals})
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen: port {'/'.join(map(str, ports))} is already in use (tgtd, "
                "LIO or another iscsi-target?); stop it, or serve on another port, e.g. "
                "--portal 0.0.0.0:3261")
    if exc.errno == errno.EACCES and any(0 < p < 1024 for p in ports):
        return (f"cannot listen on port {'/'.join(map(str, ports))}: ports below 1024 need root "
                "or CAP_NET_BIND_SERVICE; run as root, or use --portal 0.0.0.0:3261")
    if exc.errno == errno.EADDRNOTAVAIL:
        hosts = ", ".join(h for h, _ in portals)
        return (f"cannot listen on {hosts}: no such address on this host; use one of its "
                "addresses or 0.0.0.0 / [::]")
    return f"cannot start: {exc.strerror or exc}"


def _control_of(args: argparse.Namespace, config: ServerConfig) -> tuple[str | None, bool]:
    """The control socket ``serve`` opens, and whether it was asked for."""
    from .control import default_control_path

    if args.no_control:
        return None, False
    if args.control:
        return args.control, True
    return default_control_path(config.state_dir), False


def _version() -> str:
    try:
        return importlib.metadata.version("aioiscsi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``iscsi-target`` command line (also what the man page and the
    shell completions are generated from, scripts/gen-docs)."""
    parser = argparse.ArgumentParser(prog="iscsi-target", description="Serve disk images over iSCSI.")
    parser.add_argument("--version", action="version", version=f"iscsi-target {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve image files (or a config file) as LUNs")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image file, block device, or Ceph RBD image rbd:POOL[/NAMESPACE]/IMAGE")
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config or IET ietd.conf")
    p.add_argument("--portal", "-p", action="append", metavar="HOST:PORT",
                   help="listen address (repeatable; default 0.0.0.0:3260)")
    p.add_argument("--name", "-n", metavar="IQN", help="target name (default: generated)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--write-through", action="store_true",
                   help="host I/O cache off: every write is durable before it is acknowledged")
    p.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    p.add_argument("--physical-block-size", type=int, metavar="BYTES",
                   help="physical block size when larger than --block-size (512e: "
                        "--physical-block-size 4096)")
    p.add_argument("--removable", action="store_true",
                   help="a removable medium (initiators may eject it and lock it in)")
    p.add_argument("--ceph-conf", metavar="FILE",
                   help="ceph.conf of the cluster of rbd:POOL/IMAGE arguments (default: "
                        "$CEPH_CONF, then librados' own search)")
    p.add_argument("--mode", default="normal",
                   choices=("normal", "writethrough", "immutable", "multiattach", "shareable",
                            "readonly"),
                   help="VirtualBox write mode (immutable: writes vanish at restart; "
                        "multiattach: each initiator sees only its own writes)")
    p.add_argument("--chap", metavar="USER:SECRET", help="require one-way CHAP")
    p.add_argument("--mutual-chap", metavar="USER:SECRET",
                   help="target credentials for mutual CHAP")
    p.add_argument("--nop-interval", type=float, default=None, metavar="SECONDS",
                   help="seconds between NOP-In pings to an idle initiator (default 30; "
                        "overrides [server] nop_interval)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where persistent reservations (APTPL) are kept (overrides "
                        "[server] state_dir)")
    p.add_argument("--control", metavar="PATH",
                   help="control socket for iscsi-target show/lun/resize/... (default: "
                        "STATE_DIR/control.sock, /run/aioiscsi/control.sock as root, else "
                        "$XDG_RUNTIME_DIR/aioiscsi/control.sock)")
    p.add_argument("--no-control", action="store_true", help="open no control socket")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="text (default) or json: one object per line (time, level, logger, "
                        "message and the event's fields); overrides [server] log_format")
    p.add_argument("--log-file", metavar="PATH",
                   help="append the log here instead of stderr (reopened after logrotate "
                        "moves it); overrides [server] log_file")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics "
                        "(needs the metrics extra: prometheus_client); overrides "
                        "[server] metrics")
    farm_admin.add_serve_arguments(p)
    p.add_argument("--fault", metavar="PROFILE",
                   help="misbehave on purpose to test initiators: KIND:N[,KIND:N...] with "
                        "KIND one of " + ", ".join(FAULT_KINDS) + " (see README, Testing "
                        "initiators)")
    p.add_argument("--fault-report", metavar="FILE",
                   help="with --fault: write what each initiator did after each fault, as "
                        "JSON, when the target stops")
    p.add_argument("--isns", metavar="HOST[:PORT]",
                   help="register the targets with this iSNS server (RFC 4171; port 3205 by "
                        "default); overrides [server] isns")
    image_cli.add_subparser(sub)
    admin_cli.add_subparsers(sub)
    d = sub.add_parser("demo", help="create demo/demo.img and serve it on 127.0.0.1:3260")
    d.add_argument("--portal", "-p", action="append", metavar="HOST:PORT")
    d.add_argument("--dir", default="demo", help="where the demo image lives (default ./demo)")
    d.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``iscsi-target`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "image":
        return image_cli.run(args)
    if args.command in admin_cli.COMMANDS:
        return admin_cli.run(args)
    try:
        if args.command == "demo":
            setup_logging(args.verbose)
            path = os.path.join(args.dir, "demo.img")
            if not os.path.exists(path):
                try:
                    make_demo_image(path)
                except OSError as exc:
                    raise CLIError(f"cannot create the demo image {path}: {exc.strerror}; run "
                                   "the demo in a writable folder or give --dir DIR") from None
                print(f"created {path} ({_human(DEMO_SIZE)} demo disk)", flush=True)
            ns = argparse.Namespace(
                config=None, images=[path], read_only=False, block_size=512, write_through=False,
                removable=False, physical_block_size=None, ceph_conf=None,
                name=generate_iqn("demo"), chap=None, mutual_chap=None, mode="normal",
                portal=args.portal or ["127.0.0.1:3260"], nop_interval=30.0, state_dir=None)
            from .control import default_control_path

            return run_server(config_from_args(ns), default_control_path())
        config = observability(args, config_from_args(args))
        if args.fault:
            try:
                parse_profile(args.fault)
            except FaultProfileError as exc:
                raise CLIError(f"--fault: {exc}") from None
            config = dataclasses.replace(config, fault_profile=args.fault)
        elif args.fault_report:
            raise CLIError("--fault-report needs --fault PROFILE")
        farm_admin.check_boot_flags(args, sum(t.farm is not None for t in config.targets))
        # After the config file: it may say where and how to log.
        setup_logging(args.verbose, fmt=config.log_format, path=config.log_file,
                      what="--log-file" if args.log_file else
                      f"{config.source}: server.log_file")
        if config.metrics is not None:
            _check_metrics(config.metrics)
        return run_server(config, *_control_of(args, config), metrics=config.metrics,
                          boot_script=args.boot_script, boot_host=args.boot_host,
                          fault_report=args.fault_report)
    except (CLIError, ConfigError, LogSetupError) as exc:
        print(f"iscsi-target: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
