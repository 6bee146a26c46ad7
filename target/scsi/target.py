"""The SCSI target device (SAM-5 §4.6): routes commands to logical units,
answers for LUNs that do not exist, serves REPORT LUNS, tracks I_T nexuses
for unit attentions, and relays task management to the units.

Nothing here knows iSCSI: the transport builds a :class:`Nexus` per session
and calls :meth:`ScsiTarget.execute`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping

from iscsi.scsi.cdb_common import SELECT_REPORT_ALL
from iscsi.scsi.constants import Opcode, SenseKey, Status
from iscsi.scsi.lun import build_report_luns_data, encode_lun
from iscsi.scsi.spc import parse_inquiry, parse_report_luns, parse_request_sense
from iscsi.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    LOGICAL_UNIT_NOT_SUPPORTED,
    POWER_ON_RESET,
    CheckCondition,
    SenseData,
    illegal_request,
    invalid_field_in_cdb,
)

from .alua import Alua, GroupSpec
from .lu import LogicalUnit
from .types import SIMPLE, Buffer, Nexus, ScsiResult
from .vpd import missing_lun_inquiry
from .xcopy import XCopyManager

__all__ = ["PortGroup", "ScsiTarget", "encode_lun"]  # encode_lun: the one in iscsi.scsi.lun

#: (group id, relative target port ids, asymmetric access state)
#: A target port group for alua.py: a TargetPortGroup, or (group id,
#: relative port ids, state).
PortGroup = GroupSpec


class ScsiTarget:
    """A SCSI target device with the given logical units.

    ``name`` (the iSCSI target name) seeds stable NAA and serial numbers of
    units that have none configured; ``target_port_groups`` is handed to
    alua.py for REPORT TARGET PORT GROUPS.
    """

    def __init__(
        self,
        luns: Mapping[int, LogicalUnit],
        target_port_groups: Iterable[PortGroup] | None = None,
        *,
        name: str = "",
    ) -> None:
        self.name = name
        self.luns: dict[int, LogicalUnit] = dict(luns)
        self._nexuses: dict[str, Nexus] = {}
        self.port_groups = list(target_port_groups or [])
        self.xcopy = XCopyManager(self.lookup_lu)
        self.alua = Alua(self.port_groups or None)
        for lun, lu in self.luns.items():
            self._attach(lun, lu)

    def _attach(self, lun: int, lu: LogicalUnit) -> None:
        lu.bind(self.name, lun)
        lu.xcopy = self.xcopy
        lu.alua = self.alua
        for nexus in self._nexuses.values():
            lu.add_nexus(nexus)

    def add_lun(self, lun: int, lu: LogicalUnit) -> None:
        """Add a logical unit at runtime; every nexus is told REPORTED LUNS
        DATA HAS CHANGED (SPC-4 §6.33) through the other units."""
        self.luns[lun] = lu
        self._attach(lun, lu)
        for other in self.luns.values():
            if other is not lu:
                other.post_unit_attention((0x3F, 0x0E))

    def lookup_lu(self, naa: bytes) -> LogicalUnit | None:
        """The unit whose NAA designator is ``naa`` (for EXTENDED COPY
        identification target descriptors)."""
        for lu in self.luns.values():
            if lu.config.naa_wwn == bytes(naa):
                return lu
        return None

    # ----- nexus bookkeeping -------------------------------------------------

    def add_nexus(self, nexus: Nexus) -> None:
        """A new I_T nexus: each unit gets POWER ON/RESET pending for it."""
        self._nexuses[nexus.key] = nexus
        for lu in self.luns.values():
            lu.add_nexus(nexus)

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss (session ended): SPC-2 reservations, PREVENT and
        pending unit attentions of that nexus go away."""
        self._nexuses.pop(nexus.key, None)
        for lu in self.luns.values():
            lu.nexus_lost(nexus)

    # ----- task management ---------------------------------------------------

    def abort_task_set(self, nexus: Nexus, lun: int) -> None:
        """ABORT TASK SET (SAM-5 §7.3)."""
        lu = self.luns.get(lun)
        if lu is not None:
            lu.abort_task_set(nexus)

    def clear_task_set(self, nexus: Nexus, lun: int) -> None:
        """CLEAR TASK SET (SAM-5 §7.5)."""
        lu = self.luns.get(lun)
        if lu is not None:
            lu.clear_task_set(nexus)

    def clear_aca(self, nexus: Nexus, lun: int) -> None:
        """CLEAR ACA (SAM-5 §7.4)."""
        lu = self.luns.get(lun)
        if lu is not None:
            lu.clear_aca(nexus)

    def lu_reset(self, nexus: Nexus, lun: int) -> None:
        """LOGICAL UNIT RESET (SAM-5 §7.7): the unit posts BUS DEVICE
        RESET FUNCTION OCCURRED to every nexus."""
        lu = self.luns.get(lun)
        if lu is not None:
            lu.reset((0x29, 0x03))

    def target_reset(self, nexus: Nexus, cold: bool) -> None:
        """TARGET WARM/COLD RESET (RFC 7143 §11.5.1): every unit is reset;
        a cold reset reports POWER ON OCCURRED."""
        for lu in self.luns.values():
            lu.reset((0x29, 0x01) if cold else POWER_ON_RESET)

    # ----- command entry point --------------------------------------------------

    def data_out_length(self, lun: int, cdb: bytes) -> int:
        """Bytes of Data-Out the CDB asks for (0 for a missing LUN)."""
        lu = self.luns.get(lun)
        if lu is None or not cdb:
            return 0
        return lu.data_out_length(cdb)

    async def execute(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes,
        data_out: Buffer | None = None,
        attr: int = SIMPLE,
        *,
        expected_length: int | None = None,
    ) -> ScsiResult:
        """Execute one command. A nexus not seen before is added first (its
        first command reports POWER ON/RESET, SPC-4 §5.14)."""
        result = self.execute_now(nexus, lun, cdb, data_out, attr, expected_length=expected_length)
        return result if isinstance(result, ScsiResult) else await result

    def execute_now(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes,
        data_out: Buffer | None = None,
        attr: int = SIMPLE,
        *,
        expected_length: int | None = None,
    ) -> ScsiResult | Awaitable[ScsiResult]:
        """:meth:`execute` without a coroutine when the command finishes at
        once (see :meth:`LogicalUnit.execute_now`)."""
        if nexus.key not in self._nexuses:
            self.add_nexus(nexus)
        if not cdb:
            return self._check(illegal_request(INVALID_FIELD_IN_CDB, 0).sense)
        op = cdb[0]
        if op == Opcode.REPORT_LUNS:
            try:
                return self._report_luns(cdb)
            except CheckCondition as exc:
                return self._check(exc.sense)
        lu = self.luns.get(lun)
        if lu is None:
            return self._missing_lun(cdb)
        return lu.execute_now(nexus, cdb, data_out, attr, expected_length=expected_length)

    @staticmethod
    def _check(sense: SenseData) -> ScsiResult:
        return ScsiResult(Status.CHECK_CONDITION, sense.encode_fixed(), None)

    def _missing_lun(self, cdb: bytes) -> ScsiResult:
        """SPC-4 §4.6 / §6.4.2: INQUIRY answers with peripheral qualifier
        011b, REQUEST SENSE reports LOGICAL UNIT NOT SUPPORTED as data,
        anything else is CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED."""
        op = cdb[0]
        sense = SenseData(SenseKey.ILLEGAL_REQUEST, *LOGICAL_UNIT_NOT_SUPPORTED)
        try:
            if op == Opcode.INQUIRY:
                alloc = parse_inquiry(cdb).allocation_length
                return ScsiResult(Status.GOOD, b"", missing_lun_inquiry()[:alloc])
            if op == Opcode.REQUEST_SENSE:
                rs = parse_request_sense(cdb)
                raw = sense.encode_descriptor() if rs.desc else sense.encode_fixed()
                return ScsiResult(Status.GOOD, b"", raw[: rs.allocation_length])
        except CheckCondition as exc:
            return self._check(exc.sense)
        return self._check(sense)

    def _report_luns(self, cdb: bytes) -> ScsiResult:
        """REPORT LUNS, SPC-4 §6.33: SELECT REPORT 0 and 2 list every
        logical unit, 1 (well-known LUNs only) lists none."""
        cmd = parse_report_luns(cdb)  # ALLOCATION LENGTH < 16 is refused there
        select, alloc = cmd.select_report, cmd.allocation_length
        if select not in (0x00, 0x01, SELECT_REPORT_ALL):
            raise invalid_field_in_cdb(2)
        luns = [] if select == 0x01 else sorted(self.luns)
        data = build_report_luns_data(luns)
        return ScsiResult(Status.GOOD, b"", data[:alloc])
