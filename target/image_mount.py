"""``iscsi-target image mount``: an image (and its differencing chain) as
files in a FUSE mount, like VirtualBox's ``vboximg-mount``::

    iscsi-target image mount [--read-only] [--at LAYER] IMAGE MOUNTPOINT
    iscsi-target image mount --list [--json] [--at LAYER] IMAGE

The mountpoint holds ``vhdd`` (the whole virtual disk) and ``vol0``,
``vol1``... (one per partition of its MBR or GPT, see
:mod:`iscsi.partitions`), so ``mount -o loop MOUNTPOINT/vol1 /mnt`` works
without kpartx. The files are read-write unless ``--read-only``; a
read-write mount takes the image's writer lock and a read-only one its
reader lock (target/backends/locking.py), so a LUN or qemu using the image
and a mount exclude each other as two LUNs do.

``--at LAYER`` (a UUID or a file of the chain) shows the disk as it was at
that layer: the chain is opened from that file down, read-only, so what the
layers above it wrote is not seen (the seed's "historical representation").
``--list`` prints the chain and the partition table and mounts nothing.

The FUSE part is the one :mod:`initiator.fuse` implements for ``attach
--fuse``; the image is an :class:`~initiator.nbd_export.ExportDevice`
through :class:`BackendDevice`. Image I/O runs inline on the event loop
(a file read or write of a page costs microseconds, DESIGN.md), which also
keeps each backend's metadata updates on one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
from typing import Any, TextIO

from iscsi.partitions import PartitionTable, read_table
from target.backends.base import Backend, BackendError, Buffer
from target.backends.locking import force_share
from target.backends.registry import ImageBackend, open_image

__all__ = ["BackendDevice", "add_parser", "chain_of", "find_layer", "run"]

PROG = "iscsi-target image mount"
#: The logical block size images are shown with (the target's default).
SECTOR = 512


class BackendDevice:
    """A target :class:`~target.backends.base.Backend` in the async shape
    the FUSE export takes (:class:`initiator.nbd_export.ExportDevice`)."""

    def __init__(self, backend: Backend, *, read_only: bool) -> None:
        self.backend = backend
        self._read_only = read_only or backend.read_only

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.backend.size

    @property
    def block_size(self) -> int:
        """Logical block size in bytes."""
        return SECTOR

    @property
    def read_only(self) -> bool:
        """True when writes are refused."""
        return self._read_only

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (a copy: a backend may hand out an mmap view
        that a later write would change under the FUSE reply)."""
        return bytes(self.backend.read(offset, length))

    async def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``."""
        if self._read_only:
            raise OSError(errno.EROFS, "read-only mount")
        self.backend.write(offset, data)

    async def flush(self) -> None:
        """Make completed writes durable (fsync on a file of the mount)."""
        self.backend.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate the range where the format can."""
        self.backend.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read as zeroes."""
        self.backend.write_zeroes(offset, length)


def chain_of(img: Backend) -> list[dict[str, Any]]:
    """The chain from ``img`` down to its base: file, format, UUIDs and
    sizes of each layer, as ``image info`` names them."""
    out: list[dict[str, Any]] = []
    nodes = img.chain() if isinstance(img, ImageBackend) else iter([img])
    for depth, node in enumerate(nodes):
        if isinstance(node, ImageBackend):
            i = node.info()
            out.append({"depth": depth, "filename": i.path, "format": i.format,
                        "uuid": i.uuid, "parent-uuid": i.parent_uuid,
                        "virtual-size": i.virtual_size, "actual-size": i.allocated_size})
        else:
            out.append({"depth": depth, "filename": node.path, "format": None, "uuid": None,
                        "parent-uuid": None, "virtual-size": node.size, "actual-size": None})
    return out


def _norm_uuid(text: str) -> str:
    return text.strip().strip("{}").lower()


def find_layer(image: str, layer: str) -> str:
    """The file of ``image``'s chain that ``layer`` names: a path (compared
    as files, so any spelling of it works) or a UUID. One-line
    BackendError when no layer matches."""
    # Only the chain's headers are read here, so share (qemu-img -U): a layer
    # under an image a VM is writing can be looked at; opening that layer
    # afterwards takes its own lock, which only a writer of it refuses.
    with force_share(), open_image(image, read_only=True) as top:
        chain = chain_of(top)
    if os.path.exists(layer):
        for entry in chain:
            if os.path.exists(entry["filename"]) and os.path.samefile(entry["filename"], layer):
                return str(entry["filename"])
        raise BackendError(f"--at {layer}: this file is not part of the chain of {image}")
    # A file name as the chain stores it (backing names are often bare
    # names beside the child), when it names exactly one layer.
    named = [e for e in chain if os.path.basename(e["filename"]) == layer]
    if len(named) == 1:
        return str(named[0]["filename"])
    for entry in chain:
        if entry["uuid"] and _norm_uuid(entry["uuid"]) == _norm_uuid(layer):
            return str(entry["filename"])
    known = ", ".join(str(e["uuid"]) for e in chain if e["uuid"]) or "none of its files has one"
    raise BackendError(f"--at {layer}: no file of the chain of {image} has this name or UUID "
                       f"(UUIDs: {known})")


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _print_list(chain: list[dict[str, Any]], table: PartitionTable, out: TextIO) -> None:
    out.write("Chain (top first):\n")
    for e in chain:
        role = "top" if e["depth"] == 0 else ("base" if e is chain[-1] else f"parent {e['depth']}")
        out.write(f"  {role}: {e['filename']}\n")
        out.write(f"    format: {e['format'] or '-'}   virtual size: "
                  f"{_human(e['virtual-size'])} ({e['virtual-size']} bytes)   disk size: "
                  f"{_human(e['actual-size'])}\n")
        if e["uuid"]:
            parent = f"   parent uuid: {e['parent-uuid']}" if e["parent-uuid"] else ""
            out.write(f"    uuid: {e['uuid']}{parent}\n")
    out.writelines(line + "\n" for line in table.describe())


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``mount`` to the ``image`` sub-command set."""
    m: argparse.ArgumentParser = sub.add_parser(
        "mount", help="show an image (and each partition) as files in a FUSE mount",
        description="Show IMAGE as MOUNTPOINT/vhdd and each partition as MOUNTPOINT/vol0, "
        "vol1..., until Ctrl-C or SIGTERM (like vboximg-mount). Needs pyfuse3.")
    m.add_argument("--read-only", "-r", action="store_true", help="refuse writes")
    m.add_argument("--at", metavar="LAYER",
                   help="show the disk as it was at this layer of the differencing chain (a "
                   "UUID or a file of the chain); read-only")
    m.add_argument("--list", "-l", action="store_true",
                   help="print the chain and the partition table; mount nothing")
    m.add_argument("--json", action="store_true", help="with --list: print JSON")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users see the files (FUSE allow_other)")
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    return m


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``image mount`` (the image CLI reports BackendError as one line)."""
    if args.json and not args.list:
        raise BackendError("--json goes with --list")
    image = find_layer(args.image, args.at) if args.at else args.image
    if args.list:
        with open_image(image, read_only=True) as img:
            chain = chain_of(img)
            table = read_table(img.read, img.size, SECTOR)
        if args.json:
            out.write(json.dumps({"chain": chain, "partition-table": table.as_dict()},
                                 indent=4) + "\n")
        else:
            _print_list(chain, table, out)
        return 0
    if args.mountpoint is None:
        raise BackendError("MOUNTPOINT is missing (or give --list)")
    return asyncio.run(_mount(image, args, read_only=args.read_only or bool(args.at)))


async def _mount(image: str, args: argparse.Namespace, *, read_only: bool) -> int:
    from initiator.errors import InitiatorError
    from initiator.fuse import FuseExport, check_mountpoint, load_pyfuse3, partition_nodes

    try:
        # Cheap refusals first, before the image is locked.
        load_pyfuse3()
        check_mountpoint(args.mountpoint)
    except InitiatorError as exc:
        raise BackendError(str(exc)) from None
    except OSError as exc:
        raise BackendError(f"{exc.filename}: {exc.strerror}") from None
    # The writer lock for a read-write mount: nobody else may write (or, for
    # qemu, read consistently) while files of the mount can change it.
    img = open_image(image, read_only=read_only)
    try:
        table = read_table(img.read, img.size, SECTOR)
        dev = BackendDevice(img, read_only=read_only)
        nodes = partition_nodes(table, img.size, name="vhdd")
        export = FuseExport(dev, args.mountpoint, read_only=read_only,
                            allow_other=args.allow_other, nodes=nodes)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def _stop() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stop)
        try:
            try:
                path = await export.start()
            except InitiatorError as exc:
                raise BackendError(str(exc) + (f" ({exc.hint})" if exc.hint else "")) from None
            try:
                # The one stdout line a script waits for, as attach --fuse.
                print(path, flush=True)
                names = ", ".join(n.name for n in nodes)
                mode = "read-only" if read_only else "read-write"
                print(f"{PROG}: {image} on {export.mountpoint} ({names}; {mode}); "
                      "unmount with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
                for w in table.warnings:
                    print(f"{PROG}: partition table: {w}", file=sys.stderr, flush=True)
                await export.wait_until(stop)
            finally:
                export.close()
                await export.wait_closed()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if not read_only:
            img.flush()
    finally:
        img.close()
    return 0
