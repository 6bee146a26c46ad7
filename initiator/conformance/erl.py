"""Error recovery family (ErrorRecoveryLevel 1 and 2: SNACK, digest
recovery, connection and task reassignment, RFC 7143 §7).

Each test first negotiates the level it needs and reports not-supported
when the target declines it. The Status and Data SNACK tests are written;
the others are declared (so the catalogue, the globs and the reports are
complete) and report not-supported, saying the kit does not check them yet.
"""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG, SnackType
from iscsi.pdu import R2T, DataIn, Reject, ScsiResponse, SnackRequest

from .context import Context
from .describe import describe
from .digests import damaged_data_out
from .model import Failed, Level, NotSupported, TestError, conformance_test
from .wire import Wire

MUST = Level.MUST


def erl_session(ctx: Context, level: int) -> Wire:
    """A session at ErrorRecoveryLevel ``level``; NotSupported when the
    target agrees to less (§13.20: result function Min)."""
    w = ctx.session({"ErrorRecoveryLevel": str(level)})
    assert w.params is not None
    got = w.params.error_recovery_level
    if got < level:
        ctx.logout(w)
        raise NotSupported(f"target declined ErrorRecoveryLevel={level} (agreed {got})")
    return w


def require_erl(ctx: Context, level: int) -> None:
    """For the declared tests: not-supported either way, saying why."""
    w = erl_session(ctx, level)
    assert w.params is not None
    got = w.params.error_recovery_level
    ctx.logout(w)
    raise NotSupported(f"target agreed ErrorRecoveryLevel={got}; this check is not "
                       "implemented in the kit yet")


def _one_block_read(ctx: Context, w: Wire) -> tuple[int, int, bytes]:
    """READ(10) of block 0; (ITT, StatSN of its status, its data). Our
    ExpStatSN stays below that status, so the target must still have it."""
    ctx.ready(w)
    _blocks, size = ctx.capacity(w)
    res = ctx.run(w, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), read_len=size)
    if res.status != 0 or res.final is None or len(res.data) != size:
        raise TestError("READ(10) of block 0 failed")
    statsn = int(getattr(res.final, "statsn"))
    w.expstatsn = statsn  # not acknowledged (§11.16.1: kept until ExpStatSN passes it)
    return res.itt, statsn, res.data


def _snack(ctx: Context, w: Wire, kind: int, itt: int, statsn: int, begrun: int,
           what: str) -> DataIn | ScsiResponse:
    """Send a SNACK for one PDU (RunLength 1) and return what answers it;
    a Reject fails the test (ERL 1 supports SNACK, §7.1.5, §11.16.1)."""
    w.send(SnackRequest(type=kind, itt=itt, lun=ctx.lun, expstatsn=statsn, begrun=begrun,
                        runlength=1), note=what)
    pdu = w.expect((ScsiResponse, DataIn, Reject), f"the answer to the {what}")
    if isinstance(pdu, Reject):
        raise Failed(f"{what} rejected at ERL 1 (§7.1.5, §11.16.1)", describe(pdu))
    assert isinstance(pdu, (DataIn, ScsiResponse))
    return pdu


@conformance_test("erl.snack.status", "11.16.1", MUST,
                  "SNACK Type 1 (Status) for the status of a READ we did not acknowledge: "
                  "the target sends that status again with the same StatSN (needs ERL 1)")
def snack_status(ctx: Context) -> str:
    w = erl_session(ctx, 1)
    itt, statsn, _ = _one_block_read(ctx, w)
    pdu = _snack(ctx, w, SnackType.STATUS, itt, statsn, statsn, "Status SNACK")
    if getattr(pdu, "statsn", None) != statsn or pdu.itt != itt or (
            isinstance(pdu, DataIn) and not pdu.status_present):
        raise Failed(f"expected the status of ITT 0x{itt:x} with StatSN {statsn} again",
                     describe(pdu))
    ctx.logout(w)
    return f"StatSN {statsn} resent"


@conformance_test("erl.snack.data", "11.16.1", MUST,
                  "SNACK Type 0 (Data/R2T) for the first Data-In of a READ we did not "
                  "acknowledge: the target resends it with the same DataSN, offset and data "
                  "(needs ERL 1)")
def snack_data(ctx: Context) -> str:
    w = erl_session(ctx, 1)
    itt, statsn, data = _one_block_read(ctx, w)
    pdu = _snack(ctx, w, SnackType.DATA_R2T, itt, statsn, 0, "Data SNACK")
    if not isinstance(pdu, DataIn) or pdu.itt != itt or pdu.datasn != 0 or pdu.buffer_offset != 0 or \
            bytes(pdu.data) != data[: len(pdu.data)]:
        raise Failed("the resent Data-In is not DataSN 0 of the READ with its data",
                     describe(pdu))
    ctx.logout(w)
    return "DataSN 0 resent"


