"""The initiator's full-feature phase for one connection, sans-I/O.

:class:`InitiatorEngine` is created once the login has completed, fed the
target's decoded PDUs with ``now`` (:meth:`~InitiatorEngine.receive_pdu`)
and returns events (:mod:`.initiator_tasks`). It keeps the CmdSN window
(§4.2.2.1), ITTs, StatSN/ExpStatSN (§4.2.2.2), immediate and unsolicited
Data-Out within FirstBurstLength (§13.10, §13.11, §13.14), the answers
to R2Ts split by the target's MaxRecvDataSegmentLength (§11.8, §13.12),
Data-In bookkeeping with DataSN/offset checks (§11.7), status with
residuals (§11.4.5), NOP-In/Out (§11.18, §11.19), Asynchronous Messages,
Reject, Logout, Task Management and Text with continuation.

Time enters only as ``now``: :meth:`~InitiatorEngine.get_timer` says when
:meth:`~InitiatorEngine.handle_timer` is next due (NOP keepalive, its
timeout, per-command timeouts and their escalation ABORT TASK -> LOGICAL
UNIT RESET -> session recovery, the order Linux's SCSI error handler uses).

Everything to send is in :attr:`~InitiatorEngine.outbox`; the owner drains
it with one ``writelines`` per batch.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable

from ..constants import (
    RESERVED_TAG,
    AsyncEvent,
    ISCSIResponse,
    LogoutReason,
    Opcode,
    RejectReason,
    TMFunction,
    TMResponse,
)
from ..errors import ProtocolError
from ..pdu import (
    PDU,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    encode_lun,
)
from ..serial import CmdWindow, TagAllocator, sn_add, sn_gt
from ..text import TextAssembler, decode_text, split_text
from .common import Deadlines, Outbox, segments
from .initiator_tasks import (
    AsyncNotice,
    Command,
    CommandCompleted,
    CommandFailed,
    ConnectionFailed,
    Event,
    ExchangeFailed,
    InitiatorParams,
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)

_U32 = struct.Struct(">I")
_OP_DATA_IN = int(Opcode.SCSI_DATA_IN)
_GOOD = 0x00
_CONDITION_MET = 0x04
#: Text Response data accumulated across continuations is capped.
MAX_TEXT_RESPONSE = 1 << 20


class TargetViolation(ProtocolError):
    """The target broke RFC 7143 in a way ErrorRecoveryLevel 0 cannot
    repair: the connection ends and the session recovers (§7.1.4.3)."""

    drop_connection = True


class _Text:
    """A Text exchange in progress (§11.10, §11.11)."""

    __slots__ = ("itt", "rest", "assembler")

    def __init__(self, itt: int, rest: list[bytes]) -> None:
        self.itt = itt
        self.rest = rest
        self.assembler = TextAssembler()


class InitiatorEngine:
    """Full-feature phase of the initiator's one connection.

    Args:
        params: the negotiated parameters.
        cmdsn: the CmdSN of the next command (the login's, §4.2.2.1).
        expcmdsn / maxcmdsn: the window from the final Login Response.
        exp_statsn: the StatSN we expect next.
        now: the caller's clock.
        cid: this connection's CID (Logout names it).
        nop_interval: seconds of receive silence before a NOP-Out ping
            (None disables); nop_timeout: seconds for its answer.
        command_timeout: seconds from submission to status (None: none).
        tmf_timeout: seconds for each escalation step's TMF answer.
        queue_depth: commands in flight at most, besides the window.
    """

    def __init__(self, params: InitiatorParams, *, cmdsn: int, expcmdsn: int, maxcmdsn: int,
                 exp_statsn: int, now: float, cid: int = 0, nop_interval: float | None = None,
                 nop_timeout: float = 5.0, command_timeout: float | None = None,
                 tmf_timeout: float = 10.0, queue_depth: int = 128) -> None:
        self.params = params
        self.cmdsn = cmdsn & 0xFFFFFFFF
        try:
            self.window = CmdWindow(expcmdsn, maxcmdsn)
        except ValueError:
            # An invalid window from the login: trust only ExpCmdSN (a
            # one-command window) until a response corrects it.
            self.window = CmdWindow(expcmdsn & 0xFFFFFFFF)
        self.exp_statsn = exp_statsn & 0xFFFFFFFF
        self.cid = cid
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.command_timeout = command_timeout
        self.tmf_timeout = tmf_timeout
        self.queue_depth = queue_depth
        self.outbox = Outbox(params.header_digest, params.data_digest)
        self.tags = TagAllocator(1)
        #: Commands sent and not yet ended, by ITT.
        self.tasks: dict[int, Command] = {}
        #: Commands waiting for the window: internal ones first.
        self.urgent: deque[Command] = deque()
        self.queue: deque[Command] = deque()
        #: While True only internal commands are sent (the owner clears
        #: unit attentions after recovery before reissuing, SAM-5 §6.2).
        self.hold = False
        self.closed = False
        self.logging_out = False
        self.events: list[Event] = []
        self._timers = Deadlines()
        self._cmd_deadlines: list[tuple[float, int, Command]] = []
        self._last_rx = self._now = now
        #: ITT -> ("ping" | "keepalive" | "logout", None) or ("tmf", function, Command | None)
        self._exchanges: dict[int, tuple[str, int, Command | None]] = {}
        #: ITT -> LUN of each TMF outstanding.
        self._tmf_lun: dict[int, int] = {}
        self._keepalive: tuple[int, float] | None = None
        self._text: _Text | None = None
        #: The target's NOP-In pings answered (§11.18.1).
        self.target_pings = 0
        if nop_interval:
            self._timers.set("nop", now + nop_interval)
        self._handlers: dict[int, Callable[[PDU], None]] = {
            Opcode.SCSI_DATA_IN: self._on_data_in,  # type: ignore[dict-item]
            Opcode.SCSI_RESPONSE: self._on_response,  # type: ignore[dict-item]
            Opcode.R2T: self._on_r2t,  # type: ignore[dict-item]
            Opcode.NOP_IN: self._on_nop_in,  # type: ignore[dict-item]
            Opcode.TASK_MGMT_RESPONSE: self._on_tmf_response,  # type: ignore[dict-item]
            Opcode.TEXT_RESPONSE: self._on_text_response,  # type: ignore[dict-item]
            Opcode.LOGOUT_RESPONSE: self._on_logout_response,  # type: ignore[dict-item]
            Opcode.ASYNC_MESSAGE: self._on_async,  # type: ignore[dict-item]
            Opcode.REJECT: self._on_reject,  # type: ignore[dict-item]
        }

    # ------------------------------------------------------------ feeding
    def receive_pdu(self, pdu: PDU, now: float) -> list[Event]:
        """Handle one PDU from the target; returns the owner's events. A
        violation the connection cannot survive gives :class:`ConnectionFailed`."""
        self._last_rx = self._now = now
        if self.closed:
            return []
        handler = self._handlers.get(pdu.opcode)
        try:
            if handler is None:
                # Initiator opcodes or a Login Response in full feature phase.
                raise TargetViolation(f"unexpected {type(pdu).__name__} in full feature phase")
            handler(pdu)
        except TargetViolation as exc:
            self.events.append(ConnectionFailed(str(exc), violation=True))
        self._pump(now)
        return self.take_events()

    def take_events(self) -> list[Event]:
        """Events produced since the last call."""
        ev, self.events = self.events, []
        return ev

    def placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """:class:`~iscsi.framing.PDUReader` hook: a Data-In payload goes
        straight into the command's buffer at its Buffer Offset (§11.7.6)."""
        if hdr[0] & 0x3F != _OP_DATA_IN:
            return None
        cmd = self.tasks.get(_U32.unpack_from(hdr, 16)[0])
        if cmd is None or cmd.data_in is None:
            return None
        off = _U32.unpack_from(hdr, 40)[0]
        if off != cmd.received or off + dlen > cmd.in_len:
            return None  # out of order or beyond: checked, and refused, later
        return cmd.data_in[off : off + dlen]

    # ----------------------------------------------------------- sending
    def submit(self, cmd: Command, now: float) -> None:
        """Queue ``cmd``; it is sent as soon as the window allows."""
        if self.closed:
            raise RuntimeError("engine is closed")
        self._now = now
        cmd.reset()
        if self.command_timeout is not None and cmd.deadline is None:
            cmd.deadline = now + self.command_timeout
        if cmd.deadline is not None:
            heapq.heappush(self._cmd_deadlines, (cmd.deadline, id(cmd), cmd))
        (self.urgent if cmd.internal else self.queue).append(cmd)
        self._pump(now)

    def pump(self, now: float) -> None:
        """Send what the window allows (after :attr:`hold` is cleared)."""
        self._pump(now)

    def _pump(self, now: float) -> None:
        if self.closed or self.logging_out:
            return
        window, tasks, limit = self.window, self.tasks, self.queue_depth
        for queue in (self.urgent, self.queue):
            if queue is self.queue and self.hold:
                break
            while queue and window.in_window(self.cmdsn) and len(tasks) < limit:
                self._issue(queue.popleft())

    def _issue(self, cmd: Command) -> None:
        p = self.params
        cmd.itt = self.tags.allocate()
        cmd.cmdsn = self.cmdsn
        self.cmdsn = sn_add(self.cmdsn, 1)
        cmd.sent = True
        cmd.attempts += 1
        edtl = cmd.edtl
        data_out = cmd.data_out
        imm = unsol = 0
        if data_out is not None and edtl:
            # §13.11: immediate data up to FirstBurstLength (and one PDU);
            # §13.10/§13.14: with InitialR2T=No unsolicited Data-Out up to
            # FirstBurstLength in all.
            if p.immediate_data:
                imm = min(edtl, p.first_burst, p.max_xmit)
            unsol = imm if p.initial_r2t else min(edtl, p.first_burst)
        cmd.r2t_next = unsol
        cmd.solicited_sent = unsol
        self.tasks[cmd.itt] = cmd
        self.outbox.add(ScsiCommand(
            itt=cmd.itt, lun=encode_lun(cmd.lun), cdb=cmd.cdb, expected_data_transfer_length=edtl,
            cmdsn=cmd.cmdsn, expstatsn=self.exp_statsn, read=cmd.data_in is not None,
            write=data_out is not None, final=unsol == imm, attr=cmd.attr,
            data=data_out[:imm] if imm and data_out is not None else b""))
        if unsol > imm:
            self._data_out(cmd, RESERVED_TAG, imm, unsol)

    def _data_out(self, cmd: Command, ttt: int, start: int, end: int) -> None:
        """Data-Out for [start, end): each PDU at most the target's
        MaxRecvDataSegmentLength (§13.12), DataSN from 0 per sequence
        (§11.7.5), F on the last (§11.7.1); payloads are views."""
        data = cmd.data_out
        assert data is not None
        add, lun, exp = self.outbox.add, encode_lun(cmd.lun), self.exp_statsn
        for datasn, (off, n, final) in enumerate(segments(start, end, self.params.max_xmit)):
            add(DataOut(final=final, lun=lun, itt=cmd.itt, ttt=ttt, expstatsn=exp,
                        datasn=datasn, buffer_offset=off, data=data[off : off + n]))

    # ------------------------------------------------------- bookkeeping
    def _window(self, pdu: DataIn | ScsiResponse | R2T | NopIn | TaskMgmtResponse
                | TextResponse | LogoutResponse | AsyncMessage | Reject) -> None:
        # §4.2.2.1: invalid pairs are ignored, values only move forward.
        self.window.update(pdu.expcmdsn, pdu.maxcmdsn)

    def _status_seen(self, statsn: int) -> None:
        nxt = sn_add(statsn, 1)
        if sn_gt(nxt, self.exp_statsn):
            self.exp_statsn = nxt

    def _end(self, cmd: Command) -> None:
        if self.tasks.get(cmd.itt) is cmd:
            del self.tasks[cmd.itt]
            self.tags.discard(cmd.itt)

    def _violation(self, cmd: Command | None, reason: str) -> TargetViolation:
        if cmd is not None:
            cmd.violation = reason
        return TargetViolation(reason)

    # --------------------------------------------------------- data path
    def _on_data_in(self, pdu: DataIn) -> None:
        self._window(pdu)
        cmd = self.tasks.get(pdu.itt)
        if cmd is None:
            # A late Data-In for a task we already ended: nothing to place.
            return
        data = pdu.data
        dlen = data.nbytes if isinstance(data, memoryview) else len(data)
        if dlen:
            off = pdu.buffer_offset
            if cmd.data_in is None:
                raise self._violation(cmd, f"Data-In for a command that reads nothing "
                                           f"(CDB 0x{cmd.cdb[0]:02x})")
            if pdu.datasn != cmd.next_datasn:
                raise self._violation(cmd, f"Data-In DataSN {pdu.datasn}, expected "
                                           f"{cmd.next_datasn} (§11.7.5)")
            if off != cmd.received:
                raise self._violation(cmd, f"Data-In at offset {off}, expected {cmd.received} "
                                           f"(DataPDUInOrder=Yes, §13.19)")
            if off + dlen > cmd.in_len:
                raise self._violation(cmd, f"Data-In beyond the expected length {cmd.in_len}")
            if not (isinstance(data, memoryview) and data.obj is cmd.data_in.obj):
                cmd.data_in[off : off + dlen] = data  # not placed (e.g. tests)
            cmd.next_datasn += 1
            cmd.received = off + dlen
        if pdu.status_present:
            self._status_seen(pdu.statsn)
            self._complete(cmd, pdu.status, b"", pdu.residual_count,
                           pdu.residual_underflow, pdu.residual_overflow)

    def _on_response(self, pdu: ScsiResponse) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        cmd = self.tasks.get(pdu.itt)
        if cmd is None:
            return
        if pdu.response != ISCSIResponse.COMMAND_COMPLETED:
            cmd.failure = (f"target failure (iSCSI response 0x{pdu.response:02x}) for CDB "
                           f"0x{cmd.cdb[0]:02x}")
        self._complete(cmd, pdu.status, pdu.sense, pdu.residual_count,
                       pdu.residual_underflow, pdu.residual_overflow)

    def _complete(self, cmd: Command, status: int, sense: bytes, residual: int,
                  underflow: bool, overflow: bool) -> None:
        self._end(cmd)
        if cmd.failure is not None:
            self.events.append(CommandFailed(cmd, "target", cmd.failure))
            return
        if status in (_GOOD, _CONDITION_MET):
            # Issue 9 item 8: GOOD must account for every byte: what was
            # not transferred is declared as residual underflow (§11.4.5.2),
            # otherwise the caller would take zeros for data.
            declared = residual if underflow else 0
            moved = cmd.received if cmd.data_in is not None else cmd.solicited_sent
            if moved + declared < cmd.edtl:
                what = "received" if cmd.data_in is not None else "sent"
                self.events.append(CommandFailed(cmd, "short", (
                    f"GOOD status for CDB 0x{cmd.cdb[0]:02x} but only {moved} of {cmd.edtl} "
                    f"bytes {what} and a residual underflow of {declared}")))
                return
        self.events.append(CommandCompleted(cmd, status, sense, residual, underflow, overflow,
                                            cmd.received))

    def _on_r2t(self, pdu: R2T) -> None:
        self._window(pdu)
        cmd = self.tasks.get(pdu.itt)
        if cmd is None:
            return  # for a task we already ended (aborted)
        start, length = pdu.buffer_offset, pdu.desired_data_transfer_length
        if cmd.data_out is None:
            raise self._violation(cmd, f"R2T for a command that writes nothing "
                                       f"(CDB 0x{cmd.cdb[0]:02x})")
        # Issue 9 item 10: with DataSequenceInOrder=Yes (§13.20) and ERL 0
        # each R2T asks for the bytes right after the last; one that repeats
        # a range, leaves a gap, asks beyond the write, for nothing or for
        # more than MaxBurstLength (§11.8.4) is a protocol error.
        if length == 0 or start != cmd.r2t_next or start + length > cmd.edtl:
            raise self._violation(cmd, (
                f"R2T asks for bytes {start}..{start + length} of a {cmd.edtl}-byte write "
                f"(expected the next from {cmd.r2t_next})"))
        if length > self.params.max_burst:
            raise self._violation(cmd, (
                f"R2T asks for {length} bytes, over MaxBurstLength {self.params.max_burst}"))
        if pdu.r2tsn != cmd.next_r2tsn:
            raise self._violation(cmd, f"R2TSN {pdu.r2tsn}, expected {cmd.next_r2tsn}")
        cmd.next_r2tsn += 1
        cmd.r2t_next = start + length
        cmd.solicited_sent += length
        if cmd.aborting:
            return  # an ABORT TASK is on its way; send nothing more
        self._data_out(cmd, pdu.ttt, start, start + length)

    # --------------------------------------------------------------- NOP
    def ping(self, now: float, data: bytes = b"") -> int:
        """Send a NOP-Out ping (§11.18); the answer is :class:`PingAnswered`."""
        itt = self._exchange("ping")
        self.outbox.add(NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=self.cmdsn,
                               expstatsn=self.exp_statsn, immediate=True, data=data))
        return itt

    def _exchange(self, kind: str, function: int = 0, cmd: Command | None = None) -> int:
        itt = self.tags.allocate()
        self._exchanges[itt] = (kind, function, cmd)
        return itt

    def _on_nop_in(self, pdu: NopIn) -> None:
        self._window(pdu)
        if pdu.itt != RESERVED_TAG:
            # The answer to a ping carries a StatSN (§11.19.2).
            self._status_seen(pdu.statsn)
            ex = self._exchanges.pop(pdu.itt, None)
            if ex is not None:
                self.tags.discard(pdu.itt)
                if ex[0] == "keepalive":
                    self._keepalive = None
                    if self.nop_interval:
                        self._timers.set("nop", self._now + self.nop_interval)
                else:
                    self.events.append(PingAnswered(pdu.itt, bytes(pdu.data)))
        if pdu.ttt != RESERVED_TAG:
            # §11.18.1: the target's ping: echo its TTT and data, ITT
            # reserved, immediate, CmdSN not advanced.
            self.target_pings += 1
            self.outbox.add(NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.cmdsn,
                                   expstatsn=self.exp_statsn, immediate=True,
                                   data=bytes(pdu.data)))

    # --------------------------------------------------------------- TMF
    def task_management(self, function: int, now: float, lun: int = 0,
                        referenced_itt: int = RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5, immediate); the
        answer is :class:`TaskManagementDone`."""
        return self._tmf("tmf", function, lun, referenced_itt, self.tasks.get(referenced_itt))

    def _tmf(self, kind: str, function: int, lun: int, referenced_itt: int,
             cmd: Command | None) -> int:
        ref = self.tasks.get(referenced_itt)
        itt = self._exchange(kind, function, cmd)
        self._tmf_lun[itt] = lun
        self.outbox.add(TaskMgmtRequest(
            function=function, lun=encode_lun(lun), itt=itt,
            referenced_task_tag=referenced_itt if function == TMFunction.ABORT_TASK
            else RESERVED_TAG,
            # RefCmdSN: the referenced task's CmdSN (§11.5.4).
            refcmdsn=ref.cmdsn if ref is not None else self.cmdsn,
            cmdsn=self.cmdsn, expstatsn=self.exp_statsn, immediate=True))
        return itt

    def _on_tmf_response(self, pdu: TaskMgmtResponse) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        ex = self._exchanges.pop(pdu.itt, None)
        if ex is None:
            return
        self.tags.discard(pdu.itt)
        self._timers.cancel(f"tmf{pdu.itt}")
        kind, function, cmd = ex
        lun = self._tmf_lun.pop(pdu.itt, 0)
        ok = pdu.response in (TMResponse.FUNCTION_COMPLETE, TMResponse.TASK_DOES_NOT_EXIST)
        if kind == "tmf":
            if pdu.response == TMResponse.FUNCTION_COMPLETE:
                if function == TMFunction.ABORT_TASK and cmd is not None \
                        and self.tasks.get(cmd.itt) is cmd:
                    # The aborted task gets no status (§4.2.3.3): it ends here.
                    self._end(cmd)
                    self.events.append(CommandFailed(cmd, "aborted", "ended by ABORT TASK"))
                self._aborted_by(function, pdu, "aborted", lun)
            self.events.append(TaskManagementDone(pdu.itt, function, pdu.response))
            return
        assert cmd is not None
        if ok:
            # The timed-out task is gone at the target (or was never
            # there): it fails with the timeout (Linux: eh_abort_handler).
            self._end(cmd)
            self.events.append(CommandFailed(cmd, "timeout", self._timeout_text(cmd)))
            if kind == "reset":
                self._aborted_by(TMFunction.LOGICAL_UNIT_RESET, pdu, "reset", cmd.lun)
        elif kind == "abort":
            # ABORT TASK refused: reset the LU (eh_device_reset_handler).
            itt = self._tmf("reset", TMFunction.LOGICAL_UNIT_RESET, cmd.lun, RESERVED_TAG, cmd)
            self._timers.set(f"tmf{itt}", self._now + self.tmf_timeout)
        else:
            self.events.append(ConnectionFailed(
                f"LOGICAL UNIT RESET refused (response {pdu.response}) after a command timeout"))

    def _aborted_by(self, function: int, pdu: TaskMgmtResponse, kind: str,
                    lun: int | None = None) -> None:
        """Commands a successful TMF ended at the target get no status:
        they end here (§4.2.3.3)."""
        if function in (TMFunction.LOGICAL_UNIT_RESET, TMFunction.ABORT_TASK_SET,
                        TMFunction.CLEAR_TASK_SET):
            victims = [c for c in self.tasks.values() if lun is None or c.lun == lun]
        elif function in (TMFunction.TARGET_WARM_RESET, TMFunction.TARGET_COLD_RESET):
            victims = list(self.tasks.values())
        else:
            return
        for c in victims:
            self._end(c)
            self.events.append(CommandFailed(c, kind, f"ended by task management function "
                                                      f"{function}"))

    def _timeout_text(self, cmd: Command) -> str:
        return (f"no status for CDB 0x{cmd.cdb[0]:02x} within the command timeout of "
                f"{self.command_timeout:g} s; the task was aborted")

    # -------------------------------------------------------------- text
    def text(self, data: bytes, now: float) -> int:
        """Start a Text exchange with encoded ``data`` (split into
        continuations of at most MaxRecvDataSegmentLength, §11.10.2); the
        answer is :class:`TextDone`. One exchange at a time."""
        if self._text is not None:
            raise RuntimeError("a Text exchange is already in progress")
        parts = split_text(data, self.params.max_xmit) or [b""]
        itt = self._exchange("text")
        self._text = _Text(itt, parts)
        self._text_pdu(RESERVED_TAG)
        return itt

    def _text_pdu(self, ttt: int) -> None:
        t = self._text
        assert t is not None
        seg = t.rest.pop(0) if t.rest else b""
        final = not t.rest
        cmdsn = self.cmdsn
        self.cmdsn = sn_add(cmdsn, 1)
        self.outbox.add(TextRequest(final=final, cont=not final, itt=t.itt, ttt=ttt, cmdsn=cmdsn,
                                    expstatsn=self.exp_statsn, data=seg))

    def _on_text_response(self, pdu: TextResponse) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        t = self._text
        if t is None or pdu.itt != t.itt:
            return
        if t.rest:
            # The target took a continuation of our request (§11.10.2).
            self._text_pdu(pdu.ttt)
            return
        try:
            whole = t.assembler.feed(pdu.data, pdu.cont)
        except ProtocolError as exc:
            self._text_end(ExchangeFailed(t.itt, f"bad Text Response: {exc}"))
            return
        if whole is None:
            if pdu.final:
                self._text_end(ExchangeFailed(t.itt, "Text Response with both F and C bits"))
                return
            # §11.11.4: ask for the rest with an empty request and its TTT.
            self._text_pdu(pdu.ttt)
            return
        if not pdu.final:
            self._text_end(ExchangeFailed(t.itt, "Text Response without F or C bit"))
            return
        try:
            pairs = decode_text(whole)
        except ProtocolError as exc:
            self._text_end(ExchangeFailed(t.itt, f"bad Text Response: {exc}"))
            return
        self._text_end(TextDone(t.itt, pairs))

    def _text_end(self, event: TextDone | ExchangeFailed) -> None:
        if self._text is not None:
            self._exchanges.pop(self._text.itt, None)
            self.tags.discard(self._text.itt)
        self._text = None
        self.events.append(event)

    # ------------------------------------------------------------ logout
    def logout(self, now: float, reason: int = LogoutReason.CLOSE_SESSION) -> int:
        """Send an immediate Logout Request (§11.14). No further command
        is sent; those in flight may still complete before the response
        (:class:`LogoutDone`)."""
        self.logging_out = True
        itt = self._exchange("logout")
        self.outbox.add(LogoutRequest(reason=reason, itt=itt, cid=self.cid, cmdsn=self.cmdsn,
                                      expstatsn=self.exp_statsn, immediate=True))
        return itt

    def _on_logout_response(self, pdu: LogoutResponse) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        if self._exchanges.pop(pdu.itt, None) is not None:
            self.tags.discard(pdu.itt)
            self.events.append(LogoutDone(pdu.itt, pdu.response, pdu.time2wait,
                                          pdu.time2retain))

    # ---------------------------------------------------- async, reject
    def _on_async(self, pdu: AsyncMessage) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        sense = bytes(pdu.data[2:]) if pdu.async_event == AsyncEvent.SCSI_ASYNC_EVENT \
            and len(pdu.data) >= 2 else b""
        self.events.append(AsyncNotice(pdu.async_event, pdu.lun, sense, pdu.parameter1,
                                       pdu.parameter2, pdu.parameter3))

    def _on_reject(self, pdu: Reject) -> None:
        self._status_seen(pdu.statsn)
        self._window(pdu)
        try:
            words = RejectReason(pdu.reason).name.lower().replace("_", " ")
        except ValueError:
            words = f"reason 0x{pdu.reason:02x}"
        reason = f"target rejected a PDU: {words}"
        itt = pdu.rejected_itt
        if itt is not None:
            cmd = self.tasks.get(itt)
            if cmd is not None and pdu.rejected_opcode == Opcode.SCSI_COMMAND:
                # §7.4.1 (ERL 0): a rejected command gets no response.
                self._end(cmd)
                self.events.append(CommandFailed(cmd, "rejected", reason))
                return
            if self._text is not None and self._text.itt == itt:
                self._text_end(ExchangeFailed(itt, reason))
                return
            if itt in self._exchanges:
                self._exchanges.pop(itt)
                self.tags.discard(itt)
                self.events.append(ExchangeFailed(itt, reason))
                return
        if pdu.reason == RejectReason.DATA_DIGEST_ERROR:
            # ERL 0 cannot resend the data: recover the session (§7.8).
            self.events.append(ConnectionFailed(reason))

    # ------------------------------------------------------------ timers
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None."""
        if self.closed:
            return None
        heap = self._cmd_deadlines
        while heap and not self._live(heap[0][2]):
            heapq.heappop(heap)
        t = self._timers.next()
        if heap and (t is None or heap[0][0] < t):
            t = heap[0][0]
        return t

    def _live(self, cmd: Command) -> bool:
        """A command whose deadline still matters: queued or in flight,
        and not already being aborted."""
        if cmd.aborting or cmd.timed_out:
            return False
        if cmd.sent:
            return self.tasks.get(cmd.itt) is cmd
        return cmd in self.queue or cmd in self.urgent

    def handle_timer(self, now: float) -> list[Event]:
        """Run whatever is due at ``now``."""
        if self.closed:
            return []
        self._now = now
        heap = self._cmd_deadlines
        while heap and heap[0][0] <= now:
            cmd = heapq.heappop(heap)[2]
            if self._live(cmd):
                self._command_timeout(cmd, now)
        for name in self._timers.expired(now):
            if name == "nop":
                self._nop_due(now)
            elif name.startswith("tmf"):
                self.events.append(ConnectionFailed(
                    "no answer to task management after a command timeout"))
        self._pump(now)
        return self.take_events()

    def _command_timeout(self, cmd: Command, now: float) -> None:
        cmd.timed_out = True
        if not cmd.sent:
            # Never sent (the window stayed closed): nothing to abort.
            for q in (self.queue, self.urgent):
                if cmd in q:
                    q.remove(cmd)
            self.events.append(CommandFailed(cmd, "timeout", (
                f"CDB 0x{cmd.cdb[0]:02x} not sent within the command timeout of "
                f"{self.command_timeout:g} s (the target's command window stayed closed)")))
            return
        # ABORT TASK first (§11.5.1), escalating on refusal or silence.
        cmd.aborting = True
        itt = self._tmf("abort", TMFunction.ABORT_TASK, cmd.lun, cmd.itt, cmd)
        self._timers.set(f"tmf{itt}", now + self.tmf_timeout)

    def _nop_due(self, now: float) -> None:
        interval = self.nop_interval
        assert interval
        if self._keepalive is not None:
            itt, sent_at = self._keepalive
            if self._last_rx <= sent_at:
                self.events.append(ConnectionFailed(
                    f"no NOP-In within {self.nop_timeout:g} s"))
                return
            # Traffic arrived (the target is alive) though not the answer.
            self._keepalive = None
        idle = now - self._last_rx
        if idle >= interval:
            itt = self._exchange("keepalive")
            self._keepalive = (itt, now)
            self.outbox.add(NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=self.cmdsn,
                                   expstatsn=self.exp_statsn, immediate=True))
            self._timers.set("nop", now + self.nop_timeout)
        else:
            self._timers.set("nop", self._last_rx + interval)

    # --------------------------------------------------------------- end
    def close(self) -> list[Command]:
        """The connection ended: return every command not yet ended (sent
        ones first, then queued; each in submission order) for the owner
        to fail or reissue on a new connection (§7.1.4.3)."""
        self.closed = True
        sent = sorted(self.tasks.values(), key=lambda c: c.seq)
        rest = list(self.urgent) + list(self.queue)
        self.tasks.clear()
        self.urgent.clear()
        self.queue.clear()
        self._cmd_deadlines.clear()
        self._timers = Deadlines()
        return sent + rest


__all__ = [
    "AsyncNotice", "Command", "CommandCompleted", "CommandFailed", "ConnectionFailed", "Event",
    "ExchangeFailed", "InitiatorEngine", "InitiatorParams", "LogoutDone", "PingAnswered",
    "TargetViolation", "TaskManagementDone", "TextDone",
]
