"""The initiator's and the target's full-feature engines wired together in
memory: bytes move between their outboxes through :class:`PDUReader`, the
test plays the target's owner (a small RAM disk) and the initiator's
caller. No sockets, no real time: ``now`` is passed in."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
import struct
from dataclasses import dataclass, field

import pytest

from iscsi.constants import TMFunction, TMResponse
from iscsi.ffp.initiator import (
    Command,
    CommandCompleted,
    CommandFailed,
    ConnectionFailed,
    Event,
    InitiatorEngine,
    InitiatorParams,
    LogoutDone,
    PingAnswered,
    TaskManagementDone,
    TextDone,
)
from iscsi.ffp.target import (
    ExecuteCommand,
    LogoutRequested,
    ManageTasks,
    TargetConnectionEngine,
    TargetParams,
    Task,
    TextRequested,
)
from iscsi.ffp.window import CmdSNWindow
from iscsi.framing import PDUReader
from iscsi.pdu import PDU, Buffer, DataIn, DataOut, ScsiCommand, TaskMgmtRequest, TextRequest
from iscsi.text import encode_text

BS = 512


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


@dataclass
class Pair:
    """Both engines and the target's owner."""

    ini: InitiatorEngine
    tgt: TargetConnectionEngine
    disk: bytearray = field(default_factory=lambda: bytearray(pattern(1 << 20)))
    #: Commands the owner does not execute yet (hold=True).
    hold: bool = False
    held: list[Task] = field(default_factory=list)
    #: Drop the initiator's PDUs of these types before the target sees them.
    drop: tuple[type, ...] = ()
    #: The target's owner ignores task management (a stuck target).
    ignore_tmf: bool = False
    #: Text answer factory.
    text_answer: bytes = b""
    #: What the target saw.
    seen: list[PDU] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    pending_tmf: list[tuple[int, Task]] = field(default_factory=list)
    logout_itt: int | None = None
    short_reads: int = 0

    def __post_init__(self) -> None:
        self.to_tgt = PDUReader(placement=self.tgt.placement, max_data_segment_length=1 << 24)
        self.to_ini = PDUReader(placement=self.ini.placement, max_data_segment_length=1 << 24)

    @staticmethod
    def _move(buffers: list[Buffer], reader: PDUReader) -> list[PDU]:
        raw = memoryview(b"".join(bytes(b) for b in buffers))
        out: list[PDU] = []
        while raw:
            buf = reader.get_buffer(len(raw))
            n = min(len(buf), len(raw))
            buf[:n] = raw[:n]
            raw = raw[n:]
            out.extend(reader.buffer_updated(n))
        return out

    def run(self, now: float = 0.0) -> list[Event]:
        """Move bytes both ways until both engines are quiet; return the
        initiator's events."""
        start = len(self.events)
        while self.ini.outbox or self.tgt.outbox:
            for pdu in self._move(self.ini.outbox.take(), self.to_tgt):
                if isinstance(pdu, self.drop):
                    continue
                self.seen.append(pdu)
                self._own(self.tgt.receive_pdu(pdu, now))
            for pdu in self._move(self.tgt.outbox.take(), self.to_ini):
                self.events.extend(self.ini.receive_pdu(pdu, now))
        return self.events[start:]

    # ------------------------------------------------------------ the owner
    def _own(self, events: Sequence[object]) -> None:
        for ev in events:
            if isinstance(ev, ExecuteCommand):
                if self.hold:
                    self.held.append(ev.task)
                else:
                    self.execute(ev.task)
            elif isinstance(ev, ManageTasks):
                if self.ignore_tmf:
                    continue
                self._tmf(ev)
            elif isinstance(ev, TextRequested):
                self.tgt.text_answer(ev.itt, self.text_answer or encode_text(ev.pairs))
            elif isinstance(ev, LogoutRequested):
                self.logout_itt = ev.itt

    def execute(self, task: Task) -> None:
        cdb = task.cmd.cdb
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
        off, n = lba * BS, blocks * BS
        if cdb[0] == 0x28:
            n -= self.short_reads
            self.tgt.command_done(task, 0, b"", memoryview(self.disk)[off : off + n])
        elif cdb[0] == 0x2A:
            self.disk[off : off + n] = task.data_out()[:n]
            self.tgt.command_done(task, 0, b"", None)
        else:
            self.tgt.command_done(task, 0, b"", None)

    def release(self) -> None:
        held, self.held = self.held, []
        for task in held:
            self.execute(task)
        for itt, task in self.pending_tmf:
            self.tgt.tmf_done(itt, TMResponse.FUNCTION_COMPLETE)
        self.pending_tmf.clear()

    def _tmf(self, ev: ManageTasks) -> None:
        if ev.function == TMFunction.ABORT_TASK:
            task = self.tgt.tasks.get(ev.referenced_task_tag)
            if task is None:
                self.tgt.tmf_done(ev.itt, TMResponse.TASK_DOES_NOT_EXIST)
                return
            if self.tgt.abort_task(task):
                # Executing: it ends (its response suppressed), then the TMF.
                if task in self.held:
                    self.held.remove(task)
                self.tgt.command_done(task, 0, b"", None)
            self.tgt.tmf_done(ev.itt, TMResponse.FUNCTION_COMPLETE)
        elif ev.function == TMFunction.LOGICAL_UNIT_RESET:
            for task in list(self.tgt.tasks.values()):
                if self.tgt.abort_task(task):
                    if task in self.held:
                        self.held.remove(task)
                    self.tgt.command_done(task, 0, b"", None)
            self.tgt.tmf_done(ev.itt, TMResponse.FUNCTION_COMPLETE)
        else:
            self.tgt.tmf_done(ev.itt, TMResponse.FUNCTION_NOT_SUPPORTED)


