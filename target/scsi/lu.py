"""A logical unit: SPC-4 / SBC-3 command emulation over a disk backend.

``LogicalUnit.execute`` takes a CDB and the Data-Out buffer and returns a
:class:`ScsiResult`. Handlers are synchronous and return the result
directly, except where a flush (FUA, write-through, SYNCHRONIZE CACHE) must
run in a thread: then they return a coroutine that ``execute`` awaits.
Because backend ``read``/``write`` are synchronous, every handler's
check-then-act sequence (notably COMPARE AND WRITE) runs without yielding
to the event loop, which makes it atomic with respect to other commands.

Order of checks, as SAM-5 §5.14 / SPC-4 §5.14 lay them out: CDB validity
of the operation code, unit attention, reservation conflict, then the
command's own field checks, readiness (NOT READY), write protection,
LBA range.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from iscsi.scsi.cdb_common import CDBError, check_control
from iscsi.scsi.constants import (
    MaintenanceIn,
    ModePage,
    Opcode,
    SenseKey,
    ServiceActionIn16,
    Status,
)
from iscsi.scsi.pr import (
    parse_persistent_reserve_out,
)
from iscsi.scsi.rw import RW_OPCODES, parse_rw
from iscsi.scsi.sbc import parse_unmap
from iscsi.scsi.spc import (
    parse_extended_copy,
    parse_mode_select,
)
from iscsi.scsi.sense import (
    INSUFFICIENT_RESOURCES,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    POWER_ON_RESET,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    CheckCondition,
    SenseData,
    illegal_request,
)
from target.backends.base import Backend, BackendError, BackendUnavailable, OutOfResources

from .lu_base import (
    _UA_EXEMPT,
    _WRITES,
    AscAscq,
    Handler,
)
from .lu_block import BlockCommands
from .lu_spc import SpcCommands
from .sanitize import ALLOWED_WHILE_SANITIZING, SanitizeCommands
from .sanitize import OPCODE as _SANITIZE
from .modes import ModePages, disk_pages
from .opcodes import (
    ALUA_OPS,
    DISK_OPS,
    RESERVATION_OPS,
    XCOPY_OPS,
    OpInfo,
)
from .reservations import ReservationConflict
from .reservations import Reservations as _Reservations
from .types import SIMPLE, Buffer, LUConfig, Nexus, ScsiResult


log = logging.getLogger("aioiscsi.target")

#: READ(6/10/12/16): the one READ/WRITE family that carries no Data-Out.
_READ_OPS = frozenset({Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16})


class LogicalUnit(BlockCommands, SpcCommands, SanitizeCommands):
    """One logical unit (SAM-5 §4.6.19) backed by a :class:`Backend`.

    The owner (``ScsiTarget``) calls :meth:`bind` to give it its LUN and
    target name, :meth:`add_nexus` for each new I_T nexus, and the task
    management hooks.
    """

    #: Commands that never report (nor clear) a pending unit attention
    #: (SPC-4 §5.14).
    ua_exempt: frozenset[int] = _UA_EXEMPT

    #: Commands this kind of unit serves (REPORT SUPPORTED OPERATION CODES).
    BASE_OPS: tuple[OpInfo, ...] = DISK_OPS

    def __init__(self, backend: Backend, config: LUConfig | None = None) -> None:
        self.backend = backend
        self.config = config if config is not None else LUConfig()
        if self.config.max_transfer_blocks <= 0:
            self.config.max_transfer_blocks = max(1, self.config.max_transfer_bytes // self.config.block_size)
        self.lun = 0
        self.target_name = ""
        bs = self.config.block_size
        self.block_size = bs
        self._shift = bs.bit_length() - 1
        self.num_blocks = backend.size >> self._shift
        self.modes = self._make_modes()
        self._ua: dict[str, list[AscAscq]] = {}
        self._known: dict[str, Nexus] = {}
        self._prevent: set[str] = set()
        self.started = True
        self.medium_present = True
        self.tray_open = False
        path = None
        if self.config.state_dir:
            path = os.path.join(self.config.state_dir, f"pr-lun{self.lun}.json")
        self.reservations = _Reservations(path)
        self.xcopy: Any = None
        self.alua: Any = None
        self._wce = True
        self._swp = False
        self._dsense = False
        self._sync_mode_cache()
        self._handlers: dict[int, Handler] = {}
        self._sa_handlers: dict[tuple[int, int], Handler] = {}
        self._last_io_log = -1e9
        self._io_errors_unlogged = 0
        # A backend that waits on the network (NBD) must not stall the event
        # loop: its data commands run in one worker thread per LU. One
        # thread, so they still run one at a time and COMPARE AND WRITE stays
        # atomic (module docstring); the loop keeps serving other LUNs.
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="lu-io")
                        if backend.slow_io else None)
        self._install_handlers()

    # ----- configuration -------------------------------------------------

    def _make_modes(self) -> ModePages:
        return ModePages(disk_pages(write_cache=not self.config.write_through))

    def bind(self, target_name: str, lun: int) -> None:
        """Attach to a target: derive stable identifiers (NAA, serial) and
        the APTPL state file name from the target name and LUN."""
        self.lun = lun
        self.target_name = target_name
        self.config.resolve(target_name, lun)
        if self.config.state_dir:
            self.reservations = _Reservations(os.path.join(self.config.state_dir, f"pr-lun{lun}.json"))

    @property
    def thin(self) -> bool:
        """Logical block provisioning management enabled (SBC-3 LBPME)."""
        return self.config.thin if self.config.thin is not None else self.backend.thin

    @property
    def write_protected(self) -> bool:
        """Configured read-only, backend read-only, or SWP set in the
        control mode page (SPC-4 §7.5.8)."""
        return self.config.read_only or self.backend.read_only or self._swp

    def supported_ops(self) -> list[OpInfo]:
        """The commands REPORT SUPPORTED OPERATION CODES lists."""
        ops = [op for op in self.BASE_OPS if op.opcode != Opcode.UNMAP or self.thin]
        if self.BASE_OPS is DISK_OPS:
            # SANITIZE's service actions (sanitize.py): IMMED, the service
            # action and the PARAMETER LIST LENGTH are looked at.
            ops += [OpInfo(_SANITIZE, sa, bytes((_SANITIZE, 0x80 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)))
                    for sa in self.sanitize_actions()]
        if self.reservations is not None:
            ops += RESERVATION_OPS
        if self.xcopy is not None:
            ops += XCOPY_OPS
        if self.alua is not None:
            ops += ALUA_OPS
        return sorted(ops, key=lambda o: (o.opcode, o.sa or 0))

    def _install_handlers(self) -> None:
        h = self._handlers
        h[Opcode.TEST_UNIT_READY] = self._test_unit_ready
        h[Opcode.REQUEST_SENSE] = self._request_sense
        for op in (Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16):
            h[op] = self._read
        for op in (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16):
            h[op] = self._write
        h[Opcode.INQUIRY] = self._inquiry
        h[Opcode.MODE_SELECT_6] = self._mode_select
        h[Opcode.MODE_SENSE_6] = self._mode_sense
        h[Opcode.START_STOP_UNIT] = self._start_stop
        h[Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL] = self._prevent_allow
        h[Opcode.READ_CAPACITY_10] = self._read_capacity10
        h[Opcode.WRITE_AND_VERIFY_10] = self._write_verify
        h[Opcode.VERIFY_10] = self._verify
        h[Opcode.PRE_FETCH_10] = self._prefetch
        h[Opcode.SYNCHRONIZE_CACHE_10] = self._sync_cache
        h[Opcode.READ_DEFECT_DATA_10] = self._read_defect10
        h[Opcode.WRITE_SAME_10] = self._write_same
        h[Opcode.UNMAP] = self._unmap
        h[Opcode.MODE_SELECT_10] = self._mode_select
        h[Opcode.MODE_SENSE_10] = self._mode_sense
        h[Opcode.COMPARE_AND_WRITE] = self._compare_and_write
        h[Opcode.ORWRITE_16] = self._orwrite
        h[Opcode.WRITE_ATOMIC_16] = self._write_atomic
        h[_SANITIZE] = self._sanitize
        h[Opcode.WRITE_AND_VERIFY_16] = self._write_verify
        h[Opcode.VERIFY_16] = self._verify
        h[Opcode.PRE_FETCH_16] = self._prefetch
        h[Opcode.SYNCHRONIZE_CACHE_16] = self._sync_cache
        h[Opcode.WRITE_SAME_16] = self._write_same
        h[Opcode.SERVICE_ACTION_IN_16] = self._by_service_action
        h[Opcode.MAINTENANCE_IN] = self._by_service_action
        h[Opcode.WRITE_AND_VERIFY_12] = self._write_verify
        h[Opcode.VERIFY_12] = self._verify
        h[Opcode.READ_DEFECT_DATA_12] = self._read_defect12
        for op in (Opcode.RESERVE_6, Opcode.RELEASE_6, Opcode.RESERVE_10, Opcode.RELEASE_10):
            h[op] = self._reserve_release
        h[Opcode.PERSISTENT_RESERVE_IN] = self._pr_in
        h[Opcode.PERSISTENT_RESERVE_OUT] = self._pr_out
        h[Opcode.EXTENDED_COPY] = self._extended_copy
        h[Opcode.RECEIVE_COPY_RESULTS] = self._receive_copy_results
        sa = self._sa_handlers
        sa[Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16] = self._read_capacity16
        sa[Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS] = self._get_lba_status
        sa[Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES] = self._report_opcodes
        sa[Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS] = (
            self._report_tmfs)
        sa[Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_TARGET_PORT_GROUPS] = self._report_tpgs

    def _sync_mode_cache(self) -> None:
        """Mirror the mode bits the data path consults into attributes."""
        self._wce = self.modes.bit(ModePage.CACHING, 2, 0x04)
        self._swp = self.modes.bit(ModePage.CONTROL, 4, 0x08)
        self._dsense = self.modes.bit(ModePage.CONTROL, 2, 0x04)

    # ----- unit attentions and nexus bookkeeping ---------------------------

    def add_nexus(self, nexus: Nexus) -> None:
        """A new I_T nexus: it starts with POWER ON, RESET, OR BUS DEVICE
        RESET OCCURRED pending (SAM-5 §6.2)."""
        self._known[nexus.key] = nexus
        self._ua[nexus.key] = [POWER_ON_RESET]
        if self.reservations is not None:
            self.reservations.note_nexus(nexus)

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss (SAM-5 §6.3.4): drop its state; SPC-2
        reservations and PREVENT held through it are released."""
        self._known.pop(nexus.key, None)
        self._ua.pop(nexus.key, None)
        self._prevent.discard(nexus.key)
        if self.reservations is not None:
            self.reservations.nexus_lost(nexus)

    def post_unit_attention(
        self,
        asc_ascq: AscAscq,
        initiator_ports: Iterable[str] | None = None,
        *,
        exclude: Nexus | None = None,
    ) -> None:
        """Establish a unit attention for the nexuses whose initiator port
        is in ``initiator_ports`` (None: every known nexus but ``exclude``).
        A condition already pending for a nexus is not queued twice."""
        ports = None if initiator_ports is None else frozenset(initiator_ports)
        for key, nx in self._known.items():
            if ports is None:
                if exclude is not None and key == exclude.key:
                    continue
            elif nx.initiator_port not in ports:
                continue
            pending = self._ua.setdefault(key, [])
            if asc_ascq not in pending:
                pending.append(asc_ascq)

    def _pop_ua(self, nexus: Nexus) -> AscAscq | None:
        pending = self._ua.get(nexus.key)
        if not pending:
            return None
        ua = pending.pop(0)
        if not pending:
            del self._ua[nexus.key]
        return ua

    def pending_unit_attentions(self, nexus: Nexus) -> list[AscAscq]:
        """The unit attentions queued for ``nexus`` (for tests/diagnostics)."""
        return list(self._ua.get(nexus.key, ()))

    def refresh_capacity(self) -> bool:
        """Re-read the backend size; on change post CAPACITY DATA HAS
        CHANGED to every nexus (SBC-3 §4.10). Returns True on change."""
        n = self.backend.size >> self._shift
        if n == self.num_blocks:
            return False
        self.num_blocks = n
        self.post_unit_attention((0x2A, 0x09))
        return True

    # ----- task management -------------------------------------------------

    def abort_task_set(self, nexus: Nexus) -> None:
        """ABORT TASK SET: commands run to completion inline; nothing queued."""

    def clear_task_set(self, nexus: Nexus) -> None:
        """CLEAR TASK SET: as ABORT TASK SET for this implementation."""

    def clear_aca(self, nexus: Nexus) -> None:
        """CLEAR ACA: NACA is not supported, so no ACA condition exists."""

    def reset(self, asc_ascq: AscAscq = (0x29, 0x03)) -> None:
        """LOGICAL UNIT RESET (SAM-5 §6.3.3): release SPC-2 reservations
        and PREVENT, revert mode pages to saved, and post a reset UA to all
        nexuses."""
        self._prevent.clear()
        self.started = True
        self.modes.reset_to_saved()
        self._sync_mode_cache()
        if self.reservations is not None:
            self.reservations.lu_reset()
        for key in self._known:
            self._ua[key] = [asc_ascq]

    # ----- the entry point -------------------------------------------------

    async def execute(
        self,
        nexus: Nexus,
        cdb: bytes,
        data_out: Buffer | None = None,
        attr: int = SIMPLE,
        *,
        expected_length: int | None = None,
    ) -> ScsiResult:
        """Run one command and return its status, sense and Data-In.

        ``expected_length`` is the transport's expected data transfer length
        when known: commands whose Data-Out size is fixed by the CDB
        (WRITE SAME, COMPARE AND WRITE) reject a mismatch.
        """
        result = self.execute_now(nexus, cdb, data_out, attr, expected_length=expected_length)
        return result if isinstance(result, ScsiResult) else await result

    def execute_now(
        self,
        nexus: Nexus,
        cdb: bytes,
        data_out: Buffer | None = None,
        attr: int = SIMPLE,
        *,
        expected_length: int | None = None,
    ) -> ScsiResult | Awaitable[ScsiResult]:
        """:meth:`execute` without a coroutine for the commands that finish
        at once (a read from an mmap view, a write into the page cache): the
        result, or an awaitable for the few that wait (a flush in a thread).
        A coroutine per command costs a frame and a StopIteration on the
        hot path, about a fifth of the CPU of a 4 KiB read."""
        op = cdb[0]
        handler = self._handlers.get(op)
        try:
            if handler is None:
                raise illegal_request(INVALID_COMMAND_OPERATION_CODE, 0)
            # Length and CONTROL byte: NACA=1 is refused, ACA is not
            # implemented (SAM-5 §5.9.1.2).
            check_control(cdb)
            if self._ua and op not in self.ua_exempt:
                ua = self._pop_ua(nexus)
                if ua is not None:
                    raise CheckCondition(SenseKey.UNIT_ATTENTION, *ua)
            if self.sanitizing is not None and op not in ALLOWED_WHILE_SANITIZING:
                # SBC-3 §4.11.2: everything else waits for the sanitize.
                raise self.sanitizing.not_ready()
            if self.alua is not None:
                self.alua.check_access(nexus, cdb)
            res = self.reservations
            if res is not None and res.conflict(nexus, cdb):
                return ScsiResult(Status.RESERVATION_CONFLICT)
            if self._worker is not None and op in _BACKEND_OPS:
                return self._finish(cdb, self._in_worker(handler, nexus, cdb, data_out,
                                                         expected_length))
            result = handler(nexus, cdb, data_out, expected_length)
            if isinstance(result, ScsiResult):
                return result
        except Exception as exc:  # noqa: BLE001 - mapped to SCSI status below
            return self._failed(cdb, exc)
        return self._finish(cdb, result)

    async def _in_worker(self, handler: Handler, nexus: Nexus, cdb: bytes,
                         data_out: Buffer | None, el: int | None) -> ScsiResult:
        """Run a handler in the LU's worker thread (slow backends); a
        coroutine it returns (a flush) is awaited here, on the loop."""
        assert self._worker is not None
        result = await asyncio.get_running_loop().run_in_executor(
            self._worker, handler, nexus, cdb, data_out, el)
        return result if isinstance(result, ScsiResult) else await result

    async def _finish(self, cdb: bytes, pending: Awaitable[ScsiResult]) -> ScsiResult:
        try:
            return await pending
        except Exception as exc:  # noqa: BLE001 - mapped to SCSI status below
            return self._failed(cdb, exc)

    def _failed(self, cdb: bytes, exc: Exception) -> ScsiResult:
        """The SCSI answer to an exception from a command (SAM-5 §5.3)."""
        op = cdb[0]
        if isinstance(exc, CheckCondition):
            return self.check_condition(exc.sense)
        if isinstance(exc, ReservationConflict):
            return ScsiResult(Status.RESERVATION_CONFLICT)
        if isinstance(exc, OutOfResources):
            # A limit the administrator set (multiattach overlays): this
            # initiator is refused, SPC-4 INSUFFICIENT RESOURCES (55h/03h).
            return self.check_condition(SenseData(SenseKey.ILLEGAL_REQUEST,
                                                  *INSUFFICIENT_RESOURCES))
        if isinstance(exc, BackendUnavailable):
            # The medium is unreachable, not damaged: NOT READY, LOGICAL
            # UNIT COMMUNICATION FAILURE (SPC-4 Annex D, 08h/00h).
            self._log_io_error(cdb, exc)
            return self.check_condition(SenseData(SenseKey.NOT_READY, 0x08, 0x00))
        if isinstance(exc, BackendError):
            self._log_io_error(cdb, exc)
            asc = WRITE_ERROR if op in _WRITES else UNRECOVERED_READ_ERROR
            return self.check_condition(SenseData(SenseKey.MEDIUM_ERROR, *asc))
        if isinstance(exc, (ValueError, IndexError, struct.error)):
            # A parser bug must not take the target down; report it as an
            # internal failure rather than leaking the exception.
            return self.check_condition(SenseData(SenseKey.HARDWARE_ERROR, *INTERNAL_TARGET_FAILURE))
        raise exc

    def _log_io_error(self, cdb: bytes, exc: BaseException) -> None:
        """One log line per failed backend I/O with the LUN and LBA an
        administrator needs, at most one per second per LUN (a dying disk
        must not flood the log)."""
        now = time.monotonic()
        if now - self._last_io_log < 1.0:
            self._io_errors_unlogged += 1
            return
        try:
            lba: int | None = parse_rw(cdb).lba
        except CDBError:
            lba = None
        more = (f" ({self._io_errors_unlogged} more since the last report)"
                if self._io_errors_unlogged else "")
        log.error("%s LUN %d: %s%s failed: %s%s", self.target_name, self.lun, _op_name(cdb[0]),
                  f" at LBA {lba}" if lba is not None else "", exc, more)
        self._last_io_log = now
        self._io_errors_unlogged = 0

    # ----- transport helper --------------------------------------------------

    def data_out_length(self, cdb: bytes) -> int:
        """Bytes of Data-Out this CDB transfers (0 when none, or when the
        CDB is invalid: the command then fails on its own)."""
        rule = _DATA_OUT.get(cdb[0]) if cdb else None
        if rule is None:
            return 0
        try:
            return rule(cdb) << self._shift if rule in _BLOCK_RULES else rule(cdb)
        except CDBError:
            return 0


