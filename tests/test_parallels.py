"""Parallels expandable images: interop with qemu-img in both directions,
the old sector-addressed variant, and refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from target.backends import parallels, registry
from target.backends.base import BackendError, Extent
from tests.images import (
    KiB,
    MiB,
    apply_ops,
    assert_same,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_info,
    qemu_io,
    random_ops,
    random_raw,
)

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _refused(path: Path, *, read_only: bool = False, match: str = "") -> None:
    with pytest.raises(BackendError) as ei:
        registry.open_image(str(path), read_only=read_only)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and match in msg


def _model_file(path: Path, model: bytes | bytearray) -> Path:
    out = path.with_suffix(".model.raw")
    out.write_bytes(model)
    return out


@pytest.mark.parametrize("cluster", ["1M", "64k"])
def test_reads_and_writes_qemu_converted_image(tmp_path: Path, cluster: str) -> None:
    raw = tmp_path / "src.raw"
    data = random_raw(raw, SIZE, seed=1)
    p = tmp_path / "a.hds"
    qemu_img("convert", "-O", "parallels", "-o", f"cluster_size={cluster}", raw, p)
    assert registry.detect(str(p)) == "parallels"
    model = bytearray(data)
    with registry.open_image(str(p)) as img:
        assert_same(img, data)
        apply_ops(random_ops(SIZE, seed=2, count=80, max_len=200 * KiB), img, model)
        img.discard(2 * MiB, MiB + 4096)
        model[2 * MiB : 3 * MiB + 4096] = bytes(MiB + 4096)
        assert_same(img, model)
    qemu_check(p, "parallels")
    qemu_compare(p, "parallels", _model_file(p, model))


@pytest.mark.parametrize("cluster", [None, "65536", "32256"])  # 32256 = 63 sectors
def test_created_image_passes_qemu_check(tmp_path: Path, cluster: str | None) -> None:
    p = tmp_path / "ours.hds"
    registry.create_image(str(p), "parallels", SIZE, options={"cluster_size": cluster} if cluster else None)
    info = qemu_info(p)
    assert info["format"] == "parallels" and info["virtual-size"] == SIZE
    qemu_check(p, "parallels")
    model = bytearray(SIZE)
    with registry.open_image(str(p)) as img:
        assert isinstance(img, parallels.ParallelsImage)
        apply_ops(random_ops(SIZE, seed=3, count=100), img, model)
        # Discarding the tail gives the space back (the file shrinks).
        img.discard(SIZE - MiB, MiB)
        model[SIZE - MiB :] = bytes(MiB)
        assert_same(img, model)
        ext = list(img.extents(SIZE - MiB, MiB))
        # Only a cluster straddling the start of the range stays mapped.
        assert ext[-1].mapped is False and ext[-1].offset + ext[-1].length == SIZE
        assert sum(e.length for e in ext if e.mapped) < img.cluster_size
    qemu_check(p, "parallels")
    qemu_compare(p, "parallels", _model_file(p, model))


def test_qemu_io_writes_read_back(tmp_path: Path) -> None:
    p = tmp_path / "q.hds"
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", p, "4M")
    qemu_io(p, "parallels", "write -P 0x3c 100k 200k", "write -P 0x4d 3M 512")
    expected = bytearray(4 * MiB)
    expected[100 * KiB : 300 * KiB] = b"\x3c" * (200 * KiB)
    expected[3 * MiB : 3 * MiB + 512] = b"\x4d" * 512
    with registry.open_image(str(p), read_only=True) as img:
        assert_same(img, expected)
        ext = list(img.extents(0, img.size))
        assert ext[0] == Extent(0, 64 * KiB, False)
        assert ext[1] == Extent(64 * KiB, 256 * KiB, True)


def test_old_sector_addressed_variant(tmp_path: Path) -> None:
    # Rewrite a qemu-made image as "WithoutFreeSpace": BAT in sectors.
    p = tmp_path / "old.hds"
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", p, "1M")
    qemu_io(p, "parallels", "write -P 0x77 64k 64k")
    raw = bytearray(p.read_bytes())
    tracks = struct.unpack_from("<I", raw, 28)[0]
    nb_bat = struct.unpack_from("<I", raw, 32)[0]
    bat = list(struct.unpack_from(f"<{nb_bat}I", raw, 64))
    struct.pack_into(f"<{nb_bat}I", raw, 64, *(e * tracks for e in bat))
    raw[:16] = parallels.MAGIC_OLD
    p.write_bytes(raw)
    with registry.open_image(str(p)) as img:
        assert bytes(img.read(64 * KiB, 64 * KiB)) == b"\x77" * (64 * KiB)
        img.write(0, b"\x01" * 512)
        assert bytes(img.read(0, 1024)) == b"\x01" * 512 + bytes(512)
    with registry.open_image(str(p), read_only=True) as img:
        assert bytes(img.read(0, 512)) == b"\x01" * 512
        assert bytes(img.read(64 * KiB, 512)) == b"\x77" * 512


def test_in_use_flag_set_while_open_and_restored(tmp_path: Path) -> None:
    p = tmp_path / "u.hds"
    registry.create_image(str(p), "parallels", MiB)
    img = registry.open_image(str(p))
    try:
        assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == parallels.IN_USE
        # A second writer is refused: by the image lock, before the format's
        # own in-use flag is even read (that flag guards against programs
        # that do not lock).
        _refused(p, match="already open in this process")
    finally:
        img.close()
    assert struct.unpack_from("<I", p.read_bytes(), 44)[0] == 0
    _patch(p, 44, struct.pack("<I", parallels.IN_USE))
    with registry.open_image(str(p), read_only=True) as ro:
        assert bytes(ro.read(0, 512)) == bytes(512)


def test_refusals(tmp_path: Path) -> None:
    p = tmp_path / "r.hds"
    qemu_img("create", "-f", "parallels", "-o", "cluster_size=64k", p, "1M")
    qemu_io(p, "parallels", "write -P 1 0 128k")
    good = p.read_bytes()

    _patch(p, 16, struct.pack("<I", 3))
    _refused(p, read_only=True, match="version 3")
    p.write_bytes(good)
    _patch(p, 28, struct.pack("<I", 0))
    _refused(p, read_only=True, match="cluster size")
    p.write_bytes(good)
    _patch(p, 68, struct.pack("<I", 1))  # BAT[1] == BAT[0]
    _refused(p, read_only=True, match="shares")
    p.write_bytes(good)
    _patch(p, 64, struct.pack("<I", 0))  # unallocating a cluster: still valid
    with registry.open_image(str(p), read_only=True) as img:
        assert bytes(img.read(0, 512)) == bytes(512)
    p.write_bytes(good)
    _patch(p, 36, struct.pack("<Q", 1 << 40))  # more sectors than the BAT maps
    _refused(p, read_only=True, match="cannot map")
    p.write_bytes(good[:40])
    _refused(p, read_only=True, match="too short")
    p.write_bytes(good)
    _patch(p, 56, struct.pack("<Q", 0x80))  # a format extension cluster
    _refused(p, match="format extension")


def test_descriptor_xml_refused(tmp_path: Path) -> None:
    d = tmp_path / "DiskDescriptor.xml"
    d.write_text('<?xml version="1.0"?>\n<Parallels_disk_image Version="1.0">\n</Parallels_disk_image>\n')
    assert registry.detect(str(d)) == "parallels"
    _refused(d, read_only=True, match="DiskDescriptor")


def test_create_refusals(tmp_path: Path) -> None:
    p = str(tmp_path / "x.hds")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    with pytest.raises(BackendError, match="backing"):
        registry.create_image(p, "parallels", MiB, backing=str(base))
    with pytest.raises(BackendError, match="cluster_size"):
        registry.create_image(p, "parallels", MiB, options={"cluster_size": "1000"})
    with pytest.raises(BackendError, match="unknown"):
        registry.create_image(p, "parallels", MiB, options={"foo": "1"})