def make_pair(*, depth: int = 16, ini_mrdsl: int = 8192, tgt_mrdsl: int = 8192,
              max_burst: int = 262144, first_burst: int = 65536, initial_r2t: bool = True,
              immediate_data: bool = True, max_outstanding_r2t: int = 1,
              **engine: float | None) -> Pair:
    ini = InitiatorEngine(
        InitiatorParams(max_xmit=tgt_mrdsl, max_burst=max_burst, first_burst=first_burst,
                        initial_r2t=initial_r2t, immediate_data=immediate_data,
                        max_outstanding_r2t=max_outstanding_r2t),
        cmdsn=1, expcmdsn=1, maxcmdsn=depth, exp_statsn=100, now=0.0,
        **engine)  # type: ignore[arg-type]
    tgt = TargetConnectionEngine(
        CmdSNWindow(1, depth),
        TargetParams(max_xmit=ini_mrdsl, max_burst=max_burst, first_burst=first_burst,
                     initial_r2t=initial_r2t, immediate_data=immediate_data,
                     max_outstanding_r2t=max_outstanding_r2t),
        statsn=100, now=0.0)
    return Pair(ini, tgt)


def read(p: Pair, lba: int, blocks: int, now: float = 0.0, size: int | None = None) -> Command:
    buf = memoryview(bytearray(size if size is not None else blocks * BS))
    cmd = Command(0, read10(lba, blocks), data_in=buf)
    p.ini.submit(cmd, now)
    return cmd


