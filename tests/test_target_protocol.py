"""PDU-level proof of the target's iSCSI protocol behaviour (issue #3,
"Protocol behaviour"): command flow and the CmdSN window, every write data
path with and without digests, NOP, Logout, task management, sessions and
connections, Reject, shutdown and discovery -- each checked against what
RFC 7143 says the target must send.

The target runs in-process (:mod:`tests.target_fixture`); the initiator is
:class:`tests.rawclient.RawClient`, so every byte the target sends is seen.
Nothing here sleeps to synchronise: tests wait for PDUs, bounded by the
socket timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Self

import pytest

from iscsi.constants import (
    RESERVED_TAG,
    AsyncEvent,
    LoginStatus,
    LogoutReason,
    LogoutResponseCode,
    RejectReason,
    TMFunction,
    TMResponse,
)
from iscsi.errors import LoginError
from iscsi.login import ChapAuth, InitiatorLogin
from iscsi.pdu import (
    PDU,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    encode_lun,
)
from iscsi.scsi.rw import build_read, build_write
from iscsi.scsi.sense import SenseData
from iscsi.serial import sn_add, sn_ge, sn_gt
from iscsi.text import decode_text, encode_text
from target.config import Limits, LunSpec, PortalGroup, ServerConfig, TargetSpec
from target.scsi.types import ScsiResult
from tests.rawclient import INITIATOR, RawClient
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target

BLOCK = 512
DISK = 16 << 20
MEM = LunSpec(lun=0, path="", backend="memory", size=DISK)
GOOD = 0x00
CHECK_CONDITION = 0x02
TUR = bytes(6)


# --------------------------------------------------------------------------
# A raw client with a CID, tag allocation and the SCSI data paths.


class Client(RawClient):
    """RawClient plus a CID for multi-connection logins, ITT allocation,
    and a monotonic-MaxCmdSN check on every PDU received."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        super().__init__(host, port, timeout)
        self._itt = 0x100
        self.maxcmdsn: int | None = None
        self.tsih = 0

    def login(self, target: str | None, *, initiator: str = INITIATOR,
              chap: ChapAuth | None = None, isid: int = 0x400000000001, tsih: int = 0,
              offers: Mapping[str, str | None] | None = None, cid: int = 0,
              cmdsn: int = 0) -> LoginResponse:
        """Log in with connection ID ``cid``; returns the final response."""
        login = InitiatorLogin(initiator, target, isid, tsih=tsih, cid=cid, auth=chap,
                               offers=offers or {}, cmdsn=cmdsn)
        req: LoginRequest | None = login.start()
        resp: LoginResponse | None = None
        while req is not None:
            self.send(req)
            pdu = self.recv()
            assert isinstance(pdu, LoginResponse), pdu
            resp = pdu
            req = login.receive(pdu)
        assert resp is not None
        self.params = login.params
        self.hd, self.dd = self.params.header_digest, self.params.data_digest
        self.reader.header_digest, self.reader.data_digest = self.hd, self.dd
        self.reader.max_data_segment_length = self.params.max_recv_data_segment_length
        self.cmdsn = login.expcmdsn
        self.statsn = login.exp_statsn
        self.tsih = resp.tsih
        return resp

    def __enter__(self) -> Self:
        return self

    def itt(self) -> int:
        """A fresh Initiator Task Tag."""
        self._itt += 1
        return self._itt

    def recv(self) -> PDU:
        pdu = super().recv()
        # RFC 7143 §4.2.2.1: MaxCmdSN never moves backwards.
        m = getattr(pdu, "maxcmdsn", None)
        if m is not None and not isinstance(pdu, LoginResponse):
            if self.maxcmdsn is not None:
                assert sn_ge(m, self.maxcmdsn), \
                    f"MaxCmdSN went back from {self.maxcmdsn} to {m} in {pdu}"
            self.maxcmdsn = m
        # §4.2.2.2: each status-bearing PDU on a connection carries the
        # next StatSN, one more than the last; R2Ts and target pings carry
        # it without advancing it.
        if isinstance(pdu, (ScsiResponse, TaskMgmtResponse, LogoutResponse, TextResponse,
                            Reject, AsyncMessage)) or \
                (isinstance(pdu, NopIn) and pdu.itt != RESERVED_TAG) or \
                (isinstance(pdu, DataIn) and pdu.status_present):
            assert pdu.statsn == self.statsn, f"StatSN {pdu.statsn}, expected {self.statsn}"
            self.statsn = sn_add(pdu.statsn, 1)
        elif isinstance(pdu, (R2T, NopIn)):
            assert pdu.statsn == self.statsn
        return pdu

    def ping(self, data: bytes = b"") -> NopIn:
        """An immediate NOP-Out; returns the NOP-In answering it, asserting
        that nothing else arrives before it."""
        itt = self.itt()
        self.send(NopOut(itt=itt, cmdsn=self.cmdsn, expstatsn=self.statsn, immediate=True,
                         data=data))
        pdu = self.recv()
        assert isinstance(pdu, NopIn) and pdu.itt == itt, pdu
        return pdu

    def command(self, cdb: bytes, *, itt: int | None = None, lun: int = 0, edtl: int = 0,
                read: bool = False, write: bool = False, data: bytes = b"",
                final: bool = True, cmdsn: int | None = None) -> int:
        """Send a SCSI Command; returns its ITT."""
        itt = self.itt() if itt is None else itt
        self.send(ScsiCommand(itt=itt, lun=encode_lun(lun), cdb=cdb,
                              expected_data_transfer_length=edtl,
                              cmdsn=self.next_cmdsn() if cmdsn is None else cmdsn,
                              expstatsn=self.statsn, read=read, write=write, final=final,
                              data=data))
        return itt

    def data_out(self, itt: int, ttt: int, data: bytes, start: int, end: int,
                 lun: int = 0) -> None:
        """Send ``data[start:end]`` as one Data-Out sequence (DataSN from 0,
        F on the last PDU), in PDUs no larger than the target's
        MaxRecvDataSegmentLength."""
        assert self.params is not None
        seg = self.params.max_xmit_data_segment_length
        datasn = 0
        off = start
        while off < end:
            n = min(seg, end - off)
            self.send(DataOut(itt=itt, lun=encode_lun(lun), ttt=ttt, datasn=datasn,
                              buffer_offset=off, final=off + n >= end,
                              expstatsn=self.statsn, data=data[off : off + n]))
            off += n
            datasn += 1

    def until_response(self, itt: int) -> tuple[list[PDU], ScsiResponse | DataIn]:
        """Every PDU up to the status of ``itt`` (a SCSI Response or a
        Data-In with S set); returns (the PDUs before it, the status PDU)."""
        seen: list[PDU] = []
        while True:
            pdu = self.recv()
            if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
                return seen, pdu
            if isinstance(pdu, DataIn) and pdu.itt == itt and pdu.status_present:
                seen.append(pdu)
                return seen, pdu
            seen.append(pdu)

    def write(self, lba: int, data: bytes, *, imm: int | None = None,
              unsolicited: bool = True, lun: int = 0) -> tuple[ScsiResponse, list[R2T]]:
        """WRITE(10) ``data`` at ``lba`` over every path the negotiated
        parameters allow: immediate data (``imm`` bytes, default as much as
        allowed), unsolicited Data-Out up to FirstBurstLength, then the
        R2Ts. Returns the response and the R2Ts seen."""
        p = self.params
        assert p is not None
        n = len(data)
        fb = p.first_burst_length
        imm_len = 0
        if p.immediate_data:
            imm_len = min(n, fb, p.max_xmit_data_segment_length) if imm is None else imm
        unsol_end = imm_len
        if not p.initial_r2t and unsolicited:
            unsol_end = min(n, fb)
        itt = self.command(build_write(lba, n // BLOCK, size=10), lun=lun, edtl=n, write=True,
                           data=data[:imm_len], final=unsol_end == imm_len)
        # RFC 7143 §13.10, §13.14: unsolicited data follows the command.
        self.data_out(itt, RESERVED_TAG, data, imm_len, unsol_end, lun)
        r2ts: list[R2T] = []
        while True:
            pdu = self.recv()
            if isinstance(pdu, R2T):
                assert pdu.itt == itt
                r2ts.append(pdu)
                self.data_out(itt, pdu.ttt, data, pdu.buffer_offset,
                              pdu.buffer_offset + pdu.desired_data_transfer_length, lun)
            else:
                assert isinstance(pdu, ScsiResponse) and pdu.itt == itt, pdu
                return pdu, r2ts

    def read(self, lba: int, blocks: int, *, edtl: int | None = None,
             lun: int = 0) -> tuple[bytes, list[DataIn], ScsiResponse | DataIn]:
        """READ(10); returns (data, the Data-In PDUs, the status PDU)."""
        edtl = blocks * BLOCK if edtl is None else edtl
        itt = self.command(build_read(lba, blocks, size=10), lun=lun, edtl=edtl, read=True)
        seen, status = self.until_response(itt)
        dins = [p for p in seen if isinstance(p, DataIn)]
        assert len(dins) == len(seen), seen
        buf = bytearray(edtl)
        for d in dins:
            buf[d.buffer_offset : d.buffer_offset + len(d.data)] = d.data
        got = sum(len(d.data) for d in dins)
        return bytes(buf[:got]), dins, status

    def tur(self) -> ScsiResponse:
        """TEST UNIT READY."""
        itt = self.command(TUR)
        seen, rsp = self.until_response(itt)
        assert not seen and isinstance(rsp, ScsiResponse)
        return rsp

    def clear_ua(self) -> None:
        """TEST UNIT READY until GOOD: a new nexus first reports POWER ON
        (SPC-4 §5.14)."""
        for _ in range(3):
            if self.tur().status == GOOD:
                return
        raise AssertionError("unit attention does not clear")

    def tmf(self, function: int, *, ref: int = RESERVED_TAG, lun: int = 0,
            refcmdsn: int = 0) -> int:
        """Send an immediate Task Management Function Request; returns ITT."""
        itt = self.itt()
        self.send(TaskMgmtRequest(itt=itt, function=function, lun=encode_lun(lun),
                                  referenced_task_tag=ref, cmdsn=self.cmdsn,
                                  expstatsn=self.statsn, refcmdsn=refcmdsn, immediate=True))
        return itt

    def logout(self, reason: int = LogoutReason.CLOSE_SESSION, cid: int = 0) -> LogoutResponse:
        """Send a Logout Request; returns the response."""
        itt = self.itt()
        self.send(LogoutRequest(itt=itt, reason=reason, cid=cid, cmdsn=self.next_cmdsn(),
                                expstatsn=self.statsn))
        rsp = self.recv()
        assert isinstance(rsp, LogoutResponse) and rsp.itt == itt, rsp
        return rsp


def sense_of(rsp: ScsiResponse) -> SenseData:
    """The sense data a CHECK CONDITION carries (RFC 7143 §11.4.7.2)."""
    raw = bytes(rsp.data)
    assert len(raw) >= 2
    assert int.from_bytes(raw[:2], "big") == len(raw) - 2  # SenseLength
    return SenseData.decode(raw[2:])


def connect(t: RunningTarget, **kw: Any) -> Client:
    """A logged-in client to the test target (UA cleared)."""
    c = Client(t.host, t.port)
    c.login(TARGET_NAME, **kw)
    return c


def with_nop(cfg: ServerConfig, interval: float, timeout: float) -> ServerConfig:
    return dataclasses.replace(cfg, nop_interval=interval, nop_timeout=timeout)


@pytest.fixture
def target() -> Iterator[RunningTarget]:
    with running_target(make_config([MEM])) as t:
        yield t


def pattern(n: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "big") + os.urandom(60)) * (n // 64) + os.urandom(n % 64)


class Gate:
    """Holds chosen SCSI commands inside the device until released, so a
    test can act while a task is executing (patched on the server loop)."""

    def __init__(self, t: RunningTarget, opcodes: tuple[int, ...]) -> None:
        self.t = t
        self.rt = t.server.targets[TARGET_NAME]
        self.opcodes = opcodes
        self.event: asyncio.Event | None = None
        self.entered = 0
        self.log: list[str] = []
        orig: Callable[..., Any] = self.rt.scsi.execute_now

        async def held(nexus: Any, lun: int, cdb: bytes, *a: Any, **kw: Any) -> Any:
            self.entered += 1
            assert self.event is not None
            await self.event.wait()
            result = orig(nexus, lun, cdb, *a, **kw)
            if not isinstance(result, ScsiResult):
                result = await result
            self.log.append(f"done {cdb[0]:02x}")
            return result

        def gated(nexus: Any, lun: int, cdb: bytes, *a: Any, **kw: Any) -> Any:
            # The transport's entry point: a result, or an awaitable for a
            # command that waits -- these ones wait for the gate.
            if cdb and cdb[0] in self.opcodes:
                return held(nexus, lun, cdb, *a, **kw)
            return orig(nexus, lun, cdb, *a, **kw)

        def install() -> None:
            self.event = asyncio.Event()
            self.rt.scsi.execute_now = gated

        t.call(install)

    def release(self) -> None:
        assert self.event is not None
        self.t.loop.call_soon_threadsafe(self.event.set)

    def waiting(self) -> int:
        return int(self.t.call(lambda: self.entered))


# --------------------------------------------------------------------------
# 1. Command flow


def test_cmdsn_window_closes_at_queue_depth_and_reopens() -> None:
    cfg = make_config([MEM], limits=Limits(queue_depth=4, initial_r2t=True))
    with running_target(cfg) as t, connect(t, offers={"InitialR2T": "Yes"}) as c:
        c.clear_ua()
        base = c.cmdsn
        data = pattern(4 * BLOCK, 1)
        writes: list[tuple[int, R2T]] = []
        for i in range(4):
            itt = c.command(build_write(i, 1, size=10), edtl=BLOCK, write=True)
            r2t = c.recv()
            # InitialR2T=Yes: nothing moves until the target asks (§13.10).
            assert isinstance(r2t, R2T) and r2t.itt == itt
            assert (r2t.buffer_offset, r2t.desired_data_transfer_length) == (0, BLOCK)
            assert r2t.expcmdsn == sn_add(base, i + 1)
            writes.append((itt, r2t))
        # Four commands open with queue depth 4: the window is closed,
        # MaxCmdSN = ExpCmdSN - 1 (§4.2.2.1).
        last = writes[-1][1]
        assert last.maxcmdsn == sn_add(base, 3)
        assert sn_add(last.maxcmdsn, 1) == last.expcmdsn
        # A command beyond MaxCmdSN is silently ignored...
        ignored = c.command(TUR, cmdsn=sn_add(base, 4))
        nop = c.ping()
        assert nop.maxcmdsn == sn_add(base, 3) and nop.expcmdsn == sn_add(base, 4)
        # ...and completing one write opens one slot.
        itt0, r0 = writes[0]
        c.data_out(itt0, r0.ttt, data, 0, BLOCK)
        seen, rsp = c.until_response(itt0)
        assert not seen and isinstance(rsp, ScsiResponse) and rsp.status == GOOD
        assert rsp.maxcmdsn == sn_add(base, 4)
        # The same CmdSN now fits the window and is executed (the ignored
        # command never was: it would have made this one a duplicate).
        c.cmdsn = sn_add(base, 4)
        again = c.command(TUR)
        seen, rsp = c.until_response(again)
        assert not seen and rsp.status == GOOD
        for itt, r2t in writes[1:]:
            c.data_out(itt, r2t.ttt, data, 0, BLOCK)
            seen, rsp = c.until_response(itt)
            assert all(getattr(p, "itt", None) != ignored for p in seen)
            assert rsp.status == GOOD
        # Everything complete: a full window of queue_depth again.
        nop = c.ping()
        assert nop.maxcmdsn == sn_add(nop.expcmdsn, 4 - 1)
        assert nop.expcmdsn == c.cmdsn


def test_maxcmdsn_advances_as_commands_complete(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        first = c.maxcmdsn
        assert first is not None
        for _ in range(20):
            c.tur()
        # 20 more commands completed: the window slid by 20 (queue depth 128).
        assert c.maxcmdsn == sn_add(first, 20)
        nop = c.ping()
        assert nop.maxcmdsn == sn_add(nop.expcmdsn, 127)


def test_immediate_data_then_r2t_for_the_rest() -> None:
    cfg = make_config([MEM], limits=Limits(initial_r2t=True))
    with running_target(cfg) as t, connect(t, offers={"InitialR2T": "Yes"}) as c:
        c.clear_ua()
        data = pattern(8192, 2)
        rsp, r2ts = c.write(100, data, imm=4096)
        assert rsp.status == GOOD
        # InitialR2T=Yes: only the immediate data was unsolicited; the
        # target asked for exactly the rest (§13.10, §13.11).
        assert [(r.buffer_offset, r.desired_data_transfer_length) for r in r2ts] == [(4096, 4096)]
        got, _, status = c.read(100, 16)
        assert got == data and status.status == GOOD


def test_unsolicited_data_up_to_first_burst_length() -> None:
    limits = Limits(initial_r2t=False, first_burst_length=16384, max_burst_length=65536,
                    max_recv_data_segment_length=8192)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"InitialR2T": "No", "FirstBurstLength": "65536"}) as c:
        assert c.params is not None
        assert c.params.first_burst_length == 16384 and not c.params.initial_r2t
        c.clear_ua()
        data = pattern(96 * 1024, 3)
        rsp, r2ts = c.write(0, data, imm=4096)
        assert rsp.status == GOOD
        # Immediate (4 KiB) + unsolicited Data-Out to FirstBurstLength
        # (16 KiB); R2Ts start exactly there and cover the rest in bursts
        # of at most MaxBurstLength (§13.14, §13.13).
        assert r2ts[0].buffer_offset == 16384
        offs = [(r.buffer_offset, r.desired_data_transfer_length) for r in r2ts]
        assert offs == [(16384, 65536), (81920, 16384)]
        assert [r.r2tsn for r in r2ts] == [0, 1]
        got, _, _ = c.read(0, len(data) // BLOCK)
        assert got == data


def test_unsolicited_data_beyond_first_burst_fails_the_task() -> None:
    limits = Limits(initial_r2t=False, first_burst_length=8192)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"InitialR2T": "No", "FirstBurstLength": "8192"}) as c:
        c.clear_ua()
        data = pattern(32768, 4)
        itt = c.command(build_write(0, 64, size=10), edtl=len(data), write=True, final=False)
        # 16 KiB unsolicited against FirstBurstLength 8 KiB (§13.14): the
        # target must not take it as good data.
        c.send(DataOut(itt=itt, ttt=RESERVED_TAG, datasn=0, buffer_offset=0, final=True,
                       data=data[:16384]))
        while True:
            pdu = c.recv()
            if isinstance(pdu, (ScsiResponse, Reject)):
                break
            assert isinstance(pdu, R2T)
        if isinstance(pdu, ScsiResponse):
            assert pdu.status == CHECK_CONDITION
        c.ping()
        # Nothing of it reached the medium.
        got, _, _ = c.read(0, 64)
        assert got == bytes(len(data))


