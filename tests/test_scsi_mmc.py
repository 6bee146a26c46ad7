"""The MMC CD/DVD-ROM unit: read-only 2048-byte medium, TOC, configuration,
media events and medium changes."""

from __future__ import annotations

import struct

from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.sense import SenseData
from target.backends.memory import MemoryBackend
from target.scsi.mmc import CD_BLOCK, PROFILE_CD_ROM, PROFILE_DVD_ROM, CdromUnit
from target.scsi.target import ScsiTarget
from target.scsi.types import Nexus, ScsiResult

TNAME = "iqn.2024-01.org.example:cd"
NX = Nexus.create("iqn.2024-01.org.example:init", 1, TNAME)


def image(blocks: int, fill: int = 0x41) -> MemoryBackend:
    b = MemoryBackend(blocks * CD_BLOCK)
    b.write(0, bytes([fill]) * (4 * CD_BLOCK))
    return b


async def run(t: ScsiTarget, cdb: list[int]) -> ScsiResult:
    return await t.execute(NX, 0, bytes(cdb), None)


def key_asc(r: ScsiResult) -> tuple[int, int, int] | None:
    if not r.sense:
        return None
    s = SenseData.decode(r.sense)
    return (s.key, s.asc, s.ascq)


async def make(blocks: int = 1000) -> tuple[ScsiTarget, CdromUnit]:
    cd = CdromUnit(image(blocks))
    t = ScsiTarget({0: cd}, name=TNAME)
    assert key_asc(await run(t, [0, 0, 0, 0, 0, 0])) == (SenseKey.UNIT_ATTENTION, 0x29, 0)
    return t, cd


async def test_inquiry_capacity_read() -> None:
    t, _ = await make()
    inq = (await run(t, [0x12, 0, 0, 0, 96, 0])).data
    assert inq is not None and inq[0] == 0x05 and inq[1] & 0x80
    rc = (await run(t, [0x25] + [0] * 9)).data
    assert rc == struct.pack(">II", 999, CD_BLOCK)
    rd = await run(t, [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0])
    assert rd.data is not None and bytes(rd.data) == b"A" * CD_BLOCK
    wr = await t.execute(NX, 0, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(CD_BLOCK))
    assert key_asc(wr) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0)


async def test_read_toc() -> None:
    t, _ = await make(1000)
    toc = (await run(t, [0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0])).data
    assert toc is not None
    assert struct.unpack_from(">HBB", toc) == (18, 1, 1)
    assert toc[4 + 2] == 1 and struct.unpack_from(">I", toc, 8)[0] == 0
    assert toc[12 + 2] == 0xAA and struct.unpack_from(">I", toc, 16)[0] == 1000
    msf = (await run(t, [0x43, 2, 0, 0, 0, 0, 0, 0, 100, 0])).data
    assert msf is not None and msf[8:12] == bytes((0, 0, 2, 0))  # LBA 0 = 00:02:00
    sess = (await run(t, [0x43, 0, 1, 0, 0, 0, 0, 0, 100, 0])).data
    assert sess is not None and struct.unpack_from(">HBB", sess) == (10, 1, 1)
    bad = await run(t, [0x43, 0, 5, 0, 0, 0, 0, 0, 100, 0])
    assert key_asc(bad) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)


async def test_get_configuration_profiles() -> None:
    t, cd = await make(1000)
    cfg = (await run(t, [0x46, 0, 0, 0, 0, 0, 0, 1, 0, 0])).data
    assert cfg is not None
    assert struct.unpack_from(">IxxH", cfg) == (len(cfg) - 4, PROFILE_CD_ROM)
    codes = []
    pos = 8
    while pos < len(cfg):
        codes.append(struct.unpack_from(">H", cfg, pos)[0])
        pos += 4 + cfg[pos + 3]
    assert codes == [0, 1, 2, 3, 0x10]
    one = (await run(t, [0x46, 2, 0, 3, 0, 0, 0, 1, 0, 0])).data
    assert one is not None and len(one) == 8 + 8 and one[9] == 3
    cd.change_medium(image(CD_BLOCK * 200))  # > 80 minutes of CD: a DVD
    dvd = (await run(t, [0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0])).data
    assert dvd is not None and struct.unpack_from(">H", dvd, 6)[0] == PROFILE_DVD_ROM


async def test_eject_change_medium_and_events() -> None:
    t, cd = await make()
    gesn = [0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]
    ev = (await run(t, gesn)).data
    assert ev is not None and ev[2] == 0x04 and ev[4] == 0 and ev[5] & 0x02
    assert (await run(t, [0x1B, 0, 0, 0, 0x02, 0])).status == Status.GOOD  # eject
    assert key_asc(await run(t, [0, 0, 0, 0, 0, 0])) == (SenseKey.NOT_READY, 0x3A, 0x02)
    ev = (await run(t, gesn)).data
    assert ev is not None and ev[4] == 3 and ev[5] == 0x01  # removal, tray open
    mech = (await run(t, [0xBD, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])).data
    assert mech is not None and mech[1] & 0x10
    cd.change_medium(image(500, 0x42))
    assert key_asc(await run(t, [0, 0, 0, 0, 0, 0])) == (SenseKey.UNIT_ATTENTION, 0x28, 0)
    assert (await run(t, [0, 0, 0, 0, 0, 0])).status == Status.GOOD
    ev = (await run(t, gesn)).data
    assert ev is not None and ev[4] == 2  # new media, reported once
    ev = (await run(t, gesn)).data
    assert ev is not None and ev[4] == 0
    rc = (await run(t, [0x25] + [0] * 9)).data
    assert rc == struct.pack(">II", 499, CD_BLOCK)
    assert key_asc(await run(t, [0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0])) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)


async def test_empty_drive_and_rsoc_consistency() -> None:
    cd = CdromUnit(None)
    t = ScsiTarget({0: cd}, name=TNAME)
    await run(t, [0, 0, 0, 0, 0, 0])
    assert key_asc(await run(t, [0, 0, 0, 0, 0, 0])) == (SenseKey.NOT_READY, 0x3A, 0x01)
    res = (await run(t, [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])).data
    assert res is not None
    n = struct.unpack_from(">I", res)[0]
    for pos in range(4, 4 + n, 8):
        op = res[pos]
        cdb = bytearray(16)
        cdb[0] = op
        cdb[1] = res[pos + 3] if res[pos + 5] & 1 else 0
        got = await t.execute(NX, 0, bytes(cdb), None)
        assert key_asc(got) != (SenseKey.ILLEGAL_REQUEST, 0x20, 0), hex(op)
