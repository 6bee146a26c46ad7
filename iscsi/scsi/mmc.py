"""MMC-6 commands for CD/DVD emulation.

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .cdb_common import (
    Buffer,
    InvalidCDBField,
    _check,
)
from .constants import (
    Opcode,
)

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


def parse_get_event_status_notification(cdb: Buffer) -> GetEventStatusNotification:
    """Parse GET EVENT STATUS NOTIFICATION."""
    _check(cdb, Opcode.GET_EVENT_STATUS_NOTIFICATION, 10)
    _, b1, ncr, alloc, _ = _SGESN.unpack_from(cdb)
    return GetEventStatusNotification(bool(b1 & 1), ncr, alloc)




_SMECH = struct.Struct(">B7xHxB")


@dataclass(frozen=True, slots=True)
class MechanismStatus:
    """MECHANISM STATUS (MMC-6 §6.9): only an allocation length."""

    allocation_length: int = 8


def parse_mechanism_status(cdb: Buffer) -> MechanismStatus:
    """Parse MECHANISM STATUS (12 bytes)."""
    _check(cdb, Opcode.MECHANISM_STATUS, 12)
    _, alloc, _ = _SMECH.unpack_from(cdb)
    return MechanismStatus(alloc)
