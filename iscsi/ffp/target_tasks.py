"""What the target's full-feature engine hands its owner: the tasks it
keeps (one per SCSI command in flight), the events it returns, the
negotiated parameters it runs on, and the server-wide write budget."""

from __future__ import annotations

from dataclasses import dataclass

from ..keys import NegotiatedParams
from ..pdu import ScsiCommand, decode_lun

#: Default budget for all sessions' write data in flight.
DEFAULT_WRITE_BUDGET = 256 << 20


class WriteBudget:
    """Bytes of write data all sessions may hold in flight at once."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = DEFAULT_WRITE_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit; False otherwise."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes."""
        self.used = max(0, self.used - n)


@dataclass(frozen=True)
class TargetParams:
    """What the engine needs of the negotiated parameters (RFC 7143 §13)."""

    max_xmit: int = 8192           # the initiator's MaxRecvDataSegmentLength
    max_burst: int = 262144
    first_burst: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    header_digest: bool = False
    data_digest: bool = False
    #: The negotiated ErrorRecoveryLevel (§13.20); 1 turns on SNACK, data
    #: retention and recovery R2Ts (§7.1.5); 2 also keeps a failed
    #: connection's tasks for reassignment (connection recovery, §7.2.2).
    error_recovery_level: int = 0

    @classmethod
    def from_negotiated(cls, params: NegotiatedParams) -> TargetParams:
        """The engine's view of a completed login's parameters."""
        return cls(
            max_xmit=params.max_xmit_data_segment_length, max_burst=params.max_burst_length,
            first_burst=params.first_burst_length, initial_r2t=params.initial_r2t,
            immediate_data=params.immediate_data,
            max_outstanding_r2t=params.max_outstanding_r2t,
            header_digest=bool(params.header_digest), data_digest=bool(params.data_digest),
            error_recovery_level=params.error_recovery_level)


class Task:
    """A SCSI command in flight on this connection."""

    __slots__ = ("itt", "lun", "cmd", "edtl", "buf", "reserved", "received",
                 "unsolicited_end", "next_r2t_offset", "r2ts", "r2tsn", "aborted",
                 "immediate", "executing", "unsol_next", "waiter", "holes", "unsol_closed",
                 "retained", "result", "home", "acked_datasn")

    def __init__(self, cmd: ScsiCommand) -> None:
        self.itt = cmd.itt
        self.lun = decode_lun(cmd.lun)
        self.cmd = cmd
        self.edtl = cmd.expected_data_transfer_length
        #: Write buffer, allocated when the first data arrives.
        self.buf: bytearray | None = None
        #: Bytes of the write budget this task holds.
        self.reserved = 0
        self.received = 0
        self.unsolicited_end = 0
        self.next_r2t_offset = 0
        #: ttt -> [buffer offset, length, next expected offset, next DataSN, R2TSN]
        self.r2ts: dict[int, list[int]] = {}
        self.r2tsn = 0
        self.aborted = False
        self.immediate = cmd.immediate
        self.executing = False
        #: (next offset, next DataSN) of the unsolicited Data-Out sequence.
        self.unsol_next = (0, 0)
        #: The owner's handle (e.g. a future a TMF waits on).
        self.waiter: object | None = None
        #: ERL 1: byte ranges of the write not received yet (sorted).
        self.holes: list[list[int]] | None = None
        #: ERL 1: the unsolicited sequence ended (its holes asked for).
        self.unsol_closed = False
        #: ERL 2: its connection failed; it waits for TASK REASSIGN (§7.2.2).
        self.retained = False
        #: ERL 2: (status, sense, data, overflow, underflow) kept for resending.
        self.result: tuple[int, bytes, object, int, int] | None = None
        #: The owner's connection that now answers it (after reassignment).
        self.home: object | None = None
        #: A read's data acknowledgment reference number: the DataSN below
        #: which the initiator acknowledged every Data-In with a DataACK
        #: SNACK (§11.16.1); TASK REASSIGN resumes there when the initiator
        #: sends ExpDataSN 0 ("unchanged", §11.5.6).
        self.acked_datasn = 0

    def data_out(self) -> memoryview:
        """The write data received (empty for a command without any)."""
        return memoryview(self.buf) if self.buf is not None else memoryview(b"")


# ------------------------------------------------------------------ events
@dataclass(slots=True)
class ExecuteCommand:
    """Run this SCSI command; answer with ``command_done``."""

    task: Task


@dataclass(slots=True)
class ManageTasks:
    """A Task Management Function for the owner to carry out across the
    session's (or target's) tasks; answer with ``tmf_done``."""

    itt: int
    function: int
    lun: int
    referenced_task_tag: int
    #: RefCmdSN and the TMF's own CmdSN (ABORT TASK of a task not yet
    #: received, RFC 7143 §11.5.1).
    refcmdsn: int = 0
    cmdsn: int = 0
    #: TASK REASSIGN: the DataSN to resend a read's Data-In from, 0 for
    #: "the data acknowledgment reference number, unchanged" (§11.5.6).
    expdatasn: int = 0


@dataclass(slots=True)
class TextRequested:
    """A complete Text Request (continuations joined, keys decoded);
    answer with ``text_answer``."""

    itt: int
    pairs: list[tuple[str, str]]


@dataclass(slots=True)
class LogoutRequested:
    """A Logout Request reached its turn; answer with ``logout_answer``."""

    itt: int
    reason: int
    cid: int


@dataclass(slots=True)
class CloseConnection:
    """The connection must end (``abort``: at once, without a goodbye)."""

    reason: str
    abort: bool = True


Event = ExecuteCommand | ManageTasks | TextRequested | LogoutRequested | CloseConnection
