"""Full feature phase family: NOP, the CmdSN window, StatSN, Text
(SendTargets), Logout and Reject (RFC 7143 §4.2.2, §11.10-§11.19)."""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG
from iscsi.errors import ProtocolError
from iscsi.pdu import (
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiResponse,
    SnackRequest,
    TextRequest,
    TextResponse,
)
from iscsi.serial import sn_gt
from iscsi.text import decode_text, encode_text

from .context import GOOD, Context
from .describe import describe
from .model import Failed, Level, TestError, Warned, conformance_test
from .wire import PeerClosed, Wire

MUST, SHOULD = Level.MUST, Level.SHOULD
TUR = bytes(6)


@conformance_test("ffp.nop.ping_echo", "11.19", MUST,
                  "NOP-Out ping (ITT set, TTT 0xffffffff, 40 data bytes): NOP-In with the same "
                  "ITT, TTT 0xffffffff and the data echoed")
def ping_echo(ctx: Context) -> str:
    w = ctx.session()
    payload = bytes(range(40))
    nop = ctx.ping(w, payload)
    if nop.ttt != RESERVED_TAG:
        raise Failed(f"NOP-In answering a ping has TTT 0x{nop.ttt:x}, not 0xffffffff (§11.19)",
                     describe(nop))
    if bytes(nop.data) != payload:
        raise Failed("NOP-In does not echo the ping's data (§11.19)", describe(nop))
    return "echoed"


@conformance_test("ffp.nop.no_reply_reserved_itt", "11.18", MUST,
                  "NOP-Out with ITT 0xffffffff (I=1): no NOP-In answers it; a ping that "
                  "follows is answered first")
def nop_no_reply(ctx: Context) -> str:
    w = ctx.session()
    w.send(NopOut(itt=RESERVED_TAG, ttt=RESERVED_TAG, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                  immediate=True))
    itt = w.next_itt()
    w.send(NopOut(itt=itt, ttt=RESERVED_TAG, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                  immediate=True))
    pdu = w.expect(NopIn, "the ping's NOP-In")
    if pdu.itt != itt:
        raise Failed("a NOP-Out with ITT 0xffffffff was answered (§11.18: no response)",
                     describe(pdu))
    return "not answered"


@conformance_test("ffp.cmdsn.advance", "4.2.2.1", MUST,
                  "a non-immediate TEST UNIT READY with CmdSN=ExpCmdSN: the response's ExpCmdSN "
                  "is CmdSN+1 and MaxCmdSN >= ExpCmdSN-1")
def cmdsn_advance(ctx: Context) -> str:
    w = ctx.session()
    sn = w.cmdsn
    itt = ctx.command(w, TUR)
    res = ctx.collect(w, itt)
    p = res.final
    if not isinstance(p, ScsiResponse):
        raise Failed("TEST UNIT READY got no SCSI Response", describe(p) if p else None)
    if p.expcmdsn != (sn + 1) & 0xFFFFFFFF:
        raise Failed(f"ExpCmdSN {p.expcmdsn} after CmdSN {sn}; expected {sn + 1}", describe(p))
    if sn_gt((p.expcmdsn - 1) & 0xFFFFFFFF, p.maxcmdsn):
        raise Failed("MaxCmdSN < ExpCmdSN-1 (§4.2.2.1)", describe(p))
    return f"ExpCmdSN {p.expcmdsn}, MaxCmdSN {p.maxcmdsn}"


@conformance_test("ffp.cmdsn.immediate", "4.2.2.1", MUST,
                  "an immediate TEST UNIT READY (I=1) carries CmdSN=ExpCmdSN without advancing "
                  "it: the response's ExpCmdSN is unchanged and the next non-immediate command "
                  "with the same CmdSN is executed")
