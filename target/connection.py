"""One iSCSI connection on the target: an ``asyncio.BufferedProtocol``
around the sans-I/O codec.

Receive: the kernel writes into :class:`iscsi.framing.PDUReader` buffers;
Data-Out payloads (and immediate data) land straight in the task's write
buffer through the reader's placement callback.

Send: every PDU produced while handling one receive or one task completion is
appended to ``self._out`` and written with a single ``writelines`` on the
next loop iteration (DESIGN.md: one syscall per batch). Read data goes out as
memoryview slices of what the backend returned (an mmap view for raw files):
no payload copy on the target's read path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, cast

from iscsi.constants import (
    RESERVED_TAG,
    AsyncEvent,
    ISCSIResponse,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    RejectReason,
    TMFunction,
    TMResponse,
)
from iscsi.errors import ProtocolError
from iscsi.framing import PDUReader
from iscsi.pdu import (
    PDU,
    AsyncMessage,
    Buffer,
    DataIn,
    DataOut,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    R2T,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    decode_lun,
)
from iscsi.scsi.constants import SenseKey, Status
from iscsi.scsi.sense import SenseData
from iscsi.serial import sn_add

from target.backends.modes import initiator_scope

from .session import Session

if TYPE_CHECKING:
    from .server import TargetServer

log = logging.getLogger("aioiscsi.target")

_U32 = struct.Struct(">I")
#: Largest write a single command may carry; bounded so a hostile initiator
#: cannot make us allocate without limit (VPD B0h advertises less).
MAX_WRITE_BUFFER = 64 << 20
#: Write buffers one connection may hold at once; beyond it commands get
#: TASK SET FULL (SAM-5 §5.3.1) instead of memory.
CONNECTION_BUFFER_BUDGET = 256 << 20


class Task:
    """A SCSI command in flight on this connection."""

    __slots__ = ("itt", "lun", "cmd", "edtl", "buf", "received", "unsolicited_end",
                 "next_r2t_offset", "r2ts", "r2tsn", "aborted", "immediate", "done",
                 "future", "executing", "unsol_next")

    def __init__(self, cmd: ScsiCommand, buf: bytearray | None) -> None:
        self.itt = cmd.itt
        self.lun = decode_lun(cmd.lun)
        self.cmd = cmd
        self.edtl = cmd.expected_data_transfer_length
        self.buf = buf
        self.received = 0
        self.unsolicited_end = 0
        self.next_r2t_offset = 0
        #: ttt -> [buffer offset, length, next expected offset, next DataSN]
        self.r2ts: dict[int, list[int]] = {}
        self.r2tsn = 0
        self.aborted = False
        self.immediate = cmd.immediate
        self.done = False
        self.executing = False
        self.future: asyncio.Future[None] | None = None
        #: (next offset, next DataSN) of the unsolicited Data-Out sequence.
        self.unsol_next = (len(cmd.data), 0)


class TargetConnection(asyncio.BufferedProtocol):
    """The per-connection protocol object."""

    def __init__(self, server: TargetServer, portal_group_tag: int) -> None:
        self.server = server
        self.portal_group_tag = portal_group_tag
        self.loop = asyncio.get_event_loop()
        self.reader = PDUReader(placement=self._placement)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.local: tuple[str, int] = ("", 0)
        self.closed = False
        self.session: Session | None = None
        self.cid = 0
        self.statsn = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        self.header_digest = False
        self.data_digest = False
        self.max_xmit = 8192
        self.max_burst = 262144
        self.first_burst = 65536
        self.initial_r2t = True
        self.immediate_data = True
        self.max_outstanding_r2t = 1
        self.tasks: dict[int, Task] = {}
        self._ttt = 0x1000
        self._ttt_map: dict[int, Task] = {}
        #: Write buffers the placement callback made for SCSI Commands whose
        #: immediate data is being received, by ITT, until the command is
        #: handled (several may be parsed from one receive).
        self._placed: dict[int, bytearray] = {}
        #: ITTs of writes failed mid-transfer: their remaining Data-Out is
        #: dropped silently (insertion-ordered, bounded).
        self._dead_itts: dict[int, None] = {}
        self._buffered_bytes = 0
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._login: Any = None
        self._login_timer: asyncio.TimerHandle | None = None
        self._nop_timer: asyncio.TimerHandle | None = None
        self._nop_ttt: int | None = None
        self._last_rx = 0.0
        self._logout_pending = False
        self._writing_paused = False

    # ------------------------------------------------------------------ I/O
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but
        # provide the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # DESIGN.md: never let Nagle delay a response.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"[{peer[0]}]:{peer[1]}" if peer and ":" in peer[0] else (
            f"{peer[0]}:{peer[1]}" if peer else "?")
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if local else ("", 0)
        self._last_rx = self.loop.time()
        self._login = self.server.new_login(self)
        self._login_timer = self.loop.call_later(self.server.config.login_timeout,
                                                 self._login_timed_out)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for h in (self._login_timer, self._nop_timer):
            if h is not None:
                h.cancel()
        self.end_tasks()
        if self.session is not None:
            self.server.connection_closed(self)

    def end_tasks(self) -> None:
        """At ErrorRecoveryLevel 0 the tasks of a connection end with it
        (RFC 7143 §7.1.4, §6.3.5): their CmdSN slots go back to the session
        (which may live on in other connections) and a TMF waiting for one
        of them is released. Whoever removes a task from ``tasks`` gives its
        slot back; a task still executing is then not counted again."""
        sess = self.session
        for task in self.tasks.values():
            task.aborted = True
            if not task.immediate and sess is not None:
                sess.complete()
            if task.future is not None and not task.future.done():
                task.future.set_result(None)
        self.tasks.clear()
        self._ttt_map.clear()

    def pause_writing(self) -> None:
        # DESIGN.md: a peer that does not read must not grow our buffers.
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_rx = self.loop.time()
        try:
            pdus = self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            if not self._on_protocol_error(exc):
                return
            pdus = []
        self._pump(pdus)

    def eof_received(self) -> bool | None:
        return None

    def _pump(self, pdus: list[PDU]) -> None:
        while not self.closed:
            for pdu in pdus:
                self._handle(pdu)
                if self.closed:
                    return
            try:
                pdus = self.reader.parse()
            except ProtocolError as exc:
                if not self._on_protocol_error(exc):
                    return
                continue
            if not pdus:
                break

    def send(self, pdu: PDU) -> None:
        """Queue ``pdu``; everything queued in one loop turn is one write."""
        self._out.extend(pdu.encode(self.header_digest, self.data_digest))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self.transport.writelines(out)
        else:
            self._out.clear()

    def close(self, reason: str = "") -> None:
        """Flush what is queued and close the TCP connection."""
        if self.closed:
            return
        if reason:
            log.info("%s: closing connection: %s", self.peer, reason)
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (RFC 7143: ERL 0 recovery)."""
        log.warning("%s: dropping connection: %s", self.peer, reason)
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --------------------------------------------------------------- errors
    def _on_protocol_error(self, exc: ProtocolError) -> bool:
        """Answer a decoding error as the RFC says. Returns True if the
        connection goes on."""
        log.warning("%s: protocol error: %s", self.peer, exc)
        if exc.header is not None and len(exc.header) >= 20:
            # A command that failed to decode after its immediate data was
            # placed: give its buffer back.
            self._release(self._placed.pop(_U32.unpack_from(exc.header, 16)[0], None))
        if self._login is not None and not self._login_done:
            # During login any malformed PDU ends the login (RFC 7143 §6.3).
            self._login_reject(exc)
            return False
        if exc.reject_reason is not None and exc.header is not None:
            self.send_reject(exc.reject_reason, exc.header)
        if exc.drop_connection:
            self.abort(str(exc))
            return False
        return True

    def send_reject(self, reason: int, header: bytes) -> None:
        """Send a Reject carrying the offending header (§11.17)."""
        sess = self.session
        self.send(Reject(reason=reason, statsn=self._next_statsn(),
                         expcmdsn=sess.expcmdsn if sess else 0,
                         maxcmdsn=sess.maxcmdsn if sess else 0, data=header[:48]))

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = sn_add(sn, 1)
        return sn

    # ---------------------------------------------------------------- login
    @property
    def _login_done(self) -> bool:
        return self.session is not None

    def _login_timed_out(self) -> None:
        if not self._login_done and not self.closed:
            log.warning("%s: login not completed within %.0f s; dropping", self.peer,
                        self.server.config.login_timeout)
            self.abort("login timeout")

    def _login_reject(self, exc: ProtocolError) -> None:
        self.server.login_protocol_error(self, exc)

    def login_complete(self, session: Session, params: Any) -> None:
        """Called by the server when the final Login Response is queued:
        switch to full feature phase settings (digests start with the next
        PDU, RFC 7143 §13.1)."""
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.session = session
        self.header_digest = bool(params.header_digest)
        self.data_digest = bool(params.data_digest)
        self.reader.header_digest = self.header_digest
        self.reader.data_digest = self.data_digest
        self.reader.max_data_segment_length = params.max_recv_data_segment_length
        self.max_xmit = params.max_xmit_data_segment_length
        self.max_burst = params.max_burst_length
        self.first_burst = params.first_burst_length
        self.initial_r2t = params.initial_r2t
        self.immediate_data = params.immediate_data
        self.max_outstanding_r2t = params.max_outstanding_r2t
        self._schedule_nop()

    # ---------------------------------------------------------------- NOP-In
    def _schedule_nop(self) -> None:
        interval = self.server.config.nop_interval
        if interval > 0 and not self.closed:
            self._nop_timer = self.loop.call_later(interval, self._nop_check)

    def _nop_check(self) -> None:
        if self.closed or self.session is None:
            return
        cfg = self.server.config
        now = self.loop.time()
        if self._nop_ttt is not None:
            self.abort(f"no NOP-Out answer within {cfg.nop_timeout:.0f} s")
            return
        idle = now - self._last_rx
        if idle >= cfg.nop_interval:
            self._nop_ttt = self._new_ttt()
            sess = self.session
            self.send(NopIn(itt=RESERVED_TAG, ttt=self._nop_ttt, statsn=self.statsn,
                            expcmdsn=sess.expcmdsn, maxcmdsn=sess.maxcmdsn))
            self._nop_timer = self.loop.call_later(cfg.nop_timeout, self._nop_check)
        else:
            self._nop_timer = self.loop.call_later(cfg.nop_interval - idle, self._nop_check)

    def _new_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0xFFFFFFFF
        if self._ttt == RESERVED_TAG:
            self._ttt = 1
        return self._ttt

    # ------------------------------------------------------------- dispatch
    def _handle(self, pdu: PDU) -> None:
        if self.session is None:
            if isinstance(pdu, LoginRequest):
                self.server.handle_login(self, pdu)
            else:
                # RFC 7143 §6.3: only Login Requests before login completes;
                # anything else ends the login with an initiator error.
                self.server.login_out_of_order(self, pdu)
            return
        sess = self.session
        op = pdu.opcode
        if op == Opcode.SCSI_DATA_OUT:
            assert isinstance(pdu, DataOut)
            self._data_out(pdu)
        elif op == Opcode.SCSI_COMMAND:
            assert isinstance(pdu, ScsiCommand)
            self._expstatsn(pdu.expstatsn)
            buf = self._placed.pop(pdu.itt, None)
            if sess.discovery:
                self._release(buf)
                self._consume_cmdsn(pdu.cmdsn, pdu.immediate)
                self.send_reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
                return
            if not sess.admit(pdu.cmdsn, pdu.immediate, self,
                              lambda: self._scsi_command(pdu, buf)):
                log.info("%s: CmdSN %d outside window [%d, %d]; ignored (RFC 7143 §4.2.2.1)",
                         self.peer, pdu.cmdsn, sess.expcmdsn, sess.maxcmdsn)
                self._release(buf)
        elif op == Opcode.NOP_OUT:
            assert isinstance(pdu, NopOut)
            self._nop_out(pdu)
        elif op == Opcode.TASK_MGMT_REQUEST:
            assert isinstance(pdu, TaskMgmtRequest)
            self._expstatsn(pdu.expstatsn)
            if sess.discovery:
                # A discovery session has no tasks to manage (RFC 7143
                # §4.3: Text and Logout only), like SCSI commands above.
                self._consume_cmdsn(pdu.cmdsn, pdu.immediate)
                self.send_reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
                return
            if sess.admit(pdu.cmdsn, pdu.immediate, self, lambda: self._tmf(pdu)) \
                    and not pdu.immediate:
                sess.complete()
        elif op == Opcode.TEXT_REQUEST:
            assert isinstance(pdu, TextRequest)
            if sess.admit(pdu.cmdsn, pdu.immediate, self,
                          lambda: self.server.handle_text(self, pdu)) and not pdu.immediate:
                sess.complete()
        elif op == Opcode.LOGOUT_REQUEST:
            assert isinstance(pdu, LogoutRequest)
            if sess.admit(pdu.cmdsn, pdu.immediate, self, lambda: self._logout(pdu)) \
                    and not pdu.immediate:
                sess.complete()
        elif op == Opcode.SNACK_REQUEST:
            assert isinstance(pdu, SnackRequest)
            # ERL 0 (the only level we negotiate): SNACK is not supported.
            self.send_reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.to_bytes()[:48])
        elif op == Opcode.LOGIN_REQUEST:
            # A Login Request in full feature phase is a protocol error
            # (RFC 7143 §6.3: login is only the first thing on a connection).
            self.send_reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])
        else:
            # Target opcodes sent to a target (§11.17.1).
            self.send_reject(RejectReason.PROTOCOL_ERROR, pdu.to_bytes()[:48])

    def _expstatsn(self, expstatsn: int) -> None:
        """ExpStatSN acknowledges responses; at ERL 0 nothing is retained
        for retransmission, so there is nothing to free."""

    def _consume_cmdsn(self, cmdsn: int, immediate: bool) -> None:
        sess = self.session
        assert sess is not None
        if sess.admit(cmdsn, immediate, self, lambda: None) and not immediate:
            sess.complete()

    # ------------------------------------------------------------------- NOP
    def _nop_out(self, pdu: NopOut) -> None:
        sess = self.session
        assert sess is not None
        if pdu.ttt != RESERVED_TAG:
            # The answer to our NOP-In ping (§11.18.1).
            if pdu.ttt == self._nop_ttt:
                self._nop_ttt = None
                # Answered: the next ping is due one NOP interval of
                # silence from now, not when the answer's timeout expires.
                if self._nop_timer is not None:
                    self._nop_timer.cancel()
                self._schedule_nop()
            if not pdu.immediate:
                self._consume_cmdsn(pdu.cmdsn, False)
            return
        if pdu.itt == RESERVED_TAG:
            # A ping that asks for no answer; it carries CmdSN but does not
            # advance it (must be immediate, §11.18.2).
            return

        def answer() -> None:
            self.send(NopIn(itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun,
                            statsn=self._next_statsn(), expcmdsn=sess.expcmdsn,
                            maxcmdsn=sess.maxcmdsn, data=bytes(pdu.data)))

        if sess.admit(pdu.cmdsn, pdu.immediate, self, answer) and not pdu.immediate:
            sess.complete()

    # ---------------------------------------------------------- SCSI command
    def _placement(self, hdr: bytes, dlen: int) -> memoryview | None:
        """Land immediate data and Data-Out payloads in the task buffer."""
        op = hdr[0] & 0x3F
        if op == Opcode.SCSI_DATA_OUT:
            itt = _U32.unpack_from(hdr, 16)[0]
            task = self.tasks.get(itt)
            if task is None or task.buf is None:
                return None
            offset = _U32.unpack_from(hdr, 40)[0]
            if offset + dlen > task.edtl:
                return None
            return memoryview(task.buf)[offset : offset + dlen]
        if op == Opcode.SCSI_COMMAND and hdr[1] & 0x20 and self.session is not None:
            edtl = _U32.unpack_from(hdr, 20)[0]
            if dlen > edtl or edtl > MAX_WRITE_BUFFER or \
                    self._buffered_bytes + edtl > CONNECTION_BUFFER_BUDGET:
                return None
            buf = bytearray(edtl)
            self._buffered_bytes += edtl
            itt = _U32.unpack_from(hdr, 16)[0]
            self._release(self._placed.pop(itt, None))  # a duplicate ITT: keep one
            self._placed[itt] = buf
            return memoryview(buf)[:dlen]
        return None

    def _release(self, buf: bytearray | None) -> None:
        if buf is not None:
            self._buffered_bytes -= len(buf)

    def _scsi_command(self, cmd: ScsiCommand, buf: bytearray | None) -> None:
        sess = self.session
        assert sess is not None
        self._dead_itts.pop(cmd.itt, None)
        if cmd.itt in self.tasks:
            # §11.3.4: an ITT must be unique among outstanding tasks.
            self._release(buf)
            self.send_reject(RejectReason.PROTOCOL_ERROR, cmd.to_bytes()[:48])
            if not cmd.immediate:
                sess.complete()
            return
        edtl = cmd.expected_data_transfer_length
        imm = len(cmd.data)
        if imm and cmd.write and (not self.immediate_data or imm > min(edtl, self.first_burst)):
            # Immediate data with ImmediateData=No (§13.11), or more of it
            # than the command transfers or FirstBurstLength allows
            # (§13.14): a protocol error. The command is rejected whole and
            # not executed (§11.17.1); its CmdSN slot is freed and any
            # Data-Out following it is dropped.
            log.warning("%s: ITT 0x%08x: %d bytes of immediate data not allowed", self.peer,
                        cmd.itt, imm)
            self._release(buf)
            if not cmd.immediate:
                sess.complete()
            self._drop_later_data(cmd.itt)
            self.send_reject(RejectReason.PROTOCOL_ERROR, cmd.to_bytes()[:48])
            return
        if cmd.write and edtl:
            if buf is None:
                if edtl > MAX_WRITE_BUFFER or self._buffered_bytes + edtl > CONNECTION_BUFFER_BUDGET:
                    task = Task(cmd, None)
                    self.tasks[cmd.itt] = task
                    self._finish(task, Status.TASK_SET_FULL, b"", None)
                    return
                buf = bytearray(edtl)
                self._buffered_bytes += edtl
                if len(cmd.data):
                    buf[: len(cmd.data)] = cmd.data
            task = Task(cmd, buf)
            self.tasks[cmd.itt] = task
            immediate_len = imm
            task.received = immediate_len
            # Unsolicited data may follow up to FirstBurstLength unless
            # InitialR2T=Yes or the F bit says none follows (§13.10, §13.14).
            if self.initial_r2t or cmd.final:
                task.unsolicited_end = immediate_len
            else:
                task.unsolicited_end = min(edtl, self.first_burst)
            task.next_r2t_offset = task.unsolicited_end
            if task.received >= edtl:
                self._execute(task)
            else:
                self._issue_r2ts(task)
        else:
            task = Task(cmd, None)
            self.tasks[cmd.itt] = task
            self._execute(task)

    def _issue_r2ts(self, task: Task) -> None:
        sess = self.session
        assert sess is not None
        while len(task.r2ts) < self.max_outstanding_r2t and task.next_r2t_offset < task.edtl:
            offset = task.next_r2t_offset
            length = min(self.max_burst, task.edtl - offset)
            ttt = self._new_ttt()
            task.r2ts[ttt] = [offset, length, offset, 0]
            self._ttt_map[ttt] = task
            task.next_r2t_offset = offset + length
            self.send(R2T(lun=task.cmd.lun, itt=task.itt, ttt=ttt, statsn=self.statsn,
                          expcmdsn=sess.expcmdsn, maxcmdsn=sess.maxcmdsn, r2tsn=task.r2tsn,
                          buffer_offset=offset, desired_data_transfer_length=length))
            task.r2tsn += 1

    def _fail_data(self, task: Task, reason: str) -> None:
        """End a write whose Data-Out sequence is broken: ABORTED COMMAND,
        DATA PHASE ERROR (4B/00); later Data-Out for it is ignored."""
        log.warning("%s: ITT 0x%08x: %s", self.peer, task.itt, reason)
        for ttt in task.r2ts:
            self._ttt_map.pop(ttt, None)
        task.r2ts.clear()
        self._drop_later_data(task.itt)
        task.executing = True
        self._finish(task, Status.CHECK_CONDITION, _DATA_PHASE_ERROR_SENSE, None)

    def _drop_later_data(self, itt: int) -> None:
        """Data-Out still arriving for ``itt`` (a failed, rejected or aborted
        write) is dropped silently; the set is insertion-ordered and bounded."""
        self._dead_itts[itt] = None
        if len(self._dead_itts) > 256:
            del self._dead_itts[next(iter(self._dead_itts))]

    def _data_out(self, pdu: DataOut) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None and pdu.itt in self._dead_itts:
            return  # the rest of a write we already failed
        hdr = pdu.to_bytes()[:48] if task is None else b""
        if task is None or task.buf is None or task.executing:
            # Data for a task we do not know (or one already complete):
            # Reject, Invalid PDU Field (RFC 7143 §11.7.4 / §7.9).
            self.send_reject(RejectReason.INVALID_PDU_FIELD, hdr or pdu.to_bytes()[:48])
            return
        n = len(pdu.data)
        offset = pdu.buffer_offset
        # DataPDUInOrder/DataSequenceInOrder=Yes (the only values we accept)
        # and ERL 0: within a sequence DataSN counts from 0 and offsets are
        # contiguous. A sequence error cannot be recovered at ERL 0; the
        # task ends with CHECK CONDITION and the connection carries on
        # (RFC 7143 §7.1.4, §11.7.5), like tgt does.
        if pdu.ttt == RESERVED_TAG:
            if offset + n > task.unsolicited_end or offset != task.unsol_next[0] or \
                    pdu.datasn != task.unsol_next[1]:
                self._fail_data(task, f"unsolicited Data-Out out of order (offset {offset}, "
                                      f"DataSN {pdu.datasn})")
                return
            task.unsol_next = (offset + n, pdu.datasn + 1)
        else:
            r2t = task.r2ts.get(pdu.ttt)
            if r2t is None or self._ttt_map.get(pdu.ttt) is not task or \
                    offset < r2t[0] or offset + n > r2t[0] + r2t[1]:
                self.send_reject(RejectReason.INVALID_PDU_FIELD, pdu.to_bytes()[:48])
                return
            if offset != r2t[2] or pdu.datasn != r2t[3]:
                self._fail_data(task, f"Data-Out out of order (offset {offset}, DataSN "
                                      f"{pdu.datasn}; expected {r2t[2]}, {r2t[3]})")
                return
            r2t[2] = offset + n
            r2t[3] += 1
            if pdu.final or r2t[2] >= r2t[0] + r2t[1]:
                del task.r2ts[pdu.ttt]
                self._ttt_map.pop(pdu.ttt, None)
        data = pdu.data
        if not (isinstance(data, memoryview) and data.obj is task.buf):
            task.buf[offset : offset + n] = data  # not placed (small PDU path)
        task.received += n
        if task.received >= task.edtl:
            for ttt in task.r2ts:
                self._ttt_map.pop(ttt, None)
            task.r2ts.clear()
            self._execute(task)
        elif pdu.ttt != RESERVED_TAG:
            self._issue_r2ts(task)

    def _execute(self, task: Task) -> None:
        task.executing = True
        fut = asyncio.ensure_future(self._run(task))
        # The server keeps a reference (a bare ensure_future may be garbage
        # collected mid-run) and waits for these on shutdown, so in-flight
        # writes reach the backend before it is flushed (issue #3).
        inflight = self.server.inflight
        inflight.add(fut)
        fut.add_done_callback(inflight.discard)

    async def _run(self, task: Task) -> None:
        sess = self.session
        assert sess is not None
        rt = sess.target
        cmd = task.cmd
        nexus = self.server.nexus_for(self)
        data_out: Buffer | None = None
        underflow = overflow = 0
        try:
            # Residuals (RFC 7143 §11.4.5, FCP-4 §9.4.2 as libiscsi tests
            # them): the CDB asks for ``want`` bytes, the iSCSI header
            # promised ``have``. With less promised the command runs on the
            # bytes that came (the device keeps the rest of a partial block)
            # and reports overflow; with more, only ``want`` bytes are used.
            want = rt.scsi.data_out_length(task.lun, cmd.cdb)
            have = task.edtl if cmd.write else 0
            if want > have:
                overflow = want - have
                data_out = memoryview(task.buf) if task.buf is not None else memoryview(b"")
            elif cmd.write:
                assert task.buf is not None
                underflow = have - want
                data_out = memoryview(task.buf)[:want]
            throttle = rt.throttles.get(task.lun)
            if throttle is not None:
                await throttle()  # the LUN's bandwidth group is over its limit
            # Multiattach LUNs pick the initiator's own differencing image
            # from this context variable (target/backends/modes.py).
            with initiator_scope(sess.initiator_name):
                result = await rt.scsi.execute(nexus, task.lun, cmd.cdb, data_out, cmd.attr,
                                               expected_length=task.edtl)
        except Exception:  # the SCSI layer must never take the target down
            log.exception("%s: SCSI command %s failed", self.peer, cmd.cdb[:1].hex())
            self._finish(task, Status.CHECK_CONDITION, _HW_ERROR_SENSE, None)
            return
        data = result.data
        if cmd.write:
            self._finish(task, result.status, result.sense, None, underflow=underflow,
                         overflow=overflow)
        else:
            self._finish(task, result.status, result.sense, data, overflow=overflow)

    def _finish(self, task: Task, status: int, sense: bytes, data: Buffer | None, *,
                overflow: int = 0, underflow: int = 0) -> None:
        """Send Data-In and/or the SCSI Response for a completed task."""
        owned = self.tasks.get(task.itt) is task
        if owned:
            del self.tasks[task.itt]
        if task.buf is not None:
            self._release(task.buf)
            task.buf = None
        # A TMF waiting for this task may come from another connection or
        # session: release it even when ours is gone (its response is sent
        # from a later loop turn, after the slot below is returned).
        if task.future is not None and not task.future.done():
            task.future.set_result(None)
        sess = self.session
        if sess is None:
            return
        if owned and not task.immediate:
            sess.complete()
        if task.aborted or self.closed:
            return
        edtl = task.edtl
        if data is not None:
            mv = data if isinstance(data, memoryview) else memoryview(data)
            length = mv.nbytes
            if length > edtl:
                overflow, mv = length - edtl, mv[:edtl]
            elif length < edtl:
                underflow = edtl - length
            if status == Status.GOOD and not sense and mv.nbytes:
                self._data_in(task, mv, status, overflow, underflow)
                return
            if mv.nbytes:
                self._data_in(task, mv, None, 0, 0)
        elif not task.cmd.write and edtl:
            underflow = edtl
        self.send(ScsiResponse(
            itt=task.itt, response=ISCSIResponse.COMMAND_COMPLETED, status=status,
            statsn=self._next_statsn(), expcmdsn=sess.expcmdsn, maxcmdsn=sess.maxcmdsn,
            expdatasn=0, residual_overflow=bool(overflow), residual_underflow=bool(underflow),
            residual_count=overflow or underflow, data=ScsiResponse.sense_segment(sense)))

    def _data_in(self, task: Task, mv: memoryview, status: int | None, overflow: int,
                 underflow: int) -> None:
        """Split ``mv`` into Data-In PDUs of at most the initiator's
        MaxRecvDataSegmentLength, F at every MaxBurstLength boundary
        (§11.7.1), status in the last one when ``status`` is given."""
        sess = self.session
        assert sess is not None
        total = mv.nbytes
        seg = self.max_xmit
        burst = self.max_burst
        offset = 0
        datasn = 0
        lun = task.cmd.lun
        itt = task.itt
        out = self._out
        hd, dd = self.header_digest, self.data_digest
        while offset < total:
            n = min(seg, total - offset, burst - offset % burst)
            last = offset + n >= total
            end_of_burst = last or (offset + n) % burst == 0
            with_status = last and status is not None
            pdu = DataIn(
                itt=itt, final=end_of_burst, status_present=with_status,
                status=status if with_status and status is not None else 0, lun=lun,
                statsn=self._next_statsn() if with_status else 0,
                expcmdsn=sess.expcmdsn, maxcmdsn=sess.maxcmdsn, datasn=datasn,
                buffer_offset=offset,
                residual_overflow=with_status and bool(overflow),
                residual_underflow=with_status and bool(underflow),
                residual_count=(overflow or underflow) if with_status else 0,
                data=mv[offset : offset + n])
            out.extend(pdu.encode(hd, dd))
            offset += n
            datasn += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # --------------------------------------------------------- task management
    def _tmf(self, pdu: TaskMgmtRequest) -> None:
        sess = self.session
        assert sess is not None
        fn = pdu.function
        lun = decode_lun(pdu.lun)
        rt = sess.target
        nexus = self.server.nexus_for(self)
        response = TMResponse.FUNCTION_COMPLETE
        # (owning connection, task): a TMF reaches tasks on every connection
        # of its session (ABORT TASK, ABORT TASK SET, I_T NEXUS RESET) or of
        # every session (CLEAR TASK SET, the resets), and each must be
        # removed from the connection -- and CmdSN window -- it belongs to.
        affected: list[tuple[TargetConnection, Task]] = []
        mine = [(c, t) for c in list(sess.connections.values()) for t in c.tasks.values()]
        if fn in (TMFunction.ABORT_TASK_SET, TMFunction.CLEAR_TASK_SET,
                  TMFunction.LOGICAL_UNIT_RESET, TMFunction.CLEAR_ACA) and \
                lun not in rt.scsi_luns:
            # The functions addressed to a logical unit answer "LUN does
            # not exist" for a LUN we do not have (RFC 7143 §11.6.1) --
            # CLEAR ACA included (it names a LUN, SAM-5 §7.4).
            response = TMResponse.LUN_DOES_NOT_EXIST
        elif fn == TMFunction.ABORT_TASK:
            affected = [(c, t) for c, t in mine if t.itt == pdu.referenced_task_tag]
            if not affected:
                response = TMResponse.TASK_DOES_NOT_EXIST
        elif fn == TMFunction.ABORT_TASK_SET:
            # SAM-5 §7.3: the tasks of this I_T nexus on the LU.
            affected = [(c, t) for c, t in mine if t.lun == lun]
            rt.scsi.abort_task_set(nexus, lun)
        elif fn == TMFunction.CLEAR_TASK_SET:
            # SAM-5 §7.5: every task in the (shared) task set of the LU.
            affected = self.server.tasks_for_lun(rt, lun)
            rt.scsi.clear_task_set(nexus, lun)
        elif fn == TMFunction.LOGICAL_UNIT_RESET:
            affected = self.server.tasks_for_lun(rt, lun)
            rt.scsi.lu_reset(nexus, lun)
        elif fn in (TMFunction.TARGET_WARM_RESET, TMFunction.TARGET_COLD_RESET):
            affected = self.server.tasks_for_lun(rt, None)
            rt.scsi.target_reset(nexus, fn == TMFunction.TARGET_COLD_RESET)
        elif fn == TMFunction.CLEAR_ACA:
            rt.scsi.clear_aca(nexus, lun)
        elif fn == TMFunction.I_T_NEXUS_RESET:
            affected = mine
            rt.scsi.nexus_lost(nexus)
        elif fn == TMFunction.TASK_REASSIGN:
            # ErrorRecoveryLevel 0: reassignment is not supported (§11.5.1).
            response = TMResponse.TASK_ALLEGIANCE_REASSIGNMENT_NOT_SUPPORTED
        else:
            response = TMResponse.FUNCTION_NOT_SUPPORTED
        waits = [owner._abort_task(t) for owner, t in affected]
        pending = [w for w in waits if w is not None]

        def respond() -> None:
            if sess.closed or self.closed:
                return
            self.send(TaskMgmtResponse(itt=pdu.itt, response=response,
                                       statsn=self._next_statsn(), expcmdsn=sess.expcmdsn,
                                       maxcmdsn=sess.maxcmdsn))
            if fn == TMFunction.TARGET_COLD_RESET and response == TMResponse.FUNCTION_COMPLETE:
                # A cold reset also ends every session (§11.5.1).
                self.server.drop_all_sessions(rt)

        if not pending:
            respond()
        else:
            # §4.2.3.? : the TMF response follows the end of every affected
            # task, so the initiator can rely on them being gone.
            async def wait_then_respond() -> None:
                await asyncio.gather(*pending, return_exceptions=True)
                respond()
            fut = asyncio.ensure_future(wait_then_respond())
            self.server.inflight.add(fut)  # keep a reference until it is done
            fut.add_done_callback(self.server.inflight.discard)

    def _abort_task(self, task: Task) -> asyncio.Future[None] | None:
        """Abort ``task``, one of this connection's; returns a future if it
        is still executing."""
        task.aborted = True
        if not task.executing:
            if self.tasks.get(task.itt) is task:
                del self.tasks[task.itt]
                if not task.immediate and self.session is not None:
                    self.session.complete()
            for ttt in task.r2ts:
                self._ttt_map.pop(ttt, None)
            task.r2ts.clear()
            if task.buf is not None:
                self._release(task.buf)
                task.buf = None
            # Data-Out already on its way when the task was aborted is
            # expected, not an error: drop it silently, like the rest of a
            # write failed mid-transfer.
            self._drop_later_data(task.itt)
            return None
        if task.future is None:
            task.future = self.loop.create_future()
        return task.future

    # ----------------------------------------------------------------- logout
    def _logout(self, pdu: LogoutRequest) -> None:
        sess = self.session
        assert sess is not None
        if pdu.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = LogoutResponseCode.RECOVERY_NOT_SUPPORTED
        elif pdu.reason == LogoutReason.CLOSE_CONNECTION and pdu.cid not in sess.connections:
            code = LogoutResponseCode.CID_NOT_FOUND
        else:
            code = LogoutResponseCode.SUCCESS
        self.send(LogoutResponse(itt=pdu.itt, response=code, statsn=self._next_statsn(),
                                 expcmdsn=sess.expcmdsn, maxcmdsn=sess.maxcmdsn,
                                 time2wait=0, time2retain=0))
        if code == LogoutResponseCode.SUCCESS:
            log.info("%s: %s logged out (%s)", self.peer, sess.initiator_name,
                     "session" if pdu.reason == LogoutReason.CLOSE_SESSION else "connection")
            if pdu.reason == LogoutReason.CLOSE_SESSION:
                self.server.end_session(sess, keep=self)
            target_conn = sess.connections.get(pdu.cid, self)
            target_conn.close()
            if target_conn is not self and pdu.reason == LogoutReason.CLOSE_SESSION:
                self.close()

    def request_logout(self, wait: int) -> None:
        """Ask the initiator to log out (Async Message, event 1, §11.9.1)."""
        sess = self.session
        if sess is None or self.closed:
            return
        self.send(AsyncMessage(statsn=self._next_statsn(), expcmdsn=sess.expcmdsn,
                               maxcmdsn=sess.maxcmdsn, async_event=AsyncEvent.LOGOUT_REQUEST,
                               parameter3=wait))

    def send_text_response(self, req: TextRequest, data: bytes, *, final: bool = True,
                           ttt: int = RESERVED_TAG) -> None:
        """Answer a Text Request (SendTargets etc.)."""
        sess = self.session
        assert sess is not None
        self.send(TextResponse(itt=req.itt, final=final, cont=not final, ttt=ttt,
                               statsn=self._next_statsn(), expcmdsn=sess.expcmdsn,
                               maxcmdsn=sess.maxcmdsn, data=data))


# The two sense answers the transport itself gives (SPC-4 Annex D):
# HARDWARE ERROR, INTERNAL TARGET FAILURE when the SCSI layer raised, and
# ABORTED COMMAND, DATA PHASE ERROR for a broken Data-Out sequence.
_HW_ERROR_SENSE = SenseData(SenseKey.HARDWARE_ERROR, 0x44, 0x00).encode_fixed()
_DATA_PHASE_ERROR_SENSE = SenseData(SenseKey.ABORTED_COMMAND, 0x4B, 0x00).encode_fixed()
