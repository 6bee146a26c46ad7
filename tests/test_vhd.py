"""VHD backend: qemu-made (vpc) images read bit-exact, ours compared by
qemu (qemu-img has no check for vpc), CHS geometry, differencing disks,
checksums and damage refused."""

from __future__ import annotations

import os
import struct
from contextlib import closing
from pathlib import Path

import pytest

from target.backends import registry, vhd, vhd_format
from target.backends.base import BackendError, Extent
from tests.images import (
    MiB,
    apply_ops,
    assert_same,
    compare_with_raw,
    qemu_compare,
    qemu_img,
    qemu_info,
    qemu_io,
    random_ops,
    random_raw,
)

SIZE = vhd_format.chs_size(9 * MiB)  # what qemu and Virtual PC agree on


def test_chs_geometry_matches_spec_examples() -> None:
    assert vhd_format.chs_geometry(65535 * 16 * 255) == (65535, 16, 255)
    c, h, s = vhd_format.chs_geometry(SIZE // 512)
    assert c * h * s * 512 == SIZE
    assert vhd_format.chs_size(SIZE) == SIZE
    assert vhd_format.chs_size(SIZE - 512) == SIZE  # already the smallest >= request
    assert vhd_format.chs_size(1 << 40) == 1 << 40  # beyond CHS: unchanged


@pytest.mark.interop
@pytest.mark.parametrize("mib", [9, 33, 64])
def test_chs_geometry_and_size_agree_with_qemu(tmp_path: Path, mib: int) -> None:
    q = tmp_path / "q.vhd"
    qemu_img("create", "-f", "vpc", q, f"{mib}M")
    ours = str(tmp_path / "o.vhd")
    vhd.create(ours, mib * MiB)
    assert qemu_info(q, "vpc")["virtual-size"] == qemu_info(ours, "vpc")["virtual-size"]
    qf = q.read_bytes()[-512:]
    with open(ours, "rb") as f:
        f.seek(-512, os.SEEK_END)
        of = f.read()
    assert qf[48:60] == of[48:60]  # current size and CHS geometry
    with vhd.open(ours, read_only=True) as img:
        assert img.size == qemu_info(q, "vpc")["virtual-size"]


def test_probe(tmp_path: Path) -> None:
    for kind in ("dynamic", "fixed"):
        p = str(tmp_path / f"{kind}.vhd")
        vhd.create(p, SIZE, options={"type": kind})
        with open(p, "rb") as f:
            head = f.read(65536)
        assert vhd.probe(head, p)
        assert registry.detect(p) == "vhd"  # fixed: found by its footer at the end
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(4096))
    assert not vhd.probe(bytes(4096), str(raw))


@pytest.mark.interop
@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_qemu_made_read_bit_exact(tmp_path: Path, sub: str) -> None:
    raw = tmp_path / "src.raw"
    random_raw(raw, SIZE, seed=5)
    with open(raw, "r+b") as f:  # a whole zero block stays unallocated
        f.seek(2 * MiB)
        f.write(bytes(2 * MiB))
    q = tmp_path / "q.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", raw, q)
    with closing(registry.open_image(str(q), read_only=True, fmt="vhd")) as img:
        assert img.size == SIZE and img.info().subformat == sub
        compare_with_raw(img, raw)
        if sub == "dynamic":
            assert Extent(2 * MiB, 2 * MiB, False) in list(img.extents(0, SIZE))


@pytest.mark.interop
def test_qemu_made_force_size(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    random_raw(raw, 5 * MiB, seed=6, holes=False)
    q = tmp_path / "q.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", raw, q)
    with vhd.open(str(q), read_only=True) as img:
        assert img.size == 5 * MiB  # the footer's current size
        compare_with_raw(img, raw)


@pytest.mark.interop
@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_ours_compare_equal_in_qemu(tmp_path: Path, sub: str) -> None:
    p = str(tmp_path / "o.vhd")
    vhd.create(p, 9 * MiB, options={"type": sub})
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(SIZE))
    with vhd.open(p, read_only=False) as img:
        assert img.size == SIZE
        apply_ops(random_ops(SIZE, 8, 60, max_len=3 * MiB), img, raw)
        img.flush()
    qemu_compare(p, "vpc", raw)
    qemu_io(p, "vpc", "write -P 0x7e 4m 300k")
    apply_ops([(4 * MiB, b"\x7e" * 300 * 1024)], raw)
    with vhd.open(p, read_only=True) as img:
        compare_with_raw(img, raw)