def cmdsn_immediate(ctx: Context) -> str:
    w = ctx.session()
    sn = w.cmdsn
    res = ctx.collect(w, ctx.command(w, TUR, immediate=True))
    p = res.final
    if res.reject is not None:
        raise Warned("the target rejected an immediate SCSI command (reason "
                     f"0x{res.reject.reason:02x}); §3.2.2.1 lets it")
    if not isinstance(p, ScsiResponse):
        raise Failed("no SCSI Response", describe(p) if p else None)
    if p.expcmdsn != sn:
        raise Failed(f"an immediate command moved ExpCmdSN from {sn} to {p.expcmdsn}",
                     describe(p))
    res = ctx.collect(w, ctx.command(w, TUR))
    if res.final is None:
        raise Failed("the non-immediate command after it was not answered")
    return "ExpCmdSN unchanged"


def _ignored(ctx: Context, w: Wire, cmdsn: int, what: str) -> str:
    itt = ctx.command(w, TUR, cmdsn=cmdsn, note=what)
    try:
        pdu = w.next_pdu(ctx.config.quiet)
    except PeerClosed as exc:
        raise Warned(f"the target closed the connection on a {what}; §4.2.2.1 says to "
                     "silently ignore it") from exc
    if pdu is not None:
        if isinstance(pdu, Reject):
            raise Warned(f"a {what} was rejected (reason 0x{pdu.reason:02x}); "
                         "§4.2.2.1 says to silently ignore it")
        raise Failed(f"a {what} was answered; it MUST be ignored (§4.2.2.1)", describe(pdu))
    # The session must go on with the right CmdSN.
    res = ctx.collect(w, ctx.command(w, TUR))
    if res.final is None:
        raise Failed("the in-window command after it got no status")
    if getattr(res.final, "itt", None) == itt:
        raise Failed(f"the {what} was executed", describe(res.final))
    return "ignored"


@conformance_test("ffp.cmdsn.too_high", "4.2.2.1", MUST,
                  "TEST UNIT READY with CmdSN = MaxCmdSN+1000 (outside the window): silently "
                  "ignored; the session goes on")
def cmdsn_high(ctx: Context) -> str:
    w = ctx.session()
    return _ignored(ctx, w, (w.maxcmdsn + 1000) & 0xFFFFFFFF, "command above MaxCmdSN")


@conformance_test("ffp.cmdsn.too_low", "4.2.2.1", MUST,
                  "TEST UNIT READY with the CmdSN of a command already executed: silently "
                  "ignored (a duplicate); the session goes on")
def cmdsn_low(ctx: Context) -> str:
    w = ctx.session()
    ctx.collect(w, ctx.command(w, TUR))
    return _ignored(ctx, w, (w.cmdsn - 1) & 0xFFFFFFFF, "command with an old CmdSN")


@conformance_test("ffp.statsn.sequence", "4.2.2.2", MUST,
                  "five commands in a row: their responses carry consecutive StatSNs, the "
                  "first being the ExpStatSN of the login")
def statsn_sequence(ctx: Context) -> str:
    w = ctx.session()
    expect = w.expstatsn
    for _ in range(5):
        res = ctx.collect(w, ctx.command(w, TUR))
        p = res.final
        if not isinstance(p, ScsiResponse):
            raise Failed("no SCSI Response", describe(p) if p else None)
        if p.statsn != expect:
            raise Failed(f"StatSN {p.statsn}, expected {expect} (§4.2.2.2)", describe(p))
        expect = (expect + 1) & 0xFFFFFFFF
    return "consecutive"


