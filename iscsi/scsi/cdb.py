"""SCSI command descriptor blocks: builders, parsers and returned-data codecs.

No transport here (SAM-5 keeps SCSI apart from iSCSI). Three kinds of code:

* ``build_*`` functions return CDB bytes. They take keyword arguments named
  like the fields of the matching dataclass, so ``build_x(**asdict(parse_x(c)))``
  rebuilds ``c`` (control byte 0). Bad arguments are programming errors:
  plain :class:`ValueError`.
* ``parse_*`` functions take a CDB from the wire and return a frozen
  dataclass, or raise a :class:`CDBError` subclass that carries what the
  target needs for its CHECK CONDITION: the additional sense code and the
  SPC-4 §4.5.2.4.2 field pointer (``field_offset``, ``bit``, C/D).
  :func:`parse_rw` is the hot path for all READ/WRITE-family commands and
  :func:`parse_cdb` dispatches on the operation code.
* Codecs for data returned to the initiator (standard INQUIRY, VPD pages,
  READ CAPACITY, REPORT LUNS, GET LBA STATUS) and for parameter lists
  (UNMAP, PERSISTENT RESERVE OUT). Malformed returned data raises
  :class:`SCSIDataError`; a malformed parameter list raises the
  :class:`CDBError` subclasses with C/D = 0.

All multi-byte fields are big-endian (SPC-4 §3.5.3). Layouts are precompiled
:class:`struct.Struct` objects; nothing loops per byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, TypeAlias

from .constants import (
    MaintenanceIn,
    Opcode,
    PRInAction,
    PROutAction,
    PRType,
    ServiceActionIn16,
    VPDPage,
)

Buffer: TypeAlias = bytes | bytearray | memoryview

# --- errors -------------------------------------------------------------------


class CDBError(ValueError):
    """A CDB (or parameter list) the device server must refuse.

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
        super().__init__(message)
        self.field_offset = field_offset
        self.bit = bit
        self.in_cdb = in_cdb

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
    size = cdb_length(cdb[0])
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


def _u(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} does not fit in {bits} bits")
    return value


def _bit(flag: bool, shift: int) -> int:
    return (1 << shift) if flag else 0


# --- READ / WRITE family (the hot path) ---------------------------------------------


class RWKind(IntEnum):
    """Which data-transfer command family a CDB belongs to."""

    READ = 0
    WRITE = 1
    VERIFY = 2
    WRITE_AND_VERIFY = 3
    WRITE_SAME = 4
    COMPARE_AND_WRITE = 5
    ORWRITE = 6


class RWCommand(NamedTuple):
    """A parsed READ/WRITE/VERIFY/WRITE AND VERIFY/WRITE SAME/COMPARE AND
    WRITE/ORWRITE CDB (SBC-3 §5).

    A NamedTuple rather than a frozen dataclass because this is built for
    every I/O on the target's hot path and tuple construction is several
    times cheaper; it is just as immutable and typed.

    ``blocks`` is the TRANSFER / VERIFICATION LENGTH or NUMBER OF LOGICAL
    BLOCKS as the device server sees it: READ(6)/WRITE(6) 0 is already
    turned into 256 (SBC-3 §5.16); for the other commands 0 stays 0 (no
    transfer; for WRITE SAME "to the end", SBC-3 §5.42). ``protect`` is
    RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT.
    """

    kind: RWKind
    opcode: int
    lba: int
    blocks: int
    dpo: bool = False
    fua: bool = False
    group: int = 0
    protect: int = 0
    bytchk: int = 0
    unmap: bool = False
    anchor: bool = False
    ndob: bool = False

    @property
    def data_out_blocks(self) -> int:
        """Logical blocks of Data-Out the command carries (SBC-3 §5)."""
        k = self.kind
        if k is RWKind.WRITE or k is RWKind.ORWRITE:
            return self.blocks
        if k is RWKind.COMPARE_AND_WRITE:
            return 2 * self.blocks  # verify data then write data, SBC-3 §5.2
        if k is RWKind.WRITE_SAME:
            return 0 if self.ndob else 1
        if k is RWKind.WRITE_AND_VERIFY:
            return self.blocks
        if k is RWKind.VERIFY:
            # SBC-4 BYTCHK: 00b no data, 01b the blocks to compare, 11b one
            # block compared against every block in the range.
            return self.blocks if self.bytchk == 1 else (1 if self.bytchk == 3 else 0)
        return 0

    @property
    def data_in_blocks(self) -> int:
        """Logical blocks of Data-In the command returns."""
        return self.blocks if self.kind is RWKind.READ else 0


_RW_KIND: dict[int, RWKind] = {
    Opcode.READ_6: RWKind.READ,
    Opcode.READ_10: RWKind.READ,
    Opcode.READ_12: RWKind.READ,
    Opcode.READ_16: RWKind.READ,
    Opcode.WRITE_6: RWKind.WRITE,
    Opcode.WRITE_10: RWKind.WRITE,
    Opcode.WRITE_12: RWKind.WRITE,
    Opcode.WRITE_16: RWKind.WRITE,
    Opcode.VERIFY_10: RWKind.VERIFY,
    Opcode.VERIFY_12: RWKind.VERIFY,
    Opcode.VERIFY_16: RWKind.VERIFY,
    Opcode.WRITE_AND_VERIFY_10: RWKind.WRITE_AND_VERIFY,
    Opcode.WRITE_AND_VERIFY_12: RWKind.WRITE_AND_VERIFY,
    Opcode.WRITE_AND_VERIFY_16: RWKind.WRITE_AND_VERIFY,
    Opcode.WRITE_SAME_10: RWKind.WRITE_SAME,
    Opcode.WRITE_SAME_16: RWKind.WRITE_SAME,
    Opcode.COMPARE_AND_WRITE: RWKind.COMPARE_AND_WRITE,
    Opcode.ORWRITE_16: RWKind.ORWRITE,
}
# Plain-int keys: dict lookup with an int hashes the same, and the hot path
# indexes with cdb[0] (an int).
_RW_KIND_INT: dict[int, RWKind] = {int(k): v for k, v in _RW_KIND.items()}

_READ, _WRITE, _VERIFY, _WAV, _WS, _CAW, _ORW = (
    RWKind.READ,
    RWKind.WRITE,
    RWKind.VERIFY,
    RWKind.WRITE_AND_VERIFY,
    RWKind.WRITE_SAME,
    RWKind.COMPARE_AND_WRITE,
    RWKind.ORWRITE,
)


# tuple.__new__ skips the NamedTuple's generated __new__ (a Python-level call).
_new_tuple = tuple.__new__


def _rw_short(cdb: Buffer, need: int) -> CDBTooShort:
    return CDBTooShort(
        f"{_name(cdb[0])} CDB is {len(cdb)} bytes, needs {need}", field_offset=0
    )


def _rw_finish(
    kind: RWKind, op: int, b1: int, lba: int, n: int, group: int, is16: bool
) -> RWCommand:
    protect = b1 >> 5
    if kind is _READ or kind is _WRITE or kind is _ORW or kind is _CAW:
        return RWCommand(
            kind, op, lba, n, bool(b1 & 0x10), bool(b1 & 0x08), group, protect
        )
    if kind is _WS:
        anchor = bool(b1 & 0x10)
        unmap = bool(b1 & 0x08)
        if anchor and not unmap:
            # SBC-3 §5.42/§5.43: ANCHOR without UNMAP is an invalid field.
            raise InvalidCDBField(
                "WRITE SAME with ANCHOR=1 needs UNMAP=1", field_offset=1, bit=4
            )
        return RWCommand(
            kind,
            op,
            lba,
            n,
            False,
            False,
            group,
            protect,
            0,
            unmap,
            anchor,
            is16 and bool(b1 & 1),
        )
    bytchk = (b1 >> 1) & 3
    # SBC-4: BYTCHK 10b is reserved for VERIFY; 1xb for WRITE AND VERIFY.
    if bytchk == 2 or (bytchk == 3 and kind is _WAV):
        raise InvalidCDBField(
            f"{_name(op)}: reserved BYTCHK value {bytchk}", field_offset=1, bit=2
        )
    return RWCommand(kind, op, lba, n, bool(b1 & 0x10), False, group, protect, bytchk)


def _rw6(cdb: Buffer) -> RWCommand:
    if len(cdb) < 6:
        raise _rw_short(cdb, 6)
    op, b1, lo, n, _ = _S6.unpack_from(cdb)
    # SBC-3 §5.16/§5.50: 21-bit LBA; TRANSFER LENGTH 0 means 256 blocks.
    return RWCommand(_RW_KIND_INT[op], op, ((b1 & 0x1F) << 16) | lo, n or 256)


# OPERATION CODE, byte 1, LBA and TRANSFER LENGTH of the 10/12/16-byte
# READ/WRITE-family CDBs (SBC-3 §5); GROUP NUMBER is read by index, since
# the 10-byte form has it before the length and the others after.
_SRW10 = struct.Struct(">BBIxH")
_SRW12 = struct.Struct(">BBII")
_SRW16 = struct.Struct(">BBQI")


def _rw_parser(
    size: int, layout: struct.Struct, group_at: int
) -> Callable[[Buffer], RWCommand]:
    """The parser of one size of READ/WRITE-family CDB (10, 12 or 16)."""
    unpack_from = layout.unpack_from
    is16 = size == 16

    def parse(cdb: Buffer) -> RWCommand:
        if len(cdb) < size:
            raise _rw_short(cdb, size)
        op, b1, lba, n = unpack_from(cdb)
        kind = _RW_KIND_INT[op]
        if kind is _READ or kind is _WRITE:  # the hot case, inlined
            return _new_tuple(
                RWCommand,
                (
                    kind,
                    op,
                    lba,
                    n,
                    b1 & 0x10 != 0,
                    b1 & 0x08 != 0,
                    cdb[group_at] & 0x3F,
                    b1 >> 5,
                    0,
                    False,
                    False,
                    False,
                ),
            )
        return _rw_finish(kind, op, b1, lba, n, cdb[group_at] & 0x3F, is16)

    return parse


