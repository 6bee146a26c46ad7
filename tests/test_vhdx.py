"""VHDX backend: images made by qemu-img/qemu-io read bit-exact; images we
write pass ``qemu-img check`` and ``qemu-img compare``; differencing chains
over VHDX, qcow2 and raw parents; the log replayed after a kill -9 (by us,
in place and in memory, and by qemu); damaged headers and logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from target.backends import registry, vhdx, vhdx_format, vhdx_log
from target.backends.base import BackendError
from target.image_check import check_image
from tests.images import (
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
from tests.tools import require_tool

ROOT = str(Path(__file__).resolve().parent.parent)
SIZE = 24 * MiB


def _raw_of(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".raw")
    qemu_img("convert", "-f", "vhdx", "-O", "raw", path, out)
    return out.read_bytes()


@pytest.mark.interop
@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed,block_size=2M",
                                  "subformat=dynamic,block_size=1M,block_state_zero=off,log_size=2M"])
def test_qemu_made_image_reads_bit_exact(tmp_path: Path, opts: str) -> None:
    q = tmp_path / "q.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", opts, q, str(SIZE))
    qemu_io(q, "vhdx", "write -P 0xab 0 64k", "write -P 0x11 1000k 3M", "write -P 0x5a 20M 4M",
            "write -z 1M 512k", "write -P 0xc3 23M 512")
    expected = _raw_of(q, tmp_path)
    assert expected[:2] == b"\xab\xab"
    with registry.open_image(str(q), read_only=True) as img:
        assert img.info().format == "vhdx"
        assert img.info().subformat == opts.split(",")[0].split("=")[1]
        assert_same(img, expected)
    # Through qemu-img convert of random data (the data path qemu uses most).
    src = tmp_path / "src.raw"
    data = random_raw(src, SIZE, seed=3)
    c = tmp_path / "c.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", opts, src, c)
    with registry.open_image(str(c), read_only=True) as img:
        assert_same(img, data)
    assert check_image(str(c)).ok


@pytest.mark.interop
@pytest.mark.parametrize("opts", [{}, {"block_size": "1M"}, {"subformat": "fixed", "block_size": "1M"}])
def test_ours_pass_qemu_check_and_compare(tmp_path: Path, opts: dict[str, str]) -> None:
    p = tmp_path / "o.vhdx"
    vhdx.create(str(p), SIZE, options=opts)
    expected = bytearray(SIZE)
    with registry.open_image(str(p)) as img:
        ops = random_ops(SIZE, seed=7, count=80, max_len=3 * MiB)
        apply_ops(ops, img, expected)
        if img.thin:
            img.discard(4 * MiB, 4 * MiB)
        else:  # fixed: UNMAP promises nothing (SBC-3 5.28)
            img.write_zeroes(4 * MiB, 4 * MiB)
        img.write_zeroes(9 * MiB + 512, 4096)
        expected[4 * MiB : 8 * MiB] = bytes(4 * MiB)
        expected[9 * MiB + 512 : 9 * MiB + 4608] = bytes(4096)
        img.flush()
        apply_ops(random_ops(SIZE, seed=8, count=20), img, expected)  # reuses freed blocks
        assert_same(img, expected)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    qemu_check(p, "vhdx")
    qemu_compare(p, "vhdx", ref)
    res = check_image(str(p))
    assert res.ok and not res.leaks, (res.errors, res.leaks)
    info = qemu_info(p, "vhdx")
    assert info["virtual-size"] == SIZE
    # qemu writes into our image, we read what it wrote.
    qemu_io(p, "vhdx", "write -P 0x77 5M 1536k")
    expected[5 * MiB : 5 * MiB + 1536 * 1024] = b"\x77" * (1536 * 1024)
    with registry.open_image(str(p), read_only=True) as img:
        assert_same(img, expected)


def test_4096_byte_logical_sectors(tmp_path: Path) -> None:
    """4096-byte logical sectors: reported, round-tripped, and a
    differencing child widens 512-byte writes to whole logical sectors
    (its sector bitmap has one bit per 4096 bytes)."""
    base = tmp_path / "b4.vhdx"
    vhdx.create(str(base), 8 * MiB, options={"logical_sector_size": "4096", "block_size": "1M"})
    with registry.open_image(str(base)) as img:
        assert isinstance(img, vhdx.VhdxImage) and img.logical_sector_size == 4096
        assert img.info().extra["physical_sector_size"] == "4096"
        img.write(512, b"\x07" * 512)
    child = tmp_path / "c4.vhdx"
    with pytest.raises(BackendError, match="parent's logical sector size 4096"):
        registry.create_image(str(child), "vhdx", 0, backing="b4.vhdx",
                              options={"logical_sector_size": "512"})
    registry.create_image(str(child), "vhdx", 0, backing="b4.vhdx", options={"block_size": "1M"})
    with registry.open_image(str(child)) as img:
        assert img.info().backing == "b4.vhdx"
        assert isinstance(img, vhdx.VhdxImage) and img.logical_sector_size == 4096
        img.write(1024, b"\x08" * 512)
        img.write(3 * MiB + 4096, b"\x09" * 512)
        want = bytes(512) + b"\x07" * 512 + b"\x08" * 512 + bytes(2560)
        assert bytes(img.read(0, 4096)) == want
        assert bytes(img.read(3 * MiB + 4096, 1024)) == b"\x09" * 512 + bytes(512)
    assert check_image(str(child)).ok


def _fill(img: registry.ImageBackend, expected: bytearray, seed: int, count: int = 25) -> None:
    apply_ops(random_ops(len(expected), seed=seed, count=count, max_len=1536 * 1024), img, expected)


@pytest.mark.interop
@pytest.mark.parametrize("pfmt", ["vhdx", "qcow2", "raw"])
def test_differencing_chain(tmp_path: Path, pfmt: str) -> None:
    base = tmp_path / f"base.{pfmt}"
    registry.create_image(str(base), pfmt, SIZE)
    expected = bytearray(SIZE)
    with registry.open_image(str(base)) as img:
        _fill(img, expected, seed=1)
    base_bytes = bytes(expected)
    mid = tmp_path / "mid.vhdx"
    registry.create_image(str(mid), "vhdx", 0, backing=base.name, options={"block_size": "1M"})
    with registry.open_image(str(mid)) as img:
        info = img.info()
        assert info.subformat == "differencing" and info.backing_format == pfmt
        assert_same(img, expected)
        _fill(img, expected, seed=2)
        img.discard(2 * MiB, 2 * MiB)  # whole blocks read zeroes, not the parent
        expected[2 * MiB : 4 * MiB] = bytes(2 * MiB)
        assert_same(img, expected)
    top = tmp_path / "top.vhdx"
    registry.create_image(str(top), "vhdx", 0, backing=mid.name)
    with registry.open_image(str(top)) as img:
        assert [n.path for n in img.chain()] == [str(top), str(mid), str(base)]
        _fill(img, expected, seed=3)
        assert_same(img, expected)
    for p in (mid, top):
        res = check_image(str(p))
        assert res.ok, res.errors
    # The chain moves as a whole: the parents are found by relative path.
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (base, mid, top):
        shutil.copy(p, moved / p.name)
    with registry.open_image(str(moved / top.name), read_only=True) as img:
        assert_same(img, expected)
    with registry.open_image(str(base), read_only=True) as img:
        assert_same(img, base_bytes)  # the base is never written through a child
    # A parent replaced after the child was made is refused: its
    # DataWriteGuid no longer matches the child's parent_linkage.
    os.remove(mid)
    registry.create_image(str(mid), "vhdx", SIZE)
    with pytest.raises(BackendError, match="changed since the differencing disk was made"):
        registry.open_image(str(top), read_only=True)


WRITER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from target.backends.registry import open_image
img = open_image(sys.argv[2])
img.write(0, b"\x42" * 4096)
img.write(5 << 20, b"\x43" * 8192)
img.write(9 << 20, b"\x44" * (3 << 20))
img.discard(9 << 20, 1 << 20)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.interop
def test_log_replayed_after_kill(tmp_path: Path) -> None:
    p = tmp_path / "k.vhdx"
    vhdx.create(str(p), 16 * MiB, options={"block_size": "1M"})
    proc = subprocess.run([sys.executable, "-c", WRITER, ROOT, str(p)], capture_output=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    expected = bytearray(16 * MiB)
    expected[0:4096] = b"\x42" * 4096
    expected[5 * MiB : 5 * MiB + 8192] = b"\x43" * 8192
    expected[10 * MiB : 12 * MiB] = b"\x44" * (2 * MiB)
    res = check_image(str(p))
    assert res.ok and any("log holds" in n for n in res.notes), res
    # qemu refuses a dirty log read-only (as the spec requires) ...
    exe = require_tool("qemu-img")
    ro = subprocess.run([exe, "info", "-f", "vhdx", str(p)], capture_output=True, text=True)
    assert ro.returncode != 0 and "log that needs to be replayed" in ro.stderr
    # ... we replay it in memory for a read-only open ...
    with registry.open_image(str(p), read_only=True) as img:
        assert img.info().extra["log_entries_replayed"] == "1"
        assert_same(img, expected)
    # ... qemu replays the log we wrote ...
    q = tmp_path / "q.vhdx"
    shutil.copy(p, q)
    qemu_img("check", "-r", "all", "-f", "vhdx", q)
    assert _raw_of(q, tmp_path) == expected
    # ... and a read-write open replays it in place and empties the log.
    with registry.open_image(str(p)) as img:
        assert_same(img, expected)
    with registry.open_image(str(p), read_only=True) as img:
        assert img.info().extra["log_entries_replayed"] == "0"
    qemu_check(p, "vhdx")
    ref = tmp_path / "ref.raw"
    ref.write_bytes(expected)
    qemu_compare(p, "vhdx", ref)


def test_log_sequence_replayed_from_tail(tmp_path: Path) -> None:
    """find_active: entries with consecutive sequence numbers form the
    active sequence; replay starts at the last entry's tail, and an entry
    of another log GUID or a torn one is ignored."""
    import uuid

    guid, other = uuid.uuid4(), uuid.uuid4()

    def page(b: int) -> bytes:
        return bytes([b]) * 4096

    e1 = vhdx_log.build_entry(5, guid, [(4 * MiB, page(1))], tail=0, flushed_file_offset=0, last_file_offset=0)
    e2 = vhdx_log.build_entry(6, guid, [(4 * MiB, page(2)), (8 * MiB, page(3))], tail=0,
                              flushed_file_offset=0, last_file_offset=9 * MiB)
    e3 = vhdx_log.build_entry(7, guid, [(12 * MiB, page(4))], tail=len(e1), flushed_file_offset=0,
                              last_file_offset=13 * MiB)
    stale = vhdx_log.build_entry(9, other, [(0, page(9))], tail=0, flushed_file_offset=0, last_file_offset=0)
    log = bytearray(MiB)
    log[0 : len(e1 + e2 + e3)] = e1 + e2 + e3
    log[512 * 1024 : 512 * 1024 + len(stale)] = stale
    replay = vhdx_log.find_active(lambda o, n: bytes(log[o : o + n]), 0, MiB, guid)
    assert replay is not None and replay.entries == 2 and replay.last_seq == 7
    assert [(w.offset, w.data[:1] if w.data else None) for w in replay.writes] == [
        (4 * MiB, b"\x02"), (8 * MiB, b"\x03"), (12 * MiB, b"\x04")]
    assert replay.last_file_offset == 13 * MiB
    torn = bytearray(log)
    torn[len(e1 + e2) + 4096 + 100] ^= 0xFF  # e3's data sector
    replay = vhdx_log.find_active(lambda o, n: bytes(torn[o : o + n]), 0, MiB, guid)
    assert replay is not None and replay.last_seq == 6 and replay.entries == 2


def test_headers_crc_and_fallback(tmp_path: Path) -> None:
    p = tmp_path / "h.vhdx"
    vhdx.create(str(p), 8 * MiB)
    with registry.open_image(str(p)) as img:
        img.write(0, b"\x01" * 512)
    # Damage the current header: the other one (an older sequence number)
    # is used; damage both: refused in one line.
    raws = [p.read_bytes()[at : at + 4096] for at in vhdx_format.HEADER_OFFSETS]
    seqs = [vhdx_format.parse_header(r) for r in raws]
    assert all(s is not None for s in seqs)
    cur = max(range(2), key=lambda i: seqs[i].seq if seqs[i] else -1)  # type: ignore[union-attr]
    with open(p, "r+b") as f:
        f.seek(vhdx_format.HEADER_OFFSETS[cur] + 100)
        f.write(b"\xff")
    with registry.open_image(str(p), read_only=True) as img:
        assert bytes(img.read(0, 512)) == b"\x01" * 512
    with open(p, "r+b") as f:
        f.seek(vhdx_format.HEADER_OFFSETS[1 - cur] + 100)
        f.write(b"\xff")
    with pytest.raises(BackendError, match="neither header is valid"):
        registry.open_image(str(p), read_only=True)


def test_probe_and_damage(tmp_path: Path) -> None:
    p = tmp_path / "d.vhdx"
    vhdx.create(str(p), 4 * MiB)
    assert registry.detect(str(p)) == "vhdx"
    assert not vhdx.probe(b"conectix" + bytes(100), "x")
    with open(p, "r+b") as f:  # both region tables
        for at in vhdx_format.REGION_OFFSETS:
            f.seek(at + 20)
            f.write(b"\xff")
    with pytest.raises(BackendError, match="region tables are invalid"):
        registry.open_image(str(p), read_only=True)
    with pytest.raises(BackendError, match="block_size"):
        vhdx.create(str(tmp_path / "x.vhdx"), 4 * MiB, options={"block_size": "3M"})
    with pytest.raises(BackendError, match="unknown create option"):
        vhdx.create(str(tmp_path / "x.vhdx"), 4 * MiB, options={"cluster_size": "1M"})


def _dirty_log(path: Path, pages: list[tuple[int, bytes]]) -> None:
    """Leave a log entry of ``pages`` in the image the way a writer killed
    between the log write and the in-place write would."""
    import uuid

    raws = [path.read_bytes()[at : at + 4096] for at in vhdx_format.HEADER_OFFSETS]
    slot, hdr = vhdx_format.current_header(str(path), (raws[0], raws[1]))
    guid = uuid.uuid4()
    new = vhdx_format.Header(hdr.seq + 1, hdr.file_write, hdr.data_write, guid, hdr.log_length,
                             hdr.log_offset)
    size = path.stat().st_size
    entry = vhdx_log.build_entry(1, guid, pages, tail=0, flushed_file_offset=size, last_file_offset=size)
    with open(path, "r+b") as f:
        f.seek(hdr.log_offset)
        f.write(entry)
        f.seek(vhdx_format.HEADER_OFFSETS[1 - slot])
        f.write(new.pack())


def test_log_rewriting_payload_replayed_read_write_only(tmp_path: Path) -> None:
    """A log entry may rewrite payload data (Hyper-V's may): a read-only
    open cannot overlay that and refuses with the fix; a read-write open
    applies it."""
    p = tmp_path / "p.vhdx"
    vhdx.create(str(p), 4 * MiB, options={"block_size": "1M"})
    with registry.open_image(str(p)) as img:
        img.write(MiB, b"\x01" * 4096)
        assert isinstance(img, vhdx.VhdxImage)
        runs = list(img._runs(MiB, 4096))
    host = runs[0].pos
    _dirty_log(p, [(host, b"\x02" * 4096)])
    with pytest.raises(BackendError, match="open it read-write to replay"):
        registry.open_image(str(p), read_only=True)
    with registry.open_image(str(p)) as img:
        assert bytes(img.read(MiB, 4096)) == b"\x02" * 4096
    qemu_check(p, "vhdx")


def test_sector_size_mismatch_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from target.config import LunSpec
    from target.runtime import _check_sector_size

    p = tmp_path / "s.vhdx"
    vhdx.create(str(p), 4 * MiB, options={"logical_sector_size": "4096"})
    with registry.open_image(str(p), read_only=True) as img:
        with caplog.at_level("WARNING"):
            _check_sector_size(LunSpec(lun=0, path=str(p), block_size=4096), img)
            assert not caplog.records
            _check_sector_size(LunSpec(lun=0, path=str(p)), img)
    assert "4096-byte logical sectors" in caplog.text and "block_size = 4096" in caplog.text
