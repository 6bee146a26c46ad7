"""Multiple connections per session in memory (RFC 7143 §4.2): initiator
engines sharing one CmdSN space, target engines sharing one CmdSN window,
wired connection by connection through :class:`PDUReader`; the test
decides which connection's bytes arrive first. No sockets, no clock."""

from __future__ import annotations

import struct

from iscsi.constants import LogoutReason, TMFunction
from iscsi.ffp.initiator import (
    Command,
    CommandCompleted,
    Event,
    InitiatorEngine,
    InitiatorParams,
    LogoutDone,
    TaskManagementDone,
)
from iscsi.ffp.target import (
    ExecuteCommand,
    LogoutRequested,
    TargetConnectionEngine,
    TargetParams,
    Task,
)
from iscsi.ffp.window import CmdSNWindow
from iscsi.framing import PDUReader
from iscsi.pdu import PDU, R2T, Buffer, DataIn, ScsiCommand, ScsiResponse
from iscsi.serial import sn_add

# The single-connection pair's CDB builders serve here too.
from tests.test_ffp_pair import BS, read10, write10


class Session:
    """``n`` connections of one session: initiator engine i talks to target
    engine i only (allegiance); the target's owner is a RAM disk that logs
    the order commands reach it in."""

    def __init__(self, n: int, *, initial_r2t: bool = False, depth: int = 16, erl: int = 0,
                 max_burst: int = 262144) -> None:
        self.window = CmdSNWindow(1, depth)
        ip = InitiatorParams(max_xmit=4096, initial_r2t=initial_r2t, first_burst=4096,
                             max_burst=max_burst, error_recovery_level=erl)
        tp = TargetParams(max_xmit=4096, initial_r2t=initial_r2t, first_burst=4096,
                          max_burst=max_burst, error_recovery_level=erl)
        self.ini: list[InitiatorEngine] = []
        for cid in range(n):
            share = self.ini[0] if self.ini else None
            self.ini.append(InitiatorEngine(ip, cmdsn=1, expcmdsn=1, maxcmdsn=depth,
                                            exp_statsn=100 * cid, now=0.0, cid=cid,
                                            share=share))
        self.tgt = [TargetConnectionEngine(self.window, tp, statsn=100 * cid, now=0.0)
                    for cid in range(n)]
        self.to_tgt = [PDUReader(placement=t.placement) for t in self.tgt]
        self.to_ini = [PDUReader(placement=i.placement) for i in self.ini]
        self.disk = bytearray(64 * BS)
        #: (cid, CDB opcode, LBA) in the order commands reached the disk.
        self.ran: list[tuple[int, int, int]] = []
        #: PDUs each target engine sent, by connection.
        self.sent_by_target: list[list[PDU]] = [[] for _ in range(n)]
        self.events: list[list[Event]] = [[] for _ in range(n)]
        self.logouts: list[tuple[int, LogoutRequested]] = []
        #: Commands to these LBAs are held (still running) until the test
        #: finishes them.
        self.hold_lbas: set[int] = set()
        self.held: list[Task] = []

    @staticmethod
    def _move(buffers: list[Buffer], reader: PDUReader) -> list[PDU]:
        raw = memoryview(b"".join(bytes(b) for b in buffers))
        out: list[PDU] = []
        while raw:
            buf = reader.get_buffer(len(raw))
            k = min(len(buf), len(raw))
            buf[:k] = raw[:k]
            raw = raw[k:]
            out.extend(reader.buffer_updated(k))
        return out

    def up(self, cid: int) -> list[PDU]:
        """Deliver what initiator engine ``cid`` queued to its target engine."""
        pdus = self._move(self.ini[cid].outbox.take(), self.to_tgt[cid])
        for pdu in pdus:
            self._own(cid, self.tgt[cid].receive_pdu(pdu, 0.0))
            # Commands this PDU released on other connections (the shared
            # window) run there: the server's Session.wake_others.
            for other, t in enumerate(self.tgt):
                if other != cid:
                    self._own(other, t.take_events())
        return pdus

    def down(self, cid: int) -> None:
        """Deliver what target engine ``cid`` queued to its initiator engine."""
        for pdu in self._move(self.tgt[cid].outbox.take(), self.to_ini[cid]):
            self.sent_by_target[cid].append(pdu)
            self.events[cid].extend(self.ini[cid].receive_pdu(pdu, 0.0))

    def settle(self, cids: list[int] | None = None) -> None:
        """Move bytes both ways on ``cids`` (all) until quiet."""
        cids = list(range(len(self.ini))) if cids is None else cids
        while any(self.ini[c].outbox or self.tgt[c].outbox for c in cids):
            for c in cids:
                self.up(c)
                self.down(c)

    def _own(self, cid: int, events: list[object]) -> None:
        for ev in events:
            if isinstance(ev, ExecuteCommand):
                self._execute(cid, ev.task)
            elif isinstance(ev, LogoutRequested):
                self.logouts.append((cid, ev))

    def _execute(self, cid: int, task: Task) -> None:
        cdb = task.cmd.cdb
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
        self.ran.append((cid, cdb[0], lba))
        if lba in self.hold_lbas:
            self.held.append(task)
            return
        self.finish(cid, task)

    def finish(self, cid: int, task: Task) -> None:
        """Complete ``task`` on target engine ``cid``."""
        cdb = task.cmd.cdb
        lba, blocks = struct.unpack_from(">IxH", cdb, 2)
        off, n = lba * BS, blocks * BS
        if cdb[0] == 0x2A:
            self.disk[off : off + n] = task.data_out()[:n]
            self.tgt[cid].command_done(task, 0, b"", None)
        else:
            self.tgt[cid].command_done(task, 0, b"", memoryview(self.disk)[off : off + n])

    def completed(self, cid: int) -> list[Command]:
        return [e.command for e in self.events[cid] if isinstance(e, CommandCompleted)]