def _text(w: Wire, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One Text exchange (continuations gathered); checks §11.11 rules."""
    itt = w.next_itt()
    out: list[tuple[str, str]] = []
    data, ttt = encode_text(pairs), RESERVED_TAG
    raw = b""
    for _ in range(64):
        w.send(TextRequest(itt=itt, ttt=ttt, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                           immediate=True, final=True, data=data))
        resp = w.expect(TextResponse, "a Text Response")
        assert isinstance(resp, TextResponse)
        if resp.itt != itt:
            raise Failed("Text Response with another ITT (§11.11)", describe(resp))
        raw += bytes(resp.data)
        if resp.final:
            if resp.ttt != RESERVED_TAG:
                raise Failed("final Text Response (F=1) with TTT other than 0xffffffff (§11.11.4)",
                             describe(resp))
            try:
                out = decode_text(raw)
            except ProtocolError as exc:
                raise Failed(f"Text Response does not decode: {exc} (§6.1)",
                             describe(resp)) from exc
            return out
        if resp.ttt == RESERVED_TAG:
            raise Failed("Text Response with C/F=0 but TTT 0xffffffff (§11.11.4)", describe(resp))
        data, ttt = b"", resp.ttt
    raise Failed("Text Response never final")


@conformance_test("ffp.text.sendtargets_discovery", "13.3", MUST,
                  "a Discovery session's SendTargets=All: Text Response(s) listing the "
                  "URL's TargetName, final one with TTT 0xffffffff")
def sendtargets_discovery(ctx: Context) -> str:
    # Discovery authentication is configured apart from the target's on
    # most targets: try the URL's CHAP credentials, then none.
    try:
        w = _discovery(ctx, True)
    except TestError:
        w = _discovery(ctx, False)
    got = _text(w, [("SendTargets", "All")])
    names = [v for k, v in got if k == "TargetName"]
    if ctx.target not in names:
        raise Failed(f"SendTargets=All lists {names}, not {ctx.target}")
    ctx.logout(w)
    return f"{len(names)} target(s)"


def _discovery(ctx: Context, chap: bool) -> Wire:
    return ctx.session({"MaxConnections": None, "InitialR2T": None, "ImmediateData": None,
                     "MaxBurstLength": None, "FirstBurstLength": None,
                     "MaxOutstandingR2T": None, "DataPDUInOrder": None,
                     "DataSequenceInOrder": None, "DefaultTime2Wait": None,
                     "DefaultTime2Retain": None, "ErrorRecoveryLevel": None},
                    discovery=True, chap=chap)


@conformance_test("ffp.text.sendtargets_normal", "13.3", SHOULD,
                  "SendTargets= (empty: this session's target) in a Normal session: a final "
                  "Text Response naming the session's target only")
def sendtargets_normal(ctx: Context) -> str:
    w = ctx.session()
    try:
        got = _text(w, [("SendTargets", "")])
    except Failed as exc:
        raise Warned(str(exc)) from exc
    names = [v for k, v in got if k == "TargetName"]
    if names and names != [ctx.target]:
        raise Warned(f"SendTargets= in a Normal session listed {names}")
    if not names:
        raise Warned("SendTargets= in a Normal session listed no target")
    return "session's target"


@conformance_test("ffp.logout.session", "11.15", MUST,
                  "Logout (close the session): Logout Response 0 with our ITT, then the target "
                  "closes the connection")
def logout_session(ctx: Context) -> str:
    w = ctx.session()
    itt = w.next_itt()
    w.send(LogoutRequest(itt=itt, reason=0, cmdsn=w.next_cmdsn(), expstatsn=w.expstatsn))
    resp = w.expect(LogoutResponse, "the Logout Response")
    assert isinstance(resp, LogoutResponse)
    if resp.itt != itt or resp.response != 0:
        raise Failed(f"Logout Response ITT 0x{resp.itt:x} response {resp.response}",
                     describe(resp))
    closed, _ = w.drops_within(max(0.2, w.remaining() - 0.5))
    if not closed:
        raise Warned("the connection stayed open after a successful Logout (§11.15: the "
                     "target closes it)")
    return "closed"


@conformance_test("ffp.logout.after_commands", "11.14", MUST,
                  "three commands, then a non-immediate Logout: the commands' statuses come "
                  "first, then the Logout Response")
def logout_after(ctx: Context) -> str:
    w = ctx.session()
    itts = [ctx.command(w, TUR) for _ in range(3)]
    litt = w.next_itt()
    w.send(LogoutRequest(itt=litt, reason=0, cmdsn=w.next_cmdsn(), expstatsn=w.expstatsn))
    seen: list[int] = []
    while True:
        pdu = w.expect((ScsiResponse, LogoutResponse), "statuses and the Logout Response")
        if isinstance(pdu, LogoutResponse):
            break
        seen.append(pdu.itt)
    if sorted(seen) != sorted(itts):
        raise Failed(f"Logout Response came before the statuses of {set(itts) - set(seen)}")
    return "in order"


@conformance_test("ffp.reject.reserved_opcode", "11.17.1", MUST,
                  "a PDU with reserved initiator opcode 0x1c: Reject, reason 0x05 (Command not "
                  "supported) or 0x04, echoing the header; the session goes on")
def reserved_opcode(ctx: Context) -> str:
    w = ctx.session()

    def opcode(h: bytearray) -> None:
        h[0] = 0x40 | 0x1C
    sent = w.send(NopOut(itt=w.next_itt(), cmdsn=w.cmdsn, expstatsn=w.expstatsn), mutate=opcode)
    return _rejected(ctx, w, sent, {0x05, 0x04})


@conformance_test("ffp.reject.target_opcode", "11.17.1", MUST,
                  "an initiator sending a target opcode (0x20 NOP-In): Reject 0x04/0x05, "
                  "echoing the header; the session goes on")
def target_opcode(ctx: Context) -> str:
    w = ctx.session()

    def opcode(h: bytearray) -> None:
        h[0] = 0x20
    sent = w.send(NopOut(itt=w.next_itt(), cmdsn=w.cmdsn, expstatsn=w.expstatsn), mutate=opcode)
    return _rejected(ctx, w, sent, {0x05, 0x04})


@conformance_test("ffp.reject.snack_erl0", "7.1.1", MUST,
                  "a SNACK at ErrorRecoveryLevel 0: Reject (0x04 Protocol error, 0x03 SNACK "
                  "reject or 0x05), echoing the header; the session goes on")
def snack_erl0(ctx: Context) -> str:
    w = ctx.session({"ErrorRecoveryLevel": "0"})
    sent = w.send(SnackRequest(itt=RESERVED_TAG, type=1, expstatsn=w.expstatsn, begrun=0,
                               runlength=0))
    return _rejected(ctx, w, sent, {0x03, 0x04, 0x05})


def _rejected(ctx: Context, w: Wire, sent: bytes, reasons: set[int]) -> str:
    try:
        pdu = w.next_pdu(max(0.5, min(5.0, w.remaining() - 0.5)))
    except PeerClosed as exc:
        raise Warned("the target closed the connection instead of sending a Reject") from exc
    if pdu is None:
        raise Failed("no Reject (§11.17.1)")
    if not isinstance(pdu, Reject):
        raise Failed("answered with something other than a Reject", describe(pdu))
    if pdu.reason not in reasons:
        raise Failed(f"Reject reason 0x{pdu.reason:02x}, expected one of "
                     f"{', '.join(f'0x{r:02x}' for r in sorted(reasons))}", describe(pdu))
    if bytes(pdu.data[:48]) != sent:
        raise Failed("the Reject does not carry the rejected PDU's header (§11.17.2)",
                     describe(pdu))
    if not ctx.alive(w):
        raise Failed("the session stopped answering after the Reject")
    return f"Reject 0x{pdu.reason:02x}"


@conformance_test("ffp.scsi.tur_good", "SAM-5 §5.3", MUST,
                  "TEST UNIT READY after unit attentions are cleared: GOOD, SCSI Response "
                  "with Response 0x00 and our ITT")
def tur_good(ctx: Context) -> str:
    w = ctx.session()
    ctx.ready(w)
    res = ctx.collect(w, ctx.command(w, TUR))
    p = res.final
    if not isinstance(p, ScsiResponse) or p.status != GOOD or p.response != 0:
        raise Failed("TEST UNIT READY not GOOD", describe(p) if p else None)
    return "GOOD"
