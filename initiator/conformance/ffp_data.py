"""Full feature phase family, data transfer: Data-In sequencing, status in
Data-In, residuals, R2T rules, immediate and unsolicited data
(RFC 7143 §11.4, §11.7, §11.8, §13.10-§13.17)."""

from __future__ import annotations

from iscsi.constants import RESERVED_TAG
from iscsi.pdu import PDU, R2T, DataIn, DataOut, ScsiResponse

from .context import GOOD, CmdResult, Context
from .describe import describe
from .model import Failed, Level, NotSupported, TestError, conformance_test
from .wire import Wire

MUST, SHOULD = Level.MUST, Level.SHOULD


def _read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") \
        + bytes([0])


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") \
        + bytes([0])


def _check_data_in(res: CmdResult, edtl: int, mrdsl: int, mbl: int) -> None:
    """Every Data-In rule of §11.7 for an in-order read."""
    expect_off = 0
    seq_start = 0  # offset where the current Data-In sequence began
    for sn, d in enumerate(res.data_ins):
        pdu = describe(d)
        if d.itt != res.itt:
            raise Failed("Data-In with another ITT", pdu)
        if d.datasn != sn:
            raise Failed(f"DataSN {d.datasn}, expected {sn} (§11.7.5)", pdu)
        if d.buffer_offset != expect_off:
            raise Failed(f"Buffer Offset {d.buffer_offset}, expected {expect_off} with "
                         "DataPDUInOrder=Yes (§11.7.6, §13.18)", pdu)
        n = len(bytes(d.data))
        if n > mrdsl:
            raise Failed(f"Data-In of {n} bytes exceeds our MaxRecvDataSegmentLength "
                         f"{mrdsl} (§13.12)", pdu)
        expect_off += n
        last = sn == len(res.data_ins) - 1
        if d.status_present and not last:
            raise Failed("S bit on a Data-In that is not the last (§11.7.4)", pdu)
        if last and not d.final:
            raise Failed("the last Data-In has F=0 (§11.7.1)", pdu)
        # A sequence ends with F=1 and carries at most MaxBurstLength bytes
        # (§11.7.1, §13.13); the target may end one earlier.
        if expect_off - seq_start > mbl:
            raise Failed(f"a Data-In sequence of more than MaxBurstLength {mbl} bytes: F=0 "
                         f"through offset {expect_off} (§13.13, §11.7.1)", pdu)
        if d.final:
            seq_start = expect_off
    if expect_off != edtl:
        raise Failed(f"{expect_off} bytes of Data-In for a {edtl}-byte read")
    if isinstance(res.final, ScsiResponse) and res.final.expdatasn != len(res.data_ins):
        raise Failed(f"SCSI Response ExpDataSN {res.final.expdatasn}, {len(res.data_ins)} "
                     "Data-In PDUs were sent (§11.4.8)", describe(res.final))


def _session(ctx: Context, offers: dict[str, str | None]) -> tuple[Wire, int, int]:
    w = ctx.session(offers)
    ctx.ready(w)
    blocks, size = ctx.capacity(w)
    return w, blocks, size


@conformance_test("ffp.datain.sequence", "11.7", MUST,
                  "READ(10) of 64 KiB with our MaxRecvDataSegmentLength=4096 and "
                  "MaxBurstLength=16384: Data-In PDUs of at most 4096 bytes, DataSN 0,1,.., "
                  "contiguous offsets, F ending every sequence of at most MaxBurstLength and on "
                  "the last, status (S bit or SCSI Response with ExpDataSN = PDU count) GOOD")
