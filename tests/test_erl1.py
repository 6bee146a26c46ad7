"""ErrorRecoveryLevel 1 (RFC 7143 §7.1.5, §7.8, §7.9, §11.16) with both
engines in memory, digests on, and deterministic faults (tests/faults.py)
on the wire between them: every recovery path ends with the data verified
and nothing applied twice. Time is passed in; nothing sleeps."""

from __future__ import annotations

import random
from pathlib import Path
from dataclasses import dataclass, field

import pytest

from iscsi.constants import Opcode, RejectReason
from iscsi.errors import ProtocolError
from iscsi.ffp.initiator import (
    Command,
    CommandCompleted,
    ConnectionFailed,
    InitiatorEngine,
    InitiatorParams,
)
from iscsi.ffp.target import TargetConnectionEngine, TargetParams, Task
from iscsi.ffp.window import CmdSNWindow
from iscsi.framing import PDUReader
from iscsi.pdu import PDU, Buffer, Reject, SnackRequest
from tests.faults import Fault, FaultPlan, is_op
from tests.initiator_checks import LONG
from tests.test_ffp_pair import BS, Pair, completed, pattern, read, write

DATA_OUT, DATA_IN = Opcode.SCSI_DATA_OUT, Opcode.SCSI_DATA_IN


@dataclass
class FaultyPair(Pair):
    """:class:`Pair` with digests, ERL 1, and a fault plan per direction."""

    up: FaultPlan = field(default_factory=FaultPlan)
    down: FaultPlan = field(default_factory=FaultPlan)
    executed: dict[int, int] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    snacks: list[SnackRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.to_tgt = PDUReader(placement=self.tgt.placement, max_data_segment_length=1 << 24,
                                header_digest=True, data_digest=True)
        self.to_ini = PDUReader(placement=self.ini.placement, max_data_segment_length=1 << 24,
                                header_digest=True, data_digest=True)
        self._up_buf = bytearray()
        self._down_buf = bytearray()
        for plan in (self.up, self.down):
            plan.header_digest = plan.data_digest = True

    @staticmethod
    def _feed(reader: PDUReader, raw: bytes) -> list[PDU | ProtocolError]:
        out: list[PDU | ProtocolError] = []
        try:
            out.extend(reader.feed(raw))
        except ProtocolError as exc:
            out.append(exc)
        while True:
            try:
                more = reader.parse()
            except ProtocolError as exc:
                out.append(exc)
                continue
            if not more:
                return out
            out.extend(more)

    def run(self, now: float = 0.0) -> list[object]:  # type: ignore[override]
        start = len(self.events)
        while self.ini.outbox or self.tgt.outbox:
            self._up_buf += b"".join(bytes(b) for b in self.ini.outbox.take())
            for item in self._feed(self.to_tgt, b"".join(self.up.stream(self._up_buf))):
                if isinstance(item, ProtocolError):
                    self._own(self.tgt.protocol_error(item))
                    continue
                self.seen.append(item)
                if isinstance(item, SnackRequest):
                    self.snacks.append(item)
                self._own(self.tgt.receive_pdu(item, now))
            self._down_buf += b"".join(bytes(b) for b in self.tgt.outbox.take())
            for item in self._feed(self.to_ini, b"".join(self.down.stream(self._down_buf))):
                if isinstance(item, ProtocolError):
                    self.events.extend(self.ini.protocol_error(item, now))
                    continue
                if isinstance(item, Reject):
                    self.rejects.append(item)
                self.events.extend(self.ini.receive_pdu(item, now))
        return self.events[start:]  # type: ignore[return-value]

    def execute(self, task: Task) -> None:
        self.executed[task.itt] = self.executed.get(task.itt, 0) + 1
        super().execute(task)

    def tick(self, now: float) -> list[object]:
        """Advance time to ``now``: both engines' timers, then the wire."""
        start = len(self.events)
        self.events.extend(self.ini.handle_timer(now))
        self._own(self.tgt.handle_timer(now))
        self.run(now)
        return self.events[start:]  # type: ignore[return-value]


def make(*, up: list[Fault] | None = None, down: list[Fault] | None = None,
         mrdsl: int = 8192, max_burst: int = 262144, first_burst: int = 65536,
         initial_r2t: bool = True, immediate_data: bool = True, depth: int = 16,
         retain_budget: int = 64 << 20) -> FaultyPair:
    ini = InitiatorEngine(
        InitiatorParams(max_xmit=mrdsl, max_burst=max_burst, first_burst=first_burst,
                        initial_r2t=initial_r2t, immediate_data=immediate_data,
                        header_digest=True, data_digest=True, error_recovery_level=1),
        cmdsn=1, expcmdsn=1, maxcmdsn=depth, exp_statsn=100, now=0.0, nop_interval=1.0,
        nop_timeout=5.0)
    tgt = TargetConnectionEngine(
        CmdSNWindow(1, depth),
        TargetParams(max_xmit=mrdsl, max_burst=max_burst, first_burst=first_burst,
                     initial_r2t=initial_r2t, immediate_data=immediate_data,
                     header_digest=True, data_digest=True, error_recovery_level=1),
        statsn=100, now=0.0, retain_budget=retain_budget, sequence_timeout=3.0)
    return FaultyPair(ini, tgt, up=FaultPlan(up or []), down=FaultPlan(down or []))


def settle(p: FaultyPair, *cmds: Command, until: float = 60.0) -> dict[Command, CommandCompleted]:
    """Run, advancing time one second at a time while commands are open
    (keepalives and sequence timeouts are what recover lost PDUs)."""
    now = 0.0
    p.run(now)
    while any(c.itt in p.ini.tasks and p.ini.tasks[c.itt] is c for c in cmds) or \
            any(not c.sent for c in cmds):
        now += 1.0
        assert now <= until, "recovery did not finish"
        p.tick(now)
    assert not [e for e in p.events if isinstance(e, ConnectionFailed)]
    return {c: completed(p.events, c) for c in cmds}  # type: ignore[arg-type]


def check_write(p: FaultyPair, lba: int, data: bytes, cmd: Command) -> None:
    assert bytes(p.disk[lba * BS : lba * BS + len(data)]) == data
    assert p.executed[cmd.itt] == 1


# ------------------------------------------------------------ Data-Out
@pytest.mark.parametrize("action", ["corrupt", "drop", "dup"])
@pytest.mark.parametrize("nth", [0, 3, 6])
def test_write_recovers_a_damaged_data_out(action: str, nth: int) -> None:
    """§7.8: a Data-Out with a bad data digest is Rejected (reason 0x02)
    and asked for again with a recovery R2T; a lost one (a DataSN/offset
    gap, or the F-bit PDU whose loss only the sequence timeout shows)
    likewise (§7.1.4.1); a duplicate fills nothing twice."""
    p = make(up=[Fault(action, is_op(DATA_OUT), nth=nth)])
    data = pattern(64 << 10, seed=5)  # immediate 8 KiB, then 7 Data-Out PDUs
    w = write(p, 10, data)
    c = settle(p, w)[w]
    assert c.status == 0
    check_write(p, 10, data, w)
    assert p.up.done == [(action, DATA_OUT, w.itt)]
    if action == "corrupt":
        assert [r.reason for r in p.rejects] == [RejectReason.DATA_DIGEST_ERROR]
    if action != "dup":
        assert p.tgt.recovery_r2ts == 1
    assert not p.tgt.tasks and p.tgt.budget.used == 0


def test_unsolicited_data_and_immediate_data_are_recovered() -> None:
    """Unsolicited Data-Out damaged: a recovery R2T (§7.8); immediate data
    damaged: the whole command is Rejected and retried, same ITT and CmdSN
    (§7.2.1) -- and runs once."""
    p = make(initial_r2t=False, up=[Fault("corrupt", is_op(DATA_OUT), nth=2),
                                    Fault("corrupt", is_op(Opcode.SCSI_COMMAND, data=True),
                                          nth=1)])
    d1, d2 = pattern(128 << 10, seed=1), pattern(32 << 10, seed=2)
    w1 = write(p, 0, d1)
    w2 = write(p, 512, d2)
    res = settle(p, w1, w2)
    assert res[w1].status == 0 and res[w2].status == 0
    check_write(p, 0, d1, w1)
    check_write(p, 512, d2, w2)
    assert p.ini.recovery.retries == 1 and p.tgt.recovery_r2ts == 1


def test_lost_r2t_is_asked_for_again() -> None:
    """An R2T lost on the way: the target's sequence timeout sends a
    recovery R2T for the whole range (§7.1.4.1 (b))."""
    p = make(max_burst=16384, down=[Fault("drop", is_op(Opcode.R2T), nth=1)])
    data = pattern(64 << 10, seed=9)
    w = write(p, 0, data)
    assert settle(p, w)[w].status == 0
    check_write(p, 0, data, w)


# ------------------------------------------------------------- Data-In
@pytest.mark.parametrize("action", ["corrupt", "drop", "dup"])
@pytest.mark.parametrize("nth", [0, 4, 7])
def test_read_recovers_damaged_data_in(action: str, nth: int) -> None:
    """A Data-In with a bad data digest or lost (a DataSN gap, or the last
    one with the status: a StatSN gap the keepalive's NOP-In shows) is
    asked for with a SNACK and resent from the data the target kept."""
    p = make(down=[Fault(action, is_op(DATA_IN), nth=nth)])
    r = read(p, 0, 128)  # 64 KiB: 8 Data-In, the last with status
    c = settle(p, r)[r]
    assert (c.status, c.received) == (0, 64 << 10)
    assert r.data_in is not None and bytes(r.data_in) == bytes(p.disk[: 64 << 10])
    assert p.executed[r.itt] == 1
    if action != "dup":
        assert p.tgt.resent_data + p.tgt.resent_status >= 1
    # Once the status is acknowledged, nothing stays kept.
    p.ini.ping(100.0)
    p.run(100.0)
    # (but the ping's own answer, until the next ExpStatSN).
    assert p.tgt.kept_bytes == 0 and len(p.tgt.kept_status) == 1
    assert p.tgt.budget.used == 0


def test_lost_status_is_found_by_a_later_statsn() -> None:
    """A SCSI Response lost: the next status shows the StatSN gap and a
    Status SNACK brings it back (§7.9, §11.16.1)."""
    p = make(down=[Fault("drop", is_op(Opcode.SCSI_RESPONSE), nth=0)])
    d = pattern(4096, seed=3)
    w = write(p, 0, d)
    r = read(p, 100, 8)
    res = settle(p, w, r)
    assert res[w].status == 0 and res[r].status == 0
    check_write(p, 0, d, w)
    assert any(s.type == 1 for s in p.snacks)


def test_lost_status_alone_is_found_by_the_keepalive() -> None:
    """Nothing else follows the lost status: the keepalive NOP-Out's answer
    carries the StatSN past the gap (NOP-based detection)."""
    p = make(down=[Fault("drop", is_op(Opcode.SCSI_RESPONSE))])
    d = pattern(4096, seed=4)
    w = write(p, 0, d)
    assert settle(p, w)[w].status == 0
    check_write(p, 0, d, w)


def test_lost_last_status_is_found_by_the_targets_probe() -> None:
    """An initiator without keepalive loses the last status: the target,
    seeing it unacknowledged and the initiator silent, sends a NOP-In with
    the next StatSN; the gap brings a Status SNACK (NOP-based detection of
    an ExpStatSN gap, from the target's side)."""
    p = make(down=[Fault("drop", is_op(Opcode.SCSI_RESPONSE))])
    p.ini.nop_interval = None
    p.ini._timers.cancel("nop")
    d = pattern(4096, seed=6)
    w = write(p, 0, d)
    assert settle(p, w)[w].status == 0
    check_write(p, 0, d, w)
    assert [s.type for s in p.snacks] == [1]  # one Status SNACK, after the probe


def test_lost_command_is_retried_once() -> None:
    """A SCSI Command lost: the keepalive's answer shows ExpCmdSN stuck at
    it, so it is retried with the same ITT and CmdSN (§7.2.1); a duplicate
    command runs once."""
    p = make(up=[Fault("drop", is_op(Opcode.SCSI_COMMAND), nth=1),
                 Fault("dup", is_op(Opcode.SCSI_COMMAND), nth=3)])
    cmds = []
    for i in range(5):
        data = pattern(8192, seed=i)
        cmds.append((write(p, i * 16, data), data, i * 16))
    settle(p, *[c for c, _, _ in cmds])
    for cmd, data, lba in cmds:
        check_write(p, lba, data, cmd)
    assert p.ini.recovery.retries == 1


def test_data_in_lost_before_a_separate_status_is_asked_for() -> None:
    """A read ending in CHECK CONDITION sends its data, then a SCSI
    Response whose ExpDataSN counts the Data-In (§11.4.8): the last Data-In
    lost shows there and is asked for before the status is given out."""
    p = make(down=[Fault("drop", is_op(DATA_IN), nth=3)])
    r = read(p, 0, 64)  # 32 KiB: 4 Data-In
    p.hold = True
    p.run()
    task = p.held.pop()
    p.tgt.command_done(task, 2, b"\x70\x00\x05" + bytes(15), memoryview(p.disk)[: 32 << 10])
    p.run()
    c = completed(p.events, r)
    assert c.status == 2 and r.data_in is not None
    assert bytes(r.data_in) == bytes(p.disk[: 32 << 10])
    # The Data SNACK, then the DataACK the last (A-bit) Data-In asked for.
    assert [(s.type, s.begrun, s.runlength) for s in p.snacks] == [(0, 3, 1), (2, 4, 0)]


def test_data_ack_releases_kept_data() -> None:
    """The last Data-In of each burst asks for a DataACK (A bit); the
    initiator's DataACK SNACK lets the target drop what it kept before the
    status is even acknowledged (§11.7.2, §11.16.1)."""
    p = make(max_burst=65536, mrdsl=16384)
    p.hold = True
    r = read(p, 0, 512)  # 256 KiB: 4 bursts, A bits on the first three
    p.run()
    p.release()
    p.run()
    c = completed(p.events, r)
    assert c.status == 0 and r.data_in is not None
    assert bytes(r.data_in) == bytes(p.disk[: 256 << 10])
    acks = [s for s in p.snacks if s.type == 2]
    assert [a.begrun for a in acks] == [4, 8, 12]
    # Only the last burst (with the status) is still kept until ExpStatSN,
    # and it is charged to the server-wide budget until then.
    assert p.tgt.kept_bytes == 65536 and p.tgt.budget.used == 65536
    p.tgt.close()
    assert p.tgt.budget.used == 0


def test_kept_status_is_capped() -> None:
    """An initiator that never advances ExpStatSN cannot make the target
    keep status without bound."""
    from iscsi.ffp.target_recovery import MAX_KEPT_STATUS
    p = make()
    for i in range(MAX_KEPT_STATUS + 50):
        p.tgt.text_answer(i, b"")
    p.tgt.outbox.take()
    assert len(p.tgt.kept_status) == MAX_KEPT_STATUS


def test_target_config_takes_error_recovery_level(tmp_path: Path) -> None:
    """``limits.error_recovery_level`` in the TOML config: 0, 1 or 2."""
    from target.config import ConfigError, load_config
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    for level, ok in ((0, True), (1, True), (2, True), (3, False)):
        cfg = tmp_path / f"t{level}.toml"
        cfg.write_text(f'[[target]]\nname = "iqn.2026-12.org.example:t"\n'
                       f'limits = {{ error_recovery_level = {level} }}\n'
                       f'[[target.lun]]\nlun = 0\npath = "{img}"\n')
        if ok:
            assert load_config(str(cfg)).targets[0].limits.error_recovery_level == level
        else:
            with pytest.raises(ConfigError, match="error_recovery_level"):
                load_config(str(cfg))


def test_retention_is_bounded_by_the_budget() -> None:
    """Data that does not fit the retention budget is sent but not kept: a
    SNACK for it is answered with Reject (SNACK Reject) and the command
    fails rather than hangs."""
    p = make(retain_budget=16384, down=[Fault("corrupt", is_op(DATA_IN), nth=1)])
    r = read(p, 0, 64)
    p.run()
    assert p.tgt.kept_bytes == 0
    failed = [e for e in p.events if getattr(e, "command", None) is r]
    assert failed and failed[0].kind == "rejected"  # type: ignore[attr-defined]


def test_erl0_still_drops_the_connection_on_a_data_digest_error() -> None:
    """At ERL 0 (no SNACK) a corrupt Data-In ends the connection."""
    p = make(down=[Fault("corrupt", is_op(DATA_IN))])
    p.ini.erl = 0
    read(p, 0, 16)
    p.run()
    assert any(isinstance(e, ConnectionFailed) for e in p.events)


# ------------------------------------------------------- random stream
@pytest.mark.parametrize("seed", range(60 if LONG else 8))
def test_random_stream_with_random_faults(seed: int) -> None:
    """Random writes and reads with random digest errors, losses and
    duplicates on data PDUs both ways: every write lands once, every read
    returns what the disk holds."""
    rng = random.Random(seed)
    ups = [Fault(rng.choice(["corrupt", "drop", "dup"]), is_op(DATA_OUT), nth=rng.randrange(60))
           for _ in range(4)]
    downs = [Fault(rng.choice(["corrupt", "drop", "dup"]), is_op(DATA_IN), nth=rng.randrange(60))
             for _ in range(4)]
    # Lost commands, R2Ts and status too (keepalives and timeouts find them).
    ups.append(Fault(rng.choice(["drop", "dup"]), is_op(Opcode.SCSI_COMMAND),
                     nth=rng.randrange(20)))
    downs.append(Fault("drop", is_op(Opcode.SCSI_RESPONSE), nth=rng.randrange(10)))
    downs.append(Fault(rng.choice(["drop", "dup"]), is_op(Opcode.R2T), nth=rng.randrange(20)))
    p = make(up=ups, down=downs, max_burst=32768, initial_r2t=rng.random() < 0.5)
    model = bytearray(p.disk)
    for _ in range(20):
        lba = rng.randrange(0, 1800)
        blocks = rng.randrange(1, 64)
        if rng.random() < 0.5:
            data = rng.randbytes(blocks * BS)
            w = write(p, lba, data)
            assert settle(p, w)[w].status == 0
            model[lba * BS : lba * BS + len(data)] = data
            assert p.executed[w.itt] >= 1
        else:
            r = read(p, lba, blocks)
            assert settle(p, r)[r].status == 0
            assert r.data_in is not None
            assert bytes(r.data_in) == bytes(model[lba * BS : (lba + blocks) * BS])
        assert p.disk == model
    # The last status acknowledged (ExpStatSN of a ping): nothing kept.
    p.ini.ping(1000.0)
    p.run(1000.0)
    assert not p.tgt.tasks and p.tgt.budget.used == 0 and p.tgt.kept_bytes == 0


def test_r_data_snack_resegments_after_a_smaller_mrdsl() -> None:
    """R-Data SNACK (§11.16.1): after the initiator's
    MaxRecvDataSegmentLength shrank, every Data-In not yet acknowledged is
    cut again to the new size and numbered on, and the status follows as a
    SCSI Response carrying the SNACK Tag and the new ExpDataSN."""
    p = make(mrdsl=16384, max_burst=32768)
    p.hold = True
    r = read(p, 0, 128)  # 64 KiB: 4 Data-In of 16 KiB, A bit after the 2nd
    p.run()
    p.release()
    p.run()
    assert completed(p.events, r).status == 0
    statsn = p.tgt.statsn - 1
    p.tgt.set_max_xmit(4096)
    p.tgt.receive_pdu(SnackRequest(itt=r.itt, type=3, ttt=0x1234, begrun=0, runlength=0), 1.0)
    reader = PDUReader(max_data_segment_length=1 << 20, header_digest=True, data_digest=True)
    out = reader.feed(b"".join(bytes(b) for b in p.tgt.outbox.take()))
    data_in = [x for x in out if x.opcode == Opcode.SCSI_DATA_IN]
    resp = [x for x in out if x.opcode == Opcode.SCSI_RESPONSE]
    # The first burst was acknowledged (DataACK): only the rest comes again.
    assert [d.datasn for d in data_in] == list(range(2, 10))  # type: ignore[attr-defined]
    assert all(len(d.data) == 4096 for d in data_in)
    got = b"".join(bytes(d.data) for d in data_in)
    assert got == bytes(p.disk[32768:65536])
    assert len(resp) == 1 and resp[0].snack_tag == 0x1234  # type: ignore[attr-defined]
    assert resp[0].statsn == statsn and resp[0].expdatasn == 10  # type: ignore[attr-defined]


def test_cli_flag_asks_for_erl1_with_keepalive() -> None:
    """``--error-recovery-level 1``, before or after the subcommand: offered
    at login, with the NOP keepalive that finds a lost last PDU."""
    from initiator.cli import build_parser
    from initiator.cli_common import session_options
    for argv in (["--error-recovery-level", "1", "ls", "iscsi://h/iqn.x:y/0"],
                 ["ls", "iscsi://h/iqn.x:y/0", "--error-recovery-level", "1"]):
        o = session_options(build_parser().parse_args(argv))
        assert (o.error_recovery_level, o.nop_interval) == (1, 5.0)
    o = session_options(build_parser().parse_args(["ls", "iscsi://h/iqn.x:y/0"]))
    assert (o.error_recovery_level, o.nop_interval) == (0, None)
