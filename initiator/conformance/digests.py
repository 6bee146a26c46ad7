"""Digest family: CRC32C negotiation and the answers to header and data
digest errors at ErrorRecoveryLevel 0 (RFC 7143 §7.8, §13.1)."""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG
from iscsi.pdu import DataOut, NopIn, NopOut, Reject, ScsiCommand, ScsiResponse, TextRequest
from iscsi.text import encode_text

from .context import Context
from .describe import describe
from .model import Failed, Level, NotSupported, TestError, conformance_test
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


@conformance_test("digests.header.bad_command", "7.8", MUST,
                  "a TEST UNIT READY with a wrong header digest at ERL 0: the connection is "
                  "closed, or the PDU discarded (never executed)")
def bad_header_command(ctx: Context) -> str:
    w = _digest_session(ctx, True, False)
    itt = w.next_itt()
    w.send(ScsiCommand(itt=itt, lun=ctx.lun, cdb=bytes(6), cmdsn=w.cmdsn,
                       expstatsn=w.expstatsn), bad_header_digest=True,
           note="header digest corrupted")
    closed, seen = w.drops_within(max(ctx.config.quiet, 0.5))
    for pdu in seen:
        if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
            raise Failed("a command with a wrong header digest was executed (§7.8)",
                         describe(pdu))
    return "connection closed" if closed else "discarded"


def _last_block(ctx: Context, w: Wire, blocks: int, size: int) -> bytes:
    cdb = bytes([0x28, 0]) + (blocks - 1).to_bytes(4, "big") + bytes([0, 0, 1, 0])
    res = ctx.run(w, cdb, read_len=size)
    if res.status != 0 or len(res.data) != size:
        raise TestError("cannot read the last block")
    return res.data


def _bad_data_answer(ctx: Context, w: Wire, itt: int, what: str) -> str:
    """Reject 0x02, a CHECK CONDITION for the command, or a closed
    connection conform; GOOD status means the damaged PDU was accepted."""
    try:
        pdu = w.next_pdu(max(0.5, min(5.0, w.remaining() - 0.5)))
    except PeerClosed:
        return "connection closed"
    if pdu is None:
        raise Failed(f"no answer to a data digest error on {what} (§7.8)")
    if isinstance(pdu, Reject):
        if pdu.reason != 0x02:
            raise Failed(f"Reject reason 0x{pdu.reason:02x}, expected 0x02 (Data digest error)",
                         describe(pdu))
        return "Reject 0x02"
    if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
        if pdu.status == 0:
            raise Failed(f"{what} with a wrong data digest completed with GOOD status (§7.8)",
                         describe(pdu))
        return f"status 0x{pdu.status:02x}"
    raise Failed(f"unexpected answer to a data digest error on {what}", describe(pdu))


@conformance_test("digests.data.bad_text", "7.8", MUST,
                  "a Text Request (SendTargets) with a wrong data digest at ERL 0: Reject 0x02 "
                  "or the connection closed; never answered as valid")
def bad_text(ctx: Context) -> str:
    w = _digest_session(ctx, False, True)
    itt = w.next_itt()
    w.send(TextRequest(itt=itt, cmdsn=w.cmdsn, expstatsn=w.expstatsn, immediate=True,
                       data=encode_text([("SendTargets", "All")])),
           bad_data_digest=True, note="data digest corrupted")
    try:
        pdu = w.next_pdu(max(0.5, min(5.0, w.remaining() - 0.5)))
    except PeerClosed:
        return "connection closed"
    if isinstance(pdu, Reject) and pdu.reason == 0x02:
        return "Reject 0x02"
    raise Failed("expected Reject reason 0x02 (Data digest error)",
                 describe(pdu) if pdu else None)


@conformance_test("digests.data.bad_immediate", "7.8", MUST,
                  "a WRITE(10) whose immediate data has a wrong data digest at ERL 0: Reject "
                  "0x02, CHECK CONDITION or the connection closed; never GOOD", dataloss=True)
def bad_immediate(ctx: Context) -> str:
    w = _digest_session(ctx, False, True)
    assert w.params is not None
    if not w.params.immediate_data:
        raise NotSupported("target declined ImmediateData")
    ctx.ready(w)
    blocks, size = ctx.capacity(w)
    if size > min(w.params.first_burst_length, w.params.max_xmit_data_segment_length):
        raise TestError("one block does not fit in immediate data")
    # The block's own contents: a target that wrongly accepts the PDU
    # still changes nothing.
    data = _last_block(ctx, w, blocks, size)
    cdb = bytes([0x2A, 0]) + (blocks - 1).to_bytes(4, "big") + bytes([0, 0, 1, 0])
    itt = w.next_itt()
    w.send(ScsiCommand(itt=itt, lun=ctx.lun, cdb=cdb, expected_data_transfer_length=size,
                       cmdsn=w.next_cmdsn(), expstatsn=w.expstatsn, write=True, data=data),
           bad_data_digest=True, note="data digest corrupted")
    return _bad_data_answer(ctx, w, itt, "immediate data")


@conformance_test("digests.data.bad_data_out", "7.8", MUST,
                  "the Data-Out answering an R2T has a wrong data digest at ERL 0: Reject "
                  "0x02, CHECK CONDITION or the connection closed; never GOOD", dataloss=True)
def bad_data_out(ctx: Context) -> str:
    w = ctx.session(dict(ctx.R2T_FIRST, DataDigest="CRC32C"))
    if not w.dd:
        raise NotSupported("target declined DataDigest=CRC32C")
    itt, _ = damaged_data_out(ctx, w)
    return _bad_data_answer(ctx, w, itt, "a Data-Out")


def damaged_data_out(ctx: Context, w: Wire) -> tuple[int, bytes]:
    """A WRITE(10) of the last block (its own contents, read first) whose
    Data-Out answering the R2T carries a wrong data digest; the session was
    opened with ``ctx.R2T_FIRST``. Returns (ITT, the block's data)."""
    ctx.ready(w)
    blocks, size = ctx.capacity(w)
    data = _last_block(ctx, w, blocks, size)
    itt, _ = ctx.pending_write(w)
    r2t = ctx.last_r2t
    assert r2t is not None
    end = r2t.buffer_offset + r2t.desired_data_transfer_length
    w.send(DataOut(itt=itt, lun=r2t.lun, ttt=r2t.ttt, expstatsn=w.expstatsn, datasn=0,
                   buffer_offset=r2t.buffer_offset, final=True,
                   data=data[r2t.buffer_offset:end]),
           bad_data_digest=True, note="data digest corrupted")
    return itt, data
