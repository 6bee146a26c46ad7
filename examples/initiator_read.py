"""Discover the targets of a portal and read the start of a LUN.

    python examples/initiator_read.py 127.0.0.1:3260            # discovery only
    python examples/initiator_read.py iscsi://127.0.0.1/iqn.../1  # read 64 KiB of LUN 1

Credentials go into the URL: iscsi://user%secret@host/target/lun.
"""

from __future__ import annotations

import sys

from initiator import LUN, BlockDevice, InitiatorError, discover, run
from iscsi.names import parse_portal, parse_url


async def show_portal(text: str) -> None:
    portal = parse_portal(text)
    for target in await discover(portal.host, portal.port):
        print(target.name)
        for p in target.portals:
            print(f"    portal {p}")


async def read_lun(url: str) -> None:
    async with await BlockDevice.open(url) as dev:
        lun: LUN = dev.lun
        inq = await lun.inquiry()
        print(f"{inq.vendor} {inq.product}: {dev.size} bytes in {dev.block_size}-byte blocks")
        data = await dev.read(0, min(65536, dev.size))
        nonzero = len(data) - data.count(0)
        print(f"first {len(data)} bytes: {nonzero} non-zero; they start with {data[:16].hex()}")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    arg = sys.argv[1]
    try:
        if arg.startswith("iscsi://") and parse_url(arg).target:
            run(read_lun(arg))
        else:
            run(show_portal(arg.removeprefix("iscsi://")))
    except InitiatorError as exc:
        print(f"error: {exc} (try: {exc.hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
