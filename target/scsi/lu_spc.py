"""SPC-4 commands of a logical unit: TEST UNIT READY, REQUEST SENSE,
INQUIRY, MODE SENSE/SELECT, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL,
READ DEFECT DATA, the MAINTENANCE IN reports, and the entry points of the
reservation, third-party copy and ALUA managers. Every CDB is parsed by the
codec (:mod:`iscsi.scsi`)."""

from __future__ import annotations

import sys
from typing import Any

from iscsi.scsi.constants import PeripheralType, SenseKey
from iscsi.scsi.pr import (
    parse_persistent_reserve_in,
    parse_persistent_reserve_out,
    parse_reserve_release,
)
from iscsi.scsi.sbc import ReadDefectData, parse_read_defect_data
from iscsi.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    MEDIUM_REMOVAL_PREVENTED,
    MODE_PARAMETERS_CHANGED,
    PARAMETER_LIST_LENGTH_ERROR,
    CheckCondition,
    SenseData,
    illegal_request,
    invalid_field_in_cdb,
)
from iscsi.scsi.spc import (
    parse_extended_copy,
    parse_inquiry,
    parse_mode_select,
    parse_mode_sense,
    parse_prevent_allow_medium_removal,
    parse_receive_copy_results,
    parse_report_supported_opcodes,
    parse_report_supported_tmfs,
    parse_report_target_port_groups,
    parse_request_sense,
    parse_start_stop_unit,
)

from . import modes as _modes
from .lu_base import HandlerResult, UnitBase, _alloc, _good
from .opcodes import report_supported_opcodes, report_supported_tmfs
from .sanitize import Sanitizing
from .types import Buffer, Nexus, ScsiResult
from .vpd import InquiryInfo, standard_inquiry, vpd_page


