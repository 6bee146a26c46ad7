"""ErrorRecoveryLevel 2 on the target side (RFC 7143 §7.2.2, §11.5.1): a
failed connection's tasks stay allegiant to the session for TASK REASSIGN
until Time2Retain, and status the initiator never acknowledged is sent
again on the connection that adopts them.

:class:`Erl2Target` is a mixin of :class:`~.target.TargetConnectionEngine`.
It keeps whole tasks by ITT (``_unacked``) because a reassigned task is
rebuilt from its result; ERL 1's :mod:`.target_recovery` keeps encoded PDUs
by StatSN instead, because a Status SNACK names sequence numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pdu import Buffer
from ..serial import sn_lt
from .common import Deadlines
from .common import segments
from .target_tasks import TargetParams, Task
from .window import CmdSNWindow


class Erl2Target:
    """Task reassignment state of a target connection."""

    params: TargetParams
    closed: bool
    window: CmdSNWindow
    tasks: dict[int, Task]
    #: ITT -> (StatSN, task) of status sent and not yet acknowledged.
    _unacked: dict[int, tuple[int, Task]]
    _ttt_map: dict[int, Task]
    _timers: Deadlines

    if TYPE_CHECKING:  # provided by the engine
        def _forget_r2ts(self, task: Task) -> None: ...
        def _issue_r2ts(self, task: Task) -> None: ...
        def _release_task(self, task: Task) -> bool: ...
        def _send_status(self, task: Task, status: int, sense: Buffer, data: Buffer | None,
                         overflow: int, underflow: int,
                         resume: tuple[int, int] = (0, 0)) -> None: ...

    def _acknowledged(self, expstatsn: int) -> None:
        """ExpStatSN says the initiator has every status below it."""
        done = [itt for itt, (sn, _) in self._unacked.items() if sn_lt(sn, expstatsn)]
        for itt in done:
            self._unacked.pop(itt)[1].result = None

    def detach(self) -> list[Task]:
        """The connection failed or was removed for recovery at
        ErrorRecoveryLevel 2 (§7.2.2): its tasks are not ended but kept for
        TASK REASSIGN -- those still running or waiting for data, and those
        whose status was not acknowledged. Commands held for their CmdSN
        turn are discarded (§11.14.1: not yet acknowledged). Returns them."""
        self.closed = True
        self.window.discard(self)
        kept = list(self.tasks.values()) + [t for _, t in self._unacked.values()
                                            if t.itt not in self.tasks]
        self._unacked.clear()
        for task in kept:
            task.retained = True
            self._forget_r2ts(task)
        self._ttt_map.clear()
        self._timers = Deadlines()
        return kept

    def adopt(self, task: Task, old: Erl2Target, expdatasn: int = 0) -> None:
        """TASK REASSIGN moved ``task`` here from ``old`` (§11.5.1): it
        carries on on this connection. A write still waiting for data asks
        for all of it again with R2Ts (sequence numbers start afresh); a
        finished task sends its Data-In again from the TMF's ``expdatasn``
        (0: from the data acknowledgment reference number, §11.5.6) and its
        status; a running one answers here when it completes."""
        task.retained = False
        if old.tasks.get(task.itt) is task:
            del old.tasks[task.itt]
            self.tasks[task.itt] = task
            if not task.executing and task.reserved:
                task.received = 0
                task.unsol_next = (0, 0)
                task.unsolicited_end = task.next_r2t_offset = 0
                task.r2tsn = 0
                self._issue_r2ts(task)
            return
        if task.result is not None and not self.closed:
            status, sense, data, overflow, underflow = task.result
            resume = _resume_point(task, old.params, data, expdatasn or task.acked_datasn)
            self._send_status(task, status, sense, data,  # type: ignore[arg-type]
                              overflow, underflow, resume)

    def drop_retained(self, task: Task) -> None:
        """Time2Retain passed without TASK REASSIGN: the task ends (its
        window slot and write budget return)."""
        task.aborted = True
        task.retained = False
        task.result = None
        self._release_task(task)

    def _drop(self, task: Task) -> None:
        self._forget_r2ts(task)
        self._release_task(task)


def _resume_point(task: Task, old: TargetParams, data: object, first: int) -> tuple[int, int]:
    """(DataSN, offset) of Data-In number ``first`` as the failed connection
    cut the read (its MaxRecvDataSegmentLength and MaxBurstLength), where a
    TASK REASSIGN resumes: DataSN and offsets continue where the initiator's
    acknowledged data ends (§11.5.6). Past the last PDU: nothing to resend."""
    if not first or not isinstance(data, (bytes, bytearray, memoryview)):
        return (0, 0)
    total = min(len(data) if not isinstance(data, memoryview) else data.nbytes, task.edtl)
    for datasn, (offset, _, _) in enumerate(segments(0, total, old.max_xmit, old.max_burst)):
        if datasn == first:
            return (first, offset)
    return (first, total)