def _write(lba: int, fill: int, blocks: int = 1) -> Command:
    return Command(0, write10(lba, blocks), data_out=memoryview(bytes([fill]) * BS * blocks))


def _read(lba: int, blocks: int = 1) -> Command:
    return Command(0, read10(lba, blocks), data_in=memoryview(bytearray(BS * blocks)))


def test_cmdsn_order_across_connections_with_out_of_order_arrival() -> None:
    s = Session(2)
    first, second = _write(5, 0xAA), _write(5, 0xBB)
    s.ini[0].submit(first, 0.0)
    s.ini[1].submit(second, 0.0)
    # One CmdSN space: the second command, on the other connection, is next.
    assert (first.cmdsn, second.cmdsn) == (1, 2)
    assert first.itt != second.itt
    # Connection 1's command arrives first: the target holds it (§4.2.2.1).
    s.up(1)
    assert s.ran == []
    assert s.window.expcmdsn == 1 and 2 in s.window.held
    # Connection 0's arrives: both run, in CmdSN order.
    s.up(0)
    assert s.ran == [(0, 0x2A, 5), (1, 0x2A, 5)]
    assert s.disk[5 * BS : 6 * BS] == b"\xbb" * BS
    s.settle()
    # Each status came back on its command's connection (allegiance).
    assert s.completed(0) == [first] and s.completed(1) == [second]
    assert s.ini[0].window.exp_cmdsn == 3 and s.ini[1].window is s.ini[0].window


def test_data_stays_on_the_tasks_connection_and_statsn_is_per_connection() -> None:
    s = Session(2, initial_r2t=True)
    s.ini[0].submit(_write(0, 1), 0.0)
    write = _write(8, 0x5A, blocks=16)  # 8 KiB: immediate data, then an R2T
    s.ini[1].submit(write, 0.0)
    s.settle()
    read = _read(8, blocks=16)
    s.ini[1].submit(read, 0.0)
    s.settle()
    assert s.completed(1) == [write, read] and bytes(read.data_in or b"") == b"\x5a" * 16 * BS
    # The write's R2T and the read's Data-In went out on connection 1 only.
    on1 = s.sent_by_target[1]
    assert any(isinstance(p, R2T) and p.itt == write.itt for p in on1)
    assert any(isinstance(p, DataIn) and p.itt == read.itt for p in on1)
    assert not any(getattr(p, "itt", None) in (write.itt, read.itt) for p in s.sent_by_target[0])
    # StatSN counts per connection (§4.2.2.2): 100.. on 0 is not 200.. on 1.
    st0 = [p.statsn for p in s.sent_by_target[0] if isinstance(p, ScsiResponse)]
    st1 = [p.statsn for p in s.sent_by_target[1] if isinstance(p, (ScsiResponse, DataIn))
           and (not isinstance(p, DataIn) or p.status_present)]
    assert st0 == [0] and st1 == [100, 101]
    assert s.ini[0].exp_statsn == 1 and s.ini[1].exp_statsn == 102


