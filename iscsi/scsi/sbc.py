"""SBC-3 commands other than READ/WRITE (READ CAPACITY, GET LBA STATUS,
UNMAP, SYNCHRONIZE CACHE, PRE-FETCH, READ DEFECT DATA) with their
parameter lists and returned data.

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .cdb_common import (
    _S10,
    _S12,
    _S16,
    _SRC10,
    _SRDD10,
    Buffer,
    InvalidCDBField,
    ParameterListError,
    ParameterListLengthError,
    SCSIDataError,
    _bit,
    _check,
    _check_sa,
    _name,
    _reserved,
    _u,
)
from .constants import (
    Opcode,
    ServiceActionIn16,
)


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


def _parse_range(
    cdb: Buffer, op10: int, op16: int, reserved: int
) -> tuple[int, int, bool, int, int]:
    op = _check(cdb, (op10, op16), 1)
    if op == op10:
        _check(cdb, op10, 10)
        _, b1, lba, g, n, _ = _S10.unpack_from(cdb)
        size = 10
    else:
        _check(cdb, op16, 16)
        _, b1, lba, n, g, _ = _S16.unpack_from(cdb)
        size = 16
    _reserved(b1 & reserved, 1, _name(op))
    return lba, n, bool(b1 & 2), g & 0x3F, size


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
        *_parse_range(
            # SYNC_NV (bit 2) is obsolete but tolerated; IMMED is bit 1.
            cdb, Opcode.SYNCHRONIZE_CACHE_10, Opcode.SYNCHRONIZE_CACHE_16, 0xF9
        )
    )


def parse_pre_fetch(cdb: Buffer) -> PreFetch:
    """Parse PRE-FETCH(10/16)."""
    return PreFetch(*_parse_range(cdb, Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16, 0xFD))


@dataclass(frozen=True, slots=True)
class ReadDefectData:
    """READ DEFECT DATA(10/12) (SBC-3 §5.17-§5.18)."""

    req_plist: bool = False
    req_glist: bool = False
    defect_list_format: int = 0
    allocation_length: int = 4
    address_descriptor_index: int = 0
    cdb_size: int = 10


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
    DATA LENGTH that claims more than was sent is an INVALID FIELD IN
    PARAMETER LIST; descriptors claimed but not sent a PARAMETER LIST
    LENGTH ERROR.
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
        # Descriptors promised but not sent: the parameter list is too
        # short for what it describes (as tgt and LIO answer).
        raise ParameterListLengthError(
            f"UNMAP BLOCK DESCRIPTOR DATA LENGTH {bd_len} exceeds the {len(data)} bytes sent"
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


