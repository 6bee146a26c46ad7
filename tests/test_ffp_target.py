"""The target's full-feature engine in memory: PDUs in, events and PDUs
out, time passed in. No sockets, no sleeps."""

from __future__ import annotations

import itertools

import pytest

from iscsi.constants import RESERVED_TAG, RejectReason, TMFunction
from iscsi.ffp.target import (
    CloseConnection,
    ExecuteCommand,
    ManageTasks,
    TargetConnectionEngine,
    TargetParams,
    TextRequested,
    WriteBudget,
)
from iscsi.ffp.window import CmdSNWindow
from iscsi.framing import PDUReader
from iscsi.pdu import (
    PDU,
    DataIn,
    DataOut,
    NopIn,
    NopOut,
    R2T,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from iscsi.scsi.constants import Status
from iscsi.text import encode_text

WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
TUR = bytes(6)


def engine(depth: int = 8, budget: int = 256 << 20, **params: object
           ) -> TargetConnectionEngine:
    return TargetConnectionEngine(CmdSNWindow(1, depth), TargetParams(**params),  # type: ignore[arg-type]
                                  statsn=100, now=0.0, budget=WriteBudget(budget))


def sent(e: TargetConnectionEngine) -> list[PDU]:
    """Decode what the engine queued (the wire form, digests included)."""
    r = PDUReader(max_data_segment_length=1 << 24, header_digest=e.outbox.header_digest,
                  data_digest=e.outbox.data_digest)
    raw = b"".join(bytes(b) for b in e.outbox.take())
    buf = r.get_buffer(len(raw))
    out: list[PDU] = []
    view = memoryview(raw)
    while view:
        buf = r.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        out.extend(r.buffer_updated(n))
    out.extend(r.parse())
    return out


def write_cmd(itt: int, cmdsn: int, edtl: int, data: bytes = b"", final: bool = True,
              immediate: bool = False) -> ScsiCommand:
    return ScsiCommand(itt=itt, cdb=WRITE10, write=True, expected_data_transfer_length=edtl,
                       cmdsn=cmdsn, data=data, final=final, immediate=immediate)


# ------------------------------------------------------------- CmdSN window
def test_window_closes_and_reopens() -> None:
    e = engine(depth=2)
    ev = e.receive_pdu(ScsiCommand(itt=1, cdb=TUR, cmdsn=1), 0.0)
    ev += e.receive_pdu(ScsiCommand(itt=2, cdb=TUR, cmdsn=2), 0.0)
    assert [type(x) for x in ev] == [ExecuteCommand, ExecuteCommand]
    assert e.window.maxcmdsn == 2 and e.window.expcmdsn == 3  # closed
    # CmdSN 3 lies outside a closed window: ignored (§4.2.2.1).
    assert e.receive_pdu(ScsiCommand(itt=3, cdb=TUR, cmdsn=3), 0.0) == []
    e.command_done(ev[0].task, Status.GOOD, b"", None)  # type: ignore[union-attr]
    rsp = sent(e)[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.maxcmdsn == 3 and rsp.expcmdsn == 3


def test_held_command_runs_when_the_gap_closes() -> None:
    e = engine(depth=4)
    assert e.receive_pdu(ScsiCommand(itt=2, cdb=TUR, cmdsn=2), 0.0) == []
    assert e.window.active == 0  # held, no slot taken
    ev = e.receive_pdu(ScsiCommand(itt=1, cdb=TUR, cmdsn=1), 0.0)
    assert [x.task.itt for x in ev] == [1, 2]  # type: ignore[union-attr]
    assert e.window.expcmdsn == 3 and e.window.active == 2


@pytest.mark.parametrize("kind", ["nop", "text", "tmf"])
def test_held_non_scsi_pdus_do_not_leak_window_slots(kind: str) -> None:
    """120 non-immediate PDUs arriving ahead of ExpCmdSN, then the gap
    filled: the window is whole again (hardening item 5)."""
    depth = 128
    e = engine(depth=depth)

    def pdu(i: int) -> PDU:
        if kind == "nop":
            return NopOut(itt=i, cmdsn=i, immediate=False)
        if kind == "text":
            return TextRequest(itt=i, cmdsn=i, data=encode_text([("X-a", "1")]))
        return TaskMgmtRequest(itt=i, cmdsn=i, immediate=False,
                               function=TMFunction.TASK_REASSIGN)

    for i in range(2, 122):
        e.receive_pdu(pdu(i), 0.0)
    ev = e.receive_pdu(pdu(1), 0.0)
    for x in ev:
        if isinstance(x, TextRequested):
            e.text_answer(x.itt, b"")
    w = e.window
    assert w.expcmdsn == 122
    assert (w.maxcmdsn - w.expcmdsn + 1) & 0xFFFFFFFF == depth


# ------------------------------------------------------------------ writes
def _drive_write(e: TargetConnectionEngine, edtl: int, immediate_len: int,
                 unsolicited: bool, p: TargetParams) -> bytes:
    """Play a correct initiator for one WRITE; returns the data the target
    hands to SCSI."""
    payload = bytes((i * 7) & 0xFF for i in range(edtl))
    imm = payload[:immediate_len]
    cmd = write_cmd(1, 1, edtl, imm, final=not unsolicited)
    ev = e.receive_pdu(cmd, 0.0)
    offset = immediate_len
    if unsolicited:
        end = min(edtl, p.first_burst)
        datasn = 0
        while offset < end:
            n = min(p.max_xmit, end - offset)
            ev += e.receive_pdu(DataOut(itt=1, ttt=RESERVED_TAG, datasn=datasn,
                                        buffer_offset=offset, final=offset + n >= end,
                                        data=payload[offset:offset + n]), 0.0)
            offset += n
            datasn += 1
    guard = 0
    while not any(isinstance(x, ExecuteCommand) for x in ev):
        r2ts = [x for x in sent(e) if isinstance(x, R2T)]
        assert r2ts, "stalled: no R2T and no execution"
        assert len(r2ts) <= p.max_outstanding_r2t
        for r in r2ts:
            assert r.desired_data_transfer_length <= p.max_burst
            pos, end, datasn = r.buffer_offset, r.buffer_offset + r.desired_data_transfer_length, 0
            while pos < end:
                n = min(p.max_xmit, end - pos)
                ev += e.receive_pdu(DataOut(itt=1, ttt=r.ttt, datasn=datasn, buffer_offset=pos,
                                            final=pos + n >= end, data=payload[pos:pos + n]),
                                    0.0)
                pos += n
                datasn += 1
        guard += 1
        assert guard < 1000
    task = next(x.task for x in ev if isinstance(x, ExecuteCommand))
    return bytes(task.data_out())


@pytest.mark.parametrize(
    "initial_r2t, immediate_data, first_burst, max_burst, max_r2t",
    list(itertools.product([True, False], [True, False], [4096, 16384], [8192, 65536], [1, 3])))
def test_write_sequences(initial_r2t: bool, immediate_data: bool, first_burst: int,
                         max_burst: int, max_r2t: int) -> None:
    p = TargetParams(max_xmit=4096, max_burst=max_burst, first_burst=first_burst,
                     initial_r2t=initial_r2t, immediate_data=immediate_data,
                     max_outstanding_r2t=max_r2t)
    for edtl in (512, 4096, 40000):
        e = TargetConnectionEngine(CmdSNWindow(1, 8), p, statsn=0, now=0.0)
        imm = min(edtl, first_burst, p.max_xmit) if immediate_data else 0
        got = _drive_write(e, edtl, imm, not initial_r2t and imm < min(edtl, first_burst), p)
        assert got == bytes((i * 7) & 0xFF for i in range(edtl))


def test_write_buffer_is_allocated_when_data_arrives() -> None:
    e = engine()
    e.receive_pdu(write_cmd(1, 1, 64 << 20), 0.0)
    task = e.tasks[1]
    assert task.buf is None  # nothing allocated for a write whose data never came
    assert e.budget.used == 64 << 20


def test_write_budget_gives_task_set_full() -> None:
    e = engine(budget=128 << 20)
    e.receive_pdu(write_cmd(1, 1, 64 << 20), 0.0)
    e.receive_pdu(write_cmd(2, 2, 64 << 20), 0.0)
    sent(e)
    assert e.receive_pdu(write_cmd(3, 3, 64 << 20), 0.0) == []
    rsp = sent(e)[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.itt == 3 and rsp.status == Status.TASK_SET_FULL
    # Its unsolicited data is dropped silently, and the budget is whole
    # again once the connection ends.
    e.receive_pdu(DataOut(itt=3, ttt=RESERVED_TAG, data=bytes(512)), 0.0)
    assert sent(e) == []
    e.close()
    assert e.budget.used == 0


def test_w_bit_with_no_data_runs() -> None:
    e = engine()
    ev = e.receive_pdu(ScsiCommand(itt=1, cdb=TUR, write=True, cmdsn=1), 0.0)
    assert isinstance(ev[0], ExecuteCommand) and ev[0].task.data_out().nbytes == 0


def test_huge_residual_is_clamped_to_32_bits() -> None:
    e = engine()
    ev = e.receive_pdu(write_cmd(1, 1, 512, bytes(512)), 0.0)
    e.command_done(ev[0].task, Status.GOOD, b"", None, overflow=5 << 32)  # type: ignore[union-attr]
    rsp = sent(e)[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.residual_overflow
    assert rsp.residual_count == 0xFFFFFFFF


def test_out_of_order_data_out_is_a_data_phase_error() -> None:
    e = engine(initial_r2t=False, first_burst=65536)
    e.receive_pdu(write_cmd(1, 1, 8192, final=False), 0.0)
    e.receive_pdu(DataOut(itt=1, ttt=RESERVED_TAG, datasn=0, buffer_offset=4096,
                          data=bytes(4096)), 0.0)
    rsp = sent(e)[-1]
    assert isinstance(rsp, ScsiResponse) and rsp.status == Status.CHECK_CONDITION
    assert rsp.sense[2] & 0x0F == 0x0B and rsp.sense[12] == 0x4B
    assert e.window.active == 0 and e.budget.used == 0


# ------------------------------------------------------------------ Data-In
@pytest.mark.parametrize("length, max_xmit, burst", [(10000, 4096, 8192), (4096, 4096, 4096),
                                                     (1, 512, 512), (65536, 8192, 262144)])
def test_data_in_split_and_status(length: int, max_xmit: int, burst: int) -> None:
    e = engine(max_xmit=max_xmit, max_burst=burst)
    ev = e.receive_pdu(ScsiCommand(itt=9, cdb=READ10, read=True, cmdsn=1,
                                   expected_data_transfer_length=length + 100), 0.0)
    data = bytes(i & 0xFF for i in range(length))
    e.command_done(ev[0].task, Status.GOOD, b"", data)  # type: ignore[union-attr]
    pdus = sent(e)
    assert all(isinstance(p, DataIn) for p in pdus)
    assert b"".join(bytes(p.data) for p in pdus) == data  # type: ignore[union-attr]
    assert [p.datasn for p in pdus] == list(range(len(pdus)))  # type: ignore[union-attr]
    assert all(len(p.data) <= max_xmit for p in pdus)
    last = pdus[-1]
    assert isinstance(last, DataIn) and last.status_present and last.final
    assert last.residual_underflow and last.residual_count == 100
    for p in pdus:
        assert isinstance(p, DataIn)
        end = p.buffer_offset + len(p.data)
        assert p.final == (end == length or end % burst == 0)


def test_check_condition_comes_as_response_with_sense() -> None:
    e = engine()
    ev = e.receive_pdu(ScsiCommand(itt=9, cdb=READ10, read=True, cmdsn=1,
                                   expected_data_transfer_length=4096), 0.0)
    e.command_done(ev[0].task, Status.CHECK_CONDITION, b"\x70" + bytes(17), None)  # type: ignore[union-attr]
    (rsp,) = sent(e)
    assert isinstance(rsp, ScsiResponse) and rsp.status == Status.CHECK_CONDITION
    assert rsp.residual_underflow and rsp.residual_count == 4096


# -------------------------------------------------------------- NOP, timers
def test_nop_ping_and_timeout_by_advancing_now() -> None:
    e = TargetConnectionEngine(CmdSNWindow(1, 8), TargetParams(), statsn=0, now=0.0,
                               nop_interval=5.0, nop_timeout=3.0)
    assert e.get_timer() == 5.0
    e.receive_pdu(NopOut(itt=RESERVED_TAG, cmdsn=1), 2.0)  # traffic pushes the ping back
    assert e.handle_timer(5.0) == []
    assert sent(e) == [] and e.get_timer() == 7.0
    assert e.handle_timer(7.0) == []
    (ping,) = sent(e)
    assert isinstance(ping, NopIn) and ping.ttt != RESERVED_TAG
    # Answered: the next ping is one interval after the answer.
    e.receive_pdu(NopOut(itt=RESERVED_TAG, ttt=ping.ttt, cmdsn=1), 8.0)
    assert e.get_timer() == 13.0
    e.handle_timer(13.0)
    assert isinstance(sent(e)[0], NopIn)
    ev = e.handle_timer(16.0)  # unanswered for nop_timeout
    assert isinstance(ev[0], CloseConnection)


def test_nop_out_is_echoed() -> None:
    e = engine()
    e.receive_pdu(NopOut(itt=5, cmdsn=1, immediate=True, data=b"ping"), 0.0)
    (nop,) = sent(e)
    assert isinstance(nop, NopIn) and nop.itt == 5 and bytes(nop.data) == b"ping"


# --------------------------------------------------------------------- text
def test_text_request_and_answer_continuations() -> None:
    e = engine(max_xmit=512)
    first = encode_text([("X-long", "a" * 200)])
    rest = encode_text([("SendTargets", "All")])
    assert e.receive_pdu(TextRequest(itt=3, cmdsn=1, final=False, cont=True, data=first),
                         0.0) == []
    (ask,) = sent(e)
    assert isinstance(ask, TextResponse) and not ask.final and ask.ttt != RESERVED_TAG
    ev = e.receive_pdu(TextRequest(itt=3, cmdsn=2, ttt=ask.ttt, data=rest), 0.0)
    assert isinstance(ev[0], TextRequested)
    assert ev[0].pairs == [("X-long", "a" * 200), ("SendTargets", "All")]
    answer = encode_text([("TargetAddress", f"10.0.0.{i}:3260,1") for i in range(60)])
    e.text_answer(3, answer)
    got = b""
    for cmdsn in range(3, 10):
        (part,) = sent(e)
        assert isinstance(part, TextResponse) and len(part.data) <= 512
        got += bytes(part.data)
        if part.final:
            break
        assert part.cont and part.ttt != RESERVED_TAG
        e.receive_pdu(TextRequest(itt=3, cmdsn=cmdsn, ttt=part.ttt), 0.0)
    assert got == answer and cmdsn == 3 + (len(answer) - 1) // 512


# ---------------------------------------------------------------------- TMF
def test_abort_of_a_write_mid_transfer() -> None:
    e = engine()
    e.receive_pdu(write_cmd(1, 1, 65536), 0.0)
    (r2t,) = sent(e)
    ev = e.receive_pdu(TaskMgmtRequest(itt=2, cmdsn=2, function=TMFunction.ABORT_TASK,
                                       referenced_task_tag=1, immediate=True), 0.0)
    assert isinstance(ev[0], ManageTasks) and ev[0].referenced_task_tag == 1
    assert e.abort_task(e.tasks[1]) is False  # not executing: gone at once
    e.tmf_done(2, 0)
    (tmr,) = sent(e)
    assert isinstance(tmr, TaskMgmtResponse) and tmr.itt == 2
    assert e.window.active == 0 and e.budget.used == 0
    # Its Data-Out, already on the way, is dropped silently.
    e.receive_pdu(DataOut(itt=1, ttt=r2t.ttt, data=bytes(4096)), 0.0)  # type: ignore[union-attr]
    assert sent(e) == []


def test_data_out_for_unknown_task_is_rejected() -> None:
    e = engine()
    e.receive_pdu(DataOut(itt=77, ttt=5, data=bytes(16)), 0.0)
    (rej,) = sent(e)
    assert isinstance(rej, Reject) and rej.reason == RejectReason.INVALID_PDU_FIELD


def test_abort_task_of_a_command_not_yet_received() -> None:
    """RFC 7143 §11.5.1: RefCmdSN within the window and below the TMF's
    CmdSN is considered received: "Function complete", and the command is
    ignored if it arrives after all."""
    w = CmdSNWindow(1, 8)
    assert w.cancel(1, before=2)
    assert w.expcmdsn == 2 and w.active == 0  # the window moved on
    assert not w.cancel(40, before=41)  # outside the window
    assert not w.cancel(3, before=3)  # not below the TMF's own CmdSN
    ran: list[int] = []
    assert w.cancel(3, before=4)
    assert w.admit(3, False, lambda: ran.append(3)) is False  # taken: ignored
    w.admit(2, False, lambda: ran.append(2))
    assert ran == [2] and w.expcmdsn == 4
