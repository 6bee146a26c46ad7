"""Run a coroutine without an ``asyncio.Task`` when it can finish at once.

Most SCSI commands complete without ever waiting: a read from an mmap view,
a write into the page cache, INQUIRY. Wrapping each in a Task costs a Task
object, a scheduled first step, a done-callback and a context copy -- about
a fifth of the target's CPU per 4 KiB I/O (DESIGN.md). :func:`run_inline`
steps the coroutine right away in its own context; only when it really
waits on a future does it keep stepping from that future's callback, like a
Task would. The result (or exception) goes to ``on_done`` exactly once.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: on_done(result, exception): exactly one of them is meaningful.
Done = Callable[[T | None, BaseException | None], None]


def run_inline(coro: Coroutine[Any, Any, T], on_done: Done[T],
               loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
    """Start ``coro`` now. Returns None when it already finished (``on_done``
    has been called), else a future that completes after ``on_done`` (the
    caller may keep it to wait for in-flight work on shutdown)."""
    # Each command runs in its own copy of the context, as a Task would, so
    # a context variable it sets (the initiator's scope) never leaks into
    # the protocol callbacks that run while it waits.
    ctx = contextvars.copy_context()
    # Common case first: the coroutine finishes in its first step.
    try:
        yielded = ctx.run(coro.send, None)
    except StopIteration as stop:
        on_done(stop.value, None)
        return None
    except BaseException as exc:  # reported to on_done, never lost
        on_done(None, exc)
        return None
    waiter: asyncio.Future[None] = loop.create_future()

    def finish(result: T | None, exc: BaseException | None) -> None:
        on_done(result, exc)
        if not waiter.done():
            waiter.set_result(None)

    def step(_: object = None) -> None:
        try:
            yielded = ctx.run(coro.send, None)
        except StopIteration as stop:
            finish(stop.value, None)
            return
        except BaseException as exc:  # reported to on_done, never lost
            finish(None, exc)
            return
        wait(yielded)

    def wait(yielded: Any) -> None:
        if yielded is None:
            # A bare yield (asyncio.sleep(0)): run again on the next turn.
            loop.call_soon(step)
        elif getattr(yielded, "_asyncio_future_blocking", None):
            # Awaiting a future: resume when it is done (what Task does).
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(step)
        else:
            coro.close()
            finish(None, RuntimeError(f"coroutine yielded {yielded!r}, not a future"))

    wait(yielded)
    return waiter
