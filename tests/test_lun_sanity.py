"""What an administrator is told about a LUN's medium: a failing backend's
I/O errors in the log with LUN and LBA (bounded), a 0-byte image refused,
a size that is not whole blocks served rounded down with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.rw import build_read
from iscsi.scsi.sense import SenseData
from target.backends.base import BackendError, Buffer
from target.backends.memory import MemoryBackend
from target.config import LunSpec, TargetSpec
from target.runtime import build_target
from target.scsi.lu import LogicalUnit
from target.scsi.target import ScsiTarget
from target.scsi.types import Nexus

TNAME = "iqn.2024-01.org.example:sanity"


class Failing(MemoryBackend):
    def read(self, offset: int, length: int) -> Buffer:
        raise BackendError(f"disk.img: read of {length} bytes at {offset} failed: EIO")


async def test_io_errors_logged_with_lun_and_lba(caplog: pytest.LogCaptureFixture) -> None:
    lu = LogicalUnit(Failing(1 << 20))
    target = ScsiTarget({3: lu}, name=TNAME)
    nx = Nexus.create("iqn.2024-01.org.example:ini", 0x23D000000001, TNAME, 1)
    await target.execute(nx, 3, bytes(6))  # the power-on unit attention
    with caplog.at_level(logging.ERROR, logger="aioiscsi.target"):
        for _ in range(50):
            r = await target.execute(nx, 3, build_read(77, 1))
            assert r.status == Status.CHECK_CONDITION
            assert SenseData.decode(r.sense).key == SenseKey.MEDIUM_ERROR
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines and f"{TNAME} LUN 3: READ 10 at LBA 77 failed" in lines[0]
    assert "EIO" in lines[0]
    assert len(lines) <= 2  # rate-limited, not fifty lines


def test_zero_byte_image_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    spec = TargetSpec(name=TNAME, luns=(LunSpec(lun=0, path=str(empty)),))
    with pytest.raises(BackendError, match="smaller than one 512-byte block"):
        build_target(spec, None)


def test_partial_block_is_rounded_down_with_a_warning(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # 4 KiB logical blocks over a file of 2 blocks and 1 KiB: the last KiB
    # cannot be addressed. (Raw files are seen in whole 512-byte sectors,
    # the tail of a partial one reading as zeroes, as qemu shows them.)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(2 * 4096 + 1024))
    spec = TargetSpec(name=TNAME, luns=(LunSpec(lun=0, path=str(odd), block_size=4096),))
    with caplog.at_level(logging.WARNING, logger="aioiscsi.target"):
        rt = build_target(spec, None)
    try:
        assert rt.scsi.luns[0].num_blocks == 2
        assert any("the last 1024 bytes are not visible" in r.getMessage() for r in caplog.records)
    finally:
        for b in rt.backends.values():
            b.close()


def test_damaged_image_refused_for_writing_served_read_only(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The checks of ``image check`` run when a LUN opens: a damaged image
    is not written to; read-only it is served with a warning."""
    from tests.test_image_cli import _qcow2_l2_entries, run as image

    p = tmp_path / "bad.qcow2"
    assert image("create", "-f", "qcow2", str(p), "4M")[0] == 0
    from target.backends.registry import open_image

    with open_image(str(p), read_only=False) as img:
        img.write(0, b"\x01" * 65536)
        img.write(65536, b"\x02" * 65536)
    _, l2, entries = _qcow2_l2_entries(str(p))
    with open(p, "r+b") as f:
        f.seek(l2 + 8)
        f.write(entries[0].to_bytes(8, "big"))  # two guest clusters share one host cluster
    spec = TargetSpec(name=TNAME, luns=(LunSpec(lun=0, path=str(p)),))
    with pytest.raises(BackendError, match="damaged qcow2 image.*image check"):
        build_target(spec, None)
    ro = TargetSpec(name=TNAME, luns=(LunSpec(lun=0, path=str(p), read_only=True),))
    with caplog.at_level(logging.WARNING, logger="aioiscsi.target"):
        rt = build_target(ro, None)
    try:
        assert any("damaged qcow2 image" in r.getMessage() for r in caplog.records)
    finally:
        for b in rt.backends.values():
            b.close()