def test_lost_connection_commands_retried_on_another_run_once() -> None:
    s = Session(2)
    lost = _write(3, 0x11)
    s.ini[0].submit(lost, 0.0)           # CmdSN 1, never reaches the target
    later = _write(3, 0x22)
    s.ini[1].submit(later, 0.0)          # CmdSN 2, held behind the gap
    s.up(1)
    assert s.ran == []
    # Connection 0 dies; the target (logged out from connection 1) ends it:
    # it held nothing, so nothing is discarded.
    s.ini[0].outbox.take()
    orphans = s.ini[0].close()
    assert orphans == [lost]
    s.tgt[0].close()
    # The initiator retries CmdSN 1 on connection 1 with its ITT (§7.2.1).
    s.ini[1].retry(lost, 0.0)
    assert lost.cmdsn == 1
    s.settle([1])
    assert s.ran == [(1, 0x2A, 3), (1, 0x2A, 3)]
    assert s.disk[3 * BS : 4 * BS] == b"\x22" * BS  # order kept: 1 then 2
    assert s.completed(1) == [lost, later]


def test_closing_a_connection_discards_what_it_held() -> None:
    s = Session(2)
    gap = _read(0)
    s.ini[0].submit(gap, 0.0)            # CmdSN 1 on connection 0, delayed
    held = _write(9, 0x33)
    s.ini[1].submit(held, 0.0)           # CmdSN 2 on connection 1: held
    s.up(1)
    assert list(s.window.held) == [2]
    # Connection 1 fails before its command's turn: the target forgets the
    # held command, so CmdSN 2 is free for a retry elsewhere.
    s.ini[1].outbox.take()
    s.tgt[1].close()
    assert s.window.held == {} and s.window.owners == {}
    s.ini[1].close()
    s.up(0)                              # CmdSN 1 runs
    s.ini[0].retry(held, 0.0)            # CmdSN 2 again, on connection 0
    s.settle([0])
    assert s.ran == [(0, 0x28, 0), (0, 0x2A, 9)]
    assert s.completed(0) == [gap, held]


def test_logout_of_one_connection_while_the_other_carries_commands() -> None:
    s = Session(2)
    busy = [_write(lba, lba) for lba in range(4)]
    for i, cmd in enumerate(busy):
        s.ini[i % 2].submit(cmd, 0.0)
    itt = s.ini[1].logout(0.0, LogoutReason.CLOSE_CONNECTION)
    assert not s.ini[0].logging_out and s.ini[1].logging_out
    s.settle()
    (cid, ev), = s.logouts
    assert cid == 1 and ev.cid == 1 and ev.reason == LogoutReason.CLOSE_CONNECTION
    s.tgt[1].logout_answer(ev.itt, 0)
    s.settle()
    assert any(isinstance(e, LogoutDone) and e.itt == itt for e in s.events[1])
    s.tgt[1].close()
    s.ini[1].close()
    # Connection 0 carries on in the same CmdSN space.
    more = _write(7, 0x77)
    s.ini[0].submit(more, 0.0)
    s.settle([0])
    assert more.cmdsn == sn_add(busy[-1].cmdsn, 1)
    assert len(s.completed(0)) + len(s.completed(1)) == 5
    assert s.disk[7 * BS : 8 * BS] == b"\x77" * BS


def test_logout_naming_another_cid_keeps_this_connection() -> None:
    s = Session(2)
    s.ini[0].logout(0.0, LogoutReason.CLOSE_CONNECTION, cid=1)
    assert not s.ini[0].logging_out
    s.up(0)
    (cid, ev), = s.logouts
    assert cid == 0 and ev.cid == 1
    cmd = _write(1, 1)
    s.ini[0].submit(cmd, 0.0)
    assert s.ini[0].outbox  # still sends commands


