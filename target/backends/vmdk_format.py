"""VMDK on-disk structures (VMware "Virtual Disk Format 1.1"): the sparse
extent header, grain markers, flags and limits, and the text descriptor
(extent lines, parent links, content IDs)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from .base import SECTOR, BackendError


NAME = "vmdk"

MAGIC = 0x564D444B  # "KDMV" little-endian
COWD = b"COWD"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_TEST = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
NO_PARENT = 0xFFFFFFFF
DEFAULT_GRAIN = 128  # sectors (64 KiB)
GTES = 512
DESC_SECTORS = 20
#: The largest descriptor we read as text (a real one is a few hundred bytes).
MAX_DESCRIPTOR = 1 << 20
TWO_GB = 2 << 30

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")

_HDR = struct.Struct("<IIIQQQQIQQQB4sH")
GRAIN_MARKER = struct.Struct("<QI")
U32 = struct.Struct("<I")

_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_KV_RE = re.compile(r'^([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$')


@dataclass
class Header:
    version: int
    flags: int
    capacity: int  # sectors
    grain: int  # sectors
    desc_offset: int
    desc_size: int
    gtes: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    compress: int


def parse_header(path: str, raw: bytes) -> Header:
    if len(raw) < _HDR.size:
        raise BackendError(f"{path}: truncated VMDK sparse header ({len(raw)} bytes)")
    (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead,
     _unclean, _chars, compress) = _HDR.unpack_from(raw)
    if magic != MAGIC:
        raise BackendError(f"{path}: not a VMDK sparse extent: magic {raw[:4]!r}, expected b'KDMV'")
    if version not in (1, 2, 3):
        raise BackendError(f"{path}: unsupported VMDK sparse extent version {version}")
    if grain < 1 or grain & (grain - 1) or grain > 1 << 18:
        raise BackendError(f"{path}: damaged VMDK header: grain size {grain} sectors is not a power of two")
    if gtes < 1 or gtes > 1 << 16:
        raise BackendError(f"{path}: damaged VMDK header: {gtes} entries per grain table")
    if capacity > 1 << 40:
        raise BackendError(f"{path}: damaged VMDK header: capacity {capacity} sectors")
    if flags & FLAG_COMPRESSED and compress != 1:
        raise BackendError(f"{path}: unsupported VMDK compression algorithm {compress} (deflate only)")
    return Header(version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, compress)


def header_bytes(h: Header) -> bytes:
    raw = bytearray(SECTOR)
    _HDR.pack_into(raw, 0, MAGIC, h.version, h.flags, h.capacity, h.grain, h.desc_offset, h.desc_size,
                   h.gtes, h.rgd_offset, h.gd_offset, h.overhead, 0, b"\n \r\n", h.compress)
    return bytes(raw)


def _looks_like_descriptor(head: bytes) -> bool:
    if b"\0" in head[:1024]:
        return False
    text = head[:4096].decode("latin-1")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        return re.match(r"version\s*=\s*\d", line) is not None and "createType" in text
    return False


def probe(head: bytes, path: str) -> bool:
    """A sparse extent ("KDMV"/"COWD" magic) or a text descriptor."""
    if len(head) >= 4 and (U32.unpack_from(head)[0] == MAGIC or head[:4] == COWD):
        return True
    return head.lstrip().startswith(b"# Disk DescriptorFile") or _looks_like_descriptor(head)


# ---------------------------------------------------------------------------
# Descriptor
# ---------------------------------------------------------------------------


@dataclass
class ExtentLine:
    access: str
    sectors: int
    kind: str
    file: str | None
    offset: int  # sectors into the file (FLAT/VMFS)


@dataclass
class Descriptor:
    keys: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)
    text: str = ""


def parse_descriptor(path: str, text: str) -> Descriptor:
    d = Descriptor(text=text)
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, kind, fname, off = m.groups()
            if kind != "ZERO" and fname is None:
                raise BackendError(f"{path}: VMDK descriptor line {lineno}: {kind} extent without a file name")
            d.extents.append(ExtentLine(access, int(sectors), kind, fname, int(off or 0)))
            continue
        m = _KV_RE.match(line)
        if m is None:
            raise BackendError(f"{path}: VMDK descriptor line {lineno} is not understood: {line[:60]!r}")
        key, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        (d.ddb if key.startswith("ddb.") else d.keys)[key] = value
    if d.keys.get("version") not in ("1", "2", "3"):
        raise BackendError(f"{path}: unsupported VMDK descriptor version {d.keys.get('version')!r}")
    if not d.extents:
        raise BackendError(f"{path}: VMDK descriptor lists no extents")
    for key in ("CID", "parentCID"):
        v = d.keys.get(key, "ffffffff")
        if not re.fullmatch(r"[0-9a-fA-F]{1,8}", v):
            raise BackendError(f"{path}: VMDK descriptor {key}={v!r} is not a 32-bit hex number")
    return d


def hexkey(d: Descriptor, key: str) -> int:
    return int(d.keys.get(key, "ffffffff"), 16)
