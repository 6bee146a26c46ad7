"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (target/scsi/xcopy.py):
copies between memory-backed units, every parameter-list error with its
sense, the result service actions and the Third-party Copy VPD page."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass, field

import pytest

from iscsi.scsi.constants import SenseKey
from iscsi.scsi.sense import CheckCondition
from target.backends.base import Backend, BackendError, Buffer
from target.backends.memory import MemoryBackend
from target.scsi import xcopy
from target.scsi.types import Nexus
from target.scsi.xcopy import XCopyManager, operating_parameters, third_party_copy_vpd

NEXUS = Nexus.create("iqn.2024-01.org.example:host", 0x1, "iqn.2024-01.org.example:disk")
OTHER = Nexus.create("iqn.2024-01.org.example:host2", 0x2, "iqn.2024-01.org.example:disk")


@dataclass
class FakeLU:
    """Just what the copy manager looks at on a LogicalUnit."""

    backend: Backend
    block_size: int
    naa: bytes
    write_protected: bool = False
    num_blocks: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_blocks = self.backend.size // self.block_size


def naa(n: int) -> bytes:
    return bytes([0x60 | n]) + hashlib.sha256(bytes([n])).digest()[:15]


def make_lu(n: int, blocks: int, block_size: int = 512) -> FakeLU:
    return FakeLU(MemoryBackend(blocks * block_size, block_size), block_size, naa(n))


def manager(*lus: FakeLU) -> XCopyManager:
    table = {lu.naa: lu for lu in lus}
    return XCopyManager(lambda d: table.get(bytes(d)))


def tgt_desc(designator: bytes, block_size: int = 512, *, code: int = 0xE4, dtype: int = 3, assoc: int = 0) -> bytes:
    ident = bytes([0x01, (assoc << 4) | dtype, 0, len(designator)]) + designator
    return bytes([code, 0x00, 0, 0]) + ident.ljust(20, b"\0") + bytes(5) + block_size.to_bytes(3, "big")


def seg_desc(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, *, dc: bool = False, code: int = 0x02) -> bytes:
    return struct.pack(">BBHHH2xHQQ", code, 0x02 if dc else 0, 0x18, src, dst, blocks, src_lba, dst_lba)


def param_list(tds: list[bytes], sds: list[bytes], *, list_id: int = 1, usage: int = 0, inline: bytes = b"") -> bytes:
    t, s = b"".join(tds), b"".join(sds)
    return struct.pack(">BBH4xII", list_id, usage << 3, len(t), len(s), len(inline)) + t + s + inline


def xcopy_cdb(plen: int, sa: int = 0) -> bytes:
    return bytes([0x83, sa]) + bytes(8) + plen.to_bytes(4, "big") + bytes(2)


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 4096) -> bytes:
    return bytes([0x84, sa, list_id]) + bytes(7) + alloc.to_bytes(4, "big") + bytes(2)


async def run(mgr: XCopyManager, data: bytes, nexus: Nexus = NEXUS) -> None:
    await mgr.extended_copy(nexus, xcopy_cdb(len(data)), data)


async def fails(mgr: XCopyManager, data: bytes, cdb: bytes | None = None) -> tuple[int, int, int]:
    with pytest.raises(CheckCondition) as exc:
        await mgr.extended_copy(NEXUS, cdb if cdb is not None else xcopy_cdb(len(data)), data)
    s = exc.value.sense
    return s.key, s.asc, s.ascq


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


# --- copying ---------------------------------------------------------------------


async def test_copy_between_two_units_in_chunks() -> None:
    src, dst = make_lu(1, 8192), make_lu(2, 8192)
    blocks = 3000  # 1.46 MiB: more than one CHUNK
    data = pattern(blocks * 512)
    src.backend.write(100 * 512, data)
    mgr = manager(src, dst)
    await run(mgr, param_list([tgt_desc(src.naa), tgt_desc(dst.naa)], [seg_desc(0, 1, blocks, 100, 5000)]))
    assert bytes(dst.backend.read(5000 * 512, blocks * 512)) == data
    assert bytes(dst.backend.read(4999 * 512, 512)) == bytes(512)
    assert bytes(dst.backend.read(8000 * 512, 512)) == bytes(512)


async def test_copy_within_one_unit_like_libiscsi_simple() -> None:
    lu = make_lu(1, 4096)
    lu.backend.write(0, b"A" * 2048 * 512)
    mgr = manager(lu)
    await run(mgr, param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 2048, 0, 4096 - 2048)], usage=2))
    assert bytes(lu.backend.read((4096 - 2048) * 512, 2048 * 512)) == b"A" * 2048 * 512


