"""VHD on-disk structures (Microsoft "Virtual Hard Disk Image Format
Specification" 1.0): the footer and its checksum, CHS geometry, the dynamic
disk header, parent locators."""

from __future__ import annotations

import builtins
import os
import struct
import urllib.parse
import uuid
from typing import NamedTuple

from .base import SECTOR, BackendError, Buffer
from .registry import resolve_backing
from .mapped import pread_exact


NAME = "vhd"

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
BAT_FREE = 0xFFFFFFFF
DEFAULT_BLOCK = 2 << 20
#: Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800
CREATOR_APP = b"aioi"
MAX_CHS_SECTORS = 65535 * 16 * 255

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
DYN = struct.Struct(">8sQQIIII16sII512s192s256s")
LOC = struct.Struct(">4sIIIQ")
U32 = struct.Struct(">I")
assert _FOOTER.size == 512 and DYN.size == 1024 and LOC.size == 24
_FOOTER_CSUM = 64
DYN_CSUM = 36


def checksum(buf: Buffer, at: int) -> int:
    """The spec's checksum: one's complement of the byte sum, the 4-byte
    checksum field at ``at`` counted as zero."""
    mv = memoryview(buf).cast("B")
    total = sum(mv) - sum(mv[at : at + 4])
    return ~total & 0xFFFFFFFF


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """CHS for a disk of ``total_sectors`` (the spec's appendix algorithm)."""
    ts = min(total_sectors, MAX_CHS_SECTORS)
    if ts >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = ts // spt
    else:
        spt = 17
        cth = ts // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = ts // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = ts // spt
    return cth // heads, heads, spt


