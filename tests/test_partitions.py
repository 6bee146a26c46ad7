"""The partition-table parser (iscsi/partitions.py): tables made by sgdisk
and sfdisk read as sfdisk itself reads them, and hostile tables (loops,
overlaps, ranges past the disk, damaged GPTs, random bytes) neither hang,
crash, read outside the disk nor yield a partition outside it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi.partitions import (
    MAX_GPT_ARRAY,
    MAX_LOGICAL,
    PartitionTable,
    read_table,
    read_table_async,
    scan,
)
from tests.tools import require_tool

MiB = 1 << 20
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


# ----------------------------------------------------------- table builders


def mbr_entry(ptype: int, first: int, count: int, status: int = 0) -> bytes:
    return struct.pack("<B3sB3sII", status, b"\0\0\0", ptype, b"\0\0\0", first, count)


def mbr_sector(entries: list[bytes], size: int = 512) -> bytes:
    table = b"".join(entries).ljust(64, b"\0")
    return (bytes(446) + table + b"\x55\xaa").ljust(size, b"\0")


def gpt_entry(first: int, last: int, ptype: str = LINUX_FS, name: str = "") -> bytes:
    return struct.pack("<16s16sQQQ72s", uuid.UUID(ptype).bytes_le, uuid.uuid4().bytes_le,
                       first, last, 0, name.encode("utf-16-le"))


def gpt_header(my_lba: int, alt_lba: int, entries_lba: int, count: int, entry_size: int,
               array: bytes, sector: int = 512, last_usable: int = 0) -> bytes:
    fields = [b"EFI PART", 0x10000, 92, 0, 0, my_lba, alt_lba, 34, last_usable,
              uuid.uuid4().bytes_le, entries_lba, count, entry_size, zlib.crc32(array)]
    raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
    fields[3] = zlib.crc32(raw)
    return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(sector, b"\0")


def gpt_disk(sectors: int, entries: list[bytes], *, sector: int = 512, count: int = 128,
             entry_size: int = 128) -> bytearray:
    """A disk with a protective MBR, primary and backup GPT."""
    disk = bytearray(sectors * sector)
    array = b"".join(e.ljust(entry_size, b"\0") for e in entries).ljust(count * entry_size, b"\0")
    disk[:sector] = mbr_sector([mbr_entry(0xEE, 1, min(sectors - 1, 0xFFFFFFFF))], sector)
    disk[sector : 2 * sector] = gpt_header(1, sectors - 1, 2, count, entry_size, array, sector)
    disk[2 * sector : 2 * sector + len(array)] = array
    backup_array = (sectors - 1) * sector - len(array)
    disk[backup_array : backup_array + len(array)] = array
    disk[(sectors - 1) * sector :] = gpt_header(sectors - 1, 1, backup_array // sector, count,
                                                entry_size, array, sector)
    return disk


class Recorder:
    """A read function over bytes that checks every request is inside the
    disk and counts them."""

    def __init__(self, disk: bytes | bytearray) -> None:
        self.disk = bytes(disk)
        self.requests = 0
        self.bytes = 0

    def __call__(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and 0 <= length and offset + length <= len(self.disk), (offset, length)
        self.requests += 1
        self.bytes += length
        return self.disk[offset : offset + length]


def parse(disk: bytes | bytearray, sector: int = 512) -> PartitionTable:
    rec = Recorder(disk)
    table = read_table(rec, len(disk), sector)
    check_invariants(table, len(disk))
    # One MBR, one GPT header (and a backup), one entry array, an EBR each.
    assert rec.requests <= 4 + MAX_LOGICAL + 4
    assert rec.bytes <= 4 * sector + MAX_GPT_ARRAY + (MAX_LOGICAL + 4) * sector
    return table


def check_invariants(table: PartitionTable, size: int) -> None:
    assert table.scheme in ("gpt", "mbr", "none")
    for i, (node, p) in enumerate(table.volumes()):
        assert node == f"vol{i}"
        assert 0 <= p.start < p.end <= size, p
    assert len(table.warnings) <= 17


# ----------------------------------------------------------- real tools


def _sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run([require_tool("sfdisk"), "--json", str(path)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def _read_file(path: Path) -> PartitionTable:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_table(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _same_as_sfdisk(path: Path, table: PartitionTable) -> None:
    ref = _sfdisk_json(path)
    parts = ref["partitions"]
    assert isinstance(parts, list)
    # sfdisk lists the extended container too; we show data partitions only.
    data = [p for p in parts if p.get("type") not in ("5", "f", "85")]
    assert [(p["start"] * 512, p["size"] * 512) for p in data] == \
        [(p.start, p.size) for p in table.partitions]
    assert [int(p["node"].rsplit("p" if "img" not in p["node"] else "img", 1)[1])
            for p in data] == [p.number for p in table.partitions]


def test_gpt_made_by_sgdisk(tmp_path: Path) -> None:
    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run([require_tool("sgdisk"), "-n", "1:2048:+20M", "-t", "1:8300", "-c", "1:root",
                    "-n", "2:0:+10M", "-t", "2:ef00", "-n", "4:0:0", "-t", "4:8200",
                    str(img)], check=True, capture_output=True, timeout=60)
    table = _read_file(img)
    assert table.scheme == "gpt" and not table.warnings
    assert [p.number for p in table.partitions] == [1, 2, 4]
    assert [n for n, _ in table.volumes()] == ["vol0", "vol1", "vol2"]  # no gap
    assert [p.type_name for p in table.partitions] == ["Linux filesystem", "EFI System",
                                                       "Linux swap"]
    assert table.partitions[0].name == "root"
    assert table.disk_id == _sfdisk_json(img)["id"]
    _same_as_sfdisk(img, table)
    lines = table.describe()
    assert lines[0].startswith("Partition table: GPT, disk id ")
    assert "vol0" in lines[2] and "\"root\"" in lines[2] and "1048576" in lines[2]


def test_mbr_with_extended_made_by_sfdisk(tmp_path: Path) -> None:
    img = tmp_path / "mbr.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    layout = ("label: dos\nstart=2048,size=8192,type=83,bootable\n"
              "start=10240,size=100000,type=5\nstart=12288,size=8192,type=83\n"
              "start=22528,size=8192,type=82\nstart=32768,size=8192,type=7\n"
              "start=110240,size=4096,type=c\n")
    subprocess.run([require_tool("sfdisk"), "-q", str(img)], input=layout, text=True,
                   check=True, capture_output=True, timeout=60)
    table = _read_file(img)
    assert table.scheme == "mbr" and not table.warnings
    assert [p.number for p in table.partitions] == [1, 3, 5, 6, 7]
    assert [p.logical for p in table.partitions] == [False, False, True, True, True]
    assert table.partitions[0].bootable
    assert [p.type_id for p in table.partitions] == ["0x83", "0x0c", "0x83", "0x82", "0x07"]
    _same_as_sfdisk(img, table)


async def test_async_driver_reads_the_same() -> None:
    disk = gpt_disk(256, [gpt_entry(40, 99), gpt_entry(100, 200)])

    async def read(offset: int, length: int) -> bytes:
        return bytes(disk[offset : offset + length])

    assert await read_table_async(read, len(disk)) == read_table(Recorder(disk), len(disk))


# ----------------------------------------------------------- hostile, by hand


def test_ebr_chain_looping_to_itself_is_cut() -> None:
    disk = bytearray(4 * MiB)
    disk[:512] = mbr_sector([mbr_entry(0x05, 100, 4000)])
    # The EBR at 100 holds a logical and links to itself (relative 0).
    disk[100 * 512 : 101 * 512] = mbr_sector([mbr_entry(0x83, 10, 50), mbr_entry(0x05, 0, 100)])
    table = parse(disk)
    assert [(p.number, p.start) for p in table.partitions] == [(5, 110 * 512)]
    assert any("loops" in w for w in table.warnings)


def test_ebr_chain_cycle_of_two_and_out_of_range_links() -> None:
    disk = bytearray(4 * MiB)
    disk[:512] = mbr_sector([mbr_entry(0x0F, 100, 4000), mbr_entry(0x05, 9000, 10)])
    disk[100 * 512 : 101 * 512] = mbr_sector([mbr_entry(0x83, 1, 5), mbr_entry(0x05, 200, 9)])
    disk[300 * 512 : 301 * 512] = mbr_sector([mbr_entry(0x83, 1, 5), mbr_entry(0x05, 0, 9)])
    table = parse(disk)
    assert [p.number for p in table.partitions] == [5, 6]
    assert any("loops" in w for w in table.warnings)
    assert any("outside" in w for w in table.warnings)  # the second extended: past the disk


def test_long_chain_is_bounded() -> None:
    sectors = 2 * MAX_LOGICAL + 50
    disk = bytearray(sectors * 512)
    disk[:512] = mbr_sector([mbr_entry(0x05, 1, sectors - 1)])
    for k in range(1, sectors - 1):
        disk[k * 512 : (k + 1) * 512] = mbr_sector([mbr_entry(0x83, 0, 1),
                                                    mbr_entry(0x05, k, 1)])
    table = parse(disk)
    assert len(table.partitions) == MAX_LOGICAL
    assert any(f"more than {MAX_LOGICAL}" in w for w in table.warnings)


def test_ranges_past_the_disk_overlaps_and_empty_entries() -> None:
    disk = bytearray(MiB)  # 2048 sectors
    disk[:512] = mbr_sector([mbr_entry(0x83, 100, 500), mbr_entry(0x83, 300, 100_000),
                             mbr_entry(0x83, 0xFFFFFFFF, 0xFFFFFFFF), mbr_entry(0, 1, 1)])
    table = parse(disk)
    assert [(p.number, p.start // 512, p.size // 512) for p in table.partitions] == \
        [(1, 100, 500), (2, 300, 2048 - 300)]
    text = " | ".join(table.warnings)
    assert "partition 2 runs past the end" in text
    assert "partition 3 starts beyond the end" in text
    assert "partitions 1 and 2 overlap" in text


def test_not_an_mbr() -> None:
    assert parse(bytes(MiB)).scheme == "none"
    # A FAT boot sector: the signature, but code where the entries would be.
    boot = bytearray(mbr_sector([]))
    boot[446:510] = bytes(range(64))
    assert parse(bytes(boot) + bytes(MiB)).scheme == "none"
    assert parse(b"").scheme == "none" and parse(bytes(100)).scheme == "none"


def test_gpt_backup_used_when_primary_is_damaged() -> None:
    disk = gpt_disk(256, [gpt_entry(40, 99, name="a")])
    disk[512 + 40] ^= 0xFF  # breaks the primary header's CRC
    table = parse(disk)
    assert table.scheme == "gpt"
    assert [(p.start // 512, p.name) for p in table.partitions] == [(40, "a")]
    assert any("backup" in w for w in table.warnings)


def test_gpt_array_with_bad_crc_shows_nothing() -> None:
    disk = gpt_disk(256, [gpt_entry(40, 99)])
    disk[2 * 512 + 40] ^= 0xFF  # an entry's byte: the array CRC no longer matches
    table = parse(disk)
    assert table.scheme == "gpt" and table.partitions == ()
    assert any("CRC32" in w for w in table.warnings)


def test_gpt_hostile_entries() -> None:
    disk = gpt_disk(256, [gpt_entry(40, 99), gpt_entry(99, 10), gpt_entry(50, 60),
                          gpt_entry(200, 10_000), gpt_entry(2**63, 2**64 - 1)])
    table = parse(disk)
    assert [p.number for p in table.partitions] == [1, 3, 4]
    text = " | ".join(table.warnings)
    assert "partition 2 ends before it starts" in text
    assert "partitions 1 and 3 overlap" in text
    assert "partition 4 runs past the end" in text
    assert "partition 5 starts beyond the end" in text


def test_gpt_with_4096_byte_sectors() -> None:
    disk = gpt_disk(64, [gpt_entry(6, 20), gpt_entry(21, 40)], sector=4096, count=4)
    table = parse(disk, 4096)
    assert [(p.start, p.size) for p in table.partitions] == [(6 * 4096, 15 * 4096),
                                                             (21 * 4096, 20 * 4096)]
    assert parse(disk, 512).partitions == ()  # wrong sector size: no GPT at byte 512


def test_gpt_refuses_huge_or_odd_arrays() -> None:
    for count, esize in ((1 << 20, 128), (4, 100), (4, 200), (0, 128)):
        disk = gpt_disk(256, [], count=4)
        array = bytes(max(count, 1) * 128)[: 4 * 128]
        disk[512:1024] = gpt_header(1, 255, 2, count, esize, array)
        disk[255 * 512 :] = bytes(512)  # no backup either
        table = parse(disk)
        assert table.partitions == (), (count, esize)


def test_bad_sector_size_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        next(scan(MiB, 1000))


# ----------------------------------------------------------- hypothesis

_SECTORS = 64


def _disk_from(fill: Callable[[bytearray], None]) -> bytearray:
    disk = bytearray(_SECTORS * 512)
    fill(disk)
    return disk


_lba = st.one_of(st.integers(0, _SECTORS + 4), st.integers(0, 0xFFFFFFFF))
_ptype = st.sampled_from([0x00, 0x05, 0x0F, 0x85, 0x83, 0xEE, 0x07]) | st.integers(0, 255)
_entry = st.builds(mbr_entry, _ptype, _lba, _lba, st.sampled_from([0, 0x80]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, _SECTORS - 1), st.lists(_entry, max_size=4)),
                max_size=12))
def test_hostile_mbr_and_ebr_chains(sectors: list[tuple[int, list[bytes]]]) -> None:
    """Any MBR and any EBRs anywhere (loops, links out of range, nested
    extended entries): the scan ends, reads inside the disk, and every
    partition lies inside it."""
    def fill(disk: bytearray) -> None:
        for lba, entries in sectors:
            disk[lba * 512 : (lba + 1) * 512] = mbr_sector(entries)
    parse(_disk_from(fill))


_glba = st.one_of(st.integers(0, _SECTORS + 4), st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_glba, _glba), max_size=6), st.sampled_from([4, 8, 16]),
       st.sampled_from([128, 256]), st.booleans())
def test_hostile_gpt_entries(ranges: list[tuple[int, int]], count: int, esize: int,
                             break_primary: bool) -> None:
    """GPTs with valid CRCs over arbitrary entries (so the parser gets past
    the checks to the ranges): bounded, inside the disk, no crash."""
    entries = [gpt_entry(a, b) for a, b in ranges][:count]
    disk = gpt_disk(_SECTORS, entries, count=count, entry_size=esize)
    if break_primary:
        disk[512] ^= 1
    parse(disk)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=6 * 512), st.sampled_from([512, 4096]))
def test_random_bytes(data: bytes, sector: int) -> None:
    parse(data, sector)
    # And behind a valid protective MBR, so the GPT paths see garbage.
    head = mbr_sector([mbr_entry(0xEE, 1, 0xFFFFFFFF)], sector)
    parse(head + data, sector)
