"""Parse any CDB by its operation code (the table of parsers).

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from .cdb_common import (
    Buffer,
    CDBTooShort,
    InvalidCDBField,
    UnsupportedOpcode,
    _name,
)
from .constants import (
    MaintenanceIn,
    Opcode,
    ServiceActionIn16,
)
from .mmc import (
    GetConfiguration,
    GetEventStatusNotification,
    ReadToc,
    parse_get_configuration,
    parse_get_event_status_notification,
    parse_read_toc,
)
from .pr import (
    PersistentReserveIn,
    PersistentReserveOut,
    ReserveRelease,
    parse_persistent_reserve_in,
    parse_persistent_reserve_out,
    parse_reserve_release,
)
from .rw import (
    _RW_PARSERS,
    RWCommand,
)
from .sbc import (
    GetLbaStatus,
    PreFetch,
    ReadCapacity10,
    ReadCapacity16,
    ReadDefectData,
    SynchronizeCache,
    Unmap,
    parse_get_lba_status,
    parse_pre_fetch,
    parse_read_capacity10,
    parse_read_capacity16,
    parse_read_defect_data,
    parse_synchronize_cache,
    parse_unmap,
)
from .spc import (
    ExtendedCopy,
    Inquiry,
    ModeSelect,
    ModeSense,
    PreventAllowMediumRemoval,
    ReceiveCopyResults,
    ReportLuns,
    ReportSupportedOpcodes,
    ReportSupportedTMFs,
    ReportTargetPortGroups,
    RequestSense,
    StartStopUnit,
    TestUnitReady,
    parse_extended_copy,
    parse_inquiry,
    parse_mode_select,
    parse_mode_sense,
    parse_prevent_allow_medium_removal,
    parse_receive_copy_results,
    parse_report_luns,
    parse_report_supported_opcodes,
    parse_report_supported_tmfs,
    parse_report_target_port_groups,
    parse_request_sense,
    parse_start_stop_unit,
    parse_test_unit_ready,
)

# --- dispatch -----------------------------------------------------------------------

ParsedCDB: TypeAlias = (
    RWCommand
    | Inquiry
    | TestUnitReady
    | RequestSense
    | ReportLuns
    | ReadCapacity10
    | ReadCapacity16
    | GetLbaStatus
    | Unmap
    | SynchronizeCache
    | PreFetch
    | ModeSense
    | ModeSelect
    | StartStopUnit
    | PreventAllowMediumRemoval
    | ReserveRelease
    | PersistentReserveIn
    | PersistentReserveOut
    | ReportSupportedOpcodes
    | ReportSupportedTMFs
    | ReportTargetPortGroups
    | ReadDefectData
    | ExtendedCopy
    | ReceiveCopyResults
    | ReadToc
    | GetConfiguration
    | GetEventStatusNotification
)

_PARSERS: dict[int, Callable[[Buffer], ParsedCDB]] = {
    Opcode.INQUIRY: parse_inquiry,
    Opcode.TEST_UNIT_READY: parse_test_unit_ready,
    Opcode.REQUEST_SENSE: parse_request_sense,
    Opcode.REPORT_LUNS: parse_report_luns,
    Opcode.READ_CAPACITY_10: parse_read_capacity10,
    Opcode.UNMAP: parse_unmap,
    Opcode.SYNCHRONIZE_CACHE_10: parse_synchronize_cache,
    Opcode.SYNCHRONIZE_CACHE_16: parse_synchronize_cache,
    Opcode.PRE_FETCH_10: parse_pre_fetch,
    Opcode.PRE_FETCH_16: parse_pre_fetch,
    Opcode.MODE_SENSE_6: parse_mode_sense,
    Opcode.MODE_SENSE_10: parse_mode_sense,
    Opcode.MODE_SELECT_6: parse_mode_select,
    Opcode.MODE_SELECT_10: parse_mode_select,
    Opcode.START_STOP_UNIT: parse_start_stop_unit,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: parse_prevent_allow_medium_removal,
    Opcode.RESERVE_6: parse_reserve_release,
    Opcode.RELEASE_6: parse_reserve_release,
    Opcode.RESERVE_10: parse_reserve_release,
    Opcode.RELEASE_10: parse_reserve_release,
    Opcode.PERSISTENT_RESERVE_IN: parse_persistent_reserve_in,
    Opcode.PERSISTENT_RESERVE_OUT: parse_persistent_reserve_out,
    Opcode.READ_DEFECT_DATA_10: parse_read_defect_data,
    Opcode.READ_DEFECT_DATA_12: parse_read_defect_data,
    Opcode.EXTENDED_COPY: parse_extended_copy,
    Opcode.RECEIVE_COPY_RESULTS: parse_receive_copy_results,
    Opcode.READ_TOC_PMA_ATIP: parse_read_toc,
    Opcode.GET_CONFIGURATION: parse_get_configuration,
    Opcode.GET_EVENT_STATUS_NOTIFICATION: parse_get_event_status_notification,
}
_PARSERS.update(_RW_PARSERS)

_SA_PARSERS: dict[tuple[int, int], Callable[[Buffer], ParsedCDB]] = {
    (
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.READ_CAPACITY_16,
    ): parse_read_capacity16,
    (
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.GET_LBA_STATUS,
    ): parse_get_lba_status,
    (
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
    ): parse_report_supported_opcodes,
    (
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
    ): parse_report_supported_tmfs,
    (
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
    ): parse_report_target_port_groups,
}
_SA_OPCODES = frozenset(op for op, _ in _SA_PARSERS)


def parse_cdb(cdb: Buffer) -> ParsedCDB:
    """Parse any CDB this module knows, dispatching on opcode (and service
    action for SERVICE ACTION IN(16) / MAINTENANCE IN).

    Unknown opcodes raise :class:`UnsupportedOpcode` (INVALID COMMAND
    OPERATION CODE); unknown service actions :class:`InvalidCDBField`
    pointing at the SERVICE ACTION field (SPC-4 §4.2.5.1).
    """
    if not cdb:
        raise CDBTooShort("empty CDB", field_offset=0)
    op = cdb[0]
    parser = _PARSERS.get(op)
    if parser is not None:
        return parser(cdb)
    if op in _SA_OPCODES:
        if len(cdb) < 2:
            raise CDBTooShort(f"{_name(op)} CDB is {len(cdb)} bytes", field_offset=0)
        sa_parser = _SA_PARSERS.get((op, cdb[1] & 0x1F))
        if sa_parser is None:
            raise InvalidCDBField(
                f"{_name(op)} service action {cdb[1] & 0x1F:#04x} not supported",
                field_offset=1,
                bit=4,
            )
        return sa_parser(cdb)
    raise UnsupportedOpcode(f"{_name(op)} is not supported", field_offset=0)


