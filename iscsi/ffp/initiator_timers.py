"""Time in the initiator's full-feature phase: NOP keepalive and its
timeout (§11.18, §11.19), per-command timeouts and their escalation ABORT
TASK -> LOGICAL UNIT RESET -> session recovery (the order Linux's SCSI error
handler uses, §11.5.1).

:class:`InitiatorTimers` is a mixin of :class:`~.initiator.InitiatorEngine`;
time enters only as ``now``.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING

from ..constants import RESERVED_TAG, TMFunction
from ..pdu import NopOut
from ..serial import TagAllocator
from .common import Deadlines, Outbox
from .initiator_control import Control
from .initiator_erl import Erl1
from .initiator_tasks import Command, CommandFailed, ConnectionFailed, Event


class InitiatorTimers:
    """The timer half of the initiator engine."""

    closed: bool
    tasks: dict[int, Command]
    urgent: deque[Command]
    queue: deque[Command]
    events: list[Event]
    outbox: Outbox
    tags: TagAllocator
    control: Control
    recovery: Erl1
    erl: int
    exp_statsn: int
    command_timeout: float | None
    tmf_timeout: float
    nop_interval: float | None
    nop_timeout: float
    _timers: Deadlines
    _cmd_deadlines: list[tuple[float, int, Command]]
    _now: float
    _last_rx: float
    _keepalive: tuple[int, float] | None
    _exchanges: dict[int, tuple[str, int, Command | None]]

    if TYPE_CHECKING:  # provided by the engine
        @property
        def cmdsn(self) -> int: ...
        def _pump(self, now: float) -> None: ...
        def take_events(self) -> list[Event]: ...
        def _exchange(self, kind: str, function: int = 0, cmd: Command | None = None) -> int: ...

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None."""
        if self.closed:
            return None
        heap = self._cmd_deadlines
        while heap and not self._live(heap[0][2]):
            heapq.heappop(heap)
        t = self._timers.next()
        if heap and (t is None or heap[0][0] < t):
            t = heap[0][0]
        return t

    def _live(self, cmd: Command) -> bool:
        """A command whose deadline still matters: in flight here, or
        queued here (an unsent command in this heap is in this engine's
        queue until it times out or the engine closes), and not already
        being aborted."""
        if cmd.aborting or cmd.timed_out:
            return False
        return not cmd.sent or self.tasks.get(cmd.itt) is cmd

    def handle_timer(self, now: float) -> list[Event]:
        """Run whatever is due at ``now``."""
        if self.closed:
            return []
        self._now = now
        heap = self._cmd_deadlines
        while heap and heap[0][0] <= now:
            cmd = heapq.heappop(heap)[2]
            if self._live(cmd):
                self._command_timeout(cmd, now)
        for name in self._timers.expired(now):
            if name == "nop":
                self._nop_due(now)
            elif name.startswith("tmf"):
                self._tmf_silent(int(name[3:]), now)
        self._pump(now)
        return self.take_events()

    def _command_timeout(self, cmd: Command, now: float) -> None:
        cmd.timed_out = True
        if not cmd.sent:
            # Never sent (the window stayed closed): nothing to abort.
            for q in (self.queue, self.urgent):
                if cmd in q:
                    q.remove(cmd)
            self.events.append(CommandFailed(cmd, "timeout", (
                f"CDB 0x{cmd.cdb[0]:02x} not sent within the command timeout of "
                f"{self.command_timeout:g} s (the target's command window stayed closed)")))
            return
        # ABORT TASK first (§11.5.1), escalating on refusal or silence.
        cmd.aborting = True
        itt = self.control.tmf("abort", TMFunction.ABORT_TASK, cmd.lun, cmd.itt, cmd)
        self._timers.set(f"tmf{itt}", now + self.tmf_timeout)

    def _tmf_silent(self, itt: int, now: float) -> None:
        """No answer to the escalation's TMF: an unanswered ABORT TASK
        escalates to LOGICAL UNIT RESET, an unanswered reset to session
        recovery (Linux: eh_abort, eh_device_reset, then the transport's
        session recovery)."""
        ex = self._exchanges.pop(itt, None)
        self.tags.discard(itt)
        cmd = ex[2] if ex is not None else None
        if ex is not None and ex[0] == "abort" and cmd is not None:
            reset = self.control.tmf("reset", TMFunction.LOGICAL_UNIT_RESET, cmd.lun,
                                     RESERVED_TAG, cmd)
            self._timers.set(f"tmf{reset}", now + self.tmf_timeout)
            return
        self.events.append(ConnectionFailed(
            "no answer to task management after a command timeout"))

    def _nop_due(self, now: float) -> None:
        interval = self.nop_interval
        assert interval
        if self._keepalive is not None:
            itt, sent_at = self._keepalive
            if self._last_rx <= sent_at:
                self.events.append(ConnectionFailed(
                    f"no NOP-In within {self.nop_timeout:g} s"))
                return
            # Traffic arrived (the target is alive) though not the answer.
            self._keepalive = None
        idle = now - self._last_rx
        if idle >= interval:
            itt = self._exchange("keepalive")
            self._keepalive = (itt, now)
            self.outbox.add(NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=self.cmdsn,
                                   expstatsn=self.exp_statsn, immediate=True))
            if self.erl:
                self.recovery.pinged(itt)
            self._timers.set("nop", now + self.nop_timeout)
        else:
            self._timers.set("nop", self._last_rx + interval)
