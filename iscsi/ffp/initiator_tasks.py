"""What the initiator's full-feature engine works on and hands its owner:
the negotiated parameters it runs on, the commands it carries (one
:class:`Command` per SCSI command, kept by the owner across session
recovery) and the events it returns."""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import RESERVED_TAG
from ..pdu import encode_lun


@dataclass(frozen=True)
class InitiatorParams:
    """What the engine needs of the negotiated parameters (RFC 7143 §13)."""

    #: The target's MaxRecvDataSegmentLength: our Data-Out/immediate data cap.
    max_xmit: int = 8192
    max_burst: int = 262144
    first_burst: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    header_digest: bool = False
    data_digest: bool = False
    #: The negotiated ErrorRecoveryLevel (§13.20): at 1 lost or corrupt
    #: Data-In, R2Ts and status are asked for again with SNACK (§7.1.5).
    error_recovery_level: int = 0


class Command:
    """One SCSI command from submission to its end.

    The owner creates it (``handle`` is the owner's, e.g. a future) and
    may hand it to a later engine after session recovery (RFC 7143
    §7.1.4.3); the engine resets the per-issue fields when it sends it.
    ``data_out`` is sent as views, never copied; Data-In lands straight
    in ``data_in`` through :meth:`InitiatorEngine.placement`.
    """

    __slots__ = ("handle", "lun", "lun_field", "cdb", "attr", "data_out", "data_in", "in_len",
                 "edtl", "seq", "internal", "itt", "cmdsn", "sent", "received", "next_datasn",
                 "r2t_next", "next_r2tsn", "solicited_sent", "attempts", "violation",
                 "deadline", "timed_out", "aborting", "failure", "missing", "ack_ttt",
                 "held")

    def __init__(self, lun: int, cdb: bytes, *, data_out: memoryview | None = None,
                 data_in: memoryview | None = None, attr: int = 1, seq: int = 0,
                 internal: bool = False, handle: object = None) -> None:
        self.handle = handle
        self.lun = lun
        #: The 8-byte LUN field (SAM-5 §4.7), encoded once.
        self.lun_field = encode_lun(lun)
        self.cdb = cdb
        self.attr = attr
        self.data_out = data_out
        self.data_in = data_in
        self.in_len = data_in.nbytes if data_in is not None else 0
        self.edtl = data_out.nbytes if data_out is not None else self.in_len
        #: Submission order (reissue after recovery keeps it, §7.1.4.3).
        self.seq = seq
        #: Commands the owner runs for itself (TEST UNIT READY after recovery).
        self.internal = internal
        self.itt = RESERVED_TAG
        self.cmdsn = 0
        self.sent = False
        #: Data-In bytes received in order (DataPDUInOrder=Yes, §13.19).
        self.received = 0
        self.next_datasn = 0
        #: Where the next R2T must start (DataSequenceInOrder=Yes, §13.20).
        self.r2t_next = 0
        self.next_r2tsn = 0
        #: Write bytes sent: immediate + unsolicited + solicited.
        self.solicited_sent = 0
        #: Times the command was sent (bounded by the owner's retry policy).
        self.attempts = 0
        #: The last target protocol violation met by this command.
        self.violation: str | None = None
        #: Absolute time (the caller's clock) by which it must have ended.
        self.deadline: float | None = None
        self.timed_out = False
        self.aborting = False
        #: An iSCSI-level failure reported with the status (§11.4.3).
        self.failure: str | None = None
        #: ERL 1: DataSNs asked for again (SNACK) and not yet received.
        self.missing: set[int] = set()
        #: ERL 1: TTT of an A-bit Data-In awaiting our DataACK.
        self.ack_ttt: int | None = None
        #: ERL 1: the status, held until no Data-In is missing
        #: (status, sense, residual, underflow, overflow).
        self.held: tuple[int, bytes, int, bool, bool] | None = None

    def reset(self) -> None:
        """Forget a previous issue's transfer state (before a reissue)."""
        self.itt = RESERVED_TAG
        self.sent = False
        self.received = 0
        self.next_datasn = 0
        self.r2t_next = 0
        self.next_r2tsn = 0
        self.solicited_sent = 0
        self.aborting = False
        self.failure = None
        self.missing = set()
        self.ack_ttt = None
        self.held = None


# ------------------------------------------------------------------ events
@dataclass(slots=True)
class CommandCompleted:
    """The target returned a status for ``command`` (any status: checking
    it is the caller's business). ``received`` is the Data-In actually
    transferred; residuals as in §11.4.5."""

    command: Command
    status: int
    sense: bytes
    residual: int
    underflow: bool
    overflow: bool
    received: int


@dataclass(slots=True)
class CommandFailed:
    """``command`` ended without a usable status.

    ``kind`` says why: ``"timeout"`` (no status within the command timeout;
    the task was aborted), ``"short"`` (GOOD status but less data than
    the residual accounts for), ``"rejected"`` (Reject, §7.4.1),
    ``"target"`` (iSCSI response other than Command Completed),
    ``"reset"`` (ended by a LOGICAL UNIT RESET we sent; the owner may
    retry it) or ``"aborted"`` (by a TMF the owner sent).
    """

    command: Command
    kind: str
    reason: str


@dataclass(slots=True)
class PingAnswered:
    """The NOP-In answering our NOP-Out ``itt`` (§11.19)."""

    itt: int
    data: bytes


@dataclass(slots=True)
class TaskManagementDone:
    """The Task Management Function Response for ``itt`` (§11.6)."""

    itt: int
    function: int
    response: int


@dataclass(slots=True)
class TextDone:
    """A Text exchange ended (continuations joined, §11.11)."""

    itt: int
    pairs: list[tuple[str, str]]


@dataclass(slots=True)
class LogoutDone:
    """The Logout Response for ``itt`` (§11.15)."""

    itt: int
    response: int
    time2wait: int
    time2retain: int


@dataclass(slots=True)
class ExchangeFailed:
    """A NOP, TMF, Text or Logout exchange ``itt`` failed (rejected, or
    malformed answer)."""

    itt: int
    reason: str


@dataclass(slots=True)
class AsyncNotice:
    """An Asynchronous Message (§11.9): the owner decides what to do
    (SCSI event: tell the caller; logout request: log out; drop: recover
    after ``parameter2`` seconds, Time2Wait)."""

    event: int
    lun: int
    sense: bytes
    parameter1: int
    parameter2: int
    parameter3: int


@dataclass(slots=True)
class ConnectionFailed:
    """The connection cannot go on (NOP timeout, target protocol violation
    at ErrorRecoveryLevel 0, failed task management): drop it and recover
    the session (§7.1.4.3)."""

    reason: str
    violation: bool = False


Event = (CommandCompleted | CommandFailed | PingAnswered | TaskManagementDone | TextDone
         | LogoutDone | ExchangeFailed | AsyncNotice | ConnectionFailed)
