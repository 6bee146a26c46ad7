"""BlockDevice byte-offset logic against an in-memory LUN (no network).

The fake LUN yields to the event loop inside every command, so concurrent
requests really interleave; a bytearray model is the oracle.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from initiator.blockdev import BlockDevice, options_from_url
from initiator.errors import InitiatorError
from initiator.scsi import LUN, Capacity, SCSICheckCondition, SCSIStatusError, check
from initiator.session import ScsiResult

BS = 512
BLOCKS = 64


class FakeLUN:
    """Just the LUN methods BlockDevice uses, over a bytearray."""

    def __init__(self, blocks: int = BLOCKS, block_size: int = BS, *,
                 unmap_supported: bool = True) -> None:
        self.disk = bytearray(blocks * block_size)
        self.capacity = Capacity(blocks, block_size, block_size, lbpme=unmap_supported,
                                 lbprz=True)
        self.unmap_supported = unmap_supported
        self.reads: list[tuple[int, int, object]] = []
        self.writes: list[tuple[int, int]] = []
        self.unmaps: list[tuple[int, int]] = []
        self.syncs = 0

    @property
    def block_size(self) -> int:
        return self.capacity.block_size

    def _range(self, lba: int, blocks: int) -> slice:
        assert 0 <= lba and lba + blocks <= self.capacity.blocks, (lba, blocks)
        return slice(lba * self.block_size, (lba + blocks) * self.block_size)

    async def read(self, lba: int, blocks: int, buffer: Any = None) -> memoryview:
        await asyncio.sleep(0)
        data = self.disk[self._range(lba, blocks)]
        self.reads.append((lba, blocks, buffer.obj if isinstance(buffer, memoryview) else None))
        await asyncio.sleep(0)
        if buffer is None:
            return memoryview(bytearray(data))
        mv = memoryview(buffer)
        mv[:] = data
        return mv

    async def write(self, lba: int, data: Any, *, fua: bool = False) -> None:
        n = memoryview(data).nbytes
        assert n % self.block_size == 0
        await asyncio.sleep(0)
        self.disk[self._range(lba, n // self.block_size)] = bytes(data)
        self.writes.append((lba, n // self.block_size))
        await asyncio.sleep(0)

    async def write_same(self, lba: int, blocks: int, data: Any = None, *,
                         unmap: bool = False) -> None:
        await asyncio.sleep(0)
        self.disk[self._range(lba, blocks)] = bytes(blocks * self.block_size)

    async def unmap(self, ranges: list[tuple[int, int]]) -> None:
        if not self.unmap_supported:
            raise SCSICheckCondition(bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0,
                                            0, 0, 0, 0]), "UNMAP")
        await asyncio.sleep(0)
        for lba, blocks in ranges:
            self.disk[self._range(lba, blocks)] = bytes(blocks * self.block_size)
            self.unmaps.append((lba, blocks))

    async def synchronize_cache(self, lba: int = 0, blocks: int = 0) -> None:
        self.syncs += 1


def _dev(fake: FakeLUN, max_transfer: int = 8 * BS) -> BlockDevice:
    return BlockDevice(cast(LUN, fake), max_transfer=max_transfer)


async def test_aligned_read_lands_in_callers_buffer() -> None:
    fake = FakeLUN()
    fake.disk[:] = bytes(range(256)) * (len(fake.disk) // 256)
    dev = _dev(fake, max_transfer=4 * BS)
    buf = bytearray(16 * BS)
    assert await dev.readinto(BS, buf) == len(buf)
    assert buf == fake.disk[BS : 17 * BS]
    # Four transfers of max_transfer, each straight into our bytearray.
    assert [(lba, n) for lba, n, _ in fake.reads] == [(1, 4), (5, 4), (9, 4), (13, 4)]
    assert all(obj is buf for _, _, obj in fake.reads)


async def test_unaligned_read_edges() -> None:
    fake = FakeLUN()
    fake.disk[:] = bytes(range(256)) * (len(fake.disk) // 256)
    dev = _dev(fake)
    assert await dev.read(100, 3000) == fake.disk[100:3100]
    assert await dev.read(7, 5) == fake.disk[7:12]  # inside one block
    assert await dev.read(510, 4) == fake.disk[510:514]  # across a boundary
    assert await dev.read(0, 0) == b""


async def test_unaligned_write_read_modify_write() -> None:
    fake = FakeLUN()
    fake.disk[:] = b"\xee" * len(fake.disk)
    dev = _dev(fake)
    await dev.write(700, b"\x01" * 1000)
    model = bytearray(b"\xee" * len(fake.disk))
    model[700:1700] = b"\x01" * 1000
    assert fake.disk == model
    # Only the two edge blocks were read; the middle block was written directly.
    assert sorted((lba, n) for lba, n, _ in fake.reads) == [(1, 1), (3, 1)]


async def test_concurrent_writes_to_different_bytes_of_one_block() -> None:
    fake = FakeLUN()
    dev = _dev(fake)
    await asyncio.gather(*(dev.write(1024 + 4 * i, bytes([i + 1]) * 4) for i in range(128)))
    assert fake.disk[1024:1536] == b"".join(bytes([i + 1]) * 4 for i in range(128))


async def test_out_of_range_is_value_error() -> None:
    dev = _dev(FakeLUN())
    with pytest.raises(ValueError, match="outside the device"):
        await dev.read(dev.size - 1, 2)
    with pytest.raises(ValueError, match="outside the device"):
        await dev.write(-1, b"x")


async def test_discard_only_whole_blocks_and_unsupported() -> None:
    fake = FakeLUN()
    fake.disk[:] = b"\x55" * len(fake.disk)
    dev = _dev(fake)
    assert await dev.discard(100, 2000) == 3 * BS  # blocks 1..3 inside 100..2100
    assert fake.unmaps == [(1, 3)]
    assert fake.disk[:BS] == b"\x55" * BS and fake.disk[4 * BS : 5 * BS] == b"\x55" * BS
    assert await dev.discard(10, 20) == 0  # no whole block
    plain = FakeLUN(unmap_supported=False)
    pdev = _dev(plain)
    assert await pdev.discard(0, 4 * BS) == 0
    assert await pdev.discard(0, 4 * BS) == 0  # remembered, not retried


async def test_discard_splits_at_max_unmap_blocks() -> None:
    # Block Limits' MAXIMUM UNMAP LBA COUNT (SBC-3 §6.6.4) caps each descriptor;
    # from_session passes it in, here it is given directly.
    fake = FakeLUN()
    dev = BlockDevice(cast(LUN, fake), max_unmap_blocks=2)
    assert await dev.discard(0, 5 * BS) == 5 * BS
    assert sorted(fake.unmaps) == [(0, 2), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="max_unmap_blocks"):
        BlockDevice(cast(LUN, fake), max_unmap_blocks=0)


async def test_write_zeroes_and_flush() -> None:
    fake = FakeLUN()
    fake.disk[:] = b"\x77" * len(fake.disk)
    dev = _dev(fake)
    await dev.write_zeroes(300, 2000)
    model = bytearray(b"\x77" * len(fake.disk))
    model[300:2300] = bytes(2000)
    assert fake.disk == model
    await dev.flush()
    assert fake.syncs == 1


_ops = st.lists(
    st.tuples(st.sampled_from(["w", "r", "d", "z"]), st.integers(0, BLOCKS * BS - 1),
              st.integers(0, 6 * BS), st.integers(0, 255)),
    min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_random_operations_match_model(ops: list[tuple[str, int, int, int]]) -> None:
    async def body() -> None:
        fake = FakeLUN()
        dev = _dev(fake, max_transfer=2 * BS)
        model = bytearray(len(fake.disk))
        for kind, off, n, fill in ops:
            n = min(n, dev.size - off)
            if kind == "w":
                await dev.write(off, bytes([fill]) * n)
                model[off : off + n] = bytes([fill]) * n
            elif kind == "d":
                first, last = -(-off // BS), (off + n) // BS
                await dev.discard(off, n)
                if first < last:
                    model[first * BS : last * BS] = bytes((last - first) * BS)
            elif kind == "z":
                await dev.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                assert await dev.read(off, n) == model[off : off + n]
        assert fake.disk == model

    asyncio.run(body())


def test_options_from_url() -> None:
    host, port, target, lun, opts = options_from_url(
        "iscsi://bob%s3cret-secret@[::1]:3261/iqn.2024-01.org.x:disk/3"
        "?target_user=t&target_password=tpass-tpass-1")
    assert (host, port, target, lun) == ("::1", 3261, "iqn.2024-01.org.x:disk", 3)
    assert (opts.chap_user, opts.chap_secret) == ("bob", "s3cret-secret")
    assert (opts.target_chap_user, opts.target_chap_secret) == ("t", "tpass-tpass-1")
    with pytest.raises(InitiatorError, match="names no target"):
        options_from_url("iscsi://host")


def test_capacity_size_and_result_good() -> None:
    assert Capacity(10, 4096, 4096).size == 40960
    assert ScsiResult(0).good and not ScsiResult(2).good


def test_check_condition_is_typed_with_names() -> None:
    # Fixed-format sense: ILLEGAL REQUEST, LBA OUT OF RANGE (21h/00h).
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    with pytest.raises(SCSICheckCondition) as info:
        check(ScsiResult(2, sense), "READ(16)")
    exc = info.value
    assert (exc.key, exc.asc, exc.ascq) == (5, 0x21, 0)
    assert exc.key_name == "ILLEGAL REQUEST"
    assert "out of range" in exc.asc_name.lower()
    assert str(exc).startswith("READ(16): CHECK CONDITION: ILLEGAL REQUEST")
    # Descriptor format (72h): key in byte 1.
    desc = bytes([0x72, 6, 0x29, 0, 0, 0, 0, 0])
    with pytest.raises(SCSICheckCondition) as info:
        check(ScsiResult(2, desc), "TUR")
    assert info.value.key_name == "UNIT ATTENTION"
    with pytest.raises(SCSIStatusError, match="RESERVATION CONFLICT"):
        check(ScsiResult(0x18), "WRITE")
    undecodable = SCSICheckCondition(b"\x01\x02", "X")
    assert undecodable.sense is None and "undecodable" in str(undecodable)
