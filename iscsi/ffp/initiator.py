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
UNIT RESET -> session recovery, the order Linux's SCSI error handler uses;
those live in the :mod:`.initiator_timers` mixin).

Everything to send is in :attr:`~InitiatorEngine.outbox`; the owner drains
it with one ``writelines`` per batch. The commands and events are in
:mod:`.initiator_tasks`, the non-SCSI exchanges in :mod:`.initiator_control`.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable

from ..constants import (
    RESERVED_TAG,
    ISCSIResponse,
    LogoutReason,
    Opcode,
    TMFunction,
)
from ..errors import DataDigestError, HeaderDigestDiscarded, ProtocolError
from ..pdu import (
    PDU,
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LogoutResponse,
    NopIn,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtResponse,
    TextResponse,
)
from ..serial import CmdWindow, TagAllocator, sn_add, sn_gt
from .common import Deadlines, Outbox, segments
from .initiator_control import Control
from .initiator_erl import Erl1
from .initiator_timers import InitiatorTimers
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


class SessionSeq:
    """What a session's connections share besides the window and the ITT
    space: the CmdSN of the next non-immediate command (§4.2.2.1)."""

    __slots__ = ("cmdsn",)

    def __init__(self, cmdsn: int) -> None:
        self.cmdsn = cmdsn


