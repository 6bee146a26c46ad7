"""SCSI target emulation driven through ScsiTarget.execute on a memory
backend: each command family's good path and the sense codes libiscsi's
iscsi-test-cu expects for the error paths."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import pytest

from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.sense import SenseData
from target.backends.base import Backend, Buffer
from target.backends.memory import MemoryBackend
from target.scsi.lu import LogicalUnit
from target.scsi.lu_base import first_difference
from target.scsi.target import ScsiTarget
from target.scsi.types import LUConfig, Nexus

TNAME = "iqn.2024-01.org.example:disk"
BS = 512
BLOCKS = 4096


@dataclass
class Res:
    status: int
    sense: SenseData | None
    data: bytes | None

    @property
    def key_asc(self) -> tuple[int, int, int] | None:
        return None if self.sense is None else (self.sense.key, self.sense.asc, self.sense.ascq)


class FullDisk(Backend):
    """A fully provisioned in-test backend (not thin), counting flushes."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.buf)

    def read(self, offset: int, length: int) -> Buffer:
        return memoryview(self.buf)[offset : offset + length]

    def write(self, offset: int, data: Buffer) -> None:
        self.buf[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1


def nexus(n: int = 1) -> Nexus:
    return Nexus.create(f"iqn.2024-01.org.example:init{n}", 0x23D000000000 + n, TNAME, 1)


class Rig:
    def __init__(self, backend: Backend | None = None, config: LUConfig | None = None) -> None:
        self.backend = backend if backend is not None else MemoryBackend(BLOCKS * BS)
        self.lu = LogicalUnit(self.backend, config or LUConfig())
        self.target = ScsiTarget({0: self.lu}, name=TNAME)
        self.nx = nexus(1)

    async def run(
        self, cdb: list[int] | bytes, data: bytes | None = None, *, lun: int = 0, nx: Nexus | None = None,
        expected_length: int | None = None,
    ) -> Res:
        r = await self.target.execute(nx or self.nx, lun, bytes(cdb), data, expected_length=expected_length)
        sense = SenseData.decode(r.sense) if r.sense else None
        return Res(int(r.status), sense, None if r.data is None else bytes(r.data))

    async def ready(self, nx: Nexus | None = None) -> None:
        """Consume the POWER ON/RESET unit attention."""
        r = await self.run(tur(), nx=nx)
        assert r.key_asc == (SenseKey.UNIT_ATTENTION, 0x29, 0x00)


def tur() -> bytes:
    return bytes(6)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def ws16(lba: int, n: int, flags: int = 0) -> bytes:
    return rw16(0x93, lba, n, flags)


def caw(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, n, 0, 0)


ILLEGAL = SenseKey.ILLEGAL_REQUEST
INVALID_CDB = (ILLEGAL, 0x24, 0x00)
LBA_OOB = (ILLEGAL, 0x21, 0x00)


@pytest.fixture
async def rig() -> Rig:
    r = Rig()
    await r.ready()
    return r


# ----- unit attentions ---------------------------------------------------------


async def test_power_on_ua_once_per_nexus_and_exempt_commands() -> None:
    r = Rig()
    a, b = nexus(1), nexus(2)
    # INQUIRY, REPORT LUNS and REQUEST SENSE do not consume it (SPC-4 §5.14)
    assert (await r.run([0x12, 0, 0, 0, 36, 0], nx=a)).status == Status.GOOD
    assert (await r.run([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], nx=a)).status == Status.GOOD
    first = await r.run(tur(), nx=a)
    assert first.key_asc == (SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    assert (await r.run(tur(), nx=a)).status == Status.GOOD
    # the second nexus still has its own
    assert (await r.run(tur(), nx=b)).key_asc == (SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    assert (await r.run(tur(), nx=b)).status == Status.GOOD


async def test_request_sense_returns_and_clears_ua() -> None:
    r = Rig()
    res = await r.run([0x03, 0, 0, 0, 252, 0])
    assert res.status == Status.GOOD and res.data is not None
    s = SenseData.decode(res.data)
    assert (s.key, s.asc, s.ascq) == (SenseKey.UNIT_ATTENTION, 0x29, 0)
    assert (await r.run(tur())).status == Status.GOOD
    res = await r.run([0x03, 1, 0, 0, 252, 0])  # DESC=1
    assert res.data is not None and res.data[0] == 0x72
    assert SenseData.decode(res.data).key == SenseKey.NO_SENSE


async def test_mode_select_posts_mode_parameters_changed_to_others(rig: Rig) -> None:
    other = nexus(2)
    await rig.ready(other)
    # read the caching page, clear WCE, write it back
    ms = await rig.run([0x1A, 0x08, 0x08, 0, 255, 0])
    assert ms.data is not None
    page = bytearray(ms.data[4:])
    assert page[0] == 0x08 and page[2] & 0x04  # WCE set by default
    page[2] &= ~0x04
    param = bytes(4) + bytes(page)
    res = await rig.run([0x15, 0x10, 0, 0, len(param), 0], param)
    assert res.status == Status.GOOD
    assert (await rig.run(tur())).status == Status.GOOD  # issuer gets nothing
    assert (await rig.run(tur(), nx=other)).key_asc == (SenseKey.UNIT_ATTENTION, 0x2A, 0x01)
    ms = await rig.run([0x1A, 0x08, 0x08, 0, 255, 0])
    assert ms.data is not None and not ms.data[4 + 2] & 0x04


async def test_capacity_change_ua() -> None:
    disk = FullDisk(BLOCKS * BS)
    r = Rig(disk)
    await r.ready()
    disk.buf.extend(bytes(BS * 8))
    assert r.lu.refresh_capacity()
    assert (await r.run(tur())).key_asc == (SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
    rc = await r.run([0x25] + [0] * 9)
    assert rc.data is not None and struct.unpack(">II", rc.data) == (BLOCKS + 8 - 1, BS)


async def test_lu_reset_posts_ua_to_all() -> None:
    r = Rig()
    a, b = nexus(1), nexus(2)
    await r.ready(a)
    await r.ready(b)
    r.target.lu_reset(a, 0)
    assert (await r.run(tur(), nx=a)).key_asc == (SenseKey.UNIT_ATTENTION, 0x29, 0x03)
    assert (await r.run(tur(), nx=b)).key_asc == (SenseKey.UNIT_ATTENTION, 0x29, 0x03)


# ----- missing LUN / REPORT LUNS --------------------------------------------------


async def test_missing_lun(rig: Rig) -> None:
    inq = await rig.run([0x12, 0, 0, 0, 96, 0], lun=5)
    assert inq.status == Status.GOOD and inq.data is not None and inq.data[0] == 0x7F
    assert (await rig.run(tur(), lun=5)).key_asc == (ILLEGAL, 0x25, 0x00)
    rs = await rig.run([0x03, 0, 0, 0, 18, 0], lun=5)
    assert rs.status == Status.GOOD and rs.data is not None and rs.data[12] == 0x25


async def test_report_luns(rig: Rig) -> None:
    res = await rig.run([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0])
    assert res.data == struct.pack(">I4x", 8) + bytes(8)
    res = await rig.run([0xA0, 0, 1, 0, 0, 0, 0, 0, 0, 64, 0, 0])
    assert res.data == bytes(8)
    assert (await rig.run([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0])).key_asc == INVALID_CDB
    assert (await rig.run([0xA0, 0, 7, 0, 0, 0, 0, 0, 0, 64, 0, 0])).key_asc == INVALID_CDB


# ----- INQUIRY ------------------------------------------------------------------


async def test_standard_inquiry(rig: Rig) -> None:
    res = await rig.run([0x12, 0, 0, 0, 255, 0])
    d = res.data
    assert d is not None and len(d) == 96
    assert d[0] == 0 and d[2] == 6 and d[3] & 0x0F == 2 and d[3] & 0x10
    assert d[4] == len(d) - 5
    assert d[8:16] == b"AIOISCSI"
    versions = struct.unpack(">8H", d[58:74])
    assert 0x0460 in versions and 0x04C0 in versions
    short = await rig.run([0x12, 0, 0, 0, 5, 0])
    assert short.data == d[:5]
    # 16-bit allocation length: 511 and 512 give the same data
    assert (await rig.run([0x12, 0, 0, 1, 0xFF, 0])).data == (await rig.run([0x12, 0, 0, 2, 0, 0])).data


async def test_inquiry_field_errors(rig: Rig) -> None:
    bad = await rig.run([0x12, 0, 1, 0, 255, 0])  # EVPD=0 with a page code
    assert bad.key_asc == INVALID_CDB and bad.sense is not None and bad.sense.field_pointer == 2
    assert (await rig.run([0x12, 1, 0x99, 0, 255, 0])).key_asc == INVALID_CDB


async def test_vpd_pages(rig: Rig) -> None:
    sup = await rig.run([0x12, 1, 0, 0, 255, 0])
    assert sup.data is not None
    pages = list(sup.data[4:])
    assert pages == sorted(pages) and {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for p in pages:
        res = await rig.run([0x12, 1, p, 0, 255, 0])
        assert res.status == Status.GOOD and res.data is not None and res.data[1] == p
        assert int.from_bytes(res.data[2:4], "big") == len(res.data) - 4
    di = (await rig.run([0x12, 1, 0x83, 0, 255, 0])).data
    assert di is not None
    types: list[tuple[int, int]] = []
    pos = 4
    while pos < len(di):
        types.append(((di[pos + 1] >> 4) & 3, di[pos + 1] & 0x0F))
        pos += 4 + di[pos + 3]
    assert (0, 3) in types and (0, 1) in types  # NAA + T10 vendor id of the LU
    assert {(1, 4), (1, 5), (1, 8)} <= set(types)  # rel port, TPG, port name
    assert rig.lu.config.naa_wwn is not None and rig.lu.config.naa_wwn[0] >> 4 == 6
    bl = (await rig.run([0x12, 1, 0xB0, 0, 255, 0])).data
    assert bl is not None and len(bl) == 64
    assert struct.unpack_from(">I", bl, 8)[0] == rig.lu.config.max_transfer_blocks
    assert struct.unpack_from(">Q", bl, 36)[0] == rig.lu.config.max_write_same_blocks
    assert bl[5] == rig.lu.config.max_compare_write_blocks
    lbp = (await rig.run([0x12, 1, 0xB2, 0, 255, 0])).data
    assert lbp is not None and lbp[5] & 0xE0 == 0xE0 and lbp[6] == 2  # thin memory disk
    bdc = (await rig.run([0x12, 1, 0xB1, 0, 255, 0])).data
    assert bdc is not None and bdc[4:6] == b"\x00\x01"


# ----- capacity --------------------------------------------------------------------


async def test_read_capacity(rig: Rig) -> None:
    rc = (await rig.run([0x25] + [0] * 9)).data
    assert rc == struct.pack(">II", BLOCKS - 1, BS)
    rc16 = (await rig.run([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])).data
    assert rc16 is not None and len(rc16) == 32
    last, bs = struct.unpack_from(">QI", rc16)
    assert (last, bs) == (BLOCKS - 1, BS)
    assert rc16[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    for alloc in range(16):
        r = await rig.run([0x9E, 0x10] + [0] * 8 + [0, 0, 0, alloc, 0, 0])
        assert r.status == Status.GOOD and r.data == rc16[:alloc]


async def test_read_capacity10_saturates() -> None:
    class Huge(FullDisk):
        @property
        def size(self) -> int:
            return (1 << 33) * BS

    r = Rig(Huge(0))
    await r.ready()
    rc = (await r.run([0x25] + [0] * 9)).data
    assert rc == struct.pack(">II", 0xFFFFFFFF, BS)


# ----- READ / WRITE ------------------------------------------------------------------


@pytest.mark.parametrize("op_r,op_w,build", [(0x28, 0x2A, rw10), (0x88, 0x8A, rw16)])
async def test_read_write_round_trip(rig: Rig, op_r: int, op_w: int, build: object) -> None:
    assert callable(build)
    data = bytes(range(256)) * 4
    assert (await rig.run(build(op_w, 10, 2), data)).status == Status.GOOD
    assert (await rig.run(build(op_r, 10, 2))).data == data
    assert (await rig.run(build(op_r, BLOCKS - 1, 2))).key_asc == LBA_OOB
    assert (await rig.run(build(op_w, BLOCKS, 1), bytes(BS))).key_asc == LBA_OOB
    zero = await rig.run(build(op_r, 0, 0))
    assert zero.status == Status.GOOD and zero.data is None
    for prot in range(1, 8):
        assert (await rig.run(build(op_r, 0, 1, prot << 5))).key_asc == INVALID_CDB
        assert (await rig.run(build(op_w, 0, 1, prot << 5), bytes(BS))).key_asc == INVALID_CDB
    # DPO and FUA are accepted (MODE SENSE advertises DPOFUA)
    assert (await rig.run(build(op_r, 0, 1, 0x18))).status == Status.GOOD


async def test_read6_write6(rig: Rig) -> None:
    blk = b"\x5a" * BS
    assert (await rig.run([0x0A, 0, 0, 3, 1, 0], blk)).status == Status.GOOD
    assert (await rig.run([0x08, 0, 0, 3, 1, 0])).data == blk
    assert (await rig.run([0x08, 0, 0x0F, 0xFF, 2, 0])).key_asc == LBA_OOB


async def test_read_returns_backend_view_and_write_passes_buffer() -> None:
    disk = FullDisk(BLOCKS * BS)
    r = Rig(disk)
    await r.ready()
    res = await r.target.execute(r.nx, 0, rw10(0x28, 0, 1), None)
    assert isinstance(res.data, memoryview) and res.data.obj is disk.buf


async def test_fua_and_write_through_flush() -> None:
    disk = FullDisk(BLOCKS * BS)
    r = Rig(disk)
    await r.ready()
    await r.run(rw10(0x2A, 0, 1), bytes(BS))
    assert disk.flushes == 0
    await r.run(rw10(0x2A, 0, 1, 0x08), bytes(BS))
    assert disk.flushes == 1
    disk2 = FullDisk(BLOCKS * BS)
    r2 = Rig(disk2, LUConfig(write_through=True))
    await r2.ready()
    await r2.run(rw10(0x2A, 0, 1), bytes(BS))
    assert disk2.flushes == 1
    ms = (await r2.run([0x1A, 0x08, 0x08, 0, 255, 0])).data
    assert ms is not None and not ms[6] & 0x04  # WCE clear
    await r2.run([0x35] + [0] * 9)
    assert disk2.flushes == 2


async def test_short_data_out_writes_only_what_arrived(rig: Rig) -> None:
    await rig.run(rw10(0x2A, 0, 2), b"a" * (2 * BS))
    assert (await rig.run(rw10(0x2A, 0, 1), b"b" * 200)).status == Status.GOOD
    got = (await rig.run(rw10(0x28, 0, 2))).data
    assert got == b"b" * 200 + b"a" * (2 * BS - 200)


async def test_read_only_lu() -> None:
    r = Rig(config=LUConfig(read_only=True))
    await r.ready()
    wp = (SenseKey.DATA_PROTECT, 0x27, 0x00)
    assert (await r.run(rw10(0x2A, 0, 1), bytes(BS))).key_asc == wp
    assert (await r.run(ws16(0, 1), bytes(BS))).key_asc == wp
    assert (await r.run(caw(0, 1), bytes(2 * BS))).key_asc == wp
    assert (await r.run(rw10(0x28, 0, 1))).status == Status.GOOD
    ms = (await r.run([0x1A, 0, 0x3F, 0, 255, 0])).data
    assert ms is not None and ms[2] & 0x80


async def test_max_transfer_length(rig: Rig) -> None:
    rig.lu.config.max_transfer_blocks = 8
    assert (await rig.run(rw10(0x28, 0, 9))).key_asc == INVALID_CDB
    assert (await rig.run(rw10(0x28, 0, 8))).status == Status.GOOD


# ----- VERIFY / WRITE AND VERIFY / ORWRITE / COMPARE AND WRITE -------------------------


async def test_verify(rig: Rig) -> None:
    data = bytes(range(256)) * 8
    await rig.run(rw10(0x2A, 5, 4), data)
    assert (await rig.run(rw10(0x2F, 5, 4, 0x02), data)).status == Status.GOOD
    bad = bytearray(data)
    bad[1000] ^= 0x58
    res = await rig.run(rw10(0x2F, 5, 4, 0x02), bytes(bad))
    assert res.key_asc == (SenseKey.MISCOMPARE, 0x1D, 0x00)
    assert res.sense is not None and res.sense.information == 1000
    assert (await rig.run(rw10(0x2F, 5, 4, 0x00))).status == Status.GOOD  # BYTCHK=0
    assert (await rig.run(rw10(0x2F, BLOCKS, 1, 0x02), bytes(BS))).key_asc == LBA_OOB
    assert (await rig.run(rw10(0x2F, 0, 1, 0x20 | 0x02), bytes(BS))).key_asc == INVALID_CDB
    # BYTCHK=3: one block compared against each
    await rig.run(ws16(100, 4), b"\x11" * BS)
    assert (await rig.run(rw16(0x8F, 100, 4, 0x06), b"\x11" * BS)).status == Status.GOOD


async def test_write_and_verify(rig: Rig) -> None:
    data = b"\x42" * (2 * BS)
    assert (await rig.run(rw10(0x2E, 7, 2, 0x02), data)).status == Status.GOOD
    assert (await rig.run(rw10(0x28, 7, 2))).data == data


async def test_orwrite(rig: Rig) -> None:
    await rig.run(rw16(0x8A, 0, 1), b"\xa5" * BS)
    assert (await rig.run(rw16(0x8B, 0, 1), b"\x5a" * BS)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 1))).data == b"\xff" * BS
    assert (await rig.run(rw16(0x8B, BLOCKS, 1), b"\x5a" * BS)).key_asc == LBA_OOB


async def test_compare_and_write(rig: Rig) -> None:
    old, new = b"A" * (2 * BS), b"B" * (2 * BS)
    await rig.run(rw16(0x8A, 0, 2), old)
    assert (await rig.run(caw(0, 2), old + new)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 2))).data == new
    for off in (0, 27, BS + 3):
        cmp = bytearray(new)
        cmp[off] = ord("Z")
        res = await rig.run(caw(0, 2), bytes(cmp) + old)
        assert res.key_asc == (SenseKey.MISCOMPARE, 0x1D, 0x00)
        assert res.sense is not None and res.sense.information == off
    assert (await rig.run(rw16(0x88, 0, 2))).data == new  # unchanged after miscompare
    rig.lu.config.max_compare_write_blocks = 4
    too_many = 5
    assert (await rig.run(caw(0, too_many), bytes(2 * too_many * BS))).key_asc == INVALID_CDB
    # Data-Out of the wrong size (too small / too large EDTL)
    res = await rig.run(caw(0, 1), bytes(4 * BS), expected_length=4 * BS)
    assert res.sense is not None and res.sense.key == ILLEGAL
    res = await rig.run(caw(0, 3), bytes(4 * BS), expected_length=4 * BS)
    assert res.sense is not None and res.sense.key == ILLEGAL
    assert (await rig.run(caw(BLOCKS, 1), bytes(2 * BS))).key_asc == LBA_OOB
    # 256 blocks wrap NLB to 0: the Data-Out size gives it away (libiscsi)
    res = await rig.run(caw(0, 0), bytes(512 * BS), expected_length=512 * BS)
    assert res.key_asc == INVALID_CDB
    assert (await rig.run(caw(0, 0), None, expected_length=0)).status == Status.GOOD


def test_first_difference() -> None:
    assert first_difference(b"abc", b"abc") == -1
    assert first_difference(b"abc", b"abd") == 2
    assert first_difference(b"\x00" * 9, b"\x00" * 8 + b"\x01") == 8
    assert first_difference(b"\x01" + bytes(9), bytes(10)) == 0


# ----- WRITE SAME / UNMAP / GET LBA STATUS -------------------------------------------------


async def test_write_same(rig: Rig) -> None:
    blk = b"\x33" * BS
    assert (await rig.run(ws16(10, 5), blk)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 10, 5))).data == blk * 5
    ws10 = rw10(0x41, 20, 3)
    assert (await rig.run(ws10, blk)).status == Status.GOOD
    assert (await rig.run(rw10(0x28, 20, 3))).data == blk * 3
    # Data-Out must be exactly one block
    res = await rig.run(ws16(0, 1, 0x08), blk[: BS // 2])
    assert res.sense is not None and res.sense.key == ILLEGAL
    res = await rig.run(ws16(0, 1, 0x08), blk * 2, expected_length=2 * BS)
    assert res.sense is not None and res.sense.key == ILLEGAL
    # 0 blocks = to the end; limited by MAXIMUM WRITE SAME LENGTH
    rig.lu.config.max_write_same_blocks = 16
    assert (await rig.run(ws16(0, 0), blk)).key_asc == INVALID_CDB
    assert (await rig.run(ws16(BLOCKS - 16, 0), blk)).status == Status.GOOD
    assert (await rig.run(ws16(BLOCKS - 17, 0), blk)).key_asc == INVALID_CDB
    assert (await rig.run(ws16(BLOCKS + 1, 0), blk)).key_asc == LBA_OOB
    assert (await rig.run(ws16(1 << 63, 0), blk)).key_asc == LBA_OOB
    assert (await rig.run(ws16(0, 1, 0x10), blk)).key_asc == INVALID_CDB  # ANCHOR


async def test_write_same_unmap_and_get_lba_status(rig: Rig) -> None:
    chunk = 128  # MemoryBackend deallocates whole 64 KiB chunks
    await rig.run(ws16(0, 2 * chunk), b"\x01" * BS)
    assert (await rig.run(ws16(0, chunk, 0x08), bytes(BS))).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 1))).data == bytes(BS)
    gls = (await rig.run([0x9E, 0x12] + [0] * 8 + [0, 0, 0, 64, 0, 0])).data
    assert gls is not None
    lba, count, status = struct.unpack_from(">QIB", gls, 8)
    assert (lba, count, status) == (0, chunk, 1)  # deallocated
    lba, count, status = struct.unpack_from(">QIB", gls, 24)
    assert (lba, status) == (chunk, 0)
    # UNMAP=1 deallocates even when the data block is not zero (LBPRZ)
    await rig.run(ws16(0, chunk), b"\x01" * BS)
    assert (await rig.run(ws16(0, chunk, 0x08), b"\xff" * BS)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, chunk))).data == bytes(chunk * BS)
    # NDOB: no Data-Out at all
    assert (await rig.run(ws16(chunk, chunk, 0x09))).status == Status.GOOD
    assert (await rig.run([0x9E, 0x12] + list(struct.pack(">Q", BLOCKS)) + [0, 0, 0, 24, 0, 0])).key_asc == LBA_OOB