@pytest.mark.parametrize("delta", [1, 100, 2100, -1, -2100])
async def test_overlapping_copy_behaves_like_memmove(delta: int) -> None:
    lu = make_lu(1, 16384)
    blocks = 4000
    data = pattern(blocks * 512, seed=3)
    lu.backend.write(6000 * 512, data)
    mgr = manager(lu)
    await run(mgr, param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, blocks, 6000, 6000 + delta)]))
    assert bytes(lu.backend.read((6000 + delta) * 512, blocks * 512)) == data


async def test_dc_bit_counts_destination_blocks() -> None:
    src = make_lu(1, 1024, 512)
    dst = make_lu(2, 128, 4096)
    data = pattern(16 * 4096)
    src.backend.write(0, data)
    mgr = manager(src, dst)
    tds = [tgt_desc(src.naa, 512), tgt_desc(dst.naa, 4096)]
    await run(mgr, param_list(tds, [seg_desc(0, 1, 16, 0, 2, dc=True)]))
    assert bytes(dst.backend.read(2 * 4096, 16 * 4096)) == data
    # DC=0 counts source blocks: 8 x 512 bytes is one 4096-byte block.
    dst.backend.write(0, bytes(4096))
    await run(mgr, param_list(tds, [seg_desc(0, 1, 8, 0, 0)]))
    assert bytes(dst.backend.read(0, 4096)) == data[:4096]
    # 3 x 512 bytes is not a whole destination block.
    assert await fails(mgr, param_list(tds, [seg_desc(0, 1, 3, 0, 0)])) == (SenseKey.COPY_ABORTED, 0x0D, 0x02)


async def test_several_segments_run_in_order() -> None:
    lu = make_lu(1, 1024)
    lu.backend.write(0, b"x" * 512)
    mgr = manager(lu)
    # Block 0 -> 1, then 1 -> 2: the second sees the first's result.
    await run(mgr, param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1), seg_desc(0, 0, 1, 1, 2)]))
    assert bytes(lu.backend.read(2 * 512, 512)) == b"x" * 512


async def test_zero_length_parameter_list_is_good() -> None:
    await XCopyManager(lambda d: None).extended_copy(NEXUS, xcopy_cdb(0), b"")


# --- parameter list errors --------------------------------------------------------


async def test_truncated_parameter_lists() -> None:
    lu = make_lu(1, 4096)
    mgr = manager(lu)
    full = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 16, 0, 2048)])
    for cut in (16 + 32 - 1, 16 + 32 + 28 - 1, 8):
        assert await fails(mgr, full[:cut]) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00), cut
    # Data-Out shorter than the CDB's PARAMETER LIST LENGTH.
    assert await fails(mgr, full[:40], xcopy_cdb(len(full))) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


async def test_descriptor_limits() -> None:
    """libiscsi extendedcopy_descr_limits, against OPERATING PARAMETERS."""
    lu = make_lu(1, 4096)
    mgr = manager(lu)
    op = operating_parameters()
    max_tgt, max_seg, max_list = struct.unpack_from(">HHI", op, 8)
    seg = seg_desc(0, 0, 1, 0, 1)
    too_many_t = param_list([tgt_desc(lu.naa)] * (max_tgt + 1), [seg])
    assert await fails(mgr, too_many_t) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x06)
    too_many_s = param_list([tgt_desc(lu.naa)], [seg] * (max_seg + 1))
    assert await fails(mgr, too_many_s) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x08)
    n_seg = (max_list - (max_tgt + 1) * 32) // 28 + 2
    too_long = param_list([tgt_desc(lu.naa)] * (max_tgt + 1), [seg] * n_seg)
    assert await fails(mgr, too_long) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    # Exactly at the limits is fine.
    await run(mgr, param_list([tgt_desc(lu.naa)] * max_tgt, [seg] * max_seg))


async def test_unsupported_descriptor_types() -> None:
    lu = make_lu(1, 4096)
    mgr = manager(lu)
    fc = param_list([tgt_desc(lu.naa, code=0xE0)], [seg_desc(0, 0, 1, 0, 1)])
    with pytest.raises(CheckCondition) as exc:
        await run(mgr, fc)
    assert exc.value.sense.asc_ascq == (0x26, 0x07) and exc.value.sense.field_pointer == 16
    stream = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1, code=0x01)])
    assert await fails(mgr, stream) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x09)


async def test_bad_header_fields() -> None:
    lu = make_lu(1, 64)
    mgr = manager(lu)
    ok = [tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1)]
    assert await fails(mgr, param_list(*ok, usage=1)) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    assert await fails(mgr, param_list(*ok, usage=3, list_id=5)) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    data = param_list(*ok)
    assert await fails(mgr, data, xcopy_cdb(len(data), sa=1)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    bad_block = param_list([tgt_desc(lu.naa, 4096)], [seg_desc(0, 0, 1, 0, 1)])
    assert await fails(mgr, bad_block) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)


