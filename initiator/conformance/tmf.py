"""Task management family: ABORT TASK of unknown, completed and pending
tasks, ABORT/CLEAR TASK SET, LOGICAL UNIT RESET with its unit attention,
TARGET WARM RESET, unsupported functions (RFC 7143 §11.5, §11.6;
SAM-5)."""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG, TMFunction, TMResponse
from iscsi.pdu import (
    NopIn,
    NopOut,
    Reject,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    encode_lun,
)

from .context import CHECK_CONDITION, GOOD, Context
from .describe import describe
from .model import Failed, Level, NotSupported, Warned, conformance_test
from .wire import Wire

MUST, SHOULD = Level.MUST, Level.SHOULD
TUR = bytes(6)


def tmf(ctx: Context, w: Wire, function: int, *, rtt: int = RESERVED_TAG, refcmdsn: int = 0,
        lun: int | None = None) -> TaskMgmtResponse:
    """Send an immediate TMF request; its response (ITT checked, §11.6)."""
    itt = w.next_itt()
    w.send(TaskMgmtRequest(itt=itt, function=function, lun=ctx.lun if lun is None else lun,
                           referenced_task_tag=rtt, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                           refcmdsn=refcmdsn, immediate=True))
    while True:
        pdu = w.expect((TaskMgmtResponse, ScsiResponse), "the Task Management Response")
        if isinstance(pdu, TaskMgmtResponse):
            if pdu.itt != itt:
                raise Failed("Task Management Response with another ITT (§11.6)", describe(pdu))
            return pdu


def _name(code: int) -> str:
    try:
        return f"{code} ({TMResponse(code).name.replace('_', ' ').lower()})"
    except ValueError:
        return str(code)


@conformance_test("tmf.abort_task.unknown", "11.5.1", MUST,
                  "ABORT TASK of a tag never used, RefCmdSN outside the CmdSN window: "
                  "response 1 (Task does not exist)")
def abort_unknown(ctx: Context) -> str:
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.ABORT_TASK, rtt=0x7A7A7A, refcmdsn=(w.cmdsn - 1000) & 0xFFFFFFFF)
    if r.response != TMResponse.TASK_DOES_NOT_EXIST:
        raise Failed(f"response {_name(r.response)}, expected 1 (Task does not exist)",
                     describe(r))
    return "Task does not exist"


@conformance_test("tmf.abort_task.completed", "11.5.1", MUST,
                  "ABORT TASK of a command that already completed (RefCmdSN below ExpCmdSN): "
                  "response 1 (Task does not exist); 0 (Function complete) is a warning")
def abort_completed(ctx: Context) -> str:
    w = ctx.session()
    sn = w.cmdsn
    itt = ctx.command(w, TUR)
    ctx.collect(w, itt)
    r = tmf(ctx, w, TMFunction.ABORT_TASK, rtt=itt, refcmdsn=sn)
    if r.response == TMResponse.TASK_DOES_NOT_EXIST:
        return "Task does not exist"
    if r.response == TMResponse.FUNCTION_COMPLETE:
        raise Warned("Function complete for a task that had completed (§11.5.1 c: RefCmdSN "
                     "outside the window means Task does not exist)")
    raise Failed(f"response {_name(r.response)}", describe(r))


@conformance_test("tmf.abort_task.pending", "11.5.1", MUST,
                  "a WRITE(10) waiting for its R2T data is aborted: response 0 (Function "
                  "complete), no status for the aborted task, the session goes on",
                  dataloss=True)
def abort_pending(ctx: Context) -> str:
    w = ctx.session(ctx.R2T_FIRST)
    itt, sn = ctx.pending_write(w)
    r = tmf(ctx, w, TMFunction.ABORT_TASK, rtt=itt, refcmdsn=sn)
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"response {_name(r.response)}, expected 0 (Function complete)",
                     describe(r))
    _no_status_for(ctx, w, itt)
    return "Function complete"


def _no_status_for(ctx: Context, w: Wire, itt: int) -> None:
    """The session answers a ping and no status for ``itt`` shows up
    (SAM-5: an aborted task gets no status)."""
    tag = w.next_itt()
    w.send(NopOut(itt=tag, ttt=RESERVED_TAG, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                  immediate=True))
    while True:
        pdu = w.expect((NopIn, ScsiResponse), "the ping's NOP-In")
        if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
            raise Failed("the aborted task still got a status (SAM-5: aborted tasks end "
                         "without status)", describe(pdu))
        if isinstance(pdu, NopIn) and pdu.itt == tag:
            return


@conformance_test("tmf.lun_reset.mid_transfer", "11.5.1", MUST,
                  "LOGICAL UNIT RESET while a WRITE(10) waits for its data: response 0 "
                  "(Function complete), the write ends without status, the session goes on",
                  dataloss=True)
def lun_reset_mid_transfer(ctx: Context) -> str:
    w = ctx.session(ctx.R2T_FIRST)
    itt, _ = ctx.pending_write(w)
    r = tmf(ctx, w, TMFunction.LOGICAL_UNIT_RESET)
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"LOGICAL UNIT RESET response {_name(r.response)}", describe(r))
    _no_status_for(ctx, w, itt)
    return "Function complete"