def test_out_of_window_and_duplicate_across_connections_are_ignored() -> None:
    s = Session(2)
    cmd = _write(2, 0x44)
    s.ini[0].submit(cmd, 0.0)
    s.settle()
    # The same CmdSN again on connection 1 (a needless retry): ignored.
    dup = ScsiCommand(itt=0x999, lun=0, cdb=write10(2, 1),
                      expected_data_transfer_length=0, cmdsn=cmd.cmdsn, expstatsn=100)
    s.ini[1].outbox.add(dup)
    s.up(1)
    assert s.ran == [(0, 0x2A, 2)]
    assert not s.tgt[1].outbox  # silently (§4.2.2.1)


# ------------------------------------------------------------------ ERL 2


def test_erl2_detach_and_adopt_every_kind_of_task() -> None:
    """Connection recovery in the engines (§7.2.2): connection 1 fails with
    a write waiting for data, a read the target finished but whose answer
    was lost, and a write still running; TASK REASSIGN moves them to
    connection 0, which asks for the write data again, resends the read's
    Data-In and status, and answers the running write when it ends."""
    s = Session(2, initial_r2t=True)
    for t in s.tgt:
        t.params = TargetParams(max_xmit=4096, initial_r2t=True, first_burst=4096,
                                error_recovery_level=2)
    waiting = _write(0, 0x61, blocks=16)      # 8 KiB: R2T for the rest
    read = _read(20, blocks=4)
    running = _write(40, 0x63)
    s.disk[20 * BS : 24 * BS] = b"\x62" * 4 * BS
    s.hold_lbas.add(40)
    for cmd in (waiting, read, running):
        s.ini[1].submit(cmd, 0.0)
    s.up(1)                                   # the target takes all three
    assert [t.itt for t in s.held] == [running.itt]
    s.tgt[1].outbox.take()                    # its answers are lost
    kept = s.tgt[1].detach()
    assert {t.itt for t in kept} == {waiting.itt, read.itt, running.itt}
    assert set(s.ini[1].close()) == {waiting, read, running}
    for cmd in (waiting, read, running):
        s.ini[0].reassign(cmd, 0.0)
    pdus = s.up(0)
    assert [(p.function, p.referenced_task_tag) for p in pdus] == [  # type: ignore[attr-defined]
        (TMFunction.TASK_REASSIGN, waiting.itt), (TMFunction.TASK_REASSIGN, read.itt),
        (TMFunction.TASK_REASSIGN, running.itt)]
    by_itt = {t.itt: t for t in kept}
    for p in pdus:
        # The owner's part (target/server.py): answer, then move the task.
        s.tgt[0].tmf_done(p.itt, 0)
        s.tgt[0].adopt(by_itt[p.referenced_task_tag], s.tgt[1])  # type: ignore[attr-defined]
    s.settle([0])
    assert sum(isinstance(e, TaskManagementDone) and e.response == 0
               for e in s.events[0]) == 3
    assert s.completed(0) == [read, waiting] or s.completed(0) == [waiting, read]
    assert bytes(read.data_in or b"") == b"\x62" * 4 * BS
    assert s.disk[0 : 16 * BS] == b"\x61" * 16 * BS
    # The waiting write was asked for its data again, on connection 0.
    assert any(isinstance(p, R2T) and p.itt == waiting.itt for p in s.sent_by_target[0])
    # The running write ends now: its status goes out on connection 0.
    (task,) = s.held
    s.finish(0, task)
    s.settle([0])
    assert running in s.completed(0) and s.disk[40 * BS] == 0x63
    assert s.window.active == 0 and not s.ini[0].tasks


def test_erl2_unreassigned_tasks_release_their_slots() -> None:
    s = Session(1, initial_r2t=True)
    s.tgt[0].params = TargetParams(max_xmit=4096, initial_r2t=True, first_burst=4096,
                                   error_recovery_level=2)
    waiting = _write(0, 0x71, blocks=16)
    s.ini[0].submit(waiting, 0.0)
    s.up(0)
    assert s.window.active == 1
    (task,) = s.tgt[0].detach()
    assert task.retained and s.window.active == 1  # kept for Time2Retain
    s.tgt[0].drop_retained(task)                   # Time2Retain passed
    assert s.window.active == 0 and not task.retained