@pytest.mark.interop
def test_discard_unmaps_and_shrinks(tmp_path: Path) -> None:
    p = str(tmp_path / "d.vhd")
    vhd.create(p, SIZE)
    model = bytearray(os.urandom(SIZE))
    with vhd.open(p, read_only=False) as img:
        assert img.thin
        img.write(0, model)
        full = os.path.getsize(p)
        img.discard(2 * MiB, 2 * MiB)
        img.discard(512, 1024)
        model[2 * MiB : 4 * MiB] = bytes(2 * MiB)
        model[512:1536] = bytes(1024)
        assert_same(img, model)
        assert Extent(2 * MiB, 2 * MiB, False) in list(img.extents(0, SIZE))
    assert os.path.getsize(p) == full - 2 * MiB - 512
    raw = tmp_path / "m.raw"
    raw.write_bytes(model)
    qemu_compare(p, "vpc", raw)


def test_differencing_chain(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vhd.create(base, SIZE)
    model = bytearray(SIZE)
    with vhd.open(base, read_only=False) as img:
        apply_ops(random_ops(SIZE, 21, 20, max_len=MiB), img, model)
    sub = tmp_path / "snap"
    sub.mkdir()
    child = str(sub / "child.vhd")
    registry.create_image(child, "vhd", 0, backing="../base.vhd")
    with closing(registry.open_image(child)) as img:
        info = img.info()
        assert info.subformat == "differencing"
        with closing(registry.open_image(base, read_only=True)) as parent:
            assert info.parent_uuid == parent.info().uuid
        assert info.extra["parent_name"] == "base.vhd"
        assert_same(img, model)
        # Unaligned-in-block writes: the sector bitmap decides child vs parent.
        apply_ops(random_ops(SIZE, 22, 40, max_len=700 * 1024), img, model)
        img.write_zeroes(MiB, 4096)
        model[MiB : MiB + 4096] = bytes(4096)
        assert_same(img, model)
    with closing(registry.open_image(child, read_only=True)) as img:
        assert_same(img, model)
        assert sum(e.length for e in img.extents(0, SIZE)) == SIZE
    # A different parent with the same name: refused by its unique id.
    os.unlink(base)
    vhd.create(base, SIZE)
    with pytest.raises(BackendError, match="expected"):
        registry.open_image(child)


def test_differencing_parent_missing(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vhd.create(base, SIZE)
    child = str(tmp_path / "child.vhd")
    vhd.create(child, 0, backing=base)
    os.unlink(base)
    with pytest.raises(BackendError, match="not found"):
        vhd.open(child, read_only=True)


def test_bad_checksum_refused(tmp_path: Path) -> None:
    p = str(tmp_path / "c.vhd")
    vhd.create(p, SIZE)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        for at in (0, size - 512):
            f.seek(at + 48)
            f.write(struct.pack(">Q", 12345 * 512))  # size changed, checksum not
    with pytest.raises(BackendError, match="checksum") as exc:
        vhd.open(p, read_only=True)
    assert "\n" not in str(exc.value) and p in str(exc.value)


def test_bad_dynamic_header_checksum_refused(tmp_path: Path) -> None:
    p = str(tmp_path / "c.vhd")
    vhd.create(p, SIZE)
    with open(p, "r+b") as f:
        f.seek(512 + 32)
        f.write(struct.pack(">I", 4096))  # block size
    with pytest.raises(BackendError, match="checksum"):
        vhd.open(p, read_only=True)


def test_bad_cookie_and_truncated(tmp_path: Path) -> None:
    p = tmp_path / "x.vhd"
    p.write_bytes(b"notavhd!" + bytes(2000))
    with pytest.raises(BackendError, match="conectix"):
        vhd.open(str(p), read_only=True)
    q = str(tmp_path / "t.vhd")
    vhd.create(q, SIZE)
    with vhd.open(q, read_only=False) as img:
        img.write(4 * MiB, b"q" * 512)
    with open(q, "r+b") as f:
        f.truncate(os.path.getsize(q) - MiB)
    with pytest.raises(BackendError):
        vhd.open(q, read_only=True)


def test_lost_footer_recovered_from_copy(tmp_path: Path) -> None:
    p = str(tmp_path / "r.vhd")
    vhd.create(p, SIZE)
    with vhd.open(p, read_only=False) as img:
        img.write(0, b"a" * 4096)
    with open(p, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        f.write(bytes(512))
    with vhd.open(p, read_only=False) as img:
        assert bytes(img.read(0, 4096)) == b"a" * 4096
        img.write(4 * MiB, b"b" * 512)
        assert bytes(img.read(4 * MiB, 512)) == b"b" * 512
    with vhd.open(p, read_only=True) as img:
        assert bytes(img.read(4 * MiB, 512)) == b"b" * 512


def test_create_refusals(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="dynamic or fixed"):
        vhd.create(str(tmp_path / "a.vhd"), SIZE, options={"type": "sparse"})
    with pytest.raises(BackendError, match="unknown create option"):
        vhd.create(str(tmp_path / "a.vhd"), SIZE, options={"bogus": "1"})
