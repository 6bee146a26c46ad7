"""The data of SPC-4 persistent reservations: registrations, the
reservation, which commands each reservation type lets through (the
command-conflict tables of SPC-4 §5.9.1 and SBC-3), TransportIDs (SPC-4
§7.6.4.6) and the errors the reservation commands raise. The state machine
that uses them is :class:`target.scsi.reservations.Reservations`."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from iscsi.scsi.cdb_common import PROTOCOL_ID_ISCSI, CDBError
from iscsi.scsi.constants import Opcode, PRType, ServiceActionIn16
from iscsi.scsi.spc import parse_prevent_allow_medium_removal, parse_start_stop_unit

from .types import Buffer, Nexus

#: LU_SCOPE, the only scope SPC-4 keeps (§6.16.2).
LU_SCOPE = 0

_ALL_REGISTRANTS = frozenset({PRType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PRType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS})
_REGISTRANTS_ONLY = frozenset({PRType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PRType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY})
#: Types under which a non-holder may still read (the "Write Exclusive" family).
_READ_SHARED = frozenset(
    {PRType.WRITE_EXCLUSIVE, PRType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PRType.WRITE_EXCLUSIVE_ALL_REGISTRANTS}
)
_VALID_TYPES = frozenset(int(t) for t in PRType)

# PERSISTENT RESERVE OUT basic parameter list, SPC-4 §6.16.3 table 228:
# reservation key, service action reservation key, obsolete (4), byte 20
# (SPEC_I_PT/ALL_TG_PT/APTPL), reserved, obsolete (2).
_PROUT_PARAMS = struct.Struct(">QQ4xBxxx")
_BASIC_LEN = 24
# REGISTER AND MOVE parameter list, SPC-4 §6.16.4 table 231.
_MOVE_PARAMS = struct.Struct(">QQxBHI")
_SPEC_I_PT, _ALL_TG_PT, _APTPL = 0x08, 0x04, 0x01
_UNREG = 0x02
_TID_HDR = struct.Struct(">BxH")

#: Default cap on registrations (INSUFFICIENT REGISTRATION RESOURCES beyond).
MAX_REGISTRATIONS = 256

_STATE_FORMAT = "aioiscsi-persistent-reservations"
_STATE_VERSION = 1


class ReservationConflict(Exception):
    """End the command with RESERVATION CONFLICT status (no sense data)."""


class ReservationStateError(ValueError):
    """The APTPL state file cannot be read back (one-line message)."""


class TransportIDError(ValueError):
    """A TransportID that is not a well-formed iSCSI TransportID.

    ``offset`` is the byte of the parameter list at fault, for the
    sense-key-specific field pointer.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class UnitAttentionPost:
    """A unit attention the logical unit must establish.

    ``nexuses`` holds initiator port names ("iqn...,i,0x<isid>"); every I_T
    nexus of those initiator ports gets the condition. ``None`` means every
    I_T nexus except the one that issued the command.
    """

    asc_ascq: tuple[int, int]
    nexuses: frozenset[str] | None


class PROutResult(list[UnitAttentionPost]):
    """The unit attentions of a PERSISTENT RESERVE OUT command (a list), plus
    ``abort``: for PREEMPT AND ABORT, the initiator ports whose tasks the
    caller must abort on this logical unit (SPC-4 §5.9.11.5); empty otherwise."""

    def __init__(self, posts: Iterable[UnitAttentionPost] = (), abort: frozenset[str] = frozenset()) -> None:
        super().__init__(posts)
        self.abort = abort


RegId = tuple[str, int | None, str | None]


@dataclass(frozen=True, slots=True)
class Registration:
    """One registration (SPC-4 §5.9.7).

    ``isid`` None: every initiator port of that iSCSI name (a TransportID of
    format 00b named the node, not a port). ``target_port`` None: the
    registration was made with ALL_TG_PT=1 and holds through every target
    port.
    """

    initiator_name: str
    isid: int | None
    target_port: str | None
    relative_port_id: int
    key: int

    @property
    def ident(self) -> RegId:
        """Identity of the I_T nexus (or nexus set) this registration names."""
        return (self.initiator_name.lower(), self.isid, self.target_port)

    def matches(self, nexus: Nexus) -> bool:
        """True when ``nexus`` is one of the I_T nexuses this covers."""
        return (
            self.initiator_name.lower() == nexus.initiator_name.lower()
            and (self.isid is None or self.isid == nexus.isid)
            and (self.target_port is None or self.target_port == nexus.target_port)
        )

    def specificity(self) -> int:
        """Higher for narrower registrations (the one that wins a lookup)."""
        return (2 if self.isid is not None else 0) + (1 if self.target_port is not None else 0)

    @property
    def initiator_port(self) -> str | None:
        """The initiator port name, when the registration names one port."""
        if self.isid is None:
            return None
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    def transport_id(self) -> bytes:
        """The iSCSI TransportID of the initiator (SPC-4 §7.6.4.6)."""
        return build_transport_id(self.initiator_name, self.isid)


