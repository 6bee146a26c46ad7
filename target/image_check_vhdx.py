"""``iscsi-target image check`` for VHDX ([MS-VHDX]).

Checks, from the structures themselves: both headers (signature, CRC-32C;
one bad copy is a leak-like warning, both bad an error), the region tables,
the metadata items, and every BAT entry - payload and sector bitmap blocks
must be 1 MiB aligned, lie inside the file, past the metadata, and not
overlap each other or the log, BAT or metadata regions. A non-empty log is
reported (it is replayed on the next read-write open) and the BAT checked
as the replay would leave it.
"""

from __future__ import annotations

import itertools
import os
import struct
import uuid
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

from target.backends.base import BackendError
from target.backends.vhdx_format import (
    BAT_GUID, HEADER_OFFSETS, LOG_SECTOR, METADATA_GUID, MiB, PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT, REGION_OFFSETS, REGION_SIZE, SB_PRESENT, STATE_MASK, ZERO_GUID,
    bat_index, bitmap_index, parse_header, parse_metadata, parse_regions,
)
from target.backends.vhdx_log import find_active

if TYPE_CHECKING:
    from target.image_check import CheckResult

__all__ = ["check_vhdx"]


def _pread(fd: int, n: int, at: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise BackendError(f"read of {n} bytes at {at} ends past the end of the file")
    return data


def check_vhdx(path: str, fd: int, res: CheckResult, progress: Callable[[int, int], None],
               add: Callable[[list[str], str], None]) -> None:
    """Fill ``res`` with what the VHDX at ``fd`` holds (``add`` appends a
    problem to a list, bounded)."""
    file_size = os.fstat(fd).st_size
    if _pread(fd, 8, 0) != b"vhdxfile":
        raise BackendError(f"{path}: not a VHDX image")
    headers = [parse_header(_pread(fd, 4096, at)) for at in HEADER_OFFSETS]
    valid = [h for h in headers if h is not None]
    if not valid:
        raise BackendError(f"{path}: neither VHDX header is valid")
    for i, h in enumerate(headers):
        if h is None:
            res.notes.append(f"header {i + 1} is not valid (the other one is used)")
    hdr = max(valid, key=lambda h: h.seq)
    overlay: dict[int, bytes] = {}
    if hdr.log_guid != ZERO_GUID and hdr.log_length:
        replay = find_active(lambda o, n: os.pread(fd, n, o), hdr.log_offset, hdr.log_length, hdr.log_guid)
        if replay is not None:
            res.notes.append(f"the log holds {replay.entries} entr{'y' if replay.entries == 1 else 'ies'} "
                             "to replay (done on the next read-write open); checked as replayed")
            for w in replay.writes:
                for p in range(w.offset, w.offset + w.length, LOG_SECTOR):
                    overlay[p] = w.data if w.data is not None else bytes(LOG_SECTOR)

    def read(off: int, n: int) -> bytes:
        buf = bytearray(_pread(fd, n, off))
        for p, page in overlay.items():
            if off <= p and p + LOG_SECTOR <= off + n:
                buf[p - off : p - off + LOG_SECTOR] = page
        return bytes(buf)

    tables = [parse_regions(read(at, REGION_SIZE)) for at in REGION_OFFSETS]
    regions = next((t for t in tables if t is not None), None)
    if regions is None:
        raise BackendError(f"{path}: both VHDX region tables are invalid")
    if any(t is None for t in tables):
        add(res.errors, "one region table copy is damaged")
    bat_r, meta_r = regions.get(BAT_GUID), regions.get(METADATA_GUID)
    if bat_r is None or meta_r is None:
        raise BackendError(f"{path}: VHDX region table lacks the BAT or metadata region")
    spans: list[tuple[int, int, str]] = [(0, MiB, "headers")]
    if hdr.log_length:
        spans.append((hdr.log_offset, hdr.log_offset + hdr.log_length, "log"))
    spans += [(bat_r.offset, bat_r.offset + bat_r.length, "BAT"),
              (meta_r.offset, meta_r.offset + meta_r.length, "metadata")]
    for s, e, what in spans:
        if e > file_size:
            add(res.errors, f"{what} region at {s:#x} ends past the end of the file ({file_size})")
    meta = parse_metadata(path, read(meta_r.offset, meta_r.length))
    res.block_size = meta.block_size
    res.total = meta.payload_blocks
    if bat_r.length < meta.bat_entries * 8:
        raise BackendError(f"{path}: VHDX BAT region too small for {meta.bat_entries} entries")
    raw = read(bat_r.offset, meta.bat_entries * 8)
    bat = array("Q")
    bat.frombytes(raw)
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        bat.byteswap()
    cr = meta.chunk_ratio
    blocks: list[tuple[int, int, str]] = []
    for blk in range(meta.payload_blocks):
        e = bat[bat_index(blk, cr)]
        state = e & STATE_MASK
        if state in (PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT):
            if state == PAYLOAD_PARTIALLY_PRESENT and not meta.has_parent:
                add(res.errors, f"block {blk} is partially present in a disk without a parent")
            off = (e >> 20) * MiB
            blocks.append((off, off + meta.block_size, f"block {blk}"))
        elif meta.leave_allocated:
            add(res.errors, f"fixed disk: block {blk} is not allocated (state {state})")
    if meta.has_parent:
        for chunk in range(-(-meta.payload_blocks // cr)):
            e = bat[bitmap_index(chunk * cr, cr)]
            if e & STATE_MASK == SB_PRESENT:
                off = (e >> 20) * MiB
                blocks.append((off, off + MiB, f"sector bitmap {chunk}"))
    progress(1, 2)
    for s, e, what in blocks:
        if e > file_size:
            add(res.errors, f"{what} at {s:#x} ends past the end of the file ({file_size})")
        for s2, e2, what2 in spans:
            if s < e2 and s2 < e:
                add(res.errors, f"{what} at {s:#x} overlaps the {what2} region")
    ordered = sorted(blocks)
    for (s0, e0, w0), (s1, _e1, w1) in itertools.pairwise(ordered):
        if s1 < e0:
            add(res.errors, f"{w0} and {w1} overlap in the file (at {s0:#x} and {s1:#x})")
    res.allocated = sum(1 for _s, _e, w in blocks if w.startswith("block"))
    end = max([e for _s, e, _w in spans] + [e for _s, e, _w in blocks])
    if file_size - end >= MiB:
        add(res.leaks, f"{file_size - end} bytes after the last block are not used")
    if hdr.log_guid != ZERO_GUID and not overlay:
        res.notes.append(f"log GUID {uuid.UUID(str(hdr.log_guid))} set but the log is empty (not closed cleanly)")
    progress(2, 2)