def test_r2ts_bounded_by_max_burst_and_max_outstanding() -> None:
    limits = Limits(initial_r2t=True, max_outstanding_r2t=2, max_burst_length=16384)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"InitialR2T": "Yes", "MaxOutstandingR2T": "8",
                               "ImmediateData": "No"}) as c:
        assert c.params is not None
        assert c.params.max_outstanding_r2t == 2 and c.params.max_burst_length == 16384
        c.clear_ua()
        data = pattern(128 * 1024, 5)
        itt = c.command(build_write(10, len(data) // BLOCK, size=10), edtl=len(data),
                        write=True)
        outstanding: list[R2T] = []
        for _ in range(2):
            r = c.recv()
            assert isinstance(r, R2T)
            outstanding.append(r)
        # No third R2T while two are outstanding (§13.17): a ping sent now
        # is answered before anything else.
        c.ping()
        all_r2ts = list(outstanding)
        asked = 2 * 16384
        while outstanding:
            r = outstanding.pop(0)
            assert r.desired_data_transfer_length <= 16384
            c.data_out(itt, r.ttt, data, r.buffer_offset,
                       r.buffer_offset + r.desired_data_transfer_length)
            if asked < len(data):
                # One R2T done: exactly one more may be outstanding.
                nxt = c.recv()
                assert isinstance(nxt, R2T), nxt
                outstanding.append(nxt)
                all_r2ts.append(nxt)
                asked += nxt.desired_data_transfer_length
                assert len(outstanding) <= 2
        rsp = c.recv()
        assert isinstance(rsp, ScsiResponse) and rsp.status == GOOD
        # The R2Ts cover the buffer contiguously, R2TSN counting from 0.
        spans = sorted((r.buffer_offset, r.desired_data_transfer_length) for r in all_r2ts)
        assert spans == [(i * 16384, 16384) for i in range(8)]
        assert sorted(r.r2tsn for r in all_r2ts) == list(range(8))
        got, _, _ = c.read(10, len(data) // BLOCK)
        assert got == data


@pytest.mark.parametrize("mrdsl", [4096, 5000])
def test_data_in_split_by_initiator_mrdsl(mrdsl: int) -> None:
    limits = Limits(max_burst_length=16384)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers={"MaxRecvDataSegmentLength": str(mrdsl)}) as c:
        c.clear_ua()
        data = pattern(64 * 1024 + 1024, 6)
        rsp, _ = c.write(2048, data)
        assert rsp.status == GOOD
        got, dins, status = c.read(2048, len(data) // BLOCK)
        assert got == data
        # Status in the last Data-In, no SCSI Response (§11.7.4): the next
        # PDU after it answers a ping.
        assert isinstance(status, DataIn) and status.status_present and status.status == GOOD
        assert dins[-1] is status
        assert not status.residual_overflow and not status.residual_underflow
        c.ping()
        # Segments at most the initiator's MaxRecvDataSegmentLength (§13.12),
        # DataSN and offsets contiguous, F at every MaxBurstLength boundary
        # (§11.7.1 / §13.13) and only there.
        offset = 0
        for sn, d in enumerate(dins):
            assert d.datasn == sn and d.buffer_offset == offset
            assert 0 < len(d.data) <= mrdsl
            end = offset + len(d.data)
            assert end <= ((offset // 16384) + 1) * 16384  # never crosses a burst
            assert d.final == (end % 16384 == 0 or end == len(data))
            assert d.status_present == (d is status)
            offset = end
        assert offset == len(data)


def test_read_residual_overflow_and_underflow(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        data = pattern(4096, 7)
        assert c.write(300, data)[0].status == GOOD
        # EDTL smaller than the CDB asks: overflow, only EDTL bytes sent
        # (§11.4.5.1).
        got, _, status = c.read(300, 8, edtl=2048)
        assert got == data[:2048]
        assert status.residual_overflow and not status.residual_underflow
        assert status.residual_count == 2048 and status.status == GOOD
        # EDTL larger: underflow with the bytes not sent as residual.
        got, _, status = c.read(300, 8, edtl=8192)
        assert got == data
        assert status.residual_underflow and not status.residual_overflow
        assert status.residual_count == 4096 and status.status == GOOD


def test_read_beyond_the_end_gives_sense(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        itt = c.command(build_read(DISK // BLOCK, 1, size=10), edtl=BLOCK, read=True)
        seen, rsp = c.until_response(itt)
        # No data, a SCSI Response carrying CHECK CONDITION and sense data
        # with its SenseLength (§11.4.7), ILLEGAL REQUEST / LBA OUT OF RANGE.
        assert not seen and isinstance(rsp, ScsiResponse)
        assert rsp.status == CHECK_CONDITION
        sense = sense_of(rsp)
        assert sense.key == 0x05 and sense.asc_ascq == (0x21, 0x00)
        # Nothing was transferred of the 512 bytes expected.
        assert rsp.residual_underflow and rsp.residual_count == BLOCK


# --------------------------------------------------------------------------
# 2. Write data integrity over every data path


DIGESTS = {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
@pytest.mark.parametrize("initial_r2t", [False, True], ids=["unsolicited", "initialr2t"])
def test_write_integrity(digests: bool, initial_r2t: bool) -> None:
    limits = Limits(initial_r2t=initial_r2t, max_recv_data_segment_length=8192,
                    first_burst_length=16384, max_burst_length=32768, max_outstanding_r2t=2)
    offers: dict[str, str | None] = {"InitialR2T": "Yes" if initial_r2t else "No",
                                     "MaxOutstandingR2T": "2",
                                     "MaxRecvDataSegmentLength": "8192"}
    if digests:
        offers.update(DIGESTS)
    with running_target(make_config([MEM], limits=limits)) as t, connect(t, offers=offers) as c:
        assert c.params is not None and c.params.header_digest == digests
        assert c.params.data_digest == digests
        c.clear_ua()
        cases = [
            (0, 512, None),            # one block, immediate data only
            (8, 4096 + 512, 0),        # no immediate data at all
            (64, 16384, None),         # exactly FirstBurstLength
            (200, 20 * 1024, 1024),    # small immediate + unsolicited + R2T
            (400, 100 * 1024, None),   # several bursts of R2T data
            (800, 257 * 1024, 8192),   # crosses many PDUs and bursts
        ]
        written: list[tuple[int, bytes]] = []
        for i, (lba, n, imm) in enumerate(cases):
            data = pattern(n, 100 + i)
            rsp, r2ts = c.write(lba, data, imm=imm)
            assert rsp.status == GOOD, sense_of(rsp)
            first = min([r.buffer_offset for r in r2ts], default=n)
            # R2Ts ask only for what was not sent unsolicited.
            assert first >= (imm if imm is not None else min(n, 8192))
            written.append((lba, data))
        for lba, data in written:
            got, _, status = c.read(lba, len(data) // BLOCK)
            assert got == data and status.status == GOOD


# --------------------------------------------------------------------------
# 3. NOP


def test_nop_out_ping_is_echoed(target: RunningTarget) -> None:
    with connect(target) as c:
        payload = os.urandom(3000)
        nop = c.ping(payload)
        # §11.19: the NOP-In answers with the ping data, TTT reserved.
        assert bytes(nop.data) == payload and nop.ttt == RESERVED_TAG
        # A NOP-Out with ITT reserved asks for no answer (§11.18).
        c.send(NopOut(itt=RESERVED_TAG, cmdsn=c.cmdsn, immediate=True))
        c.ping(b"x")


def test_target_pings_idle_initiator_and_keeps_answered_connection() -> None:
    # A timeout longer than the client's socket timeout (10 s): the next
    # ping must follow an answered one after the interval, not the timeout.
    cfg = with_nop(make_config([MEM]), 0.3, 30.0)
    with running_target(cfg) as t, connect(t) as c:
        for _ in range(3):
            nop = c.recv()
            # §11.19: a target ping has ITT 0xffffffff and a real TTT.
            assert isinstance(nop, NopIn) and nop.itt == RESERVED_TAG
            assert nop.ttt != RESERVED_TAG
            c.send(NopOut(itt=RESERVED_TAG, ttt=nop.ttt, cmdsn=c.cmdsn, expstatsn=c.statsn,
                          immediate=True))
        # Still alive after answering: another command works.
        assert c.tur().status in (GOOD, CHECK_CONDITION)


def test_unanswered_ping_drops_the_connection() -> None:
    cfg = with_nop(make_config([MEM]), 0.3, 0.3)
    with running_target(cfg) as t, connect(t) as c:
        nop = c.recv()
        assert isinstance(nop, NopIn) and nop.ttt != RESERVED_TAG
        assert c.closed_by_peer()
        assert t.call(lambda: len(t.server.sessions)) == 0


# --------------------------------------------------------------------------
# 4. Logout


def test_logout_close_session(target: RunningTarget) -> None:
    with connect(target) as c:
        rsp = c.logout(LogoutReason.CLOSE_SESSION)
        assert rsp.response == LogoutResponseCode.SUCCESS
        assert c.closed_by_peer()
    assert target.call(lambda: len(target.server.sessions)) == 0


def test_logout_close_connection(target: RunningTarget) -> None:
    with connect(target) as c:
        rsp = c.logout(LogoutReason.CLOSE_CONNECTION, cid=0)
        assert rsp.response == LogoutResponseCode.SUCCESS
        assert c.closed_by_peer()


def test_logout_unknown_cid_and_recovery_not_supported(target: RunningTarget) -> None:
    with connect(target) as c:
        rsp = c.logout(LogoutReason.CLOSE_CONNECTION, cid=7)
        assert rsp.response == LogoutResponseCode.CID_NOT_FOUND
        # ErrorRecoveryLevel 0: no connection recovery (§11.15.1).
        rsp = c.logout(LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY, cid=0)
        assert rsp.response == LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        # A refused logout leaves the connection in full feature phase.
        c.ping()
        assert c.logout().response == LogoutResponseCode.SUCCESS
        assert c.closed_by_peer()


# --------------------------------------------------------------------------
# 5. Task management


def tmf_response(c: Client, itt: int) -> tuple[list[PDU], TaskMgmtResponse]:
    seen: list[PDU] = []
    while True:
        pdu = c.recv()
        if isinstance(pdu, TaskMgmtResponse) and pdu.itt == itt:
            return seen, pdu
        seen.append(pdu)


R2T_LIMITS = Limits(initial_r2t=True, queue_depth=8)
R2T_OFFERS = {"InitialR2T": "Yes", "ImmediateData": "No"}


def open_write(c: Client, lba: int, lun: int = 0) -> tuple[int, R2T]:
    """A write left waiting for its R2T data."""
    itt = c.command(build_write(lba, 2, size=10), lun=lun, edtl=1024, write=True)
    r2t = c.recv()
    assert isinstance(r2t, R2T) and r2t.itt == itt
    return itt, r2t


def test_abort_task_of_write_waiting_for_data() -> None:
    with running_target(make_config([MEM], limits=R2T_LIMITS)) as t, \
            connect(t, offers=R2T_OFFERS) as c:
        c.clear_ua()
        itt, r2t = open_write(c, 0)
        before = c.maxcmdsn
        seen, rsp = tmf_response(c, c.tmf(TMFunction.ABORT_TASK, ref=itt, refcmdsn=c.cmdsn - 1))
        assert not seen and rsp.response == TMResponse.FUNCTION_COMPLETE
        # The aborted task's CmdSN slot is free again (§4.2.2.1).
        assert before is not None and sn_gt(rsp.maxcmdsn, before)
        # An aborted task gets no SCSI Response: the ping answer is next.
        # Its Data-Out still in flight is dropped without a word (and is
        # not taken as a write).
        c.ping()
        c.data_out(itt, r2t.ttt, pattern(1024, 11), 0, 1024)
        c.ping()
        got, _, _ = c.read(0, 2)
        assert got == bytes(1024)


def test_abort_task_unknown_tag(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        # RefCmdSN below ExpCmdSN (outside the window): "task does not
        # exist" (§11.6.1 c).
        seen, rsp = tmf_response(c, c.tmf(TMFunction.ABORT_TASK, ref=0xABCD,
                                          refcmdsn=c.cmdsn - 1))
        assert not seen and rsp.response == TMResponse.TASK_DOES_NOT_EXIST


@pytest.mark.parametrize("fn", [TMFunction.ABORT_TASK_SET, TMFunction.CLEAR_TASK_SET])
def test_abort_and_clear_task_set(fn: TMFunction) -> None:
    with running_target(make_config([MEM], limits=R2T_LIMITS)) as t, \
            connect(t, offers=R2T_OFFERS) as c:
        c.clear_ua()
        opened = [open_write(c, i * 4) for i in range(3)]
        seen, rsp = tmf_response(c, c.tmf(fn, lun=0))
        assert not seen and rsp.response == TMResponse.FUNCTION_COMPLETE
        # Every task gone: the full window is back and no responses come.
        assert rsp.maxcmdsn == sn_add(rsp.expcmdsn, 8 - 1)
        c.ping()
        for itt, r2t in opened:
            c.data_out(itt, r2t.ttt, pattern(1024, 12), 0, 1024)
        c.ping()
        for i in range(3):
            assert c.read(i * 4, 2)[0] == bytes(1024)
        # The session carries on.
        assert c.tur().status == GOOD


@pytest.mark.parametrize("fn", [TMFunction.ABORT_TASK_SET, TMFunction.CLEAR_TASK_SET,
                                TMFunction.LOGICAL_UNIT_RESET, TMFunction.CLEAR_ACA])
def test_tmf_on_missing_lun(target: RunningTarget, fn: TMFunction) -> None:
    with connect(target) as c:
        seen, rsp = tmf_response(c, c.tmf(fn, lun=5))
        assert not seen and rsp.response == TMResponse.LUN_DOES_NOT_EXIST


def test_clear_aca_and_task_reassign(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        _, rsp = tmf_response(c, c.tmf(TMFunction.CLEAR_ACA, lun=0))
        assert rsp.response == TMResponse.FUNCTION_COMPLETE
        # ErrorRecoveryLevel 0 (§11.5.1): no task reassignment.
        _, rsp = tmf_response(c, c.tmf(TMFunction.TASK_REASSIGN, ref=0x77))
        assert rsp.response == TMResponse.TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED
        assert c.tur().status == GOOD


@pytest.mark.parametrize("fn", [TMFunction.LOGICAL_UNIT_RESET, TMFunction.TARGET_WARM_RESET])
def test_reset_gives_unit_attention_to_other_nexus(target: RunningTarget,
                                                    fn: TMFunction) -> None:
    with connect(target, isid=0x400000000011) as a, \
            connect(target, isid=0x400000000012) as b:
        a.clear_ua()
        b.clear_ua()
        _, rsp = tmf_response(a, a.tmf(fn, lun=0))
        assert rsp.response == TMResponse.FUNCTION_COMPLETE
        # SAM-5 §7.7: every other I_T nexus sees a UNIT ATTENTION
        # with ASC 29h (power on, reset or bus device reset occurred).
        rsp2 = b.tur()
        assert rsp2.status == CHECK_CONDITION
        sense = sense_of(rsp2)
        assert sense.key == 0x06 and sense.asc == 0x29
        assert b.tur().status == GOOD


def test_target_cold_reset_ends_sessions(target: RunningTarget) -> None:
    with connect(target, isid=0x400000000021) as a, \
            connect(target, isid=0x400000000022) as b:
        a.clear_ua()
        _, rsp = tmf_response(a, a.tmf(TMFunction.TARGET_COLD_RESET))
        # The response first, then every connection closes (§11.5.1).
        assert rsp.response == TMResponse.FUNCTION_COMPLETE
        assert a.closed_by_peer()
        assert b.closed_by_peer()
    assert target.call(lambda: len(target.server.sessions)) == 0


def test_tmf_response_waits_for_executing_task(target: RunningTarget) -> None:
    gate = Gate(target, (0x28,))  # READ(10)
    with connect(target) as c:
        c.clear_ua()
        itt = c.command(build_read(0, 8, size=10), edtl=4096, read=True)
        # Wait (bounded by the socket timeout) until the READ is inside the
        # device: pings are answered meanwhile.
        for _ in range(1000):
            c.ping()
            if gate.waiting():
                break
        assert gate.waiting() == 1
        tmf_itt = c.tmf(TMFunction.ABORT_TASK, ref=itt)
        # The TMF cannot be answered while the task still runs (RFC 7143
        # §11.6: the response follows the end of the affected tasks).
        c.ping()
        gate.release()
        seen, rsp = tmf_response(c, tmf_itt)
        assert rsp.response == TMResponse.FUNCTION_COMPLETE
        # The aborted READ sent neither data nor status.
        assert all(getattr(p, "itt", None) != itt for p in seen)
        c.ping()
        assert c.tur().status == GOOD


# --------------------------------------------------------------------------
# 6. Sessions and connections


def test_session_reinstatement(target: RunningTarget) -> None:
    with connect(target, isid=0x400000000031) as old:
        old.clear_ua()
        with connect(target, isid=0x400000000031) as new:
            # Same ISID, TSIH 0: the old session is reinstated (§6.3.5).
            assert old.closed_by_peer()
            assert new.tsih != 0
            new.clear_ua()
            assert target.call(lambda: len(target.server.sessions)) == 1


def test_max_connections_honoured() -> None:
    cfg = make_config([MEM], limits=Limits(max_connections=2))
    with running_target(cfg) as t, connect(t, offers={"MaxConnections": "4"}) as c0:
        assert c0.params is not None and c0.params.max_connections == 2
        tsih = c0.tsih
        with Client(t.host, t.port) as c1:
            rsp = c1.login(TARGET_NAME, tsih=tsih, cid=1, cmdsn=c0.cmdsn)
            assert rsp.tsih == tsih
            c1.ping()
            with Client(t.host, t.port) as c2:
                with pytest.raises(LoginError) as err:
                    c2.login(TARGET_NAME, tsih=tsih, cid=2, cmdsn=c0.cmdsn)
                assert err.value.login_status == LoginStatus.TOO_MANY_CONNECTIONS
            c0.ping()
            c1.ping()


def test_two_connections_share_one_cmdsn_space() -> None:
    cfg = make_config([MEM], limits=Limits(max_connections=2))
    with running_target(cfg) as t, connect(t, offers={"MaxConnections": "2"}) as c0:
        c0.clear_ua()
        with Client(t.host, t.port) as c1:
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            n = c0.cmdsn
            # CmdSN n+1 on connection 1 waits for n (session-wide order,
            # §4.2.2.1): only the ping is answered.
            late = c1.command(TUR, cmdsn=sn_add(n, 1))
            nop = c1.ping()
            assert nop.expcmdsn == n
            early = c0.command(TUR, cmdsn=n)
            _, r0 = c0.until_response(early)
            _, r1 = c1.until_response(late)
            assert r0.status == GOOD and r1.status == GOOD
            assert r1.expcmdsn == sn_add(n, 2)
            assert c0.ping().expcmdsn == sn_add(n, 2)


def test_connection_reinstatement(target: RunningTarget) -> None:
    with connect(target, isid=0x400000000041) as old:
        old.clear_ua()
        with Client(target.host, target.port) as new:
            # Same session, same CID: the old connection is dropped and the
            # session continues on the new one (§6.3.5).
            new.login(TARGET_NAME, isid=0x400000000041, tsih=old.tsih, cid=0,
                      cmdsn=old.cmdsn)
            assert old.closed_by_peer()
            assert new.tur().status == GOOD
            assert target.call(lambda: len(target.server.sessions)) == 1


def test_login_to_unknown_tsih(target: RunningTarget) -> None:
    with Client(target.host, target.port) as c:
        with pytest.raises(LoginError) as err:
            c.login(TARGET_NAME, tsih=0x4242, cid=1)
        assert err.value.login_status == LoginStatus.SESSION_DOES_NOT_EXIST


# --------------------------------------------------------------------------
# 7. Reject


def test_reject_for_malformed_pdus(target: RunningTarget) -> None:
    with connect(target) as c:
        c.clear_ua()
        # A reserved opcode (0x1c): "Command not supported" (§11.17.1).
        raw = bytearray(48)
        raw[0] = 0x1C
        raw[16:20] = (0x5151).to_bytes(4, "big")
        c.send_raw(bytes(raw))
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.reason == RejectReason.COMMAND_NOT_SUPPORTED
        assert rej.rejected_itt == 0x5151
        c.ping()
        # A target opcode (NOP-In) from the initiator: protocol error.
        c.send(NopIn(itt=0x5252, ttt=RESERVED_TAG))
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
        assert rej.rejected_itt == 0x5252
        c.ping()
        # SNACK at ErrorRecoveryLevel 0 is not supported (§11.16).
        c.send(SnackRequest(itt=0x5353, expstatsn=c.statsn))
        rej = c.recv()
        assert isinstance(rej, Reject)
        assert rej.reason in (RejectReason.COMMAND_NOT_SUPPORTED, RejectReason.PROTOCOL_ERROR)
        assert rej.rejected_itt == 0x5353
        # The session goes on.
        assert c.tur().status == GOOD


# --------------------------------------------------------------------------
# 8. Shutdown


def _stop(t: RunningTarget, wait: float) -> Any:
    return asyncio.run_coroutine_threadsafe(t.server.stop(logout_wait=wait), t.loop)


def test_stop_asks_initiators_to_log_out() -> None:
    with running_target(make_config([MEM])) as t:
        a = connect(t, isid=0x400000000051)
        b = connect(t, isid=0x400000000052)
        with a, b:
            fut = _stop(t, 30.0)
            for c in (a, b):
                msg = c.recv()
                # §11.9.1: AsyncEvent 1, "logout requested".
                assert isinstance(msg, AsyncMessage)
                assert msg.async_event == AsyncEvent.LOGOUT_REQUEST
                assert c.logout().response == LogoutResponseCode.SUCCESS
                assert c.closed_by_peer()
            # Both logged out: the server finishes long before its 30 s.
            fut.result(10)


def test_stop_completes_inflight_writes_before_flush() -> None:
    with running_target(make_config([MEM])) as t:
        backend = t.server.targets[TARGET_NAME].backends[0]
        # A FUA write is in flight while its flush runs in a worker thread
        # (SBC-3 §5.47: status only once on stable storage). Hold that
        # flush until the test lets it go.
        hold = threading.Event()
        events: list[str] = []
        on_disk: list[bytes] = []

        def install_flush() -> None:
            orig = backend.flush

            def flush() -> None:
                if not events:
                    events.append("fua flush")
                    hold.wait(20)
                    events.append("fua done")
                else:
                    events.append("shutdown flush")
                    on_disk.append(bytes(backend.read(40 * BLOCK, 4096)))
                orig()
            backend.flush = flush
        t.call(install_flush)
        try:
            with connect(t) as c:
                c.clear_ua()
                data = pattern(4096, 9)
                c.command(build_write(40, 8, size=10, fua=True), edtl=4096, write=True,
                          data=data)
                for _ in range(1000):
                    c.ping()
                    if t.call(lambda: list(events)):
                        break
                assert events == ["fua flush"]
                fut = _stop(t, 0.2)
                msg = c.recv()
                assert isinstance(msg, AsyncMessage)
                # We do not log out: after its wait the target closes us.
                assert c.closed_by_peer()
        finally:
            hold.set()
        fut.result(10)
        # The in-flight write finished before the shutdown flush, with its
        # data on the backend.
        assert events == ["fua flush", "fua done", "shutdown flush"]
        assert on_disk == [data]


# --------------------------------------------------------------------------
# 9. Discovery


T2_NAME = "iqn.2026-11.org.aioiscsi.test:second"
SMALL = LunSpec(lun=0, path="", backend="memory", size=1 << 20)


def two_group_config() -> ServerConfig:
    t1 = TargetSpec(name=TARGET_NAME, luns=(SMALL,), portal_groups=(1, 2))
    t2 = TargetSpec(name=T2_NAME, luns=(SMALL,), portal_groups=(2,))
    return ServerConfig(targets=(t1, t2),
                        portal_groups=(PortalGroup(1, (("127.0.0.1", 0),)),
                                       PortalGroup(2, (("::1", 0),))),
                        nop_interval=0.0)


def send_targets(c: Client, value: str) -> tuple[list[tuple[str, str]], list[TextResponse]]:
    """SendTargets=value, following continuations (§11.10, §12.3)."""
    itt = c.itt()
    c.send(TextRequest(itt=itt, cmdsn=c.next_cmdsn(), expstatsn=c.statsn,
                       data=encode_text([("SendTargets", value)])))
    parts: list[TextResponse] = []
    while True:
        rsp = c.recv()
        assert isinstance(rsp, TextResponse) and rsp.itt == itt, rsp
        parts.append(rsp)
        if rsp.final:
            break
        # C bit set: ask for the rest with an empty request carrying the
        # TTT the target gave (§11.10.4, §11.11.4).
        assert rsp.cont and rsp.ttt != RESERVED_TAG
        c.send(TextRequest(itt=itt, ttt=rsp.ttt, cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
    assert parts[-1].ttt == RESERVED_TAG and not parts[-1].cont
    return decode_text(b"".join(bytes(p.data) for p in parts)), parts


def test_send_targets_lists_every_portal_and_tag() -> None:
    with running_target(two_group_config()) as t:
        ports = {tag: port for tag, _, port in t.server.bound}
        v4 = f"127.0.0.1:{ports[1]},1"
        v6 = f"[::1]:{ports[2]},2"
        with Client(t.host, t.port) as c:
            c.login(None)
            pairs, _ = send_targets(c, "All")
            assert pairs == [("TargetName", TARGET_NAME), ("TargetAddress", v4),
                             ("TargetAddress", v6), ("TargetName", T2_NAME),
                             ("TargetAddress", v6)]
            pairs, _ = send_targets(c, T2_NAME)
            assert pairs == [("TargetName", T2_NAME), ("TargetAddress", v6)]
            pairs, _ = send_targets(c, "iqn.2026-11.org.aioiscsi.test:nosuch")
            assert pairs == []
            # SCSI commands have no place in a discovery session (§4.3):
            # rejected, and the session goes on.
            itt = c.command(TUR)
            rej = c.recv()
            assert isinstance(rej, Reject) and rej.rejected_itt == itt
            pairs, _ = send_targets(c, T2_NAME)
            assert pairs[0] == ("TargetName", T2_NAME)
        # A normal session asking with an empty value hears only its own
        # target (§12.3), here over the IPv6 portal.
        with Client("::1", ports[2]) as c:
            c.login(T2_NAME)
            pairs, _ = send_targets(c, "")
            assert pairs == [("TargetName", T2_NAME), ("TargetAddress", v6)]


def test_long_send_targets_answer_is_continued() -> None:
    names = [f"iqn.2026-11.org.aioiscsi.test:{i:02d}-" + "x" * 150 for i in range(20)]
    specs = tuple(TargetSpec(name=n, luns=(SMALL,)) for n in names)
    cfg = dataclasses.replace(make_config([SMALL]), targets=specs)
    with running_target(cfg) as t, Client(t.host, t.port) as c:
        c.login(None, offers={"MaxRecvDataSegmentLength": "512"})
        pairs, parts = send_targets(c, "All")
        assert len(parts) > 4
        assert all(len(p.data) <= 512 for p in parts)
        assert [v for k, v in pairs if k == "TargetName"] == names
        assert all(v == f"{t.portal()},1" for k, v in pairs if k == "TargetAddress")


def test_connection_reinstatement_frees_the_old_tasks_window() -> None:
    limits = Limits(queue_depth=4, initial_r2t=True)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, isid=0x400000000061, offers=R2T_OFFERS) as old:
        old.clear_ua()
        open_write(old, 0)
        open_write(old, 8)
        with Client(t.host, t.port) as new:
            new.login(TARGET_NAME, isid=0x400000000061, tsih=old.tsih, cid=0,
                      cmdsn=old.cmdsn)
            assert old.closed_by_peer()
            # The old connection's tasks ended with it (ERL 0, §7.1.4 /
            # §6.3.5): their CmdSN slots are free again.
            nop = new.ping()
            assert nop.maxcmdsn == sn_add(nop.expcmdsn, 4 - 1)
            for _ in range(6):
                assert new.tur().status == GOOD


def test_logout_of_another_connection(target: RunningTarget) -> None:
    cfg = make_config([MEM], limits=Limits(max_connections=2, queue_depth=4,
                                           initial_r2t=True))
    with running_target(cfg) as t, \
            connect(t, offers={"MaxConnections": "2", **R2T_OFFERS}) as c0:
        c0.clear_ua()
        open_write(c0, 0)
        with Client(t.host, t.port) as c1:
            c1.cmdsn = c0.cmdsn
            c1.login(TARGET_NAME, tsih=c0.tsih, cid=1, cmdsn=c0.cmdsn)
            c1.cmdsn = c0.cmdsn
            # Close connection 0 from connection 1 (§11.14.1): it goes, the
            # session stays, and its open write no longer holds a slot.
            rsp = c1.logout(LogoutReason.CLOSE_CONNECTION, cid=0)
            assert rsp.response == LogoutResponseCode.SUCCESS
            assert c0.closed_by_peer()
            nop = c1.ping()
            assert nop.maxcmdsn == sn_add(nop.expcmdsn, 4 - 1)
            assert c1.tur().status == GOOD
            # Close the session from its last connection.
            assert c1.logout().response == LogoutResponseCode.SUCCESS
            assert c1.closed_by_peer()
        assert t.call(lambda: len(t.server.sessions)) == 0


def test_lu_reset_aborts_tasks_of_other_sessions() -> None:
    with running_target(make_config([MEM], limits=R2T_LIMITS)) as t, \
            connect(t, isid=0x400000000071, offers=R2T_OFFERS) as a, \
            connect(t, isid=0x400000000072, offers=R2T_OFFERS) as b:
        a.clear_ua()
        b.clear_ua()
        itt, r2t = open_write(b, 50)
        a_open = open_write(a, 60)
        _, rsp = tmf_response(a, a.tmf(TMFunction.LOGICAL_UNIT_RESET))
        assert rsp.response == TMResponse.FUNCTION_COMPLETE
        # A's own window is whole again, with its aborted write gone.
        assert rsp.maxcmdsn == sn_add(rsp.expcmdsn, 8 - 1)
        c_data = pattern(1024, 13)
        a.data_out(a_open[0], a_open[1].ttt, c_data, 0, 1024)
        a.ping()
        # B's write was aborted by the reset (SAM-5 §7.7): its data is
        # dropped, no response comes for it, and its CmdSN slot is free.
        b.data_out(itt, r2t.ttt, c_data, 0, 1024)
        nop = b.ping()
        assert nop.maxcmdsn == sn_add(nop.expcmdsn, 8 - 1)
        rsp2 = b.tur()
        assert rsp2.status == CHECK_CONDITION and sense_of(rsp2).asc == 0x29
        assert b.read(50, 2)[0] == bytes(1024)
        a.clear_ua()
        assert a.read(60, 2)[0] == bytes(1024)


def test_tmf_on_discovery_session_is_rejected() -> None:
    with running_target(two_group_config()) as t, Client(t.host, t.port) as c:
        c.login(None)
        itt = c.tmf(TMFunction.ABORT_TASK_SET)
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.rejected_itt == itt
        pairs, _ = send_targets(c, T2_NAME)
        assert pairs[0] == ("TargetName", T2_NAME)


@pytest.mark.parametrize("case", ["immediatedata-no", "beyond-first-burst"])
def test_disallowed_immediate_data_rejects_the_command(case: str) -> None:
    if case == "immediatedata-no":
        limits = Limits(immediate_data=False, queue_depth=8)
        offers = {"ImmediateData": "No"}
        data = pattern(1024, 14)
    else:
        limits = Limits(first_burst_length=4096, max_recv_data_segment_length=65536,
                        queue_depth=8)
        offers = {"FirstBurstLength": "4096"}
        data = pattern(8192, 15)
    with running_target(make_config([MEM], limits=limits)) as t, \
            connect(t, offers=offers) as c:
        c.clear_ua()
        itt = c.command(build_write(0, len(data) // BLOCK, size=10), edtl=len(data),
                        write=True, data=data)
        # Protocol error (§13.11 / §13.14): the command is rejected and not
        # executed -- no R2T, no SCSI Response -- and its slot is free.
        rej = c.recv()
        assert isinstance(rej, Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
        assert rej.rejected_itt == itt
        nop = c.ping()
        assert nop.maxcmdsn == sn_add(nop.expcmdsn, 8 - 1)
        assert c.read(0, len(data) // BLOCK)[0] == bytes(len(data))


def test_write_buffers_are_released_when_commands_arrive_together() -> None:
    """Several SCSI Commands with immediate data parsed from one receive
    each keep their own buffer, and all of them are released (a leak here
    ends in TASK SET FULL for the rest of the connection)."""
    with running_target(make_config([LunSpec(lun=0, path="", backend="memory",
                                             size=8 << 20)])) as t:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME)
            burst = b""
            for i in range(8):
                cdb = bytes([0x2A, 0]) + (i * 8).to_bytes(4, "big") + bytes([0, 0, 8, 0])
                burst += ScsiCommand(itt=100 + i, cdb=cdb, write=True,
                                     expected_data_transfer_length=4096,
                                     cmdsn=c.next_cmdsn(), data=bytes([i]) * 4096).to_bytes()
            c.send_raw(burst)  # one send: the target parses them together
            seen = set()
            while len(seen) < 8:
                pdu = c.recv()
                if isinstance(pdu, ScsiResponse):
                    seen.add(pdu.itt)
            assert t.call(lambda: t.server.write_budget.used) == 0