def unmap_param(*descs: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


async def test_unmap(rig: Rig) -> None:
    await rig.run(ws16(0, 256), b"\x07" * BS)
    p = unmap_param((0, 128), (128, 0))
    assert (await rig.run([0x42, 0, 0, 0, 0, 0, 0, 0, len(p), 0], p)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 1))).data == bytes(BS)
    assert (await rig.run(rw16(0x88, 128, 1))).data == b"\x07" * BS
    p = unmap_param((BLOCKS, 0))
    assert (await rig.run([0x42, 0, 0, 0, 0, 0, 0, 0, len(p), 0], p)).status == Status.GOOD
    p = unmap_param((BLOCKS - 1, 2))
    assert (await rig.run([0x42, 0, 0, 0, 0, 0, 0, 0, len(p), 0], p)).key_asc == LBA_OOB
    assert (await rig.run([0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0])).status == Status.GOOD
    res = await rig.run([0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0], bytes(4))
    assert res.key_asc == (ILLEGAL, 0x1A, 0x00)


async def test_unmap_not_offered_on_full_disk() -> None:
    r = Rig(FullDisk(BLOCKS * BS))
    await r.ready()
    p = unmap_param((0, 1))
    assert (await r.run([0x42, 0, 0, 0, 0, 0, 0, 0, len(p), 0], p)).key_asc == (ILLEGAL, 0x20, 0x00)
    rc16 = (await r.run([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])).data
    assert rc16 is not None and rc16[14] & 0x80 == 0


