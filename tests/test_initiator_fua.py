"""FUA only where the LU advertises it (issue 9 item 11): DPOFUA in the
mode parameter header (SBC-3 §6.4.1), else write + SYNCHRONIZE CACHE.

The LU is a small in-process stand-in for the session (no sockets): it
answers MODE SENSE with the chosen DPOFUA and, like LIO's fileio LUNs,
refuses a WRITE with FUA when it does not advertise it."""

from __future__ import annotations

import struct

import pytest

from initiator.blockdev import BlockDevice
from initiator.scsi import LUN, Capacity
from initiator.session import ScsiResult
from iscsi.pdu import Buffer
from iscsi.scsi.rw import parse_rw

BS = 512
# Fixed-format sense: ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00).
INVALID_FIELD = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])


class FakeLU:
    """Stands in for :class:`Session` under :class:`LUN`."""

    target_name = "iqn.2024-01.test:fua"

    def __init__(self, dpofua: bool) -> None:
        self.dpofua = dpofua
        self.disk = bytearray(64 * BS)
        self.ops: list[tuple[str, int, int, bool]] = []

    async def execute(self, lun: int, cdb: bytes, *, data_out: Buffer | None = None,
                      data_in: Buffer | int | None = None, attr: int = 1) -> ScsiResult:
        op = cdb[0]
        if op == 0x1A:   # MODE SENSE(6): header only, no block descriptors
            header = bytes([3, 0, 0x10 if self.dpofua else 0, 0])
            return ScsiResult(0, b"", memoryview(header), 252 - 4, True)
        if op == 0x35:   # SYNCHRONIZE CACHE(10)
            lba, blocks = struct.unpack_from(">IxH", cdb, 2)
            self.ops.append(("sync", lba, blocks, False))
            return ScsiResult(0)
        if op in (0x2A, 0x8A, 0x28, 0x88):
            rw = parse_rw(cdb)
            if rw.fua and not self.dpofua:
                return ScsiResult(2, INVALID_FIELD)
            off, n = rw.lba * BS, rw.blocks * BS
            if op in (0x2A, 0x8A):
                assert data_out is not None
                self.disk[off : off + n] = memoryview(data_out).cast("B")
                self.ops.append(("write", rw.lba, rw.blocks, rw.fua))
                return ScsiResult(0)
            self.ops.append(("read", rw.lba, rw.blocks, rw.fua))
            return ScsiResult(0, b"", memoryview(bytes(self.disk[off : off + n])))
        raise AssertionError(f"unexpected CDB {cdb.hex()}")


def lun_on(fake: FakeLU) -> LUN:
    unit = LUN(fake, 0)  # type: ignore[arg-type]
    unit.capacity = Capacity(64, BS, BS)
    return unit


@pytest.mark.parametrize("dpofua", [False, True])
async def test_lun_write_fua_only_where_advertised(dpofua: bool) -> None:
    fake = FakeLU(dpofua)
    unit = lun_on(fake)
    await unit.write(4, b"\x11" * 2 * BS, fua=True)
    await unit.write(8, b"\x22" * BS, fua=True)
    if dpofua:
        assert fake.ops == [("write", 4, 2, True), ("write", 8, 1, True)]
    else:
        # Old code: CHECK CONDITION, ILLEGAL REQUEST from the first write.
        assert fake.ops == [("write", 4, 2, False), ("sync", 4, 2, False),
                            ("write", 8, 1, False), ("sync", 8, 1, False)]
    assert bytes(fake.disk[4 * BS : 6 * BS]) == b"\x11" * 2 * BS
    # An ordinary write needs neither.
    fake.ops.clear()
    await unit.write(9, b"\x33" * BS)
    assert fake.ops == [("write", 9, 1, False)]


async def test_blockdev_write_fua_on_a_lu_without_dpofua() -> None:
    fake = FakeLU(False)
    dev = BlockDevice(lun_on(fake))
    # Unaligned at both ends: read-modify-write edges, every piece durable.
    await dev.write(100, b"\x44" * 2000, fua=True)
    assert bytes(fake.disk[100:2100]) == b"\x44" * 2000
    writes = [op for op in fake.ops if op[0] == "write"]
    syncs = [op for op in fake.ops if op[0] == "sync"]
    assert writes and not any(op[3] for op in writes)
    assert sorted((w[1], w[2]) for w in writes) == sorted((s[1], s[2]) for s in syncs)
    read = await lun_on(fake).read(0, 1, fua=True)
    assert bytes(read[100:BS]) == b"\x44" * (BS - 100)
