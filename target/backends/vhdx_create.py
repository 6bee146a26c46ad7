"""Creating VHDX images (fixed, dynamic, differencing) laid out as qemu-img
and Hyper-V do: identifier, headers and region tables in the first MiB,
then the log (1 MiB by default), the BAT and the metadata region, each
1 MiB aligned; a fixed image's payload blocks follow, all FULLY PRESENT."""

from __future__ import annotations

import ntpath
import os
import uuid

from .base import BackendError
from .mapped import pwrite_all
from .registry import (
    CreateRequest, ImageBackend, align_up, create_file, image_creator, open_backing, parse_size,
    resolve_backing,
)
from .vhdx_format import (
    BAT_GUID, HEADER_OFFSETS, METADATA_GUID, MiB, PAYLOAD_FULLY_PRESENT, REGION_OFFSETS,
    SIGNATURE, ZERO_GUID, Header, Meta, Region, U64, bat_index, ms_guid_text, pack_metadata,
    pack_regions,
)

_OPTIONS = {"subformat", "type", "block_size", "log_size", "logical_sector_size", "physical_sector_size"}


def _size_opt(path: str, opts: dict[str, str], key: str, default: int) -> int:
    try:
        return parse_size(opts[key], key) if key in opts else default
    except BackendError as e:
        raise BackendError(f"{path}: vhdx: {e}") from None


def _parent_locator(path: str, backing: str, backing_format: str | None) -> tuple[dict[str, str], int | None]:
    """Locator pairs for a parent of any format (parent_linkage is a VHDX
    parent's DataWriteGuid, another format's UUID, or zero: no check), and
    a VHDX parent's logical sector size."""
    parent = open_backing(path, backing, backing_format)
    lss: int | None = None
    try:
        linkage = ZERO_GUID
        from .vhdx import VhdxImage  # a cycle at module level: vhdx imports create

        if isinstance(parent, VhdxImage):
            linkage = parent.data_write_guid
            lss = parent.logical_sector_size
        elif isinstance(parent, ImageBackend):
            pid = parent.info().uuid
            try:
                linkage = uuid.UUID(pid) if pid else ZERO_GUID
            except ValueError:
                linkage = ZERO_GUID
    finally:
        parent.close()
    ppath = os.path.abspath(resolve_backing(path, backing))
    rel = os.path.relpath(ppath, os.path.dirname(os.path.abspath(path)))
    # Hyper-V writes relative paths with backslashes and a leading ".\";
    # absolute_win32_path holds the POSIX path (readers here accept it).
    rel_win = rel.replace("/", "\\")
    if not rel_win.startswith("."):
        rel_win = ntpath.join(".", rel_win)
    return {
        "parent_linkage": ms_guid_text(linkage),
        "relative_path": rel_win,
        "absolute_win32_path": ppath,
    }, lss


@image_creator
def create(req: CreateRequest) -> None:
    """Create a VHDX: options subformat (or type) = dynamic (default) |
    fixed, block_size (1 MiB to 256 MiB, a power of 2; default 8 MiB below
    1 TiB, else 32 MiB), log_size (default 1 MiB), logical_sector_size and
    physical_sector_size (512 or 4096). With ``backing``, a differencing
    disk over that image (any format)."""
    path, size = req.path, req.size
    opts = req.checked_options(_OPTIONS)
    kind = opts.get("subformat", opts.get("type", "dynamic"))
    if kind not in ("dynamic", "fixed"):
        raise BackendError(f"{path}: vhdx subformat must be dynamic or fixed, not {kind!r}")
    bs = _size_opt(path, opts, "block_size", 8 * MiB if size < 1 << 40 else 32 * MiB)
    if bs == 0:
        bs = 8 * MiB if size < 1 << 40 else 32 * MiB
    if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
        raise BackendError(f"{path}: vhdx block_size {bs} must be a power of 2 from 1 MiB to 256 MiB")
    log_size = _size_opt(path, opts, "log_size", MiB)
    if log_size < MiB or log_size % MiB:
        raise BackendError(f"{path}: vhdx log_size {log_size} must be a multiple of 1 MiB")
    locator: dict[str, str] = {}
    parent_lss: int | None = None
    if req.backing is not None:
        if kind == "fixed":
            raise BackendError(f"{path}: a differencing VHDX cannot be fixed")
        locator, parent_lss = _parent_locator(path, req.backing, req.backing_format)
    lss = _size_opt(path, opts, "logical_sector_size", parent_lss or 512)
    pss = _size_opt(path, opts, "physical_sector_size", 4096 if lss == 4096 else 512)
    if lss not in (512, 4096) or pss not in (512, 4096):
        raise BackendError(f"{path}: vhdx sector sizes must be 512 or 4096, not {lss}/{pss}")
    if parent_lss is not None and lss != parent_lss:
        # The guest sees one disk: its sector size cannot change mid-chain.
        raise BackendError(f"{path}: a differencing VHDX has its parent's logical sector size "
                           f"{parent_lss}, not {lss}")
    req.check_size(size)
    if size % lss:
        raise BackendError(f"{path}: vhdx size {size} is not a multiple of the {lss}-byte logical sector")
    if size > 64 << 40:
        raise BackendError(f"{path}: vhdx size {size} is over the 64 TiB maximum")
    meta = Meta(bs, kind == "fixed", bool(locator), size, uuid.uuid4(), lss, pss, locator)
    log_off = MiB
    bat_off = log_off + log_size
    bat_len = align_up(meta.bat_entries * 8, MiB)
    meta_off = bat_off + bat_len
    data_off = meta_off + MiB
    regions = pack_regions({BAT_GUID: Region(bat_off, bat_len, True),
                            METADATA_GUID: Region(meta_off, MiB, True)})
    ident = bytearray(64 * 1024)
    ident[:8] = SIGNATURE
    creator = "aioiscsi".encode("utf-16-le")
    ident[8 : 8 + len(creator)] = creator
    fw, dw = uuid.uuid4(), uuid.uuid4()
    end = data_off
    bat = bytearray(bat_len)
    if kind == "fixed":
        for blk in range(meta.payload_blocks):
            entry = PAYLOAD_FULLY_PRESENT | ((data_off + blk * bs) // MiB) << 20
            U64.pack_into(bat, bat_index(blk, meta.chunk_ratio) * 8, entry)
        end = data_off + meta.payload_blocks * bs
    fd = create_file(path)
    try:
        pwrite_all(fd, ident, 0, path)
        for i, at in enumerate(HEADER_OFFSETS):
            pwrite_all(fd, Header(i + 1, fw, dw, ZERO_GUID, log_size, log_off).pack(), at, path)
        for at in REGION_OFFSETS:
            pwrite_all(fd, regions, at, path)
        if kind == "fixed":  # a dynamic BAT is all zeroes: the file's hole
            pwrite_all(fd, bat, bat_off, path)
        pwrite_all(fd, pack_metadata(meta), meta_off, path)
        os.ftruncate(fd, end)
        os.fsync(fd)
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None
    finally:
        os.close(fd)
