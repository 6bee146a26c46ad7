"""What the SCSI codec modules share: the error types that carry sense
and the SPC-4 field pointer, constants not in :mod:`iscsi.scsi.constants`,
and the generic CDB layouts (SPC-4 §4.2).

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TypeAlias

from .constants import (
    Opcode,
    SenseKey,
)
from .sense import CheckCondition

Buffer: TypeAlias = bytes | bytearray | memoryview

# --- errors -------------------------------------------------------------------


class CDBError(CheckCondition, ValueError):
    """A CDB (or parameter list) the device server must refuse.

    It *is* the :class:`~iscsi.scsi.sense.CheckCondition` the target ends
    the command with: ILLEGAL REQUEST, the class's additional sense code,
    and the SPC-4 §4.5.2.4.2 field pointer, so a parser's refusal reaches
    the initiator unchanged (one error type from codec to wire). It is a
    ``ValueError`` too, for callers that only validate.

    Attributes:
        asc, ascq: the additional sense code to report (SPC-4 §4.5.6).
        field_offset: byte offset of the offending field (in the CDB when
            ``in_cdb``, else in the parameter list).
        bit: the most significant bit of the field within that byte, or None
            when the whole byte (or several) is the field (BPV = 0).
        in_cdb: the C/D bit of the field pointer.
        has_field_pointer: whether a sense-key-specific field pointer applies.
    """

    asc = 0x24  # INVALID FIELD IN CDB
    ascq = 0x00
    has_field_pointer = True

    def __init__(
        self,
        message: str,
        *,
        field_offset: int = 0,
        bit: int | None = None,
        in_cdb: bool = True,
    ) -> None:
        cls = type(self)
        pointer = cls.has_field_pointer
        super().__init__(
            SenseKey.ILLEGAL_REQUEST,
            cls.asc,
            cls.ascq,
            field_pointer=field_offset if pointer else None,
            bit_pointer=bit if pointer else None,
            cd=in_cdb,
        )
        self.args = (message,)
        self.field_offset = field_offset
        self.bit = bit
        self.in_cdb = in_cdb

    def __str__(self) -> str:
        return str(self.args[0])

    def sense_key_specific(self) -> bytes:
        """The 3 sense-key-specific bytes (SPC-4 §4.5.2.4.2 field pointer),
        or three zero bytes (SKSV = 0) when no field pointer applies."""
        if not self.has_field_pointer:
            return b"\x00\x00\x00"
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 7)
        return bytes((b0, (self.field_offset >> 8) & 0xFF, self.field_offset & 0xFF))


class CDBTooShort(CDBError):
    """The CDB is shorter than its operation code requires."""


class InvalidCDBField(CDBError):
    """A CDB field holds a value the standard forbids: INVALID FIELD IN CDB."""


class UnsupportedOpcode(CDBError):
    """Operation code (or CDB group) not known here: INVALID COMMAND OPERATION CODE."""

    asc = 0x20


class ParameterListError(CDBError):
    """INVALID FIELD IN PARAMETER LIST (26h/00h); the pointer is into the data."""

    asc = 0x26

    def __init__(
        self, message: str, *, field_offset: int = 0, bit: int | None = None
    ) -> None:
        super().__init__(message, field_offset=field_offset, bit=bit, in_cdb=False)


class ParameterListLengthError(CDBError):
    """PARAMETER LIST LENGTH ERROR (1Ah/00h): no field pointer."""

    asc = 0x1A
    has_field_pointer = False

    def __init__(self, message: str) -> None:
        super().__init__(message, in_cdb=False)


class SCSIDataError(ValueError):
    """Data returned by a device (INQUIRY, VPD, READ CAPACITY...) is malformed."""


# --- local constants (not in iscsi.scsi.constants) -----------------------------


class DesignatorType(IntEnum):
    """Device identification designator types, SPC-4 §7.8.6.1 table 592."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8


class CodeSet(IntEnum):
    """Designator code sets, SPC-4 §7.8.6.1 table 590."""

    BINARY = 0x1
    ASCII = 0x2
    UTF8 = 0x3


class Association(IntEnum):
    """What a designator names, SPC-4 §7.8.6.1 table 591."""

    LOGICAL_UNIT = 0x0
    TARGET_PORT = 0x1
    TARGET_DEVICE = 0x2


PROTOCOL_ID_ISCSI = 0x5  # SPC-4 §7.6.1 table 444
SELECT_REPORT_ALL = 0x02  # REPORT LUNS select report, SPC-4 §6.27


# --- generic helpers ---------------------------------------------------------------

