"""Creating VMDK images (monolithicSparse/Flat, twoGbMaxExtentSparse/Flat,
and differencing children) as ``qemu-img create -f vmdk`` lays them out."""

from __future__ import annotations

import array
import builtins
import os
import random
import sys

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
from .vmdk_format import (
    DEFAULT_GRAIN, DESC_SECTORS, FLAG_NL_TEST, FLAG_RGD, FLAG_ZERO_GTE, GTES, Header, NAME,
    NO_PARENT, SUBFORMATS, TWO_GB, header_bytes,
)


# ---------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------


def _sparse_layout(capacity: int, with_desc: bool, zeroed: bool) -> tuple[Header, bytes, bytes]:
    """Header, metadata (GDs and preallocated GTs, from sector 1) for a new
    hosted sparse extent, laid out like VMware/qemu: header, descriptor,
    redundant GD + GTs, GD + GTs, grains from a grain-aligned overhead."""
    grain = DEFAULT_GRAIN
    grains = -(-capacity // grain)
    n_gt = -(-grains // GTES)
    gd_sectors = align_up(4 * n_gt, SECTOR) // SECTOR
    gt_sectors = align_up(4 * GTES, SECTOR) // SECTOR
    desc_off, desc_size = (1, DESC_SECTORS) if with_desc else (0, 0)
    rgd = 1 + desc_size
    rgt = rgd + gd_sectors
    gd = rgt + n_gt * gt_sectors
    gt = gd + gd_sectors
    overhead = align_up(gt + n_gt * gt_sectors, grain)
    hdr = Header(2 if zeroed else 1, FLAG_NL_TEST | FLAG_RGD | (FLAG_ZERO_GTE if zeroed else 0),
                  capacity, grain, desc_off, desc_size, GTES, rgd, gd, overhead, 0)

    def directory(first: int) -> bytes:
        a = array.array("I", range(first, first + n_gt * gt_sectors, gt_sectors))
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()

    return hdr, directory(rgt), directory(gt)


def write_sparse(path: str, capacity: int, desc_text: str | None, zeroed: bool) -> None:
    hdr, rgd_bytes, gd_bytes = _sparse_layout(capacity, desc_text is not None, zeroed)
    fd = create_file(path)
    try:
        os.ftruncate(fd, hdr.overhead * SECTOR)
        pwrite_all(fd, header_bytes(hdr), 0, path)
        if desc_text is not None:
            data = desc_text.encode("utf-8")
            if len(data) > DESC_SECTORS * SECTOR:
                raise BackendError(f"{path}: VMDK descriptor too long to embed ({len(data)} bytes)")
            pwrite_all(fd, data, SECTOR, path)
        pwrite_all(fd, rgd_bytes, hdr.rgd_offset * SECTOR, path)
        pwrite_all(fd, gd_bytes, hdr.gd_offset * SECTOR, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _descriptor(ctype: str, cid: int, pcid: int, hint: str | None, lines: list[str], size: int,
                adapter: str) -> str:
    sectors = size // SECTOR
    heads, secs = (16, 63) if adapter == "ide" else (255, 63)
    cyl = min(sectors // (heads * secs), 16383)
    out = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={pcid:08x}",
        f'createType="{ctype}"',
    ]
    if hint is not None:
        out.append(f'parentFileNameHint="{hint}"')
    out += ["", "# Extent description", *lines, "", "# The Disk Data Base", "#DDB", "",
            'ddb.virtualHWVersion = "4"', f'ddb.geometry.cylinders = "{cyl}"',
            f'ddb.geometry.heads = "{heads}"', f'ddb.geometry.sectors = "{secs}"',
            f'ddb.adapterType = "{adapter}"', ""]
    return "\n".join(out)


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VMDK. Options: ``subformat`` (monolithicSparse default,
    monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat),
    ``adapter_type`` (ide, lsilogic, buslogic, legacyESX), ``zeroed_grain``
    (on/off), ``extent_size`` (bytes per extent of the twoGbMaxExtent kinds,
    default 2 GiB). ``backing`` (a VMDK) records parentCID and
    parentFileNameHint; only sparse subformats can have one."""
    path, size = req.path, req.size
    opts = req.checked_options({"subformat", "adapter_type", "zeroed_grain", "extent_size"})
    backing = req.backing
    sub = opts.get("subformat", "monolithicSparse")
    if sub not in SUBFORMATS:
        if sub == "streamOptimized":
            raise BackendError(f"{path}: creating streamOptimized VMDKs is not supported (read-only format here)")
        raise BackendError(f"{path}: unknown VMDK subformat {sub!r} (known: {', '.join(SUBFORMATS)})")
    adapter = opts.get("adapter_type", "ide")
    if adapter not in ("ide", "lsilogic", "buslogic", "legacyESX"):
        raise BackendError(f"{path}: unknown VMDK adapter type {adapter!r}")
    zeroed = opts.get("zeroed_grain", "off") == "on"
    try:
        extent_size = int(opts.get("extent_size", str(TWO_GB)))
    except ValueError:
        raise BackendError(f"{path}: extent_size {opts['extent_size']!r} is not a number") from None
    if extent_size < 1 << 20 or extent_size % (DEFAULT_GRAIN * SECTOR):
        raise BackendError(f"{path}: extent_size {extent_size} must be a multiple of 64 KiB >= 1 MiB")
    pcid = NO_PARENT
    hint: str | None = None
    if backing is not None:
        if "Flat" in sub:
            raise BackendError(f"{path}: a {sub} VMDK cannot have a backing file")
        pinfo, psize = parent_for_create(path, backing, req.backing_format, NAME, "a VMDK")
        pcid = int(pinfo.extra.get("cid", "ffffffff"), 16)
        if size == 0:
            size = psize
        full = resolve_backing(path, backing)
        hint = os.path.relpath(full, os.path.dirname(os.path.abspath(path)))
    req.check_size(size, "VMDK")
    cid = random.randrange(0, 0xFFFFFFFE)
    sectors = size // SECTOR
    base = path[:-5] if path.lower().endswith(".vmdk") else path
    name = os.path.basename(base)
    directory = os.path.dirname(os.path.abspath(path))
    if sub == "monolithicSparse":
        text = _descriptor(sub, cid, pcid, hint, [f'RW {sectors} SPARSE "{os.path.basename(path)}"'], size, adapter)
        write_sparse(path, sectors, text, zeroed)
        return
    lines: list[str] = []
    if sub == "monolithicFlat":
        pieces = [(f"{name}-flat.vmdk", sectors)]
    else:
        per = extent_size // SECTOR
        letter = "s" if sub == "twoGbMaxExtentSparse" else "f"
        pieces = [
            (f"{name}-{letter}{i + 1:03d}.vmdk", min(per, sectors - i * per))
            for i in range(-(-sectors // per))
        ]
    for fname, n in pieces:
        fpath = os.path.join(directory, fname)
        if sub.endswith("Sparse"):
            write_sparse(fpath, n, None, zeroed)
            lines.append(f'RW {n} SPARSE "{fname}"')
        else:
            try:
                with builtins.open(fpath, "wb") as f:
                    f.truncate(n * SECTOR)
            except OSError as e:
                raise BackendError(f"{fpath}: cannot create: {e.strerror}") from None
            lines.append(f'RW {n} FLAT "{fname}" 0')
    text = _descriptor(sub, cid, pcid, hint, lines, size, adapter)
    try:
        with builtins.open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror}") from None
