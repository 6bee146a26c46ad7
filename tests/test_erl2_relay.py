"""ErrorRecoveryLevel 2 over sockets, both recovery levels at once: our
initiator <-> a fault-injecting TCP relay (tests/faults.py) <-> our target,
HeaderDigest and DataDigest CRC32C. On every connection the relay damages
Data-Out and Data-In (ERL 1 within-connection recovery: SNACK, recovery
R2Ts, retries); on the first connection it also cuts the TCP connection in
the middle of a write burst (ERL 2 connection recovery: a new connection,
TASK REASSIGN of the lost connection's tasks). A verified random write/read
stream completes with 1 and 4 connections per session, without session
recovery, and the image equals the model (RFC 7143 §7.1.5, §7.2.2)."""

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

# The same sparse 16 MiB image as the ERL 1 relay tests.
from tests.test_erl1_relay import image  # noqa: E402,F401  (a fixture)


@pytest.fixture
def erl2_target(image: Path) -> Iterator[RunningTarget]:
    cfg = make_config([LunSpec(lun=0, path=str(image), backend="raw")],
                      # Data-Out of at most 16 KiB: a write burst is many PDUs.
                      limits=Limits(error_recovery_level=2, max_connections=8,
                                    max_recv_data_segment_length=16384))
    with running_target(cfg) as t:
        yield t


@pytest.mark.parametrize("n", [1, 4])
async def test_digest_errors_and_a_cut_connection_in_one_stream(
        erl2_target: RunningTarget, image: Path, n: int) -> None:
    accepted = 0

    def up() -> FaultPlan:
        nonlocal accepted
        accepted += 1
        faults = [Fault("corrupt", is_op(Opcode.SCSI_DATA_OUT), nth=k) for k in (3, 25)]
        if accepted == 1:
            # Mid-burst: a Data-Out without the F bit, so the write it
            # belongs to has data still to come when the connection dies.
            faults.append(Fault("cut", is_op(Opcode.SCSI_DATA_OUT, final=False), nth=40))
        return FaultPlan(faults, header_digest=True, data_digest=True)

    def down() -> FaultPlan:
        return FaultPlan([Fault("corrupt", is_op(Opcode.SCSI_DATA_IN), nth=k) for k in (2, 30)]
                         + [Fault("drop", is_op(Opcode.SCSI_DATA_IN, final=False), nth=12)],
                         header_digest=True, data_digest=True)

    relay = FaultyRelay((erl2_target.host, erl2_target.port), up, down)
    await relay.start()
    try:
        s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
            connections=n, error_recovery_level=2, header_digest="CRC32C",
            data_digest="CRC32C", command_timeout=60.0))
        async with s:
            assert s.params.error_recovery_level == 2 and s.params.data_digest
            assert s.connection_count == n
            dev = await BlockDevice.from_session(s, 0)
            model = await asyncio.wait_for(random_write_verify(dev, 12 * MiB), 240)
            # The cut connection was replaced within the session (ERL 2),
            # never by reinstating the session (ERL 0).
            assert s.recoveries == 0
            assert len(relay.plans) > n
    finally:
        await relay.close()
    assert image.read_bytes() == model
    first_up, _ = relay.plans[0]
    assert first_up.cut
    assert [a for a, _, _ in first_up.done].count("corrupt") == 2
    damaged = sum(a == "corrupt" for _, down_plan in relay.plans for a, _, _ in down_plan.done)
    assert damaged >= 2


async def test_erl1_digest_errors_on_four_connections(image: Path) -> None:
    """ErrorRecoveryLevel 1 with four connections per session: Data-Out and
    Data-In damaged on every connection are recovered within their own
    connection (SNACK, recovery R2T; connection allegiance, §4.2.2), no
    connection is lost and the stream verifies."""
    cfg = make_config([LunSpec(lun=0, path=str(image), backend="raw")],
                      limits=Limits(error_recovery_level=1, max_connections=8,
                                    max_recv_data_segment_length=16384))

    def up() -> FaultPlan:
        return FaultPlan([Fault("corrupt", is_op(Opcode.SCSI_DATA_OUT), nth=k) for k in (3, 25)],
                         header_digest=True, data_digest=True)

    def down() -> FaultPlan:
        return FaultPlan([Fault("corrupt", is_op(Opcode.SCSI_DATA_IN), nth=k) for k in (2, 30)],
                         header_digest=True, data_digest=True)

    with running_target(cfg) as t:
        relay = FaultyRelay((t.host, t.port), up, down)
        await relay.start()
        try:
            s = await Session.connect("127.0.0.1", relay.port, TARGET_NAME, opts(
                connections=4, error_recovery_level=1, header_digest="CRC32C",
                data_digest="CRC32C", command_timeout=60.0))
            async with s:
                assert s.params.error_recovery_level == 1 and s.connection_count == 4
                dev = await BlockDevice.from_session(s, 0)
                model = await asyncio.wait_for(random_write_verify(dev, 12 * MiB), 240)
                assert s.recoveries == 0 and s.connection_recoveries == 0
        finally:
            await relay.close()
    assert image.read_bytes() == model
    assert len(relay.plans) == 4
    damaged = sum(a == "corrupt" for up_p, down_p in relay.plans
                  for a, _, _ in up_p.done + down_p.done)
    assert damaged >= 4