def chs_size(size: int) -> int:
    """The smallest CHS-representable size >= ``size`` (qemu and Virtual PC
    agree on it); sizes beyond the CHS range stay as they are."""
    total = -(-size // SECTOR)
    if total >= MAX_CHS_SECTORS:
        return total * SECTOR
    want = total
    while True:
        c, h, s = chs_geometry(want)
        if c * h * s >= total:
            return c * h * s * SECTOR
        want += 1


class Footer(NamedTuple):
    features: int
    data_offset: int
    timestamp: int
    creator: bytes
    current_size: int
    geometry: tuple[int, int, int]
    disk_type: int
    uuid: uuid.UUID


def parse_footer(path: str, raw: bytes, where: str) -> Footer:
    (cookie, features, version, data_offset, ts, app, _cver, _cos, _orig, cur,
     cyl, heads, spt, dtype, csum, uid, _saved, _res) = _FOOTER.unpack(raw)
    if cookie != COOKIE:
        raise BackendError(f"{path}: not a VHD image: no \"conectix\" cookie {where} (found {cookie!r})")
    want = checksum(raw, _FOOTER_CSUM)
    if csum != want:
        raise BackendError(f"{path}: damaged VHD footer {where}: checksum {csum:#010x}, computed {want:#010x}")
    if version >> 16 != 1:
        raise BackendError(f"{path}: unsupported VHD version {version >> 16}.{version & 0xFFFF}")
    if dtype not in TYPE_NAMES:
        raise BackendError(f"{path}: unsupported VHD disk type {dtype} (fixed, dynamic, differencing only)")
    return Footer(features, data_offset, ts, app, cur, (cyl, heads, spt), dtype, uuid.UUID(bytes_le=uid))


def footer_bytes(f: Footer, orig_size: int) -> bytes:
    c, h, s = f.geometry
    raw = bytearray(_FOOTER.pack(
        COOKIE, f.features, 0x00010000, f.data_offset, f.timestamp, f.creator, 0x00010000,
        b"Wi2k", orig_size, f.current_size, c, h, s, f.disk_type, 0, f.uuid.bytes_le, 0, b"",
    ))
    U32.pack_into(raw, _FOOTER_CSUM, checksum(raw, _FOOTER_CSUM))
    return bytes(raw)


def probe(head: bytes, path: str) -> bool:
    """Dynamic/differencing disks start with the footer copy; a fixed disk
    has its footer only at the end, so that is read (content, not name)."""
    if head[:8] == COOKIE:
        return True
    try:
        with builtins.open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 1024:
                return False
            f.seek(size - 512)
            tail = f.read(512)
    except OSError:
        return False
    if tail[:8] != COOKIE:
        return False
    try:
        foot = parse_footer(path, tail, "at the end")
    except BackendError:
        return False
    return foot.disk_type == TYPE_FIXED and foot.current_size <= size - 512


class Dyn(NamedTuple):
    table_offset: int
    max_entries: int
    block_size: int
    parent_uuid: uuid.UUID
    parent_ts: int
    parent_name: str
    locators: list[tuple[bytes, bytes]]  # (platform code, data)


def parse_dyn(path: str, fd: int, at: int, file_size: int) -> Dyn:
    raw = pread_exact(fd, 1024, at, path, "VHD dynamic header")
    (cookie, _doff, table, version, entries, bsize, csum, puid, pts, _r, pname, locs, _r2) = DYN.unpack(raw)
    if cookie != DYN_COOKIE:
        raise BackendError(f"{path}: damaged VHD: no \"cxsparse\" cookie at {at} (found {cookie!r})")
    want = checksum(raw, DYN_CSUM)
    if csum != want:
        raise BackendError(f"{path}: damaged VHD dynamic header: checksum {csum:#010x}, computed {want:#010x}")
    if version >> 16 != 1:
        raise BackendError(f"{path}: unsupported VHD dynamic header version {version >> 16}.{version & 0xFFFF}")
    if bsize < SECTOR or bsize & (bsize - 1) or bsize > 1 << 28:
        raise BackendError(f"{path}: damaged VHD dynamic header: block size {bsize} is not a power of two")
    if table % SECTOR or table + 4 * entries > file_size:
        raise BackendError(f"{path}: damaged VHD: BAT at {table} ({entries} entries) is outside the file")
    name = pname.decode("utf-16-be", errors="replace").split("\0", 1)[0]
    locators: list[tuple[bytes, bytes]] = []
    for i in range(8):
        code, _space, length, _res, off = LOC.unpack_from(locs, 24 * i)
        if code == b"\0\0\0\0" or length == 0:
            continue
        if length > 65536 or off + length > file_size:
            raise BackendError(f"{path}: damaged VHD parent locator {code!r}: {length} bytes at {off}")
        locators.append((code, pread_exact(fd, length, off, path, "VHD parent locator")))
    return Dyn(table, entries, bsize, uuid.UUID(bytes_le=puid), pts, name, locators)


def locator_paths(child: str, dyn: Dyn) -> list[str]:
    """Candidate parent paths in the order the module docstring gives."""
    out: list[str] = []
    order = {b"W2ru": 0, b"W2ku": 1, b"MacX": 2}
    for code, data in sorted(dyn.locators, key=lambda cd: order.get(cd[0], 9)):
        if code in (b"W2ru", b"W2ku"):
            text = data.decode("utf-16-le", errors="replace").split("\0", 1)[0]
            if len(text) >= 2 and text[1] == ":":
                # A Windows drive path cannot name a file here: try its name
                # next to the child.
                out.append(resolve_backing(child, text.replace("\\", "/").rsplit("/", 1)[-1]))
                continue
            out.append(resolve_backing(child, text.replace("\\", "/")))
        elif code == b"MacX":
            text = data.decode("utf-8", errors="replace").split("\0", 1)[0]
            if text.startswith("file://"):
                text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
            out.append(resolve_backing(child, text))
    if dyn.parent_name:
        out.append(resolve_backing(child, dyn.parent_name.replace("\\", "/").rsplit("/", 1)[-1]))
    return [os.path.normpath(p) for p in out]


def vhd_time(unix: float) -> int:
    return max(0, int(unix) - VHD_EPOCH) & 0xFFFFFFFF
