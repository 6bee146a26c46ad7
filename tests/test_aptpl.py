"""Persistent reservations with APTPL survive a target restart (issue #3:
Windows failover clusters depend on it)."""

from __future__ import annotations

import struct
from pathlib import Path

from iscsi.pdu import DataIn, ScsiCommand, ScsiResponse
from target.config import LunSpec
from tests.rawclient import RawClient
from tests.target_fixture import TARGET_NAME, make_config, running_target

KEY = 0x1122334455667788


def _cmd(c: RawClient, cdb: bytes, *, data: bytes = b"", read: int = 0) -> tuple[int, bytes]:
    c.send(ScsiCommand(itt=c.cmdsn + 1, cdb=cdb, write=bool(data), read=read > 0,
                       expected_data_transfer_length=len(data) or read, cmdsn=c.next_cmdsn(),
                       expstatsn=c.statsn, data=data))
    got = b""
    while True:
        pdu = c.recv()
        if isinstance(pdu, DataIn):
            got += bytes(pdu.data)
            if pdu.status_present:
                return pdu.status, got
        else:
            assert isinstance(pdu, ScsiResponse)
            return pdu.status, got


def read_keys(c: RawClient) -> list[int]:
    status, data = _cmd(c, bytes([0x5E, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0]), read=4096)
    assert status == 0
    length = struct.unpack_from(">I", data, 4)[0]
    return [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def test_aptpl_registration_survives_restart(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    cfg = make_config([LunSpec(lun=0, path=str(img))], state_dir=str(tmp_path / "state"))
    params = struct.pack(">QQ4xB3x", 0, KEY, 0x01)  # SERVICE ACTION KEY, APTPL=1
    with running_target(cfg) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            _cmd(c, bytes(6))  # the power-on unit attention
            # PERSISTENT RESERVE OUT, REGISTER, parameter list length 24.
            status, _ = _cmd(c, bytes([0x5F, 0x00, 0, 0, 0, 0, 0, 0, 24, 0]), data=params)
            assert status == 0
            assert read_keys(c) == [KEY]
    with running_target(cfg) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            _cmd(c, bytes(6))
            assert read_keys(c) == [KEY]


def test_without_aptpl_registrations_are_gone_after_restart(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    cfg = make_config([LunSpec(lun=0, path=str(img))], state_dir=str(tmp_path / "state"))
    params = struct.pack(">QQ4xB3x", 0, KEY, 0x00)
    with running_target(cfg) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            _cmd(c, bytes(6))
            assert _cmd(c, bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]), data=params)[0] == 0
            assert read_keys(c) == [KEY]
    with running_target(cfg) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            _cmd(c, bytes(6))
            assert read_keys(c) == []