async def test_copy_aborted_cases() -> None:
    """libiscsi extendedcopy_validate_seg_descr / tgt_descr."""
    lu = make_lu(1, 4096)
    mgr = manager(lu)
    tds = [tgt_desc(lu.naa)]
    cases = [
        param_list(tds, [seg_desc(0, 1, 2048, 0, 2048)]),  # no target descriptor 1
        param_list(tds, [seg_desc(0, 0, 2048, 0, 4095)]),  # runs past the end
        param_list(tds, [seg_desc(0, 0, 2048, 4095, 0)]),  # source past the end
        param_list([tgt_desc(naa(9))], [seg_desc(0, 0, 1, 0, 1)]),  # unknown NAA
        param_list([tgt_desc(lu.naa, dtype=2)], [seg_desc(0, 0, 1, 0, 1)]),  # EUI-64, not NAA
    ]
    for data in cases:
        assert await fails(mgr, data) == (SenseKey.COPY_ABORTED, 0x0D, 0x02)


async def test_copy_aborted_sense_points_at_the_segment() -> None:
    lu = make_lu(1, 64)
    mgr = manager(lu)
    data = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1), seg_desc(0, 3, 1, 0, 1)])
    with pytest.raises(CheckCondition) as exc:
        await run(mgr, data)
    s = exc.value.sense
    assert s.command_specific == 1  # second segment
    assert s.field_pointer == 16 + 32 + 28 + 6 and not s.cd  # its destination index


async def test_write_protected_destination_and_backend_failure() -> None:
    src, dst = make_lu(1, 64), make_lu(2, 64)
    dst.write_protected = True
    mgr = manager(src, dst)
    data = param_list([tgt_desc(src.naa), tgt_desc(dst.naa)], [seg_desc(0, 1, 1, 0, 0)])
    assert await fails(mgr, data) == (SenseKey.COPY_ABORTED, 0x27, 0x00)

    class Broken(MemoryBackend):
        def read(self, offset: int, length: int) -> Buffer:
            raise BackendError("simulated I/O error")

    bad = FakeLU(Broken(64 * 512), 512, naa(3))
    mgr = manager(bad, src)
    data = param_list([tgt_desc(bad.naa), tgt_desc(src.naa)], [seg_desc(0, 1, 1, 0, 0)])
    assert await fails(mgr, data) == (SenseKey.COPY_ABORTED, 0x0D, 0x01)


# --- RECEIVE COPY RESULTS ------------------------------------------------------------


def test_operating_parameters_layout() -> None:
    mgr = XCopyManager(lambda d: None)
    data = mgr.receive_copy_results(NEXUS, rcr_cdb(3))
    avail = struct.unpack_from(">I", data)[0]
    assert avail == len(data) - 4 and avail >= 40
    assert data[4] & 1  # SNLID
    assert struct.unpack_from(">HHIII", data, 8) == (
        xcopy.MAX_TARGET_DESCRIPTORS,
        xcopy.MAX_SEGMENT_DESCRIPTORS,
        xcopy.MAX_DESCRIPTOR_LIST_LENGTH,
        xcopy.MAX_SEGMENT_LENGTH,
        0,
    )
    assert list(data[44 : 44 + data[43]]) == [0x02, 0xE4]
    assert mgr.receive_copy_results(NEXUS, rcr_cdb(3, alloc=10)) == data[:10]


async def test_copy_status_after_a_copy() -> None:
    lu = make_lu(1, 4096)
    mgr = manager(lu)
    with pytest.raises(CheckCondition) as exc:
        mgr.receive_copy_results(NEXUS, rcr_cdb(0, list_id=1))
    assert exc.value.sense.asc_ascq == (0x24, 0x00) and exc.value.sense.field_pointer == 2
    await run(mgr, param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 2048, 0, 2048)], list_id=1))
    data = mgr.receive_copy_results(NEXUS, rcr_cdb(0, list_id=1))
    avail, status, segs, units, count = struct.unpack(">IBHBI", data)
    assert (avail, status, segs, units, count) == (8, 0x01, 1, 0x00, 2048 * 512)
    # Results are per I_T nexus.
    with pytest.raises(CheckCondition):
        mgr.receive_copy_results(OTHER, rcr_cdb(0, list_id=1))
    assert mgr.receive_copy_results(NEXUS, rcr_cdb(1, list_id=1)) == bytes(4)
    assert mgr.receive_copy_results(NEXUS, rcr_cdb(4, list_id=1)) == bytes(4)  # no failure details
    for sa in (2, 5, 0x1F):
        with pytest.raises(CheckCondition):
            mgr.receive_copy_results(NEXUS, rcr_cdb(sa, list_id=1))


