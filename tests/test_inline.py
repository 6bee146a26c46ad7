"""target/inline.py: coroutines that finish at once need no Task; those
that wait are resumed like a Task would, in their own context."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from target.inline import run_inline

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="outside")


async def immediate(x: int) -> int:
    return x * 2


async def waits(fut: asyncio.Future[int]) -> str:
    VAR.set("inside")
    n = await fut
    await asyncio.sleep(0)
    return f"{VAR.get()}:{n}"


async def fails() -> None:
    raise ValueError("boom")


async def test_finishes_at_once_without_a_task() -> None:
    got: list[object] = []
    tasks_before = len(asyncio.all_tasks())
    fut = run_inline(immediate(21), lambda r, e: got.append((r, e)),
                     asyncio.get_running_loop())
    assert fut is None and got == [(42, None)]
    assert len(asyncio.all_tasks()) == tasks_before


async def test_waits_on_a_future_in_its_own_context() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    got: list[object] = []
    done = run_inline(waits(gate), lambda r, e: got.append((r, e)), loop)
    assert done is not None and got == []
    assert VAR.get() == "outside"  # the coroutine's variable did not leak
    gate.set_result(7)
    await done
    assert got == [("inside:7", None)]


async def test_exception_goes_to_on_done() -> None:
    got: list[tuple[object, BaseException | None]] = []
    assert run_inline(fails(), lambda r, e: got.append((r, e)),
                      asyncio.get_running_loop()) is None
    assert got[0][0] is None and isinstance(got[0][1], ValueError)


async def test_exception_after_waiting() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    got: list[tuple[object, BaseException | None]] = []
    done = run_inline(waits(gate), lambda r, e: got.append((r, e)), loop)
    gate.set_exception(OSError("disk gone"))
    assert done is not None
    await done
    assert isinstance(got[0][1], OSError)
    with pytest.raises(OSError):
        raise got[0][1]  # type: ignore[misc]