@conformance_test("tmf.abort_task_set.idle", "11.5.1", MUST,
                  "ABORT TASK SET on the LUN with nothing outstanding: response 0 (Function "
                  "complete)")
def abort_task_set(ctx: Context) -> str:
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.ABORT_TASK_SET)
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"response {_name(r.response)}", describe(r))
    return "Function complete"


@conformance_test("tmf.clear_task_set.idle", "11.5.1", MUST,
                  "CLEAR TASK SET on the LUN: response 0, or 5 (not supported) which reports "
                  "not-supported", dataloss=True)
def clear_task_set(ctx: Context) -> str:
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.CLEAR_TASK_SET)
    if r.response == TMResponse.FUNCTION_NOT_SUPPORTED:
        raise NotSupported("CLEAR TASK SET not supported")
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"response {_name(r.response)}", describe(r))
    return "Function complete"


@conformance_test("tmf.lun_reset.unit_attention", "SAM-5 §5.8.3 (LOGICAL UNIT RESET)", MUST,
                  "LOGICAL UNIT RESET from one session: response 0; another I_T nexus then gets "
                  "CHECK CONDITION, UNIT ATTENTION, ASC 29h (reset occurred)", dataloss=True)
def lun_reset(ctx: Context) -> str:
    other = ctx.session(url=ctx.config.url2)
    ctx.ready(other)
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.LOGICAL_UNIT_RESET)
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"LOGICAL UNIT RESET response {_name(r.response)}", describe(r))
    res = ctx.run(other, TUR)
    sense = res.sense
    if res.status != CHECK_CONDITION or sense is None:
        raise Failed("the other nexus got no unit attention after the reset",
                     describe(res.final) if res.final else None)
    if sense.key != 0x06 or sense.asc != 0x29:
        raise Failed(f"sense {sense.key:x}/{sense.asc:02x}/{sense.ascq:02x}, expected "
                     "6/29/xx", describe(res.final) if res.final else None)
    if ctx.run(other, TUR).status != GOOD:
        raise Failed("the unit attention was reported more than once")
    return f"UA 29/{sense.ascq:02x}"


@conformance_test("tmf.target_warm_reset.response", "11.5.1", MUST,
                  "TARGET WARM RESET: response 0, or 5/6 (not supported / not authorized) "
                  "which report not-supported", dataloss=True)
def warm_reset(ctx: Context) -> str:
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.TARGET_WARM_RESET)
    if r.response in (TMResponse.FUNCTION_NOT_SUPPORTED,
                      TMResponse.FUNCTION_AUTHORIZATION_FAILED):
        raise NotSupported(f"TARGET WARM RESET: {_name(r.response)}")
    if r.response != TMResponse.FUNCTION_COMPLETE:
        raise Failed(f"response {_name(r.response)}", describe(r))
    return "Function complete"


@conformance_test("tmf.function.undefined", "11.6.1", MUST,
                  "a Task Management Request with undefined function 0x0e: response 5 "
                  "(Function not supported) or 255 (Function rejected; §11.6.1 does not say "
                  "which); a Reject is a warning")
def undefined_function(ctx: Context) -> str:
    w = ctx.session()
    itt = w.next_itt()
    w.send(TaskMgmtRequest(itt=itt, function=0x0E, lun=ctx.lun, cmdsn=w.cmdsn,
                           expstatsn=w.expstatsn, immediate=True))
    pdu = w.expect((TaskMgmtResponse, Reject), "the Task Management Response")
    if isinstance(pdu, Reject):
        raise Warned(f"an undefined function was rejected (reason 0x{pdu.reason:02x}); "
                     "§11.6.1 has response 5")
    assert isinstance(pdu, TaskMgmtResponse)
    if pdu.response not in (TMResponse.FUNCTION_NOT_SUPPORTED, TMResponse.FUNCTION_REJECTED):
        raise Failed(f"response {_name(pdu.response)}, expected 5 or 255", describe(pdu))
    return _name(pdu.response)


@conformance_test("tmf.task_reassign.erl0", "11.5.1", MUST,
                  "TASK REASSIGN at ErrorRecoveryLevel 0: response 4 (Task allegiance "
                  "reassignment not supported); 1, 3 or 5 are warnings")
def reassign_erl0(ctx: Context) -> str:
    w = ctx.session({"ErrorRecoveryLevel": "0"})
    r = tmf(ctx, w, TMFunction.TASK_REASSIGN, rtt=0x5A5A5A, refcmdsn=w.cmdsn)
    if r.response == TMResponse.TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED:
        return "Task allegiance reassignment not supported"
    if r.response in (1, 3, 5):
        raise Warned(f"response {_name(r.response)}; at ERL 0 §11.5.1 asks for 4")
    raise Failed(f"response {_name(r.response)}", describe(r))


@conformance_test("tmf.lun.nonexistent", "11.6.1", SHOULD,
                  "ABORT TASK SET addressed to LUN 16383 (not configured): response 2 "
                  "(LUN does not exist)")
def lun_nonexistent(ctx: Context) -> str:
    w = ctx.session()
    r = tmf(ctx, w, TMFunction.ABORT_TASK_SET, lun=encode_lun(16383))
    if r.response == TMResponse.LUN_DOES_NOT_EXIST:
        return "LUN does not exist"
    raise Warned(f"response {_name(r.response)} for a LUN that does not exist")
