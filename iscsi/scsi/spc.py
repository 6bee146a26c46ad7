"""SPC-4 commands: INQUIRY, TEST UNIT READY, REQUEST SENSE, REPORT LUNS,
MODE SENSE/SELECT, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, REPORT
SUPPORTED OPERATION CODES/TMFs, REPORT TARGET PORT GROUPS and the
third-party copy commands.

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .cdb_common import (
    _SMAINT_IN,
    _SMS6,
    _SMS10,
    _SRCR,
    _SXCOPY,
    Buffer,
    InvalidCDBField,
    _bit,
    _check,
    _check_sa,
    _name,
    _reserved,
    _u,
)
from .constants import (
    MaintenanceIn,
    Opcode,
)

# --- SPC commands ---------------------------------------------------------------

_SINQ = struct.Struct(">BBBHB")


@dataclass(frozen=True, slots=True)
class Inquiry:
    """INQUIRY (SPC-4 §6.4)."""

    evpd: bool = False
    page_code: int = 0
    allocation_length: int = 96


def build_inquiry(
    *, evpd: bool = False, page_code: int = 0, allocation_length: int = 96
) -> bytes:
    """INQUIRY CDB; ``page_code`` needs ``evpd`` (SPC-4 §6.4.1)."""
    if page_code and not evpd:
        raise ValueError("INQUIRY page_code needs evpd=True")
    return _SINQ.pack(
        Opcode.INQUIRY,
        _bit(evpd, 0),
        _u(page_code, 8, "page_code"),
        _u(allocation_length, 16, "allocation_length"),
        0,
    )


def parse_inquiry(cdb: Buffer) -> Inquiry:
    """Parse INQUIRY; CMDDT=1 or a page code without EVPD are invalid fields."""
    _check(cdb, Opcode.INQUIRY, 6)
    _, b1, page, alloc, _ = _SINQ.unpack_from(cdb)
    if b1 & 0x02:
        raise InvalidCDBField("INQUIRY CMDDT is obsolete", field_offset=1, bit=1)
    _reserved(b1 & 0xFC, 1, "INQUIRY")
    evpd = bool(b1 & 1)
    if not evpd and page:
        # SPC-4 §6.4.1: PAGE CODE non-zero with EVPD=0 -> INVALID FIELD IN CDB.
        raise InvalidCDBField("INQUIRY page code set without EVPD", field_offset=2)
    return Inquiry(evpd, page, alloc)


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    """TEST UNIT READY (SPC-4 §6.47): no fields."""

    __test__ = False  # not a pytest test class


def build_test_unit_ready() -> bytes:
    """TEST UNIT READY CDB."""
    return bytes(6)


def parse_test_unit_ready(cdb: Buffer) -> TestUnitReady:
    """Parse TEST UNIT READY."""
    _check(cdb, Opcode.TEST_UNIT_READY, 6)
    return TestUnitReady()


_SRS = struct.Struct(">BB2xBB")


@dataclass(frozen=True, slots=True)
class RequestSense:
    """REQUEST SENSE (SPC-4 §6.39)."""

    desc: bool = False
    allocation_length: int = 252


def parse_request_sense(cdb: Buffer) -> RequestSense:
    """Parse REQUEST SENSE."""
    _check(cdb, Opcode.REQUEST_SENSE, 6)
    _, b1, alloc, _ = _SRS.unpack_from(cdb)
    _reserved(b1 & 0xFE, 1, "REQUEST SENSE")
    return RequestSense(bool(b1 & 1), alloc)


_SRL = struct.Struct(">BxB3xIxB")


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS (SPC-4 §6.27)."""

    select_report: int = 0
    allocation_length: int = 4096


def build_report_luns(
    *, select_report: int = 0, allocation_length: int = 4096
) -> bytes:
    """REPORT LUNS CDB; allocation length must be at least 16."""
    if allocation_length < 16:
        raise ValueError("REPORT LUNS allocation_length must be >= 16 (SPC-4 §6.27)")
    return _SRL.pack(
        Opcode.REPORT_LUNS,
        _u(select_report, 8, "select_report"),
        _u(allocation_length, 32, "allocation_length"),
        0,
    )


