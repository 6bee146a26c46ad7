"""The command table behind REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35)
and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (§6.36).

Each entry's CDB USAGE DATA has a 1 for every CDB bit the device server
looks at; bits we do not parse are 0, and the logical unit checks the fields
it rejects (RDPROTECT, ANCHOR...) as reserved, so the table and the parser
agree. The first byte is the operation code, and for commands with service
actions byte 1 holds the service action (as the standard requires).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from iscsi.scsi.constants import MaintenanceIn, Opcode, ServiceActionIn16
from iscsi.scsi.sense import invalid_field_in_cdb
from iscsi.scsi.spc import ReportSupportedOpcodes


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One supported command: operation code, service action (None when
    the command has none), CDB usage data, and timeouts in seconds."""

    opcode: int
    sa: int | None
    usage: bytes
    nominal_timeout: int = 0
    recommended_timeout: int = 30


def _u(*parts: int) -> bytes:
    return bytes(parts)


_RW10 = (0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00)
_RW12 = (0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00)
_RW16 = (0x18,) + (0xFF,) * 12 + (0x00, 0x00)
_VER10 = (0x16,) + _RW10[1:]
_VER12 = (0x16,) + _RW12[1:]
_VER16 = (0x16,) + _RW16[1:]

#: Commands of a direct-access block device (SBC-3) served by lu.py.
DISK_OPS: tuple[OpInfo, ...] = (
    OpInfo(Opcode.TEST_UNIT_READY, None, _u(0x00, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.REQUEST_SENSE, None, _u(0x03, 0x01, 0, 0, 0xFF, 0)),
    OpInfo(Opcode.READ_6, None, _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.WRITE_6, None, _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.INQUIRY, None, _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.MODE_SELECT_6, None, _u(0x15, 0x11, 0, 0, 0xFF, 0)),
    OpInfo(Opcode.MODE_SENSE_6, None, _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.START_STOP_UNIT, None, _u(0x1B, 0x01, 0, 0x0F, 0xF7, 0)),
    OpInfo(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None, _u(0x1E, 0, 0, 0, 0x03, 0)),
    OpInfo(Opcode.READ_CAPACITY_10, None, _u(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.READ_10, None, _u(0x28, *_RW10)),
    OpInfo(Opcode.WRITE_10, None, _u(0x2A, *_RW10)),
    OpInfo(Opcode.WRITE_AND_VERIFY_10, None, _u(0x2E, *_VER10)),
    OpInfo(Opcode.VERIFY_10, None, _u(0x2F, *_VER10)),
    OpInfo(Opcode.PRE_FETCH_10, None, _u(0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.SYNCHRONIZE_CACHE_10, None, _u(0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.READ_DEFECT_DATA_10, None, _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.WRITE_SAME_10, None, _u(0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.UNMAP, None, _u(0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.MODE_SELECT_10, None, _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.MODE_SENSE_10, None, _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.READ_16, None, _u(0x88, *_RW16)),
    OpInfo(Opcode.COMPARE_AND_WRITE, None, _u(0x89, 0x18, *(0xFF,) * 8, 0, 0, 0, 0xFF, 0, 0)),
    OpInfo(Opcode.WRITE_16, None, _u(0x8A, *_RW16)),
    OpInfo(Opcode.ORWRITE_16, None, _u(0x8B, *_RW16)),
    OpInfo(Opcode.WRITE_ATOMIC_16, None, _u(0x9C, 0x18, *(0xFF,) * 8, 0, 0, 0xFF, 0xFF, 0, 0)),
    OpInfo(Opcode.WRITE_AND_VERIFY_16, None, _u(0x8E, *_VER16)),
    OpInfo(Opcode.VERIFY_16, None, _u(0x8F, *_VER16)),
    OpInfo(Opcode.PRE_FETCH_16, None, _u(0x90, 0x02, *(0xFF,) * 12, 0, 0)),
    OpInfo(Opcode.SYNCHRONIZE_CACHE_16, None, _u(0x91, 0x02, *(0xFF,) * 12, 0, 0)),
    OpInfo(Opcode.WRITE_SAME_16, None, _u(0x93, 0x09, *(0xFF,) * 12, 0, 0)),
    OpInfo(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.READ_CAPACITY_16,
        _u(0x9E, 0x10, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
    OpInfo(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.GET_LBA_STATUS,
        _u(0x9E, 0x12, *(0xFF,) * 12, 0, 0),
    ),
    OpInfo(Opcode.REPORT_LUNS, None, _u(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
        _u(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        _u(0xA3, 0x0D, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
    OpInfo(Opcode.READ_12, None, _u(0xA8, *_RW12)),
    OpInfo(Opcode.WRITE_12, None, _u(0xAA, *_RW12)),
    OpInfo(Opcode.WRITE_AND_VERIFY_12, None, _u(0xAE, *_VER12)),
    OpInfo(Opcode.VERIFY_12, None, _u(0xAF, *_VER12)),
    OpInfo(Opcode.READ_DEFECT_DATA_12, None, _u(0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
)

#: Commands routed to reservations.py (present only when it is importable).
RESERVATION_OPS: tuple[OpInfo, ...] = (
    OpInfo(Opcode.RESERVE_6, None, _u(0x16, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.RELEASE_6, None, _u(0x17, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.RESERVE_10, None, _u(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.RELEASE_10, None, _u(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    OpInfo(Opcode.PERSISTENT_RESERVE_IN, None, _u(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.PERSISTENT_RESERVE_OUT, None, _u(0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0)),
)

#: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS, routed to xcopy.py.
XCOPY_OPS: tuple[OpInfo, ...] = (
    OpInfo(Opcode.EXTENDED_COPY, 0x00, _u(0x83, 0x00, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, 0x00, _u(0x84, 0x00, 0xFF, *(0,) * 7, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, 0x01, _u(0x84, 0x01, 0xFF, *(0,) * 7, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, 0x03, _u(0x84, 0x03, 0, *(0,) * 7, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    OpInfo(Opcode.RECEIVE_COPY_RESULTS, 0x04, _u(0x84, 0x04, 0xFF, *(0,) * 7, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
)

#: REPORT TARGET PORT GROUPS, routed to alua.py.
ALUA_OPS: tuple[OpInfo, ...] = (
    OpInfo(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
        # byte 1: PARAMETER DATA FORMAT (length / extended) + service action
        _u(0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
    ),
)

#: Commands of an MMC CD/DVD-ROM device (mmc.py).
CDROM_OPS: tuple[OpInfo, ...] = tuple(
    op
    for op in DISK_OPS
    if op.opcode
    in (
        Opcode.TEST_UNIT_READY,
        Opcode.REQUEST_SENSE,
        Opcode.INQUIRY,
        Opcode.MODE_SELECT_6,
        Opcode.MODE_SENSE_6,
        Opcode.START_STOP_UNIT,
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL,
        Opcode.READ_CAPACITY_10,
        Opcode.READ_10,
        Opcode.VERIFY_10,
        Opcode.MODE_SELECT_10,
        Opcode.MODE_SENSE_10,
        Opcode.READ_12,
        Opcode.REPORT_LUNS,
        Opcode.MAINTENANCE_IN,
    )
) + (
    OpInfo(Opcode.READ_TOC_PMA_ATIP, None, _u(0x43, 0x02, 0x0F, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.GET_CONFIGURATION, None, _u(0x46, 0x03, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.GET_EVENT_STATUS_NOTIFICATION, None, _u(0x4A, 0x01, 0, 0, 0xFF, 0, 0, 0xFF, 0xFF, 0)),
    OpInfo(Opcode.MECHANISM_STATUS, None, _u(0xBD, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0)),
)

_TIMEOUTS = struct.Struct(">HxBII")


def _descriptor(op: OpInfo, rctd: bool) -> bytes:
    """A command descriptor of the all-commands format (SPC-4 §6.35.2)."""
    flags = (0x02 if rctd else 0) | (0x01 if op.sa is not None else 0)
    out = struct.pack(">BxHxBH", op.opcode, op.sa or 0, flags, len(op.usage))
    if rctd:
        out += _TIMEOUTS.pack(0x0A, 0, op.nominal_timeout, op.recommended_timeout)
    return out


def report_supported_opcodes(ops: Iterable[OpInfo], cmd: ReportSupportedOpcodes) -> bytes:
    """Parameter data for REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35).

    REPORTING OPTIONS 000b: all commands; 001b: one command without
    service action (INVALID FIELD IN CDB if it has service actions);
    010b: one command with the service action (INVALID FIELD IN CDB if it
    has none); 011b: either form (SPC-4 r37+).
    """
    rctd = cmd.rctd
    option = cmd.reporting_options
    req_op = cmd.requested_opcode
    req_sa = cmd.requested_service_action
    table = list(ops)
    if option == 0:
        body = b"".join(_descriptor(op, rctd) for op in table)
        return struct.pack(">I", len(body)) + body
    same_op = [op for op in table if op.opcode == req_op]
    has_sa = any(op.sa is not None for op in same_op)
    if option == 1 and has_sa:
        raise invalid_field_in_cdb(2, 2)
    if option == 2 and same_op and not has_sa:
        raise invalid_field_in_cdb(2, 2)
    if option == 1 or (option == 3 and not has_sa):
        match = same_op[0] if same_op else None
    else:
        match = next((op for op in same_op if op.sa == req_sa), None)
    if match is None:
        # SUPPORT 001b: not supported; no CDB usage data (§6.35.3)
        return bytes((0, 0x01, 0, 0))
    support = 0x03  # supported in conformance with a SCSI standard
    head = struct.pack(">BBH", 0, (0x80 if rctd else 0) | support, len(match.usage))
    out = head + match.usage
    if rctd:
        out += _TIMEOUTS.pack(0x0A, 0, match.nominal_timeout, match.recommended_timeout)
    return out


def report_supported_tmfs(repd: bool) -> bytes:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data (SPC-4 §6.36):
    ABORT TASK, ABORT TASK SET, CLEAR ACA, CLEAR TASK SET, LOGICAL UNIT
    RESET and TARGET RESET are what iSCSI offers (RFC 7143 §11.5.1); REPD
    asks for the 16-byte extended format."""
    # byte 0: ATS ATSS CACAS CTSS LURS QTS TRS WAKES
    b0 = 0x80 | 0x40 | 0x20 | 0x10 | 0x08 | 0x02
    if repd:
        return bytes((b0, 0, 0, 0x0C)) + bytes(12)
    return bytes((b0, 0, 0, 0))