async def test_failed_segment_details() -> None:
    lu = make_lu(1, 64)
    mgr = manager(lu)
    data = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1), seg_desc(0, 0, 8, 0, 60)], list_id=7)
    with pytest.raises(CheckCondition):
        await run(mgr, data)
    _, status, segs, _, count = struct.unpack(">IBHBI", mgr.receive_copy_results(NEXUS, rcr_cdb(0, 7)))
    assert (status, segs, count) == (0x02, 1, 512)
    details = mgr.receive_copy_results(NEXUS, rcr_cdb(4, 7))
    avail = struct.unpack_from(">I", details)[0]
    assert avail == len(details) - 4
    assert details[56] == 0x02  # CHECK CONDITION
    slen = struct.unpack_from(">H", details, 58)[0]
    sense = details[60 : 60 + slen]
    assert sense[0] & 0x7F == 0x70 and sense[2] & 0x0F == SenseKey.COPY_ABORTED and sense[12:14] == b"\x0d\x02"
    # Handed out once.
    with pytest.raises(CheckCondition):
        mgr.receive_copy_results(NEXUS, rcr_cdb(4, 7))


async def test_discard_usage_keeps_no_results() -> None:
    lu = make_lu(1, 64)
    mgr = manager(lu)
    await run(mgr, param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1)], list_id=3, usage=2))
    with pytest.raises(CheckCondition):
        mgr.receive_copy_results(NEXUS, rcr_cdb(0, 3))


class SignallingBackend(MemoryBackend):
    """Sets an event on the first write, so a test knows a copy is under way."""

    def __init__(self, size: int, event: asyncio.Event) -> None:
        super().__init__(size)
        self.event = event

    def write(self, offset: int, data: Buffer) -> None:
        super().write(offset, data)
        self.event.set()


async def test_list_identifier_in_use_and_status_in_progress() -> None:
    started = asyncio.Event()
    lu = FakeLU(SignallingBackend(8 << 20, started), 512, naa(1))
    mgr = manager(lu)
    blocks = (4 << 20) // 512  # four chunks
    data = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, blocks, 0, blocks)], list_id=9)
    task = asyncio.create_task(run(mgr, data))
    await started.wait()
    with pytest.raises(CheckCondition) as exc:
        await run(mgr, data)
    assert exc.value.sense.asc_ascq == (0x00, 0x16)  # OPERATION IN PROGRESS
    _, status, segs, _, count = struct.unpack(">IBHBI", mgr.receive_copy_results(NEXUS, rcr_cdb(0, 9)))
    assert status == 0x00 and segs == 0 and 0 < count < blocks * 512
    # Another nexus may use the same list identifier.
    other = param_list([tgt_desc(lu.naa)], [seg_desc(0, 0, 1, 0, 1)], list_id=9)
    await run(mgr, other, OTHER)
    await task
    _, status, segs, _, count = struct.unpack(">IBHBI", mgr.receive_copy_results(NEXUS, rcr_cdb(0, 9)))
    assert (status, segs, count) == (0x01, 1, blocks * 512)


# --- Third-party Copy VPD page ------------------------------------------------------


def test_third_party_copy_vpd() -> None:
    page = third_party_copy_vpd()
    assert page[0] == 0 and page[1] == 0x8F
    assert struct.unpack_from(">H", page, 2)[0] == len(page) - 4
    found: dict[int, bytes] = {}
    pos = 4
    while pos < len(page):
        dtype, dlen = struct.unpack_from(">HH", page, pos)
        assert dlen % 4 == 0
        found[dtype] = page[pos + 4 : pos + 4 + dlen]
        pos += 4 + dlen
    assert pos == len(page)
    assert set(found) == {0x0001, 0x0008, 0x0009, 0x8001}
    cmds = found[0x0001]
    listing, i, commands = cmds[1 : 1 + cmds[0]], 0, {}
    while i < len(listing):
        op, n = listing[i], listing[i + 1]
        commands[op] = list(listing[i + 2 : i + 2 + n])
        i += 2 + n
    assert commands == {0x83: [0x00], 0x84: [0x00, 0x01, 0x03, 0x04]}
    assert struct.unpack_from(">HHII", found[0x0008], 4) == (
        xcopy.MAX_TARGET_DESCRIPTORS,
        xcopy.MAX_SEGMENT_DESCRIPTORS,
        xcopy.MAX_DESCRIPTOR_LIST_LENGTH,
        0,
    )
    assert list(found[0x0009][1 : 1 + found[0x0009][0]]) == [0x02, 0xE4]
    assert struct.unpack_from(">I", found[0x8001], 8)[0] == xcopy.MAX_SEGMENT_LENGTH
