"""The target's ErrorRecoveryLevel 1 (RFC 7143 §7.1.5, §7.2, §7.8, §7.9):
within-command and within-connection recovery, for
:class:`~iscsi.ffp.target.TargetConnectionEngine`.

- Data-Out: a PDU whose data digest failed is Rejected (reason 0x02) and
  discarded, a DataSN/offset gap shows a PDU lost on the way; either way
  the bytes stay missing ("holes") and, once the sequence has ended (its F
  bit, or the sequence timeout when the F-bit PDU itself was lost), a
  *recovery R2T* -- a fresh TTT and the next R2TSN -- asks for exactly the
  missing range (§7.8: wait for all of a sequence before asking again;
  §7.1.4.1 (b)/(c)). Data that arrives twice fills nothing twice.
- Status: every PDU that consumes a StatSN is kept until the initiator's
  ExpStatSN acknowledges it, and sent again on a Status SNACK (§11.16.1).
- Data-In: a read's data PDUs are kept (a copy: the backend's buffer or
  mmap may change once the command is done) until its status is
  acknowledged or a DataACK SNACK releases them; the last PDU of each
  MaxBurstLength burst asks for that DataACK with the A bit (§11.7.2).
  Data/R2T SNACK resends kept Data-In, or outstanding R2Ts (§11.16.1).
  What is kept is bounded by a per-connection byte budget and draws on the
  server-wide :class:`~iscsi.ffp.target_tasks.WriteBudget` that write data
  in flight uses (DESIGN.md: memory is a budget); StatSNs kept are capped
  too (an initiator that never advances ExpStatSN cannot make us grow).
  A read that does not fit is sent but not kept, and a SNACK for it is Rejected
  (reason 0x03, SNACK Reject); the initiator then aborts the task.
- A header digest error is NOT recovered: its DataSegmentLength cannot be
  trusted and we have no sync-and-steering layer to find the next PDU, so
  §7.8 leaves closing the connection as the only choice (the reader
  raises a FramingError; at ERL 1 that means session recovery).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..constants import RESERVED_TAG, Opcode, RejectReason, SnackType
from ..pdu import (
    PDU,
    R2T,
    Buffer,
    AsyncMessage,
    DataIn,
    LogoutResponse,
    NopIn,
    Reject,
    ScsiResponse,
    SnackRequest,
    TaskMgmtResponse,
    TextResponse,
)
from ..serial import sn_add, sn_diff, sn_le, sn_lt
from .common import Deadlines, Outbox, segments
from .target_tasks import Task, TargetParams, WriteBudget
from .window import CmdSNWindow

_U32 = struct.Struct(">I")
#: Default bytes of Data-In one connection keeps for retransmission.
DEFAULT_RETAIN_BUDGET = 64 << 20
#: Status PDUs kept awaiting ExpStatSN, at most (the oldest go first).
MAX_KEPT_STATUS = 4096
#: Seconds without progress on an open Data-Out sequence before it is
#: taken as ended (its F-bit PDU lost) and its holes asked for again.
DEFAULT_SEQUENCE_TIMEOUT = 5.0


def _consumes_statsn(pdu: PDU) -> bool:
    """PDUs that carry a StatSN of their own (§4.2.2.2): the ones a Status
    SNACK may ask for again."""
    t = type(pdu)
    if t is DataIn:
        return pdu.status_present  # type: ignore[attr-defined, no-any-return]
    if t is NopIn:
        return pdu.itt != RESERVED_TAG
    return t in _STATUS_TYPES


_STATUS_TYPES = frozenset({ScsiResponse, TaskMgmtResponse, TextResponse, LogoutResponse,
                           AsyncMessage, Reject})


class RetainingOutbox(Outbox):
    """An outbox that hands every StatSN-consuming PDU to ``keep``."""

    def __init__(self, header_digest: bool, data_digest: bool,
                 keep: Callable[[PDU], None]) -> None:
        super().__init__(header_digest, data_digest)
        self.keep = keep

    def add(self, pdu: PDU) -> None:
        """Queue one PDU (and keep it when it carries a StatSN)."""
        super().add(pdu)
        if _consumes_statsn(pdu):
            self.keep(pdu)

    def resend(self, pdu: PDU) -> None:
        """Queue a PDU already kept."""
        Outbox.add(self, pdu)


class _Kept:
    """A read's Data-In PDUs kept for Data SNACK (§11.16.1)."""

    __slots__ = ("pdus", "nbytes", "statsn", "task")

    def __init__(self, pdus: list[DataIn], nbytes: int, task: Task) -> None:
        self.pdus = pdus
        self.nbytes = nbytes
        self.task = task
        #: StatSN of the command's status, once sent.
        self.statsn: int | None = None


