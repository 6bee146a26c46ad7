"""Digest family: CRC32C negotiation and the answers to header and data
digest errors at ErrorRecoveryLevel 0 (RFC 7143 §7.8, §13.1)."""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG
from iscsi.pdu import NopIn, NopOut, Reject

from .context import Context
from .describe import describe
from .model import Failed, Level, NotSupported, conformance_test
from .wire import PeerClosed, Wire

MUST = Level.MUST


def _digest_session(ctx: Context, header: bool, data: bool) -> Wire:
    offers = {"HeaderDigest": "CRC32C" if header else "None",
              "DataDigest": "CRC32C" if data else "None", "ErrorRecoveryLevel": "0"}
    w = ctx.session(offers)
    if (header and not w.hd) or (data and not w.dd):
        raise NotSupported("target declined CRC32C")
    return w


@conformance_test("digests.crc32c.ping", "13.1", MUST,
                  "HeaderDigest=CRC32C and DataDigest=CRC32C agreed: a ping with data is "
                  "answered with correct digests on both")
def crc_ping(ctx: Context) -> str:
    w = _digest_session(ctx, True, True)
    nop = ctx.ping(w, b"digest check 12345")
    if bytes(nop.data) != b"digest check 12345":
        raise Failed("NOP-In data differs", describe(nop))
    return "digests correct"


@conformance_test("digests.header.bad", "7.8", MUST,
                  "a NOP-Out ping with a wrong header digest at ERL 0: the connection is "
                  "closed, or the PDU silently discarded (never answered)")
def bad_header(ctx: Context) -> str:
    w = _digest_session(ctx, True, False)
    itt = w.next_itt()
    w.send(NopOut(itt=itt, ttt=RESERVED_TAG, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                  immediate=True), bad_header_digest=True, note="header digest corrupted")
    closed, seen = w.drops_within(max(ctx.config.quiet, 0.5))
    for pdu in seen:
        if isinstance(pdu, NopIn) and pdu.itt == itt:
            raise Failed("a PDU with a wrong header digest was acted upon (§7.8)",
                         describe(pdu))
    if closed:
        return "connection closed"
    if not ctx.alive(w):
        return "connection closed"
    return "discarded"


@conformance_test("digests.data.bad", "7.8", MUST,
                  "a NOP-Out ping whose data has a wrong data digest at ERL 0: Reject reason "
                  "0x02 (Data digest error) or the connection closed; never echoed")
def bad_data(ctx: Context) -> str:
    w = _digest_session(ctx, False, True)
    itt = w.next_itt()
    sent = w.send(NopOut(itt=itt, ttt=RESERVED_TAG, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                         immediate=True, data=b"corrupted on purpose"),
                  bad_data_digest=True, note="data digest corrupted")
    try:
        pdu = w.next_pdu(max(0.5, min(5.0, w.remaining() - 0.5)))
    except PeerClosed:
        return "connection closed"
    if pdu is None:
        raise Failed("no answer to a data digest error (§7.8: Reject with reason 0x02)")
    if isinstance(pdu, NopIn) and pdu.itt == itt:
        raise Failed("data with a wrong digest was accepted and echoed (§7.8)", describe(pdu))
    if not isinstance(pdu, Reject) or pdu.reason != 0x02:
        raise Failed("expected Reject reason 0x02 (Data digest error)", describe(pdu))
    if bytes(pdu.data[:48]) != sent:
        raise Failed("the Reject does not carry the rejected header (§11.17.2)", describe(pdu))
    return "Reject 0x02"