def parse_report_luns(cdb: Buffer) -> ReportLuns:
    """Parse REPORT LUNS; an allocation length below 16 is an invalid field."""
    _check(cdb, Opcode.REPORT_LUNS, 12)
    _, sel, alloc, _ = _SRL.unpack_from(cdb)
    if alloc < 16:
        raise InvalidCDBField(
            f"REPORT LUNS allocation length {alloc} < 16", field_offset=6
        )
    return ReportLuns(sel, alloc)


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE(6/10) (SPC-4 §6.11-§6.12); ``pc`` is the page control."""

    page_code: int = 0x3F
    subpage_code: int = 0
    pc: int = 0
    dbd: bool = False
    llbaa: bool = False
    allocation_length: int = 252
    cdb_size: int = 6


def build_mode_sense(
    *,
    page_code: int = 0x3F,
    subpage_code: int = 0,
    pc: int = 0,
    dbd: bool = False,
    llbaa: bool = False,
    allocation_length: int = 252,
    cdb_size: int = 6,
) -> bytes:
    """MODE SENSE(6) or (10) CDB (LLBAA only in the 10-byte form)."""
    b2 = (_u(pc, 2, "pc") << 6) | _u(page_code, 6, "page_code")
    _u(subpage_code, 8, "subpage_code")
    if cdb_size == 6:
        if llbaa:
            raise ValueError("LLBAA exists only in MODE SENSE(10)")
        return _SMS6.pack(
            Opcode.MODE_SENSE_6,
            _bit(dbd, 3),
            b2,
            subpage_code,
            _u(allocation_length, 8, "allocation_length"),
            0,
        )
    if cdb_size == 10:
        return _SMS10.pack(
            Opcode.MODE_SENSE_10,
            _bit(llbaa, 4) | _bit(dbd, 3),
            b2,
            subpage_code,
            _u(allocation_length, 16, "allocation_length"),
            0,
        )
    raise ValueError(f"cdb_size must be 6 or 10, not {cdb_size}")


def parse_mode_sense(cdb: Buffer) -> ModeSense:
    """Parse MODE SENSE(6/10)."""
    op = _check(cdb, (Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10), 1)
    if op == Opcode.MODE_SENSE_6:
        _check(cdb, op, 6)
        _, b1, b2, sub, alloc, _ = _SMS6.unpack_from(cdb)
        _reserved(b1 & 0xF7, 1, "MODE SENSE(6)")
        return ModeSense(b2 & 0x3F, sub, b2 >> 6, bool(b1 & 8), False, alloc, 6)
    _check(cdb, op, 10)
    _, b1, b2, sub, alloc, _ = _SMS10.unpack_from(cdb)
    _reserved(b1 & 0xE7, 1, "MODE SENSE(10)")
    return ModeSense(b2 & 0x3F, sub, b2 >> 6, bool(b1 & 8), bool(b1 & 0x10), alloc, 10)


_SMSEL6 = struct.Struct(">BB2xBB")
_SMSEL10 = struct.Struct(">BB5xHB")


@dataclass(frozen=True, slots=True)
class ModeSelect:
    """MODE SELECT(6/10) (SPC-4 §6.9-§6.10)."""

    parameter_list_length: int = 0
    pf: bool = True
    sp: bool = False
    cdb_size: int = 6


def parse_mode_select(cdb: Buffer) -> ModeSelect:
    """Parse MODE SELECT(6/10)."""
    op = _check(cdb, (Opcode.MODE_SELECT_6, Opcode.MODE_SELECT_10), 1)
    if op == Opcode.MODE_SELECT_6:
        _check(cdb, op, 6)
        _, b1, n, _ = _SMSEL6.unpack_from(cdb)
        size = 6
    else:
        _check(cdb, op, 10)
        _, b1, n, _ = _SMSEL10.unpack_from(cdb)
        size = 10
    _reserved(b1 & 0xEE, 1, _name(op))
    return ModeSelect(n, bool(b1 & 0x10), bool(b1 & 1), size)


_SSSU = struct.Struct(">BBxBBB")


@dataclass(frozen=True, slots=True)
class StartStopUnit:
    """START STOP UNIT (SBC-3 §5.20)."""

    start: bool = True
    loej: bool = False
    immed: bool = False
    no_flush: bool = False
    power_condition: int = 0
    power_condition_modifier: int = 0


def parse_start_stop_unit(cdb: Buffer) -> StartStopUnit:
    """Parse START STOP UNIT."""
    _check(cdb, Opcode.START_STOP_UNIT, 6)
    _, b1, b3, b4, _ = _SSSU.unpack_from(cdb)
    _reserved(b1 & 0xFE, 1, "START STOP UNIT")
    _reserved(b4 & 0x08, 4, "START STOP UNIT")
    return StartStopUnit(
        bool(b4 & 1), bool(b4 & 2), bool(b1 & 1), bool(b4 & 4), b4 >> 4, b3 & 0x0F
    )


_SPAMR = struct.Struct(">B3xBB")


@dataclass(frozen=True, slots=True)
class PreventAllowMediumRemoval:
    """PREVENT ALLOW MEDIUM REMOVAL (SPC-4 §6.13 / SBC-3 §5.11)."""

    prevent: int = 0


def parse_prevent_allow_medium_removal(cdb: Buffer) -> PreventAllowMediumRemoval:
    """Parse PREVENT ALLOW MEDIUM REMOVAL."""
    _check(cdb, Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 6)
    _, b4, _ = _SPAMR.unpack_from(cdb)
    _reserved(b4 & 0xFC, 4, "PREVENT ALLOW MEDIUM REMOVAL")
    return PreventAllowMediumRemoval(b4 & 3)


@dataclass(frozen=True, slots=True)
class ReportSupportedOpcodes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): MAINTENANCE IN / 0Ch."""

    reporting_options: int = 0
    requested_opcode: int = 0
    requested_service_action: int = 0
    rctd: bool = False
    allocation_length: int = 4096


