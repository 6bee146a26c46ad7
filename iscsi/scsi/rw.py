"""READ/WRITE-family CDBs (SBC-3 §5): builders and the hot-path parser.

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from .cdb_common import (
    _reserved,
    _S6,
    _S10,
    _S12,
    _S16,
    _SCAW,
    Buffer,
    CDBTooShort,
    InvalidCDBField,
    UnsupportedOpcode,
    _bit,
    _name,
    _u,
    cdb_length,
)
from .constants import (
    Opcode,
)

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
    RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT; ``rarc`` (READ) and ``fua_nv``
    (READ, WRITE, ORWRITE, COMPARE AND WRITE; obsolete in SBC-4) are kept
    so a device server can refuse what it does not implement. Bits SBC-3
    reserves in byte 1 are refused by the parser itself.
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
    rarc: bool = False
    fua_nv: bool = False

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
            if self.bytchk == 1:
                return self.blocks
            return 1 if self.bytchk == 3 and self.blocks else 0
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


#: Bits of CDB byte 1 that SBC-3 §5 reserves (or made obsolete and gave no
#: meaning), by command family; WRITE SAME(10) also reserves bit 0, which
#: is NDOB in WRITE SAME(16).
_RESERVED_B1: dict[RWKind, int] = {
    RWKind.READ: 0x01,
    RWKind.WRITE: 0x05,
    RWKind.VERIFY: 0x09,
    RWKind.WRITE_AND_VERIFY: 0x09,
    RWKind.WRITE_SAME: 0x06,
    RWKind.COMPARE_AND_WRITE: 0x05,
    RWKind.ORWRITE: 0x05,
}


def _rw_finish(
    kind: RWKind, op: int, b1: int, lba: int, n: int, group: int, is16: bool
) -> RWCommand:
    _reserved(b1 & (_RESERVED_B1[kind] | (0 if is16 or kind is not _WS else 0x01)), 1, _name(op))
    protect = b1 >> 5
    if kind is _READ or kind is _WRITE or kind is _ORW or kind is _CAW:
        return RWCommand(
            kind, op, lba, n, bool(b1 & 0x10), bool(b1 & 0x08), group, protect,
            rarc=kind is _READ and bool(b1 & 0x04), fua_nv=bool(b1 & 0x02),
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
            if b1 & (0x01 if kind is _READ else 0x05):
                _reserved(b1 & _RESERVED_B1[kind], 1, _name(op))
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
                    kind is _READ and b1 & 0x04 != 0,
                    b1 & 0x02 != 0,
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
        if cmd.rarc and k is not _READ:
            raise ValueError("RARC exists only in READ")
        return (b1 | _bit(cmd.dpo, 4) | _bit(cmd.fua, 3) | _bit(cmd.rarc, 2)
                | _bit(cmd.fua_nv, 1))
    if k is _WS:
        if cmd.dpo or cmd.fua or cmd.bytchk or cmd.rarc or cmd.fua_nv:
            raise ValueError("WRITE SAME has no DPO/FUA/BYTCHK/RARC/FUA_NV")
        if cmd.anchor and not cmd.unmap:
            raise ValueError("WRITE SAME: ANCHOR needs UNMAP")
        if cmd.ndob and size != 16:
            raise ValueError("NDOB exists only in WRITE SAME(16)")
        return b1 | _bit(cmd.anchor, 4) | _bit(cmd.unmap, 3) | _bit(cmd.ndob, 0)
    if cmd.rarc or cmd.fua_nv:
        raise ValueError(f"{k.name} has no RARC/FUA_NV")
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


def _plain_10_or_16(op10: int, op16: int, lba: int, blocks: int) -> bytes | None:
    """The CDB of a READ or WRITE with no flags, packed straight from the
    numbers (every I/O of a block device builds one); None when a field is
    out of range, for :func:`build_rw` to explain."""
    if 0 <= lba < (1 << 32) and 0 <= blocks < (1 << 16):
        return _S10.pack(op10, 0, lba, 0, blocks, 0)
    if 0 <= lba < (1 << 64) and 0 <= blocks < (1 << 32):
        return _S16.pack(op16, 0, lba, blocks, 0, 0)
    return None


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
    if size is None and not (dpo or fua or group or protect):
        fast = _plain_10_or_16(Opcode.READ_10, Opcode.READ_16, lba, blocks)
        if fast is not None:
            return fast
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
    if size is None and not (dpo or fua or group or protect):
        fast = _plain_10_or_16(Opcode.WRITE_10, Opcode.WRITE_16, lba, blocks)
        if fast is not None:
            return fast
    op = _pick(RWKind.WRITE, size, lba, blocks)
    return build_rw(RWCommand(RWKind.WRITE, op, lba, blocks, dpo, fua, group, protect))


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