# ----- cache, prefetch, defects -------------------------------------------------------------


async def test_sync_cache_prefetch(rig: Rig) -> None:
    assert (await rig.run([0x35] + [0] * 9)).status == Status.GOOD
    assert (await rig.run(rw16(0x91, 0, 8))).status == Status.GOOD
    assert (await rig.run(rw16(0x91, BLOCKS, 8))).key_asc == LBA_OOB
    assert (await rig.run(rw10(0x34, 0, 8))).status == Status.GOOD
    assert (await rig.run(rw16(0x90, BLOCKS - 1, 2))).key_asc == LBA_OOB


async def test_read_defect_data(rig: Rig) -> None:
    d10 = await rig.run([0x37, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 32, 0])
    assert d10.data == bytes((0, 0x1D, 0, 0))
    d12 = await rig.run([0xB7, 0x0D, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0])
    assert d12.data is not None and len(d12.data) == 8 and d12.data[1] == 0x0D


# ----- MODE SENSE / SELECT ---------------------------------------------------------------


def parse_pages(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(buf):
        out[buf[pos] & 0x3F] = buf[pos : pos + 2 + buf[pos + 1]]
        pos += 2 + buf[pos + 1]
    return out


async def test_mode_sense_all_pages(rig: Rig) -> None:
    ms6 = (await rig.run([0x1A, 0, 0x3F, 0, 255, 0])).data
    assert ms6 is not None and ms6[0] == len(ms6) - 1 and ms6[2] & 0x10  # DPOFUA
    assert ms6[3] == 8  # one short block descriptor
    assert struct.unpack_from(">I", ms6, 4)[0] == BLOCKS
    pages = parse_pages(ms6[12:])
    assert {0x01, 0x02, 0x08, 0x0A, 0x1C} <= set(pages)
    assert pages[0x0A][8:10] != b"\0\0"  # busy timeout period specified
    ctrl = (await rig.run([0x1A, 0x08, 0x0A, 0, 255, 0])).data
    assert ctrl is not None and ctrl[4:] == pages[0x0A]
    ms10 = (await rig.run([0x5A, 0x10, 0x3F, 0, 0, 0, 0, 1, 0, 0])).data  # LLBAA
    assert ms10 is not None and ms10[4] & 1 and ms10[7] == 16
    assert struct.unpack_from(">QII", ms10, 8) == (BLOCKS, 0, BS)
    assert (await rig.run([0x1A, 0, 0x3F, 0, 4, 0])).data == ms6[:4]
    assert (await rig.run([0x1A, 0, 0x05, 0, 255, 0])).key_asc == INVALID_CDB
    assert (await rig.run([0x1A, 0, 0x08, 0x01, 255, 0])).key_asc == INVALID_CDB
    all_sub = (await rig.run([0x1A, 0x08, 0x3F, 0xFF, 255, 0])).data
    assert all_sub is not None and parse_pages(all_sub[4:]).keys() == pages.keys()


async def test_mode_sense_page_control(rig: Rig) -> None:
    chg = (await rig.run([0x1A, 0x08, 0x40 | 0x0A, 0, 255, 0])).data
    assert chg is not None and chg[4 + 4] & 0x08 and chg[4 + 2] & 0x04  # SWP, D_SENSE
    # SPC-4 §7.5.7: the page code and length are there in every view.
    assert chg[4] & 0x3F == 0x0A and chg[5] == 0x0A
    every = (await rig.run([0x1A, 0x08, 0x40 | 0x3F, 0, 255, 0])).data
    assert every is not None and set(parse_pages(every[4:])) >= {0x01, 0x02, 0x08, 0x0A, 0x1C}
    dflt = (await rig.run([0x1A, 0x08, 0x80 | 0x08, 0, 255, 0])).data
    assert dflt is not None and dflt[4 + 2] & 0x04


async def test_mode_select_rejects_unchangeable_and_saves(rig: Rig) -> None:
    ctrl = bytearray((await rig.run([0x1A, 0x08, 0x0A, 0, 255, 0])).data or b"")[4:]
    bad = bytearray(ctrl)
    bad[3] ^= 0x10  # QUEUE ALGORITHM MODIFIER is not changeable
    param = bytes(4) + bytes(bad)
    res = await rig.run([0x15, 0x10, 0, 0, len(param), 0], param)
    assert res.key_asc == (ILLEGAL, 0x26, 0x00)
    assert res.sense is not None and res.sense.field_pointer == 4 + 3 and not res.sense.cd
    # D_SENSE is changeable: set it with SP=1, then sense comes in descriptor format
    good = bytearray(ctrl)
    good[2] |= 0x04
    param = bytes(4) + bytes(good)
    assert (await rig.run([0x15, 0x11, 0, 0, len(param), 0], param)).status == Status.GOOD
    saved = (await rig.run([0x1A, 0x08, 0xC0 | 0x0A, 0, 255, 0])).data
    assert saved is not None and saved[4 + 2] & 0x04
    r = await rig.target.execute(rig.nx, 0, rw16(0x88, (1 << 64) - 1, 1), None)
    assert r.sense[0] == 0x72
    # a block descriptor with a different block length is refused
    bd = struct.pack(">IBBH", 0, 0, 0, 4096)
    param = bytes((0, 0, 0, 8)) + bd
    assert (await rig.run([0x15, 0x10, 0, 0, len(param), 0], param)).key_asc == (ILLEGAL, 0x26, 0x00)
    # parameter list shorter than the header
    assert (await rig.run([0x15, 0x10, 0, 0, 2, 0], b"\0\0")).key_asc == (ILLEGAL, 0x1A, 0x00)


async def test_swp_write_protects(rig: Rig) -> None:
    ctrl = bytearray((await rig.run([0x1A, 0x08, 0x0A, 0, 255, 0])).data or b"")[4:]
    ctrl[4] |= 0x08
    param = bytes(4) + bytes(ctrl)
    assert (await rig.run([0x15, 0x10, 0, 0, len(param), 0], param)).status == Status.GOOD
    assert (await rig.run(rw10(0x2A, 0, 1), bytes(BS))).key_asc == (SenseKey.DATA_PROTECT, 0x27, 0)
    assert (await rig.run(rw10(0x28, 0, 1))).status == Status.GOOD


# ----- START STOP / PREVENT ALLOW ------------------------------------------------------------


async def test_start_stop_fixed_disk(rig: Rig) -> None:
    assert (await rig.run([0x1B, 0, 0, 0, 0x00, 0])).status == Status.GOOD  # stop
    nr = (SenseKey.NOT_READY, 0x04, 0x02)
    assert (await rig.run(tur())).key_asc == nr
    assert (await rig.run(rw10(0x28, 0, 1))).key_asc == nr
    assert (await rig.run([0x12, 0, 0, 0, 36, 0])).status == Status.GOOD
    rs = (await rig.run([0x03, 0, 0, 0, 18, 0])).data
    assert rs is not None and (rs[2] & 0x0F, rs[12], rs[13]) == nr
    assert (await rig.run([0x1B, 1, 0, 0, 0x01, 0])).status == Status.GOOD  # start
    assert (await rig.run(tur())).status == Status.GOOD
    for pc in range(1, 16):  # a power condition makes START ignored
        assert (await rig.run([0x1B, 1, 0, 0, pc << 4, 0])).status == Status.GOOD
    assert (await rig.run(tur())).status == Status.GOOD


async def test_removable_eject_and_prevent() -> None:
    r = Rig(config=LUConfig(removable=True))
    a, b = nexus(1), nexus(2)
    await r.ready(a)
    await r.ready(b)
    no_medium = (SenseKey.NOT_READY, 0x3A, 0x02)
    assert (await r.run([0x1E, 0, 0, 0, 1, 0], nx=a)).status == Status.GOOD
    prevented = (ILLEGAL, 0x53, 0x02)
    assert (await r.run([0x1B, 1, 0, 0, 0x02, 0], nx=a)).key_asc == prevented
    assert (await r.run([0x1B, 1, 0, 0, 0x02, 0], nx=b)).key_asc == prevented
    assert (await r.run([0x1E, 0, 0, 0, 0, 0], nx=a)).status == Status.GOOD
    assert (await r.run([0x1B, 1, 0, 0, 0x02, 0], nx=a)).status == Status.GOOD
    assert (await r.run(tur(), nx=a)).key_asc == no_medium
    assert (await r.run([0x25] + [0] * 9, nx=a)).key_asc == no_medium
    assert (await r.run([0x1B, 1, 0, 0, 0x03, 0], nx=a)).status == Status.GOOD  # load
    assert (await r.run(tur(), nx=a)).status == Status.GOOD
    # STOP without LOEJ leaves a removable medium accessible (libiscsi NoLoej)
    assert (await r.run([0x1B, 0, 0, 0, 0x00, 0], nx=a)).status == Status.GOOD
    assert (await r.run(tur(), nx=a)).status == Status.GOOD
    # LU reset drops PREVENT
    await r.run([0x1E, 0, 0, 0, 1, 0], nx=a)
    r.target.lu_reset(a, 0)
    await r.run(tur(), nx=a)
    assert (await r.run([0x1B, 1, 0, 0, 0x02, 0], nx=a)).status == Status.GOOD
    # so does nexus loss
    await r.run([0x1B, 1, 0, 0, 0x03, 0], nx=a)
    await r.run([0x1E, 0, 0, 0, 1, 0], nx=a)
    r.target.nexus_lost(a)
    await r.run(tur(), nx=b)  # the LU reset's unit attention
    assert (await r.run([0x1B, 1, 0, 0, 0x02, 0], nx=b)).status == Status.GOOD


# ----- unsupported / malformed ---------------------------------------------------------------


async def test_unsupported_opcode_and_bad_fields(rig: Rig) -> None:
    inv_op = (ILLEGAL, 0x20, 0x00)
    assert (await rig.run([0xC0] + [0] * 15)).key_asc == inv_op
    assert (await rig.run([0x04, 0, 0, 0, 0, 0])).key_asc == inv_op  # FORMAT UNIT
    assert (await rig.run([0x9E, 0x1F] + [0] * 14)).key_asc == INVALID_CDB
    assert (await rig.run([0x00, 0, 0, 0, 0, 0x04])).key_asc == INVALID_CDB  # NACA
    assert (await rig.run([0x28, 0, 0])).key_asc == INVALID_CDB  # truncated CDB


# ----- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------


def parse_rsoc_all(data: bytes) -> list[tuple[int, int, bool, int]]:
    n = struct.unpack_from(">I", data)[0]
    out = []
    pos = 4
    while pos < 4 + n:
        op, sa, flags, cdblen = struct.unpack_from(">BxHxBH", data, pos)
        out.append((op, sa, bool(flags & 1), cdblen))
        pos += 8 + (12 if flags & 0x02 else 0)
    return out


def rsoc(option: int, op: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return bytes((0xA3, 0x0C, option | (0x80 if rctd else 0), op, sa >> 8, sa & 0xFF, 0, 0, 0xFF, 0xFF, 0, 0))


async def test_report_supported_opcodes_consistency(rig: Rig) -> None:
    res = await rig.run(rsoc(0))
    assert res.data is not None
    descs = parse_rsoc_all(res.data)
    assert (0x28, 0, False, 10) in descs and (0x9E, 0x10, True, 16) in descs
    for op, sa, servactv, cdblen in descs:
        one = await rig.run(rsoc(2 if servactv else 1, op, sa))
        assert one.status == Status.GOOD and one.data is not None
        assert one.data[1] & 0x07 == 3
        usage = one.data[4 : 4 + cdblen]
        assert len(usage) == cdblen and usage[0] == op
        # the wrong reporting option is refused
        wrong = await rig.run(rsoc(1 if servactv else 2, op, sa))
        assert wrong.key_asc == INVALID_CDB
        # and every listed command is known to execute
        cdb = bytearray(max(cdblen, 6))
        cdb[0] = op
        if servactv:
            cdb[1] = sa
        got = await rig.run(bytes(cdb))
        assert got.key_asc != (ILLEGAL, 0x20, 0x00), hex(op)
        await rig.run([0x1B, 0, 0, 0, 1, 0])  # undo a STOP the probe may have caused
    rctd = await rig.run(rsoc(0, rctd=True))
    assert rctd.data is not None
    assert len(rctd.data) == 4 + 20 * len(descs)
    read10 = (await rig.run(rsoc(1, 0x28))).data
    assert read10 is not None and read10[4 + 1] & 0x18 == 0x18  # DPO/FUA in usage data


async def test_report_supported_tmfs(rig: Rig) -> None:
    res = await rig.run([0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0])
    assert res.data is not None and len(res.data) == 4 and res.data[0] & 0x80
    res = await rig.run([0xA3, 0x0D, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0])
    assert res.data is not None and len(res.data) == 16 and res.data[3] == 0x0C


async def test_data_out_length(rig: Rig) -> None:
    t = rig.target
    assert t.data_out_length(0, rw10(0x2A, 0, 4)) == 4 * BS
    assert t.data_out_length(0, rw10(0x28, 0, 4)) == 0
    assert t.data_out_length(0, caw(0, 2)) == 4 * BS
    assert t.data_out_length(0, ws16(0, 9)) == BS
    assert t.data_out_length(0, ws16(0, 9, 0x01)) == 0
    assert t.data_out_length(0, rw10(0x2F, 0, 3, 0x02)) == 3 * BS
    assert t.data_out_length(0, bytes([0x15, 0x10, 0, 0, 28, 0])) == 28
    assert t.data_out_length(7, rw10(0x2A, 0, 4)) == 0
    assert t.data_out_length(0, b"\x2a") == 0


# ----- WRITE ATOMIC(16) (SBC-4) -----------------------------------------------------------


def wa16(lba: int, n: int, flags: int = 0, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, n, 0, 0)


async def test_write_atomic16(rig: Rig) -> None:
    from iscsi.scsi.vpd import parse_vpd_block_limits

    bl = parse_vpd_block_limits((await rig.run([0x12, 1, 0xB0, 0, 255, 0])).data or b"")
    assert 0 < bl.max_atomic_transfer_length <= bl.max_transfer_length
    assert (bl.atomic_alignment, bl.atomic_transfer_length_granularity,
            bl.max_atomic_boundary_size) == (0, 0, 0)
    # The transport learns the Data-Out length from the CDB (residuals).
    assert rig.lu.data_out_length(wa16(8, 2)) == 2 * BS
    assert (await rig.run(wa16(8, 2), b"\xa6" * (2 * BS))).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 8, 2))).data == b"\xa6" * (2 * BS)
    assert (await rig.run(wa16(8, 1, flags=0x18), b"\x01" * BS)).status == Status.GOOD  # DPO FUA
    assert (await rig.run(wa16(0, 0))).status == Status.GOOD
    # Out of range, even with zero blocks; protection and boundaries refused.
    assert (await rig.run(wa16(BLOCKS + 1, 0))).key_asc == LBA_OOB
    assert (await rig.run(wa16(BLOCKS - 1, 2), bytes(2 * BS))).key_asc == LBA_OOB
    assert (await rig.run(wa16(1 << 63, 1), bytes(BS))).key_asc == LBA_OOB
    for flags in (0x20, 0x40, 0xE0):
        assert (await rig.run(wa16(0, 1, flags), bytes(BS))).key_asc == INVALID_CDB
    assert (await rig.run(wa16(0, 1, boundary=1), bytes(BS))).key_asc == INVALID_CDB
    # All or nothing: a short Data-Out writes nothing.
    short = await rig.run(wa16(16, 2), b"\x77" * BS)
    assert short.key_asc == INVALID_CDB
    assert (await rig.run(rw16(0x88, 16, 2))).data == bytes(2 * BS)
    # REPORT SUPPORTED OPERATION CODES lists it with DPO/FUA in the usage data.
    one = (await rig.run([0xA3, 0x0C, 0x01, 0x9C, 0, 0, 0, 0, 1, 0, 0, 0])).data
    assert one is not None and one[1] & 0x07 == 0x03 and one[5] & 0x18 == 0x18


