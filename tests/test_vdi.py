"""VDI backend: qemu-made images read bit-exact, our images checked by qemu,
differencing chains, discard compaction, damaged images refused."""

from __future__ import annotations

import os
import struct
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from target.backends import registry, vdi
from target.backends.base import BackendError, Extent
from target.backends.registry import ImageBackend
from tests.images import (
    MiB,
    apply_ops,
    assert_same,
    compare_with_raw,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_io,
    random_ops,
    random_raw,
)

SIZE = 6 * MiB + 7 * 512  # a partial last block


def _make(tmp_path: Path, name: str, **kw: object) -> str:
    p = str(tmp_path / name)
    vdi.create(p, SIZE, **kw)  # type: ignore[arg-type]
    return p


def test_probe_and_detect(tmp_path: Path) -> None:
    p = _make(tmp_path, "a.vdi")
    with open(p, "rb") as f:
        head = f.read(65536)
    assert vdi.probe(head, p)
    assert not vdi.probe(b"\0" * 512, p)
    assert registry.detect(p) == "vdi"


def test_create_write_read_model(tmp_path: Path) -> None:
    p = _make(tmp_path, "a.vdi")
    model = bytearray(SIZE)
    ops = random_ops(SIZE, 1, 40, max_len=3 * MiB)
    with vdi.open(p, read_only=False) as img:
        assert img.size == SIZE and img.thin
        apply_ops(ops, img, model)
        assert_same(img, model)
        info = img.info()
    assert info.format == "vdi" and info.subformat == "dynamic" and info.virtual_size == SIZE
    with vdi.open(p, read_only=True) as img:
        assert_same(img, model)
        with pytest.raises(BackendError):
            img.write(0, b"\0" * 512)
        assert img.info().extra["modify_uuid"] == info.extra["modify_uuid"]


def test_first_write_changes_modification_uuid(tmp_path: Path) -> None:
    p = _make(tmp_path, "a.vdi")
    with vdi.open(p, read_only=False) as img:
        before = img.info().extra["modify_uuid"]
        img.write(0, b"x" * 512)
        after = img.info().extra["modify_uuid"]
        img.write(512, b"y" * 512)
        assert img.info().extra["modify_uuid"] == after
    assert before != after


@pytest.mark.interop
@pytest.mark.parametrize("static", ["off", "on"])
def test_qemu_made_read_bit_exact(tmp_path: Path, static: str) -> None:
    raw = tmp_path / "src.raw"
    data = random_raw(raw, SIZE - 7 * 512, seed=3)
    with open(raw, "r+b") as f:  # one whole zero block: unallocated in qemu's image
        f.seek(2 * MiB)
        f.write(bytes(MiB))
    img_path = tmp_path / "q.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", "-o", f"static={static}", raw, img_path)
    with closing(registry.open_image(str(img_path), read_only=True)) as img:
        assert img.info().subformat == ("fixed" if static == "on" else "dynamic")
        compare_with_raw(img, raw)
        exts = list(img.extents(0, img.size))
        assert sum(e.length for e in exts) == img.size
        if static == "off":
            # The zero runs of the source are holes in the dynamic image.
            assert any(not e.mapped for e in exts)
    assert len(data) == SIZE - 7 * 512


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_ours_pass_qemu_check_and_compare(tmp_path: Path, kind: str) -> None:
    p = _make(tmp_path, "o.vdi", options={"type": kind})
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(SIZE))
    ops = random_ops(SIZE, 7, 60, max_len=1536 * 1024)
    with vdi.open(p, read_only=False) as img:
        apply_ops(ops, img, raw)
        img.flush()
    qemu_check(p, "vdi")
    qemu_compare(p, "vdi", raw)
    # qemu writes into our image; we read what it wrote.
    qemu_io(p, "vdi", "write -P 0x5a 1536k 700k", "write -P 0x33 5m 64k")
    apply_ops([(1536 * 1024, b"\x5a" * 700 * 1024), (5 * MiB, b"\x33" * 65536)], raw)
    with vdi.open(p, read_only=True) as img:
        compare_with_raw(img, raw)


@pytest.mark.interop
def test_discard_compacts_like_virtualbox(tmp_path: Path) -> None:
    p = _make(tmp_path, "d.vdi")
    model = bytearray(os.urandom(SIZE))
    with vdi.open(p, read_only=False) as img:
        img.write(0, model)
        full = os.path.getsize(p)
        img.discard(MiB, MiB)  # a whole block in the middle
        img.discard(3 * MiB + 4096, 8192)  # partial: zeroes written
        model[MiB : 2 * MiB] = bytes(MiB)
        model[3 * MiB + 4096 : 3 * MiB + 12288] = bytes(8192)
        assert_same(img, model)
        exts = list(img.extents(0, SIZE))
        assert Extent(MiB, MiB, False) in exts
        img.write_zeroes(4 * MiB, MiB)
        model[4 * MiB : 5 * MiB] = bytes(MiB)
        assert_same(img, model)
    assert os.path.getsize(p) == full - 2 * MiB
    raw = tmp_path / "m.raw"
    raw.write_bytes(model)
    qemu_check(p, "vdi")
    qemu_compare(p, "vdi", raw)


