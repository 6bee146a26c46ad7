"""Raw file / block device backend, and the memory backend."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from target.backends import raw, registry
from target.backends.base import SECTOR, BackendError, Extent
from target.backends.memory import MemoryBackend
from target.backends.raw import RawFileBackend
from tests.images import KiB, MiB, assert_same, read_all

# -- raw files -------------------------------------------------------------------


def _new(tmp_path: Path, size: int = 4 * MiB, **kw: bool) -> RawFileBackend:
    p = tmp_path / "disk.raw"
    raw.create(str(p), size)
    return RawFileBackend(str(p), **kw)


def _supports_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 8192, 0)
        ok = raw.punch_hole(fd, 0, 4096)
        return ok and os.lseek(fd, 0, os.SEEK_DATA) >= 4096
    except OSError:
        return False
    finally:
        os.close(fd)


def test_create_is_sparse_and_reads_zero(tmp_path: Path) -> None:
    with _new(tmp_path) as b:
        assert isinstance(b, RawFileBackend)
        assert b.size == 4 * MiB and not b.read_only and b.thin and b.zero_after_discard
        assert os.stat(b.path).st_blocks == 0
        assert read_all(b) == bytes(4 * MiB)
        assert list(b.extents(0, b.size)) == [Extent(0, 4 * MiB, False)]


def test_reads_are_views_of_the_map(tmp_path: Path) -> None:
    with _new(tmp_path) as b:
        b.write(4096, b"\xaa" * 8192)
        v = b.read(4096, 8192)
        assert isinstance(v, memoryview) and v.readonly is False
        assert bytes(v) == b"\xaa" * 8192
        b.write(4096, b"\xbb" * 512)
        # A view sees later writes (the contract: do not keep it past one).
        assert bytes(v[:512]) == b"\xbb" * 512
        del v


def test_read_only_map_and_refused_writes(tmp_path: Path) -> None:
    _new(tmp_path).close()
    with RawFileBackend(str(tmp_path / "disk.raw"), read_only=True) as b:
        v = b.read(0, 512)
        assert isinstance(v, memoryview) and v.readonly
        del v
        calls: list[Callable[[], object]] = [
            lambda: b.write(0, bytes(512)), lambda: b.discard(0, 512), lambda: b.write_zeroes(0, 512)]
        for call in calls:
            with pytest.raises(BackendError, match="read-only"):
                call()
        b.flush()  # nothing to do, no error


def test_file_shrinking_under_us_does_not_crash(tmp_path: Path) -> None:
    with _new(tmp_path, size=MiB) as b:
        b.write(0, b"\x11" * MiB)
        os.truncate(b.path, 64 * KiB)
        # Past the new end: zeroes via pread, not SIGBUS through the map.
        data = b.read(0, MiB)
        assert bytes(data[: 64 * KiB]) == b"\x11" * (64 * KiB)
        assert bytes(data[64 * KiB :]) == bytes(MiB - 64 * KiB)


def test_file_growing_is_remapped(tmp_path: Path) -> None:
    p = tmp_path / "g.raw"
    p.write_bytes(b"\x01" * 4096)
    with RawFileBackend(str(p)) as b:
        first = b.read(0, 512)
        with open(p, "ab") as f:
            f.write(b"\x02" * 4096)
        # The size served is fixed at open, but the map follows the file.
        assert bytes(b.read(0, 4096)) == b"\x01" * 4096
        assert isinstance(b.read(0, 512), memoryview)
        del first


def test_odd_file_size_rounds_up(tmp_path: Path) -> None:
    p = tmp_path / "odd.raw"
    p.write_bytes(b"\x09" * 1000)
    with RawFileBackend(str(p)) as b:
        assert b.size == 1024
        assert bytes(b.read(512, 512)) == b"\x09" * 488 + bytes(24)


def test_discard_punches_holes_visible_in_extents(tmp_path: Path) -> None:
    with _new(tmp_path) as b:
        if not _supports_holes(Path(b.path)):
            pytest.skip("file system cannot punch holes")
        b.write(0, os.urandom(4 * MiB))
        blocks = os.stat(b.path).st_blocks
        b.discard(MiB, MiB)
        assert os.stat(b.path).st_blocks < blocks
        assert list(b.extents(0, b.size)) == [
            Extent(0, MiB, True),
            Extent(MiB, MiB, False),
            Extent(2 * MiB, 2 * MiB, True),
        ]
        assert bytes(b.read(MiB, MiB)) == bytes(MiB)
        # A range starting in a hole and ending in data.
        assert list(b.extents(MiB + 4096, MiB)) == [
            Extent(MiB + 4096, MiB - 4096, False),
            Extent(2 * MiB, 4096, True),
        ]


def test_write_zeroes(tmp_path: Path) -> None:
    with _new(tmp_path) as b:
        b.write(0, b"\xff" * (2 * MiB))
        b.write_zeroes(4096, 64 * KiB)
        expected = bytearray(b"\xff" * (2 * MiB) + bytes(2 * MiB))
        expected[4096 : 4096 + 64 * KiB] = bytes(64 * KiB)
        assert_same(b, expected)


def test_write_through_uses_odsync_and_flush(tmp_path: Path) -> None:
    with _new(tmp_path, write_through=True) as b:
        assert fcntl.fcntl(b.fileno(), fcntl.F_GETFL) & os.O_DSYNC
        b.write(512, b"\x33" * 512)
        b.flush()
        assert os.pread(b.fileno(), 512, 512) == b"\x33" * 512


def test_out_of_range_refused(tmp_path: Path) -> None:
    with _new(tmp_path, size=MiB) as b:
        calls: list[Callable[[], object]] = [
            lambda: b.read(MiB, 512), lambda: b.write(MiB - 512, bytes(1024)),
            lambda: b.read(-512, 512), lambda: list(b.extents(0, MiB + 512))]
        for call in calls:
            with pytest.raises(BackendError, match="outside"):
                call()


def test_close_is_idempotent_with_live_view(tmp_path: Path) -> None:
    b = _new(tmp_path)
    b.write(0, b"\x05" * 512)
    v = b.read(0, 512)
    b.close()
    b.close()
    assert bytes(v) == b"\x05" * 512  # the map lives as long as the view


def test_info_and_registry_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "r.img"
    registry.create_image(str(p), "raw", MiB, options={"preallocation": "falloc"})
    assert os.stat(p).st_blocks * 512 >= MiB
    with registry.open_image(str(p)) as b:
        assert isinstance(b, RawFileBackend)
        info = b.info()
        assert info.format == "raw" and info.virtual_size == MiB and info.subformat == "file"
        assert info.allocated_size >= MiB
    for opts in ({"preallocation": "bogus"}, {"nope": "1"}):
        with pytest.raises(BackendError):
            registry.create_image(str(p), "raw", MiB, options=opts)


def test_not_a_file_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="neither"):
        RawFileBackend("/dev/null")
    with pytest.raises(BackendError, match="no such file"):
        RawFileBackend(str(tmp_path / "missing"))


def test_block_device(tmp_path: Path) -> None:
    losetup = shutil.which("losetup") or "/sbin/losetup"
    if os.geteuid() != 0 or not os.path.exists(losetup):
        pytest.skip("needs root and losetup for a loop device")
    img = tmp_path / "loop.img"
    img.write_bytes(bytes(4 * MiB))
    proc = subprocess.run([losetup, "--find", "--show", str(img)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        with RawFileBackend(dev) as b:
            assert b.size == 4 * MiB and not b.zero_after_discard
            b.write(MiB, b"\x44" * 4096)
            b.flush()
            assert bytes(b.read(MiB, 4096)) == b"\x44" * 4096
            assert list(b.extents(0, b.size)) == [Extent(0, 4 * MiB, True)]
            b.write_zeroes(MiB, 4096)
            assert bytes(b.read(MiB, 4096)) == bytes(4096)
            b.discard(0, MiB)  # BLKDISCARD or nothing; must not raise
            assert b.info().subformat == "block-device"
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


# -- memory backend --------------------------------------------------------------


def test_memory_sparse_and_thin() -> None:
    m = MemoryBackend(1 << 40)  # 1 TiB costs nothing until written
    assert m.size == 1 << 40 and m.thin and m.zero_after_discard and m.allocated == 0
    m.write((1 << 40) - 4096, b"\x01" * 4096)
    assert m.allocated == 64 * KiB
    assert bytes(m.read((1 << 40) - 8192, 8192)) == bytes(4096) + b"\x01" * 4096
    assert list(m.extents((1 << 40) - 128 * KiB, 128 * KiB)) == [
        Extent((1 << 40) - 128 * KiB, 64 * KiB, False),
        Extent((1 << 40) - 64 * KiB, 64 * KiB, True),
    ]
    m.discard((1 << 40) - 64 * KiB, 64 * KiB)
    assert m.allocated == 0


def test_memory_partial_discard_zeroes_and_frees_empty_chunks() -> None:
    m = MemoryBackend(MiB)
    m.write(0, b"\x07" * 1024)
    m.discard(512, 512)
    assert bytes(m.read(0, 1024)) == b"\x07" * 512 + bytes(512)
    assert m.allocated == 64 * KiB
    m.write_zeroes(0, 512)
    assert m.allocated == 0


def test_memory_validation() -> None:
    with pytest.raises(BackendError):
        MemoryBackend(1000)
    with pytest.raises(BackendError):
        MemoryBackend(4096, block_size=1000)
    m = MemoryBackend(4096, block_size=4096)
    assert m.block_size == 4096
    with pytest.raises(BackendError, match="outside"):
        m.read(4096, 512)
    m.close()
    with pytest.raises(BackendError, match="closed"):
        m.read(0, 512)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["write", "discard", "zero"]),
            st.integers(0, 511),  # sector
            st.integers(1, 300),  # sectors
            st.integers(0, 255),  # fill byte
        ),
        max_size=25,
    )
)
def test_memory_matches_model(ops: list[tuple[str, int, int, int]]) -> None:
    size = 512 * SECTOR
    m = MemoryBackend(size, chunk_size=4096)
    model = bytearray(size)
    for op, sector, count, fill in ops:
        off = sector * SECTOR
        n = min(count * SECTOR, size - off)
        if op == "write":
            m.write(off, bytes([fill]) * n)
            model[off : off + n] = bytes([fill]) * n
        elif op == "discard":
            m.discard(off, n)
            model[off : off + n] = bytes(n)
        else:
            m.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
    assert bytes(m.read(0, size)) == bytes(model)
    ext = list(m.extents(0, size))
    assert sum(e.length for e in ext) == size
    for e in ext:
        if not e.mapped:
            assert model[e.offset : e.offset + e.length] == bytes(e.length)
