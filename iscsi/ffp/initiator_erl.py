"""The initiator's ErrorRecoveryLevel 1 (RFC 7143 §7.1.5, §7.2, §7.8, §7.9,
§11.16), for :class:`~iscsi.ffp.initiator.InitiatorEngine`.

- Data-In: a PDU whose data digest failed (its header is sound) or a
  DataSN gap (a PDU lost on the way) is asked for again with a Data SNACK
  (BegRun, RunLength); a command's status waits until every DataSN below
  the last has arrived, so a caller never sees a hole. A SCSI Response
  whose ExpDataSN names Data-In we never saw does the same (§7.9).
  Data that arrives twice is placed once: a DataSN already received is
  dropped.
- A-bit Data-In is acknowledged with a DataACK SNACK once nothing below it
  is missing (§11.7.2).
- Status: ExpStatSN only moves over StatSNs actually received; a StatSN
  gap (seen on a later status, or on a NOP-In's StatSN -- our keepalive
  turns silence into that probe) is asked for with a Status SNACK, and a
  status PDU whose digest failed is treated the same way.
- R2T: recovery R2Ts (a range asked for again, a fresh TTT) are answered;
  an R2TSN gap is asked for with an R2T SNACK.
- Reject (Data Digest Error) of a Data-Out: nothing to do, the target asks
  again with a recovery R2T; of a SCSI Command (its immediate data): the
  command is retried -- same ITT, CmdSN and data (§7.2.1). A command the
  target never got (its ExpCmdSN in the answer to our keepalive stays at
  or below it) is retried the same way.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..constants import RESERVED_TAG, Opcode, RejectReason, SnackType
from ..pdu import R2T, DataIn, Reject, ScsiResponse, SnackRequest
from ..serial import sn_add, sn_diff, sn_le, sn_lt
from .initiator_tasks import Command, CommandFailed

if TYPE_CHECKING:
    from .initiator import InitiatorEngine

_U32 = struct.Struct(">I")
#: A StatSN gap wider than this is not a loss but a broken target: it is
#: skipped (as at ERL 0) rather than remembered.
MAX_STATUS_GAP = 4096
_STATUS_OPCODES = frozenset({Opcode.SCSI_RESPONSE, Opcode.TASK_MGMT_RESPONSE,
                             Opcode.TEXT_RESPONSE, Opcode.LOGOUT_RESPONSE,
                             Opcode.ASYNC_MESSAGE, Opcode.REJECT})


class Erl1:
    """ErrorRecoveryLevel 1 state of one initiator connection."""

    def __init__(self, engine: InitiatorEngine) -> None:
        self.e = engine
        #: StatSNs received beyond a gap (ExpStatSN stays at the gap).
        self.early: set[int] = set()
        #: StatSNs asked for with a Status SNACK and not yet received.
        self.missing_status: set[int] = set()
        #: Keepalive ITT -> our CmdSN when it was sent (lost commands).
        self.pings: dict[int, int] = {}
        #: Recovery counters (tests read them).
        self.snacks = 0
        self.retries = 0

    # ------------------------------------------------------------- helpers
    def _snack(self, kind: int, itt: int = RESERVED_TAG, begrun: int = 0, runlength: int = 0,
               ttt: int = RESERVED_TAG, lun: bytes | int = 0) -> None:
        self.snacks += 1
        lun_field = lun if isinstance(lun, int) else int.from_bytes(lun, "big")
        self.e.outbox.add(SnackRequest(type=kind, itt=itt, ttt=ttt, lun=lun_field,
                                       expstatsn=self.e.exp_statsn, begrun=begrun,
                                       runlength=runlength))

    # -------------------------------------------------------------- status
    def status_seen(self, sn: int) -> None:
        """A status with StatSN ``sn`` arrived."""
        e = self.e
        exp = e.exp_statsn
        if sn_lt(sn, exp):
            return  # a duplicate (resent on a SNACK we no longer need)
        self.missing_status.discard(sn)
        if sn == exp:
            exp = sn_add(exp, 1)
            while exp in self.early:
                self.early.discard(exp)
                exp = sn_add(exp, 1)
            e.exp_statsn = exp
            return
        if sn_diff(sn, exp) > MAX_STATUS_GAP:
            self.early.clear()
            self.missing_status.clear()
            e.exp_statsn = sn_add(sn, 1)
            return
        self.early.add(sn)
        self._want_status(exp, sn)

    def probe(self, next_sn: int) -> None:
        """A StatSN that is the *next* one (a NOP-In ping's): everything
        below it should have arrived."""
        exp = self.e.exp_statsn
        if sn_lt(exp, next_sn) and sn_diff(next_sn, exp) <= MAX_STATUS_GAP:
            self._want_status(exp, next_sn)

    def _want_status(self, start: int, end: int) -> None:
        """Ask again for the StatSNs in [start, end) not received nor asked."""
        sn = start
        run_start: int | None = None
        count = 0
        while sn != end:
            new = sn not in self.early and sn not in self.missing_status
            if new:
                self.missing_status.add(sn)
                if run_start is None:
                    run_start, count = sn, 0
                count += 1
            if (not new or sn_add(sn, 1) == end) and run_start is not None:
                self._snack(SnackType.STATUS, begrun=run_start, runlength=count)
                run_start = None
            sn = sn_add(sn, 1)

    def resend_wanted(self) -> None:
        """The keepalive found the connection idle with gaps still open:
        the SNACKs (or their answers) were lost, ask again."""
        for sn in sorted(self.missing_status, key=lambda s: sn_diff(s, self.e.exp_statsn)):
            self._snack(SnackType.STATUS, begrun=sn, runlength=1)
        for cmd in list(self.e.tasks.values()):
            if cmd.missing:
                for d in sorted(cmd.missing):
                    self._snack(SnackType.DATA_R2T, cmd.itt, d, 1, lun=cmd.lun_field)

    # ------------------------------------------------------------- Data-In
    def on_data_in(self, pdu: DataIn) -> None:
        e = self.e
        e._window(pdu)
        cmd = e.tasks.get(pdu.itt)
        if cmd is None:
            if pdu.status_present:
                self.status_seen(pdu.statsn)
            return
        d = pdu.datasn
        if d < cmd.next_datasn and d not in cmd.missing:
            return  # a duplicate: its data is already in place
        data = pdu.data
        dlen = len(data)
        if dlen:
            off = pdu.buffer_offset
            if cmd.data_in is None:
                raise e._violation(cmd, f"Data-In for a command that reads nothing "
                                        f"(CDB 0x{cmd.cdb[0]:02x})")
            if off + dlen > cmd.in_len:
                raise e._violation(cmd, f"Data-In beyond the expected length {cmd.in_len}")
            if not (isinstance(data, memoryview) and data.obj is cmd.data_in.obj):
                cmd.data_in[off : off + dlen] = data
            cmd.received = max(cmd.received, off + dlen)
        self._data_arrived(cmd, d)
        if pdu.ack:
            cmd.ack_ttt = pdu.ttt
        if pdu.status_present:
            self.status_seen(pdu.statsn)
            cmd.held = (pdu.status, b"", pdu.residual_count, pdu.residual_underflow,
                        pdu.residual_overflow)
        self._settle(cmd)

    def _data_arrived(self, cmd: Command, d: int) -> None:
        if d > cmd.next_datasn:
            # §7.9: a DataSN gap means PDUs lost (or discarded): ask again.
            for m in range(cmd.next_datasn, d):
                cmd.missing.add(m)
            self._snack(SnackType.DATA_R2T, cmd.itt, cmd.next_datasn, d - cmd.next_datasn,
                        lun=cmd.lun_field)
        cmd.missing.discard(d)
        cmd.next_datasn = max(cmd.next_datasn, d + 1)

    def _settle(self, cmd: Command) -> None:
        """Acknowledge and complete what no missing Data-In holds back."""
        if cmd.missing:
            return
        if cmd.ack_ttt is not None:
            # DataACK: every Data-In below BegRun arrived (§11.16.1); the
            # TTT names the task, the ITT is reserved (§11.16).
            self._snack(SnackType.DATA_ACK, RESERVED_TAG, cmd.next_datasn, 0, ttt=cmd.ack_ttt,
                        lun=cmd.lun_field)
            cmd.ack_ttt = None
        if cmd.held is not None:
            status, sense, residual, under, over = cmd.held
            cmd.held = None
            self.e._complete(cmd, status, sense, residual, under, over)

    def on_response(self, pdu: ScsiResponse) -> None:
        e = self.e
        self.status_seen(pdu.statsn)
        e._window(pdu)
        cmd = e.tasks.get(pdu.itt)
        if cmd is None or cmd.held is not None:
            return
        if pdu.response != 0:
            cmd.failure = (f"target failure (iSCSI response 0x{pdu.response:02x}) for CDB "
                           f"0x{cmd.cdb[0]:02x}")
        if cmd.data_in is not None and pdu.expdatasn > cmd.next_datasn:
            # ExpDataSN: Data-In sent that we never saw (§7.9).
            self._data_arrived(cmd, pdu.expdatasn)
            cmd.missing.discard(pdu.expdatasn)
            cmd.next_datasn = pdu.expdatasn
        cmd.held = (pdu.status, pdu.sense, pdu.residual_count, pdu.residual_underflow,
                    pdu.residual_overflow)
        self._settle(cmd)

    # ---------------------------------------------------- digest errors
    def digest_error(self, header: bytes) -> None:
        """A PDU whose data digest failed (§7.8): discarded, and asked for
        again by what its sound header says."""
        op = header[0] & 0x3F
        itt = _U32.unpack_from(header, 16)[0]
        statsn = _U32.unpack_from(header, 24)[0]
        if op == Opcode.SCSI_DATA_IN:
            cmd = self.e.tasks.get(itt)
            if cmd is None:
                return
            d = _U32.unpack_from(header, 36)[0]
            if d < cmd.next_datasn and d not in cmd.missing:
                return  # a duplicate we already have
            if d >= cmd.next_datasn:
                self._data_arrived(cmd, d)
            cmd.missing.add(d)
            self._snack(SnackType.DATA_R2T, itt, d, 1, lun=cmd.lun_field)
        elif op in _STATUS_OPCODES or (op == Opcode.NOP_IN and itt != RESERVED_TAG):
            exp = self.e.exp_statsn
            if sn_le(exp, statsn) and sn_diff(statsn, exp) <= MAX_STATUS_GAP:
                self.missing_status.discard(statsn)
                self._want_status(exp, sn_add(statsn, 1))

    # ----------------------------------------------------------------- R2T
    def on_r2t(self, pdu: R2T) -> None:
        e = self.e
        e._window(pdu)
        cmd = e.tasks.get(pdu.itt)
        if cmd is None:
            return
        start, length = pdu.buffer_offset, pdu.desired_data_transfer_length
        if cmd.data_out is None:
            raise e._violation(cmd, f"R2T for a command that writes nothing "
                                    f"(CDB 0x{cmd.cdb[0]:02x})")
        if start + length > cmd.edtl or length > e.params.max_burst:
            raise e._violation(cmd, (f"R2T asks for bytes {start}..{start + length} of a "
                                     f"{cmd.edtl}-byte write (MaxBurstLength "
                                     f"{e.params.max_burst})"))
        r = pdu.r2tsn
        if r > cmd.next_r2tsn:
            # §7.9: R2Ts lost on the way: ask for them again.
            self._snack(SnackType.DATA_R2T, cmd.itt, cmd.next_r2tsn, r - cmd.next_r2tsn,
                        lun=cmd.lun_field)
        cmd.next_r2tsn = max(cmd.next_r2tsn, r + 1)
        cmd.r2t_next = max(cmd.r2t_next, start + length)
        cmd.solicited_sent = max(cmd.solicited_sent, start + length)
        if cmd.aborting:
            return
        # A recovery R2T or one asked again: the same bytes, sent again.
        e._data_out(cmd, pdu.ttt, start, start + length)

    # -------------------------------------------------------------- Reject
    def on_reject(self, pdu: Reject) -> bool:
        """True when the Reject is recovery's business at ERL 1."""
        op = pdu.rejected_opcode
        itt = pdu.rejected_itt
        if pdu.reason == RejectReason.DATA_DIGEST_ERROR:
            self.status_seen(pdu.statsn)
            self.e._window(pdu)
            if op == Opcode.SCSI_DATA_OUT:
                return True  # a recovery R2T will ask for it again
            cmd = self.e.tasks.get(itt) if itt is not None else None
            if op == Opcode.SCSI_COMMAND and cmd is not None:
                self.retry(cmd)  # its immediate data was damaged (§7.8)
                return True
            return False
        if pdu.reason == RejectReason.SNACK_REJECT and op == Opcode.SNACK_REQUEST:
            self.status_seen(pdu.statsn)
            self.e._window(pdu)
            cmd = self.e.tasks.get(itt) if itt is not None else None
            if cmd is not None:
                self.e._end(cmd)
                self.e.events.append(CommandFailed(
                    cmd, "rejected", "the target no longer has the data to resend"))
            return True
        return False

    def retry(self, cmd: Command) -> None:
        """Send ``cmd`` again as it was: same ITT, CmdSN and data (§7.2.1)."""
        self.retries += 1
        cmd.next_datasn = 0
        cmd.received = 0
        cmd.missing.clear()
        cmd.next_r2tsn = 0
        cmd.held = None
        self.e._send_command(cmd)

    # ------------------------------------------------------- lost commands
    def pinged(self, itt: int) -> None:
        """A keepalive NOP-Out went out with ITT ``itt``."""
        self.pings[itt] = self.e.cmdsn
        if self.missing_status or any(c.missing for c in self.e.tasks.values()):
            self.resend_wanted()

    def ping_answered(self, itt: int) -> None:
        """The target answered the keepalive: it has processed everything
        we sent before it, so the command at its ExpCmdSN never arrived
        (§7.2.1: plug the hole with a retry). Those after it may be held
        there; if another is missing, the next keepalive finds it."""
        sent_at = self.pings.pop(itt, None)
        if sent_at is None:
            return
        exp = self.e.window.exp_cmdsn
        if not sn_lt(exp, sent_at):
            return
        for cmd in self.e.tasks.values():
            if cmd.cmdsn == exp:
                self.retry(cmd)
                return


__all__ = ["MAX_STATUS_GAP", "Erl1"]
