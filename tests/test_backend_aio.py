"""The write ordering an emulated COMPARE AND WRITE relies on
(target/backends/aio.py): it waits for writes in flight, and writes that
arrive while it runs wait for it (SBC-3 §5.2 atomicity)."""

from __future__ import annotations

import asyncio

from target.backends.aio import WriteGate, first_difference


async def _yield_to_tasks() -> None:
    # Lets the tasks already scheduled run up to their next await: ordering
    # by the scheduler, not by time.
    for _ in range(5):
        await asyncio.sleep(0)


async def test_compare_and_write_waits_for_writes_and_holds_new_ones() -> None:
    loop = asyncio.get_running_loop()
    gate = WriteGate()
    order: list[str] = []
    first = loop.create_future()

    def start(name: str, done: asyncio.Future[None]) -> asyncio.Future[None]:
        order.append(name)
        return done

    w1 = gate.write(lambda: start("w1", first))
    release: asyncio.Future[None] = loop.create_future()

    async def body() -> int:
        order.append("caw")
        await release
        return -1

    caw = asyncio.ensure_future(gate.exclusive(body))
    await _yield_to_tasks()
    assert order == ["w1"]  # the compare waits for the write in flight
    first.set_result(None)
    await w1
    await _yield_to_tasks()
    assert order == ["w1", "caw"]
    second = loop.create_future()
    second.set_result(None)
    w2 = gate.write(lambda: start("w2", second))
    await _yield_to_tasks()
    assert order == ["w1", "caw"]  # held back while the compare-and-write runs
    release.set_result(None)
    assert await caw == -1
    await w2
    assert order == ["w1", "caw", "w2"]


def test_first_difference() -> None:
    assert first_difference(b"abc", b"abc") == -1
    assert first_difference(b"abc", b"abd") == 2
    assert first_difference(b"\x00" * 600, b"\x00" * 100 + b"\x01" + b"\x00" * 499) == 100
