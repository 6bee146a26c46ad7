"""Partition tables (MBR with extended/logical partitions, and GPT), parsed
without I/O.

The FUSE exports (``iscsi-initiator attach --fuse`` and ``iscsi-target image
mount``) show one file per partition beside the whole disk, as VirtualBox's
``vboximg-mount`` does (``vhdd``, ``vol0``, ``vol1``...). Both sides need the
same parser over different sources (an iSCSI LU read over the network, an
image file read in-process), so the parser here is sans-I/O like the rest of
this package: :func:`scan` is a generator that yields ``(offset, length)``
read requests and is sent the bytes; :func:`read_table` and
:func:`read_table_async` drive it from a synchronous or an asynchronous
``read`` callable.

A partition table is input from whoever wrote the disk, so it is treated as
hostile: every read the parser asks for lies inside the disk, an extended
partition chain that loops or runs on is cut (each EBR is read once, at most
:data:`MAX_LOGICAL` logical partitions), a GPT entry array is bounded
(:data:`MAX_GPT_ARRAY` bytes) and checked by its CRC32, partitions beyond
the disk's end are dropped and those running past it are clamped. What was
cut, dropped or clamped is reported in :attr:`PartitionTable.warnings`;
nothing here raises on bad data.

Layouts: MBR as the IBM PC BIOS convention has it (UEFI 2.10 §5.2.1: four
16-byte entries at byte 446, signature 0x55 0xAA at 510; EBRs linking
logical partitions, with a logical's start relative to its EBR and the next
EBR's relative to the outermost extended partition), GPT as UEFI 2.10 §5.3
(header at LBA 1, backup at the last LBA, CRC32 over the header and over the
entry array; GUIDs stored mixed-endian). Partitions are numbered as Linux
numbers them: GPT entry index + 1; MBR primaries 1-4 and logicals from 5.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_GPT_ARRAY",
    "MAX_LOGICAL",
    "Partition",
    "PartitionTable",
    "Scan",
    "read_table",
    "read_table_async",
    "scan",
]

#: At most this many logical partitions are followed in an extended chain
#: (Linux's block layer stops well below: DISK_MAX_PARTS is 256 in all).
MAX_LOGICAL = 128
#: The largest GPT entry array read (16 KiB is the spec's minimum; sgdisk
#: writes 128 entries of 128 bytes; nothing real comes near 1 MiB).
MAX_GPT_ARRAY = 1 << 20

#: A read request: (byte offset, length); the generator is sent the bytes.
Scan = Generator[tuple[int, int], bytes, "PartitionTable"]

_MBR_ENTRY = struct.Struct("<B3sB3sII")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MAX_WARNINGS = 16
_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_PROTECTIVE = 0xEE

_MBR_TYPES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT", 0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)", 0x82: "Linux swap",
    0x83: "Linux", 0x85: "Linux extended", 0x8E: "Linux LVM", 0xA5: "FreeBSD",
    0xAF: "HFS / HFS+", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xFD: "Linux raid autodetect",
}

_GPT_TYPES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS+",
    "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
}


@dataclass(frozen=True)
class Partition:
    """One partition; ``start`` and ``size`` in bytes."""

    #: Linux's number: GPT entry index + 1; MBR 1-4 primary, 5+ logical.
    number: int
    start: int
    size: int
    #: "0x83" for MBR, the type GUID (upper case) for GPT.
    type_id: str
    type_name: str
    #: The GPT partition name (empty for MBR).
    name: str = ""
    #: The GPT unique partition GUID.
    uuid: str | None = None
    bootable: bool = False
    logical: bool = False

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.start + self.size


@dataclass(frozen=True)
class PartitionTable:
    """What :func:`scan` found; ``scheme`` is "gpt", "mbr" or "none"."""

    scheme: str
    sector_size: int
    disk_size: int
    partitions: tuple[Partition, ...] = ()
    #: GPT disk GUID, or the MBR disk signature as 8 hex digits.
    disk_id: str | None = None
    warnings: tuple[str, ...] = field(default=())

    def volumes(self) -> list[tuple[str, Partition]]:
        """``(node name, partition)`` in table order: ``vol0``, ``vol1``...
        counted over the partitions present (as vboximg-mount names them),
        so a gap in the table does not leave a gap in the names."""
        return [(f"vol{i}", p) for i, p in enumerate(self.partitions)]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``--list --json``)."""
        return {
            "scheme": self.scheme, "sector-size": self.sector_size,
            "disk-size": self.disk_size, "disk-id": self.disk_id,
            "partitions": [{
                "node": node, "number": p.number, "start": p.start, "size": p.size,
                "start-sector": p.start // self.sector_size,
                "sectors": p.size // self.sector_size, "type": p.type_id,
                "type-name": p.type_name, "name": p.name, "uuid": p.uuid,
                "bootable": p.bootable, "logical": p.logical,
            } for node, p in self.volumes()],
            "warnings": list(self.warnings),
        }

    def describe(self) -> list[str]:
        """Human lines: the scheme, then one line per partition (the
        columns of vboximg-mount's ``--list``, with the node name)."""
        head = {"gpt": "GPT", "mbr": "MBR (DOS)", "none": "no partition table"}[self.scheme]
        ident = f", disk id {self.disk_id}" if self.disk_id else ""
        lines = [f"Partition table: {head}{ident}, {self.sector_size}-byte sectors"]
        if self.partitions:
            lines.append(f"{'node':<6} {'#':>3} {'start':>12} {'sectors':>12} {'size':>9} "
                         f"{'offset':>14}  type")
            for node, p in self.volumes():
                extra = f" \"{p.name}\"" if p.name else ""
                extra += " (boot)" if p.bootable else ""
                lines.append(f"{node:<6} {p.number:>3} {p.start // self.sector_size:>12} "
                             f"{p.size // self.sector_size:>12} {_human(p.size):>9} "
                             f"{p.start:>14}  {p.type_name}{extra}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _read(offset: int, length: int) -> Generator[tuple[int, int], bytes, bytes]:
    data = yield (offset, length)
    # A short answer reads as zeroes past its end: every field stays in range.
    return bytes(data[:length]).ljust(length, b"\0")


class _Builder:
    """Collects partitions, clamping them to the disk and noting why."""

    def __init__(self, disk_size: int) -> None:
        self.disk_size = disk_size
        self.parts: list[Partition] = []
        self.warnings: list[str] = []

    def add(self, p: Partition) -> None:
        if p.size <= 0:
            return
        if p.start >= self.disk_size:
            self.warnings.append(f"partition {p.number} starts beyond the end of the disk; "
                                 "ignored")
            return
        if p.end > self.disk_size:
            self.warnings.append(f"partition {p.number} runs past the end of the disk; "
                                 "cut at the end")
            p = Partition(p.number, p.start, self.disk_size - p.start, p.type_id, p.type_name,
                          p.name, p.uuid, p.bootable, p.logical)
        self.parts.append(p)

    def finish(self) -> tuple[tuple[Partition, ...], tuple[str, ...]]:
        """The partitions and warnings, overlaps noted (sorted once: a
        hostile GPT may hold thousands of entries)."""
        reach: Partition | None = None
        overlaps = 0
        for p in sorted(self.parts, key=lambda q: (q.start, q.number)):
            if reach is not None and p.start < reach.end:
                overlaps += 1
                if overlaps <= _MAX_WARNINGS:
                    self.warnings.append(f"partitions {reach.number} and {p.number} overlap")
            if reach is None or p.end > reach.end:
                reach = p
        if len(self.warnings) > _MAX_WARNINGS:
            more = len(self.warnings) - _MAX_WARNINGS
            self.warnings[_MAX_WARNINGS:] = [f"... and {more} more warnings"]
        return tuple(self.parts), tuple(self.warnings)


def scan(disk_size: int, sector_size: int = 512) -> Scan:
    """The sans-I/O parser: yields ``(offset, length)`` requests (always
    inside ``disk_size``), is sent the bytes read, and returns the
    :class:`PartitionTable`. A short answer is treated as unreadable."""
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise ValueError(f"sector size {sector_size} is not a power of two >= 512")
    sectors = disk_size // sector_size
    if sectors < 1:
        return PartitionTable("none", sector_size, disk_size)
    mbr = yield from _read(0, sector_size)
    if sectors >= 2:
        gpt = yield from _scan_gpt(disk_size, sector_size, mbr)
        if gpt is not None:
            return gpt
    return (yield from _scan_mbr(disk_size, sector_size, mbr))


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """(status, type, first LBA, sectors) x 4, or None when ``sector`` is no
    MBR: no 0x55AA signature, or a status byte other than 0x00/0x80 (a FAT
    boot sector has the signature but code where the entries would be)."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    out = []
    for i in range(4):
        status, _, ptype, _, first, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * i)
        if status not in (0x00, 0x80):
            return None
        out.append((status, ptype, first, count))
    return out


def _mbr_part(number: int, status: int, ptype: int, start_lba: int, count: int,
              sector_size: int, logical: bool) -> Partition:
    return Partition(number, start_lba * sector_size, count * sector_size, f"0x{ptype:02x}",
                     _MBR_TYPES.get(ptype, "unknown"), bootable=status == 0x80, logical=logical)


def _scan_mbr(disk_size: int, sector_size: int, sector: bytes) -> Scan:
    entries = _mbr_entries(sector)
    if entries is None:
        return PartitionTable("none", sector_size, disk_size)
    out = _Builder(disk_size)
    extended: list[tuple[int, int]] = []
    for i, (status, ptype, first, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in _EXTENDED:
            extended.append((first, count))
        elif ptype == _PROTECTIVE:
            out.warnings.append(f"partition {i + 1} is a GPT protective entry but the GPT "
                                "is missing or damaged; ignored")
        else:
            out.add(_mbr_part(i + 1, status, ptype, first, count, sector_size, False))
    number = 5
    seen: set[int] = set()
    sectors = disk_size // sector_size
    for ext_first, ext_count in extended:
        ebr = ext_first
        # Each EBR holds one logical partition (relative to the EBR) and a
        # link to the next EBR (relative to the extended partition).
        while True:
            if ebr in seen:
                out.warnings.append(f"extended partition chain loops back to sector {ebr}; "
                                    "cut there")
                break
            if ebr >= sectors or ebr >= ext_first + ext_count:
                out.warnings.append(f"extended partition chain points outside its "
                                    f"partition (sector {ebr}); cut there")
                break
            if number - 5 >= MAX_LOGICAL:
                out.warnings.append(f"more than {MAX_LOGICAL} logical partitions; the rest "
                                    "are ignored")
                break
            seen.add(ebr)
            data = yield from _read(ebr * sector_size, sector_size)
            links = _mbr_entries(data)
            if links is None:
                out.warnings.append(f"sector {ebr} in the extended partition chain is no "
                                    "EBR; cut there")
                break
            nxt: int | None = None
            for status, ptype, first, count in links:
                if ptype == 0 or count == 0:
                    continue
                if ptype in _EXTENDED:
                    if nxt is None:
                        nxt = ext_first + first
                elif number - 5 < MAX_LOGICAL:
                    out.add(_mbr_part(number, status, ptype, ebr + first, count, sector_size,
                                      True))
                    number += 1
            if nxt is None:
                break
            ebr = nxt
    disk_id = f"{int.from_bytes(sector[440:444], 'little'):08x}"
    return PartitionTable("mbr", sector_size, disk_size, *_with_id(out.finish(), disk_id))


def _with_id(found: tuple[tuple[Partition, ...], tuple[str, ...]], disk_id: str,
             ) -> tuple[tuple[Partition, ...], str, tuple[str, ...]]:
    return found[0], disk_id, found[1]


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


def _scan_gpt(disk_size: int, sector_size: int, mbr: bytes) -> Generator[
        tuple[int, int], bytes, PartitionTable | None]:
    sectors = disk_size // sector_size
    header = yield from _read(sector_size, sector_size)
    warnings: list[str] = []
    parsed = _gpt_header(header, 1, sectors, sector_size)
    if parsed is None and (header[:8] == b"EFI PART" or _has_protective(mbr)):
        # The primary is damaged: the backup header sits in the last LBA.
        backup = yield from _read((sectors - 1) * sector_size, sector_size)
        parsed = _gpt_header(backup, sectors - 1, sectors, sector_size)
        if parsed is None:
            return None
        warnings.append("the primary GPT header is damaged; the backup was used")
    if parsed is None:
        return None
    disk_guid, entries_lba, count, entry_size, array_crc = parsed
    array = yield from _read(entries_lba * sector_size, count * entry_size)
    if zlib.crc32(array) != array_crc:
        # Linux refuses such a table (efi.c is_gpt_valid); so do we.
        warnings.append("the GPT partition entry array fails its CRC32; no partitions shown")
        return PartitionTable("gpt", sector_size, disk_size, (), disk_guid, tuple(warnings))
    out = _Builder(disk_size)
    out.warnings = warnings
    for i in range(count):
        raw = array[i * entry_size : i * entry_size + _GPT_ENTRY.size]
        ptype, unique, first, last, attrs, name = _GPT_ENTRY.unpack(raw)
        if ptype == bytes(16):
            continue  # an unused entry
        if last < first:
            out.warnings.append(f"partition {i + 1} ends before it starts; ignored")
            continue
        type_id = _guid(ptype)
        label = name.decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        out.add(Partition(i + 1, first * sector_size, (last - first + 1) * sector_size, type_id,
                          _GPT_TYPES.get(type_id, "unknown"), label, _guid(unique),
                          bootable=bool(attrs & 4)))  # bit 2: legacy BIOS bootable
    return PartitionTable("gpt", sector_size, disk_size, *_with_id(out.finish(), disk_guid))


def _has_protective(mbr: bytes) -> bool:
    entries = _mbr_entries(mbr)
    return entries is not None and any(t == _PROTECTIVE for _, t, _, _ in entries)


def _gpt_header(data: bytes, my_lba: int, sectors: int,
                sector_size: int) -> tuple[str, int, int, int, int] | None:
    """(disk GUID, entry array LBA, entries, entry size, array CRC) of a
    valid header at ``my_lba``, else None (UEFI 2.10 §5.3.2 checks)."""
    if len(data) < _GPT_HEADER.size:
        return None
    (sig, _rev, hsize, hcrc, _res, mine, _alt, _first, _last, disk_guid, entries_lba, count,
     entry_size, array_crc) = _GPT_HEADER.unpack_from(data)
    if sig != b"EFI PART" or not _GPT_HEADER.size <= hsize <= len(data) or mine != my_lba:
        return None
    if zlib.crc32(data[:16] + b"\0\0\0\0" + data[20:hsize]) != hcrc:
        return None
    # Entry size: 128 x 2^n (§5.3.2); the array must fit the disk and our bound.
    if entry_size < _GPT_ENTRY.size or entry_size & (entry_size - 1) or not count:
        return None
    if count * entry_size > MAX_GPT_ARRAY or entries_lba < 2 or entries_lba >= sectors:
        return None
    if entries_lba * sector_size + count * entry_size > sectors * sector_size:
        return None
    return _guid(disk_guid), entries_lba, count, entry_size, array_crc


def read_table(read: Callable[[int, int], bytes | bytearray | memoryview], disk_size: int,
               sector_size: int = 512) -> PartitionTable:
    """Run :func:`scan` over a synchronous ``read(offset, length)``."""
    gen = scan(disk_size, sector_size)
    try:
        request = next(gen)
        while True:
            request = gen.send(bytes(read(*request)))
    except StopIteration as stop:
        table: PartitionTable = stop.value
        return table


async def read_table_async(read: Callable[[int, int], Awaitable[bytes | bytearray | memoryview]],
                           disk_size: int, sector_size: int = 512) -> PartitionTable:
    """Run :func:`scan` over an asynchronous ``read(offset, length)``."""
    gen = scan(disk_size, sector_size)
    try:
        request = next(gen)
        while True:
            request = gen.send(bytes(await read(*request)))
    except StopIteration as stop:
        table: PartitionTable = stop.value
        return table