def datain_sequence(ctx: Context) -> str:
    w, blocks, size = _session(ctx, {"MaxRecvDataSegmentLength": "4096",
                                     "MaxBurstLength": "16384"})
    assert w.params is not None
    n = min(blocks, max(1, 65536 // size))
    edtl = n * size
    res = ctx.run(w, _read10(0, n), read_len=edtl)
    if res.status != GOOD:
        raise Failed(f"READ(10) status 0x{res.status or 0:02x}",
                     describe(res.final) if res.final else None)
    _check_data_in(res, edtl, 4096, w.params.max_burst_length)
    how = "S bit" if isinstance(res.final, DataIn) else "SCSI Response"
    return f"{len(res.data_ins)} Data-In, status by {how}"


@conformance_test("ffp.datain.residual_underflow", "11.4.5", MUST,
                  "READ(10) of 1 block with ExpectedDataTransferLength of 2 blocks: 1 block of "
                  "data, U bit set, Residual Count = 1 block, status GOOD")
def residual_underflow(ctx: Context) -> str:
    w, _, size = _session(ctx, {})
    res = ctx.run(w, _read10(0, 1), read_len=2 * size)
    over, under, count = res.residual
    pdu = describe(res.final) if res.final else None
    if res.status != GOOD:
        raise Failed(f"status 0x{res.status or 0:02x}", pdu)
    if len(res.data) != size:
        raise Failed(f"{len(res.data)} bytes of data for a 1-block read", pdu)
    if not under or over or count != size:
        raise Failed(f"residual U={under} O={over} count={count}; expected U=1 count={size}",
                     pdu)
    return f"U, residual {count}"


@conformance_test("ffp.datain.residual_overflow", "11.4.5", MUST,
                  "READ(10) of 2 blocks with ExpectedDataTransferLength of 1 block: at most 1 "
                  "block of data, O bit set, Residual Count = 1 block")
def residual_overflow(ctx: Context) -> str:
    w, blocks, size = _session(ctx, {})
    if blocks < 2:
        raise TestError("the LUN has fewer than 2 blocks")
    res = ctx.run(w, _read10(0, 2), read_len=size)
    over, under, count = res.residual
    pdu = describe(res.final) if res.final else None
    if len(res.data) > size:
        raise Failed(f"{len(res.data)} bytes of data beyond ExpectedDataTransferLength {size}",
                     pdu)
    if res.status == GOOD and (not over or under or count != size):
        raise Failed(f"residual O={over} U={under} count={count}; expected O=1 count={size}",
                     pdu)
    if res.status != GOOD and not over:
        return f"status 0x{res.status or 0:02x} (command refused)"
    return f"O, residual {count}"


def _write_back(ctx: Context, w: Wire, lba: int, n: int, size: int) -> bytes:
    """The current contents of the blocks, so a write test leaves them as
    they were."""
    res = ctx.run(w, _read10(lba, n), read_len=n * size)
    if res.status != GOOD or len(res.data) != n * size:
        raise TestError("cannot read the blocks the write test will rewrite")
    return res.data


@conformance_test("ffp.r2t.sequence", "11.8", MUST,
                  "with InitialR2T=Yes, ImmediateData=No, MaxBurstLength=4096, a 16 KiB "
                  "WRITE(10) (of the blocks' own contents): R2Ts with TTT != 0xffffffff, "
                  "R2TSN 0,1,.., DesiredDataTransferLength <= MaxBurstLength, offsets covering "
                  "the buffer once, at most MaxOutstandingR2T outstanding; status GOOD",
                  dataloss=True)
def r2t_sequence(ctx: Context) -> str:
    w, blocks, size = _session(ctx, {"InitialR2T": "Yes", "ImmediateData": "No",
                                     "MaxBurstLength": "4096"})
    assert w.params is not None
    n = max(1, min(blocks, 16384 // size))
    lba = blocks - n
    data = _write_back(ctx, w, lba, n, size)
    itt = ctx.command(w, _write10(lba, n), write_len=len(data))
    mbl, mor2t = w.params.max_burst_length, w.params.max_outstanding_r2t
    covered = 0
    r2tsn = 0
    while True:
        pdu: PDU | None = w.expect((R2T, ScsiResponse), "an R2T or the status")
        batch: list[R2T] = []
        while isinstance(pdu, R2T):
            batch.append(pdu)
            pdu = w.next_pdu(0.3)
        if len(batch) > mor2t:
            raise Failed(f"{len(batch)} R2Ts outstanding, MaxOutstandingR2T is {mor2t} "
                         "(§13.17)", describe(batch[-1]))
        for r in batch:
            p = describe(r)
            if r.itt != itt or r.ttt == RESERVED_TAG:
                raise Failed("R2T with another ITT or TTT 0xffffffff (§11.8)", p)
            if r.r2tsn != r2tsn:
                raise Failed(f"R2TSN {r.r2tsn}, expected {r2tsn} (§11.8.2)", p)
            if r.desired_data_transfer_length > mbl:
                raise Failed(f"DesiredDataTransferLength {r.desired_data_transfer_length} > "
                             f"MaxBurstLength {mbl} (§11.8.4)", p)
            if r.buffer_offset != covered:
                raise Failed(f"R2T offset {r.buffer_offset}, expected {covered} with "
                             "DataSequenceInOrder=Yes (§13.19)", p)
            covered += r.desired_data_transfer_length
            r2tsn += 1
            ctx.answer_r2t(w, r, data)
        if pdu is None:
            continue
        if not isinstance(pdu, ScsiResponse):
            raise Failed("unexpected PDU during a write", describe(pdu))
        if covered != len(data):
            raise Failed(f"status after {covered} of {len(data)} bytes were asked for",
                         describe(pdu))
        if pdu.status != GOOD:
            raise Failed(f"WRITE status 0x{pdu.status:02x}", describe(pdu))
        return f"{r2tsn} R2Ts"


@conformance_test("ffp.data.immediate", "13.11", MUST,
                  "with ImmediateData=Yes, a 1-block WRITE(10) whose data travels in the "
                  "command PDU: no R2T, status GOOD", dataloss=True)
def immediate_data(ctx: Context) -> str:
    w, blocks, size = _session(ctx, {"ImmediateData": "Yes", "InitialR2T": "Yes"})
    assert w.params is not None
    if not w.params.immediate_data:
        raise NotSupported("target declined ImmediateData=Yes")
    data = _write_back(ctx, w, blocks - 1, 1, size)
    if len(data) > min(w.params.first_burst_length, w.params.max_xmit_data_segment_length):
        raise TestError("one block exceeds FirstBurstLength")
    itt = ctx.command(w, _write10(blocks - 1, 1), write_len=size, immediate_data=data)
    res = ctx.collect(w, itt, stop_at_r2t=True)
    if res.r2ts:
        raise Failed("an R2T for data that was all sent as immediate data", describe(res.r2ts[0]))
    if res.status != GOOD:
        raise Failed(f"status 0x{res.status or 0:02x}", describe(res.final) if res.final else None)
    return "GOOD"


@conformance_test("ffp.data.unsolicited", "13.10", MUST,
                  "with InitialR2T=No, ImmediateData=No, a WRITE(10) of FirstBurstLength + 1 "
                  "block: unsolicited Data-Out (TTT 0xffffffff) up to FirstBurstLength, then "
                  "R2Ts starting at offset FirstBurstLength; status GOOD", dataloss=True)
def unsolicited(ctx: Context) -> str:
    w, blocks, size = _session(ctx, {"InitialR2T": "No", "ImmediateData": "No",
                                     "FirstBurstLength": "8192", "MaxBurstLength": "65536"})
    assert w.params is not None
    if w.params.initial_r2t:
        raise NotSupported("target insisted on InitialR2T=Yes")
    fbl = w.params.first_burst_length
    n = fbl // size + 1
    if n > blocks:
        raise TestError("the LUN is smaller than FirstBurstLength")
    lba = blocks - n
    data = _write_back(ctx, w, lba, n, size)
    # F=0: unsolicited Data-Out follows the command (§11.3.1).
    itt = ctx.command(w, _write10(lba, n), write_len=len(data), final=False)
    seg = w.params.max_xmit_data_segment_length
    off, sn = 0, 0
    while off < fbl:
        k = min(seg, fbl - off)
        w.send(DataOut(itt=itt, lun=ctx.lun, ttt=RESERVED_TAG, expstatsn=w.expstatsn, datasn=sn,
                       buffer_offset=off, final=off + k == fbl, data=data[off:off + k]))
        off += k
        sn += 1
    res = ctx.collect(w, itt, write_data=data)
    if not res.r2ts:
        raise Failed("no R2T for the data beyond FirstBurstLength",
                     describe(res.final) if res.final else None)
    if res.r2ts[0].buffer_offset != fbl:
        raise Failed(f"first R2T at offset {res.r2ts[0].buffer_offset}, the unsolicited burst "
                     f"ended at {fbl}", describe(res.r2ts[0]))
    if res.status != GOOD:
        raise Failed(f"status 0x{res.status or 0:02x}", describe(res.final) if res.final else None)
    return f"{len(res.r2ts)} R2T(s) after {fbl} unsolicited bytes"
