"""ISO images as CD/DVD LUNs, and media changes when the file is swapped
while serving (issue #5)."""

from __future__ import annotations

import os
from pathlib import Path

from iscsi.pdu import DataIn, ScsiCommand, ScsiResponse
from iscsi.scsi.sense import SenseData
from target.config import LunSpec
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, make_config, running_target


def make_iso(path: Path, fill: int, blocks: int = 64) -> None:
    """A minimal ISO 9660 image: 'CD001' at byte 32769 identifies it."""
    data = bytearray([fill]) * (blocks * 2048)
    data[32768:32774] = b"\x01CD001"
    path.write_bytes(bytes(data))


def command(c: RawClient, cdb: bytes, length: int = 0) -> tuple[int, bytes, bytes]:
    itt = c.cmdsn + 100
    c.send(ScsiCommand(itt=itt, cdb=cdb, read=length > 0, expected_data_transfer_length=length,
                       cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
    data = b""
    while True:
        pdu = c.recv()
        if isinstance(pdu, DataIn):
            data += bytes(pdu.data)
            if pdu.status_present:
                return pdu.status, b"", data
        else:
            assert isinstance(pdu, ScsiResponse)
            return pdu.status, pdu.sense, data


READ10_BLOCK0 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
TUR = bytes(6)
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


def test_iso_is_a_cdrom_and_swapping_the_file_changes_the_medium(tmp_path: Path) -> None:
    iso = tmp_path / "disc.iso"
    make_iso(iso, 0xAA)
    with running_target(make_config([LunSpec(lun=0, path=str(iso))])) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            status, _, data = command(c, INQUIRY, 96)
            assert data[0] & 0x1F == 0x05 and data[1] & 0x80  # CD/DVD, removable
            command(c, TUR)  # consumes the power-on unit attention
            status, _, data = command(c, READ10_BLOCK0, 2048)
            assert status == 0 and data == b"\xaa" * 2048
            # Swap the disc: a new file at the same path.
            new = tmp_path / "new.iso"
            make_iso(new, 0xBB)
            os.replace(new, iso)
            assert t.call(t.server.media.check) == 1
            status, sense, _ = command(c, TUR)
            s = SenseData.decode(sense)
            assert (status, s.key, s.asc, s.ascq) == (2, 0x6, 0x28, 0x00)
            status, _, data = command(c, READ10_BLOCK0, 2048)
            assert status == 0 and data == b"\xbb" * 2048
            # Remove the file: the drive is empty (NOT READY, MEDIUM NOT PRESENT).
            iso.unlink()
            assert t.call(t.server.media.check) == 0
            status, sense, _ = command(c, TUR)
            s = SenseData.decode(sense)
            assert (status, s.key, s.asc) == (2, 0x2, 0x3A)
