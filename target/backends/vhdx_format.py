"""VHDX on-disk structures ([MS-VHDX] "Virtual Hard Disk v2 (VHDX) File
Format", section 2): file identifier, headers, region table, metadata
region, parent locator and BAT entries. Every field is little-endian; GUIDs
are Microsoft GUIDs (the first three fields little-endian, i.e. ``bytes_le``).

The first megabyte of the file::

    0      file type identifier ("vhdxfile" + UTF-16 creator)
    64K    header 1          128K  header 2        (4 KiB structures)
    192K   region table 1    256K  region table 2  (64 KiB each)

Headers and region tables carry a CRC-32C of the whole structure with the
checksum field taken as zero (MS-VHDX 2.2.2, 2.2.3); of the two headers the
valid one with the higher sequence number is current.
"""

from __future__ import annotations

import ntpath
import os
import struct
import uuid
from dataclasses import dataclass, field

from crc32c import crc32c

from .base import BackendError, Buffer
from .registry import resolve_backing

NAME = "vhdx"
SIGNATURE = b"vhdxfile"
KiB = 1024
MiB = 1 << 20
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_SIZE = 64 * KiB
LOG_SECTOR = 4 * KiB
ZERO_GUID = uuid.UUID(int=0)

# Region table entries (MS-VHDX 2.2.3.2).
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
# Metadata items (MS-VHDX 2.6.2).
FILE_PARAMS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83 = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
#: The only parent locator type defined (MS-VHDX 2.6.2.6): a VHDX parent.
VHDX_LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")

# Metadata table entry flags (MS-VHDX 2.6.1.2).
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4
# File parameters flags (MS-VHDX 2.6.2.1).
LEAVE_BLOCKS_ALLOCATED = 1
HAS_PARENT = 2

# BAT entry states (MS-VHDX 2.5.1.1, 2.5.1.2). qemu names 5 "unmapped"
# where the published spec says 3; both read as deallocated.
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_QEMU = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
STATE_MASK = 7
#: Sectors one sector bitmap block describes (2^23: 1 MiB of bits).
SECTORS_PER_BITMAP = 1 << 23

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HDR = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_META_HDR = struct.Struct("<8sHH20x")
_META_ENTRY = struct.Struct("<16sIII4x")
_LOCATOR_HDR = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")
U64 = struct.Struct("<Q")


def checksum(buf: Buffer, at: int = 4) -> int:
    """CRC-32C of ``buf`` with its 4-byte checksum field at ``at`` as zero."""
    mv = memoryview(buf).cast("B")
    value = crc32c(mv[:at])
    value = crc32c(b"\0\0\0\0", value)
    return int(crc32c(mv[at + 4 :], value))


def with_checksum(buf: bytearray, at: int = 4) -> bytearray:
    """Store the checksum of ``buf`` into it (field at ``at``) and return it."""
    buf[at : at + 4] = b"\0\0\0\0"
    struct.pack_into("<I", buf, at, checksum(buf, at))
    return buf


def _guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


def ms_guid_text(g: uuid.UUID) -> str:
    """A GUID as Windows writes it in parent locators: ``{...}``, lower case."""
    return "{" + str(g) + "}"


# -- headers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """One of the two headers (MS-VHDX 2.2.2)."""

    seq: int
    file_write: uuid.UUID
    data_write: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int
    log_version: int = 0
    version: int = 1

    def pack(self) -> bytes:
        """The 4 KiB header with its checksum."""
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            buf, 0, b"head", 0, self.seq, self.file_write.bytes_le, self.data_write.bytes_le,
            self.log_guid.bytes_le, self.log_version, self.version, self.log_length, self.log_offset,
        )
        return bytes(with_checksum(buf))


def parse_header(raw: bytes) -> Header | None:
    """A header, or None when the slot holds no valid one (bad signature or
    checksum: a torn header update leaves the other slot current)."""
    if len(raw) < HEADER_SIZE or raw[:4] != b"head":
        return None
    sig, csum, seq, fw, dw, lg, lver, ver, llen, loff = _HEADER.unpack_from(raw)
    if checksum(raw[:HEADER_SIZE]) != csum:
        return None
    return Header(seq, _guid(fw), _guid(dw), _guid(lg), llen, loff, lver, ver)


def current_header(path: str, raws: tuple[bytes, bytes]) -> tuple[int, Header]:
    """The slot (0 or 1) and contents of the current header."""
    found = [(h.seq, i, h) for i, h in enumerate(parse_header(r) for r in raws) if h is not None]
    if not found:
        raise BackendError(f"{path}: damaged VHDX: neither header is valid (bad signature or CRC-32C)")
    _seq, slot, hdr = max(found, key=lambda t: (t[0], t[1]))
    if hdr.version != 1:
        raise BackendError(f"{path}: unsupported VHDX version {hdr.version} (only 1)")
    if hdr.log_version != 0 and hdr.log_guid != ZERO_GUID:
        raise BackendError(f"{path}: unsupported VHDX log version {hdr.log_version} (only 0)")
    if hdr.log_offset % MiB or hdr.log_length % MiB:
        raise BackendError(f"{path}: damaged VHDX header: log at {hdr.log_offset} (+{hdr.log_length}) is not 1 MiB aligned")
    return slot, hdr