class InitiatorEngine(InitiatorTimers):
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
        share: another connection of the same session (MC/S): this engine
            then shares its CmdSN counter, command window and ITT space,
            which are session-wide (§4.2.2.1, §11.2.1.8); StatSN, tasks and
            data transfers stay per connection (connection allegiance, §4.2.2).
    """

    def __init__(self, params: InitiatorParams, *, cmdsn: int, expcmdsn: int, maxcmdsn: int,
                 exp_statsn: int, now: float, cid: int = 0, nop_interval: float | None = None,
                 nop_timeout: float = 5.0, command_timeout: float | None = None,
                 tmf_timeout: float = 10.0, queue_depth: int = 128,
                 share: InitiatorEngine | None = None) -> None:
        self.params = params
        self.seq: SessionSeq
        self.window: CmdWindow
        self.tags: TagAllocator
        if share is not None:
            self.seq = share.seq
            self.window = share.window
            self.tags = share.tags
        else:
            self.seq = SessionSeq(cmdsn & 0xFFFFFFFF)
            try:
                self.window = CmdWindow(expcmdsn, maxcmdsn)
            except ValueError:
                # An invalid window from the login: trust only ExpCmdSN (a
                # one-command window) until a response corrects it.
                self.window = CmdWindow(expcmdsn & 0xFFFFFFFF)
            self.tags = TagAllocator(1)
        self.exp_statsn = exp_statsn & 0xFFFFFFFF
        self.cid = cid
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.command_timeout = command_timeout
        self.tmf_timeout = tmf_timeout
        self.queue_depth = queue_depth
        self.outbox = Outbox(params.header_digest, params.data_digest)
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
        self._keepalive: tuple[int, float] | None = None
        self.control = Control(self)
        #: ErrorRecoveryLevel 1 (SNACK, recovery R2Ts, retries) when > 0.
        self.erl = params.error_recovery_level
        self.recovery = Erl1(self)
        #: The target's NOP-In pings answered (§11.18.1).
        self.target_pings = 0
        if nop_interval:
            self._timers.set("nop", now + nop_interval)
        self._handlers: dict[int, Callable[[PDU], None]] = {
            Opcode.SCSI_DATA_IN: self._on_data_in,  # type: ignore[dict-item]
            Opcode.SCSI_RESPONSE: self._on_response,  # type: ignore[dict-item]
            Opcode.R2T: self._on_r2t,  # type: ignore[dict-item]
            Opcode.NOP_IN: self.control.on_nop_in,  # type: ignore[dict-item]
            Opcode.TASK_MGMT_RESPONSE: self.control.on_tmf_response,  # type: ignore[dict-item]
            Opcode.TEXT_RESPONSE: self.control.on_text_response,  # type: ignore[dict-item]
            Opcode.LOGOUT_RESPONSE: self.control.on_logout_response,  # type: ignore[dict-item]
            Opcode.ASYNC_MESSAGE: self.control.on_async,  # type: ignore[dict-item]
            Opcode.REJECT: self.control.on_reject,  # type: ignore[dict-item]
        }

    @property
    def cmdsn(self) -> int:
        """The CmdSN of the next non-immediate command (session-wide)."""
        return self.seq.cmdsn

    @cmdsn.setter
    def cmdsn(self, value: int) -> None:
        self.seq.cmdsn = value

    @property
    def load(self) -> int:
        """Commands on this connection: in flight plus queued."""
        return len(self.tasks) + len(self.queue) + len(self.urgent)

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

    def recovers(self, exc: ProtocolError) -> bool:
        """Whether :meth:`protocol_error` recovers from ``exc`` on a live
        connection: at ErrorRecoveryLevel 1 a data digest error, or a PDU
        discarded for its header digest (§7.8)."""
        if isinstance(exc, HeaderDigestDiscarded):
            return bool(self.erl)
        return bool(self.erl) and isinstance(exc, DataDigestError) and \
            exc.header is not None and len(exc.header) >= 48

    def protocol_error(self, exc: ProtocolError, now: float) -> list[Event]:
        """A PDU that failed to decode. At ErrorRecoveryLevel 1 a data
        digest error is recovered (the PDU asked for again, §7.8); anything
        else ends the connection."""
        self._now = now
        if self.closed:
            return []
        if isinstance(exc, HeaderDigestDiscarded) and self.erl:
            # Nothing to ask for by name: a lost Data-In, R2T or status shows
            # as a gap in its sequence number, a command the target never
            # got in ExpCmdSN (§7.1.5, §7.9).
            pass
        elif self.recovers(exc):
            assert exc.header is not None
            self.recovery.digest_error(exc.header)
        else:
            self.events.append(ConnectionFailed(str(exc), violation=True))
        self._pump(now)
        return self.take_events()

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
        cmd.itt = self.tags.allocate()
        cmd.cmdsn = self.cmdsn
        self.cmdsn = sn_add(self.cmdsn, 1)
        self._send(cmd)

    def retry(self, cmd: Command, now: float) -> None:
        """Send ``cmd`` again with its original ITT and CmdSN on this
        connection: it was sent on another connection of the session that
        has since been logged out, and the target never took it (its CmdSN
        is not below ExpCmdSN), so it plugs that gap in the session's
        CmdSN order (RFC 7143 §7.2.1). Sent at once: its CmdSN is already
        inside the window."""
        if self.closed:
            raise RuntimeError("engine is closed")
        self._now = now
        itt, cmdsn = cmd.itt, cmd.cmdsn
        cmd.reset()
        cmd.itt, cmd.cmdsn = itt, cmdsn
        if cmd.deadline is not None:
            heapq.heappush(self._cmd_deadlines, (cmd.deadline, id(cmd), cmd))
        self._send(cmd)

    def reassign(self, cmd: Command, now: float) -> int:
        """Take over ``cmd`` from a failed connection of the session with
        TASK REASSIGN (ErrorRecoveryLevel 2, §11.5.1, §7.2.2): it becomes
        this connection's task, with its ITT and CmdSN, and the target
        resends its Data-In and status here, or asks for its write data
        again with R2Ts. A read keeps the Data-In it has: ExpDataSN tells
        the target the first DataSN still wanted (§11.5.6), the lowest one
        lost or the next one. Returns the TMF's ITT (the answer is
        :class:`TaskManagementDone`); when it is not "Function complete"
        the owner takes the command back with :meth:`disown`."""
        if self.closed:
            raise RuntimeError("engine is closed")
        self._now = now
        itt, cmdsn = cmd.itt, cmd.cmdsn
        resume = 0
        if cmd.data_in is not None:
            resume = min(cmd.missing) if cmd.missing else cmd.next_datasn
        received = cmd.received
        cmd.reset()
        cmd.itt, cmd.cmdsn, cmd.sent = itt, cmdsn, True
        if resume:
            # Data at and after the resume point comes again (to the same
            # offsets); what is below it stays in place.
            cmd.next_datasn, cmd.received = resume, received
        if cmd.data_out is not None:
            # A write the target already has whole gets its status alone.
            cmd.solicited_sent = cmd.edtl
        self.tasks[itt] = cmd
        if cmd.deadline is not None:
            heapq.heappush(self._cmd_deadlines, (cmd.deadline, id(cmd), cmd))
        return self.control.tmf("tmf", TMFunction.TASK_REASSIGN, cmd.lun, itt, cmd,
                                expdatasn=resume)

    def disown(self, cmd: Command) -> None:
        """Forget ``cmd`` without an event (a TASK REASSIGN refused)."""
        if self.tasks.get(cmd.itt) is cmd:
            del self.tasks[cmd.itt]

    def _send(self, cmd: Command) -> None:
        cmd.sent = True
        cmd.attempts += 1
        self.tasks[cmd.itt] = cmd
        self._send_command(cmd)

    def _send_command(self, cmd: Command) -> None:
        """The SCSI Command PDU with its immediate and unsolicited data
        (sent again as it was for a retry: same ITT and CmdSN, §7.2.1)."""
        p = self.params
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
        self.outbox.add(ScsiCommand(
            itt=cmd.itt, lun=cmd.lun_field, cdb=cmd.cdb, expected_data_transfer_length=edtl,
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
        add, lun, exp = self.outbox.add, cmd.lun_field, self.exp_statsn
        for datasn, (off, n, final) in enumerate(segments(start, end, self.params.max_xmit)):
            add(DataOut(final=final, lun=lun, itt=cmd.itt, ttt=ttt, expstatsn=exp,
                        datasn=datasn, buffer_offset=off, data=data[off : off + n]))

    # ------------------------------------------------------- bookkeeping
    def _window(self, pdu: DataIn | ScsiResponse | R2T | NopIn | TaskMgmtResponse
                | TextResponse | LogoutResponse | AsyncMessage | Reject) -> None:
        # §4.2.2.1: invalid pairs are ignored, values only move forward.
        self.window.update(pdu.expcmdsn, pdu.maxcmdsn)

    def _status_seen(self, statsn: int) -> None:
        if self.erl:
            self.recovery.status_seen(statsn)
            return
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
        if self.erl:
            self.recovery.on_data_in(pdu)
            return
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
        if self.erl:
            self.recovery.on_response(pdu)
            return
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
            # GOOD must account for every byte: what was
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
        if self.erl:
            self.recovery.on_r2t(pdu)
            return
        self._window(pdu)
        cmd = self.tasks.get(pdu.itt)
        if cmd is None:
            return  # for a task we already ended (aborted)
        start, length = pdu.buffer_offset, pdu.desired_data_transfer_length
        if cmd.data_out is None:
            raise self._violation(cmd, f"R2T for a command that writes nothing "
                                       f"(CDB 0x{cmd.cdb[0]:02x})")
        # With DataSequenceInOrder=Yes (§13.20) and ERL 0
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

    # ------------------------------------------- NOP, TMF, Text, Logout
    def ping(self, now: float, data: bytes = b"") -> int:
        """Send a NOP-Out ping (§11.18); the answer is :class:`PingAnswered`."""
        return self.control.ping(now, data)

    def task_management(self, function: int, now: float, lun: int = 0,
                        referenced_itt: int = RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5, immediate); the
        answer is :class:`TaskManagementDone`."""
        return self.control.task_management(function, now, lun, referenced_itt)

    def text(self, data: bytes, now: float) -> int:
        """Start a Text exchange with encoded ``data`` (continuations as
        needed, §11.10.2); the answer is :class:`TextDone`."""
        return self.control.text(data, now)

    def logout(self, now: float, reason: int = LogoutReason.CLOSE_SESSION,
               cid: int | None = None) -> int:
        """Send an immediate Logout Request (§11.14); no further command
        is sent -- unless ``cid`` names another connection, which is then
        the one closed (§11.14.1). The answer is :class:`LogoutDone`."""
        return self.control.logout(now, reason, cid)

    def forget(self, itt: int) -> None:
        """The owner stopped waiting for exchange ``itt`` (its own
        timeout): free its tag; a late answer is ignored."""
        if self._exchanges.pop(itt, None) is not None:
            self.tags.discard(itt)
            self.control.forget(itt)

    def _exchange(self, kind: str, function: int = 0, cmd: Command | None = None) -> int:
        itt = self.tags.allocate()
        self._exchanges[itt] = (kind, function, cmd)
        return itt


    # --------------------------------------------------------------- end
    def close(self) -> list[Command]:
        """The connection ended: return every command not yet ended (sent
        ones first, then queued; each in submission order) for the owner
        to fail or reissue on a new connection (§7.1.4.3)."""
        self.closed = True
        # The ITTs of NOP, TMF, Text and Logout exchanges are free again
        # (those of commands are the owner's to keep for a retry, §7.2.1,
        # or to discard).
        for itt in self._exchanges:
            self.tags.discard(itt)
        self._exchanges.clear()
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
    "SessionSeq", "TargetViolation", "TaskManagementDone", "TextDone",
]