@dataclass(frozen=True, slots=True)
class _Reservation:
    type: PRType
    #: The holding registration; None for all-registrants types, where every
    #: registered I_T nexus is a holder (SPC-4 §5.9.10).
    holder: RegId | None


class _Access(IntEnum):
    """How a command is treated by the conflict tables."""

    ALLOWED = 0  # "Allowed" in every column
    READ = 1  # allowed for Write Exclusive types, conflicts for Exclusive Access
    EXCLUSIVE = 2  # conflicts unless holder / registrant of an RO or AR type
    RESERVE = 3  # RESERVE/RELEASE(6/10): SPC-4 §5.9.3 exceptions


_ALWAYS = frozenset(
    {
        Opcode.TEST_UNIT_READY,
        Opcode.REQUEST_SENSE,
        Opcode.INQUIRY,
        Opcode.LOG_SENSE,
        Opcode.READ_CAPACITY_10,
        Opcode.REPORT_LUNS,
        Opcode.MAINTENANCE_IN,  # REPORT TARGET PORT GROUPS, REPORT SUPPORTED ...
        Opcode.PERSISTENT_RESERVE_IN,
        Opcode.PERSISTENT_RESERVE_OUT,  # checked by the service action itself
        Opcode.GET_EVENT_STATUS_NOTIFICATION,
        Opcode.MECHANISM_STATUS,
    }
)
_READS = frozenset(
    {
        Opcode.READ_6,
        Opcode.READ_10,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.VERIFY_10,
        Opcode.VERIFY_12,
        Opcode.VERIFY_16,
        Opcode.PRE_FETCH_10,
        Opcode.PRE_FETCH_16,
        Opcode.READ_DEFECT_DATA_10,
        Opcode.READ_DEFECT_DATA_12,
        Opcode.READ_CD,
        Opcode.READ_TOC_PMA_ATIP,
        Opcode.GET_CONFIGURATION,
        Opcode.READ_DISC_INFORMATION,
        Opcode.READ_FORMAT_CAPACITIES,
    }
)
_RESERVE_RELEASE = frozenset({Opcode.RESERVE_6, Opcode.RESERVE_10, Opcode.RELEASE_6, Opcode.RELEASE_10})
#: SPC-2 §5.5.1 and Annex B column [A]: what another initiator may still do
#: while the logical unit is reserved with RESERVE(6/10).
_SPC2_ALLOWED = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.LOG_SENSE,
        Opcode.READ_CAPACITY_10,
        Opcode.RELEASE_6,  # completes GOOD without releasing (SPC-2 §7.17)
        Opcode.RELEASE_10,
        Opcode.MAINTENANCE_IN,
    }
)
_READ_MEDIA_SERIAL_NUMBER = 0xAB


def _service_action(cdb: bytes) -> int | None:
    """SERVICE ACTION of a SERVICE ACTION IN(16) / READ MEDIA SERIAL NUMBER
    CDB (SPC-4 §4.2.5.1), None when the CDB is too short to carry one."""
    return cdb[1] & 0x1F if len(cdb) > 1 else None


def _allowing(cdb: bytes) -> bool:
    """PREVENT ALLOW MEDIUM REMOVAL with PREVENT=00b (allow removal), which
    no reservation forbids; a CDB the codec refuses counts as preventing."""
    try:
        return parse_prevent_allow_medium_removal(cdb).prevent == 0
    except CDBError:
        return False


def _starting(cdb: bytes) -> bool:
    """START STOP UNIT with START=1 and POWER CONDITION=0 (SBC-3 §4.17)."""
    try:
        cmd = parse_start_stop_unit(cdb)
    except CDBError:
        return False
    return cmd.start and cmd.power_condition == 0


def _classify(cdb: bytes) -> _Access:
    """Place a CDB in the SPC-4 §5.9.1 (tables 43-45) / SBC-3 §4.17 rows."""
    op = cdb[0]
    if op in _ALWAYS:
        return _Access.ALLOWED
    if op in _READS:
        return _Access.READ
    if op in _RESERVE_RELEASE:
        return _Access.RESERVE
    if op == Opcode.SERVICE_ACTION_IN_16:
        sa = _service_action(cdb)
        if sa == ServiceActionIn16.READ_CAPACITY_16:
            return _Access.ALLOWED
        if sa == ServiceActionIn16.GET_LBA_STATUS:
            return _Access.READ
        return _Access.EXCLUSIVE
    if op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL:
        # PREVENT=0 (allow) never conflicts; preventing does.
        return _Access.ALLOWED if _allowing(cdb) else _Access.EXCLUSIVE
    if op == Opcode.START_STOP_UNIT:
        # SBC-3: START=1 with POWER CONDITION=0 is allowed, the rest conflicts.
        return _Access.ALLOWED if _starting(cdb) else _Access.EXCLUSIVE
    if op == _READ_MEDIA_SERIAL_NUMBER and _service_action(cdb) == 0x01:
        return _Access.ALLOWED
    # Writes, MODE SENSE/SELECT, LOG SELECT, buffers, diagnostics, EXTENDED
    # COPY, RECEIVE COPY RESULTS, SYNCHRONIZE CACHE, UNMAP, FORMAT UNIT ...
    # all read "Conflict" for every non-holder column except registrants of
    # a registrants-only or all-registrants reservation.
    return _Access.EXCLUSIVE


