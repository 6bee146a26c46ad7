# mypy: disable-error-code="arg-type"
"""The initiator against a malicious target (issue 9, items 7-10): each
violation ends the command with a clear error, in bounded time, after a
bounded number of logins; nothing escapes into the event loop."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from initiator.errors import CommandTimedOut, ConnectionLost, TargetProtocolError
from initiator.session import Session, SessionOptions
from iscsi.pdu import R2T, DataIn, ScsiCommand, ScsiResponse

from .hostile_target import IQN, HostileConnection, HostileTarget

RETRIES = 2
READ8 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])   # 8 blocks: 4 KiB
WRITE8 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])


def options(**kw: object) -> SessionOptions:
    base: dict[str, object] = {
        "initial_r2t": True, "immediate_data": False, "nop_interval": None,
        "command_timeout": 2.0, "tmf_timeout": 0.5, "command_retries": RETRIES,
        "reconnect_backoff_max": 0.2, "replacement_timeout": 10.0, "login_timeout": 5.0}
    base.update(kw)
    return SessionOptions(**base)


async def run_one(target: HostileTarget, *, write: bool, **kw: object) -> BaseException:
    """Run one command against ``target``; return what it raised."""
    s = await Session.connect("127.0.0.1", target.port, IQN, options(**kw))
    try:
        if write:
            coro = s.execute(0, WRITE8, data_out=bytes(4096))
        else:
            coro = s.execute(0, READ8, data_in=4096)
        with pytest.raises(Exception) as info:
            # The bound: without the fixes these never returned.
            await asyncio.wait_for(coro, 15)
        assert not isinstance(info.value, TimeoutError), "execute() hung"
        return info.value
    finally:
        s.abort()


@pytest.fixture(autouse=True)
def no_fatal_transport_errors(caplog: pytest.LogCaptureFixture) -> object:
    caplog.set_level(logging.ERROR, logger="asyncio")
    yield
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]


# ------------------------------------------------ item 7: reconnect storm
def r2t_whole_space(conn: HostileConnection, cmd: ScsiCommand) -> None:
    conn.send(R2T(itt=cmd.itt, ttt=1, buffer_offset=0, desired_data_transfer_length=0xFFFFFFFF,
                  **conn.peek()))


def r2t_outside(conn: HostileConnection, cmd: ScsiCommand) -> None:
    conn.send(R2T(itt=cmd.itt, ttt=1, buffer_offset=1 << 20, desired_data_transfer_length=512,
                  **conn.peek()))


def data_in_16mib(conn: HostileConnection, cmd: ScsiCommand) -> None:
    hdr = bytearray(DataIn(itt=cmd.itt, data=b"", **conn.peek()).to_bytes()[:48])
    hdr[5:8] = (0xFFFFFF).to_bytes(3, "big")    # DataSegmentLength ~16 MiB
    conn.send_raw(bytes(hdr) + bytes(1024))


def close_mid_data_in(conn: HostileConnection, cmd: ScsiCommand) -> None:
    raw = DataIn(itt=cmd.itt, data=bytes(4096), **conn.peek()).to_bytes()
    conn.send_raw(raw[:48 + 100])
    conn.close()


@pytest.mark.parametrize(("behaviour", "write"), [
    (r2t_whole_space, True), (r2t_outside, True), (data_in_16mib, False),
    (close_mid_data_in, False)])
async def test_violation_fails_after_bounded_paced_retries(behaviour: object,
                                                           write: bool) -> None:
    async with HostileTarget(behaviour) as t:
        start = time.monotonic()
        err = await run_one(t, write=write)
        elapsed = time.monotonic() - start
    # Old code: 10,000-16,000 logins in 15 s and execute() never returned.
    assert t.logins <= RETRIES + 2, t.logins
    assert t.commands == RETRIES + 1
    assert f"after {RETRIES + 1} attempts" in str(err), err
    assert elapsed < 10


# ------------------------------------------------- item 8: short reads
def good_with_512_of_4096(conn: HostileConnection, cmd: ScsiCommand) -> None:
    conn.send(DataIn(itt=cmd.itt, data=b"\xAA" * 512, final=True, status_present=True,
                     status=0, **conn.window()))


def good_without_data(conn: HostileConnection, cmd: ScsiCommand) -> None:
    conn.send(ScsiResponse(itt=cmd.itt, status=0, **conn.window()))


@pytest.mark.parametrize("behaviour", [good_with_512_of_4096, good_without_data])
async def test_good_status_for_missing_data_is_an_error(behaviour: object) -> None:
    async with HostileTarget(behaviour) as t:
        err = await run_one(t, write=False)
    assert isinstance(err, TargetProtocolError) and "4096" in str(err)
    assert t.logins == 1


# -------------------------------------------- item 9: command timeout
def never_answer(conn: HostileConnection, cmd: ScsiCommand) -> None:
    return None


async def test_read_never_answered_times_out_with_abort_task() -> None:
    # NOPs are answered: only the command timeout can notice.
    async with HostileTarget(never_answer) as t:
        start = time.monotonic()
        err = await run_one(t, write=False, nop_interval=0.3, nop_timeout=1.0,
                            command_timeout=1.0)
        elapsed = time.monotonic() - start
    assert isinstance(err, CommandTimedOut)
    assert t.tmfs == [1]   # ABORT TASK, answered: no reset, no recovery
    assert t.logins == 1 and 1.0 <= elapsed < 5


async def test_stuck_target_escalates_to_session_recovery() -> None:
    async with HostileTarget(never_answer, answer_tmf=False) as t:
        err = await run_one(t, write=False, command_timeout=1.0, tmf_timeout=0.3)
    assert isinstance(err, CommandTimedOut)
    # ABORT TASK, then LOGICAL UNIT RESET, then session recovery.
    assert t.tmfs == [1, 5]


# ------------------------------------------- item 10: repeated R2Ts
def r2t_again_and_again(conn: HostileConnection, cmd: ScsiCommand) -> None:
    conn.send(*[R2T(itt=cmd.itt, ttt=1 + i, r2tsn=i, buffer_offset=0,
                    desired_data_transfer_length=4096, **conn.peek()) for i in range(2000)])


async def test_repeated_r2t_is_answered_once() -> None:
    async with HostileTarget(r2t_again_and_again) as t:
        err = await run_one(t, write=True)
    # Old code: 2,000 R2Ts -> 8 MB of Data-Out for a 4 KiB write.
    assert isinstance(err, TargetProtocolError)
    assert t.data_out_bytes <= (RETRIES + 1) * 4096


async def test_target_that_logs_in_and_then_says_nothing() -> None:
    # Every login succeeds; the NOP keepalive notices the silence each time
    # and the command gives up after its retries.
    async with HostileTarget(never_answer, silent=True) as t:
        start = time.monotonic()
        err = await run_one(t, write=False, nop_interval=0.2, nop_timeout=0.3,
                            command_timeout=30.0)
        elapsed = time.monotonic() - start
    assert isinstance(err, ConnectionLost) and "NOP-In" in str(err), err
    # The READ went once; each later login stalled in the unit-attention
    # check (a TEST UNIT READY nobody answers).
    assert t.commands == 1 and t.logins <= RETRIES + 2
    assert elapsed < 10