def test_differencing_chain(tmp_path: Path) -> None:
    base = _make(tmp_path, "base.vdi")
    model = bytearray(SIZE)
    with vdi.open(base, read_only=False) as img:
        apply_ops(random_ops(SIZE, 11, 20, max_len=MiB), img, model)
    base_model = bytes(model)
    child = str(tmp_path / "child.vdi")
    registry.create_image(child, "vdi", 0, backing="base.vdi")
    assert os.path.exists(child + ".parent")
    with closing(registry.open_image(child)) as img:
        info = img.info()
        assert info.subformat == "differencing" and img.parent is not None
        assert isinstance(img.parent, ImageBackend)
        assert info.parent_uuid == img.parent.info().uuid
        assert_same(img, model)
        apply_ops(random_ops(SIZE, 12, 30, max_len=MiB), img, model)
        img.discard(2 * MiB, MiB)  # a discarded block reads zero, not the parent
        model[2 * MiB : 3 * MiB] = bytes(MiB)
        assert_same(img, model)
        assert list(img.extents(2 * MiB, MiB)) == [Extent(2 * MiB, MiB, False)]
    # Without the sidecar the parent is found by UUID in the directory.
    os.unlink(child + ".parent")
    with closing(registry.open_image(child, read_only=True)) as img:
        assert_same(img, model)
    with vdi.open(base, read_only=True) as img:
        assert_same(img, base_model)
    # Writing the parent gives it a new modification UUID: the child is stale.
    with vdi.open(base, read_only=False) as img:
        img.write(0, b"\1" * 512)
    with pytest.raises(BackendError, match="modified after"):
        registry.open_image(child)


def test_differencing_parent_missing(tmp_path: Path) -> None:
    base = _make(tmp_path, "base.vdi")
    child = str(tmp_path / "child.vdi")
    vdi.create(child, SIZE, backing=base)
    os.unlink(child + ".parent")
    os.rename(base, str(tmp_path / "elsewhere.img"))
    with pytest.raises(BackendError, match="needs parent"):
        vdi.open(child, read_only=True)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "offset,data,match",
    [
        (0x40, b"\0\0\0\0", "signature"),
        (0x44, struct.pack("<I", 0x00020000), "version"),
        (0x4C, struct.pack("<I", 3), "type"),
        (0x178, struct.pack("<I", 1000), "block size"),
        (0x180, struct.pack("<I", 1), "disk size"),
    ],
)
def test_damaged_header_refused(tmp_path: Path, offset: int, data: bytes, match: str) -> None:
    p = _make(tmp_path, "bad.vdi")
    _patch(p, offset, data)
    with pytest.raises(BackendError, match=match) as exc:
        vdi.open(p, read_only=True)
    assert "\n" not in str(exc.value) and p in str(exc.value)


def test_truncated_refused(tmp_path: Path) -> None:
    p = _make(tmp_path, "t.vdi")
    with vdi.open(p, read_only=False) as img:
        img.write(3 * MiB, b"z" * 4096)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - MiB // 2)
    with pytest.raises(BackendError, match="truncated"):
        vdi.open(p, read_only=True)
    with open(p, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BackendError):
        vdi.open(p, read_only=True)


def test_create_options_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown create option"):
        vdi.create(str(tmp_path / "x.vdi"), SIZE, options={"cluster_size": "1"})
    with pytest.raises(BackendError, match="dynamic or fixed"):
        vdi.create(str(tmp_path / "x.vdi"), SIZE, options={"type": "sparse"})
    with pytest.raises(BackendError, match="multiple"):
        vdi.create(str(tmp_path / "x.vdi"), 1000)


def test_write_through_and_range(tmp_path: Path) -> None:
    p = _make(tmp_path, "w.vdi")
    with vdi.open(p, read_only=False, write_through=True) as img:
        img.write(SIZE - 512, b"e" * 512)
        assert bytes(img.read(SIZE - 512, 512)) == b"e" * 512
        with pytest.raises(BackendError, match="outside"):
            img.read(SIZE, 512)
    assert uuid.UUID(vdi.open(p, read_only=True).info().uuid or "")
