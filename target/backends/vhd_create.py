"""Creating VHD images (fixed, dynamic and differencing) as Virtual PC /
``qemu-img create -f vpc`` lays them out."""

from __future__ import annotations

import os
import time
import uuid

from .base import SECTOR, BackendError
from .registry import (
    CreateRequest,
    align_up,
    create_file,
    image_creator,
    parent_for_create,
    resolve_backing,
)
from .mapped import pwrite_all
from .vhd_format import (
    CREATOR_APP, DEFAULT_BLOCK, DYN, DYN_COOKIE, DYN_CSUM, Footer, LOC, NAME, NO_OFFSET,
    TYPE_DIFF, TYPE_DYNAMIC, TYPE_FIXED, U32, checksum, chs_geometry, chs_size, footer_bytes,
    vhd_time,
)


def _locator_entry(code: bytes, data: bytes, at: int) -> tuple[bytes, bytes]:
    space = align_up(len(data), SECTOR)
    # Data space in sectors, as the spec says (readers use length + offset).
    return LOC.pack(code, space // SECTOR, len(data), 0, at), data + bytes(space - len(data))


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VHD: options {"type": "dynamic" (default) | "fixed",
    "force_size": "on" | "off" (default off: round up to CHS geometry)};
    with ``backing`` a differencing disk of that VHD."""
    path, size = req.path, req.size
    opts = req.checked_options({"type", "force_size", "subformat"})
    backing = req.backing
    kind = opts.get("type", opts.get("subformat", "dynamic"))
    if kind not in ("dynamic", "fixed"):
        raise BackendError(f"{path}: VHD type must be dynamic or fixed, not {kind!r}")
    force = opts.get("force_size", "off")
    if force not in ("on", "off"):
        raise BackendError(f"{path}: force_size must be on or off, not {force!r}")
    dtype = TYPE_FIXED if kind == "fixed" else TYPE_DYNAMIC
    parent_uuid = uuid.UUID(int=0)
    parent_ts = 0
    parent_name = ""
    locators: list[tuple[bytes, bytes]] = []
    if backing is not None:
        if kind == "fixed":
            raise BackendError(f"{path}: a differencing VHD cannot be fixed")
        pinfo, psize = parent_for_create(path, backing, req.backing_format, NAME, "a differencing VHD")
        if size == 0 or size == chs_size(psize) and force == "off":
            size = psize
        if size != psize:
            raise BackendError(f"{path}: a differencing VHD has its parent's size {psize}, not {size}")
        assert pinfo.uuid is not None
        parent_uuid = uuid.UUID(pinfo.uuid)
        full = os.path.abspath(resolve_backing(path, backing))
        parent_ts = vhd_time(os.stat(full).st_mtime)
        parent_name = os.path.basename(full)
        rel = os.path.relpath(full, os.path.dirname(os.path.abspath(path)))
        rel_win = rel.replace("/", "\\")
        if not rel_win.startswith("."):
            rel_win = ".\\" + rel_win
        locators = [(b"W2ru", rel_win.encode("utf-16-le")), (b"W2ku", full.encode("utf-16-le"))]
        dtype = TYPE_DIFF
        force = "on"  # the parent's size is already what readers see
    req.check_size(size, "VHD")
    if force == "off":
        size = chs_size(size)
    geometry = chs_geometry(size // SECTOR)
    now = vhd_time(time.time())
    bs = DEFAULT_BLOCK
    footer = Footer(2, NO_OFFSET if dtype == TYPE_FIXED else 512, now, CREATOR_APP, size, geometry,
                     dtype, uuid.uuid4())
    fd = create_file(path)
    try:
        if dtype == TYPE_FIXED:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                pass  # sparse is still correct
            pwrite_all(fd, footer_bytes(footer, size), size, path)
        else:
            entries = -(-size // bs)
            at = 512 + 1024
            loc_raw = bytearray(192)
            loc_data = bytearray()
            for i, (code, data) in enumerate(locators):
                entry, padded = _locator_entry(code, data, at)
                loc_raw[24 * i : 24 * i + 24] = entry
                loc_data += padded
                at += len(padded)
            table = at
            bat_bytes = align_up(4 * entries, SECTOR)
            dyn = bytearray(DYN.pack(
                DYN_COOKIE, NO_OFFSET, table, 0x00010000, entries, bs, 0, parent_uuid.bytes_le,
                parent_ts, 0, parent_name[:256].encode("utf-16-be"), bytes(loc_raw), b"",
            ))
            U32.pack_into(dyn, DYN_CSUM, checksum(dyn, DYN_CSUM))
            fbytes = footer_bytes(footer, size)
            pwrite_all(fd, fbytes + bytes(dyn) + bytes(loc_data), 0, path)
            pwrite_all(fd, b"\xff" * (4 * entries) + bytes(bat_bytes - 4 * entries), table, path)
            pwrite_all(fd, fbytes, table + bat_bytes, path)
        os.fsync(fd)
    finally:
        os.close(fd)
