"""Discover the targets of a portal and list each one's LUNs.

    python examples/initiator_discovery.py 127.0.0.1:3260
    python examples/initiator_discovery.py iscsi://user%secret@127.0.0.1:3260

SendTargets (RFC 7143 Appendix C) returns every target with all its portals
and portal group tags; then one session per target lists its LUNs (REPORT
LUNS) with vendor, product, size and provisioning. Credentials in the URL are
used for discovery CHAP and for the targets' CHAP. The command line does the
same with ``iscsi-initiator discover HOST`` and ``iscsi-initiator ls URL``.
"""

from __future__ import annotations

import sys

from initiator import LUN, InitiatorError, Session, SessionOptions, discover, run
from iscsi.names import parse_portal, parse_url


async def show(text: str) -> None:
    options = SessionOptions(nop_interval=None)
    if text.startswith("iscsi://"):
        url = parse_url(text)
        host, port = url.host, url.port
        options.chap_user, options.chap_secret = url.user, url.password
    else:
        portal = parse_portal(text)
        host, port = portal.host, portal.port
    # chap_optional: the URL's credentials are the targets'; a portal that
    # does not protect discovery may refuse them there.
    for target in await discover(host, port, options, chap_optional=True):
        print(target.name)
        for p in target.portals:
            print(f"    portal {p.host}:{p.port} group {p.tpgt}")
        async with await Session.connect(host, port, target.name, options) as session:
            for n in await LUN(session, 0).report_luns():
                lun = await LUN.open(session, n)
                inq = await lun.inquiry()
                assert lun.capacity is not None
                cap = lun.capacity
                kind = "thin" if cap.lbpme else "full"
                print(f"    lun {n}: {inq.vendor} {inq.product}, {cap.size} bytes "
                      f"({cap.blocks} x {cap.block_size}), {kind}-provisioned")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    try:
        run(show(sys.argv[1]))
    except InitiatorError as exc:
        print(f"error: {exc} (try: {exc.hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