def _declare(test_id: str, section: str, level: int, description: str) -> None:
    @conformance_test(test_id, section, MUST, description + f" (needs ERL {level})")
    def test(ctx: Context) -> str:
        require_erl(ctx, level)
        return ""


_declare("erl.snack.r_data", "11.16.1", 1,
         "R-Data SNACK: Data-In resent with a fresh DataSN sequence and the status after it")
_declare("erl.connection.reinstatement", "6.3.4", 2,
         "a new connection with the same ISID, TSIH and CID: the old one is closed, its tasks "
         "can be reassigned")
_declare("erl.task.reassign", "11.5.1", 2,
         "TASK REASSIGN of a task from a dropped connection onto a new one: response 0 and the "
         "task completes")
_declare("erl.time2retain.expiry", "13.16", 2,
         "after a connection drop, tasks are kept DefaultTime2Retain seconds, then dropped")


@conformance_test("erl.digest.data_out_recovery", "7.8", MUST,
                  "at ERL 1 the Data-Out answering an R2T has a wrong data digest: Reject "
                  "0x02, then a recovery R2T for the data (answered: GOOD) or CHECK "
                  "CONDITION; never GOOD without the data", dataloss=True)
def data_out_recovery(ctx: Context) -> str:
    w = ctx.session(dict(ctx.R2T_FIRST, DataDigest="CRC32C", ErrorRecoveryLevel="1"))
    assert w.params is not None
    if not w.dd or w.params.error_recovery_level < 1:
        ctx.logout(w)
        raise NotSupported("target declined DataDigest=CRC32C with ErrorRecoveryLevel=1")
    itt, data = damaged_data_out(ctx, w)  # the block's own contents: nothing is lost
    rejected = recovered = False
    while True:
        pdu = w.expect((Reject, R2T, ScsiResponse), "Reject 0x02 and the recovery")
        if isinstance(pdu, Reject):
            if pdu.reason != 0x02:
                raise Failed(f"Reject reason 0x{pdu.reason:02x}, expected 0x02", describe(pdu))
            rejected = True
        elif isinstance(pdu, R2T) and pdu.itt == itt:
            ctx.answer_r2t(w, pdu, data)
            recovered = True
        elif isinstance(pdu, ScsiResponse) and pdu.itt == itt:
            break
    if not rejected:
        raise Failed("no Reject (Data digest error) for the damaged Data-Out (§7.8)")
    if pdu.status == 0 and not recovered:
        raise Failed("GOOD status though the data was discarded and never asked for again",
                     describe(pdu))
    ctx.logout(w)
    return "recovery R2T, then GOOD" if recovered else f"status 0x{pdu.status:02x}"


@conformance_test("erl.snack.data_ack", "11.16.1", MUST,
                  "DataACK SNACK answering a Data-In with the A bit (MaxBurstLength 512, a "
                  "two-block READ): accepted without Reject, the session goes on (needs ERL 1)")
def snack_data_ack(ctx: Context) -> str:
    w = ctx.session({"ErrorRecoveryLevel": "1", "MaxBurstLength": "512",
                     "FirstBurstLength": "512"})
    assert w.params is not None
    if w.params.error_recovery_level < 1:
        ctx.logout(w)
        raise NotSupported("target declined ErrorRecoveryLevel=1")
    ctx.ready(w)
    _blocks, size = ctx.capacity(w)
    res = ctx.run(w, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), read_len=2 * size)
    if res.status != 0:
        raise TestError("READ(10) of blocks 0-1 failed")
    acked = [d for d in res.data_ins if d.ack]
    if not acked:
        ctx.logout(w)
        raise NotSupported("the target set no A bit (it may choose not to, §11.7.2)")
    first = acked[0]
    w.send(SnackRequest(type=SnackType.DATA_ACK, itt=RESERVED_TAG, lun=ctx.lun, ttt=first.ttt,
                        expstatsn=w.expstatsn, begrun=first.datasn + 1, runlength=0),
           note="DataACK SNACK")
    closed, seen = w.drops_within(max(ctx.config.quiet, 0.3))
    rejects = [p for p in seen if isinstance(p, Reject)]
    if closed or rejects:
        raise Failed("a DataACK SNACK was refused (§11.16.1)",
                     describe(rejects[0]) if rejects else None)
    if not ctx.alive(w):
        raise Failed("the session did not go on after a DataACK SNACK")
    ctx.logout(w)
    return f"DataACK for DataSN {first.datasn} accepted"

