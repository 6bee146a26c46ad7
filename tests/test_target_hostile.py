"""Hostile initiators (issue #3): each gets the RFC's answer while a
well-behaved initiator keeps working and the target's memory stays bounded."""

from __future__ import annotations

import socket
import struct

import pytest

from iscsi.constants import LoginStatus, RejectReason
from iscsi.errors import LoginError
from iscsi.login import ChapAuth
from iscsi.pdu import (
    DataOut,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TextRequest,
    TextResponse,
)
from iscsi.text import decode_text, encode_text
from target.config import ChapConfig, LunSpec
from tests.rawclient import INITIATOR, RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target

MEM = LunSpec(lun=0, path="", backend="memory", size=16 << 20)


@pytest.fixture
def target() -> RunningTarget:
    with running_target(make_config([MEM], login_timeout=1.0)) as t:
        yield t  # type: ignore[misc]


def well_behaved(t: RunningTarget) -> None:
    """A normal login, TEST UNIT READY (twice: the first reports the
    power-on unit attention), a ping and a logout-free close."""
    with RawClient(t.host, t.port) as c:
        c.login(TARGET_NAME, isid=0x400000000099)
        for _ in range(2):
            c.send(ScsiCommand(itt=1, cdb=bytes(6), cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
            rsp = c.recv()
            assert isinstance(rsp, ScsiResponse)
        assert rsp.status == 0
        c.send(NopOut(itt=2, cmdsn=c.cmdsn, expstatsn=c.statsn, immediate=True, data=b"ping"))
        nop = c.recv()
        assert isinstance(nop, NopIn) and nop.itt == 2 and bytes(nop.data) == b"ping"


def connections(t: RunningTarget) -> int:
    return int(t.call(lambda: len(t.server.connections)))


def test_bytes_that_are_not_a_login(target: RunningTarget) -> None:
    with RawClient(target.host, target.port) as c:
        c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(48))
        assert c.closed_by_peer()
    well_behaved(target)


def test_login_that_never_finishes(target: RunningTarget) -> None:
    # login_timeout is 1 s: the target must close on its own; the socket
    # timeout (10 s) only bounds the test.
    with RawClient(target.host, target.port) as c:
        assert c.closed_by_peer()
    well_behaved(target)


def test_oversized_data_segment_during_login(target: RunningTarget) -> None:
    with RawClient(target.host, target.port) as c:
        hdr = bytearray(48)
        hdr[0] = 0x43
        struct.pack_into(">I", hdr, 4, 0xFFFFFF)  # DataSegmentLength 16 MiB - 1 (the 24-bit maximum)
        c.send_raw(bytes(hdr))
        assert c.closed_by_peer()
    well_behaved(target)


def test_oversized_data_segment_in_full_feature_phase(target: RunningTarget) -> None:
    with RawClient(target.host, target.port) as c:
        c.login(TARGET_NAME)
        raw = bytearray(ScsiCommand(itt=5, cdb=bytes(10), write=True,
                                    expected_data_transfer_length=16 << 20,
                                    cmdsn=c.next_cmdsn()).to_bytes())
        struct.pack_into(">I", raw, 4, 0xFFFFFF)  # ~16 MiB against a 256 KiB limit
        c.send_raw(bytes(raw))
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
        assert c.closed_by_peer()
    well_behaved(target)


def test_data_out_for_unknown_ttt(target: RunningTarget) -> None:
    with RawClient(target.host, target.port) as c:
        c.login(TARGET_NAME)
        c.send(DataOut(itt=0x1234, ttt=0x5555, datasn=0, buffer_offset=0, data=bytes(512),
                       expstatsn=c.statsn))
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.reason == RejectReason.INVALID_PDU_FIELD
        assert rej.rejected_itt == 0x1234
        c.send(NopOut(itt=7, cmdsn=c.cmdsn, expstatsn=c.statsn, immediate=True))
        assert isinstance(c.recv(), NopIn)
    well_behaved(target)


def test_cmdsn_outside_the_window_is_ignored(target: RunningTarget) -> None:
    with RawClient(target.host, target.port) as c:
        c.login(TARGET_NAME)
        c.send(ScsiCommand(itt=9, cdb=bytes(6), cmdsn=(c.cmdsn + 100000) & 0xFFFFFFFF))
        # RFC 7143 §4.2.2.1: silently ignored. The next in-window command
        # and a ping are answered, and nothing is answered for ITT 9.
        c.send(ScsiCommand(itt=10, cdb=bytes(6), cmdsn=c.next_cmdsn()))
        rsp = c.recv()
        assert isinstance(rsp, ScsiResponse) and rsp.itt == 10
        c.send(NopOut(itt=11, cmdsn=c.cmdsn, immediate=True))
        nop = c.recv()
        assert isinstance(nop, NopIn) and nop.itt == 11


def test_wrong_chap_response() -> None:
    chap = ChapConfig("alice", "right-secret-123")
    with running_target(make_config([MEM], chap=chap)) as t:
        with RawClient(t.host, t.port) as c:
            with pytest.raises(LoginError) as err:
                c.login(TARGET_NAME, chap=ChapAuth("alice", "wrong-secret-123"))
            assert err.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME, chap=ChapAuth("alice", "right-secret-123"))


def _send_targets(t: RunningTarget, initiator: str) -> list[tuple[str, str]]:
    with RawClient(t.host, t.port) as c:
        c.login(None, initiator=initiator)
        c.send(TextRequest(itt=1, cmdsn=c.next_cmdsn(), data=encode_text([("SendTargets", "All")])))
        rsp = c.recv()
        assert isinstance(rsp, TextResponse)
        return decode_text(bytes(rsp.data))


def test_initiator_not_in_acl() -> None:
    allowed = "iqn.2026-11.org.aioiscsi.test:allowed"
    with running_target(make_config([MEM], allow=(allowed,))) as t:
        with RawClient(t.host, t.port) as c:
            with pytest.raises(LoginError) as err:
                c.login(TARGET_NAME, initiator=INITIATOR)
            assert err.value.login_status == LoginStatus.AUTHORIZATION_FAILURE
        assert _send_targets(t, INITIATOR) == []
        pairs = _send_targets(t, allowed)
        assert ("TargetName", TARGET_NAME) in pairs
        assert ("TargetAddress", f"{t.portal()},1") in pairs


def test_thousand_connections_opened_and_dropped(target: RunningTarget) -> None:
    for i in range(1000):
        s = socket.create_connection((target.host, target.port), timeout=10)
        if i % 3 == 0:
            s.sendall(bytes([0x43]) + bytes(20))  # half a login header
        s.close()
    well_behaved(target)
    # Every dropped connection was forgotten (bounded memory). The check
    # polls the server state, so it waits only as long as closing takes.
    import time

    deadline = time.monotonic() + 20
    while connections(target) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections(target) == 0