# -- region table --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Region:
    """A region table entry (MS-VHDX 2.2.3.2)."""

    offset: int
    length: int
    required: bool


def pack_regions(regions: dict[uuid.UUID, Region]) -> bytes:
    """A 64 KiB region table with its checksum."""
    buf = bytearray(REGION_SIZE)
    _REGION_HDR.pack_into(buf, 0, b"regi", 0, len(regions), 0)
    for i, (g, r) in enumerate(regions.items()):
        _REGION_ENTRY.pack_into(buf, _REGION_HDR.size + i * _REGION_ENTRY.size, g.bytes_le, r.offset,
                                r.length, int(r.required))
    return bytes(with_checksum(buf))


def parse_regions(raw: bytes) -> dict[uuid.UUID, Region] | None:
    """The region table, or None when this copy is invalid."""
    if len(raw) < REGION_SIZE or raw[:4] != b"regi":
        return None
    _sig, csum, count, _res = _REGION_HDR.unpack_from(raw)
    if count > 2047 or checksum(raw[:REGION_SIZE]) != csum:
        return None
    out: dict[uuid.UUID, Region] = {}
    for i in range(count):
        g, off, length, bits = _REGION_ENTRY.unpack_from(raw, _REGION_HDR.size + i * _REGION_ENTRY.size)
        out[_guid(g)] = Region(off, length, bool(bits & 1))
    return out


# -- metadata ------------------------------------------------------------------