# Generic layouts shared by many CDBs (op, byte1, ..., control).
_S6 = struct.Struct(">BBHBB")  # op b1 u16(2-3) b4 ctl
_S10 = struct.Struct(">BBIBHB")  # op b1 u32(2-5) b6 u16(7-8) ctl
_S12 = struct.Struct(">BBIIBB")  # op b1 u32(2-5) u32(6-9) b10 ctl
_S16 = struct.Struct(">BBQIBB")  # op b1 u64(2-9) u32(10-13) b14 ctl
_SCAW = struct.Struct(">BBQ3xBBB")  # COMPARE AND WRITE: op b1 lba . . . n grp ctl
_SMAINT_IN = struct.Struct(">BBBBHIxB")  # MAINTENANCE IN (12)

_GROUP_SIZES = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
_LENGTH_BY_GROUP = tuple(_GROUP_SIZES.get(g, 0) for g in range(8))


def cdb_length(opcode: int) -> int:
    """CDB length for ``opcode`` from its group code (SPC-4 §4.2.5.1).

    Group 3 (0x60-0x7F: reserved, EXTENDED CDB and variable length) and the
    vendor-specific groups 6/7 have no fixed length and raise
    :class:`UnsupportedOpcode`.
    """
    if not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode {opcode!r} outside 0..255")
    try:
        return _GROUP_SIZES[opcode >> 5]
    except KeyError:
        raise UnsupportedOpcode(
            f"opcode {opcode:#04x} (group {opcode >> 5}) has no fixed CDB length",
            field_offset=0,
        ) from None


def check_control(cdb: Buffer, *, naca_supported: bool = False) -> int:
    """Return the CONTROL byte (the last byte of a fixed-length CDB, SAM-5
    §5.2) and refuse NACA = 1 when ACA is not supported: SAM-5 §5.9.1 asks
    for INVALID FIELD IN CDB pointing at the NACA bit (bit 2)."""
    if not cdb:
        raise CDBTooShort("empty CDB", field_offset=0)
    # Run for every command the target receives: the group table by index
    # rather than cdb_length()'s checks and exception.
    size = _LENGTH_BY_GROUP[cdb[0] >> 5]
    if not size:
        cdb_length(cdb[0])  # raises UnsupportedOpcode with its message
    if len(cdb) < size:
        raise CDBTooShort(
            f"{_name(cdb[0])} CDB is {len(cdb)} bytes, needs {size}", field_offset=0
        )
    control = cdb[size - 1]
    if control & 0x04 and not naca_supported:
        raise InvalidCDBField(
            "NACA=1 but ACA is not supported", field_offset=size - 1, bit=2
        )
    return control


def _name(op: int) -> str:
    try:
        return Opcode(op).name.replace("_", " ")
    except ValueError:
        return f"opcode {op:#04x}"


def _check(cdb: Buffer, ops: int | tuple[int, ...], size: int) -> int:
    """Check length and opcode; return the opcode."""
    if len(cdb) == 0:
        raise CDBTooShort("empty CDB", field_offset=0)
    op = cdb[0]
    if op != ops if isinstance(ops, int) else op not in ops:
        expect = _name(ops) if isinstance(ops, int) else "/".join(_name(o) for o in ops)
        raise CDBError(f"{_name(op)} is not a {expect} CDB", field_offset=0)
    if len(cdb) < size:
        raise CDBTooShort(
            f"{_name(op)} CDB is {len(cdb)} bytes, needs {size}", field_offset=0
        )
    return op


def _check_sa(cdb: Buffer, op: int, sa: int, size: int, what: str) -> None:
    _check(cdb, op, size)
    if cdb[1] & 0x1F != sa:
        raise CDBError(
            f"service action {cdb[1] & 0x1F:#04x} is not {what}", field_offset=1, bit=4
        )


def _reserved(value: int, offset: int, what: str) -> None:
    """Refuse set bits in a field the device server checks as reserved.

    SPC-4 §4.5.6 lets a device server check reserved fields; when it does,
    a non-zero one is INVALID FIELD IN CDB and the bit pointer names the
    most significant offending bit (§4.5.2.4.2).
    """
    if value:
        raise InvalidCDBField(
            f"{what}: reserved bits {value:#04x} set",
            field_offset=offset,
            bit=value.bit_length() - 1,
        )


def _u(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} does not fit in {bits} bits")
    return value


def _bit(flag: bool, shift: int) -> int:
    return (1 << shift) if flag else 0


# Layouts used by commands of more than one module.
_SRC10 = struct.Struct(">BxI2xBB")
_SRDD10 = struct.Struct(">BxB4xHB")
_SRES6 = struct.Struct(">BBBHB")
_SRES10 = struct.Struct(">BBBB3xHB")
_SMS6 = struct.Struct(">BBBBBB")
_SMS10 = struct.Struct(">BBBB3xHB")
_SRCR = struct.Struct(">BBB7xIxB")
_SXCOPY = struct.Struct(">BB8xIxB")
