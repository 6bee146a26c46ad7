"""The target's full-feature phase for one connection, sans-I/O.

:class:`TargetConnectionEngine` is fed decoded PDUs (and ``now``) after the
login completes. It keeps the connection's StatSN, the session's CmdSN
window (shared by the session's connections), the write tasks' R2T and
Data-Out sequencing, Data-In splitting with phase-collapsed status, NOP
pings, Text continuation and the Reject answers, and returns events for
what only its owner can do: run a SCSI command, manage tasks across
connections, answer a Text Request, end a logout, close the connection.
The owner reports back with :meth:`~TargetConnectionEngine.command_done`,
:meth:`~TargetConnectionEngine.tmf_done`,
:meth:`~TargetConnectionEngine.text_answer` and
:meth:`~TargetConnectionEngine.logout_answer`; everything to send is in
:attr:`~TargetConnectionEngine.outbox`.

Write data is received straight into the task's buffer through
:meth:`~TargetConnectionEngine.placement`, and that buffer is allocated
when the data arrives, never when the command is parsed. All sessions'
write buffers draw on one :class:`WriteBudget`, so a hostile initiator can
make us refuse work (TASK SET FULL) but never make us grow.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..constants import (
    RESERVED_TAG,
    ISCSIResponse,
    Opcode,
    RejectReason,
    TMFunction,
    TMResponse,
)
from ..errors import DataDigestError, ProtocolError
from ..pdu import (
    PDU,
    Buffer,
    DataIn,
    DataOut,
    R2T,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    data_in_header,
    decode_lun,
    frame,
)
from ..scsi.constants import SenseKey, Status
from ..scsi.sense import SenseData
from .common import Deadlines, Outbox, segments
from .target_control import ControlExchanges
from .target_recovery import DEFAULT_RETAIN_BUDGET, DEFAULT_SEQUENCE_TIMEOUT, Erl1Target
from .target_reassign import Erl2Target
from .target_tasks import (
    CloseConnection,
    Event,
    ExecuteCommand,
    LogoutRequested,
    ManageTasks,
    TargetParams,
    Task,
    TextRequested,
    WriteBudget,
)
from .window import CmdSNWindow

_U32 = struct.Struct(">I")
#: Largest write one command may carry (VPD B0h advertises less).
MAX_WRITE_BUFFER = 64 << 20
#: ITTs of failed writes whose late Data-Out is dropped silently.
_DEAD_ITTS = 256

# The sense answers the transport gives itself (SPC-4 Annex D): ABORTED
# COMMAND, DATA PHASE ERROR for a broken Data-Out sequence.
DATA_PHASE_ERROR_SENSE = SenseData(SenseKey.ABORTED_COMMAND, 0x4B, 0x00).encode_fixed()
HW_ERROR_SENSE = SenseData(SenseKey.HARDWARE_ERROR, 0x44, 0x00).encode_fixed()


class TargetConnectionEngine(ControlExchanges, Erl1Target, Erl2Target):
    """Full-feature phase of one target connection.

    Args:
        window: the session's CmdSN window (shared by its connections).
        params: the negotiated parameters of this connection.
        statsn: the StatSN of the next response (after the login's).
        now: the caller's clock.
        discovery: a Discovery session takes Text and Logout only (§4.3).
        budget: the server-wide write budget.
        nop_interval / nop_timeout: NOP-In pings to an idle initiator
            (0 disables); the connection ends when one goes unanswered.
        retain_budget: at ErrorRecoveryLevel 1, bytes of Data-In kept
            for retransmission (:mod:`.target_recovery`).
        sequence_timeout: at ErrorRecoveryLevel 1, seconds without
            Data-Out before an open sequence's holes are asked for again.
    """

    def __init__(self, window: CmdSNWindow, params: TargetParams, *, statsn: int, now: float,
                 discovery: bool = False, budget: WriteBudget | None = None,
                 nop_interval: float = 0.0, nop_timeout: float = 30.0,
                 retain_budget: int = DEFAULT_RETAIN_BUDGET,
                 sequence_timeout: float = DEFAULT_SEQUENCE_TIMEOUT) -> None:
        self.window = window
        self.params = params
        self.statsn = statsn & 0xFFFFFFFF
        self.discovery = discovery
        self.budget = budget if budget is not None else WriteBudget()
        self.outbox = Outbox(params.header_digest, params.data_digest)
        self.tasks: dict[int, Task] = {}
        self.closed = False
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self._ttt = 0x1000
        self._ttt_map: dict[int, Task] = {}
        self._dead_itts: dict[int, None] = {}
        #: ERL 2: ITT -> (StatSN, task) of status sent but not yet
        #: acknowledged by ExpStatSN, resent after TASK REASSIGN (§7.2.2).
        self._unacked: dict[int, tuple[int, Task]] = {}
        #: Events not yet taken by the owner (see :meth:`take_events`).
        self.events: list[Event] = []
        self._timers = Deadlines()
        self._nop_ttt: int | None = None
        self._last_rx = now
        #: (ttt, data still to send) of a Text answer split over responses.
        self._text_out: tuple[int, bytes] | None = None
        #: (itt, data so far) of a Text Request arriving in continuations.
        self._text_in: tuple[int, bytearray] | None = None
        if nop_interval > 0:
            self._timers.set("nop", now + nop_interval)
        self._erl1_init(retain_budget, sequence_timeout)
        self._handlers: dict[int, Callable[[PDU], None]] = {
            Opcode.SCSI_COMMAND: self._on_command,  # type: ignore[dict-item]
            Opcode.SCSI_DATA_OUT: self._on_data_out,  # type: ignore[dict-item]
            Opcode.NOP_OUT: self._on_nop_out,  # type: ignore[dict-item]
            Opcode.TASK_MGMT_REQUEST: self._on_tmf,  # type: ignore[dict-item]
            Opcode.TEXT_REQUEST: self._on_text,  # type: ignore[dict-item]
            Opcode.LOGOUT_REQUEST: self._on_logout,  # type: ignore[dict-item]
            Opcode.SNACK_REQUEST: self._on_snack,
        }

    # ------------------------------------------------------------ feeding
    def receive_pdu(self, pdu: PDU, now: float) -> list[Event]:
        """Handle one PDU from the initiator; returns the owner's events."""
        self._last_rx = now
        if self._unacked:
            exp = getattr(pdu, "expstatsn", None)
            if exp is not None:
                self._acknowledged(exp)
        if not self.closed:
            handler = self._handlers.get(pdu.opcode)
            if handler is None:
                # Target opcodes, or a Login Request in full feature phase
                # (§6.3: login is only the first thing on a connection).
                self.reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
            else:
                handler(pdu)
            if self.erl:
                # ExpStatSN acknowledges status (§4.2.2.2) -- after a SNACK
                # it carries was answered.
                exp = getattr(pdu, "expstatsn", None)
                if exp is not None:
                    self._acknowledge(exp)
        return self.take_events()

    def protocol_error(self, exc: ProtocolError) -> list[Event]:
        """A PDU that failed to decode: Reject it (§11.17.1) and end the
        connection when the error says so (a digest error at ERL 0, a
        framing error: the stream cannot be trusted)."""
        if exc.header is not None and len(exc.header) >= 20:
            # A command whose immediate data was placed but that failed to
            # decode: give its reservation back.
            itt = _U32.unpack_from(exc.header, 16)[0]
            task = self.tasks.get(itt)
            if task is not None and not task.executing and exc.header[0] & 0x3F == Opcode.SCSI_COMMAND:
                self._drop(task)
        if exc.reject_reason is not None and exc.header is not None:
            self.reject(exc.reject_reason, exc.header)
            if self.erl and isinstance(exc, DataDigestError) and len(exc.header) >= 48 \
                    and exc.header[0] & 0x3F == Opcode.SCSI_DATA_OUT:
                # §7.8: the data is gone but its header is sound; a recovery
                # R2T will ask for it once the sequence has ended.
                self._erl1_data_lost(exc.header)
        if exc.drop_connection:
            self.events.append(CloseConnection(str(exc)))
        return self.take_events()

    def take_events(self) -> list[Event]:
        """Events produced since the last call."""
        ev, self.events = self.events, []
        return ev

    # -------------------------------------------------------------- timers
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None."""
        return None if self.closed else self._timers.next()

    def handle_timer(self, now: float) -> list[Event]:
        """Run whatever is due at ``now``: the NOP-In ping and its timeout."""
        for name in self._timers.expired(now):
            if name == "nop":
                self._nop_due(now)
            elif name == "sequence":
                self._sequence_timeout(now)
            elif name == "probe":
                self._status_probe(now)
        return self.take_events()

    # -------------------------------------------------------- SCSI command
    def placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """Where the payload of a PDU whose header is ``hdr`` should land:
        a write's immediate data or Data-Out go straight into the task's
        buffer (allocated now, as its data arrives)."""
        op = hdr[0] & 0x3F
        if op == Opcode.SCSI_DATA_OUT:
            task = self.tasks.get(_U32.unpack_from(hdr, 16)[0])
            if task is None or task.executing or not task.reserved:
                return None
            offset = _U32.unpack_from(hdr, 40)[0]
            if offset + dlen > task.edtl:
                return None
            if task.buf is None:
                task.buf = bytearray(task.edtl)
            return memoryview(task.buf)[offset : offset + dlen]
        return None

    def _on_command(self, cmd: ScsiCommand) -> None:
        if self.discovery:
            # A Discovery session carries Text and Logout only (§4.3).
            self._consume(cmd.cmdsn, cmd.immediate)
            self.reject(RejectReason.PROTOCOL_ERROR, cmd.to_bytes()[:48])
            return
        if self._dead_itts:
            self._dead_itts.pop(cmd.itt, None)
        w = self.window
        if self.erl and not cmd.immediate and w.is_stale(cmd.cmdsn):
            # A retry of a command we already have (§7.2.1).
            self._erl1_retry(cmd.itt)
            return
        if not cmd.immediate and cmd.cmdsn == w.expcmdsn and w.active < w.depth \
                and not w.held:
            # The common case, in order with the window open: what
            # CmdSNWindow.admit would do, without a closure per command.
            w.expcmdsn = (w.expcmdsn + 1) & 0xFFFFFFFF
            w.active += 1
            self._start_command(cmd)
            return
        self._admit(cmd, lambda: self._start_command(cmd), keeps_slot=True)

    def _start_command(self, cmd: ScsiCommand) -> None:
        if self.closed:
            if not cmd.immediate:
                self.window.release()
            return
        p = self.params
        if cmd.itt in self.tasks:
            # §11.3.4: an ITT must be unique among outstanding tasks.
            self.reject(RejectReason.PROTOCOL_ERROR, cmd.to_bytes()[:48])
            if not cmd.immediate:
                self.window.release()
            return
        edtl = cmd.expected_data_transfer_length
        imm = len(cmd.data)
        if imm and (not cmd.write or not p.immediate_data or imm > min(edtl, p.first_burst)):
            # Immediate data with ImmediateData=No (§13.11), on a command
            # that does not write, or more than the command transfers or
            # FirstBurstLength allows (§13.14): the command is rejected
            # whole and not executed (§11.17.1); Data-Out after it is dropped.
            if not cmd.immediate:
                self.window.release()
            self._drop_later_data(cmd.itt)
            self.reject(RejectReason.PROTOCOL_ERROR, cmd.to_bytes()[:48])
            return
        task = Task(cmd)
        self.tasks[cmd.itt] = task
        if not (cmd.write and edtl):
            # No data to receive (a W bit with EDTL 0 is no data at all).
            self._execute(task)
            return
        if edtl > MAX_WRITE_BUFFER or not self.budget.reserve(edtl):
            # More write data in flight than the budget allows: TASK SET
            # FULL (SAM-5 §5.3.1); the initiator retries later.
            self._drop_later_data(cmd.itt)
            self._respond(task, Status.TASK_SET_FULL, b"", None)
            return
        task.reserved = edtl
        if imm:
            task.buf = bytearray(edtl)
            task.buf[:imm] = cmd.data
        task.received = imm
        task.unsol_next = (imm, 0)
        # Unsolicited data may follow up to FirstBurstLength unless
        # InitialR2T=Yes or the F bit says none follows (§13.10, §13.14).
        task.unsolicited_end = imm if p.initial_r2t or cmd.final else min(edtl, p.first_burst)
        task.next_r2t_offset = task.unsolicited_end
        if task.received >= edtl:
            self._execute(task)
        else:
            self._issue_r2ts(task)

    def _execute(self, task: Task) -> None:
        task.executing = True
        self.events.append(ExecuteCommand(task))

    def _issue_r2ts(self, task: Task) -> None:
        p = self.params
        w = self.window
        while len(task.r2ts) < p.max_outstanding_r2t and task.next_r2t_offset < task.edtl:
            offset = task.next_r2t_offset
            length = min(p.max_burst, task.edtl - offset)
            ttt = self._new_ttt()
            task.r2ts[ttt] = [offset, length, offset, 0, task.r2tsn]
            self._ttt_map[ttt] = task
            task.next_r2t_offset = offset + length
            self.outbox.add(R2T(lun=task.cmd.lun, itt=task.itt, ttt=ttt, statsn=self.statsn,
                                expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn, r2tsn=task.r2tsn,
                                buffer_offset=offset, desired_data_transfer_length=length))
            task.r2tsn += 1
        if self.erl:
            self._arm_sequence_timer()

    def _drop_later_data(self, itt: int) -> None:
        """Data-Out still arriving for ``itt`` (a failed, rejected or
        aborted write) is dropped silently; bounded."""
        self._dead_itts[itt] = None
        if len(self._dead_itts) > _DEAD_ITTS:
            del self._dead_itts[next(iter(self._dead_itts))]

    def _fail_data(self, task: Task) -> None:
        """A broken Data-Out sequence cannot be recovered at ERL 0: the task
        ends with CHECK CONDITION, DATA PHASE ERROR (4B/00) and the
        connection carries on (§7.1.4, §11.7.5)."""
        self._forget_r2ts(task)
        self._drop_later_data(task.itt)
        task.executing = True
        self._respond(task, Status.CHECK_CONDITION, DATA_PHASE_ERROR_SENSE, None)

    def _forget_r2ts(self, task: Task) -> None:
        for ttt in task.r2ts:
            self._ttt_map.pop(ttt, None)
        task.r2ts.clear()

    def _on_data_out(self, pdu: DataOut) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None and pdu.itt in self._dead_itts:
            return  # the rest of a write we already failed or aborted
        if task is None or not task.reserved or task.executing:
            # Data for a task we do not know or that is complete: Reject,
            # Invalid PDU Field (§11.7.4).
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu.to_bytes()[:48])
            return
        if self.erl:
            if not self._erl1_data_out(task, pdu.ttt, pdu.buffer_offset, len(pdu.data),
                                       pdu.final, pdu.data):
                self.reject(RejectReason.INVALID_PDU_FIELD, pdu.to_bytes()[:48])
            return
        n = len(pdu.data)
        offset = pdu.buffer_offset
        # DataPDUInOrder/DataSequenceInOrder=Yes (the only values we accept)
        # and ERL 0: within a sequence DataSN counts from 0 and offsets are
        # contiguous.
        if pdu.ttt == RESERVED_TAG:
            if offset + n > task.unsolicited_end or offset != task.unsol_next[0] or \
                    pdu.datasn != task.unsol_next[1]:
                self._fail_data(task)
                return
            task.unsol_next = (offset + n, pdu.datasn + 1)
        else:
            r2t = task.r2ts.get(pdu.ttt)
            if r2t is None or self._ttt_map.get(pdu.ttt) is not task or \
                    offset < r2t[0] or offset + n > r2t[0] + r2t[1]:
                self.reject(RejectReason.INVALID_PDU_FIELD, pdu.to_bytes()[:48])
                return
            if offset != r2t[2] or pdu.datasn != r2t[3]:
                self._fail_data(task)
                return
            r2t[2] = offset + n
            r2t[3] += 1
            if pdu.final or r2t[2] >= r2t[0] + r2t[1]:
                del task.r2ts[pdu.ttt]
                self._ttt_map.pop(pdu.ttt, None)
        data = pdu.data
        if task.buf is None:
            task.buf = bytearray(task.edtl)
        if not (isinstance(data, memoryview) and data.obj is task.buf):
            task.buf[offset : offset + n] = data  # not placed (small PDU path)
        task.received += n
        if task.received >= task.edtl:
            self._forget_r2ts(task)
            self._execute(task)
        elif pdu.ttt != RESERVED_TAG:
            self._issue_r2ts(task)

    # ------------------------------------------------------------- status
    def command_done(self, task: Task, status: int, sense: Buffer, data: Buffer | None, *,
                     overflow: int = 0, underflow: int = 0) -> None:
        """The SCSI layer finished ``task``: send Data-In and/or the SCSI
        Response, give back its window slot and write budget."""
        self._respond(task, status, sense, data, overflow=overflow, underflow=underflow)

    def _release_task(self, task: Task) -> bool:
        """Forget ``task``; True if it was still ours (its slot returns)."""
        owned = self.tasks.get(task.itt) is task
        if owned:
            del self.tasks[task.itt]
            if not task.immediate:
                self.window.release()
        if task.reserved:
            self.budget.release(task.reserved)
            task.reserved = 0
        task.buf = None
        return owned

    def _respond(self, task: Task, status: int, sense: Buffer, data: Buffer | None, *,
                 overflow: int = 0, underflow: int = 0) -> None:
        self._release_task(task)
        if task.aborted:
            return
        if self.params.error_recovery_level >= 2:
            # Kept until acknowledged, or until the task is reassigned after
            # its connection failed (§7.2.2): the answer is sent again then.
            task.result = (status, bytes(sense), data, overflow, underflow)
        if self.closed:
            return
        self._send_status(task, status, sense, data, overflow, underflow)

    def _send_status(self, task: Task, status: int, sense: Buffer, data: Buffer | None,
                     overflow: int, underflow: int, resume: tuple[int, int] = (0, 0)) -> None:
        """Data-In and/or the SCSI Response; ``resume`` (first DataSN,
        offset) skips the Data-In the initiator already has (TASK REASSIGN,
        §11.5.6)."""
        if task.result is not None:
            # Every status PDU takes the next StatSN: this one.
            self._unacked[task.itt] = (self.statsn, task)
        edtl = task.edtl
        if data is not None:
            mv = data if isinstance(data, memoryview) else memoryview(data)
            length = mv.nbytes
            if length > edtl:
                overflow, mv = length - edtl, mv[:edtl]
            elif length < edtl:
                underflow = edtl - length
            if mv.nbytes > resume[1]:
                good = status == Status.GOOD and not sense
                self._data_in(task, mv, status if good else None, overflow, underflow, resume)
                if good:
                    return
            elif resume[0]:
                task.r2tsn = resume[0]  # every Data-In arrived: ExpDataSN counts them
        elif not task.cmd.write and edtl:
            underflow = edtl
        # The residual field is 32 bits (§11.4.5): a CDB asking for more
        # than 4 GiB beyond the EDTL still gets an answer.
        residual = min(overflow or underflow, 0xFFFFFFFF)
        w = self.window
        self.outbox.add(ScsiResponse(
            itt=task.itt, response=ISCSIResponse.COMMAND_COMPLETED, status=status,
            statsn=self._next_statsn(), expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn,
            # ERL 1: ExpDataSN counts the R2Ts or Data-In sent (§11.4.8),
            # so an initiator can tell Data-In lost before the status.
            expdatasn=task.r2tsn if self.erl else 0, residual_overflow=bool(overflow), residual_underflow=bool(underflow),
            residual_count=residual, data=ScsiResponse.sense_segment(sense)))

    def _data_in(self, task: Task, mv: memoryview, status: int | None, overflow: int,
                 underflow: int, resume: tuple[int, int] = (0, 0)) -> None:
        """Split ``mv`` into Data-In PDUs of at most the initiator's
        MaxRecvDataSegmentLength, F at every MaxBurstLength boundary
        (§11.7.1), status in the last one when ``status`` is given
        (phase collapse, §11.7.4)."""
        w = self.window
        p = self.params
        lun, itt = task.cmd.lun, task.itt
        add = self.outbox.add
        if self.erl:
            self._data_in_kept(task, mv, status, overflow, underflow, self._next_statsn, resume)
            return
        residual = min(overflow or underflow, 0xFFFFFFFF)
        total = mv.nbytes
        first, start = resume
        if total <= p.max_xmit and total <= p.max_burst and not start:
            # One PDU (every 4 KiB read): its header built straight from the
            # fields, without a PDU object or the splitting machinery.
            with_status = status is not None
            ob = self.outbox
            ob.buffers += frame(data_in_header(
                itt=itt, lun=lun, dlen=total, final=True, status=status,
                statsn=self._next_statsn() if with_status else 0,
                expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn, datasn=0, buffer_offset=0,
                overflow=with_status and bool(overflow),
                underflow=with_status and bool(underflow),
                residual_count=residual if with_status else 0),
                mv, total, ob.header_digest, ob.data_digest)
            return
        for datasn, (offset, n, final) in enumerate(
                segments(start, total, p.max_xmit, p.max_burst), first):
            with_status = status is not None and offset + n >= total
            add(DataIn(
                itt=itt, final=final, status_present=with_status,
                status=status if with_status and status is not None else 0, lun=lun,
                statsn=self._next_statsn() if with_status else 0,
                expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn, datasn=datasn, buffer_offset=offset,
                residual_overflow=with_status and bool(overflow),
                residual_underflow=with_status and bool(underflow),
                residual_count=residual if with_status else 0,
                data=mv[offset : offset + n]))

    # ------------------------------------------------------ task management
    def _on_tmf(self, pdu: TaskMgmtRequest) -> None:
        if self.discovery:
            # A discovery session has no tasks to manage (§4.3).
            self._consume(pdu.cmdsn, pdu.immediate)
            self.reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
            return

        def run() -> None:
            fn = pdu.function
            if fn == TMFunction.TASK_REASSIGN and self.params.error_recovery_level < 2:
                # Below ErrorRecoveryLevel 2 reassignment is not supported (§11.5.1).
                self.tmf_done(pdu.itt, TMResponse.TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED)
            elif fn not in _TMF_FUNCTIONS and fn != TMFunction.TASK_REASSIGN:
                self.tmf_done(pdu.itt, TMResponse.FUNCTION_NOT_SUPPORTED)
            else:
                self.events.append(ManageTasks(pdu.itt, fn, decode_lun(pdu.lun),
                                                pdu.referenced_task_tag, pdu.refcmdsn,
                                                pdu.cmdsn, pdu.expdatasn))
        self._admit(pdu, run)

    def abort_task(self, task: Task) -> bool:
        """Abort one of this connection's tasks (for a TMF). Returns True
        when it is executing: the owner waits for ``command_done`` before
        answering the TMF (§4.2.3.3: the response follows the end of
        every affected task)."""
        task.aborted = True
        if task.executing:
            return True
        self._forget_r2ts(task)
        self._release_task(task)
        # Data-Out already on its way is expected, not an error.
        self._drop_later_data(task.itt)
        return False

    # ---------------------------------------------------------------- end
    def close(self) -> list[Task]:
        """The connection ended: at ERL 0 its tasks end with it (§7.1.4);
        their slots and write budget return. Returns the tasks that were
        still executing (the owner releases whoever waits on them)."""
        self.closed = True
        # Commands held for their CmdSN turn never ran: forget them, so the
        # initiator can retry them on another connection (§7.2.1).
        self.window.discard(self)
        running = []
        for task in list(self.tasks.values()):
            task.aborted = True
            if task.executing:
                running.append(task)
            self._release_task(task)
        self._ttt_map.clear()
        self._timers = Deadlines()
        self._erl1_close()
        return running

    def _on_snack(self, pdu: PDU) -> None:
        if self.erl:
            self._erl1_snack(pdu)  # type: ignore[arg-type]
        else:
            super()._on_snack(pdu)

_TMF_FUNCTIONS = frozenset({
    TMFunction.ABORT_TASK, TMFunction.ABORT_TASK_SET, TMFunction.CLEAR_ACA,
    TMFunction.CLEAR_TASK_SET, TMFunction.LOGICAL_UNIT_RESET, TMFunction.TARGET_WARM_RESET,
    TMFunction.TARGET_COLD_RESET, TMFunction.I_T_NEXUS_RESET,
})

__all__ = [
    "DATA_PHASE_ERROR_SENSE", "HW_ERROR_SENSE", "MAX_WRITE_BUFFER", "CloseConnection", "Event",
    "ExecuteCommand", "LogoutRequested", "ManageTasks", "TargetConnectionEngine", "TargetParams",
    "Task", "TextRequested", "WriteBudget",
]