def _cut(holes: list[list[int]], start: int, end: int) -> None:
    """Remove [start, end) from the sorted, disjoint ``holes``."""
    out: list[list[int]] = []
    for a, b in holes:
        if b <= start or a >= end:
            out.append([a, b])
            continue
        if a < start:
            out.append([a, start])
        if b > end:
            out.append([end, b])
    holes[:] = out


class Erl1Target:
    """ErrorRecoveryLevel 1 state and exchanges of a target connection."""

    params: TargetParams
    window: CmdSNWindow
    outbox: Outbox
    statsn: int
    closed: bool
    tasks: dict[int, Task]
    _ttt_map: dict[int, Task]
    _timers: Deadlines
    _last_rx: float
    _dead_itts: dict[int, None]
    budget: WriteBudget

    if TYPE_CHECKING:  # provided by the engine
        def reject(self, reason: int, header: Buffer) -> None: ...
        def _new_ttt(self) -> int: ...
        def _execute(self, task: Task) -> None: ...
        def _forget_r2ts(self, task: Task) -> None: ...
        def _issue_r2ts(self, task: Task) -> None: ...

    def _erl1_init(self, retain_budget: int, sequence_timeout: float) -> None:
        self.erl = self.params.error_recovery_level
        self.retain_budget = retain_budget
        self.sequence_timeout = sequence_timeout
        #: StatSN -> the PDU that consumed it, until ExpStatSN passes it.
        self.kept_status: dict[int, PDU] = {}
        #: ITT -> a read's Data-In kept for retransmission.
        self.kept_data: dict[int, _Kept] = {}
        #: TTT of an A-bit Data-In -> its ITT (DataACK SNACK, §11.16.1).
        self._ack_ttts: dict[int, int] = {}
        self.kept_bytes = 0
        self.exp_statsn = self.statsn
        #: When Data-Out last made progress or an R2T went out (the
        #: sequence timeout counts from it, not from any PDU: keepalives
        #: do not make a lost Data-Out arrive).
        self._data_at = self._last_rx
        #: A NOP-In probe for unacknowledged status is out (not repeated
        #: until ExpStatSN moves).
        self._probed = False
        #: Recovery counters (tests and ``show`` read them).
        self.recovery_r2ts = 0
        self.resent_data = 0
        self.resent_status = 0
        if self.erl:
            self.outbox = RetainingOutbox(self.params.header_digest, self.params.data_digest,
                                          self._keep_status)

    # ------------------------------------------------------ acknowledgement
    def _keep_status(self, pdu: PDU) -> None:
        sn: int = pdu.statsn  # type: ignore[attr-defined]
        kept_status = self.kept_status
        if len(kept_status) >= MAX_KEPT_STATUS:
            old = kept_status.pop(next(iter(kept_status)))
            self._release_data(old.itt)
        kept_status[sn] = pdu
        if self._timers.get("probe") is None:
            self._timers.set("probe", self._last_rx + self.sequence_timeout)
        kept = self.kept_data.get(pdu.itt)
        if kept is not None and kept.statsn is None and isinstance(pdu, (ScsiResponse, DataIn)):
            kept.statsn = sn

    def _acknowledge(self, exp: int) -> None:
        """The initiator's ExpStatSN: every StatSN below it arrived (§4.2.2.2),
        so what only a Status SNACK could ask for again is released."""
        if not (sn_lt(self.exp_statsn, exp) and sn_le(exp, self.statsn)):
            return  # old, or beyond anything sent: ignored
        self.exp_statsn = exp
        self._probed = False
        kept = self.kept_status
        while kept:
            sn = next(iter(kept))
            if not sn_lt(sn, exp):
                break
            pdu = kept.pop(sn)
            data = self.kept_data.get(pdu.itt)
            if data is not None and data.statsn == sn:
                self._release_data(pdu.itt)

    def _release_data(self, itt: int) -> None:
        kept = self.kept_data.pop(itt, None)
        if kept is not None:
            self.kept_bytes -= kept.nbytes
            self.budget.release(kept.nbytes)
            for pdu in kept.pdus:
                if pdu.ack:
                    self._ack_ttts.pop(pdu.ttt, None)

    # -------------------------------------------------------------- Data-In
    def _data_in_kept(self, task: Task, mv: memoryview, status: int | None, overflow: int,
                      underflow: int, next_statsn: Callable[[], int],
                      resume: tuple[int, int] = (0, 0)) -> None:
        """Data-In at ERL 1: A bit at each burst's end (but the status
        PDU's), the PDUs kept for SNACK while the budget allows."""
        p = self.params
        w = self.window
        total = mv.nbytes
        self._release_data(task.itt)  # an ITT reused: the old one was complete
        keep = self.kept_bytes + total <= self.retain_budget and self.budget.reserve(total)
        if keep:
            # Our own copy: the backend's buffer may be reused or written.
            mv = memoryview(bytes(mv))
        residual = min(overflow or underflow, 0xFFFFFFFF)
        pdus: list[DataIn] = []
        first, start = resume
        for datasn, (offset, n, final) in enumerate(
                segments(start, total, p.max_xmit, p.max_burst), first):
            with_status = status is not None and offset + n >= total
            ack = final and not with_status and keep
            ttt = self._new_ttt() if ack else RESERVED_TAG
            pdu = DataIn(
                itt=task.itt, final=final, status_present=with_status,
                status=status if with_status and status is not None else 0, lun=task.cmd.lun,
                statsn=next_statsn() if with_status else 0, ack=ack, ttt=ttt,
                expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn, datasn=datasn, buffer_offset=offset,
                residual_overflow=with_status and bool(overflow),
                residual_underflow=with_status and bool(underflow),
                residual_count=residual if with_status else 0,
                data=mv[offset : offset + n])
            if ack:
                self._ack_ttts[ttt] = task.itt
            pdus.append(pdu)
        task.r2tsn = first + len(pdus)  # a read's Data-In count (ExpDataSN, §11.4.8)
        if keep:
            self.kept_data[task.itt] = _Kept(pdus, total, task)
            self.kept_bytes += total
        for pdu in pdus:
            self.outbox.add(pdu)

    # ---------------------------------------------------------------- SNACK
    def _erl1_snack(self, pdu: SnackRequest) -> None:
        kind = pdu.type
        if kind == SnackType.STATUS:
            self._resend_status(pdu.begrun, pdu.runlength)
        elif kind == SnackType.DATA_R2T:
            self._resend_data(pdu)
        elif kind == SnackType.DATA_ACK:
            if pdu.runlength != 0 or pdu.ttt == RESERVED_TAG:
                # §11.16.6: a DataACK has RunLength 0 and the A-bit TTT.
                self.reject(RejectReason.INVALID_DATA_ACK, pdu.to_bytes()[:48])
                return
            itt = self._ack_ttts.get(pdu.ttt)
            kept = self.kept_data.get(itt) if itt is not None else None
            if kept is None:
                return  # its data was already released with the status
            self._ack_ttts.pop(pdu.ttt, None)
            kept.task.acked_datasn = max(kept.task.acked_datasn, pdu.begrun)
            # All Data-In below BegRun arrived: they need not be kept.
            drop = [d for d in kept.pdus if d.datasn < pdu.begrun]
            kept.pdus = [d for d in kept.pdus if d.datasn >= pdu.begrun]
            freed = sum(len(d.data) for d in drop)
            kept.nbytes -= freed
            self.kept_bytes -= freed
            self.budget.release(freed)
        elif kind == SnackType.R_DATA:
            self._resegment(pdu)
        else:
            self.reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])

    def set_max_xmit(self, max_xmit: int) -> None:
        """The initiator's MaxRecvDataSegmentLength changed (a Text
        negotiation in full feature phase, §13.12): Data-In from now on,
        and what an R-Data SNACK asks for again, use the new size."""
        self.params = replace(self.params, max_xmit=max_xmit)

    def _resegment(self, pdu: SnackRequest) -> None:
        """R-Data SNACK (§11.16.1, §11.16.3): every Data-In not yet
        acknowledged, cut again to the current MaxRecvDataSegmentLength and
        numbered on from the first of them, then the status again as a SCSI
        Response carrying the SNACK Tag and the new ExpDataSN."""
        kept = self.kept_data.get(pdu.itt)
        status = next((s for s in self.kept_status.values() if s.itt == pdu.itt
                       and isinstance(s, (ScsiResponse, DataIn))), None)
        if kept is None or not kept.pdus or status is None or \
                pdu.ttt in (0, RESERVED_TAG):
            self.reject(RejectReason.SNACK_REJECT, pdu.to_bytes()[:48])
            return
        first, last = kept.pdus[0], kept.pdus[-1]
        whole = memoryview(first.data.obj)  # type: ignore[union-attr]
        start, end = first.buffer_offset, last.buffer_offset + len(last.data)
        for d in kept.pdus:
            if d.ack:
                self._ack_ttts.pop(d.ttt, None)
        w, p = self.window, self.params
        fresh = [DataIn(itt=pdu.itt, final=final, lun=first.lun, datasn=first.datasn + i,
                        buffer_offset=off, expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn,
                        data=whole[off : off + n])
                 for i, (off, n, final) in enumerate(segments(start, end, p.max_xmit,
                                                              p.max_burst))]
        kept.pdus = fresh
        assert isinstance(self.outbox, RetainingOutbox)
        for d in fresh:
            self.resent_data += 1
            self.outbox.resend(d)
        if isinstance(status, DataIn):
            resp = ScsiResponse(itt=pdu.itt, status=status.status, statsn=status.statsn,
                                residual_overflow=status.residual_overflow,
                                residual_underflow=status.residual_underflow,
                                residual_count=status.residual_count)
        else:
            resp = replace(status)
        resp.expcmdsn, resp.maxcmdsn = w.expcmdsn, w.maxcmdsn
        resp.expdatasn = first.datasn + len(fresh)
        resp.snack_tag = pdu.ttt
        self.kept_status[resp.statsn] = resp
        kept.statsn = resp.statsn
        self.outbox.resend(resp)

    def _resend_status(self, begrun: int, runlength: int) -> None:
        # RunLength 0: every status from BegRun on (§11.16.6).
        count = max(runlength or sn_diff(self.statsn, begrun), 0)
        assert isinstance(self.outbox, RetainingOutbox)
        for i in range(min(count, 1 << 16)):
            old = self.kept_status.get(sn_add(begrun, i))
            if old is not None:
                self.resent_status += 1
                self.outbox.resend(old)

    def _resend_data(self, pdu: SnackRequest) -> None:
        lo = pdu.begrun
        hi = lo + pdu.runlength if pdu.runlength else 1 << 32
        kept = self.kept_data.get(pdu.itt)
        task = self.tasks.get(pdu.itt)
        if kept is not None:
            assert isinstance(self.outbox, RetainingOutbox)
            for d in kept.pdus:
                if lo <= d.datasn < hi:
                    self.resent_data += 1
                    self.outbox.resend(d)
            return
        if task is not None and task.r2ts:
            # R2T SNACK: the outstanding R2Ts asked for again, unchanged.
            w = self.window
            for ttt, r in task.r2ts.items():
                if lo <= r[4] < hi:
                    self.outbox.add(R2T(lun=task.cmd.lun, itt=task.itt, ttt=ttt,
                                        statsn=self.statsn, expcmdsn=w.expcmdsn,
                                        maxcmdsn=w.maxcmdsn, r2tsn=r[4], buffer_offset=r[0],
                                        desired_data_transfer_length=r[1]))
            return
        if task is not None:
            return  # nothing outstanding: a late SNACK, already answered
        # Data no longer (or never) kept: the initiator must recover the
        # task itself (§11.17.1, SNACK Reject).
        self.reject(RejectReason.SNACK_REJECT, pdu.to_bytes()[:48])

    # ------------------------------------------------------------- Data-Out
    def _erl1_data_out(self, task: Task, ttt: int, offset: int, n: int, final: bool,
                       data: Buffer | None) -> bool:
        """One Data-Out (``data`` None: its digest failed, it was
        discarded). Returns False when the TTT matches nothing (the caller
        Rejects it)."""
        if task.holes is None:
            imm = len(task.cmd.data)
            task.holes = [[imm, task.edtl]] if imm < task.edtl else []
        end = offset + n
        if ttt == RESERVED_TAG:
            if end > task.unsolicited_end or task.unsol_closed:
                return task.unsol_closed  # late duplicate: drop silently
            seq_start, seq_end = 0, task.unsolicited_end
        else:
            r2t = task.r2ts.get(ttt)
            if r2t is None or self._ttt_map.get(ttt) is not task:
                return False
            seq_start, seq_end = r2t[0], r2t[0] + r2t[1]
            if offset < seq_start or end > seq_end:
                return False
            r2t[2] = max(r2t[2], end)
        if data is not None and n:
            if task.buf is None:
                task.buf = bytearray(task.edtl)
            if not (isinstance(data, memoryview) and data.obj is task.buf):
                task.buf[offset:end] = data
            _cut(task.holes, offset, end)
        if ttt == RESERVED_TAG:
            if final or end >= seq_end:
                task.unsol_closed = True
                self._recover_range(task, seq_start, seq_end)
        elif final or end >= seq_end:
            del task.r2ts[ttt]
            self._ttt_map.pop(ttt, None)
            self._recover_range(task, seq_start, seq_end)
        self._data_at = self._last_rx
        if not task.holes:
            task.received = task.edtl
            self._forget_r2ts(task)
            self._execute(task)
            return True
        task.received = task.edtl - sum(b - a for a, b in task.holes)
        if ttt != RESERVED_TAG:
            self._issue_r2ts(task)
        self._arm_sequence_timer()
        return True

    def _recover_range(self, task: Task, start: int, end: int) -> None:
        """A sequence ended: ask again, with recovery R2Ts, for what of
        [start, end) has not arrived (§7.8, §11.8)."""
        assert task.holes is not None
        w = self.window
        for a, b in task.holes:
            a, b = max(a, start), min(b, end)
            if a >= b:
                continue
            for off, length, _ in segments(a, b, self.params.max_burst):
                ttt = self._new_ttt()
                task.r2ts[ttt] = [off, length, off, 0, task.r2tsn]
                self._ttt_map[ttt] = task
                self.recovery_r2ts += 1
                self.outbox.add(R2T(lun=task.cmd.lun, itt=task.itt, ttt=ttt,
                                    statsn=self.statsn, expcmdsn=w.expcmdsn,
                                    maxcmdsn=w.maxcmdsn, r2tsn=task.r2tsn, buffer_offset=off,
                                    desired_data_transfer_length=length))
                task.r2tsn += 1

    def _erl1_data_lost(self, header: bytes) -> None:
        """A Data-Out whose data digest failed (already Rejected): the
        header is sound, so its sequence bookkeeping goes on without data."""
        itt = _U32.unpack_from(header, 16)[0]
        task = self.tasks.get(itt)
        if task is None or not task.reserved or task.executing:
            return
        ttt = _U32.unpack_from(header, 20)[0]
        offset = _U32.unpack_from(header, 40)[0]
        n = _U32.unpack_from(header, 4)[0] & 0xFFFFFF
        self._erl1_data_out(task, ttt, offset, n, bool(header[1] & 0x80), None)

    def _arm_sequence_timer(self) -> None:
        if self.erl:
            self._data_at = self._last_rx
            if self._timers.get("sequence") is None:
                self._timers.set("sequence", self._data_at + self.sequence_timeout)

    def _status_probe(self, now: float) -> None:
        """Status sent long ago is still unacknowledged and the initiator
        is silent: the last of it may have been lost, and an idle initiator
        cannot know. A NOP-In carries the next StatSN (the initiator sees
        the gap, §7.9) and asks for an answer whose ExpStatSN releases what
        arrived (§11.18.1). Once per ExpStatSN."""
        if not self.kept_status or self.exp_statsn == self.statsn or self._probed:
            return
        if now - self._last_rx < self.sequence_timeout:
            self._timers.set("probe", self._last_rx + self.sequence_timeout)
            return
        self._probed = True
        w = self.window
        self.outbox.add(NopIn(itt=RESERVED_TAG, ttt=self._new_ttt(), statsn=self.statsn,
                              expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn))

    def _sequence_timeout(self, now: float) -> None:
        """No Data-Out for a while on open sequences: their last PDU (F bit)
        or their R2T was lost (§7.1.4.1 (b)): every open sequence ends
        here and its holes are asked for again."""
        if now - self._data_at < self.sequence_timeout:
            self._timers.set("sequence", self._data_at + self.sequence_timeout)
            return
        waiting = False
        for task in list(self.tasks.values()):
            if task.executing or not task.reserved:
                continue
            if task.holes is None:
                imm = len(task.cmd.data)
                task.holes = [[imm, task.edtl]] if imm < task.edtl else []
            task.unsol_closed = True
            self._forget_r2ts(task)
            self._recover_range(task, 0, task.edtl)
            waiting = True
        if waiting:
            self._timers.set("sequence", now + self.sequence_timeout)

    def _erl1_close(self) -> None:
        for itt in list(self.kept_data):
            self._release_data(itt)
        self.kept_status.clear()
        self._ack_ttts.clear()

    def _erl1_retry(self, itt: int) -> None:
        """A command seen again with a CmdSN already used (a retry, §7.2.1):
        its outstanding R2Ts, or its status if not yet acknowledged, are
        sent again; it never runs twice."""
        task = self.tasks.get(itt)
        if task is not None:
            if task.r2ts:
                self._resend_data(SnackRequest(itt=itt, type=SnackType.DATA_R2T))
            return
        assert isinstance(self.outbox, RetainingOutbox)
        for pdu in list(self.kept_status.values()):
            if pdu.itt == itt and pdu.opcode in (Opcode.SCSI_RESPONSE, Opcode.SCSI_DATA_IN):
                kept = self.kept_data.get(itt)
                if kept is not None:
                    for d in kept.pdus:
                        if not d.status_present:
                            self.outbox.resend(d)
                self.outbox.resend(pdu)


__all__ = ["DEFAULT_RETAIN_BUDGET", "DEFAULT_SEQUENCE_TIMEOUT", "MAX_KEPT_STATUS", "Erl1Target",
           "RetainingOutbox"]