class SpcCommands(UnitBase):
    """The SPC-4 handlers; :class:`~target.scsi.lu.LogicalUnit` installs them."""

    def _test_unit_ready(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        self._ready()
        return _good()

    def not_ready_sense(self) -> SenseData | None:
        """The NOT READY condition REQUEST SENSE reports, if any."""
        running: Sanitizing | None = getattr(self, "sanitizing", None)
        if running is not None:
            return running.not_ready().sense  # with the progress indication
        try:
            self._ready()
        except CheckCondition as exc:
            return exc.sense
        return None

    def _request_sense(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """REQUEST SENSE, SPC-4 §6.29: returns (and clears) a pending unit
        attention, else a NOT READY condition, else NO SENSE; GOOD status."""
        cmd = parse_request_sense(cdb)
        ua = self._pop_ua(nexus)
        if ua is not None:
            sense = SenseData(SenseKey.UNIT_ATTENTION, *ua)
        else:
            sense = self.not_ready_sense() or SenseData(SenseKey.NO_SENSE)
        raw = sense.encode_descriptor() if cmd.desc else sense.encode_fixed()
        return _good(_alloc(raw, cmd.allocation_length))

    def inquiry_info(self) -> InquiryInfo:
        """A snapshot of what INQUIRY reports about this unit."""
        if self.config.naa_wwn is None or self.config.serial is None:
            self.config.resolve(self.target_name, self.lun)
        return InquiryInfo(
            config=self.config,
            num_blocks=self.num_blocks,
            thin=self.thin,
            lbprz=self.thin and self.backend.zero_after_discard,
            tpgs=self.alua is not None,
            copy_manager=self.xcopy is not None,
            third_party_copy=self._tpc_page(),
        )

    def _tpc_page(self) -> bytes | None:
        """VPD 8Fh (third-party copy) from the target's copy manager."""
        if self.xcopy is None:
            return None
        build = getattr(sys.modules.get(type(self.xcopy).__module__), "third_party_copy_vpd", None)
        if build is None:
            return None
        page: bytes = build(int(self.config.device_type) & 0x1F)
        return page

    def _inquiry(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """INQUIRY, SPC-4 §6.4: standard data or a VPD page."""
        cmd = parse_inquiry(cdb)
        alloc = cmd.allocation_length
        info = self.inquiry_info()
        if not cmd.evpd:
            return _good(_alloc(standard_inquiry(info), alloc))
        out = vpd_page(cmd.page_code, info, nexus)
        if out is None:
            raise invalid_field_in_cdb(2)
        return _good(_alloc(out, alloc))

    def _device_specific(self) -> int:
        """MODE SENSE header device-specific parameter (SBC-3 §6.4.1):
        WP and DPOFUA (we honour DPO and FUA)."""
        return (0x80 if self.write_protected else 0) | 0x10

    def _mode_sense(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """MODE SENSE(6/10), SPC-4 §6.11/§6.12."""
        cmd = parse_mode_sense(cdb)
        out = _modes.mode_sense(
            cmd,
            self.modes,
            num_blocks=self.num_blocks if self.medium_present else 0,
            block_size=self.block_size,
            device_specific=self._device_specific(),
            block_descriptors=self.config.device_type == PeripheralType.DISK,
        )
        return _good(_alloc(out, cmd.allocation_length))

    def _mode_select(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """MODE SELECT(6/10), SPC-4 §6.9/§6.10: changes must stay inside
        the changeable mask; other nexuses get MODE PARAMETERS CHANGED."""
        cmd = parse_mode_select(cdb)
        ten = cmd.cdb_size == 10
        plen = cmd.parameter_list_length
        if plen == 0:
            return _good()
        raw = memoryview(data or b"")
        if len(raw) < plen:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        pages, base = _modes.parse_mode_select(
            raw[:plen], ten=ten, num_blocks=self.num_blocks, block_size=self.block_size
        )
        changed = self.modes.select(pages, save=cmd.sp, base=base)
        self._sync_mode_cache()
        if changed:
            self.post_unit_attention(MODE_PARAMETERS_CHANGED, exclude=nexus)
        return _good()

    def _start_stop(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """START STOP UNIT, SBC-3 §5.25. A POWER CONDITION other than 0
        makes START and LOEJ ignored. On removable units LOEJ ejects or
        loads (refused while PREVENT is in effect); on fixed units START=0
        stops the unit until a START=1 (NOT READY, INITIALIZING COMMAND
        REQUIRED meanwhile)."""
        cmd = parse_start_stop_unit(cdb)
        no_flush, loej, start = cmd.no_flush, cmd.loej, cmd.start
        if cmd.power_condition:
            return _good()
        removable = self.config.removable or self.config.device_type == PeripheralType.CDROM
        if loej and removable:
            if self._prevent:
                raise illegal_request(MEDIUM_REMOVAL_PREVENTED)
            if start:
                self.load_medium()
            else:
                self.eject_medium()
            return _good()
        if removable:
            return _good()
        if start:
            self.started = True
            return _good()
        self.started = False
        if no_flush:
            return _good()
        return self._flush_then(_good())

    def load_medium(self) -> None:
        """Close the tray / make the medium ready."""
        self.medium_present = True
        self.tray_open = False
        self.started = True

    def eject_medium(self) -> None:
        """Open the tray: medium access now answers NOT READY, MEDIUM NOT
        PRESENT (SPC-4 §4.5.6 / MMC-6)."""
        self.medium_present = False
        self.tray_open = True

    def _prevent_allow(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """PREVENT ALLOW MEDIUM REMOVAL, SBC-3 §5.11: tracked per I_T nexus;
        removal is prevented while any nexus holds a prevent."""
        if parse_prevent_allow_medium_removal(cdb).prevent:
            self._prevent.add(nexus.key)
        else:
            self._prevent.discard(nexus.key)
        return _good()

    def _read_defect10(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ DEFECT DATA(10), SBC-3 §5.16: an empty list in the format
        asked for (a virtual disk has no defects)."""
        cmd = parse_read_defect_data(cdb)
        self._ready()
        return _good(_alloc(bytes((0, _defect_format(cmd), 0, 0)), cmd.allocation_length))

    def _read_defect12(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ DEFECT DATA(12), SBC-3 §5.17: empty list, 8-byte header."""
        cmd = parse_read_defect_data(cdb)
        self._ready()
        return _good(_alloc(bytes((0, _defect_format(cmd), 0, 0, 0, 0, 0, 0)), cmd.allocation_length))

    def _by_service_action(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """SERVICE ACTION IN(16) and MAINTENANCE IN: the handler is chosen
        by the SERVICE ACTION field (SPC-4 §4.2.5.1); an unknown one is an
        invalid field pointing at it."""
        handler = self._sa_handlers.get((cdb[0], cdb[1] & 0x1F))
        if handler is None:
            raise invalid_field_in_cdb(1, 4)
        return handler(nexus, cdb, data, el)

    def _report_opcodes(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """REPORT SUPPORTED OPERATION CODES, SPC-4 §6.35."""
        cmd = parse_report_supported_opcodes(cdb)
        return _good(_alloc(report_supported_opcodes(self.supported_ops(), cmd), cmd.allocation_length))

    def _report_tmfs(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, SPC-4 §6.36."""
        cmd = parse_report_supported_tmfs(cdb)
        return _good(_alloc(report_supported_tmfs(cmd.repd), cmd.allocation_length))

    def _report_tpgs(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """REPORT TARGET PORT GROUPS, SPC-4 §6.37 (units with ALUA only)."""
        if self.alua is None:
            raise invalid_field_in_cdb(1, 4)
        cmd = parse_report_target_port_groups(cdb)
        return _good(_alloc(self.alua.report_target_port_groups(nexus, cmd), cmd.allocation_length))

    # ----- persistent reservations, third-party copy, ALUA ---------------------

    def _no_opcode(self) -> CheckCondition:
        return illegal_request(INVALID_COMMAND_OPERATION_CODE, 0)

    def _optional(self, manager: Any) -> Any:
        """``manager`` (reservations, xcopy), or INVALID COMMAND OPERATION
        CODE when this unit was built without it."""
        if manager is None:
            raise self._no_opcode()
        return manager

    def _reserve_release(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        res = self._optional(self.reservations)
        # The CDB's fields are checked by the reservations (one place).
        if parse_reserve_release(cdb).release:
            res.release6(nexus, cdb)
        else:
            res.reserve6(nexus, cdb)
        return _good()

    def _pr_in(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        res = self._optional(self.reservations)
        cmd = parse_persistent_reserve_in(cdb)
        out: bytes = res.reserve_in(nexus, cdb)
        return _good(_alloc(out, cmd.allocation_length))

    def _pr_out(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        res = self._optional(self.reservations)
        plen = parse_persistent_reserve_out(cdb).parameter_list_length
        raw = None if data is None else memoryview(data)[:plen]
        posts = res.reserve_out(nexus, cdb, raw)
        for post in posts:
            self.post_unit_attention(post.asc_ascq, post.nexuses, exclude=nexus)
        return _good()

    def _extended_copy(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        xc = self._optional(self.xcopy)
        plen = parse_extended_copy(cdb).parameter_list_length
        raw = memoryview(data or b"")
        if len(raw) < plen:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)

        async def run() -> ScsiResult:
            await xc.extended_copy(nexus, cdb, raw[:plen])
            return _good()

        return run()

    def _receive_copy_results(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        xc = self._optional(self.xcopy)
        cmd = parse_receive_copy_results(cdb)
        out: bytes = xc.receive_copy_results(nexus, cdb)
        return _good(_alloc(out, cmd.allocation_length))


def _defect_format(cmd: ReadDefectData) -> int:
    """Byte 1 of the (empty) defect list header echoes REQ_PLIST, REQ_GLIST
    and the defect list format asked for (SBC-3 §5.16.2)."""
    return (cmd.req_plist << 4) | (cmd.req_glist << 3) | cmd.defect_list_format
