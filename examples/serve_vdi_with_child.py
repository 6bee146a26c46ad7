#!/usr/bin/env python3
"""Serve a VDI with a differencing child over iSCSI, from Python code.

    .venv/bin/python examples/serve_vdi_with_child.py [--dir DIR] [--portal 127.0.0.1:3260]

What it does:

1. creates ``base.vdi`` (a 64 MiB dynamic VDI) and writes a recognisable
   pattern into its first MiB - think of it as an installed OS image;
2. takes a "snapshot": a differencing VDI ``base-snap1.vdi`` whose parent is
   ``base.vdi`` (new UUID, parent UUID and parent modification UUID set,
   VirtualBox manual §5.5);
3. serves the child as LUN 0. Reads of blocks the child has not written
   fall through to the parent; writes go only to the child, so ``base.vdi``
   never changes.

Try it with, e.g.::

    qemu-io -c "read -P 0x42 0 1M" -c "write -P 0x77 0 4k" iscsi://127.0.0.1:3260/<iqn>/0
    .venv/bin/python -m target.image_cli info DIR/base-snap1.vdi

and fold the child's changes back into the base with
``iscsi-target image commit DIR/base-snap1.vdi``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from target.backends.registry import create_image, open_image
from target.config import LunSpec, PortalGroup, ServerConfig, TargetSpec, parse_listen
from target.image_cli import snapshot
from target.server import TargetServer

IQN = "iqn.2026-11.org.aioiscsi.example:vdi-child"


def prepare(directory: str) -> str:
    """Make base.vdi and a differencing child; return the child's path."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "base.vdi")
    if not os.path.exists(base):
        create_image(base, "vdi", 64 << 20)
        with open_image(base) as img:
            img.write(0, b"\x42" * (1 << 20))
        print(f"created {base} (64 MiB dynamic VDI, first MiB = 0x42)")
    child = os.path.join(directory, "base-snap1.vdi")
    if not os.path.exists(child):
        snapshot(base, name=child)
    with open_image(child, read_only=True) as img:
        info = img.info()
        parent = img.parent.path if img.parent is not None else "?"
    print(f"serving {child}: VDI {info.subformat}, uuid {info.uuid}, "
          f"parent {parent} (uuid {info.parent_uuid})")
    return child


async def serve(child: str, host: str, port: int, seconds: float | None) -> None:
    config = ServerConfig(
        targets=(TargetSpec(name=IQN, luns=(LunSpec(lun=0, path=os.path.abspath(child)),)),),
        portal_groups=(PortalGroup(1, ((host, port),)),),
        nop_interval=0.0,
    )
    server = TargetServer(config)
    await server.start()
    _, bhost, bport = server.bound[0]
    print(f"listening: iscsi://{bhost}:{bport}/{IQN}/0  (Ctrl-C to stop)", flush=True)
    try:
        if seconds is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(seconds)
    finally:
        await server.stop(logout_wait=0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="vdi-example")
    ap.add_argument("--portal", default="127.0.0.1:3260")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = ap.parse_args()
    host, port = parse_listen(args.portal)
    child = prepare(args.dir)
    try:
        asyncio.run(serve(child, host, port, args.seconds))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
