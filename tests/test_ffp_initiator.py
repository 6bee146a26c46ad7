# mypy: disable-error-code="arg-type"
"""The initiator's full-feature engine in memory: the target's PDUs crafted
by hand and fed in with ``now``; what the engine sends decoded back. No
sockets, no sleeps."""

from __future__ import annotations

import pytest

from iscsi.constants import RESERVED_TAG, AsyncEvent, RejectReason, TMFunction, TMResponse
from iscsi.ffp.initiator import (
    AsyncNotice,
    Command,
    CommandCompleted,
    CommandFailed,
    ConnectionFailed,
    Event,
    ExchangeFailed,
    InitiatorEngine,
    InitiatorParams,
    TaskManagementDone,
    TextDone,
)
from iscsi.ffp.initiator_recovery import RecoveryPolicy
from iscsi.framing import PDUReader
from iscsi.pdu import (
    PDU,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LogoutRequest,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from iscsi.text import encode_text

READ = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
WRITE = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
KiB = 1024


def engine(depth: int = 8, **kw: object) -> InitiatorEngine:
    opts = {k: kw.pop(k) for k in list(kw) if k in (
        "nop_interval", "nop_timeout", "command_timeout", "tmf_timeout", "queue_depth")}
    return InitiatorEngine(InitiatorParams(**kw), cmdsn=1, expcmdsn=1,
                           maxcmdsn=depth, exp_statsn=10, now=0.0, **opts)


def sent(e: InitiatorEngine) -> list[PDU]:
    r = PDUReader(max_data_segment_length=1 << 24)
    raw = memoryview(b"".join(bytes(b) for b in e.outbox.take()))
    out: list[PDU] = []
    while raw:
        buf = r.get_buffer(len(raw))
        n = min(len(buf), len(raw))
        buf[:n] = raw[:n]
        raw = raw[n:]
        out.extend(r.buffer_updated(n))
    return out


def read_cmd(e: InitiatorEngine, n: int = 4 * KiB, now: float = 0.0) -> Command:
    c = Command(0, READ, data_in=memoryview(bytearray(n)))
    e.submit(c, now)
    return c


def write_cmd(e: InitiatorEngine, n: int, now: float = 0.0) -> Command:
    c = Command(0, WRITE, data_out=memoryview(bytes(range(256)) * (n // 256)))
    e.submit(c, now)
    return c


def window(statsn: int = 10, exp: int = 1, mx: int = 8) -> dict[str, int]:
    return {"statsn": statsn, "expcmdsn": exp, "maxcmdsn": mx}


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# -------------------------------------------------------------- window
def test_window_closes_and_reopens_on_responses() -> None:
    e = engine(depth=2)
    cmds = [read_cmd(e) for _ in range(4)]
    assert [p.cmdsn for p in sent(e) if isinstance(p, ScsiCommand)] == [1, 2]
    # A response that closes the window (MaxCmdSN = ExpCmdSN - 1) ...
    ev = e.receive_pdu(ScsiResponse(itt=cmds[0].itt, status=0, residual_underflow=True,
                                    residual_count=4 * KiB, **window(10, 3, 2)), 0.0)
    assert kinds(ev) == ["CommandCompleted"] and sent(e) == []
    # ... and one that opens it again.
    e.receive_pdu(NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, **window(11, 3, 4)), 0.0)
    assert [p.cmdsn for p in sent(e) if isinstance(p, ScsiCommand)] == [3, 4]
    # A stale or invalid window never shrinks ours.
    e.receive_pdu(NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, **window(11, 9, 2)), 0.0)
    assert e.window.max_cmdsn == 4


# ---------------------------------------------------------- Data-Out
@pytest.mark.parametrize(("initial_r2t", "immediate", "first", "imm", "unsol"), [
    (True, False, 64 * KiB, 0, 0),
    (True, True, 64 * KiB, 8 * KiB, 0),
    (False, False, 16 * KiB, 0, 16 * KiB),
    (False, True, 16 * KiB, 8 * KiB, 8 * KiB),
    (False, True, 4 * KiB, 4 * KiB, 0),
])
def test_immediate_and_unsolicited_within_first_burst(initial_r2t: bool, immediate: bool,
                                                      first: int, imm: int, unsol: int) -> None:
    e = engine(initial_r2t=initial_r2t, immediate_data=immediate, first_burst=first,
               max_xmit=8 * KiB, max_burst=32 * KiB)
    c = write_cmd(e, 64 * KiB)
    pdus = sent(e)
    cmd = pdus[0]
    assert isinstance(cmd, ScsiCommand) and len(cmd.data) == imm
    assert cmd.final is (unsol == 0)
    outs = [p for p in pdus[1:] if isinstance(p, DataOut)]
    assert sum(len(p.data) for p in outs) == unsol
    assert all(p.ttt == RESERVED_TAG and len(p.data) <= 8 * KiB for p in outs)
    assert [p.datasn for p in outs] == list(range(len(outs)))
    # The R2Ts ask for the rest, in order; the answers split by MRDSL.
    offset, r2tsn = imm + unsol, 0
    while offset < 64 * KiB:
        n = min(32 * KiB, 64 * KiB - offset)
        e.receive_pdu(R2T(itt=c.itt, ttt=100 + r2tsn, r2tsn=r2tsn, buffer_offset=offset,
                          desired_data_transfer_length=n, **window()), 0.0)
        outs = [p for p in sent(e) if isinstance(p, DataOut)]
        assert [(p.buffer_offset, len(p.data)) for p in outs] == \
            [(o, min(8 * KiB, offset + n - o)) for o in range(offset, offset + n, 8 * KiB)]
        assert outs[-1].final and not any(p.final for p in outs[:-1])
        offset += n
        r2tsn += 1
    ev = e.receive_pdu(ScsiResponse(itt=c.itt, status=0, **window()), 0.0)
    assert kinds(ev) == ["CommandCompleted"]


@pytest.mark.parametrize(("offset", "length", "why"), [
    (0, 4 * KiB, "repeats"),
    (4 * KiB, 0xFFFFFFFF, "beyond"),
    (8 * KiB, 4 * KiB, "gap"),
    (4 * KiB, 0, "nothing"),
])
def test_r2t_that_repeats_or_exceeds_is_a_violation(offset: int, length: int, why: str) -> None:
    e = engine(initial_r2t=True, immediate_data=False, max_burst=4 * KiB)
    c = write_cmd(e, 16 * KiB)
    sent(e)
    e.receive_pdu(R2T(itt=c.itt, ttt=1, r2tsn=0, buffer_offset=0,
                      desired_data_transfer_length=4 * KiB, **window()), 0.0)
    assert len(sent(e)) == 1
    ev = e.receive_pdu(R2T(itt=c.itt, ttt=2, r2tsn=1, buffer_offset=offset,
                           desired_data_transfer_length=length, **window()), 0.0)
    assert kinds(ev) == ["ConnectionFailed"] and ev[0].violation  # type: ignore[union-attr]
    assert sent(e) == [] and c.violation is not None


def test_r2t_over_max_burst_or_for_a_read_is_a_violation() -> None:
    e = engine(initial_r2t=True, immediate_data=False, max_burst=4 * KiB)
    c = write_cmd(e, 16 * KiB)
    r = read_cmd(e)
    sent(e)
    ev = e.receive_pdu(R2T(itt=c.itt, ttt=1, buffer_offset=0,
                           desired_data_transfer_length=8 * KiB, **window()), 0.0)
    assert kinds(ev) == ["ConnectionFailed"]
    ev = e.receive_pdu(R2T(itt=r.itt, ttt=1, buffer_offset=0,
                           desired_data_transfer_length=KiB, **window()), 0.0)
    assert kinds(ev) == ["ConnectionFailed"]


# ----------------------------------------------------------- Data-In
def test_data_in_in_pieces_with_status_and_residual() -> None:
    e = engine()
    c = read_cmd(e, 8 * KiB)
    sent(e)
    for i in range(3):
        ev = e.receive_pdu(DataIn(itt=c.itt, datasn=i, buffer_offset=i * 2 * KiB,
                                  data=bytes([i + 1]) * 2 * KiB, final=i == 2,
                                  status_present=i == 2, residual_underflow=True,
                                  residual_count=2 * KiB, **window()), 0.0)
    assert len(ev) == 1 and isinstance(ev[0], CommandCompleted)
    assert (ev[0].received, ev[0].residual, ev[0].underflow) == (6 * KiB, 2 * KiB, True)
    assert c.data_in is not None and bytes(c.data_in[4 * KiB : 6 * KiB]) == b"\x03" * 2 * KiB
    assert e.exp_statsn == 11


@pytest.mark.parametrize("pdus", ["partial", "none"])
def test_good_status_without_the_data_is_an_error(pdus: str) -> None:
    # Issue 9 item 8: 512 of 4096 bytes (or none) with GOOD and no residual.
    e = engine()
    c = read_cmd(e, 4 * KiB)
    sent(e)
    if pdus == "partial":
        e.receive_pdu(DataIn(itt=c.itt, datasn=0, data=b"x" * 512, **window()), 0.0)
    ev = e.receive_pdu(ScsiResponse(itt=c.itt, status=0, **window()), 0.0)
    assert kinds(ev) == ["CommandFailed"]
    assert isinstance(ev[0], CommandFailed) and ev[0].kind == "short"
    assert not e.tasks


def test_check_condition_without_data_is_not_short() -> None:
    e = engine()
    c = read_cmd(e)
    sent(e)
    ev = e.receive_pdu(ScsiResponse(itt=c.itt, status=2, data=ScsiResponse.sense_segment(
        bytes([0x70, 0, 5] + [0] * 15)), **window()), 0.0)
    assert isinstance(ev[0], CommandCompleted) and ev[0].status == 2 and ev[0].sense


@pytest.mark.parametrize(("datasn", "offset", "size"), [
    (1, 0, 512), (0, 512, 512), (0, 0, 8 * KiB)])
def test_data_in_out_of_order_or_beyond_is_a_violation(datasn: int, offset: int,
                                                       size: int) -> None:
    e = engine()
    c = read_cmd(e, 4 * KiB)
    sent(e)
    ev = e.receive_pdu(DataIn(itt=c.itt, datasn=datasn, buffer_offset=offset,
                              data=bytes(size), **window()), 0.0)
    assert kinds(ev) == ["ConnectionFailed"]


def test_iscsi_target_failure_and_reject() -> None:
    e = engine()
    a, b = read_cmd(e), read_cmd(e)
    pdus = sent(e)
    ev = e.receive_pdu(ScsiResponse(itt=a.itt, response=1, status=0, **window()), 0.0)
    assert isinstance(ev[0], CommandFailed) and ev[0].kind == "target"
    ev = e.receive_pdu(Reject(reason=RejectReason.INVALID_PDU_FIELD,
                              data=pdus[1].to_bytes()[:48], **window()), 0.0)
    assert isinstance(ev[0], CommandFailed) and ev[0].command is b and ev[0].kind == "rejected"


# ------------------------------------------------------------ timeouts
def test_read_never_answered_times_out_and_escalates() -> None:
    e = engine(command_timeout=30.0, tmf_timeout=5.0, nop_interval=None)
    c = read_cmd(e, now=0.0)
    sent(e)
    # Slow drip: Data-In keeps arriving, the deadline stands.
    e.receive_pdu(DataIn(itt=c.itt, datasn=0, data=b"x" * 512, **window()), 20.0)
    assert e.get_timer() == 30.0
    assert e.handle_timer(30.0) == []
    (tmf,) = sent(e)
    assert isinstance(tmf, TaskMgmtRequest) and tmf.function == TMFunction.ABORT_TASK
    assert tmf.referenced_task_tag == c.itt and tmf.refcmdsn == c.cmdsn
    # Refused: LOGICAL UNIT RESET next.
    e.receive_pdu(TaskMgmtResponse(itt=tmf.itt, response=TMResponse.FUNCTION_REJECTED,
                                   **window()), 31.0)
    (reset,) = sent(e)
    assert isinstance(reset, TaskMgmtRequest)
    assert reset.function == TMFunction.LOGICAL_UNIT_RESET
    # No answer: session recovery.
    assert e.get_timer() == 36.0
    assert kinds(e.handle_timer(36.0)) == ["ConnectionFailed"]
    assert e.close() == [c] and c.timed_out


def test_abort_answered_fails_the_command_with_timeout() -> None:
    e = engine(command_timeout=1.0)
    c = read_cmd(e)
    sent(e)
    e.handle_timer(1.0)
    (tmf,) = sent(e)
    ev = e.receive_pdu(TaskMgmtResponse(itt=tmf.itt, response=TMResponse.FUNCTION_COMPLETE,
                                        **window()), 1.5)
    assert isinstance(ev[0], CommandFailed) and ev[0].kind == "timeout" and ev[0].command is c
    assert not e.tasks and e.get_timer() is None


def test_nop_timeout_by_advancing_now() -> None:
    e = engine(nop_interval=5.0, nop_timeout=3.0)
    # Traffic postpones the ping.
    e.receive_pdu(NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, **window()), 4.0)
    assert e.handle_timer(5.0) == [] and sent(e) == []
    assert e.get_timer() == 9.0
    e.handle_timer(9.0)
    (ping,) = sent(e)
    assert isinstance(ping, NopOut) and ping.immediate and ping.itt != RESERVED_TAG
    assert kinds(e.handle_timer(12.0)) == ["ConnectionFailed"]


def test_target_ping_is_echoed_without_advancing_cmdsn() -> None:
    e = engine()
    e.receive_pdu(NopIn(itt=RESERVED_TAG, ttt=77, data=b"hi", **window()), 0.0)
    (out,) = sent(e)
    assert isinstance(out, NopOut) and (out.ttt, out.itt, bytes(out.data)) == \
        (77, RESERVED_TAG, b"hi")
    assert e.cmdsn == 1


# ----------------------------------------------------- text, TMF, async
def test_text_continuation_from_the_target() -> None:
    e = engine(max_xmit=512)
    itt = e.text(encode_text([("SendTargets", "All")]), 0.0)
    (req,) = sent(e)
    assert isinstance(req, TextRequest) and req.final
    whole = encode_text([("TargetName", "iqn.2024-01.test:" + "x" * 200)] * 3)
    ev = e.receive_pdu(TextResponse(itt=itt, final=False, cont=True, ttt=5, data=whole[:300],
                                    **window()), 0.0)
    assert ev == []
    (more,) = sent(e)
    assert isinstance(more, TextRequest) and more.ttt == 5 and not more.data
    ev = e.receive_pdu(TextResponse(itt=itt, final=True, data=whole[300:], **window(11)), 0.0)
    assert isinstance(ev[0], TextDone) and len(ev[0].pairs) == 3


def test_tmf_lun_reset_ends_that_luns_commands() -> None:
    e = engine()
    a = read_cmd(e)
    b = Command(1, READ, data_in=memoryview(bytearray(512)))
    e.submit(b, 0.0)
    sent(e)
    itt = e.task_management(TMFunction.LOGICAL_UNIT_RESET, 0.0, lun=0)
    ev = e.receive_pdu(TaskMgmtResponse(itt=itt, **window()), 0.0)
    assert [type(x) for x in ev] == [CommandFailed, TaskManagementDone]
    assert isinstance(ev[0], CommandFailed) and ev[0].command is a
    assert list(e.tasks.values()) == [b]


def test_async_message_and_rejected_exchange() -> None:
    e = engine()
    sense = bytes([0x70, 0, 6] + [0] * 15)
    ev = e.receive_pdu(AsyncMessage(async_event=AsyncEvent.SCSI_ASYNC_EVENT, lun=5,
                                    data=len(sense).to_bytes(2, "big") + sense, **window()), 0.0)
    assert ev == [AsyncNotice(0, 5, sense, 0, 0, 0)]
    itt = e.ping(0.0)
    (ping,) = sent(e)
    ev = e.receive_pdu(Reject(reason=RejectReason.PROTOCOL_ERROR, data=ping.to_bytes()[:48],
                              **window()), 0.0)
    assert ev == [ExchangeFailed(itt, "target rejected a PDU: protocol error")]


def test_logout_stops_sending_commands() -> None:
    e = engine(depth=1)
    a, b = read_cmd(e), read_cmd(e)
    sent(e)
    e.logout(0.0)
    e.receive_pdu(ScsiResponse(itt=a.itt, status=0, residual_underflow=True,
                               residual_count=4 * KiB, **window(10, 2, 2)), 0.0)
    assert [type(p) for p in sent(e)] == [LogoutRequest]
    assert e.close() == [b]


# ------------------------------------------------------------ recovery
def test_recovery_policy_bounds_reissues_and_paces_logins() -> None:
    policy = RecoveryPolicy(command_retries=2, backoff_first=0.05, backoff_max=0.3)
    cmd = Command(0, READ)
    # A target that fails every connection right after its login.
    waits = []
    for t in range(6):
        policy.logged_in(float(t))
        waits.append(policy.connection_failed(t + 0.01))
        assert policy.give_up() is (t >= 3)
    assert waits == [0.0, 0.05, 0.1, 0.2, 0.3, 0.3]
    # One that worked for a while recovers at once again.
    policy.logged_in(100.0)
    assert policy.connection_failed(200.0) == 0.0
    policy.connection_failed(200.1)
    policy.command_completed()
    assert policy.connection_failed(200.2) == 0.0
    for attempts, ok in ((1, True), (2, True), (3, False)):
        cmd.attempts = attempts
        assert policy.reissue(cmd) is ok
    assert policy.login_retry_delay(0.0) == 0.05 and policy.login_retry_delay(0.8) == 1.0


def test_abandoned_text_exchange_does_not_block_the_next() -> None:
    e = engine()
    first = e.text(encode_text([("SendTargets", "All")]), 0.0)
    second = e.text(encode_text([("SendTargets", "All")]), 1.0)
    sent(e)
    assert e.receive_pdu(TextResponse(itt=first, final=True, **window()), 1.0) == []
    ev = e.receive_pdu(TextResponse(itt=second, final=True,
                                    data=encode_text([("TargetName", "iqn.x:y")]),
                                    **window(11)), 1.0)
    assert ev == [TextDone(second, [("TargetName", "iqn.x:y")])]
