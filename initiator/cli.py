"""``iscsi-initiator``: discover, list, inquire, copy, benchmark, attach and detach LUNs.

Every failure prints one line -- what went wrong and what to try -- and exits
non-zero; ``-v`` adds logging for the details.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from iscsi.discovery import DiscoveredTarget
from iscsi.names import parse_portal, parse_url
from iscsi.scsi.constants import PeripheralType

from .blockdev import options_from_url
from .errors import InitiatorError, LUNNotFound
from .scsi import LUN, SCSICheckCondition
from .cli_attach import cmd_attach, cmd_detach
from .cli_common import PROG, human_size, session_options, with_creds
from .cli_copy import cmd_bench, cmd_copy
from .session import Session, SessionOptions, discover, run


# ------------------------------------------------------------- discover, ls


async def _discover(host: str, port: int, opts: SessionOptions) -> list[DiscoveredTarget]:
    # The URL's credentials are usually the target's: let a portal without
    # discovery CHAP answer without them (see discover()).
    return await discover(host, port, opts, chap_optional=True)


async def cmd_discover(args: argparse.Namespace) -> int:
    text = args.portal
    if text.startswith("iscsi://"):
        u = parse_url(text)
        host, port = u.host, u.port
        opts = with_creds(text, session_options(args))
    else:
        p = parse_portal(text)
        host, port, opts = p.host, p.port, session_options(args)
    targets = await _discover(host, port, opts)
    if not targets:
        print(f"{PROG}: the portal {text} lists no targets", file=sys.stderr)
        return 1
    for t in targets:
        for portal in t.portals:
            print(f"{t.name} {portal}")
    return 0


_TYPES = {int(v): v.name.lower().replace("_", "-") for v in PeripheralType}
_TYPES[0x0C] = "storage-array-controller"


async def _describe_lun(session: Session, lun_no: int) -> str:
    lun = LUN(session, lun_no)
    inq = await lun.inquiry()
    kind = _TYPES.get(inq.peripheral_type, f"type-{inq.peripheral_type}")
    line = f"  lun {lun_no}: {kind} {inq.vendor} {inq.product} {inq.revision}".rstrip()
    if inq.peripheral_type in (PeripheralType.DISK, PeripheralType.CDROM):
        try:
            cap = await lun.read_capacity()
        except SCSICheckCondition as exc:
            return f"{line}, no medium ({exc.asc_name})"
        prov = "thin" if cap.lbpme else "full"
        line += f", {human_size(cap.size)} ({cap.blocks} x {cap.block_size} B), {prov}-provisioned"
    return line


async def cmd_ls(args: argparse.Namespace) -> int:
    u = parse_url(args.url)
    opts = with_creds(args.url, session_options(args))
    names = [u.target] if u.target else [t.name for t in await _discover(u.host, u.port, opts)]
    for name in names:
        assert name is not None
        async with await Session.connect(u.host, u.port, name, opts) as s:
            luns = await LUN(s, 0).report_luns()
            if u.lun is not None:
                if u.lun not in luns:
                    raise LUNNotFound(f"LUN {u.lun} does not exist on {name} (it has {luns})")
                luns = [u.lun]
            print(name)
            for n in luns:
                print(await _describe_lun(s, n))
    return 0


# ------------------------------------------------------------------ inquiry


async def cmd_inquiry(args: argparse.Namespace) -> int:
    host, port, target, lun_no, opts = options_from_url(args.url, session_options(args))
    async with await Session.connect(host, port, target, opts) as s:
        lun = LUN(s, lun_no)
        inq = await lun.inquiry()
        if inq.qualifier == 3:
            raise LUNNotFound(f"LUN {lun_no} does not exist on {target}")
        print(f"vendor: {inq.vendor}")
        print(f"product: {inq.product}")
        print(f"revision: {inq.revision}")
        print(f"peripheral type: {_TYPES.get(inq.peripheral_type, inq.peripheral_type)}")
        print(f"version: 0x{inq.version:02x}  removable: {inq.rmb}  cmdque: {inq.cmdque}"
              f"  tpgs: {inq.tpgs}  3pc: {inq.three_pc}")
        pages = await lun.vpd_pages()
        print("vpd pages: " + " ".join(f"0x{p:02x}" for p in pages))
        if 0x80 in pages:
            print(f"serial: {await lun.unit_serial_number()}")
        if 0x83 in pages:
            for d in await lun.device_identification():
                value = d.text if d.code_set in (2, 3) else d.value.hex()
                print(f"designator: type {d.designator_type} assoc {d.association} {value}")
        if 0xB0 in pages:
            bl = await lun.block_limits()
            if bl is not None:
                print(f"block limits: max transfer {bl.max_transfer_length} blocks, "
                      f"optimal {bl.optimal_transfer_length}, max unmap "
                      f"{bl.max_unmap_lba_count} blocks")
        if inq.peripheral_type == PeripheralType.DISK:
            cap = await lun.read_capacity()
            print(f"capacity: {cap.size} bytes ({cap.blocks} x {cap.block_size} B), "
                  f"thin: {cap.lbpme}, unmapped reads zero: {cap.lbprz}")
    return 0


# --------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="iSCSI initiator tools")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--initiator-name", help="our iSCSI name (default: derived from the host)")
    p.add_argument("--header-digest", help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--data-digest", help="offer e.g. CRC32C or None,CRC32C")
    p.add_argument("--chap-algorithms", help="CHAP_A values to offer, e.g. 5 or 7,5")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--replacement-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--command-timeout", type=float, default=30.0, metavar="S",
                   help="abort a SCSI command unanswered this long: ABORT TASK, then "
                        "LUN RESET, then reconnect, as Linux does (0 = wait forever)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("discover", help="list the targets of a portal (SendTargets)")
    d.add_argument("portal", metavar="HOST[:PORT]")
    d.set_defaults(func=cmd_discover)
    ls = sub.add_parser("ls", help="list targets and LUNs with size, vendor, provisioning")
    ls.add_argument("url", metavar="URL", help="iscsi://host[:port][/target[/lun]]")
    ls.set_defaults(func=cmd_ls)
    q = sub.add_parser("inquiry", help="INQUIRY and VPD pages of a LUN")
    q.add_argument("url", metavar="URL")
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
                       help="show the LUN as the file MOUNTPOINT/lun (needs pyfuse3)")
    a.add_argument("--name", default=None,
                   help="NBD export name (default: empty) or FUSE file name (default: lun)")
    a.add_argument("--read-only", action="store_true")
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
    args = _parser().parse_args(argv)
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
