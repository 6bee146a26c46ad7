"""``iscsi-initiator``: discover, list, inquire, copy, benchmark, attach and detach LUNs.

Every failure prints one line -- what went wrong and what to try -- and exits
non-zero; ``-v`` adds logging for the details.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from iscsi.discovery import DiscoveredTarget
from iscsi.names import parse_portal, parse_url
from iscsi.constants import LoginStatus
from iscsi.scsi.constants import PeripheralType

from .blockdev import options_from_url
from .errors import InitiatorError, LoginRefused, LUNNotFound
from .scsi import LUN, SCSICheckCondition
from .cli_attach import cmd_attach, cmd_detach
from .cli_common import PROG, human_size, session_options, with_creds
from .cli_copy import cmd_bench, cmd_copy
from .discover import discover
from .session import Session, SessionOptions, run


# ------------------------------------------------------------- discover, ls


async def _discover(host: str, port: int, opts: SessionOptions) -> list[DiscoveredTarget]:
    # The URL's credentials are usually the target's: let a portal without
    # discovery CHAP answer without them (see discover()).
    return await discover(host, port, opts, chap_optional=True)


async def cmd_discover(args: argparse.Namespace) -> int:
    text = args.portal
    if args.isns:
        if text:
            raise ValueError("give a portal or --isns SERVER, not both")
        from .isns import discover_isns

        opts = session_options(args)
        targets = await discover_isns(args.isns, opts.initiator_name,
                                      timeout=opts.connect_timeout or 10.0)
        text = f"iSNS server {args.isns}"
    elif not text:
        raise ValueError("discover needs a portal HOST[:PORT] or --isns SERVER")
    elif text.startswith("iscsi://"):
        u = parse_url(text)
        host, port = u.host, u.port
        opts = with_creds(text, session_options(args))
    else:
        p = parse_portal(text)
        host, port, opts = p.host, p.port, session_options(args)
    if not args.isns:
        targets = await _discover(host, port, opts)
    if args.json:
        _emit([{"name": t.name, "portals": [str(p) for p in t.portals]} for t in targets])
        return 0 if targets else 1
    if not targets:
        where = text if args.isns else f"the portal {text}"
        print(f"{PROG}: {where} lists no targets", file=sys.stderr)
        return 1
    for t in targets:
        for portal in t.portals:
            print(f"{t.name} {portal}")
    return 0


def _emit(doc: object) -> None:
    """Machine-readable output: one JSON document on stdout."""
    print(json.dumps(doc, indent=2))


_TYPES = {int(v): v.name.lower().replace("_", "-") for v in PeripheralType}
_TYPES[0x0C] = "storage-array-controller"


async def _lun_facts(session: Session, lun_no: int) -> dict[str, Any]:
    lun = LUN(session, lun_no)
    inq = await lun.inquiry()
    facts: dict[str, Any] = {
        "lun": lun_no, "type": _TYPES.get(inq.peripheral_type, f"type-{inq.peripheral_type}"),
        "vendor": inq.vendor, "product": inq.product, "revision": inq.revision}
    if inq.peripheral_type in (PeripheralType.DISK, PeripheralType.CDROM):
        try:
            cap = await lun.read_capacity()
        except SCSICheckCondition as exc:
            facts["medium"] = False
            facts["reason"] = exc.asc_name
            return facts
        facts.update({"medium": True, "size": cap.size, "blocks": cap.blocks,
                      "block_size": cap.block_size,
                      "provisioning": "thin" if cap.lbpme else "full"})
    return facts


def _lun_line(f: dict[str, Any]) -> str:
    line = f"  lun {f['lun']}: {f['type']} {f['vendor']} {f['product']} {f['revision']}".rstrip()
    if f.get("medium") is False:
        return f"{line}, no medium ({f['reason']})"
    if "size" in f:
        line += (f", {human_size(f['size'])} ({f['blocks']} x {f['block_size']} B), "
                 f"{f['provisioning']}-provisioned")
    return line


async def cmd_ls(args: argparse.Namespace) -> int:
    u = parse_url(args.url)
    opts = with_creds(args.url, session_options(args))
    names = [u.target] if u.target else [t.name for t in await _discover(u.host, u.port, opts)]
    listing: list[dict[str, Any]] = []
    refused = 0
    for name in names:
        assert name is not None
        entry: dict[str, Any] = {"target": name}
        listing.append(entry)
        try:
            async with await Session.connect(u.host, u.port, name, opts) as s:
                luns = await LUN(s, 0).report_luns()
                if u.lun is not None:
                    if u.lun not in luns:
                        raise LUNNotFound(f"LUN {u.lun} does not exist on {name} (it has {luns})")
                    luns = [u.lun]
                entry["luns"] = [await _lun_facts(s, n) for n in luns]
        except LoginRefused as exc:
            if u.target:
                raise
            # One target's refusal must not hide the others (a portal
            # often protects some targets with CHAP and not others).
            refused += 1
            entry["error"] = str(exc)
            entry["needs_credentials"] = exc.status in (LoginStatus.AUTHENTICATION_FAILURE,
                                                        LoginStatus.AUTHORIZATION_FAILURE)
        if not args.json:
            print(name)
            if "error" in entry:
                why = ("needs CHAP credentials (iscsi://user%secret@host/...)"
                       if entry["needs_credentials"] else entry["error"])
                print(f"  (not listed: {why})")
            for f in entry.get("luns", []):
                print(_lun_line(f))
    if args.json:
        _emit(listing)
    return 1 if refused == len(names) and names else 0


# ------------------------------------------------------------------ inquiry


async def cmd_inquiry(args: argparse.Namespace) -> int:
    host, port, target, lun_no, opts = options_from_url(args.url, session_options(args))
    async with await Session.connect(host, port, target, opts) as s:
        lun = LUN(s, lun_no)
        inq = await lun.inquiry()
        if inq.qualifier == 3:
            raise LUNNotFound(f"LUN {lun_no} does not exist on {target}")
        d: dict[str, Any] = {
            "vendor": inq.vendor, "product": inq.product, "revision": inq.revision,
            "peripheral_type": _TYPES.get(inq.peripheral_type, inq.peripheral_type),
            "version": inq.version, "removable": inq.rmb, "cmdque": inq.cmdque,
            "tpgs": inq.tpgs, "3pc": inq.three_pc}
        pages = await lun.vpd_pages()
        d["vpd_pages"] = list(pages)
        if 0x80 in pages:
            d["serial"] = await lun.unit_serial_number()
        if 0x83 in pages:
            d["designators"] = [
                {"type": int(x.designator_type), "association": int(x.association),
                 "code_set": int(x.code_set),
                 "value": x.text if x.code_set in (2, 3) else x.value.hex()}
                for x in await lun.device_identification()]
        if 0xB0 in pages:
            bl = await lun.block_limits()
            if bl is not None:
                d["block_limits"] = {"max_transfer_length": bl.max_transfer_length,
                                     "optimal_transfer_length": bl.optimal_transfer_length,
                                     "max_unmap_lba_count": bl.max_unmap_lba_count}
        if inq.peripheral_type == PeripheralType.DISK:
            cap = await lun.read_capacity()
            d["capacity"] = {"size": cap.size, "blocks": cap.blocks, "block_size": cap.block_size,
                             "thin": cap.lbpme, "unmapped_reads_zero": cap.lbprz}
    if args.json:
        _emit(d)
        return 0
    print(f"vendor: {d['vendor']}")
    print(f"product: {d['product']}")
    print(f"revision: {d['revision']}")
    print(f"peripheral type: {d['peripheral_type']}")
    print(f"version: 0x{d['version']:02x}  removable: {d['removable']}  cmdque: {d['cmdque']}"
          f"  tpgs: {d['tpgs']}  3pc: {d['3pc']}")
    print("vpd pages: " + " ".join(f"0x{p:02x}" for p in d["vpd_pages"]))
    if "serial" in d:
        print(f"serial: {d['serial']}")
    for x in d.get("designators", []):
        print(f"designator: type {x['type']} assoc {x['association']} {x['value']}")
    if "block_limits" in d:
        bl_d = d["block_limits"]
        print(f"block limits: max transfer {bl_d['max_transfer_length']} blocks, "
              f"optimal {bl_d['optimal_transfer_length']}, max unmap "
              f"{bl_d['max_unmap_lba_count']} blocks")
    if "capacity" in d:
        c = d["capacity"]
        print(f"capacity: {c['size']} bytes ({c['blocks']} x {c['block_size']} B), "
              f"thin: {c['thin']}, unmapped reads zero: {c['unmapped_reads_zero']}")
    return 0


# --------------------------------------------------------------------- main


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every subcommand shares. They are accepted before and
    after the subcommand: the subcommand's copies default to SUPPRESS so
    they only override what was given before it."""
    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="log more (-vv: debug)")
    p.add_argument("--initiator-name", default=d(None),
                   help="our iSCSI name (default: open-iscsi's, else derived from the host)")
    p.add_argument("--header-digest", default=d(None), help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--data-digest", default=d(None), help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--chap-algorithms", default=d(None),
                   help="CHAP_A values to offer, e.g. 5 or 7,5")
    p.add_argument("--connect-timeout", type=float, default=d(5.0), metavar="S",
                   help="seconds for the TCP connection and, again, for the login (default 5)")
    p.add_argument("--replacement-timeout", type=float, default=d(120.0), metavar="S")
    p.add_argument("--connections", type=_connections, default=d(1), metavar="N",
                   help="TCP connections per session (MC/S; the target may accept fewer; "
                        "default 1)")
    p.add_argument("--error-recovery-level", type=int, choices=(0, 1, 2), default=d(0),
                   metavar="N",
                   help="ErrorRecoveryLevel to offer: 1 recovers digest errors and lost PDUs "
                        "without reconnecting, 2 also recovers a lost connection with TASK "
                        "REASSIGN instead of failing its writes (default 0)")
    p.add_argument("--command-timeout", type=float, default=d(30.0), metavar="S",
                   help="abort a SCSI command unanswered this long: ABORT TASK, then "
                        "LUN RESET, then reconnect, as Linux does (0 = wait forever)")


