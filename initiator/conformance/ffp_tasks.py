"""Full feature phase family, tasks in flight: a reused Initiator Task
Tag and a Logout while a command waits for its data (RFC 7143 §11.2.1.8,
§11.14)."""

from __future__ import annotations

from iscsi.pdu import LogoutRequest, LogoutResponse, Reject, ScsiResponse

from .context import GOOD, Context
from .describe import describe
from .model import Failed, Level, Warned, conformance_test
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
    closed, _ = w.drops_within(max(0.2, min(3.0, w.remaining() - 0.5)))
    if not closed:
        raise Warned("the connection stayed open after the Logout Response")
    return f"Logout Response {pdu.response}"