_rw10 = _rw_parser(10, _SRW10, 6)
_rw12 = _rw_parser(12, _SRW12, 10)
_rw16 = _rw_parser(16, _SRW16, 14)


def _caw(cdb: Buffer) -> RWCommand:
    if len(cdb) < 16:
        raise _rw_short(cdb, 16)
    op, b1, lba, n, g, _ = _SCAW.unpack_from(cdb)
    return _rw_finish(_CAW, op, b1, lba, n, g & 0x3F, True)


_RW_PARSERS: dict[int, Callable[[Buffer], RWCommand]] = {}
for _op, _kind in _RW_KIND_INT.items():
    if _op == Opcode.COMPARE_AND_WRITE:
        _RW_PARSERS[_op] = _caw
    else:
        _RW_PARSERS[_op] = {0: _rw6, 1: _rw10, 2: _rw10, 5: _rw12, 4: _rw16}[_op >> 5]
del _op, _kind

RW_OPCODES: frozenset[int] = frozenset(_RW_PARSERS)


def is_rw(opcode: int) -> bool:
    """True when ``opcode`` is handled by :func:`parse_rw`."""
    return opcode in _RW_PARSERS


def parse_rw(cdb: Buffer) -> RWCommand:
    """Parse any READ/WRITE/VERIFY/WRITE AND VERIFY/WRITE SAME/COMPARE AND
    WRITE/ORWRITE CDB (all sizes). Raises :class:`UnsupportedOpcode` for
    other opcodes, :class:`CDBTooShort` / :class:`InvalidCDBField` otherwise."""
    if not cdb:
        raise CDBTooShort("empty CDB", field_offset=0)
    parser = _RW_PARSERS.get(cdb[0])
    if parser is None:
        raise UnsupportedOpcode(
            f"{_name(cdb[0])} is not a read/write command", field_offset=0
        )
    return parser(cdb)


def _rw_byte1(cmd: RWCommand, size: int) -> int:
    k = cmd.kind
    _u(cmd.protect, 3, "protect")
    b1 = cmd.protect << 5
    if k is _READ or k is _WRITE or k is _ORW or k is _CAW:
        if cmd.bytchk or cmd.unmap or cmd.anchor or cmd.ndob:
            raise ValueError(f"{k.name} has no BYTCHK/UNMAP/ANCHOR/NDOB")
        return b1 | _bit(cmd.dpo, 4) | _bit(cmd.fua, 3)
    if k is _WS:
        if cmd.dpo or cmd.fua or cmd.bytchk:
            raise ValueError("WRITE SAME has no DPO/FUA/BYTCHK")
        if cmd.anchor and not cmd.unmap:
            raise ValueError("WRITE SAME: ANCHOR needs UNMAP")
        if cmd.ndob and size != 16:
            raise ValueError("NDOB exists only in WRITE SAME(16)")
        return b1 | _bit(cmd.anchor, 4) | _bit(cmd.unmap, 3) | _bit(cmd.ndob, 0)
    if cmd.fua or cmd.unmap or cmd.anchor or cmd.ndob:
        raise ValueError(f"{k.name} has no FUA/UNMAP/ANCHOR/NDOB")
    if cmd.bytchk == 2 or (k is _WAV and cmd.bytchk == 3) or not 0 <= cmd.bytchk <= 3:
        raise ValueError(f"{k.name}: invalid BYTCHK {cmd.bytchk}")
    return b1 | _bit(cmd.dpo, 4) | (cmd.bytchk << 1)


def build_rw(cmd: RWCommand) -> bytes:
    """Encode an :class:`RWCommand` with its ``opcode``'s layout (inverse of
    :func:`parse_rw`). Fields the opcode cannot carry must be left default."""
    op = cmd.opcode
    kind = _RW_KIND_INT.get(op)
    if kind is None:
        raise ValueError(f"{_name(op)} is not a read/write opcode")
    if kind is not cmd.kind:
        raise ValueError(f"opcode {_name(op)} is {kind.name}, not {cmd.kind.name}")
    _u(cmd.group, 6, "group")
    if op == Opcode.COMPARE_AND_WRITE:
        return _SCAW.pack(
            op,
            _rw_byte1(cmd, 16),
            _u(cmd.lba, 64, "lba"),
            _u(cmd.blocks, 8, "blocks"),
            cmd.group,
            0,
        )
    size = cdb_length(op)
    if size == 6:
        if not 1 <= cmd.blocks <= 256:
            raise ValueError(f"{_name(op)} transfers 1..256 blocks, not {cmd.blocks}")
        if cmd.dpo or cmd.fua or cmd.group or cmd.protect:
            raise ValueError(f"{_name(op)} has no DPO/FUA/group/protect fields")
        lba = _u(cmd.lba, 21, "lba")
        return _S6.pack(op, lba >> 16, lba & 0xFFFF, cmd.blocks & 0xFF, 0)
    b1 = _rw_byte1(cmd, size)
    if size == 10:
        return _S10.pack(
            op, b1, _u(cmd.lba, 32, "lba"), cmd.group, _u(cmd.blocks, 16, "blocks"), 0
        )
    if size == 12:
        return _S12.pack(
            op, b1, _u(cmd.lba, 32, "lba"), _u(cmd.blocks, 32, "blocks"), cmd.group, 0
        )
    return _S16.pack(
        op, b1, _u(cmd.lba, 64, "lba"), _u(cmd.blocks, 32, "blocks"), cmd.group, 0
    )


_SIZED: dict[RWKind, dict[int, Opcode]] = {
    RWKind.READ: {
        6: Opcode.READ_6,
        10: Opcode.READ_10,
        12: Opcode.READ_12,
        16: Opcode.READ_16,
    },
    RWKind.WRITE: {
        6: Opcode.WRITE_6,
        10: Opcode.WRITE_10,
        12: Opcode.WRITE_12,
        16: Opcode.WRITE_16,
    },
    RWKind.VERIFY: {10: Opcode.VERIFY_10, 12: Opcode.VERIFY_12, 16: Opcode.VERIFY_16},
    RWKind.WRITE_AND_VERIFY: {
        10: Opcode.WRITE_AND_VERIFY_10,
        12: Opcode.WRITE_AND_VERIFY_12,
        16: Opcode.WRITE_AND_VERIFY_16,
    },
    RWKind.WRITE_SAME: {10: Opcode.WRITE_SAME_10, 16: Opcode.WRITE_SAME_16},
}


def _pick(kind: RWKind, size: int | None, lba: int, blocks: int) -> int:
    sizes = _SIZED[kind]
    if size is None:
        # Smallest of 10/16 that holds the fields (READ(6) only on request).
        size = 10 if lba < (1 << 32) and blocks < (1 << 16) else 16
    try:
        return sizes[size]
    except KeyError:
        raise ValueError(
            f"{kind.name} has no {size}-byte CDB (have {sorted(sizes)})"
        ) from None


