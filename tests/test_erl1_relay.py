"""ErrorRecoveryLevel 1 over sockets: our initiator <-> a fault-injecting
TCP relay (tests/faults.py) <-> our target, DataDigest=CRC32C. The relay
flips bytes in chosen PDUs' data segments (so their data digests fail) and
drops one Data-In; a verified random write/read stream completes on one
connection -- no reconnect -- with the image equal to the model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from initiator.blockdev import BlockDevice
from initiator.session import Session
from iscsi.constants import Opcode
from target.config import Limits, LunSpec
from tests.faults import Fault, FaultPlan, FaultyRelay, is_op
from tests.initiator_checks import MiB, opts, random_write_verify
from tests.target_fixture import TARGET_NAME, RunningTarget, make_config, running_target
from tests.tools import require_tool

SIZE = 16 * MiB


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "lun0.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def erl1_target(image: Path) -> Iterator[RunningTarget]:
    cfg = make_config([LunSpec(lun=0, path=str(image), backend="raw")],
                      limits=Limits(error_recovery_level=1))
    with running_target(cfg) as t:
        yield t


async def test_erl_is_the_lower_of_both_offers(erl1_target: RunningTarget,
                                               tmp_path: Path) -> None:
    """§13.20: the session runs at the lower ErrorRecoveryLevel; an
    initiator asking nothing (libiscsi, open-iscsi) gets 0 from a target
    that would allow 1, and 1 only when it asks for it."""
    for asked, got in ((0, 0), (1, 1)):
        s = await Session.connect(erl1_target.host, erl1_target.port, TARGET_NAME,
                                  opts(error_recovery_level=asked))
        async with s:
            assert s.params.error_recovery_level == got
    other = tmp_path / "erl0.img"
    other.write_bytes(bytes(1 << 20))
    cfg = make_config([LunSpec(lun=0, path=str(other), backend="raw")])
    with running_target(cfg) as t0:
        s = await Session.connect(t0.host, t0.port, TARGET_NAME, opts(error_recovery_level=1))
        async with s:
            assert s.params.error_recovery_level == 0


async def test_libiscsi_gets_erl0_from_a_target_allowing_1(erl1_target: RunningTarget) -> None:
    """libiscsi asks for no ErrorRecoveryLevel (RFC default 0), so a target
    configured for 1 answers 0 or nothing, and the tool works unchanged."""
    inq = require_tool("iscsi-inq")

    def plain() -> FaultPlan:
        return FaultPlan()

    relay = FaultyRelay((erl1_target.host, erl1_target.port), plain, plain)
    await relay.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            inq, f"iscsi://127.0.0.1:{relay.port}/{TARGET_NAME}/0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await relay.close()
    assert proc.returncode == 0 and b"Vendor:AIOISCSI" in out, out
    answers = b"".join(raw for _, down in relay.plans for raw in down.logins)
    assert b"ErrorRecoveryLevel=1" not in answers


async def test_verified_stream_through_a_corrupting_relay(erl1_target: RunningTarget,
                                                          image: Path) -> None:
    def up() -> FaultPlan:
        return FaultPlan([Fault("corrupt", is_op(Opcode.SCSI_DATA_OUT), nth=n)
                          for n in (2, 20, 45)]
                         + [Fault("corrupt", is_op(Opcode.SCSI_COMMAND, data=True), nth=7)],
                         header_digest=True, data_digest=True)

    def down() -> FaultPlan:
        return FaultPlan([Fault("corrupt", is_op(Opcode.SCSI_DATA_IN), nth=n)
                          for n in (1, 15, 40)]
                         + [Fault("drop", is_op(Opcode.SCSI_DATA_IN, final=False), nth=25)],
                         header_digest=True, data_digest=True)

    relay = FaultyRelay((erl1_target.host, erl1_target.port), up, down)
    await relay.start()
    try:
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
            error_recovery_level=1, header_digest="CRC32C", data_digest="CRC32C"))
        async with s:
            assert s.params.error_recovery_level == 1 and s.params.data_digest
            model = await random_write_verify(await BlockDevice.from_session(s, 0), 12 * MiB)
            # Three damaged Data-In and one lost: asked for again with SNACK;
            # the damaged immediate data: the command retried.
            engine = s._engine
            assert engine is not None
            assert engine.recovery.snacks >= 4 and engine.recovery.retries == 1
    finally:
        await relay.close()
    assert image.read_bytes() == model
    assert len(relay.plans) == 1
    up_done, down_done = relay.plans[0]
    assert [a for a, _, _ in up_done.done].count("corrupt") == 4
    assert sorted(a for a, _, _ in down_done.done) == ["corrupt"] * 3 + ["drop"]


async def test_pdus_with_bad_header_digests_are_discarded_and_recovered(
        erl1_target: RunningTarget, image: Path) -> None:
    """§7.8 at ErrorRecoveryLevel 1: a PDU whose header digest fails is
    discarded (not the connection), in both directions, and what it carried
    comes back through the sequence numbers: a lost SCSI Command through
    ExpCmdSN (our keepalive shows it never arrived: retried), a lost Data-Out
    through the target's recovery R2T, a lost Data-In through the DataSN
    gap (Data SNACK), a lost SCSI Response through the StatSN gap (Status
    SNACK). The stream verifies on one connection."""
    def up() -> FaultPlan:
        return FaultPlan([Fault("corrupt-header", is_op(Opcode.SCSI_COMMAND), nth=9),
                          Fault("corrupt-header", is_op(Opcode.SCSI_DATA_OUT), nth=30)],
                         header_digest=True, data_digest=True)

    def down() -> FaultPlan:
        return FaultPlan([Fault("corrupt-header", is_op(Opcode.SCSI_DATA_IN), nth=n)
                          for n in (3, 50)]
                         + [Fault("corrupt-header", is_op(Opcode.SCSI_RESPONSE), nth=6)],
                         header_digest=True, data_digest=True)

    relay = FaultyRelay((erl1_target.host, erl1_target.port), up, down)
    await relay.start()
    try:
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
            error_recovery_level=1, header_digest="CRC32C", data_digest="CRC32C",
            nop_interval=0.5, nop_timeout=30.0))
        async with s:
            model = await asyncio.wait_for(
                random_write_verify(await BlockDevice.from_session(s, 0), 12 * MiB), 240)
            assert s.recoveries == 0  # the connection never went
    finally:
        await relay.close()
    assert image.read_bytes() == model
    assert len(relay.plans) == 1
    up_done, down_done = relay.plans[0]
    assert [a for a, _, _ in up_done.done] == ["corrupt-header"] * 2
    assert [a for a, _, _ in down_done.done] == ["corrupt-header"] * 3


async def test_a_damaged_length_still_ends_the_connection(erl1_target: RunningTarget,
                                                          image: Path) -> None:
    """When the damaged byte is the length, the skip cannot land on a sound
    header: the connection ends (§7.8) and the session recovers it by
    reinstatement; the stream still verifies."""
    def up() -> FaultPlan:
        return FaultPlan([], header_digest=True, data_digest=True)

    connections = 0

    def down() -> FaultPlan:
        nonlocal connections
        connections += 1
        faults = [Fault("corrupt-length", is_op(Opcode.SCSI_DATA_IN, data=True), nth=4)]
        return FaultPlan(faults if connections == 1 else [], header_digest=True,
                         data_digest=True)

    relay = FaultyRelay((erl1_target.host, erl1_target.port), up, down)
    await relay.start()
    try:
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
            error_recovery_level=1, header_digest="CRC32C", data_digest="CRC32C"))
        async with s:
            model = await asyncio.wait_for(
                random_write_verify(await BlockDevice.from_session(s, 0), 4 * MiB), 240)
            assert s.recoveries == 1
    finally:
        await relay.close()
    assert image.read_bytes() == model
    assert [a for a, _, _ in relay.plans[0][1].done] == ["corrupt-length"]
