"""Attach a LUN as an NBD export from Python; Ctrl-C detaches it cleanly.

    python examples/initiator_attach.py iscsi://127.0.0.1/iqn.2026-01.org.example:disk/0 \\
        unix:/tmp/lun0.sock

prints the export's NBD URI (``nbd+unix:///?socket=/tmp/lun0.sock``) once it
listens; then, for instance::

    nbdinfo nbd+unix:///?socket=/tmp/lun0.sock           # size, block sizes
    nbdcopy disk.img nbd+unix:///?socket=/tmp/lun0.sock  # write an image to the LUN
    nbd-client -unix /tmp/lun0.sock /dev/nbd0            # a kernel block device

Ctrl-C or SIGTERM stops it: the NBD clients are closed, the LUN is flushed
(SYNCHRONIZE CACHE) and the session logs out. The same with the command line,
where a separate ``detach`` does what Ctrl-C does here and reports whether
the flush and the logout succeeded::

    iscsi-initiator attach iscsi://127.0.0.1/iqn.2026-01.org.example:disk/0 \\
        --nbd unix:/tmp/lun0.sock &
    iscsi-initiator detach unix:/tmp/lun0.sock

While attached the session rides out network trouble: it logs in again and
reissues what was in flight, for up to ``replacement_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from initiator import BlockDevice, InitiatorError, SessionOptions, run
from initiator.nbd import serve_until


async def attach(url: str, listen: str) -> None:
    # NOP-Out pings every 5 s notice a dead connection even when idle.
    options = SessionOptions(nop_interval=5.0, replacement_timeout=120.0)
    dev = await BlockDevice.open(url, options)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def detach() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, detach)
    try:
        # serve_until closes the export and flushes the LUN once stop is set.
        await serve_until(dev, listen, stop, ready=lambda uri: print(uri, flush=True))
    finally:
        await dev.close()  # logs out
    print("detached: flushed and logged out", file=sys.stderr)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    try:
        run(attach(sys.argv[1], sys.argv[2]))
    except InitiatorError as exc:
        print(f"error: {exc} (try: {exc.hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
