"""Full feature phase family, tasks in flight: a reused Initiator Task
Tag, a Logout while a command waits for its data, and Data-Out PDUs that
break the R2T's terms (RFC 7143 §11.2.1.8, §11.14, §11.7, §11.8)."""

from __future__ import annotations

from iscsi.pdu import DataOut, LogoutRequest, LogoutResponse, Reject, ScsiResponse

from .context import GOOD, Context
from .describe import describe
from .model import Failed, Level, TestError, Warned, conformance_test
from .wire import PeerClosed

MUST, SHOULD = Level.MUST, Level.SHOULD
TUR = bytes(6)


@conformance_test("ffp.itt.reuse", "11.2.1.8", SHOULD,
                  "TEST UNIT READY reusing the ITT of a WRITE still waiting for its data: a "
                  "Reject, a CHECK CONDITION or a dropped connection; executing it as if "
                  "nothing were wrong is a warning", dataloss=True)
def itt_reuse(ctx: Context) -> str:
    w = ctx.session(ctx.R2T_FIRST)
    itt, _ = ctx.pending_write(w)
    ctx.command(w, TUR, itt=itt, note="ITT of the pending WRITE")
    try:
        pdu = w.next_pdu(max(ctx.config.quiet, 1.0))
    except PeerClosed:
        return "connection closed"
    if pdu is None:
        raise Warned("a command reusing an outstanding ITT got no answer at all")
    if isinstance(pdu, Reject):
        return f"Reject 0x{pdu.reason:02x}"
    if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
        if pdu.status != GOOD:
            return f"status 0x{pdu.status:02x}"
        raise Warned("a TEST UNIT READY reusing the ITT of an outstanding WRITE was executed "
                     "(the ITT must be unique among outstanding tasks, §11.2.1.8)")
    raise Warned(f"unexpected answer: {describe(pdu)}")


@conformance_test("ffp.logout.in_flight", "11.14", MUST,
                  "an immediate Logout (close the session) while a WRITE waits for its data: a "
                  "Logout Response, then the connection closes; no hang", dataloss=True)
def logout_in_flight(ctx: Context) -> str:
    w = ctx.session(ctx.R2T_FIRST)
    ctx.pending_write(w)
    litt = w.next_itt()
    w.send(LogoutRequest(itt=litt, reason=0, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                         immediate=True))
    try:
        while True:
            pdu = w.next_pdu()
            if isinstance(pdu, LogoutResponse):
                break
            if not isinstance(pdu, ScsiResponse):
                raise Failed("unexpected PDU while waiting for the Logout Response",
                             describe(pdu) if pdu else None)
    except PeerClosed:
        raise Warned("the connection closed without a Logout Response") from None
    if pdu.itt != litt:
        raise Failed("Logout Response with another ITT", describe(pdu))
    closed, _ = w.drops_within(max(0.2, w.remaining() - 0.5))
    if not closed:
        raise Warned("the connection stayed open after the Logout Response")
    return f"Logout Response {pdu.response}"


def _bad_data_out(ctx: Context, what: str, must: bool = False, **change: int) -> str:
    """Answer a WRITE's R2T with a Data-Out altered by ``change`` (the
    block's own contents, so nothing changes if it is wrongly accepted)."""
    w = ctx.session(ctx.R2T_FIRST)
    ctx.ready(w)
    blocks, size = ctx.capacity(w)
    res = ctx.run(w, bytes([0x28, 0]) + (blocks - 1).to_bytes(4, "big") + bytes([0, 0, 1, 0]),
                  read_len=size)
    if res.status != GOOD or len(res.data) != size:
        raise TestError("cannot read the last block")
    itt, _ = ctx.pending_write(w)
    r2t = ctx.last_r2t
    assert r2t is not None
    fields = {"ttt": r2t.ttt, "buffer_offset": r2t.buffer_offset, "datasn": 0, **change}
    w.send(DataOut(itt=itt, lun=r2t.lun, expstatsn=w.expstatsn, final=True,
                   data=res.data[:r2t.desired_data_transfer_length], **fields), note=what)
    try:
        pdu = w.next_pdu(max(ctx.config.quiet, 1.0))
    except PeerClosed:
        return "connection closed"
    if pdu is None:
        return "ignored"
    if isinstance(pdu, Reject):
        return f"Reject 0x{pdu.reason:02x}"
    if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
        if pdu.status == GOOD:
            # The rules bind the initiator (§11.7, §11.8); a target that
            # does not check them breaks a MUST only for offsets outside
            # the buffer it asked for.
            if not must:
                raise Warned(f"a WRITE completed with GOOD although its Data-Out had {what}")
            raise Failed(f"a WRITE completed with GOOD although its Data-Out had {what}",
                         describe(pdu))
        return f"status 0x{pdu.status:02x}"
    raise Failed(f"unexpected answer to a Data-Out with {what}", describe(pdu))


@conformance_test("ffp.dataout.offset_outside", "11.7.6", MUST,
                  "the Data-Out answering an R2T carries a Buffer Offset past the end of the "
                  "buffer: Reject, CHECK CONDITION, the PDU ignored or the connection closed; "
                  "never GOOD", dataloss=True)
def dataout_offset(ctx: Context) -> str:
    return _bad_data_out(ctx, "a Buffer Offset outside the R2T", must=True,
                         buffer_offset=1 << 20)


@conformance_test("ffp.dataout.wrong_ttt", "11.8.3", SHOULD,
                  "the Data-Out answering an R2T carries another Target Transfer Tag: Reject, "
                  "CHECK CONDITION, the PDU ignored or the connection closed; never GOOD",
                  dataloss=True)
def dataout_ttt(ctx: Context) -> str:
    r2t_ttt = 0x13572468
    return _bad_data_out(ctx, "a TTT the target never issued", ttt=r2t_ttt)


@conformance_test("ffp.dataout.datasn_gap", "11.7.5", SHOULD,
                  "the Data-Out answering an R2T starts at DataSN 5 instead of 0: Reject, "
                  "CHECK CONDITION, the PDU ignored or the connection closed; never GOOD",
                  dataloss=True)
def dataout_datasn(ctx: Context) -> str:
    return _bad_data_out(ctx, "DataSN 5 as the first of the sequence", datasn=5)
