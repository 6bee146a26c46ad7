"""The target engine's control exchanges (RFC 7143): NOP-In/Out (§11.18,
§11.19), Text with continuation in both directions (§11.10, §11.11), Logout
(§11.14, §11.15), the Task Management Response (§11.6), SNACK at ERL 0, and
the helpers every exchange uses: StatSN, TTTs, Reject and in-order delivery
through the session's CmdSN window. :class:`~iscsi.ffp.target.
TargetConnectionEngine` adds the SCSI command and data path on top."""

from __future__ import annotations

from collections.abc import Callable

from ..constants import (
    RESERVED_TAG,
    AsyncEvent,
    LogoutReason,
    LogoutResponseCode,
    RejectReason,
)
from ..errors import ProtocolError
from ..pdu import (
    PDU,
    AsyncMessage,
    Buffer,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
)
from ..serial import sn_add
from ..text import decode_text
from .common import Deadlines, Outbox
from .target_tasks import CloseConnection, Event, LogoutRequested, TargetParams, TextRequested
from .window import CmdSNWindow

#: Text Request data accumulated across continuations (§11.10.2) is capped.
MAX_TEXT_REQUEST = 64 << 10


class ControlExchanges:
    """State and exchanges of a target connection other than SCSI data."""

    window: CmdSNWindow
    params: TargetParams
    outbox: Outbox
    events: list[Event]
    statsn: int
    closed: bool
    nop_interval: float
    nop_timeout: float
    _ttt: int
    _timers: Deadlines
    _nop_ttt: int | None
    _last_rx: float
    #: (ttt, data still to send) of a Text answer split over responses.
    _text_out: tuple[int, bytes] | None
    #: (itt, data so far) of a Text Request arriving in continuations.
    _text_in: tuple[int, bytearray] | None

    def _nop_due(self, now: float) -> None:
        if self._nop_ttt is not None:
            self.events.append(CloseConnection(
                f"no NOP-Out answer within {self.nop_timeout:.0f} s"))
            return
        idle = now - self._last_rx
        if idle >= self.nop_interval:
            self._nop_ttt = self._new_ttt()
            self.outbox.add(NopIn(itt=RESERVED_TAG, ttt=self._nop_ttt, statsn=self.statsn,
                                  expcmdsn=self.window.expcmdsn, maxcmdsn=self.window.maxcmdsn))
            self._timers.set("nop", now + self.nop_timeout)
        else:
            self._timers.set("nop", self._last_rx + self.nop_interval)

    # ------------------------------------------------------------- helpers
    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    def _new_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0xFFFFFFFF
        if self._ttt == RESERVED_TAG:
            self._ttt = 1
        return self._ttt

    def reject(self, reason: int, header: Buffer) -> None:
        """Send a Reject carrying the offending header (§11.17)."""
        w = self.window
        self.outbox.add(Reject(reason=reason, statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                               maxcmdsn=w.maxcmdsn, data=bytes(header[:48])))

    def _consume(self, cmdsn: int, immediate: bool) -> None:
        """A PDU answered without running still advances CmdSN in order."""
        w = self.window
        if not immediate:
            w.admit(cmdsn, False, w.release)

    def _admit(self, pdu: ScsiCommand | NopOut | TaskMgmtRequest | TextRequest | LogoutRequest,
               run: Callable[[], None], keeps_slot: bool = False) -> None:
        """Deliver ``pdu`` in CmdSN order. Unless ``keeps_slot`` (a SCSI
        command holds its slot until it completes), the slot returns as
        soon as ``run`` has run -- not when the PDU is held (a held PDU
        takes no slot), so the window cannot leak."""
        w = self.window
        if pdu.immediate or keeps_slot:
            go = run
        else:
            def go() -> None:
                if not self.closed:
                    run()
                w.release()
        if not w.admit(pdu.cmdsn, pdu.immediate, go, self):
            # §4.2.2.1: outside the window, silently ignored.
            return

    # ---------------------------------------------------------------- NOP
    def _on_nop_out(self, pdu: NopOut) -> None:
        if pdu.ttt != RESERVED_TAG:
            # The answer to our NOP-In ping (§11.18.1).
            if pdu.ttt == self._nop_ttt:
                self._nop_ttt = None
                if self.nop_interval > 0:
                    self._timers.set("nop", self._last_rx + self.nop_interval)
            self._consume(pdu.cmdsn, pdu.immediate)
            return
        if pdu.itt == RESERVED_TAG:
            # A ping that asks for no answer; it carries CmdSN but does not
            # advance it (it must be immediate, §11.18.2).
            return
        data = bytes(pdu.data)

        def answer() -> None:
            w = self.window
            self.outbox.add(NopIn(itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun,
                                  statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                                  maxcmdsn=w.maxcmdsn, data=data))
        self._admit(pdu, answer)

    def tmf_done(self, itt: int, response: int) -> None:
        """Send the Task Management Function Response."""
        if self.closed:
            return
        w = self.window
        self.outbox.add(TaskMgmtResponse(itt=itt, response=response, statsn=self._next_statsn(),
                                         expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn))

    # ---------------------------------------------------------------- text
    def _on_text(self, pdu: TextRequest) -> None:
        def run() -> None:
            if pdu.ttt != RESERVED_TAG:
                pending = self._text_out
                if pending is not None and pending[0] == pdu.ttt:
                    # The initiator asks for the rest of our answer (§11.11.1).
                    self._text_out = None
                    self.text_answer(pdu.itt, pending[1])
                    return
                if self._text_in is None or self._text_in[0] != pdu.itt:
                    self.reject(RejectReason.INVALID_PDU_FIELD, pdu.to_bytes()[:48])
                    return
            acc = self._text_in[1] if self._text_in is not None and \
                self._text_in[0] == pdu.itt else bytearray()
            acc += pdu.data
            if len(acc) > MAX_TEXT_REQUEST:
                self._text_in = None
                self.reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
                return
            if pdu.cont:
                # More of the request follows: an empty response with a TTT
                # asks for it (§11.10.2).
                self._text_in = (pdu.itt, acc)
                w = self.window
                self.outbox.add(TextResponse(itt=pdu.itt, final=False, ttt=self._new_ttt(),
                                             statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                                             maxcmdsn=w.maxcmdsn))
                return
            self._text_in = None
            try:
                pairs = decode_text(bytes(acc))
            except ProtocolError as exc:
                self.reject(exc.reject_reason or RejectReason.PROTOCOL_ERROR,
                            pdu.to_bytes()[:48])
                return
            self.events.append(TextRequested(pdu.itt, pairs))
        self._admit(pdu, run)

    def text_answer(self, itt: int, data: bytes) -> None:
        """Send a Text Response, split over several when longer than the
        initiator takes at once (C bit and a TTT, §11.11.1)."""
        if self.closed:
            return
        w = self.window
        limit = self.params.max_xmit
        final = len(data) <= limit
        ttt = RESERVED_TAG
        if not final:
            ttt = self._new_ttt()
            self._text_out = (ttt, data[limit:])
            data = data[:limit]
        self.outbox.add(TextResponse(itt=itt, final=final, cont=not final, ttt=ttt,
                                     statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                                     maxcmdsn=w.maxcmdsn, data=data))

    # -------------------------------------------------------------- logout
    def _on_logout(self, pdu: LogoutRequest) -> None:
        def run() -> None:
            if pdu.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY and \
                    self.params.error_recovery_level < 2:
                self.logout_answer(pdu.itt, LogoutResponseCode.RECOVERY_NOT_SUPPORTED)
            else:
                self.events.append(LogoutRequested(pdu.itt, pdu.reason, pdu.cid))
        self._admit(pdu, run)

    def logout_answer(self, itt: int, code: int, time2wait: int = 0,
                      time2retain: int = 0) -> None:
        """Send the Logout Response (§11.15); Time2Wait/Time2Retain are 0
        but after removing a connection for recovery (ERL 2)."""
        w = self.window
        self.outbox.add(LogoutResponse(itt=itt, response=code, statsn=self._next_statsn(),
                                       expcmdsn=w.expcmdsn, maxcmdsn=w.maxcmdsn,
                                       time2wait=time2wait, time2retain=time2retain))

    def request_logout(self, wait: int) -> None:
        """Ask the initiator to log out (Async Message, event 1, §11.9.1)."""
        if self.closed:
            return
        w = self.window
        self.outbox.add(AsyncMessage(statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                                     maxcmdsn=w.maxcmdsn, async_event=AsyncEvent.LOGOUT_REQUEST,
                                     parameter3=wait))

    def announce_drop(self, cid: int, time2wait: int, time2retain: int) -> None:
        """Tell the initiator that connection ``cid`` of the session is
        being dropped (Async Message, event 2, on another connection;
        Parameter1 is the CID, Parameter2/3 Time2Wait/Time2Retain, §11.9.1)."""
        if self.closed:
            return
        w = self.window
        self.outbox.add(AsyncMessage(statsn=self._next_statsn(), expcmdsn=w.expcmdsn,
                                     maxcmdsn=w.maxcmdsn, async_event=AsyncEvent.CONNECTION_DROP,
                                     parameter1=cid, parameter2=time2wait,
                                     parameter3=time2retain))

    # --------------------------------------------------------------- SNACK
    def _on_snack(self, pdu: PDU) -> None:
        # ErrorRecoveryLevel 0 (what we negotiate): SNACK is not supported.
        self.reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.to_bytes()[:48])

