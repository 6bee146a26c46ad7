"""The initiator's exchanges besides SCSI commands, for
:class:`~iscsi.ffp.initiator.InitiatorEngine`: NOP-In/Out (§11.18,
§11.19), Task Management with the command-timeout escalation (§11.5,
§11.6), Text with continuation (§11.10, §11.11), Logout (§11.14,
§11.15), Asynchronous Messages (§11.9) and Reject (§11.17). They share the
engine's StatSN, window, tags and outbox; this class keeps only their own
state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..constants import (
    RESERVED_TAG,
    AsyncEvent,
    LogoutReason,
    Opcode,
    RejectReason,
    TMFunction,
    TMResponse,
)
from ..errors import ProtocolError
from ..pdu import (
    AsyncMessage,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    encode_lun,
)
from ..serial import sn_add
from ..text import TextAssembler, decode_text, split_text
from .initiator_tasks import (
    AsyncNotice,
    Command,
    CommandFailed,
    ConnectionFailed,
    ExchangeFailed,
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)

if TYPE_CHECKING:
    from .initiator import InitiatorEngine


class _Text:
    """A Text exchange in progress (§11.10, §11.11)."""

    __slots__ = ("itt", "rest", "assembler")

    def __init__(self, itt: int, rest: list[bytes]) -> None:
        self.itt = itt
        self.rest = rest
        self.assembler = TextAssembler()


class Control:
    """The non-SCSI exchanges of one :class:`InitiatorEngine`."""

    def __init__(self, engine: InitiatorEngine) -> None:
        self.e = engine
        self._text: _Text | None = None
        #: ITT -> LUN of each TMF outstanding.
        self._tmf_lun: dict[int, int] = {}

    # --------------------------------------------------------------- NOP
    def ping(self, now: float, data: bytes = b"") -> int:
        """Send a NOP-Out ping (§11.18); the answer is :class:`PingAnswered`."""
        itt = self.e._exchange("ping")
        self.e.outbox.add(NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=self.e.cmdsn,
                               expstatsn=self.e.exp_statsn, immediate=True, data=data))
        return itt

    def on_nop_in(self, pdu: NopIn) -> None:
        self.e._window(pdu)
        if pdu.itt != RESERVED_TAG:
            # The answer to a ping carries a StatSN (§11.19.2).
            self.e._status_seen(pdu.statsn)
            ex = self.e._exchanges.pop(pdu.itt, None)
            if ex is not None:
                self.e.tags.discard(pdu.itt)
                if ex[0] == "keepalive":
                    self.e._keepalive = None
                    if self.e.erl:
                        self.e.recovery.ping_answered(pdu.itt)
                    if self.e.nop_interval:
                        self.e._timers.set("nop", self.e._now + self.e.nop_interval)
                else:
                    self.e.events.append(PingAnswered(pdu.itt, bytes(pdu.data)))
        elif self.e.erl:
            # A NOP-In's StatSN is the next one: a gap below it is status
            # lost on the way (§7.9).
            self.e.recovery.probe(pdu.statsn)
        if pdu.ttt != RESERVED_TAG:
            # §11.18.1: the target's ping: echo its TTT and data, ITT
            # reserved, immediate, CmdSN not advanced.
            self.e.target_pings += 1
            self.e.outbox.add(NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.e.cmdsn,
                                   expstatsn=self.e.exp_statsn, immediate=True,
                                   data=bytes(pdu.data)))

    # --------------------------------------------------------------- TMF
    def task_management(self, function: int, now: float, lun: int = 0,
                        referenced_itt: int = RESERVED_TAG) -> int:
        """Send a Task Management Function Request (§11.5, immediate); the
        answer is :class:`TaskManagementDone`."""
        return self.tmf("tmf", function, lun, referenced_itt, self.e.tasks.get(referenced_itt))

    def tmf(self, kind: str, function: int, lun: int, referenced_itt: int,
            cmd: Command | None, *, expdatasn: int = 0) -> int:
        ref = self.e.tasks.get(referenced_itt)
        itt = self.e._exchange(kind, function, cmd)
        self._tmf_lun[itt] = lun
        self.e.outbox.add(TaskMgmtRequest(
            function=function, lun=encode_lun(lun), itt=itt,
            referenced_task_tag=referenced_itt if function in (
                TMFunction.ABORT_TASK, TMFunction.TASK_REASSIGN) else RESERVED_TAG,
            # RefCmdSN: the referenced task's CmdSN (§11.5.4).
            refcmdsn=ref.cmdsn if ref is not None else self.e.cmdsn,
            cmdsn=self.e.cmdsn, expstatsn=self.e.exp_statsn, expdatasn=expdatasn,
            immediate=True))
        return itt

    def on_tmf_response(self, pdu: TaskMgmtResponse) -> None:
        self.e._status_seen(pdu.statsn)
        self.e._window(pdu)
        ex = self.e._exchanges.pop(pdu.itt, None)
        if ex is None:
            return
        self.e.tags.discard(pdu.itt)
        self.e._timers.cancel(f"tmf{pdu.itt}")
        kind, function, cmd = ex
        lun = self._tmf_lun.pop(pdu.itt, 0)
        ok = pdu.response in (TMResponse.FUNCTION_COMPLETE, TMResponse.TASK_DOES_NOT_EXIST)
        if kind == "tmf":
            if pdu.response == TMResponse.FUNCTION_COMPLETE:
                if function == TMFunction.ABORT_TASK and cmd is not None \
                        and self.e.tasks.get(cmd.itt) is cmd:
                    # The aborted task gets no status (§4.2.3.3): it ends here.
                    self.e._end(cmd)
                    self.e.events.append(CommandFailed(cmd, "aborted", "ended by ABORT TASK"))
                self._aborted_by(function, pdu, "aborted", lun)
            self.e.events.append(TaskManagementDone(pdu.itt, function, pdu.response))
            return
        assert cmd is not None
        if ok:
            # The timed-out task is gone at the target (or was never
            # there): it fails with the timeout (Linux: eh_abort_handler).
            self.e._end(cmd)
            self.e.events.append(CommandFailed(cmd, "timeout", self._timeout_text(cmd)))
            if kind == "reset":
                self._aborted_by(TMFunction.LOGICAL_UNIT_RESET, pdu, "reset", cmd.lun)
        elif kind == "abort":
            # ABORT TASK refused: reset the LU (eh_device_reset_handler).
            itt = self.tmf("reset", TMFunction.LOGICAL_UNIT_RESET, cmd.lun, RESERVED_TAG, cmd)
            self.e._timers.set(f"tmf{itt}", self.e._now + self.e.tmf_timeout)
        else:
            self.e.events.append(ConnectionFailed(
                f"LOGICAL UNIT RESET refused (response {pdu.response}) after a command timeout"))

    def _aborted_by(self, function: int, pdu: TaskMgmtResponse, kind: str,
                    lun: int | None = None) -> None:
        """Commands a successful TMF ended at the target get no status:
        they end here (§4.2.3.3)."""
        if function in (TMFunction.LOGICAL_UNIT_RESET, TMFunction.ABORT_TASK_SET,
                        TMFunction.CLEAR_TASK_SET):
            victims = [c for c in self.e.tasks.values() if lun is None or c.lun == lun]
        elif function in (TMFunction.TARGET_WARM_RESET, TMFunction.TARGET_COLD_RESET):
            victims = list(self.e.tasks.values())
        else:
            return
        for c in victims:
            self.e._end(c)
            self.e.events.append(CommandFailed(c, kind, f"ended by task management function "
                                                      f"{function}"))

    def _timeout_text(self, cmd: Command) -> str:
        return (f"no status for CDB 0x{cmd.cdb[0]:02x} within the command timeout of "
                f"{self.e.command_timeout:g} s; the task was aborted")

    # -------------------------------------------------------------- text
    def forget(self, itt: int) -> None:
        """Drop what this class keeps for exchange ``itt``."""
        self._tmf_lun.pop(itt, None)
        if self._text is not None and self._text.itt == itt:
            self._text = None

    def text(self, data: bytes, now: float) -> int:
        """Start a Text exchange with encoded ``data`` (split into
        continuations of at most MaxRecvDataSegmentLength, §11.10.2); the
        answer is :class:`TextDone`. One exchange at a time: one still
        open (its owner gave up waiting) is abandoned, and a late answer
        to it ignored."""
        if self._text is not None:
            old = self._text.itt
            self.e._exchanges.pop(old, None)
            self.e.tags.discard(old)
            self._text = None
        parts = split_text(data, self.e.params.max_xmit) or [b""]
        itt = self.e._exchange("text")
        self._text = _Text(itt, parts)
        self._text_pdu(RESERVED_TAG)
        return itt

    def _text_pdu(self, ttt: int) -> None:
        t = self._text
        assert t is not None
        seg = t.rest.pop(0) if t.rest else b""
        final = not t.rest
        cmdsn = self.e.cmdsn
        self.e.cmdsn = sn_add(cmdsn, 1)
        self.e.outbox.add(TextRequest(final=final, cont=not final, itt=t.itt, ttt=ttt, cmdsn=cmdsn,
                                    expstatsn=self.e.exp_statsn, data=seg))

    def on_text_response(self, pdu: TextResponse) -> None:
        self.e._status_seen(pdu.statsn)
        self.e._window(pdu)
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
            self.e._exchanges.pop(self._text.itt, None)
            self.e.tags.discard(self._text.itt)
        self._text = None
        self.e.events.append(event)

    # ------------------------------------------------------------ logout
    def logout(self, now: float, reason: int = LogoutReason.CLOSE_SESSION,
               cid: int | None = None) -> int:
        """Send an immediate Logout Request (§11.14). No further command
        is sent; those in flight may still complete before the response
        (:class:`LogoutDone`). With ``cid`` naming another connection of
        the session (one we lost) this connection carries on."""
        if cid is None or cid == self.e.cid:
            self.e.logging_out = True
            cid = self.e.cid
        itt = self.e._exchange("logout")
        self.e.outbox.add(LogoutRequest(reason=reason, itt=itt, cid=cid, cmdsn=self.e.cmdsn,
                                      expstatsn=self.e.exp_statsn, immediate=True))
        return itt

    def on_logout_response(self, pdu: LogoutResponse) -> None:
        self.e._status_seen(pdu.statsn)
        self.e._window(pdu)
        if self.e._exchanges.pop(pdu.itt, None) is not None:
            self.e.tags.discard(pdu.itt)
            self.e.events.append(LogoutDone(pdu.itt, pdu.response, pdu.time2wait,
                                          pdu.time2retain))

    # ---------------------------------------------------- async, reject
    def on_async(self, pdu: AsyncMessage) -> None:
        self.e._status_seen(pdu.statsn)
        self.e._window(pdu)
        sense = bytes(pdu.data[2:]) if pdu.async_event == AsyncEvent.SCSI_ASYNC_EVENT \
            and len(pdu.data) >= 2 else b""
        self.e.events.append(AsyncNotice(pdu.async_event, pdu.lun, sense, pdu.parameter1,
                                       pdu.parameter2, pdu.parameter3))

    def on_reject(self, pdu: Reject) -> None:
        if self.e.erl and self.e.recovery.on_reject(pdu):
            return
        self.e._status_seen(pdu.statsn)
        self.e._window(pdu)
        try:
            words = RejectReason(pdu.reason).name.lower().replace("_", " ")
        except ValueError:
            words = f"reason 0x{pdu.reason:02x}"
        reason = f"target rejected a PDU: {words}"
        itt = pdu.rejected_itt
        if itt is not None:
            cmd = self.e.tasks.get(itt)
            if cmd is not None and pdu.rejected_opcode == Opcode.SCSI_COMMAND:
                # §7.4.1 (ERL 0): a rejected command gets no response.
                self.e._end(cmd)
                self.e.events.append(CommandFailed(cmd, "rejected", reason))
                return
            if self._text is not None and self._text.itt == itt:
                self._text_end(ExchangeFailed(itt, reason))
                return
            if itt in self.e._exchanges:
                self.e._exchanges.pop(itt)
                self.e.tags.discard(itt)
                self.e.events.append(ExchangeFailed(itt, reason))
                return
        if pdu.reason == RejectReason.DATA_DIGEST_ERROR and not self.e.erl:
            # ERL 0 cannot resend the data: recover the session (§7.8).
            self.e.events.append(ConnectionFailed(reason))