def build_read(
    lba: int,
    blocks: int,
    *,
    size: int | None = None,
    dpo: bool = False,
    fua: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """READ(6/10/12/16) (SBC-3 §5.11-§5.16); ``size`` None picks 10 or 16."""
    op = _pick(RWKind.READ, size, lba, blocks)
    return build_rw(RWCommand(RWKind.READ, op, lba, blocks, dpo, fua, group, protect))


def build_write(
    lba: int,
    blocks: int,
    *,
    size: int | None = None,
    dpo: bool = False,
    fua: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """WRITE(6/10/12/16) (SBC-3 §5.45-§5.50); ``size`` None picks 10 or 16."""
    op = _pick(RWKind.WRITE, size, lba, blocks)
    return build_rw(RWCommand(RWKind.WRITE, op, lba, blocks, dpo, fua, group, protect))


def build_verify(
    lba: int,
    blocks: int,
    *,
    size: int | None = None,
    bytchk: int = 0,
    dpo: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """VERIFY(10/12/16) (SBC-3 §5.33-§5.35); ``protect`` is VRPROTECT."""
    op = _pick(RWKind.VERIFY, size, lba, blocks)
    return build_rw(
        RWCommand(RWKind.VERIFY, op, lba, blocks, dpo, False, group, protect, bytchk)
    )


def build_write_and_verify(
    lba: int,
    blocks: int,
    *,
    size: int | None = None,
    bytchk: int = 0,
    dpo: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """WRITE AND VERIFY(10/12/16) (SBC-3 §5.38-§5.40)."""
    op = _pick(RWKind.WRITE_AND_VERIFY, size, lba, blocks)
    return build_rw(
        RWCommand(
            RWKind.WRITE_AND_VERIFY, op, lba, blocks, dpo, False, group, protect, bytchk
        )
    )


def build_write_same(
    lba: int,
    blocks: int,
    *,
    size: int | None = None,
    unmap: bool = False,
    anchor: bool = False,
    ndob: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """WRITE SAME(10/16) (SBC-3 §5.42-§5.43); NDOB needs ``size=16``."""
    if ndob and size is None:
        size = 16
    op = _pick(RWKind.WRITE_SAME, size, lba, blocks)
    return build_rw(
        RWCommand(
            RWKind.WRITE_SAME,
            op,
            lba,
            blocks,
            False,
            False,
            group,
            protect,
            0,
            unmap,
            anchor,
            ndob,
        )
    )


def build_compare_and_write(
    lba: int,
    blocks: int,
    *,
    dpo: bool = False,
    fua: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """COMPARE AND WRITE (SBC-3 §5.2): ``blocks`` is NUMBER OF LOGICAL BLOCKS (≤ 255)."""
    return build_rw(
        RWCommand(
            RWKind.COMPARE_AND_WRITE,
            Opcode.COMPARE_AND_WRITE,
            lba,
            blocks,
            dpo,
            fua,
            group,
            protect,
        )
    )


def build_orwrite16(
    lba: int,
    blocks: int,
    *,
    dpo: bool = False,
    fua: bool = False,
    group: int = 0,
    protect: int = 0,
) -> bytes:
    """ORWRITE(16) (SBC-3 §5.9)."""
    return build_rw(
        RWCommand(
            RWKind.ORWRITE, Opcode.ORWRITE_16, lba, blocks, dpo, fua, group, protect
        )
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


def build_request_sense(*, desc: bool = False, allocation_length: int = 252) -> bytes:
    """REQUEST SENSE CDB; ``desc`` asks for descriptor-format sense."""
    return _SRS.pack(
        Opcode.REQUEST_SENSE,
        _bit(desc, 0),
        _u(allocation_length, 8, "allocation_length"),
        0,
    )


def parse_request_sense(cdb: Buffer) -> RequestSense:
    """Parse REQUEST SENSE."""
    _check(cdb, Opcode.REQUEST_SENSE, 6)
    _, b1, alloc, _ = _SRS.unpack_from(cdb)
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


_SRC10 = struct.Struct(">BxI2xBB")


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    """READ CAPACITY(10) (SBC-3 §5.15)."""

    lba: int = 0
    pmi: bool = False


def build_read_capacity10(*, lba: int = 0, pmi: bool = False) -> bytes:
    """READ CAPACITY(10) CDB."""
    if lba and not pmi:
        raise ValueError("READ CAPACITY(10) lba needs pmi=True")
    return _SRC10.pack(Opcode.READ_CAPACITY_10, _u(lba, 32, "lba"), _bit(pmi, 0), 0)


def parse_read_capacity10(cdb: Buffer) -> ReadCapacity10:
    """Parse READ CAPACITY(10); LBA without PMI is an invalid field (SBC-3 §5.15)."""
    _check(cdb, Opcode.READ_CAPACITY_10, 10)
    _, lba, b8, _ = _SRC10.unpack_from(cdb)
    pmi = bool(b8 & 1)
    if lba and not pmi:
        raise InvalidCDBField("READ CAPACITY(10) LBA set with PMI=0", field_offset=2)
    return ReadCapacity10(lba, pmi)


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    """READ CAPACITY(16) (SBC-3 §5.16): SERVICE ACTION IN(16) / 10h."""

    allocation_length: int = 32
    lba: int = 0
    pmi: bool = False


def build_read_capacity16(
    *, allocation_length: int = 32, lba: int = 0, pmi: bool = False
) -> bytes:
    """READ CAPACITY(16) CDB."""
    if lba and not pmi:
        raise ValueError("READ CAPACITY(16) lba needs pmi=True")
    return _S16.pack(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.READ_CAPACITY_16,
        _u(lba, 64, "lba"),
        _u(allocation_length, 32, "allocation_length"),
        _bit(pmi, 0),
        0,
    )


def parse_read_capacity16(cdb: Buffer) -> ReadCapacity16:
    """Parse READ CAPACITY(16)."""
    _check_sa(
        cdb,
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.READ_CAPACITY_16,
        16,
        "READ CAPACITY(16)",
    )
    _, _, lba, alloc, b14, _ = _S16.unpack_from(cdb)
    pmi = bool(b14 & 1)
    if lba and not pmi:
        raise InvalidCDBField("READ CAPACITY(16) LBA set with PMI=0", field_offset=2)
    return ReadCapacity16(alloc, lba, pmi)


@dataclass(frozen=True, slots=True)
class GetLbaStatus:
    """GET LBA STATUS (SBC-3 §5.4): SERVICE ACTION IN(16) / 12h."""

    lba: int = 0
    allocation_length: int = 24


def build_get_lba_status(*, lba: int = 0, allocation_length: int = 24) -> bytes:
    """GET LBA STATUS CDB."""
    return _S16.pack(
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.GET_LBA_STATUS,
        _u(lba, 64, "lba"),
        _u(allocation_length, 32, "allocation_length"),
        0,
        0,
    )


def parse_get_lba_status(cdb: Buffer) -> GetLbaStatus:
    """Parse GET LBA STATUS."""
    _check_sa(
        cdb,
        Opcode.SERVICE_ACTION_IN_16,
        ServiceActionIn16.GET_LBA_STATUS,
        16,
        "GET LBA STATUS",
    )
    _, _, lba, alloc, _, _ = _S16.unpack_from(cdb)
    return GetLbaStatus(lba, alloc)


@dataclass(frozen=True, slots=True)
class Unmap:
    """UNMAP (SBC-3 §5.28); the parameter list follows as Data-Out."""

    parameter_list_length: int = 0
    anchor: bool = False
    group: int = 0


def build_unmap(
    *, parameter_list_length: int = 0, anchor: bool = False, group: int = 0
) -> bytes:
    """UNMAP CDB; see :func:`build_unmap_parameter_list` for the data."""
    return _S10.pack(
        Opcode.UNMAP,
        _bit(anchor, 0),
        0,
        _u(group, 6, "group"),
        _u(parameter_list_length, 16, "parameter_list_length"),
        0,
    )


def parse_unmap(cdb: Buffer) -> Unmap:
    """Parse UNMAP; a list length of 1..7 is a PARAMETER LIST LENGTH ERROR (SBC-3 §5.28)."""
    _check(cdb, Opcode.UNMAP, 10)
    _, b1, _, g, n, _ = _S10.unpack_from(cdb)
    if 0 < n < 8:
        raise ParameterListLengthError(f"UNMAP parameter list length {n} is 1..7")
    return Unmap(n, bool(b1 & 1), g & 0x3F)


@dataclass(frozen=True, slots=True)
class _CacheRange:
    """The fields SYNCHRONIZE CACHE and PRE-FETCH share: the same layout
    in both sizes (SBC-3 §5.9-§5.10, §5.22-§5.23); ``blocks`` 0 = to the end."""

    lba: int = 0
    blocks: int = 0
    immed: bool = False
    group: int = 0
    cdb_size: int = 10


@dataclass(frozen=True, slots=True)
class SynchronizeCache(_CacheRange):
    """SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22-§5.23); ``blocks`` 0 = to the end."""


@dataclass(frozen=True, slots=True)
class PreFetch(_CacheRange):
    """PRE-FETCH(10/16) (SBC-3 §5.9-§5.10); ``blocks`` 0 = to the end."""


def _build_range(
    op10: int, op16: int, lba: int, blocks: int, immed: bool, group: int, cdb_size: int
) -> bytes:
    _u(group, 6, "group")
    if cdb_size == 10:
        return _S10.pack(
            op10, _bit(immed, 1), _u(lba, 32, "lba"), group, _u(blocks, 16, "blocks"), 0
        )
    if cdb_size == 16:
        return _S16.pack(
            op16, _bit(immed, 1), _u(lba, 64, "lba"), _u(blocks, 32, "blocks"), group, 0
        )
    raise ValueError(f"cdb_size must be 10 or 16, not {cdb_size}")


def _parse_range(cdb: Buffer, op10: int, op16: int) -> tuple[int, int, bool, int, int]:
    op = _check(cdb, (op10, op16), 1)
    if op == op10:
        _check(cdb, op10, 10)
        _, b1, lba, g, n, _ = _S10.unpack_from(cdb)
        return lba, n, bool(b1 & 2), g & 0x3F, 10
    _check(cdb, op16, 16)
    _, b1, lba, n, g, _ = _S16.unpack_from(cdb)
    return lba, n, bool(b1 & 2), g & 0x3F, 16


def build_synchronize_cache(
    *,
    lba: int = 0,
    blocks: int = 0,
    immed: bool = False,
    group: int = 0,
    cdb_size: int = 10,
) -> bytes:
    """SYNCHRONIZE CACHE(10) or (16) CDB."""
    return _build_range(
        Opcode.SYNCHRONIZE_CACHE_10,
        Opcode.SYNCHRONIZE_CACHE_16,
        lba,
        blocks,
        immed,
        group,
        cdb_size,
    )


def parse_synchronize_cache(cdb: Buffer) -> SynchronizeCache:
    """Parse SYNCHRONIZE CACHE(10/16)."""
    return SynchronizeCache(
        *_parse_range(cdb, Opcode.SYNCHRONIZE_CACHE_10, Opcode.SYNCHRONIZE_CACHE_16)
    )


def build_pre_fetch(
    *,
    lba: int = 0,
    blocks: int = 0,
    immed: bool = False,
    group: int = 0,
    cdb_size: int = 10,
) -> bytes:
    """PRE-FETCH(10) or (16) CDB."""
    return _build_range(
        Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16, lba, blocks, immed, group, cdb_size
    )


def parse_pre_fetch(cdb: Buffer) -> PreFetch:
    """Parse PRE-FETCH(10/16)."""
    return PreFetch(*_parse_range(cdb, Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16))


_SMS6 = struct.Struct(">BBBBBB")
_SMS10 = struct.Struct(">BBBB3xHB")


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
        return ModeSense(b2 & 0x3F, sub, b2 >> 6, bool(b1 & 8), False, alloc, 6)
    _check(cdb, op, 10)
    _, b1, b2, sub, alloc, _ = _SMS10.unpack_from(cdb)
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


def build_mode_select(
    *,
    parameter_list_length: int = 0,
    pf: bool = True,
    sp: bool = False,
    cdb_size: int = 6,
) -> bytes:
    """MODE SELECT(6) or (10) CDB."""
    b1 = _bit(pf, 4) | _bit(sp, 0)
    if cdb_size == 6:
        return _SMSEL6.pack(
            Opcode.MODE_SELECT_6,
            b1,
            _u(parameter_list_length, 8, "parameter_list_length"),
            0,
        )
    if cdb_size == 10:
        return _SMSEL10.pack(
            Opcode.MODE_SELECT_10,
            b1,
            _u(parameter_list_length, 16, "parameter_list_length"),
            0,
        )
    raise ValueError(f"cdb_size must be 6 or 10, not {cdb_size}")


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


def build_start_stop_unit(
    *,
    start: bool = True,
    loej: bool = False,
    immed: bool = False,
    no_flush: bool = False,
    power_condition: int = 0,
    power_condition_modifier: int = 0,
) -> bytes:
    """START STOP UNIT CDB."""
    b4 = (
        (_u(power_condition, 4, "power_condition") << 4)
        | _bit(no_flush, 2)
        | _bit(loej, 1)
        | _bit(start, 0)
    )
    return _SSSU.pack(
        Opcode.START_STOP_UNIT,
        _bit(immed, 0),
        _u(power_condition_modifier, 4, "power_condition_modifier"),
        b4,
        0,
    )


def parse_start_stop_unit(cdb: Buffer) -> StartStopUnit:
    """Parse START STOP UNIT."""
    _check(cdb, Opcode.START_STOP_UNIT, 6)
    _, b1, b3, b4, _ = _SSSU.unpack_from(cdb)
    return StartStopUnit(
        bool(b4 & 1), bool(b4 & 2), bool(b1 & 1), bool(b4 & 4), b4 >> 4, b3 & 0x0F
    )


_SPAMR = struct.Struct(">B3xBB")


@dataclass(frozen=True, slots=True)
class PreventAllowMediumRemoval:
    """PREVENT ALLOW MEDIUM REMOVAL (SPC-4 §6.13 / SBC-3 §5.11)."""

    prevent: int = 0


def build_prevent_allow_medium_removal(*, prevent: int = 0) -> bytes:
    """PREVENT ALLOW MEDIUM REMOVAL CDB (``prevent`` 0..3)."""
    return _SPAMR.pack(
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, _u(prevent, 2, "prevent"), 0
    )


def parse_prevent_allow_medium_removal(cdb: Buffer) -> PreventAllowMediumRemoval:
    """Parse PREVENT ALLOW MEDIUM REMOVAL."""
    _check(cdb, Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 6)
    _, b4, _ = _SPAMR.unpack_from(cdb)
    return PreventAllowMediumRemoval(b4 & 3)


_SRES6 = struct.Struct(">BBBHB")
_SRES10 = struct.Struct(">BBBB3xHB")


@dataclass(frozen=True, slots=True)
class ReserveRelease:
    """RESERVE / RELEASE (6) and (10) (SPC-2 §7.21-§7.24, obsolete in SPC-4 but
    still sent by Windows clustering and some initiators).

    ``third_party_device_id`` is 3 bits in the 6-byte form, 8 bits in the
    10-byte form; ``longid`` and ``parameter_list_length`` exist only in the
    10-byte form. Extents are not supported (EXTENT=1 is an invalid field).
    """

    release: bool = False
    cdb_size: int = 10
    third_party: bool = False
    third_party_device_id: int = 0
    longid: bool = False
    parameter_list_length: int = 0


def build_reserve_release(
    *,
    release: bool = False,
    cdb_size: int = 10,
    third_party: bool = False,
    third_party_device_id: int = 0,
    longid: bool = False,
    parameter_list_length: int = 0,
) -> bytes:
    """RESERVE(6/10) or, with ``release``, RELEASE(6/10) CDB."""
    if cdb_size == 6:
        if longid or parameter_list_length:
            raise ValueError(
                "LONGID and parameter_list_length exist only in the 10-byte form"
            )
        op = Opcode.RELEASE_6 if release else Opcode.RESERVE_6
        b1 = _bit(third_party, 4) | (
            _u(third_party_device_id, 3, "third_party_device_id") << 1
        )
        return _SRES6.pack(op, b1, 0, 0, 0)
    if cdb_size == 10:
        op = Opcode.RELEASE_10 if release else Opcode.RESERVE_10
        return _SRES10.pack(
            op,
            _bit(third_party, 4) | _bit(longid, 1),
            0,
            _u(third_party_device_id, 8, "third_party_device_id"),
            _u(parameter_list_length, 16, "parameter_list_length"),
            0,
        )
    raise ValueError(f"cdb_size must be 6 or 10, not {cdb_size}")


def parse_reserve_release(cdb: Buffer) -> ReserveRelease:
    """Parse RESERVE/RELEASE (6/10)."""
    op = _check(
        cdb,
        (Opcode.RESERVE_6, Opcode.RELEASE_6, Opcode.RESERVE_10, Opcode.RELEASE_10),
        1,
    )
    release = op in (Opcode.RELEASE_6, Opcode.RELEASE_10)
    if op in (Opcode.RESERVE_6, Opcode.RELEASE_6):
        _check(cdb, op, 6)
        _, b1, _, _, _ = _SRES6.unpack_from(cdb)
        if b1 & 1:
            raise InvalidCDBField(
                f"{_name(op)}: extent reservations are not supported",
                field_offset=1,
                bit=0,
            )
        return ReserveRelease(release, 6, bool(b1 & 0x10), (b1 >> 1) & 7, False, 0)
    _check(cdb, op, 10)
    _, b1, _, dev, n, _ = _SRES10.unpack_from(cdb)
    if b1 & 1:
        raise InvalidCDBField(
            f"{_name(op)}: extent reservations are not supported", field_offset=1, bit=0
        )
    return ReserveRelease(release, 10, bool(b1 & 0x10), dev, bool(b1 & 2), n)


_SPRIN = struct.Struct(">BB5xHB")
_SPROUT = struct.Struct(">BBB2xIB")


@dataclass(frozen=True, slots=True)
class PersistentReserveIn:
    """PERSISTENT RESERVE IN (SPC-4 §6.15)."""

    service_action: int = PRInAction.READ_KEYS
    allocation_length: int = 1024


def build_persistent_reserve_in(
    *, service_action: int = PRInAction.READ_KEYS, allocation_length: int = 1024
) -> bytes:
    """PERSISTENT RESERVE IN CDB."""
    return _SPRIN.pack(
        Opcode.PERSISTENT_RESERVE_IN,
        _u(service_action, 5, "service_action"),
        _u(allocation_length, 16, "allocation_length"),
        0,
    )


def parse_persistent_reserve_in(cdb: Buffer) -> PersistentReserveIn:
    """Parse PERSISTENT RESERVE IN; unknown service actions are invalid fields."""
    _check(cdb, Opcode.PERSISTENT_RESERVE_IN, 10)
    _, b1, alloc, _ = _SPRIN.unpack_from(cdb)
    sa = b1 & 0x1F
    try:
        action = PRInAction(sa)
    except ValueError:
        raise InvalidCDBField(
            f"PERSISTENT RESERVE IN service action {sa:#x} unknown",
            field_offset=1,
            bit=4,
        ) from None
    return PersistentReserveIn(action, alloc)


_PR_SCOPED = frozenset(
    (
        PROutAction.RESERVE,
        PROutAction.RELEASE,
        PROutAction.PREEMPT,
        PROutAction.PREEMPT_AND_ABORT,
    )
)


@dataclass(frozen=True, slots=True)
class PersistentReserveOut:
    """PERSISTENT RESERVE OUT (SPC-4 §6.16); ``pr_type`` is the TYPE field."""

    service_action: int = PROutAction.REGISTER
    scope: int = 0
    pr_type: int = 0
    parameter_list_length: int = 24


def build_persistent_reserve_out(
    *,
    service_action: int = PROutAction.REGISTER,
    scope: int = 0,
    pr_type: int = 0,
    parameter_list_length: int = 24,
) -> bytes:
    """PERSISTENT RESERVE OUT CDB; the parameter list is :func:`build_pr_out_parameters`."""
    return _SPROUT.pack(
        Opcode.PERSISTENT_RESERVE_OUT,
        _u(service_action, 5, "service_action"),
        (_u(scope, 4, "scope") << 4) | _u(pr_type, 4, "pr_type"),
        _u(parameter_list_length, 32, "parameter_list_length"),
        0,
    )


def parse_persistent_reserve_out(cdb: Buffer) -> PersistentReserveOut:
    """Parse PERSISTENT RESERVE OUT.

    For the actions that use them (RESERVE, RELEASE, PREEMPT, PREEMPT AND
    ABORT), SCOPE must be LU_SCOPE (0) and TYPE a defined type (SPC-4 §6.16.2,
    §6.16.3); otherwise INVALID FIELD IN CDB.
    """
    _check(cdb, Opcode.PERSISTENT_RESERVE_OUT, 10)
    _, b1, b2, n, _ = _SPROUT.unpack_from(cdb)
    sa = b1 & 0x1F
    try:
        action = PROutAction(sa)
    except ValueError:
        raise InvalidCDBField(
            f"PERSISTENT RESERVE OUT service action {sa:#x} unknown",
            field_offset=1,
            bit=4,
        ) from None
    scope, pr_type = b2 >> 4, b2 & 0x0F
    if action in _PR_SCOPED:
        if scope != 0:
            raise InvalidCDBField(
                f"PERSISTENT RESERVE OUT scope {scope} is not LU_SCOPE",
                field_offset=2,
                bit=7,
            )
        try:
            PRType(pr_type)
        except ValueError:
            raise InvalidCDBField(
                f"PERSISTENT RESERVE OUT type {pr_type:#x} unknown",
                field_offset=2,
                bit=3,
            ) from None
    return PersistentReserveOut(action, scope, pr_type, n)


_SPRPARAM = struct.Struct(">QQ4xBxH")


@dataclass(frozen=True, slots=True)
class PRParameters:
    """The basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3).

    ``additional`` holds what follows the 24 bytes (with SPEC_I_PT: the
    TransportID parameter data length and TransportIDs), undecoded. The
    REGISTER AND MOVE list (§6.16.4) has another layout, not covered here.
    """

    reservation_key: int = 0
    service_action_key: int = 0
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    aptpl: bool = False
    additional: bytes = b""


def build_pr_out_parameters(
    *,
    reservation_key: int = 0,
    service_action_key: int = 0,
    spec_i_pt: bool = False,
    all_tg_pt: bool = False,
    aptpl: bool = False,
    additional: bytes = b"",
) -> bytes:
    """The 24-byte PERSISTENT RESERVE OUT parameter list (+ ``additional``)."""
    if additional and not spec_i_pt:
        raise ValueError("additional parameter data needs spec_i_pt=True")
    b20 = _bit(spec_i_pt, 3) | _bit(all_tg_pt, 2) | _bit(aptpl, 0)
    return (
        _SPRPARAM.pack(
            _u(reservation_key, 64, "reservation_key"),
            _u(service_action_key, 64, "service_action_key"),
            b20,
            0,
        )
        + additional
    )


def parse_pr_out_parameters(data: Buffer) -> PRParameters:
    """Parse the PERSISTENT RESERVE OUT parameter list.

    Fewer than 24 bytes, or more than 24 without SPEC_I_PT, is a PARAMETER
    LIST LENGTH ERROR (SPC-4 §6.16.3).
    """
    if len(data) < 24:
        raise ParameterListLengthError(
            f"PERSISTENT RESERVE OUT parameter list is {len(data)} bytes, needs 24"
        )
    rk, sak, b20, _ = _SPRPARAM.unpack_from(data)
    spec = bool(b20 & 8)
    if not spec and len(data) != 24:
        raise ParameterListLengthError(
            f"PERSISTENT RESERVE OUT parameter list is {len(data)} bytes; 24 expected without SPEC_I_PT"
        )
    return PRParameters(rk, sak, spec, bool(b20 & 4), bool(b20 & 1), bytes(data[24:]))


@dataclass(frozen=True, slots=True)
class ReportSupportedOpcodes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): MAINTENANCE IN / 0Ch."""

    reporting_options: int = 0
    requested_opcode: int = 0
    requested_service_action: int = 0
    rctd: bool = False
    allocation_length: int = 4096


def build_report_supported_opcodes(
    *,
    reporting_options: int = 0,
    requested_opcode: int = 0,
    requested_service_action: int = 0,
    rctd: bool = False,
    allocation_length: int = 4096,
) -> bytes:
    """REPORT SUPPORTED OPERATION CODES CDB."""
    if reporting_options > 3:
        raise ValueError(f"reporting_options {reporting_options} is reserved")
    return _SMAINT_IN.pack(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
        _bit(rctd, 7) | _u(reporting_options, 3, "reporting_options"),
        _u(requested_opcode, 8, "requested_opcode"),
        _u(requested_service_action, 16, "requested_service_action"),
        _u(allocation_length, 32, "allocation_length"),
        0,
    )


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


def build_report_supported_tmfs(
    *, repd: bool = False, allocation_length: int = 16
) -> bytes:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS CDB (allocation length >= 4)."""
    if allocation_length < 4:
        raise ValueError("allocation_length must be >= 4 (SPC-4 §6.36)")
    return _SMAINT_IN.pack(
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        _bit(repd, 7),
        0,
        0,
        _u(allocation_length, 32, "allocation_length"),
        0,
    )


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


def build_report_target_port_groups(
    *, parameter_data_format: int = 0, allocation_length: int = 1024
) -> bytes:
    """REPORT TARGET PORT GROUPS CDB (format 0 = length only, 1 = extended)."""
    return _SMAINT_IN.pack(
        Opcode.MAINTENANCE_IN,
        (_u(parameter_data_format, 3, "parameter_data_format") << 5)
        | MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
        0,
        0,
        0,
        _u(allocation_length, 32, "allocation_length"),
        0,
    )


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


_SRDD10 = struct.Struct(">BxB4xHB")


@dataclass(frozen=True, slots=True)
class ReadDefectData:
    """READ DEFECT DATA(10/12) (SBC-3 §5.17-§5.18)."""

    req_plist: bool = False
    req_glist: bool = False
    defect_list_format: int = 0
    allocation_length: int = 4
    address_descriptor_index: int = 0
    cdb_size: int = 10


def build_read_defect_data(
    *,
    req_plist: bool = False,
    req_glist: bool = False,
    defect_list_format: int = 0,
    allocation_length: int = 4,
    address_descriptor_index: int = 0,
    cdb_size: int = 10,
) -> bytes:
    """READ DEFECT DATA(10) or (12) CDB (descriptor index only in the 12-byte form)."""
    b = (
        _bit(req_plist, 4)
        | _bit(req_glist, 3)
        | _u(defect_list_format, 3, "defect_list_format")
    )
    if cdb_size == 10:
        if address_descriptor_index:
            raise ValueError(
                "address_descriptor_index exists only in READ DEFECT DATA(12)"
            )
        return _SRDD10.pack(
            Opcode.READ_DEFECT_DATA_10,
            b,
            _u(allocation_length, 16, "allocation_length"),
            0,
        )
    if cdb_size == 12:
        return _S12.pack(
            Opcode.READ_DEFECT_DATA_12,
            b,
            _u(address_descriptor_index, 32, "address_descriptor_index"),
            _u(allocation_length, 32, "allocation_length"),
            0,
            0,
        )
    raise ValueError(f"cdb_size must be 10 or 12, not {cdb_size}")


def parse_read_defect_data(cdb: Buffer) -> ReadDefectData:
    """Parse READ DEFECT DATA(10/12)."""
    op = _check(cdb, (Opcode.READ_DEFECT_DATA_10, Opcode.READ_DEFECT_DATA_12), 1)
    if op == Opcode.READ_DEFECT_DATA_10:
        _check(cdb, op, 10)
        _, b, alloc, _ = _SRDD10.unpack_from(cdb)
        return ReadDefectData(bool(b & 0x10), bool(b & 8), b & 7, alloc, 0, 10)
    _check(cdb, op, 12)
    _, b, idx, alloc, _, _ = _S12.unpack_from(cdb)
    return ReadDefectData(bool(b & 0x10), bool(b & 8), b & 7, alloc, idx, 12)


_SXCOPY = struct.Struct(">BB8xIxB")
_SRCR = struct.Struct(">BBB7xIxB")


@dataclass(frozen=True, slots=True)
class ExtendedCopy:
    """EXTENDED COPY (SPC-4 §6.3; LID1 is service action 0)."""

    parameter_list_length: int = 0
    service_action: int = 0


def build_extended_copy(
    *, parameter_list_length: int = 0, service_action: int = 0
) -> bytes:
    """EXTENDED COPY CDB (the parameter list is not built here)."""
    return _SXCOPY.pack(
        Opcode.EXTENDED_COPY,
        _u(service_action, 5, "service_action"),
        _u(parameter_list_length, 32, "parameter_list_length"),
        0,
    )


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


def build_receive_copy_results(
    *, service_action: int = 0, list_identifier: int = 0, allocation_length: int = 1024
) -> bytes:
    """RECEIVE COPY RESULTS CDB."""
    return _SRCR.pack(
        Opcode.RECEIVE_COPY_RESULTS,
        _u(service_action, 5, "service_action"),
        _u(list_identifier, 8, "list_identifier"),
        _u(allocation_length, 32, "allocation_length"),
        0,
    )


def parse_receive_copy_results(cdb: Buffer) -> ReceiveCopyResults:
    """Parse RECEIVE COPY RESULTS."""
    _check(cdb, Opcode.RECEIVE_COPY_RESULTS, 16)
    _, b1, lid, alloc, _ = _SRCR.unpack_from(cdb)
    return ReceiveCopyResults(b1 & 0x1F, lid, alloc)


# --- MMC (for CD/DVD ISO emulation) -----------------------------------------------

_STOC = struct.Struct(">BBB3xBHB")
_SGCONF = struct.Struct(">BBH3xHB")
_SGESN = struct.Struct(">BB2xB2xHB")


@dataclass(frozen=True, slots=True)
class ReadToc:
    """READ TOC/PMA/ATIP (MMC-6 §6.38)."""

    msf: bool = False
    toc_format: int = 0
    track_session_number: int = 0
    allocation_length: int = 804


def build_read_toc(
    *,
    msf: bool = False,
    toc_format: int = 0,
    track_session_number: int = 0,
    allocation_length: int = 804,
) -> bytes:
    """READ TOC/PMA/ATIP CDB."""
    return _STOC.pack(
        Opcode.READ_TOC_PMA_ATIP,
        _bit(msf, 1),
        _u(toc_format, 4, "toc_format"),
        _u(track_session_number, 8, "track_session_number"),
        _u(allocation_length, 16, "allocation_length"),
        0,
    )


def parse_read_toc(cdb: Buffer) -> ReadToc:
    """Parse READ TOC/PMA/ATIP (formats above 5 are reserved: invalid field)."""
    _check(cdb, Opcode.READ_TOC_PMA_ATIP, 10)
    _, b1, b2, track, alloc, _ = _STOC.unpack_from(cdb)
    fmt = b2 & 0x0F
    if fmt > 5:
        raise InvalidCDBField(f"READ TOC format {fmt} reserved", field_offset=2, bit=3)
    return ReadToc(bool(b1 & 2), fmt, track, alloc)


@dataclass(frozen=True, slots=True)
class GetConfiguration:
    """GET CONFIGURATION (MMC-6 §6.6); ``rt`` 0 all, 1 current, 2 one feature."""

    rt: int = 0
    starting_feature: int = 0
    allocation_length: int = 8


def build_get_configuration(
    *, rt: int = 0, starting_feature: int = 0, allocation_length: int = 8
) -> bytes:
    """GET CONFIGURATION CDB."""
    if rt == 3:
        raise ValueError("GET CONFIGURATION rt=3 is reserved")
    return _SGCONF.pack(
        Opcode.GET_CONFIGURATION,
        _u(rt, 2, "rt"),
        _u(starting_feature, 16, "starting_feature"),
        _u(allocation_length, 16, "allocation_length"),
        0,
    )


def parse_get_configuration(cdb: Buffer) -> GetConfiguration:
    """Parse GET CONFIGURATION (RT = 3 is reserved: invalid field)."""
    _check(cdb, Opcode.GET_CONFIGURATION, 10)
    _, b1, feat, alloc, _ = _SGCONF.unpack_from(cdb)
    rt = b1 & 3
    if rt == 3:
        raise InvalidCDBField("GET CONFIGURATION RT=3 reserved", field_offset=1, bit=1)
    return GetConfiguration(rt, feat, alloc)


@dataclass(frozen=True, slots=True)
class GetEventStatusNotification:
    """GET EVENT STATUS NOTIFICATION (MMC-6 §6.7)."""

    polled: bool = True
    notification_class_request: int = 0
    allocation_length: int = 8


def build_get_event_status_notification(
    *,
    polled: bool = True,
    notification_class_request: int = 0,
    allocation_length: int = 8,
) -> bytes:
    """GET EVENT STATUS NOTIFICATION CDB."""
    return _SGESN.pack(
        Opcode.GET_EVENT_STATUS_NOTIFICATION,
        _bit(polled, 0),
        _u(notification_class_request, 8, "notification_class_request"),
        _u(allocation_length, 16, "allocation_length"),
        0,
    )


def parse_get_event_status_notification(cdb: Buffer) -> GetEventStatusNotification:
    """Parse GET EVENT STATUS NOTIFICATION."""
    _check(cdb, Opcode.GET_EVENT_STATUS_NOTIFICATION, 10)
    _, b1, ncr, alloc, _ = _SGESN.unpack_from(cdb)
    return GetEventStatusNotification(bool(b1 & 1), ncr, alloc)


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


# --- parameter lists: UNMAP ----------------------------------------------------------

_SUNMAP_HDR = struct.Struct(">HH4x")
_SUNMAP_DESC = struct.Struct(">QI4x")


class UnmapDescriptor(NamedTuple):
    """One UNMAP block descriptor (SBC-3 §5.28.2)."""

    lba: int
    blocks: int


def build_unmap_parameter_list(descriptors: Sequence[tuple[int, int]]) -> bytes:
    """Encode UNMAP parameter data: 8-byte header + 16-byte descriptors."""
    n = len(descriptors)
    if 8 + 16 * n > 0xFFFF:
        raise ValueError(
            f"{n} UNMAP descriptors do not fit a 16-bit parameter list length"
        )
    out = bytearray(8 + 16 * n)
    _SUNMAP_HDR.pack_into(out, 0, 6 + 16 * n, 16 * n)
    for i, (lba, blocks) in enumerate(descriptors):
        _SUNMAP_DESC.pack_into(
            out, 8 + 16 * i, _u(lba, 64, "lba"), _u(blocks, 32, "blocks")
        )
    return bytes(out)


def parse_unmap_parameter_list(data: Buffer) -> tuple[UnmapDescriptor, ...]:
    """Decode UNMAP parameter data (SBC-3 §5.28.2).

    Empty data means nothing to unmap. 1..7 bytes is a PARAMETER LIST
    LENGTH ERROR. Descriptors come from the UNMAP BLOCK DESCRIPTOR DATA
    LENGTH, bounded by the bytes present; a trailing partial descriptor is
    ignored, as SBC-3 prescribes for a length not a multiple of 16. An UNMAP
    DATA LENGTH or descriptor length that claims more than was sent is an
    INVALID FIELD IN PARAMETER LIST.
    """
    if len(data) == 0:
        return ()
    if len(data) < 8:
        raise ParameterListLengthError(
            f"UNMAP parameter list of {len(data)} bytes is shorter than 8"
        )
    data_len, bd_len = _SUNMAP_HDR.unpack_from(data)
    if data_len + 2 > len(data):
        raise ParameterListError(
            f"UNMAP DATA LENGTH {data_len} exceeds the {len(data)} bytes sent",
            field_offset=0,
        )
    if bd_len + 8 > len(data):
        raise ParameterListError(
            f"UNMAP BLOCK DESCRIPTOR DATA LENGTH {bd_len} exceeds the {len(data)} bytes sent",
            field_offset=2,
        )
    count = bd_len // 16
    view = memoryview(data)[8 : 8 + 16 * count]
    return tuple(UnmapDescriptor(lba, n) for lba, n in _SUNMAP_DESC.iter_unpack(view))


# --- returned data: GET LBA STATUS ---------------------------------------------------

_SLBAS_HDR = struct.Struct(">I4x")
_SLBAS_DESC = struct.Struct(">QIB3x")


class ProvisioningStatus(IntEnum):
    """GET LBA STATUS provisioning status (SBC-3 §5.4.2 table 35)."""

    MAPPED = 0x0
    DEALLOCATED = 0x1
    ANCHORED = 0x2


class LbaStatusDescriptor(NamedTuple):
    """One LBA status descriptor (SBC-3 §5.4.2)."""

    lba: int
    blocks: int
    status: int


def build_lba_status_data(descriptors: Sequence[tuple[int, int, int]]) -> bytes:
    """Encode GET LBA STATUS parameter data (what a target returns)."""
    n = len(descriptors)
    out = bytearray(8 + 16 * n)
    _SLBAS_HDR.pack_into(out, 0, 4 + 16 * n)
    for i, (lba, blocks, status) in enumerate(descriptors):
        _SLBAS_DESC.pack_into(
            out,
            8 + 16 * i,
            _u(lba, 64, "lba"),
            _u(blocks, 32, "blocks"),
            _u(status, 4, "status"),
        )
    return bytes(out)


def parse_lba_status_data(data: Buffer) -> tuple[LbaStatusDescriptor, ...]:
    """Decode GET LBA STATUS data; a truncated final descriptor is dropped
    (the allocation length may cut the list)."""
    if len(data) < 8:
        raise SCSIDataError(f"GET LBA STATUS data is {len(data)} bytes, needs 8")
    (plen,) = _SLBAS_HDR.unpack_from(data)
    end = min(len(data), 4 + plen)
    count = max(0, end - 8) // 16
    view = memoryview(data)[8 : 8 + 16 * count]
    return tuple(
        LbaStatusDescriptor(lba, n, st & 0x0F)
        for lba, n, st in _SLBAS_DESC.iter_unpack(view)
    )


# --- returned data: READ CAPACITY ---------------------------------------------------

_SRC10DATA = struct.Struct(">II")
_SRC16DATA = struct.Struct(">QIBBH16x")


@dataclass(frozen=True, slots=True)
class ReadCapacity10Data:
    """READ CAPACITY(10) parameter data (SBC-3 §5.15.2)."""

    last_lba: int
    block_length: int

    @property
    def blocks(self) -> int:
        """Number of logical blocks (RETURNED LBA + 1)."""
        return self.last_lba + 1

    @property
    def needs_rc16(self) -> bool:
        """True when the capacity does not fit: LBA 0xffffffff means "use (16)"."""
        return self.last_lba == 0xFFFFFFFF


def build_read_capacity10_data(last_lba: int, block_length: int) -> bytes:
    """Encode READ CAPACITY(10) data; pass 0xffffffff if the LBA is too large."""
    return _SRC10DATA.pack(
        _u(min(last_lba, 0xFFFFFFFF), 32, "last_lba"),
        _u(block_length, 32, "block_length"),
    )


def parse_read_capacity10_data(data: Buffer) -> ReadCapacity10Data:
    """Decode READ CAPACITY(10) data (8 bytes)."""
    if len(data) < 8:
        raise SCSIDataError(f"READ CAPACITY(10) data is {len(data)} bytes, needs 8")
    return ReadCapacity10Data(*_SRC10DATA.unpack_from(data))


@dataclass(frozen=True, slots=True)
class ReadCapacity16Data:
    """READ CAPACITY(16) parameter data (SBC-3 §5.16.2)."""

    last_lba: int
    block_length: int
    prot_en: bool = False
    p_type: int = 0
    p_i_exponent: int = 0
    lbppbe: int = 0  # logical blocks per physical block exponent
    lbpme: bool = False
    lbprz: bool = False
    lowest_aligned_lba: int = 0

    @property
    def blocks(self) -> int:
        """Number of logical blocks (RETURNED LBA + 1)."""
        return self.last_lba + 1

    @property
    def physical_block_length(self) -> int:
        """Physical block size in bytes (block_length << LBPPBE)."""
        return self.block_length << self.lbppbe


def build_read_capacity16_data(d: ReadCapacity16Data) -> bytes:
    """Encode 32 bytes of READ CAPACITY(16) data."""
    b12 = (_u(d.p_type, 3, "p_type") << 1) | _bit(d.prot_en, 0)
    b13 = (_u(d.p_i_exponent, 4, "p_i_exponent") << 4) | _u(d.lbppbe, 4, "lbppbe")
    w14 = (
        _bit(d.lbpme, 15)
        | _bit(d.lbprz, 14)
        | _u(d.lowest_aligned_lba, 14, "lowest_aligned_lba")
    )
    return _SRC16DATA.pack(
        _u(d.last_lba, 64, "last_lba"),
        _u(d.block_length, 32, "block_length"),
        b12,
        b13,
        w14,
    )


def parse_read_capacity16_data(data: Buffer) -> ReadCapacity16Data:
    """Decode READ CAPACITY(16) data (at least 12 bytes; missing tail reads as 0)."""
    if len(data) < 12:
        raise SCSIDataError(
            f"READ CAPACITY(16) data is {len(data)} bytes, needs at least 12"
        )
    buf = bytes(data[:32]).ljust(32, b"\0")
    lba, bl, b12, b13, w14 = _SRC16DATA.unpack(buf)
    return ReadCapacity16Data(
        lba,
        bl,
        bool(b12 & 1),
        (b12 >> 1) & 7,
        b13 >> 4,
        b13 & 0x0F,
        bool(w14 & 0x8000),
        bool(w14 & 0x4000),
        w14 & 0x3FFF,
    )


# --- returned data: REPORT LUNS (SAM-5 §4.7) ------------------------------------------

MAX_LUN = 0x3FFF  # largest single-level LUN in flat space addressing

# The one implementation of single-level SAM LUN encoding in the project:
# iscsi.pdu (the 64-bit LUN field of a BHS, as an int) and target.scsi
# (REPORT LUNS data) use these functions.


def lun_to_u64(lun: int) -> int:
    """The 8-byte LUN of ``lun`` as a big-endian 64-bit integer: peripheral
    device addressing (bus 0) for 0..255, flat space addressing (01b) for
    256..16383 (SAM-5 §4.7.7, §4.7.9), as Linux and libiscsi do."""
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN {lun!r} outside 0..{MAX_LUN}")
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48


def lun_from_u64(v: int) -> int | None:
    """The LUN number of a single-level 8-byte LUN given as a 64-bit
    integer, or None for other address methods (logical unit, extended),
    a non-zero bus identifier or a second..fourth level."""
    if v & 0xFFFFFFFFFFFF:  # second..fourth level present: not single level
        return None
    b0, b1 = v >> 56, (v >> 48) & 0xFF
    method = b0 >> 6
    if method == 0 and b0 == 0:  # peripheral device, bus identifier 0
        return b1
    if method == 1:  # flat space
        return ((b0 & 0x3F) << 8) | b1
    return None


def encode_lun(lun: int) -> bytes:
    """Encode a LUN as 8 bytes: peripheral device addressing for 0..255,
    flat space addressing for 256..16383 (SAM-5 §4.7.7, §4.7.9)."""
    return lun_to_u64(lun).to_bytes(8, "big")


def decode_lun(raw: Buffer) -> int:
    """Decode an 8-byte single-level LUN (peripheral or flat addressing).

    Raises :class:`SCSIDataError` for other address methods (logical unit,
    extended) and for multi-level or non-zero bus identifiers.
    """
    if len(raw) != 8:
        raise SCSIDataError(f"a LUN is 8 bytes, not {len(raw)}")
    lun = lun_from_u64(int.from_bytes(raw, "big"))
    if lun is None:
        raise SCSIDataError(
            f"LUN {bytes(raw).hex()} uses an unsupported address method"
        )
    return lun


@dataclass(frozen=True, slots=True)
class ReportLunsData:
    """Decoded REPORT LUNS data. ``list_length`` is what the device claims;
    if it exceeds what was received, re-issue with a larger allocation length.
    ``unsupported`` holds raw 8-byte LUNs in address methods not decoded."""

    luns: tuple[int, ...]
    unsupported: tuple[bytes, ...] = ()
    list_length: int = 0

    @property
    def truncated(self) -> bool:
        """True when the device had more LUNs than were returned."""
        return self.list_length > 8 * (len(self.luns) + len(self.unsupported))


_SU64 = struct.Struct(">Q")


def build_report_luns_data(luns: Sequence[int]) -> bytes:
    """Encode REPORT LUNS parameter data for ``luns``."""
    return (
        (8 * len(luns)).to_bytes(4, "big")
        + bytes(4)
        + b"".join(encode_lun(x) for x in luns)
    )


def parse_report_luns_data(data: Buffer) -> ReportLunsData:
    """Decode REPORT LUNS data (SPC-4 §6.27.2)."""
    if len(data) < 8:
        raise SCSIDataError(f"REPORT LUNS data is {len(data)} bytes, needs 8")
    list_length = int.from_bytes(data[:4], "big")
    end = 8 + min(list_length, len(data) - 8) // 8 * 8
    luns: list[int] = []
    other: list[bytes] = []
    for (v,) in _SU64.iter_unpack(memoryview(data)[8:end]):
        lun = lun_from_u64(v)
        if lun is None:
            other.append(v.to_bytes(8, "big"))
        else:
            luns.append(lun)
    return ReportLunsData(tuple(luns), tuple(other), list_length)


# --- returned data: standard INQUIRY (SPC-4 §6.4.2) -------------------------------------

_SINQHDR = struct.Struct(">BBBBBBBB")


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data (SPC-4 §6.4.2). Text fields are stripped of
    trailing spaces. ``version_descriptors`` are bytes 58..73 (non-zero ones)."""

    peripheral_type: int = 0
    qualifier: int = 0
    rmb: bool = False
    version: int = 6
    normaca: bool = False
    hisup: bool = True
    response_data_format: int = 2
    sccs: bool = False
    acc: bool = False
    tpgs: int = 0
    three_pc: bool = False
    protect: bool = False
    encserv: bool = False
    multip: bool = False
    cmdque: bool = True
    vendor: str = ""
    product: str = ""
    revision: str = ""
    version_descriptors: tuple[int, ...] = ()


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


def _pad(text: str, n: int, name: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name} {text!r} is not ASCII") from None
    if len(raw) > n:
        raise ValueError(f"{name} {text!r} longer than {n} characters")
    return raw.ljust(n, b" ")


def build_standard_inquiry(inq: StandardInquiry) -> bytes:
    """Encode standard INQUIRY data: 36 bytes, or 74 with version descriptors."""
    b0 = (_u(inq.qualifier, 3, "qualifier") << 5) | _u(
        inq.peripheral_type, 5, "peripheral_type"
    )
    b1 = _bit(inq.rmb, 7)
    b3 = (
        _bit(inq.normaca, 5)
        | _bit(inq.hisup, 4)
        | _u(inq.response_data_format, 4, "response_data_format")
    )
    b5 = (
        _bit(inq.sccs, 7)
        | _bit(inq.acc, 6)
        | (_u(inq.tpgs, 2, "tpgs") << 4)
        | _bit(inq.three_pc, 3)
        | _bit(inq.protect, 0)
    )
    b6 = _bit(inq.encserv, 6) | _bit(inq.multip, 4)
    b7 = _bit(inq.cmdque, 1)
    if len(inq.version_descriptors) > 8:
        raise ValueError("at most 8 version descriptors")
    total = 74 if inq.version_descriptors else 36
    head = _SINQHDR.pack(
        b0, b1, _u(inq.version, 8, "version"), b3, total - 5, b5, b6, b7
    )
    body = (
        _pad(inq.vendor, 8, "vendor")
        + _pad(inq.product, 16, "product")
        + _pad(inq.revision, 4, "revision")
    )
    if not inq.version_descriptors:
        return head + body
    vd = b"".join(
        _u(v, 16, "version descriptor").to_bytes(2, "big")
        for v in inq.version_descriptors
    )
    return head + body + bytes(22) + vd.ljust(16, b"\0")


def parse_standard_inquiry(data: Buffer) -> StandardInquiry:
    """Decode standard INQUIRY data (at least the 5-byte header; fields
    beyond what was returned read as zero/empty)."""
    if len(data) < 5:
        raise SCSIDataError(f"INQUIRY data is {len(data)} bytes, needs at least 5")
    raw = bytes(data[: 5 + data[4]])  # additional length bounds the real data
    b0, b1, ver, b3, _, b5, b6, b7 = _SINQHDR.unpack(raw[:8].ljust(8, b"\0"))
    vds: tuple[int, ...] = ()
    if len(raw) > 58:
        vdraw = raw[58:74]
        vdraw = vdraw[: len(vdraw) // 2 * 2]
        vds = tuple(v for (v,) in struct.iter_unpack(">H", vdraw) if v)
    return StandardInquiry(
        peripheral_type=b0 & 0x1F,
        qualifier=b0 >> 5,
        rmb=bool(b1 & 0x80),
        version=ver,
        normaca=bool(b3 & 0x20),
        hisup=bool(b3 & 0x10),
        response_data_format=b3 & 0x0F,
        sccs=bool(b5 & 0x80),
        acc=bool(b5 & 0x40),
        tpgs=(b5 >> 4) & 3,
        three_pc=bool(b5 & 8),
        protect=bool(b5 & 1),
        encserv=bool(b6 & 0x40),
        multip=bool(b6 & 0x10),
        cmdque=bool(b7 & 2),
        vendor=_text(raw[8:16]),
        product=_text(raw[16:32]),
        revision=_text(raw[32:36]),
        version_descriptors=vds,
    )


# --- returned data: VPD pages (SPC-4 §7.8, SBC-3 §6.5) -----------------------------------

_SVPDHDR = struct.Struct(">BBH")


@dataclass(frozen=True, slots=True)
class VPDPageData:
    """A VPD page split into header fields and payload (bytes after byte 3,
    bounded by PAGE LENGTH and by what was received)."""

    page_code: int
    payload: bytes
    peripheral_type: int = 0
    qualifier: int = 0
    page_length: int = 0

    @property
    def truncated(self) -> bool:
        """True when PAGE LENGTH announces more than was received."""
        return self.page_length > len(self.payload)


def build_vpd_page(
    page_code: int, payload: bytes, *, peripheral_type: int = 0, qualifier: int = 0
) -> bytes:
    """Wrap ``payload`` in the 4-byte VPD page header."""
    b0 = (_u(qualifier, 3, "qualifier") << 5) | _u(
        peripheral_type, 5, "peripheral_type"
    )
    return (
        _SVPDHDR.pack(
            b0, _u(page_code, 8, "page_code"), _u(len(payload), 16, "page length")
        )
        + payload
    )


def parse_vpd_page(data: Buffer, page_code: int | None = None) -> VPDPageData:
    """Split a VPD page; with ``page_code`` check it is the page asked for."""
    if len(data) < 4:
        raise SCSIDataError(f"VPD page is {len(data)} bytes, needs at least 4")
    b0, pc, plen = _SVPDHDR.unpack_from(data)
    if page_code is not None and pc != page_code:
        raise SCSIDataError(f"VPD page code is {pc:#04x}, expected {page_code:#04x}")
    return VPDPageData(pc, bytes(data[4 : 4 + plen]), b0 & 0x1F, b0 >> 5, plen)


def build_vpd_supported_pages(
    pages: Sequence[int], *, peripheral_type: int = 0
) -> bytes:
    """VPD page 00h: the list of supported page codes (ascending, SPC-4 §7.8.13)."""
    return build_vpd_page(
        VPDPage.SUPPORTED_PAGES,
        bytes(sorted(_u(p, 8, "page") for p in pages)),
        peripheral_type=peripheral_type,
    )


def parse_vpd_supported_pages(data: Buffer) -> tuple[int, ...]:
    """Decode VPD page 00h."""
    return tuple(parse_vpd_page(data, VPDPage.SUPPORTED_PAGES).payload)


def build_vpd_unit_serial(serial: str, *, peripheral_type: int = 0) -> bytes:
    """VPD page 80h: PRODUCT SERIAL NUMBER (ASCII, SPC-4 §7.8.15)."""
    try:
        raw = serial.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"serial {serial!r} is not ASCII") from None
    return build_vpd_page(
        VPDPage.UNIT_SERIAL_NUMBER, raw, peripheral_type=peripheral_type
    )


def parse_vpd_unit_serial(data: Buffer) -> str:
    """Decode VPD page 80h (surrounding spaces removed)."""
    return (
        parse_vpd_page(data, VPDPage.UNIT_SERIAL_NUMBER)
        .payload.decode("ascii", "replace")
        .strip(" \0")
    )


_SDESIG = struct.Struct(">BBxB")


@dataclass(frozen=True, slots=True)
class Designator:
    """A designation descriptor of VPD page 83h (SPC-4 §7.8.6.1)."""

    designator_type: int
    value: bytes
    code_set: int = CodeSet.BINARY
    association: int = Association.LOGICAL_UNIT
    protocol_identifier: int = 0
    piv: bool = False

    @property
    def text(self) -> str:
        """The value as text for ASCII/UTF-8 code sets (trailing NULs removed)."""
        return self.value.rstrip(b"\0").decode("utf-8", "replace")


def build_vpd_device_identification(
    designators: Sequence[Designator], *, peripheral_type: int = 0
) -> bytes:
    """VPD page 83h from designators."""
    parts = []
    for d in designators:
        if len(d.value) > 255:
            raise ValueError(f"designator of {len(d.value)} bytes is longer than 255")
        b0 = (_u(d.protocol_identifier, 4, "protocol_identifier") << 4) | _u(
            d.code_set, 4, "code_set"
        )
        b1 = (
            _bit(d.piv, 7)
            | (_u(d.association, 2, "association") << 4)
            | _u(d.designator_type, 4, "designator_type")
        )
        parts.append(_SDESIG.pack(b0, b1, len(d.value)) + d.value)
    return build_vpd_page(
        VPDPage.DEVICE_IDENTIFICATION, b"".join(parts), peripheral_type=peripheral_type
    )


def parse_vpd_device_identification(data: Buffer) -> tuple[Designator, ...]:
    """Decode VPD page 83h into designators; a descriptor cut short by the
    allocation length is dropped."""
    payload = parse_vpd_page(data, VPDPage.DEVICE_IDENTIFICATION).payload
    out: list[Designator] = []
    pos = 0
    while pos + 4 <= len(payload):  # one iteration per descriptor, not per byte
        b0, b1, n = _SDESIG.unpack_from(payload, pos)
        if pos + 4 + n > len(payload):
            break
        out.append(
            Designator(
                designator_type=b1 & 0x0F,
                value=payload[pos + 4 : pos + 4 + n],
                code_set=b0 & 0x0F,
                association=(b1 >> 4) & 3,
                protocol_identifier=b0 >> 4,
                piv=bool(b1 & 0x80),
            )
        )
        pos += 4 + n
    return tuple(out)


_SBLKLIM = struct.Struct(">BBHIIIIIIIQ")


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block Limits VPD page B0h (SBC-3 §6.5.3). Lengths are in logical blocks."""

    wsnz: bool = False
    max_compare_and_write_length: int = 0
    optimal_transfer_length_granularity: int = 0
    max_transfer_length: int = 0
    optimal_transfer_length: int = 0
    max_prefetch_length: int = 0
    max_unmap_lba_count: int = 0
    max_unmap_block_descriptor_count: int = 0
    optimal_unmap_granularity: int = 0
    ugavalid: bool = False
    unmap_granularity_alignment: int = 0
    max_write_same_length: int = 0


def build_vpd_block_limits(bl: BlockLimits, *, peripheral_type: int = 0) -> bytes:
    """Encode VPD page B0h (page length 3Ch)."""
    body = _SBLKLIM.pack(
        _bit(bl.wsnz, 0),
        _u(bl.max_compare_and_write_length, 8, "max_compare_and_write_length"),
        _u(
            bl.optimal_transfer_length_granularity,
            16,
            "optimal_transfer_length_granularity",
        ),
        _u(bl.max_transfer_length, 32, "max_transfer_length"),
        _u(bl.optimal_transfer_length, 32, "optimal_transfer_length"),
        _u(bl.max_prefetch_length, 32, "max_prefetch_length"),
        _u(bl.max_unmap_lba_count, 32, "max_unmap_lba_count"),
        _u(bl.max_unmap_block_descriptor_count, 32, "max_unmap_block_descriptor_count"),
        _u(bl.optimal_unmap_granularity, 32, "optimal_unmap_granularity"),
        _bit(bl.ugavalid, 31)
        | _u(bl.unmap_granularity_alignment, 31, "unmap_granularity_alignment"),
        _u(bl.max_write_same_length, 64, "max_write_same_length"),
    )
    return build_vpd_page(
        VPDPage.BLOCK_LIMITS, body.ljust(0x3C, b"\0"), peripheral_type=peripheral_type
    )


def parse_vpd_block_limits(data: Buffer) -> BlockLimits:
    """Decode VPD page B0h; fields absent from a short (older) page read as 0."""
    payload = parse_vpd_page(data, VPDPage.BLOCK_LIMITS).payload
    f = _SBLKLIM.unpack(payload[: _SBLKLIM.size].ljust(_SBLKLIM.size, b"\0"))
    return BlockLimits(
        bool(f[0] & 1),
        f[1],
        f[2],
        f[3],
        f[4],
        f[5],
        f[6],
        f[7],
        f[8],
        bool(f[9] >> 31),
        f[9] & 0x7FFFFFFF,
        f[10],
    )


_SBDC = struct.Struct(">HBBB")


@dataclass(frozen=True, slots=True)
class BlockDeviceCharacteristics:
    """Block Device Characteristics VPD page B1h (SBC-3 §6.5.2). A rotation
    rate of 1 means non-rotating (solid state)."""

    medium_rotation_rate: int = 0
    product_type: int = 0
    wabereq: int = 0
    wacereq: int = 0
    nominal_form_factor: int = 0
    fuab: bool = False
    vbuls: bool = False


def build_vpd_block_device_characteristics(
    bdc: BlockDeviceCharacteristics, *, peripheral_type: int = 0
) -> bytes:
    """Encode VPD page B1h (page length 3Ch)."""
    body = _SBDC.pack(
        _u(bdc.medium_rotation_rate, 16, "medium_rotation_rate"),
        _u(bdc.product_type, 8, "product_type"),
        (_u(bdc.wabereq, 2, "wabereq") << 6)
        | (_u(bdc.wacereq, 2, "wacereq") << 4)
        | _u(bdc.nominal_form_factor, 4, "nominal_form_factor"),
        _bit(bdc.fuab, 1) | _bit(bdc.vbuls, 0),
    )
    return build_vpd_page(
        VPDPage.BLOCK_DEVICE_CHARACTERISTICS,
        body.ljust(0x3C, b"\0"),
        peripheral_type=peripheral_type,
    )


def parse_vpd_block_device_characteristics(data: Buffer) -> BlockDeviceCharacteristics:
    """Decode VPD page B1h."""
    payload = parse_vpd_page(data, VPDPage.BLOCK_DEVICE_CHARACTERISTICS).payload
    rate, ptype, b7, b8 = _SBDC.unpack(payload[: _SBDC.size].ljust(_SBDC.size, b"\0"))
    return BlockDeviceCharacteristics(
        rate, ptype, b7 >> 6, (b7 >> 4) & 3, b7 & 0x0F, bool(b8 & 2), bool(b8 & 1)
    )


_SLBP = struct.Struct(">BBBB")


@dataclass(frozen=True, slots=True)
class LogicalBlockProvisioning:
    """Logical Block Provisioning VPD page B2h (SBC-3 §6.5.4; LBPRZ as the
    3-bit SBC-4 field, whose low bit is SBC-3's LBPRZ bit)."""

    threshold_exponent: int = 0
    lbpu: bool = False
    lbpws: bool = False
    lbpws10: bool = False
    lbprz: int = 0
    anc_sup: bool = False
    dp: bool = False
    minimum_percentage: int = 0
    provisioning_type: int = 0
    threshold_percentage: int = 0


def build_vpd_logical_block_provisioning(
    lbp: LogicalBlockProvisioning, *, peripheral_type: int = 0
) -> bytes:
    """Encode VPD page B2h (no provisioning group descriptor)."""
    if lbp.dp:
        raise ValueError(
            "dp=True needs a provisioning group descriptor, not supported here"
        )
    body = _SLBP.pack(
        _u(lbp.threshold_exponent, 8, "threshold_exponent"),
        _bit(lbp.lbpu, 7)
        | _bit(lbp.lbpws, 6)
        | _bit(lbp.lbpws10, 5)
        | (_u(lbp.lbprz, 3, "lbprz") << 2)
        | _bit(lbp.anc_sup, 1),
        (_u(lbp.minimum_percentage, 5, "minimum_percentage") << 3)
        | _u(lbp.provisioning_type, 3, "provisioning_type"),
        _u(lbp.threshold_percentage, 8, "threshold_percentage"),
    )
    return build_vpd_page(
        VPDPage.LOGICAL_BLOCK_PROVISIONING, body, peripheral_type=peripheral_type
    )


def parse_vpd_logical_block_provisioning(data: Buffer) -> LogicalBlockProvisioning:
    """Decode VPD page B2h (any provisioning group descriptor is ignored)."""
    payload = parse_vpd_page(data, VPDPage.LOGICAL_BLOCK_PROVISIONING).payload
    te, b5, b6, tp = _SLBP.unpack(payload[:4].ljust(4, b"\0"))
    return LogicalBlockProvisioning(
        te,
        bool(b5 & 0x80),
        bool(b5 & 0x40),
        bool(b5 & 0x20),
        (b5 >> 2) & 7,
        bool(b5 & 2),
        bool(b5 & 1),
        b6 >> 3,
        b6 & 7,
        tp,
    )