def test_erl2_status_kept_until_expstatsn_acknowledges_it() -> None:
    s = Session(1)
    s.tgt[0].params = TargetParams(max_xmit=4096, first_burst=4096, error_recovery_level=2)
    first = _write(1, 1)
    s.ini[0].submit(first, 0.0)
    s.settle()
    # Answered, but not yet acknowledged: a failure now keeps it.
    assert first.itt in s.tgt[0]._unacked
    second = _write(2, 2)
    s.ini[0].submit(second, 0.0)  # carries ExpStatSN past the first's status
    s.up(0)
    assert first.itt not in s.tgt[0]._unacked


def _lose_after_first_data_in(s: Session, read: Command) -> list[Task]:
    """Run ``read`` on connection 1; only its first Data-In (and whatever
    the initiator answers to it) gets through before connection 1 fails."""
    s.ini[1].submit(read, 0.0)
    s.up(1)
    first, *_ = s._move(s.tgt[1].outbox.take(), s.to_ini[1])
    assert isinstance(first, DataIn) and first.datasn == 0 and not first.status_present
    s.events[1].extend(s.ini[1].receive_pdu(first, 0.0))
    s.up(1)                                   # e.g. a DataACK SNACK for it
    s.tgt[1].outbox.take()                    # nothing more arrives
    kept = s.tgt[1].detach()
    assert set(s.ini[1].close()) == {read}
    return kept


def test_erl2_reassigned_read_resumes_from_expdatasn() -> None:
    """§11.5.6: TASK REASSIGN of a read carries ExpDataSN, the first Data-In
    the initiator still wants, and the target sends Data-In from there (with
    DataSN and offsets continuing), not the whole read again."""
    s = Session(2, erl=2)
    s.disk[8 * BS : 24 * BS] = bytes(range(256)) * (16 * BS // 256)
    read = _read(8, blocks=16)                # 8 KiB: Data-In DataSN 0 and 1
    (task,) = _lose_after_first_data_in(s, read)
    s.ini[0].reassign(read, 0.0)
    (tmf,) = s.up(0)
    assert tmf.function == TMFunction.TASK_REASSIGN  # type: ignore[attr-defined]
    assert tmf.expdatasn == 1  # type: ignore[attr-defined]
    s.tgt[0].tmf_done(tmf.itt, 0)
    s.tgt[0].adopt(task, s.tgt[1], tmf.expdatasn)  # type: ignore[attr-defined]
    s.settle([0])
    resent = [(p.datasn, p.buffer_offset) for p in s.sent_by_target[0] if isinstance(p, DataIn)]
    assert resent == [(1, 4096)]
    assert s.completed(0) == [read]
    assert bytes(read.data_in or b"") == bytes(s.disk[8 * BS : 24 * BS])


def test_erl2_reassign_with_expdatasn_zero_resumes_from_the_dataack() -> None:
    """ExpDataSN 0 means "the data acknowledgment reference number,
    unchanged" (§11.5.6): a DataACK SNACK (§11.16.1) for DataSN 0 moved it to
    1, so the target resends from DataSN 1."""
    s = Session(2, erl=2, max_burst=4096)     # A bit at the end of each burst
    read = _read(8, blocks=16)
    (task,) = _lose_after_first_data_in(s, read)
    assert task.acked_datasn == 1             # the initiator's DataACK arrived
    s.tgt[0].adopt(task, s.tgt[1], 0)
    pdus = s._move(s.tgt[0].outbox.take(), PDUReader())
    assert [(p.datasn, p.buffer_offset) for p in pdus if isinstance(p, DataIn)] == [(1, 4096)]


def test_erl2_reassign_after_every_data_in_sends_the_status_alone() -> None:
    s = Session(2, erl=2)
    read = _read(8, blocks=8)                 # one Data-In, which carries the status
    s.ini[1].submit(read, 0.0)
    s.up(1)
    s.tgt[1].outbox.take()                    # lost
    (task,) = s.tgt[1].detach()
    s.tgt[0].adopt(task, s.tgt[1], 1)         # the initiator says it has DataSN 0
    pdus = s._move(s.tgt[0].outbox.take(), PDUReader())
    assert [type(p).__name__ for p in pdus] == ["ScsiResponse"]
    assert pdus[0].expdatasn == 1  # type: ignore[attr-defined]

