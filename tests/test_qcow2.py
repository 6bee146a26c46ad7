"""qcow2 backend: interop with qemu-img/qemu-io in both directions.

Images made by qemu read bit-exact through us; images we create or write
pass ``qemu-img check`` (no corruption, no leaks) and ``qemu-img compare``
equal to a raw file holding the same data; damaged or unsupported images
are refused with a one-line BackendError.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from target.backends import qcow2, registry
from target.backends.base import BackendError, Extent
from tests.images import (
    KiB,
    MiB,
    apply_ops,
    assert_same,
    compare_with_raw,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_info,
    qemu_io,
    random_ops,
    random_raw,
    read_all,
)
from tests.tools import require_tool

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _refused(path: Path, *, read_only: bool = False, match: str = "") -> str:
    with pytest.raises(BackendError) as ei:
        registry.open_image(str(path), read_only=read_only)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    assert match in msg
    return msg


def _write_model(path: Path, model: bytes | bytearray) -> Path:
    out = path.with_suffix(".model.raw")
    out.write_bytes(model)
    return out


# -- reading what qemu wrote ---------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        ["-o", "compat=0.10"],
        ["-o", "compat=1.1"],
        ["-c"],
        ["-c", "-o", "compat=0.10,cluster_size=4096"],
        ["-o", "cluster_size=512"],
        ["-o", "cluster_size=2M"],
        ["-o", "refcount_bits=1"],
        ["-o", "refcount_bits=64,cluster_size=16k"],
    ],
    ids=lambda o: " ".join(o),
)
def test_reads_qemu_converted_image(tmp_path: Path, opts: list[str]) -> None:
    raw = tmp_path / "src.raw"
    data = random_raw(raw, SIZE, seed=1)
    img_path = tmp_path / "a.qcow2"
    qemu_img("convert", "-O", "qcow2", *opts, raw, img_path)
    assert registry.detect(str(img_path)) == "qcow2"
    with registry.open_image(str(img_path), read_only=True) as img:
        assert img.size == SIZE
        assert_same(img, data)
        # Unaligned, cluster-straddling reads too.
        assert bytes(img.read(65536 - 512, 3 * 512)) == data[65536 - 512 : 65536 + 1024]


def test_reads_qemu_io_patterns_and_zero_clusters(tmp_path: Path) -> None:
    p = tmp_path / "p.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "qcow2", "write -P 0xab 0 100k", "write -P 0xcd 1M 64k", "write -z 1M 32k", "write -P 0x01 3M 512")
    expected = bytearray(4 * MiB)
    expected[0 : 100 * KiB] = b"\xab" * (100 * KiB)
    expected[MiB : MiB + 64 * KiB] = b"\xcd" * (64 * KiB)
    expected[MiB : MiB + 32 * KiB] = bytes(32 * KiB)
    expected[3 * MiB : 3 * MiB + 512] = b"\x01" * 512
    with registry.open_image(str(p)) as img:
        assert_same(img, expected)
        ext = list(img.extents(0, img.size))
        assert ext[0] == Extent(0, 128 * KiB, True)
        assert Extent(128 * KiB, MiB - 128 * KiB, False) == ext[1]


# -- writing: qemu checks what we did -----------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"compat": "0.10"}, {"cluster_size": "512"}, {"cluster_size": "4096", "refcount_bits": "1"},
     {"cluster_size": "2M"}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_created_image_random_writes_pass_qemu_check(tmp_path: Path, options: dict[str, str]) -> None:
    p = tmp_path / "ours.qcow2"
    size = 16 * MiB
    registry.create_image(str(p), "qcow2", size, options=options)
    qemu_check(p, "qcow2")
    info = qemu_info(p)
    assert info["virtual-size"] == size
    model = bytearray(size)
    with registry.open_image(str(p)) as img:
        apply_ops(random_ops(size, seed=7, count=120, max_len=384 * KiB), img, model)
        img.discard(MiB, 3 * MiB + 512)
        model[MiB : 4 * MiB + 512] = bytes(3 * MiB + 512)
        img.write_zeroes(9 * MiB + 4096, 100 * KiB)
        model[9 * MiB + 4096 : 9 * MiB + 4096 + 100 * KiB] = bytes(100 * KiB)
        assert_same(img, model)
        img.flush()
    qemu_check(p, "qcow2")
    qemu_compare(p, "qcow2", _write_model(p, model))


def test_refcount_table_grows(tmp_path: Path) -> None:
    # 512-byte clusters: one refcount-table cluster covers only 8 MiB of
    # file, so filling 24 MiB must move the table (twice).
    p = tmp_path / "grow.qcow2"
    size = 24 * MiB
    registry.create_image(str(p), "qcow2", size, options={"cluster_size": "512"})
    model = bytearray(os.urandom(size))
    with registry.open_image(str(p)) as img:
        for off in range(0, size, 4 * MiB):
            img.write(off, memoryview(model)[off : off + 4 * MiB])
    report = qemu_check(p, "qcow2")
    assert report["allocated-clusters"] == size // 512
    qemu_compare(p, "qcow2", _write_model(p, model))


def test_writes_into_qemu_made_compressed_image(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = random_raw(raw, SIZE, seed=2)
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", raw, p)
    model = bytearray(data)
    with registry.open_image(str(p)) as img:
        # Partial overwrites of compressed clusters copy them first, and the
        # old compressed clusters' references are dropped (check: no leaks).
        apply_ops(random_ops(SIZE, seed=3, count=60), img, model)
        img.discard(4 * MiB, 2 * MiB)
        model[4 * MiB : 6 * MiB] = bytes(2 * MiB)
        assert_same(img, model)
    qemu_check(p, "qcow2")
    qemu_compare(p, "qcow2", _write_model(p, model))


def test_huge_sparse_disk_discard_is_cheap(tmp_path: Path) -> None:
    p = tmp_path / "huge.qcow2"
    size = 1 << 40
    registry.create_image(str(p), "qcow2", size)
    with registry.open_image(str(p)) as img:
        img.write(size - 4096, b"\x0c" * 4096)
        img.write(0, b"\x0d" * 512)
        img.discard(0, size)  # skips the 2047 L1 entries without a table
        assert bytes(img.read(size - 8192, 8192)) == bytes(8192)
        assert bytes(img.read(0, 512)) == bytes(512)
        assert list(img.extents(0, size)) == [Extent(0, size, False)]
    qemu_check(p, "qcow2")


def test_create_options_refused(tmp_path: Path) -> None:
    p = str(tmp_path / "x.qcow2")
    for opts in ({"cluster_size": "1000"}, {"compat": "2.0"}, {"lazy_refcounts": "on"}, {"bogus": "1"},
                 {"compat": "0.10", "refcount_bits": "8"}):
        with pytest.raises(BackendError):
            registry.create_image(p, "qcow2", MiB, options=opts)


# -- backing chains --------------------------------------------------------------


def test_reads_qemu_made_chain_over_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative backing names, as qemu-img stores them
    random_raw(tmp_path / "base.raw", SIZE, seed=4)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2")
    qemu_io("mid.qcow2", "qcow2", "write -P 0x11 1M 100k", "write -z 3M 128k", "discard 5M 64k")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "qcow2", "write -P 0x22 1050k 10k")
    qemu_img("convert", "-O", "raw", "top.qcow2", "flat.raw")
    monkeypatch.chdir("/")  # names resolve against the image, not the cwd
    with registry.open_image(str(tmp_path / "top.qcow2"), read_only=True) as img:
        assert isinstance(img, registry.ImageBackend)
        assert [n.info().format for n in img.chain() if isinstance(n, registry.ImageBackend)] == [
            "qcow2", "qcow2", "raw"]
        assert img.info().backing == "mid.qcow2"
        assert img.info().backing_format == "qcow2"
        compare_with_raw(img, tmp_path / "flat.raw")
        # Unallocated in top and mid but present in the raw base: mapped.
        assert list(img.extents(6 * MiB, 64 * KiB)) == [Extent(6 * MiB, 64 * KiB, True)]
        # Zero cluster in mid hides the base: unmapped.
        assert list(img.extents(3 * MiB, 128 * KiB)) == [Extent(3 * MiB, 128 * KiB, False)]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_our_chain_read_by_qemu(tmp_path: Path, compat: str) -> None:
    base = tmp_path / "base.qcow2"
    registry.create_image(str(base), "qcow2", SIZE)
    model = bytearray(SIZE)
    with registry.open_image(str(base)) as img:
        apply_ops(random_ops(SIZE, seed=11, count=40), img, model)
    top = tmp_path / "top.qcow2"
    registry.create_image(str(top), "qcow2", 0, backing="base.qcow2", options={"compat": compat})
    info = qemu_info(top)
    assert info["backing-filename"] == "base.qcow2" and info["virtual-size"] == SIZE
    with registry.open_image(str(top)) as img:
        assert isinstance(img, registry.ImageBackend) and img.parent is not None
        assert_same(img, model)
        # Sector writes inside clusters the base holds: copy-on-write.
        apply_ops(random_ops(SIZE, seed=12, count=80, max_len=20 * KiB), img, model)
        img.discard(2 * MiB, MiB + 4096)
        model[2 * MiB : 3 * MiB + 4096] = bytes(MiB + 4096)
        assert_same(img, model)
    qemu_check(top, "qcow2")
    qemu_check(base, "qcow2")
    qemu_compare(top, "qcow2", _write_model(top, model))


def test_qcow2_over_raw_base_ours(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    data = random_raw(base, SIZE, seed=5)
    top = tmp_path / "top.qcow2"
    registry.create_image(str(top), "qcow2", 0, backing=str(base))
    assert qemu_info(top)["backing-filename-format"] == "raw"
    model = bytearray(data)
    with registry.open_image(str(top)) as img:
        assert_same(img, model)
        apply_ops(random_ops(SIZE, seed=6, count=50), img, model)
        assert_same(img, model)
    assert base.read_bytes() == data  # the base is never written
    qemu_check(top, "qcow2")
    qemu_compare(top, "qcow2", _write_model(top, model))


def test_smaller_backing_file_reads_zero_past_its_end(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    data = random_raw(base, MiB, seed=8, holes=False)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top, "2M")
    with registry.open_image(str(top)) as img:
        assert_same(img, data + bytes(MiB))
        img.write(MiB - 512, b"\x07" * 1024)
    qemu_check(top, "qcow2")
    expected = bytearray(data + bytes(MiB))
    expected[MiB - 512 : MiB + 512] = b"\x07" * 1024
    qemu_compare(top, "qcow2", _write_model(top, expected))


def test_missing_backing_file_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top)
    base.unlink()
    _refused(top, match="backing file")


# -- refusals ----------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    return p


def test_refuses_bad_version(small: Path) -> None:
    _patch(small, 4, struct.pack(">I", 1))
    assert registry.detect(str(small)) == "qcow2"  # never served as raw
    _refused(small, match="version 1")


def test_refuses_huge_cluster_bits(small: Path) -> None:
    _patch(small, 20, struct.pack(">I", 30))
    _refused(small, match="cluster_bits")


def test_refuses_encryption(small: Path) -> None:
    _patch(small, 32, struct.pack(">I", 2))
    _refused(small, read_only=True, match="LUKS")


def test_refuses_unknown_incompatible_bit(small: Path) -> None:
    _patch(small, 72, struct.pack(">Q", 1 << 40))
    _refused(small, read_only=True, match="bit 40")


def test_refuses_extended_l2(tmp_path: Path) -> None:
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", p, "1M")
    _refused(p, read_only=True, match="extended L2")


def test_refuses_zstd_without_module(tmp_path: Path) -> None:
    p = tmp_path / "z.qcow2"
    try:
        qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M")
    except AssertionError:
        pytest.skip("this qemu-img was built without zstd")
    if importlib.util.find_spec("zstandard") is None:
        _refused(p, read_only=True, match="zstd")


def test_refuses_truncated_and_garbage(tmp_path: Path, small: Path) -> None:
    data = small.read_bytes()
    t = tmp_path / "t.qcow2"
    t.write_bytes(data[:100])
    _refused(t, read_only=True)
    g = tmp_path / "g.qcow2"
    g.write_bytes(b"QFI\xfb")
    _refused(g, read_only=True)
    # L1 table pointing past the end of the file.
    _patch(small, 40, struct.pack(">Q", 1 << 40))
    _refused(small, read_only=True, match="L1")


def test_dirty_and_corrupt_open_read_only_only(small: Path) -> None:
    for bit, word in ((1, "dirty"), (2, "corrupt")):
        _patch(small, 72, struct.pack(">Q", bit))
        _refused(small, match=word)
        with registry.open_image(str(small), read_only=True) as img:
            assert bytes(img.read(0, 512)) == bytes(512)
            assert isinstance(img, registry.ImageBackend) and img.info().extra.get(word) == "true"
            with pytest.raises(BackendError):
                img.write(0, bytes(512))


def test_snapshots_read_only(small: Path) -> None:
    qemu_io(small, "qcow2", "write -P 0x5a 0 64k")
    qemu_img("snapshot", "-c", "snap1", small)
    qemu_io(small, "qcow2", "write -P 0x6b 0 4k")
    _refused(small, match="snapshot")
    with registry.open_image(str(small), read_only=True) as img:
        assert bytes(img.read(0, 8192)) == b"\x6b" * 4096 + b"\x5a" * 4096


def test_autoclear_bits_cleared_on_write(small: Path) -> None:
    qemu_img("bitmap", "--add", small, "b0")
    with registry.open_image(str(small)) as img:
        img.write(0, b"\x01" * 4096)
    with open(small, "rb") as f:
        f.seek(88)
        assert f.read(8) == bytes(8)
    # qemu now treats the bitmaps as stale: their clusters count as leaks
    # (what any writer without bitmap support leaves), never as corruption.
    report = json.loads(
        subprocess.run([require_tool("qemu-img"), "check", "--output=json", str(small)],
                       check=False, capture_output=True, text=True).stdout
    )
    assert report.get("corruptions", 0) == 0 and report["check-errors"] == 0


def test_io_outside_disk_refused(small: Path) -> None:
    with registry.open_image(str(small)) as img:
        with pytest.raises(BackendError):
            img.read(MiB - 512, 1024)
        with pytest.raises(BackendError):
            img.write(-512, bytes(512))


def test_write_through_uses_odsync(small: Path) -> None:
    img = qcow2.open(str(small), write_through=True)
    try:
        assert os.O_DSYNC & fcntl.fcntl(img._fd, fcntl.F_GETFL)
        img.write(0, b"\x02" * 512)
        assert bytes(img.read(0, 512)) == b"\x02" * 512
    finally:
        img.close()
    qemu_check(small, "qcow2")


def test_info_fields(small: Path) -> None:
    with registry.open_image(str(small), read_only=True) as img:
        assert isinstance(img, qcow2.Qcow2Image)
        info = img.info()
        assert info.format == "qcow2" and info.virtual_size == MiB
        assert info.subformat == "1.1" and info.extra["cluster_size"] == "65536"
        assert info.backing is None and img.parent is None
        assert read_all(img) == bytes(MiB)


def test_contiguous_reads_are_views_of_the_file(tmp_path: Path) -> None:
    """A read that is one contiguous stretch of the image file comes back
    as a view of its map, no copy (mapped.py): qcow2 never shrinks or moves
    data in its file while open, so the view stays valid while it is sent."""
    from target.backends.registry import create_image, open_image

    p = tmp_path / "v.qcow2"
    create_image(str(p), "qcow2", 4 << 20)
    with open_image(str(p), read_only=False) as img:
        img.write(0, b"\x5a" * (1 << 20))
        data = img.read(0, 1 << 20)
        assert isinstance(data, memoryview) and bytes(data) == b"\x5a" * (1 << 20)
        img.write(0, b"\x11" * 512)  # the page cache is shared: the view sees it
        assert bytes(img.read(0, 512)) == b"\x11" * 512
        # Unallocated clusters still read as zeroes (no view of a hole).
        assert bytes(img.read(2 << 20, 65536)) == bytes(65536)
        del data