def _connections(text: str) -> int:
    """--connections: 1..65535 (MaxConnections, RFC 7143 §13.2)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of connections (1..65535)")
    return n


def _version() -> str:
    try:
        return importlib.metadata.version("aioiscsi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``iscsi-initiator`` command line (also what the man page and the
    shell completions are generated from, scripts/gen-docs)."""
    p = argparse.ArgumentParser(prog=PROG, description="iSCSI initiator tools")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    _global_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = p.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return real_add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    d = sub.add_parser("discover", help="list the targets of a portal (SendTargets) or of an "
                       "iSNS server (--isns)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.add_argument("--isns", metavar="HOST[:PORT]",
                   help="ask this iSNS server (RFC 4171, port 3205 by default) instead")
    d.add_argument("portal", metavar="HOST[:PORT]", nargs="?")
    d.set_defaults(func=cmd_discover)
    ls = sub.add_parser("ls", help="list targets and LUNs with size, vendor, provisioning")
    ls.add_argument("url", metavar="URL", help="iscsi://host[:port][/target[/lun]]")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_ls)
    q = sub.add_parser("inquiry", help="INQUIRY and VPD pages of a LUN")
    q.add_argument("url", metavar="URL")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_inquiry)
    c = sub.add_parser("copy", help="copy between iscsi:// URLs and files")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    c.set_defaults(func=cmd_copy)
    a = sub.add_parser("attach", help="serve a LUN as an NBD export (or a FUSE file) until "
                       "detached or interrupted")
    a.add_argument("url", metavar="URL")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument("--nbd", metavar="unix:PATH|HOST:PORT",
                       help="NBD listen address (e.g. unix:/run/lun1.sock or 127.0.0.1:10809)")
    where.add_argument("--fuse", metavar="MOUNTPOINT",
                       help="show the LUN as the file MOUNTPOINT/vhdd and each partition as "
                       "MOUNTPOINT/vol0, vol1... (needs pyfuse3)")
    where.add_argument("--list", action="store_true",
                       help="print the LUN's partition table (the --fuse nodes) and exit")
    a.add_argument("--json", action="store_true", help="with --list: print JSON")
    a.add_argument("--name", default=None,
                   help="NBD export name (default: empty) or the FUSE whole-disk file name "
                   "(default: vhdd)")
    a.add_argument("--read-only", action="store_true")
    a.add_argument("--multipath", choices=("auto", "on", "off"), default="auto",
                   help="use every portal of the target, I/O on the best ALUA path with "
                   "failover (auto: when SendTargets lists more than one portal or --path "
                   "is given)")
    a.add_argument("--path", action="append", default=[], metavar="HOST[:PORT]",
                   help="another portal of the same LUN (a gateway discovery does not list)")
    a.add_argument("--control", metavar="PATH",
                   help="control socket 'detach' talks to (default: in $XDG_RUNTIME_DIR/"
                   "aioiscsi, named after the export)")
    a.set_defaults(func=cmd_attach)
    dt = sub.add_parser("detach", help="stop an attach: flush, log out, close the export")
    dt.add_argument("export", nargs="?", metavar="EXPORT",
                    help="the attach's --nbd address or --fuse mountpoint (default: the "
                    "only attach running)")
    dt.add_argument("--control", metavar="PATH", help="the attach's control socket")
    dt.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="how long to wait for the flush and logout (default 60)")
    dt.set_defaults(func=cmd_detach)
    b = sub.add_parser("bench", help="measure IOPS and MB/s")
    b.add_argument("url", metavar="URL")
    b.add_argument("--rw", choices=("read", "write"), default="read")
    b.add_argument("--pattern", choices=("rand", "seq"), default="rand")
    b.add_argument("--bs", type=int, default=4096, help="bytes per I/O (default 4096)")
    b.add_argument("--qd", type=int, default=32, help="I/Os in flight (default 32)")
    b.add_argument("--seconds", type=float, default=5.0)
    b.add_argument("--force", action="store_true", help="allow a write benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iscsi-initiator`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (
        logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    if args.verbose == 0:
        # Recovery chatter is for -v; failures are reported as one line.
        logging.getLogger("initiator").setLevel(logging.ERROR)
    try:
        code: int = run(args.func(args))
        return code
    except InitiatorError as exc:
        hint = f" -- try: {exc.hint}" if exc.hint else ""
        print(f"{PROG}: {exc}{hint}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