@dataclass(slots=True)
class Meta:
    """The metadata items a reader needs (MS-VHDX 2.6.2)."""

    block_size: int
    leave_allocated: bool
    has_parent: bool
    size: int
    disk_id: uuid.UUID
    logical_sector: int
    physical_sector: int
    #: Parent locator key/value pairs (differencing disks).
    locator: dict[str, str] = field(default_factory=dict)

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block (MS-VHDX 2.5)."""
        return SECTORS_PER_BITMAP * self.logical_sector // self.block_size

    @property
    def payload_blocks(self) -> int:
        """Blocks of virtual disk."""
        return -(-self.size // self.block_size)

    @property
    def bat_entries(self) -> int:
        """BAT entries: payload entries with one sector bitmap entry after
        each chunk (MS-VHDX 2.5: differencing disks cover every chunk)."""
        cr = self.chunk_ratio
        if self.has_parent:
            return -(-self.payload_blocks // cr) * (cr + 1)
        return self.payload_blocks + (self.payload_blocks - 1) // cr


def bat_index(blk: int, chunk_ratio: int) -> int:
    """BAT index of payload block ``blk``."""
    return blk + blk // chunk_ratio


def bitmap_index(blk: int, chunk_ratio: int) -> int:
    """BAT index of the sector bitmap block covering payload block ``blk``."""
    return (blk // chunk_ratio) * (chunk_ratio + 1) + chunk_ratio


def _item(path: str, region: bytes, entries: dict[uuid.UUID, tuple[int, int, int]], g: uuid.UUID,
          what: str, size: int | None) -> bytes:
    ent = entries.get(g)
    if ent is None:
        raise BackendError(f"{path}: damaged VHDX: metadata item {what} missing")
    off, length, _flags = ent
    if (size is not None and length != size) or off < 64 * KiB or off + length > len(region):
        raise BackendError(f"{path}: damaged VHDX: metadata item {what} at {off} (+{length}) is bad")
    return region[off : off + length]


def parse_metadata(path: str, region: bytes) -> Meta:
    """Parse the metadata region (its whole contents)."""
    sig, _res, count = _META_HDR.unpack_from(region)
    if sig != b"metadata":
        raise BackendError(f"{path}: damaged VHDX: metadata table signature is {sig!r}")
    if count > 2047:
        raise BackendError(f"{path}: damaged VHDX: {count} metadata entries")
    entries: dict[uuid.UUID, tuple[int, int, int]] = {}
    known = {FILE_PARAMS, DISK_SIZE, PAGE83, LOGICAL_SECTOR, PHYSICAL_SECTOR, PARENT_LOCATOR}
    for i in range(count):
        g, off, length, flags = _META_ENTRY.unpack_from(region, 32 + 32 * i)
        item = _guid(g)
        if flags & META_IS_REQUIRED and item not in known:
            raise BackendError(f"{path}: VHDX has a required metadata item {item} this reader does not know")
        entries[item] = (off, length, flags)
    bs, pflags = struct.unpack("<II", _item(path, region, entries, FILE_PARAMS, "file parameters", 8))
    (size,) = U64.unpack(_item(path, region, entries, DISK_SIZE, "virtual disk size", 8))
    disk_id = _guid(_item(path, region, entries, PAGE83, "page 83 data", 16))
    (lss,) = struct.unpack("<I", _item(path, region, entries, LOGICAL_SECTOR, "logical sector size", 4))
    (pss,) = struct.unpack("<I", _item(path, region, entries, PHYSICAL_SECTOR, "physical sector size", 4))
    if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
        raise BackendError(f"{path}: damaged VHDX: block size {bs} (a power of 2, 1 MiB to 256 MiB)")
    if lss not in (512, 4096) or pss not in (512, 4096):
        raise BackendError(f"{path}: damaged VHDX: sector sizes {lss}/{pss} (512 or 4096)")
    if size == 0 or size % lss or size > 64 << 40:
        raise BackendError(f"{path}: damaged VHDX: virtual size {size}")
    meta = Meta(bs, bool(pflags & LEAVE_BLOCKS_ALLOCATED), bool(pflags & HAS_PARENT), size, disk_id, lss, pss)
    if meta.has_parent:
        meta.locator = parse_locator(path, _item(path, region, entries, PARENT_LOCATOR, "parent locator", None))
    return meta


def parse_locator(path: str, raw: bytes) -> dict[str, str]:
    """Key/value pairs of a parent locator (MS-VHDX 2.6.2.6)."""
    ltype, _res, count = _LOCATOR_HDR.unpack_from(raw)
    if _guid(ltype) != VHDX_LOCATOR_TYPE:
        raise BackendError(f"{path}: unknown VHDX parent locator type {_guid(ltype)}")
    out: dict[str, str] = {}
    for i in range(count):
        koff, voff, klen, vlen = _LOCATOR_ENTRY.unpack_from(raw, _LOCATOR_HDR.size + i * _LOCATOR_ENTRY.size)
        if koff + klen > len(raw) or voff + vlen > len(raw):
            raise BackendError(f"{path}: damaged VHDX parent locator entry {i}")
        key = raw[koff : koff + klen].decode("utf-16-le", errors="replace")
        out[key] = raw[voff : voff + vlen].decode("utf-16-le", errors="replace")
    return out


def pack_locator(pairs: dict[str, str]) -> bytes:
    """A parent locator item of the VHDX type."""
    head = bytearray(_LOCATOR_HDR.pack(VHDX_LOCATOR_TYPE.bytes_le, 0, len(pairs)))
    table = bytearray()
    data = bytearray()
    base = _LOCATOR_HDR.size + _LOCATOR_ENTRY.size * len(pairs)
    for k, v in pairs.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        koff = base + len(data)
        data += kb
        voff = base + len(data)
        data += vb
        table += _LOCATOR_ENTRY.pack(koff, voff, len(kb), len(vb))
    return bytes(head + table + data)


def pack_metadata(meta: Meta) -> bytes:
    """The metadata region contents (table at 0, items from 64 KiB) as
    qemu and Hyper-V lay it out."""
    items: list[tuple[uuid.UUID, bytes, int]] = [
        (FILE_PARAMS, struct.pack("<II", meta.block_size,
                                  (LEAVE_BLOCKS_ALLOCATED if meta.leave_allocated else 0)
                                  | (HAS_PARENT if meta.has_parent else 0)), META_IS_REQUIRED),
        (DISK_SIZE, U64.pack(meta.size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE83, meta.disk_id.bytes_le, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR, struct.pack("<I", meta.logical_sector), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR, struct.pack("<I", meta.physical_sector), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    if meta.has_parent:
        items.append((PARENT_LOCATOR, pack_locator(meta.locator), META_IS_REQUIRED))
    buf = bytearray(MiB)
    _META_HDR.pack_into(buf, 0, b"metadata", 0, len(items))
    at = 64 * KiB
    for i, (g, data, flags) in enumerate(items):
        _META_ENTRY.pack_into(buf, 32 + 32 * i, g.bytes_le, at, len(data), flags)
        buf[at : at + len(data)] = data
        at += len(data)
    return bytes(buf)


# -- parent locator: where the parent is ----------------------------------------


def locator_paths(child: str, locator: dict[str, str]) -> list[str]:
    """Candidate parent files, in the order MS-VHDX 2.6.2.6.1 gives:
    relative_path (relative to the child's directory, backslashes as
    Hyper-V writes them), then volume_path and absolute_win32_path (a
    Windows path names no file here unless it is a POSIX one; its file
    name next to the child is tried instead)."""
    out: list[str] = []
    for key in ("relative_path", "volume_path", "absolute_win32_path"):
        text = locator.get(key)
        if not text:
            continue
        if text.startswith("/"):
            out.append(text)
            continue
        if key == "relative_path":
            out.append(resolve_backing(child, text.replace("\\", "/")))
        else:
            out.append(resolve_backing(child, ntpath.basename(text)))
    return [os.path.normpath(p) for p in dict.fromkeys(out)]


def probe(head: bytes, path: str) -> bool:
    """A VHDX starts with the file type identifier "vhdxfile" (MS-VHDX 2.2.1)."""
    return head[:8] == SIGNATURE