async def test_write_atomic16_write_protected(rig: Rig) -> None:
    ctrl = bytearray((await rig.run([0x1A, 0x08, 0x0A, 0, 255, 0])).data or b"")[4:]
    ctrl[4] |= 0x08
    assert (await rig.run([0x15, 0x10, 0, 0, 4 + len(ctrl), 0], bytes(4) + bytes(ctrl))).status == 0
    assert (await rig.run(wa16(0, 1), bytes(BS))).key_asc == (SenseKey.DATA_PROTECT, 0x27, 0)


# ----- SANITIZE (SBC-3 §5.30) -------------------------------------------------------------


def sanitize(sa: int, plen: int = 0, immed: bool = False) -> bytes:
    return struct.pack(">BB5xHB", 0x48, (0x80 if immed else 0) | sa, plen, 0)


def overwrite_params(pattern: bytes, passes: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | passes, 0)) + struct.pack(">H", len(pattern)) + pattern


SANITIZING = (SenseKey.NOT_READY, 0x04, 0x1B)


async def test_sanitize_overwrite_and_erase(rig: Rig) -> None:
    await rig.run(rw16(0x8A, 0, 4), b"\x11" * (4 * BS))
    params = overwrite_params(b"\xaa\x55")
    assert (await rig.run(sanitize(1, len(params)), params)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 2))).data == b"\xaa\x55" * BS
    assert (await rig.run(rw16(0x88, BLOCKS - 1, 1))).data == b"\xaa\x55" * (BS // 2)
    # Two passes with INVERT end on the inverted pattern.
    params = overwrite_params(b"\x0f", passes=2, invert=True)
    assert (await rig.run(sanitize(1, len(params)), params)).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 7, 1))).data == b"\xf0" * BS
    # BLOCK ERASE on a thin unit: everything deallocated, reads zeroes.
    assert (await rig.run(sanitize(2))).status == Status.GOOD
    assert (await rig.run(rw16(0x88, 0, 4))).data == bytes(4 * BS)
    lbas = (await rig.run(bytes([0x9E, 0x12]) + bytes(8) + struct.pack(">I", 64) + bytes(2))).data
    assert lbas is not None and lbas[20] == 1 and struct.unpack_from(">I", lbas, 16)[0] == BLOCKS
    assert (await rig.run(sanitize(3))).status == Status.GOOD  # CRYPTO ERASE
    assert (await rig.run(sanitize(0x1F))).status == Status.GOOD  # EXIT FAILURE MODE
    # The Block Device Characteristics page says reads after an erase work.
    bdc = (await rig.run([0x12, 1, 0xB1, 0, 64, 0])).data
    assert bdc is not None and bdc[7] >> 4 == 0b0101  # WABEREQ 01b, WACEREQ 01b


