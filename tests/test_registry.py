"""The image registry: detection by content, opening chains (relative
names, loops, duplicate UUIDs, mixed formats), creation, helpers."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from target.backends import registry
from target.backends.base import BackendError, Buffer, Extent
from target.backends.registry import ImageBackend, ImageInfo
from tests.images import MiB, assert_same, qemu_img, random_raw

# -- a tiny fake format, so chain rules are tested without a real one ---------
#
# File content: "FAKE <uuid> <parent name or -> <fill byte>"; the disk is 1 MiB
# filled with the byte, except that byte 0 reads through to the parent.


class _Fake(ImageBackend):
    def __init__(self, path: str) -> None:
        self.path = path
        _, self._uuid, parent, fill = Path(path).read_text().split()
        self._fill = int(fill)
        self._parent_name = None if parent == "-" else parent
        if self._parent_name is not None:
            self.parent = registry.open_backing(path, self._parent_name, None)

    @property
    def size(self) -> int:
        return MiB

    def read(self, offset: int, length: int) -> Buffer:
        data = bytearray([self._fill]) * length
        if offset == 0 and length:
            data[0:1] = bytes(self._read_backing(0, 1))
        return data

    def write(self, offset: int, data: Buffer) -> None:
        raise BackendError("read-only fake")

    def info(self) -> ImageInfo:
        return ImageInfo("fake", self.path, MiB, 0, uuid=self._uuid, backing=self._parent_name)

    def close(self) -> None:
        self._close_parent()


def _fake_module() -> types.ModuleType:
    mod = types.ModuleType("fake")
    mod.NAME = "fake"  # type: ignore[attr-defined]
    mod.probe = lambda head, path: head.startswith(b"FAKE ")  # type: ignore[attr-defined]
    mod.open = lambda path, *, read_only, write_through: _Fake(path)  # type: ignore[attr-defined]
    mod.create = lambda *a, **k: None  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    formats = dict(registry.formats())
    ordered = {"fake": _fake_module(), **formats}
    monkeypatch.setattr(registry, "_FORMATS", ordered)


def _write(path: Path, uuid: str, parent: str, fill: int) -> str:
    path.write_text(f"FAKE {uuid} {parent} {fill}\n")
    return str(path)


def test_chain_reads_through_and_resolves_relative_names(fake: None, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    base = sub / "base.raw"
    base.write_bytes(b"\x42" + bytes(MiB - 1))
    _write(sub / "mid", "u-mid", "base.raw", 2)
    top = _write(tmp_path / "top", "u-top", "sub/mid", 3)
    monkeypatch.chdir("/")
    with registry.open_image(top) as img:
        assert isinstance(img, ImageBackend)
        assert [type(n).__name__ for n in img.chain()] == ["_Fake", "_Fake", "RawFileBackend"]
        assert bytes(img.read(0, 2)) == b"\x42\x03"
    # Closing the top closed the whole chain.
    assert img.parent is None


def test_loop_refused(fake: None, tmp_path: Path) -> None:
    a = _write(tmp_path / "a", "u-a", "b", 1)
    _write(tmp_path / "b", "u-b", "a", 1)
    with pytest.raises(BackendError, match="loops") as ei:
        registry.open_image(a)
    assert "\n" not in str(ei.value)
    self_loop = _write(tmp_path / "s", "u-s", "s", 1)
    with pytest.raises(BackendError, match="loops"):
        registry.open_image(self_loop)
    # The thread's bookkeeping is clean afterwards: a good chain opens.
    _write(tmp_path / "b", "u-b", "-", 1)
    registry.open_image(a).close()


def test_symlinked_loop_refused(fake: None, tmp_path: Path) -> None:
    a = _write(tmp_path / "a", "u-a", "link", 1)
    os.symlink(tmp_path / "a", tmp_path / "link")
    with pytest.raises(BackendError, match="loops"):
        registry.open_image(a)


def test_duplicate_uuid_refused(fake: None, tmp_path: Path) -> None:
    _write(tmp_path / "base", "same-uuid", "-", 1)
    top = _write(tmp_path / "top", "same-uuid", "base", 2)
    with pytest.raises(BackendError, match="same UUID"):
        registry.open_image(top)


def test_nil_uuids_not_compared(fake: None, tmp_path: Path) -> None:
    _write(tmp_path / "base", "00000000-0000-0000-0000-000000000000", "-", 1)
    top = _write(tmp_path / "top", "00000000-0000-0000-0000-000000000000", "base", 2)
    registry.open_image(top).close()


def test_too_deep_chain_refused(fake: None, tmp_path: Path) -> None:
    _write(tmp_path / "n0", "u0", "-", 0)
    for i in range(1, registry.MAX_CHAIN_DEPTH + 2):
        _write(tmp_path / f"n{i}", f"u{i}", f"n{i - 1}", 0)
    with pytest.raises(BackendError, match="deeper"):
        registry.open_image(str(tmp_path / f"n{registry.MAX_CHAIN_DEPTH + 1}"))


# -- detection and opening real formats -------------------------------------------


@pytest.mark.interop
def test_detect_by_content_not_name(tmp_path: Path) -> None:
    q = tmp_path / "disguised.raw"
    qemu_img("create", "-f", "qcow2", q, "1M")
    p = tmp_path / "disguised.qcow2"
    qemu_img("create", "-f", "parallels", p, "1M")
    r = tmp_path / "plain.qcow2"
    r.write_bytes(bytes(MiB))
    assert registry.detect(str(q)) == "qcow2"
    assert registry.detect(str(p)) == "parallels"
    assert registry.detect(str(r)) == "raw"
    with registry.open_image(str(q)) as img:
        assert isinstance(img, ImageBackend) and img.info().format == "qcow2"


def test_formats_listed_raw_last() -> None:
    names = list(registry.formats())
    assert names[-1] == "raw"
    assert {"qcow2", "parallels", "raw"} <= set(names)
    for mod in registry.formats().values():
        assert isinstance(mod.NAME, str) and callable(mod.probe) and callable(mod.open)


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    for path, fmt, word in (
        (tmp_path / "missing", None, "no such file"),
        (tmp_path, None, "directory"),
        (tmp_path / "x", "nosuchformat", "unknown image format"),
    ):
        if fmt:
            (tmp_path / "x").write_bytes(bytes(512))
        with pytest.raises(BackendError, match=word) as ei:
            registry.open_image(str(path), fmt=fmt)
        assert "\n" not in str(ei.value)


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    # A raw disk whose guest wrote a qcow2 header must stay raw when asked.
    p = tmp_path / "guest.img"
    p.write_bytes(b"QFI\xfb" + bytes(MiB - 4))
    assert registry.detect(str(p)) == "qcow2"
    with pytest.raises(BackendError):
        registry.open_image(str(p))
    with registry.open_image(str(p), fmt="raw") as img:
        assert bytes(img.read(0, 4)) == b"QFI\xfb"


@pytest.mark.interop
def test_create_image_takes_size_and_format_from_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.hds"
    registry.create_image(str(base), "parallels", 4 * MiB)
    with registry.open_image(str(base)) as b:
        b.write(MiB, b"\x5a" * 4096)
    top = tmp_path / "top.qcow2"
    registry.create_image(str(top), "qcow2", 0, backing="base.hds")
    with registry.open_image(str(top)) as img:
        assert isinstance(img, ImageBackend)
        info = img.info()
        assert info.virtual_size == 4 * MiB
        assert info.backing == "base.hds" and info.backing_format == "parallels"
        expected = bytearray(4 * MiB)
        expected[MiB : MiB + 4096] = b"\x5a" * 4096
        assert_same(img, expected)
        # Mapped where the Parallels parent has its cluster.
        assert Extent(MiB, 4096, True) == next(iter(img.extents(MiB, 4096)))


def test_create_image_validates_size(tmp_path: Path) -> None:
    for size in (0, -512, 1000):
        with pytest.raises(BackendError, match="size"):
            registry.create_image(str(tmp_path / "x"), "raw", size)


def test_create_raw_qcow2_chain_and_read(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    data = random_raw(base, 2 * MiB, seed=3)
    top = tmp_path / "top.qcow2"
    registry.create_image(str(top), "qcow2", 0, backing=str(base), backing_format="raw")
    with registry.open_image(str(top)) as img:
        assert_same(img, data)


# -- helpers -------------------------------------------------------------------


def test_cluster_pieces() -> None:
    assert list(registry.cluster_pieces(1000, 5000, 4096)) == [(0, 1000, 3096, 0), (1, 0, 1904, 3096)]
    assert list(registry.cluster_pieces(0, 0, 512)) == []


def test_merge_extents() -> None:
    ext: Iterator[Extent] = iter(
        [Extent(0, 5, True), Extent(5, 5, True), Extent(10, 0, False), Extent(10, 3, False), Extent(13, 1, True)]
    )
    assert list(registry.merge_extents(ext)) == [Extent(0, 10, True), Extent(10, 3, False), Extent(13, 1, True)]


def test_parse_size() -> None:
    assert registry.parse_size("65536") == 65536
    assert registry.parse_size("64k") == 65536
    assert registry.parse_size("2M") == 2 << 20
    assert registry.parse_size("1GiB") == 1 << 30
    for bad in ("", "x", "12q", "-1k"):
        with pytest.raises(BackendError):
            registry.parse_size(bad)


def test_resolve_backing(tmp_path: Path) -> None:
    child = str(tmp_path / "d" / "c.qcow2")
    assert registry.resolve_backing(child, "/abs/b") == "/abs/b"
    assert registry.resolve_backing(child, "b.raw") == str(tmp_path / "d" / "b.raw")
    with pytest.raises(BackendError, match="URL"):
        registry.resolve_backing(child, "nbd://host/x")


def test_image_info_is_frozen() -> None:
    info = ImageInfo("raw", "/x", 512, 0)
    with pytest.raises(AttributeError):
        info.format = "qcow2"  # type: ignore[misc]
    assert info.extra == {} and info.uuid is None