def _op_name(op: int) -> str:
    try:
        return Opcode(op).name.replace("_", " ")
    except ValueError:
        return f"opcode {op:#04x}"


def _rw_blocks(cdb: bytes) -> int:
    return parse_rw(cdb).data_out_blocks


def _atomic_blocks(cdb: bytes) -> int:
    """WRITE ATOMIC(16)'s TRANSFER LENGTH (SBC-4 §5.48), bytes 12-13."""
    if len(cdb) < 16:
        raise CDBError("WRITE ATOMIC(16) needs 16 bytes")
    return int.from_bytes(cdb[12:14], "big")


_BLOCK_RULES = (_rw_blocks, _atomic_blocks)


#: Data-Out a CDB transfers, by operation code (SBC-3, SPC-4), from the
#: codec's parse: blocks for the READ/WRITE family (the unit's block size
#: turns them into bytes), bytes of parameter list otherwise. The transport
#: compares it with the iSCSI Expected Data Transfer Length to report
#: residuals (RFC 7143 §11.4.5). Codes not listed carry none.
_DATA_OUT: dict[int, Callable[[bytes], int]] = {
    **dict.fromkeys((op for op in RW_OPCODES if op not in _READ_OPS), _rw_blocks),
    Opcode.UNMAP: lambda cdb: parse_unmap(cdb).parameter_list_length,
    Opcode.MODE_SELECT_6: lambda cdb: parse_mode_select(cdb).parameter_list_length,
    Opcode.MODE_SELECT_10: lambda cdb: parse_mode_select(cdb).parameter_list_length,
    Opcode.PERSISTENT_RESERVE_OUT: lambda cdb: parse_persistent_reserve_out(cdb).parameter_list_length,
    Opcode.EXTENDED_COPY: lambda cdb: parse_extended_copy(cdb).parameter_list_length,
    Opcode.WRITE_ATOMIC_16: _atomic_blocks,
    _SANITIZE: lambda cdb: int.from_bytes(cdb[7:9], "big") if len(cdb) >= 10 else 0,
}


#: Commands that touch the backend's data, run in the worker thread of a
#: slow backend: READ/WRITE(6/10/12/16), VERIFY and WRITE AND VERIFY
#: (10/12/16), ORWRITE(16), COMPARE AND WRITE, WRITE SAME(10/16), UNMAP and
#: SERVICE ACTION IN(16) (GET LBA STATUS). Everything else (INQUIRY, MODE
#: SENSE, reservations...) stays on the loop: it reads only cached state.
_BACKEND_OPS = frozenset({0x08, 0x28, 0xA8, 0x88, 0x0A, 0x2A, 0xAA, 0x8A, 0x2F, 0xAF, 0x8F,
                          0x2E, 0xAE, 0x8E, 0x8B, 0x89, 0x41, 0x93, 0x42, 0x9E})
