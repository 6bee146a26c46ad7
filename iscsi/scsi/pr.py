"""Reservations: SPC-2 RESERVE/RELEASE and SPC-4 PERSISTENT RESERVE
IN/OUT CDBs and the PERSISTENT RESERVE OUT parameter list (SPC-4 §6.15,
§6.16).

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .cdb_common import (
    _SRES6,
    _SRES10,
    Buffer,
    InvalidCDBField,
    ParameterListLengthError,
    _bit,
    _check,
    _name,
    _u,
)
from .constants import (
    Opcode,
    PRInAction,
    PROutAction,
    PRType,
)


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


#: Service actions whose SCOPE and TYPE must be valid (SPC-4 §6.16.2).
#: RELEASE is not among them: a RELEASE whose scope or type does not match
#: the reservation is INVALID RELEASE OF PERSISTENT RESERVATION
#: (§5.9.11.2), which only the device server can tell.
_PR_SCOPED = frozenset(
    (
        PROutAction.RESERVE,
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

    For RESERVE, PREEMPT and PREEMPT AND ABORT, SCOPE must be LU_SCOPE (0)
    and TYPE a defined type (SPC-4 §6.16.2, §6.16.3); otherwise INVALID
    FIELD IN CDB.
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


