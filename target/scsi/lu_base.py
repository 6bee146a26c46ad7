"""What every command family of a logical unit shares: its state (declared
here, set up by :class:`~target.scsi.lu.LogicalUnit`), the checks SPC-4
§5.14 and SBC-3 order (NOT READY, write protection, LBA range, transfer
length) and the small encoders the handlers use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

from iscsi.scsi.constants import (
    Opcode,
    Status,
)
from iscsi.scsi.sense import (
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED,
    MEDIUM_NOT_PRESENT,
    MEDIUM_NOT_PRESENT_TRAY_CLOSED,
    MEDIUM_NOT_PRESENT_TRAY_OPEN,
    SenseData,
    data_protect,
    illegal_request,
    invalid_field_in_cdb,
    not_ready,
)
from target.backends.base import Backend

from .modes import ModePages
from .opcodes import OpInfo
from .reservations import Reservations as _Reservations
from .types import Buffer, LUConfig, Nexus, ScsiResult

AscAscq: TypeAlias = tuple[int, int]
HandlerResult: TypeAlias = ScsiResult | Awaitable[ScsiResult]
Handler: TypeAlias = Callable[[Nexus, bytes, Buffer | None, int | None], HandlerResult]

_GOOD = 0
_CHECK = int(Status.CHECK_CONDITION)


#: Commands that neither report nor clear a unit attention (SPC-4 §5.14:
#: INQUIRY, REPORT LUNS, REQUEST SENSE; REQUEST SENSE returns it as data).
_UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})

#: Operation codes that modify the medium (MEDIUM ERROR → WRITE ERROR).
_WRITES = frozenset(
    {
        Opcode.WRITE_6,
        Opcode.WRITE_10,
        Opcode.WRITE_12,
        Opcode.WRITE_16,
        Opcode.WRITE_AND_VERIFY_10,
        Opcode.WRITE_AND_VERIFY_12,
        Opcode.WRITE_AND_VERIFY_16,
        Opcode.WRITE_SAME_10,
        Opcode.WRITE_SAME_16,
        Opcode.UNMAP,
        Opcode.COMPARE_AND_WRITE,
        Opcode.ORWRITE_16,
        Opcode.WRITE_ATOMIC_16,
        0x48,  # SANITIZE
    }
)


def _good(data: Buffer | None = None) -> ScsiResult:
    return ScsiResult(_GOOD, b"", data)


def _alloc(data: bytes, length: int) -> bytes:
    """Truncate parameter data to the ALLOCATION LENGTH (SPC-4 §4.2.5.6)."""
    return data if len(data) <= length else data[:length]


def first_difference(a: Buffer, b: Buffer) -> int:
    """Offset of the first differing byte of two equal-length buffers, or
    -1 when equal. Uses big-integer XOR (C speed) instead of a byte loop."""
    if a == b:
        return -1
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    if x == 0:
        return n
    return n - 1 - (x.bit_length() - 1) // 8




class UnitBase:
    """State and shared checks of a logical unit (SAM-5 §4.6.19)."""

    backend: Backend
    config: LUConfig
    lun: int
    target_name: str
    block_size: int
    _shift: int
    num_blocks: int
    modes: ModePages
    started: bool
    medium_present: bool
    tray_open: bool
    reservations: _Reservations
    xcopy: Any
    alua: Any
    _wce: bool
    _swp: bool
    _dsense: bool
    _prevent: set[str]
    _sa_handlers: dict[tuple[int, int], Handler]

    # Defined by LogicalUnit; declared here for the command-family mixins.
    def supported_ops(self) -> list[OpInfo]:
        """The commands REPORT SUPPORTED OPERATION CODES lists."""
        raise NotImplementedError

    def post_unit_attention(self, asc_ascq: AscAscq, initiator_ports: Iterable[str] | None = None,
                            *, exclude: Nexus | None = None) -> None:
        """Establish a unit attention for some or all nexuses."""
        raise NotImplementedError

    def _pop_ua(self, nexus: Nexus) -> AscAscq | None:
        raise NotImplementedError

    def _sync_mode_cache(self) -> None:
        raise NotImplementedError

    @property
    def write_protected(self) -> bool:
        """Writes refused (read-only LUN or software write protect)."""
        raise NotImplementedError

    @property
    def thin(self) -> bool:
        """Thin provisioned: unmapped blocks are reported and can be unmapped."""
        raise NotImplementedError

    def check_condition(self, sense: SenseData) -> ScsiResult:
        """CHECK CONDITION with sense in the format D_SENSE selects."""
        data = sense.encode_descriptor() if self._dsense else sense.encode_fixed()
        return ScsiResult(_CHECK, data, None)

    # ----- shared checks ----------------------------------------------------

    def _ready(self) -> None:
        """NOT READY for medium access when stopped or without medium."""
        if not self.medium_present:
            if self.tray_open:
                raise not_ready(MEDIUM_NOT_PRESENT_TRAY_OPEN)
            raise not_ready(MEDIUM_NOT_PRESENT_TRAY_CLOSED if self.config.removable else MEDIUM_NOT_PRESENT)
        if not self.started:
            raise not_ready(LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED)

    def _writable(self) -> None:
        if self.write_protected:
            raise data_protect()

    def _range(self, lba: int, n: int) -> None:
        if lba + n > self.num_blocks:
            raise illegal_request(LBA_OUT_OF_RANGE)

    def _max_transfer(self, n: int, field: int) -> None:
        limit = self.config.max_transfer_blocks
        if limit and n > limit:
            raise invalid_field_in_cdb(field)

    async def _flush_then(self, result: ScsiResult) -> ScsiResult:
        """Make writes durable (FUA / write-through / SYNCHRONIZE CACHE)
        in a worker thread, then complete."""
        await asyncio.to_thread(self.backend.flush)
        return result