async def test_sanitize_refusals(rig: Rig) -> None:
    for sa in (0, 4, 0x10, 0x1E):
        assert (await rig.run(sanitize(sa))).key_asc == INVALID_CDB
    # Reserved bits and bytes of the CDB.
    params = overwrite_params(b"\1")
    for i, value in ((1, 0x41), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)):
        cdb = bytearray(sanitize(1, len(params)))
        cdb[i] |= value
        assert (await rig.run(bytes(cdb), params)).key_asc == INVALID_CDB, i
    for plen in range(5):
        assert (await rig.run(sanitize(1, plen), bytes(plen))).key_asc == INVALID_CDB
    bad_field = (ILLEGAL, 0x26, 0x00)
    assert (await rig.run(sanitize(1, 5), overwrite_params(b"\1", passes=0))).key_asc == bad_field
    assert (await rig.run(sanitize(1, 4 + BS + 1), overwrite_params(bytes(BS + 1)))).key_asc == bad_field
    # PARAMETER LIST LENGTH must be the pattern length + 4.
    assert (await rig.run(sanitize(1, 8), overwrite_params(b"\1") + bytes(3))).key_asc == INVALID_CDB
    assert (await rig.run(sanitize(2, 8), bytes(8))).key_asc == INVALID_CDB
    assert (await rig.run(sanitize(0x1F, 8), bytes(8))).key_asc == INVALID_CDB
    # Supported service actions are listed one by one.
    for sa in (1, 2, 3, 0x1F):
        one = (await rig.run([0xA3, 0x0C, 0x02, 0x48, 0, sa, 0, 0, 1, 0, 0, 0])).data
        assert one is not None and one[1] & 0x07 == 0x03, sa