def write(p: Pair, lba: int, data: bytes, now: float = 0.0) -> Command:
    cmd = Command(0, write10(lba, len(data) // BS), data_out=memoryview(data))
    p.ini.submit(cmd, now)
    return cmd


def completed(events: list[Event], cmd: Command) -> CommandCompleted:
    done = [e for e in events if isinstance(e, CommandCompleted) and e.command is cmd]
    assert len(done) == 1, events
    return done[0]


# ------------------------------------------------------- data transfers
COMBOS = list(itertools.product(
    (True, False),            # InitialR2T
    (True, False),            # ImmediateData
    (4096, 65536),            # FirstBurstLength
    (16384, 262144),          # MaxBurstLength
    (1, 4),                   # MaxOutstandingR2T
))


@pytest.mark.parametrize(("initial_r2t", "immediate", "first", "burst", "outstanding"), COMBOS)
def test_every_data_transfer_combination(initial_r2t: bool, immediate: bool, first: int,
                                         burst: int, outstanding: int) -> None:
    p = make_pair(initial_r2t=initial_r2t, immediate_data=immediate, first_burst=min(first, burst),
                  max_burst=burst, max_outstanding_r2t=outstanding, tgt_mrdsl=2048,
                  ini_mrdsl=4096)
    for i, size in enumerate((BS, 9 * BS, 200 * BS)):
        data = pattern(size, seed=i + 3)
        w = write(p, 100 * i, data)
        ev = p.run()
        assert completed(ev, w).status == 0
        assert bytes(p.disk[100 * i * BS : 100 * i * BS + size]) == data
        # Exactly the write's bytes crossed, never a range twice (issue 9 item 10).
        outs = [x for x in p.seen if isinstance(x, DataOut) and x.itt == w.itt]
        cmds = [x for x in p.seen if isinstance(x, ScsiCommand) and x.itt == w.itt]
        assert sum(len(x.data) for x in outs) + len(cmds[0].data) == size
        assert all(len(x.data) <= 2048 for x in outs)
        r = read(p, 100 * i, size // BS)
        ev = p.run()
        c = completed(ev, r)
        assert (c.status, c.received, c.residual) == (0, size, 0)
        assert r.data_in is not None and bytes(r.data_in) == data
        p.seen.clear()
    assert not p.ini.tasks and not p.tgt.tasks


def test_data_in_split_by_our_mrdsl_and_bursts_lands_in_place() -> None:
    p = make_pair(ini_mrdsl=1024, max_burst=4096)
    r = read(p, 0, 64)
    buf = r.data_in
    ev = p.run()
    c = completed(ev, r)
    assert c.received == 64 * BS and buf is not None
    assert bytes(buf) == bytes(p.disk[: 64 * BS])


def test_residual_underflow_is_accepted_and_short_read_is_not() -> None:
    p = make_pair()
    # The target returns less data than asked for and says so (underflow).
    p.short_reads = BS
    r = read(p, 0, 8)
    c = completed(p.run(), r)
    assert (c.status, c.underflow, c.residual, c.received) == (0, True, BS, 7 * BS)
    # A buffer larger than the CDB's transfer: the target reports underflow.
    p.short_reads = 0
    r = read(p, 0, 1, size=4 * BS)
    c = completed(p.run(), r)
    assert (c.underflow, c.residual, c.received) == (True, 3 * BS, BS)


# -------------------------------------------------------------- window
def test_window_holds_commands_until_it_opens() -> None:
    p = make_pair(depth=2)
    p.hold = True
    cmds = [read(p, i, 1) for i in range(5)]
    p.run()
    assert len(p.held) == 2 and len(p.ini.queue) == 3
    assert [c.sent for c in cmds] == [True, True, False, False, False]
    # Completing them reopens the window (MaxCmdSN moves on in responses).
    for _ in range(3):
        p.release()
        p.run()
    assert not p.ini.queue and not p.ini.tasks
    assert [c.command.cmdsn for c in p.events if isinstance(c, CommandCompleted)] == \
        [1, 2, 3, 4, 5]


def test_window_closed_for_good_times_out() -> None:
    p = make_pair(depth=1, command_timeout=30.0)
    p.hold = True
    first = read(p, 0, 1)
    second = read(p, 1, 1)
    p.run(0.0)
    assert p.ini.get_timer() == 30.0
    ev = p.ini.handle_timer(30.0)
    assert ev == [e for e in ev if isinstance(e, CommandFailed)]
    failed = {e.command: e for e in ev if isinstance(e, CommandFailed)}
    assert second in failed and failed[second].kind == "timeout"
    assert "window" in failed[second].reason
    # The first was sent: an ABORT TASK went out for it; the target aborts.
    p.run(30.0)
    assert any(isinstance(e, CommandFailed) and e.command is first and e.kind == "timeout"
               for e in p.events)
    assert not p.ini.tasks and not p.tgt.tasks


# -------------------------------------------------------- task management
def test_abort_task_mid_transfer_and_after_completion() -> None:
    p = make_pair(initial_r2t=True, immediate_data=False)
    p.drop = (DataOut,)  # Data-Out lost: the target waits for data forever
    w = write(p, 0, pattern(8 * BS))
    p.run()
    assert w.itt in p.tgt.tasks and p.tgt.tasks[w.itt].received == 0
    itt = p.ini.task_management(TMFunction.ABORT_TASK, 0.0, 0, w.itt)
    ev = p.run()
    assert TaskManagementDone(itt, TMFunction.ABORT_TASK, TMResponse.FUNCTION_COMPLETE) in ev
    assert any(isinstance(e, CommandFailed) and e.command is w and e.kind == "aborted"
               for e in ev)
    assert not p.ini.tasks and not p.tgt.tasks
    # A task that already completed: "task does not exist".
    p.drop = ()
    r = read(p, 0, 1)
    completed(p.run(), r)
    itt = p.ini.task_management(TMFunction.ABORT_TASK, 0.0, 0, r.itt)
    assert TaskManagementDone(itt, TMFunction.ABORT_TASK, TMResponse.TASK_DOES_NOT_EXIST) \
        in p.run()


def test_command_timeout_aborts_then_resets_then_recovers() -> None:
    p = make_pair(command_timeout=30.0, tmf_timeout=10.0)
    p.hold = True
    r = read(p, 0, 1)
    p.run(0.0)
    assert p.ini.handle_timer(29.9) == []
    # Timeout: ABORT TASK; the target's owner aborts the running task.
    assert p.ini.handle_timer(30.0) == []
    ev = p.run(30.0)
    assert len(ev) == 1 and isinstance(ev[0], CommandFailed)
    assert ev[0].kind == "timeout" and ev[0].command is r
    # A target that ignores task management: the session is recovered.
    p.ignore_tmf = True
    r2 = read(p, 1, 1, now=40.0)
    p.run(40.0)
    p.ini.handle_timer(70.0)         # ABORT TASK, unanswered
    p.run(70.0)
    assert p.ini.get_timer() == 80.0
    assert p.ini.handle_timer(80.0) == []   # LOGICAL UNIT RESET, unanswered
    p.run(80.0)
    assert [x.function for x in p.seen if isinstance(x, TaskMgmtRequest)][-2:] == \
        [TMFunction.ABORT_TASK, TMFunction.LOGICAL_UNIT_RESET]
    assert p.ini.get_timer() == 90.0
    ev = p.ini.handle_timer(90.0)
    assert [type(e) for e in ev] == [ConnectionFailed]
    left = p.ini.close()
    assert left == [r2] and r2.timed_out


# ----------------------------------------------------------------- NOP
def test_nop_keepalive_and_timeout_by_advancing_now() -> None:
    p = make_pair(nop_interval=5.0, nop_timeout=2.0)
    assert p.ini.get_timer() == 5.0
    assert p.ini.handle_timer(5.0) == []
    assert p.run(5.5) == []          # the target answered the ping
    assert p.ini.get_timer() == 10.5
    p.ini.handle_timer(10.5)         # ping again; this time nothing comes back
    p.ini.outbox.take()
    assert p.ini.get_timer() == 12.5
    assert [type(e) for e in p.ini.handle_timer(12.5)] == [ConnectionFailed]


def test_target_nop_in_is_answered_and_ping_round_trip() -> None:
    p = make_pair()
    p.tgt.nop_interval = 1.0
    p.tgt._timers.set("nop", 1.0)
    p.tgt.handle_timer(1.0)
    p.run(1.0)
    assert p.ini.target_pings == 1 and p.tgt._nop_ttt is None
    itt = p.ini.ping(1.0, b"abc")
    assert p.run(1.0) == [PingAnswered(itt, b"abc")]


# -------------------------------------------------------------- logout
def test_logout_with_commands_in_flight() -> None:
    p = make_pair(depth=1)
    p.hold = True
    r = read(p, 0, 1)
    queued = read(p, 1, 1)
    p.run()
    itt = p.ini.logout(0.0)
    p.run()
    assert p.logout_itt == itt
    # The owner finishes what runs, then answers the logout (§11.14).
    p.release()
    p.tgt.logout_answer(itt, 0)
    ev = p.run()
    assert isinstance(ev[0], CommandCompleted) and ev[0].command is r
    assert isinstance(ev[-1], LogoutDone) and ev[-1].response == 0
    # Nothing new was sent after the Logout Request.
    assert not queued.sent and p.ini.close() == [queued]


# ---------------------------------------------------------------- text
def test_text_with_continuation_both_ways() -> None:
    p = make_pair(ini_mrdsl=512, tgt_mrdsl=512)
    pairs = [(f"X-key{i}", "v" * 100) for i in range(12)]   # > 512 bytes each way
    p.text_answer = encode_text(pairs + [("X-more", "w" * 200)])
    itt = p.ini.text(encode_text(pairs), 0.0)
    ev = p.run()
    assert ev == [TextDone(itt, pairs + [("X-more", "w" * 200)])]
    reqs = [x for x in p.seen if isinstance(x, TextRequest)]
    assert len(reqs) >= 4 and all(len(x.data) <= 512 for x in reqs)
    assert reqs[0].cont and not reqs[-1].cont


def test_data_in_is_placed_without_copy() -> None:
    p = make_pair()
    r = read(p, 0, 8)
    for pdu in Pair._move(p.ini.outbox.take(), p.to_tgt):
        p._own(p.tgt.receive_pdu(pdu, 0.0))
    pdus = Pair._move(p.tgt.outbox.take(), p.to_ini)
    assert r.data_in is not None
    din = [x for x in pdus if isinstance(x, DataIn)]
    assert din and all(isinstance(x.data, memoryview) and x.data.obj is r.data_in.obj
                       for x in din)