def _spc2_allowed(cdb: bytes) -> bool:
    """Commands an SPC-2 reservation lets other I_T nexuses run (SPC-2 §5.5.1)."""
    op = cdb[0]
    if op in _SPC2_ALLOWED:
        return True
    if op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL:
        return _allowing(cdb)
    if op == Opcode.SERVICE_ACTION_IN_16:
        return _service_action(cdb) == ServiceActionIn16.READ_CAPACITY_16
    return op == _READ_MEDIA_SERIAL_NUMBER and _service_action(cdb) == 0x01


# --- TransportIDs (SPC-4 §7.6.4.6) --------------------------------------------


def build_transport_id(name: str, isid: int | None) -> bytes:
    """An iSCSI TransportID: format 00b (name) when ``isid`` is None, else
    format 01b ("name,i,0x<ISID>"), NUL-terminated and padded to a multiple
    of four bytes with at least 20 bytes of name field (SPC-4 §7.6.4.6)."""
    text = name if isid is None else f"{name},i,0x{isid:012x}"
    raw = text.encode("utf-8") + b"\0"
    length = max(20, (len(raw) + 3) & ~3)
    fmt = 0x00 if isid is None else 0x40
    return _TID_HDR.pack(fmt | PROTOCOL_ID_ISCSI, length) + raw.ljust(length, b"\0")


def parse_transport_id(buf: Buffer, offset: int = 0) -> tuple[str, int | None, int]:
    """Decode the iSCSI TransportID at ``offset`` of ``buf``.

    Returns (iSCSI name, ISID or None for format 00b, bytes used). Raises
    TransportIDError naming the offending byte.
    """
    data = memoryview(buf)
    if offset + 4 > len(data):
        raise TransportIDError(f"TransportID at byte {offset} is truncated (needs 4 header bytes)", offset)
    b0, length = _TID_HDR.unpack_from(data, offset)
    if b0 & 0x0F != PROTOCOL_ID_ISCSI:
        raise TransportIDError(
            f"TransportID at byte {offset} has protocol identifier {b0 & 0x0F}, not iSCSI (5)", offset
        )
    fmt = b0 >> 6
    if fmt not in (0, 1):
        raise TransportIDError(f"TransportID at byte {offset} has unsupported format code {fmt}", offset)
    end = offset + 4 + length
    if end > len(data):
        raise TransportIDError(
            f"TransportID at byte {offset} announces {length} name bytes past the end of the list", offset + 2
        )
    field_bytes = bytes(data[offset + 4 : end])
    nul = field_bytes.find(b"\0")
    if nul <= 0:
        raise TransportIDError(f"TransportID at byte {offset} has no NUL-terminated iSCSI name", offset + 4)
    try:
        text = field_bytes[:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise TransportIDError(f"TransportID at byte {offset} has an iSCSI name that is not UTF-8", offset + 4)
    if fmt == 0:
        if ",i,0x" in text.lower():
            raise TransportIDError(f"TransportID at byte {offset} has format 00b but carries an ISID", offset)
        return text, None, 4 + length
    cut = text.lower().rfind(",i,0x")
    if cut <= 0:
        raise TransportIDError(f"TransportID at byte {offset} has format 01b but no ',i,0x' separator", offset + 4)
    isid_hex = text[cut + 5 :]
    if len(isid_hex) != 12:
        raise TransportIDError(f"TransportID at byte {offset} has ISID {isid_hex!r}, not 12 hex digits", offset + 4)
    try:
        isid = int(isid_hex, 16)
    except ValueError:
        raise TransportIDError(f"TransportID at byte {offset} has ISID {isid_hex!r}, not hexadecimal", offset + 4)
    return text[:cut], isid, 4 + length


# --- the reservation state ----------------------------------------------------


@dataclass(slots=True)
class _PRState:
    regs: dict[RegId, Registration] = field(default_factory=dict)
    reservation: _Reservation | None = None
    aptpl: bool = False
    generation: int = 0

    def copy(self) -> _PRState:
        return _PRState(dict(self.regs), self.reservation, self.aptpl, self.generation)
