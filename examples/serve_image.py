"""Serve a disk image over iSCSI from Python code.

    python examples/serve_image.py disk.img [--port 3260]

Builds the same configuration ``iscsi-target serve`` would -- one target, one
LUN per image -- but in code, so a program can add CHAP, ACLs or more LUNs,
and inspect sessions while it serves. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from target.config import ChapConfig, Limits, LunSpec, PortalGroup, ServerConfig, TargetSpec
from target.server import TargetServer


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--port", type=int, default=3260)
    ap.add_argument("--chap", metavar="USER:SECRET", help="require CHAP (secret >= 12 bytes)")
    args = ap.parse_args()
    if not os.path.exists(args.image):
        with open(args.image, "wb") as f:  # a sparse 64 MiB disk to play with
            f.truncate(64 << 20)
    chap = ChapConfig(*args.chap.split(":", 1)) if args.chap else None
    target = TargetSpec(
        name="iqn.2026-11.org.aioiscsi.example:disk",
        luns=(LunSpec(lun=0, path=os.path.abspath(args.image)),
              LunSpec(lun=1, path="", backend="memory", size=16 << 20)),  # a scratch LUN
        chap=chap,
        limits=Limits(max_recv_data_segment_length=262144, queue_depth=64),
    )
    config = ServerConfig(targets=(target,),
                          portal_groups=(PortalGroup(1, (("127.0.0.1", args.port),)),))
    server = TargetServer(config)
    await server.start()
    print(f"serving iscsi://127.0.0.1:{args.port}/{target.name}/0 (and LUN 1, 16 MiB in memory)")
    try:
        while True:
            await asyncio.sleep(10)
            for sess in server.sessions.values():
                print(f"  session {sess.tsih}: {sess.initiator_name} "
                      f"({'discovery' if sess.discovery else sess.target_name})")
    finally:
        await server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