def parse_report_supported_opcodes(cdb: Buffer) -> ReportSupportedOpcodes:
    """Parse REPORT SUPPORTED OPERATION CODES; reserved reporting options are invalid."""
    _check_sa(
        cdb,
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
        12,
        "REPORT SUPPORTED OPERATION CODES",
    )
    _, _, b2, rop, rsa, alloc, _ = _SMAINT_IN.unpack_from(cdb)
    opts = b2 & 7
    if opts > 3:
        raise InvalidCDBField(
            f"REPORT SUPPORTED OPERATION CODES reporting options {opts} reserved",
            field_offset=2,
            bit=2,
        )
    return ReportSupportedOpcodes(opts, rop, rsa, bool(b2 & 0x80), alloc)


@dataclass(frozen=True, slots=True)
class ReportSupportedTMFs:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36): MAINTENANCE IN / 0Dh."""

    repd: bool = False
    allocation_length: int = 16


def parse_report_supported_tmfs(cdb: Buffer) -> ReportSupportedTMFs:
    """Parse REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (allocation length < 4 is invalid)."""
    _check_sa(
        cdb,
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        12,
        "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
    )
    _, _, b2, _, _, alloc, _ = _SMAINT_IN.unpack_from(cdb)
    if alloc < 4:
        raise InvalidCDBField(f"allocation length {alloc} < 4", field_offset=6)
    return ReportSupportedTMFs(bool(b2 & 0x80), alloc)


@dataclass(frozen=True, slots=True)
class ReportTargetPortGroups:
    """REPORT TARGET PORT GROUPS (SPC-4 §6.37): MAINTENANCE IN / 0Ah."""

    parameter_data_format: int = 0
    allocation_length: int = 1024


def parse_report_target_port_groups(cdb: Buffer) -> ReportTargetPortGroups:
    """Parse REPORT TARGET PORT GROUPS."""
    _check_sa(
        cdb,
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
        12,
        "REPORT TARGET PORT GROUPS",
    )
    _, b1, _, _, _, alloc, _ = _SMAINT_IN.unpack_from(cdb)
    fmt = b1 >> 5
    if fmt > 1:
        raise InvalidCDBField(
            f"REPORT TARGET PORT GROUPS parameter data format {fmt} reserved",
            field_offset=1,
            bit=7,
        )
    return ReportTargetPortGroups(fmt, alloc)


@dataclass(frozen=True, slots=True)
class ExtendedCopy:
    """EXTENDED COPY (SPC-4 §6.3; LID1 is service action 0)."""

    parameter_list_length: int = 0
    service_action: int = 0


def parse_extended_copy(cdb: Buffer) -> ExtendedCopy:
    """Parse EXTENDED COPY."""
    _check(cdb, Opcode.EXTENDED_COPY, 16)
    _, b1, n, _ = _SXCOPY.unpack_from(cdb)
    return ExtendedCopy(n, b1 & 0x1F)


@dataclass(frozen=True, slots=True)
class ReceiveCopyResults:
    """RECEIVE COPY RESULTS (SPC-4 §6.18; service action 0 = COPY STATUS)."""

    service_action: int = 0
    list_identifier: int = 0
    allocation_length: int = 1024


def parse_receive_copy_results(cdb: Buffer) -> ReceiveCopyResults:
    """Parse RECEIVE COPY RESULTS."""
    _check(cdb, Opcode.RECEIVE_COPY_RESULTS, 16)
    _, b1, lid, alloc, _ = _SRCR.unpack_from(cdb)
    return ReceiveCopyResults(b1 & 0x1F, lid, alloc)