async def test_sanitize_in_progress_blocks_commands_and_survives_abort() -> None:
    """IMMED returns at once; until the operation ends everything but
    INQUIRY, REPORT LUNS and REQUEST SENSE gets 04h/1Bh with progress, and
    an aborted (cancelled) SANITIZE command does not stop it."""
    r = Rig(FullDisk(BLOCKS * BS))
    await r.ready()
    params = overwrite_params(b"\x5a")
    assert (await r.run(sanitize(1, len(params), immed=True), params)).status == Status.GOOD
    job = r.lu.sanitizing
    assert job is not None and job.task is not None
    res = await r.run(tur())
    assert res.key_asc == SANITIZING and res.sense is not None and res.sense.progress is not None
    assert (await r.run(rw16(0x88, 0, 1))).key_asc == SANITIZING
    assert (await r.run([0x12, 0, 0, 0, 36, 0])).status == Status.GOOD
    sense = (await r.run([0x03, 0, 0, 0, 252, 0])).data
    assert sense is not None and (sense[2] & 0x0F, sense[12], sense[13]) == (2, 0x04, 0x1B)
    await job.task
    assert r.lu.sanitizing is None
    assert (await r.run(rw16(0x88, BLOCKS - 1, 1))).data == b"\x5a" * BS
    # Without IMMED the command waits; cancelling it leaves the operation running.
    params = overwrite_params(b"\xc3")
    waiting = asyncio.ensure_future(r.run(sanitize(1, len(params)), params))
    await asyncio.sleep(0)  # let the command start the operation
    job = r.lu.sanitizing
    assert job is not None and job.task is not None
    waiting.cancel()
    await job.task
    assert (await r.run(rw16(0x88, 0, 1))).data == b"\xc3" * BS
    # FullDisk is not thin: BLOCK ERASE is not offered there.
    assert (await r.run(sanitize(2))).key_asc == INVALID_CDB
