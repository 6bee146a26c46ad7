"""SPC-2 and SPC-4 reservations (target/scsi/reservations.py): the state
machine with three fake I_T nexuses, the conflict tables, the parameter data
formats, APTPL persistence and every error's exact answer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi.scsi.spc import ReportTargetPortGroups, parse_report_target_port_groups
from iscsi.scsi.constants import PRType, SenseKey
from iscsi.scsi.sense import CheckCondition
from target.scsi.alua import AccessState, Alua, TargetPortGroup
from target.scsi.pr_model import TransportIDError, build_transport_id, parse_transport_id
from target.scsi.reservations import (
    PROutResult,
    ReservationConflict,
    Reservations,
    ReservationStateError,
    UnitAttentionPost,
)
from target.scsi.types import Nexus

TGT = "iqn.2024-01.org.example:disk"
A = Nexus.create("iqn.2024-01.org.example:host-a", 0x23D000000001, TGT, 1, relative_port_id=1)
B = Nexus.create("iqn.2024-01.org.example:host-b", 0x23D000000002, TGT, 1, relative_port_id=1)
C = Nexus.create("iqn.2024-01.org.example:host-c", 0x23D000000003, TGT, 1, relative_port_id=1)
# Host A again, through a second target port.
A2 = Nexus.create(A.initiator_name, A.isid, TGT, 2, relative_port_id=2)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REG_IGNORE, REG_MOVE = range(8)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = (
    PRType.WRITE_EXCLUSIVE,
    PRType.EXCLUSIVE_ACCESS,
    PRType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    PRType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    PRType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    PRType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
)

READ10 = bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0])
TUR = bytes(6)
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 255, 0])
RESERVE6 = bytes([0x16, 0, 0, 0, 0, 0])
RELEASE6 = bytes([0x17, 0, 0, 0, 0, 0])
READ_CAP16 = bytes([0x9E, 0x10]) + bytes(14)
PRIN_KEYS = bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x40, 0, 0])


def prout_cdb(sa: int, ptype: int = 0, plen: int = 24, scope: int = 0) -> bytes:
    return bytes([0x5F, sa, (scope << 4) | ptype, 0, 0]) + plen.to_bytes(4, "big") + b"\0"


def params(key: int = 0, sa_key: int = 0, *, spec_i_pt: bool = False, all_tg_pt: bool = False, aptpl: bool = False) -> bytes:
    flags = (8 if spec_i_pt else 0) | (4 if all_tg_pt else 0) | (1 if aptpl else 0)
    return struct.pack(">QQ4xBxxx", key, sa_key, flags)


def out(r: Reservations, nexus: Nexus, sa: int, key: int = 0, sa_key: int = 0, ptype: int = 0, **kw: bool) -> PROutResult:
    data = params(key, sa_key, **kw)
    return r.reserve_out(nexus, prout_cdb(sa, ptype, len(data)), data)


def prin(r: Reservations, nexus: Nexus, sa: int, alloc: int = 8192) -> bytes:
    return r.reserve_in(nexus, bytes([0x5E, sa, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0")


def read_keys(r: Reservations, nexus: Nexus = A) -> tuple[int, list[int]]:
    data = prin(r, nexus, 0)
    gen, length = struct.unpack_from(">II", data)
    assert length == len(data) - 8
    return gen, [int.from_bytes(data[i : i + 8], "big") for i in range(8, len(data), 8)]


def read_reservation(r: Reservations, nexus: Nexus = A) -> tuple[int, int] | None:
    data = prin(r, nexus, 1)
    _, length = struct.unpack_from(">II", data)
    if length == 0:
        assert len(data) == 8
        return None
    assert length == 16 and len(data) == 24
    return int.from_bytes(data[8:16], "big"), data[21] & 0x0F


def sense_of(exc: pytest.ExceptionInfo[CheckCondition]) -> tuple[int, int, int]:
    s = exc.value.sense
    return s.key, s.asc, s.ascq


@pytest.fixture
def r() -> Reservations:
    return Reservations(None)


# --- registration -----------------------------------------------------------


def test_register_read_keys_and_unregister(r: Reservations) -> None:
    assert read_keys(r) == (0, [])
    assert out(r, A, REGISTER, 0, 0x1111) == []
    assert out(r, B, REG_IGNORE, 0xDEAD, 0x2222) == []
    gen, keys = read_keys(r)
    assert gen == 2 and keys == [0x1111, 0x2222]
    # Re-register with a wrong key conflicts and does not count.
    with pytest.raises(ReservationConflict):
        out(r, A, REGISTER, 0, 0x3333)
    assert r.generation == 2
    # Right key changes the key; key 0 unregisters.
    out(r, A, REGISTER, 0x1111, 0x3333)
    out(r, A, REGISTER, 0x3333, 0)
    assert read_keys(r) == (4, [0x2222])


def test_unregistered_nexus_with_nonzero_key_conflicts(r: Reservations) -> None:
    with pytest.raises(ReservationConflict):
        out(r, A, REGISTER, 0x5, 0x6)
    # Key 0, SA key 0: GOOD, nothing registered.
    out(r, A, REGISTER, 0, 0)
    assert read_keys(r)[1] == []


def test_read_keys_truncated_keeps_additional_length(r: Reservations) -> None:
    out(r, A, REG_IGNORE, 0, 0xABCDEF)
    data = prin(r, A, 0, alloc=8)
    assert len(data) == 8
    assert struct.unpack(">II", data)[1] == 8


def test_prin_invalid_service_actions(r: Reservations) -> None:
    for sa in range(4, 0x20):
        with pytest.raises(CheckCondition) as exc:
            prin(r, A, sa)
        assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
        assert exc.value.sense.field_pointer == 1


def test_prout_invalid_service_action(r: Reservations) -> None:
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(9), params())
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_parameter_list_length_errors(r: Reservations) -> None:
    for plen in (0, 23, 25, 32):
        data = params(0, 1).ljust(plen, b"\0")[:plen]
        with pytest.raises(CheckCondition) as exc:
            r.reserve_out(A, prout_cdb(REGISTER, plen=plen), data)
        assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00), plen
    # Data shorter than the CDB promised.
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(REGISTER, plen=24), params(0, 1)[:20])
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    assert r.registrations == []


def test_flag_misuse_is_invalid_field_in_parameter_list(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 1)
    cases = [
        (RESERVE, dict(all_tg_pt=True)),
        (REG_IGNORE, dict(spec_i_pt=True)),
        (REGISTER, dict(aptpl=True)),  # PTPL_C=0 without a state path
    ]
    for sa, kw in cases:
        with pytest.raises(CheckCondition) as exc:
            out(r, A, sa, 1, 2, WE, **kw)
        assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00), (sa, kw)
        assert exc.value.sense.field_pointer == 20 and exc.value.sense.cd is False


def test_insufficient_registration_resources() -> None:
    r = Reservations(None, max_registrations=2)
    out(r, A, REGISTER, 0, 1)
    out(r, B, REGISTER, 0, 2)
    with pytest.raises(CheckCondition) as exc:
        out(r, C, REGISTER, 0, 3)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x55, 0x04)
    # Changing an existing key still works at the limit.
    out(r, B, REGISTER, 2, 22)
    assert read_keys(r)[1] == [1, 22]


# --- reserve / release, every type ----------------------------------------------


@pytest.mark.parametrize("ptype", [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR])
def test_reserve_read_reservation_release(r: Reservations, ptype: PRType) -> None:
    out(r, A, REGISTER, 0, 0xA)
    gen = r.generation
    out(r, A, RESERVE, 0xA, 0, ptype)
    expected_key = 0 if ptype in (WE_AR, EA_AR) else 0xA
    assert read_reservation(r, B) == (expected_key, ptype)
    # Same type again from the holder: GOOD; another type: conflict.
    out(r, A, RESERVE, 0xA, 0, ptype)
    with pytest.raises(ReservationConflict):
        out(r, A, RESERVE, 0xA, 0, WE if ptype != WE else EA)
    out(r, A, RELEASE, 0xA, 0, ptype)
    assert read_reservation(r) is None
    # RESERVE and RELEASE do not bump PRgeneration.
    assert r.generation == gen


def test_reserve_errors(r: Reservations) -> None:
    with pytest.raises(ReservationConflict):
        out(r, A, RESERVE, 0, 0, WE)  # not registered
    out(r, A, REGISTER, 0, 0xA)
    with pytest.raises(ReservationConflict):
        out(r, A, RESERVE, 0xB, 0, WE)  # wrong key
    with pytest.raises(CheckCondition) as exc:
        out(r, A, RESERVE, 0xA, 0, 2)  # reserved type code
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    assert exc.value.sense.field_pointer == 2
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(RESERVE, WE, scope=1), params(0xA))
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, EA)
    with pytest.raises(ReservationConflict):
        out(r, B, RESERVE, 0xB, 0, EA)


def test_release_by_non_holder_is_a_no_op_and_wrong_type_is_invalid_release(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, WE)
    out(r, B, RELEASE, 0xB, 0, WE)
    assert read_reservation(r) == (0xA, WE)
    with pytest.raises(CheckCondition) as exc:
        out(r, A, RELEASE, 0xA, 0, EA)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)
    with pytest.raises(ReservationConflict):
        out(r, C, RELEASE, 0, 0, WE)  # unregistered


def test_release_of_registrants_only_posts_reservations_released(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, C, REGISTER, 0, 0xC)
    out(r, A, RESERVE, 0xA, 0, WE_RO)
    posts = out(r, A, RELEASE, 0xA, 0, WE_RO)
    assert posts == [UnitAttentionPost((0x2A, 0x04), frozenset({B.initiator_port, C.initiator_port}))]
    # A plain WE release tells nobody.
    out(r, A, RESERVE, 0xA, 0, WE)
    assert out(r, A, RELEASE, 0xA, 0, WE) == []


@pytest.mark.parametrize(
    "ptype,shared",
    [(WE, False), (EA, False), (WE_RO, False), (EA_RO, False), (WE_AR, True), (EA_AR, True)],
)
def test_holder_unregister(r: Reservations, ptype: PRType, shared: bool) -> None:
    """libiscsi prout_reserve_ownership: only all-registrants reservations
    outlive the unregistering holder."""
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, ptype)
    out(r, A, REGISTER, 0xA, 0)
    if shared:
        assert read_reservation(r) == (0, ptype)
        out(r, B, RELEASE, 0xB, 0, ptype)
    assert read_reservation(r) is None


def test_all_registrants_reservation_ends_with_last_registrant(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, B, RESERVE, 0xB, 0, EA_AR)
    out(r, A, REGISTER, 0xA, 0)
    out(r, B, REGISTER, 0xB, 0)
    assert read_reservation(r) is None


def test_registrants_only_holder_unregistering_tells_the_others(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, EA_RO)
    posts = out(r, A, REGISTER, 0xA, 0)
    assert posts == [UnitAttentionPost((0x2A, 0x04), frozenset({B.initiator_port}))]


# --- conflict tables ---------------------------------------------------------------


ACCESS = [
    # type, reg i2 read, reg i2 write, unreg i2 read, unreg i2 write (libiscsi
    # prout_reserve_access, SPC-4 §5.9.1 / SBC-3 tables)
    (EA, 0, 0, 0, 0),
    (WE, 1, 0, 1, 0),
    (EA_RO, 1, 1, 0, 0),
    (WE_RO, 1, 1, 1, 0),
    (EA_AR, 1, 1, 0, 0),
    (WE_AR, 1, 1, 1, 0),
]


@pytest.mark.parametrize("ptype,rr,rw,ur,uw", ACCESS)
def test_access_per_type(r: Reservations, ptype: PRType, rr: int, rw: int, ur: int, uw: int) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, ptype)
    assert not r.conflict(A, READ10) and not r.conflict(A, WRITE10)
    assert r.conflict(B, READ10) is not bool(rr)
    assert r.conflict(B, WRITE10) is not bool(rw)
    out(r, B, REGISTER, 0xB, 0)
    assert r.conflict(B, READ10) is not bool(ur)
    assert r.conflict(B, WRITE10) is not bool(uw)


def test_conflict_table_spot_checks(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, A, RESERVE, 0xA, 0, WE)
    # Allowed for everyone under any type.
    for cdb in (TUR, INQUIRY, READ_CAP16, PRIN_KEYS, bytes([0xA0]) + bytes(11)):
        assert not r.conflict(C, cdb), cdb.hex()
    # MODE SENSE, SYNCHRONIZE CACHE, UNMAP, EXTENDED COPY conflict for a non-holder.
    for cdb in (MODE_SENSE6, bytes([0x35]) + bytes(9), bytes([0x42]) + bytes(9), bytes([0x83]) + bytes(15)):
        assert r.conflict(C, cdb), cdb.hex()
    # PREVENT ALLOW MEDIUM REMOVAL: allow passes, prevent conflicts.
    assert not r.conflict(C, bytes([0x1E, 0, 0, 0, 0, 0]))
    assert r.conflict(C, bytes([0x1E, 0, 0, 0, 1, 0]))
    # START STOP UNIT: START=1 passes, STOP conflicts.
    assert not r.conflict(C, bytes([0x1B, 0, 0, 0, 1, 0]))
    assert r.conflict(C, bytes([0x1B, 0, 0, 0, 0, 0]))


def test_no_reservation_means_no_conflict_except_reserve6(r: Reservations) -> None:
    assert not r.conflict(A, WRITE10)
    out(r, A, REGISTER, 0, 0xA)
    assert not r.conflict(B, WRITE10)
    # SPC-2 §5.5.1: while registered, RESERVE/RELEASE conflict for all.
    assert r.conflict(A, RESERVE6) and r.conflict(B, RELEASE6)
    with pytest.raises(ReservationConflict):
        r.reserve6(B)


def test_reserve6_exceptions_for_pr_holder(r: Reservations) -> None:
    """SPC-4 §5.9.3: RESERVE/RELEASE from the PR holder complete GOOD
    without effect."""
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, A, RESERVE, 0xA, 0, WE)
    assert not r.conflict(A, RESERVE6)
    r.reserve6(A)
    r.release6(A)
    assert r.spc2_holder is None and read_reservation(r) == (0xA, WE)
    assert r.conflict(B, RESERVE6)
    out(r, A, RELEASE, 0xA, 0, WE)
    out(r, A, RESERVE, 0xA, 0, WE_RO)
    assert not r.conflict(B, RESERVE6)  # registrant of a registrants-only type


# --- SPC-2 RESERVE / RELEASE ----------------------------------------------------


def test_reserve6_two_initiators(r: Reservations) -> None:
    """libiscsi reserve6_2initiators."""
    r.reserve6(A)
    r.reserve6(A)
    with pytest.raises(ReservationConflict):
        r.reserve6(B)
    r.release6(B)  # a no-op
    assert r.spc2_holder == A.key
    assert not r.conflict(A, MODE_SENSE6)
    assert r.conflict(B, MODE_SENSE6) and r.conflict(B, READ10) and r.conflict(B, TUR)
    assert not r.conflict(B, INQUIRY) and not r.conflict(B, RELEASE6)
    # The same initiator through another target port is another I_T nexus.
    assert r.conflict(A2, WRITE10)
    r.release6(A)
    r.reserve6(B)
    r.release6(B)
    assert r.spc2_holder is None


def test_reserve6_released_by_lu_reset_and_nexus_loss(r: Reservations) -> None:
    r.reserve6(A)
    r.nexus_lost(B)
    assert r.spc2_holder == A.key
    r.nexus_lost(A)
    r.reserve6(B)
    r.lu_reset()
    r.reserve6(C)
    assert r.spc2_holder == C.key


def test_reserve6_blocks_persistent_reservations_for_everyone(r: Reservations) -> None:
    r.reserve6(A)
    assert r.conflict(A, PRIN_KEYS) and r.conflict(B, PRIN_KEYS)
    with pytest.raises(ReservationConflict):
        out(r, A, REGISTER, 0, 1)
    with pytest.raises(ReservationConflict):
        prin(r, A, 0)


def test_reserve10_third_party_is_refused(r: Reservations) -> None:
    with pytest.raises(CheckCondition) as exc:
        r.reserve6(A, bytes([0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    r.reserve6(A, bytes([0x56]) + bytes(9))
    assert r.spc2_holder == A.key


# --- CLEAR and PREEMPT ------------------------------------------------------------


def test_clear(r: Reservations) -> None:
    """libiscsi prout_clear_simple: generation +1 for CLEAR, not RESERVE."""
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    gen = r.generation
    out(r, A, RESERVE, 0xA, 0, EA)
    posts = out(r, A, CLEAR, 0xA)
    assert posts == [UnitAttentionPost((0x2A, 0x03), frozenset({B.initiator_port}))]
    assert read_keys(r) == (gen + 1, [])
    assert read_reservation(r) is None
    with pytest.raises(ReservationConflict):
        out(r, A, CLEAR, 0xA)


def test_preempt_removes_registration_without_reservation(r: Reservations) -> None:
    """libiscsi prout_preempt_rm_reg."""
    out(r, A, REGISTER, 0, 0x1)
    out(r, B, REGISTER, 0, 0x2)
    gen = r.generation
    posts = out(r, B, PREEMPT, 0x2, 0x1, EA)
    assert posts == [UnitAttentionPost((0x2A, 0x05), frozenset({A.initiator_port}))]
    assert read_keys(r) == (gen + 1, [0x2])
    assert read_reservation(r) is None
    with pytest.raises(ReservationConflict):
        out(r, B, PREEMPT, 0x2, 0x77, EA)  # nobody holds that key
    with pytest.raises(CheckCondition) as exc:
        out(r, B, PREEMPT, 0x2, 0, EA)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)


def test_preempt_holder_takes_reservation(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, C, REGISTER, 0, 0xC)
    out(r, A, RESERVE, 0xA, 0, WE)
    posts = out(r, B, PREEMPT_ABORT, 0xB, 0xA, EA)
    assert read_reservation(r) == (0xB, EA)
    assert read_keys(r)[1] == [0xB, 0xC]
    assert posts.abort == frozenset({A.initiator_port})
    assert UnitAttentionPost((0x2A, 0x05), frozenset({A.initiator_port})) in posts
    # The type changed, so C (still registered) hears RESERVATIONS RELEASED.
    assert UnitAttentionPost((0x2A, 0x04), frozenset({C.initiator_port})) in posts
    assert r.conflict(A, READ10) and r.conflict(C, READ10)


def test_preempt_non_holder_key_leaves_reservation(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, C, REGISTER, 0, 0xC)
    out(r, A, RESERVE, 0xA, 0, WE)
    posts = out(r, B, PREEMPT, 0xB, 0xC, WE)
    assert posts.abort == frozenset()
    assert read_reservation(r) == (0xA, WE)
    assert read_keys(r)[1] == [0xA, 0xB]
    with pytest.raises(CheckCondition) as exc:
        out(r, B, PREEMPT, 0xB, 0, WE)  # key 0 against a non-AR reservation
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)


def test_preempt_all_registrants_with_key_zero(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, C, REGISTER, 0, 0xC)
    out(r, A, RESERVE, 0xA, 0, WE_AR)
    posts = out(r, C, PREEMPT, 0xC, 0, EA)
    assert read_keys(r)[1] == [0xC]
    assert read_reservation(r) == (0xC, EA)
    assert posts[0] == UnitAttentionPost((0x2A, 0x05), frozenset({A.initiator_port, B.initiator_port}))


def test_failed_command_leaves_state_untouched(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    before = (r.registrations, r.reservation, r.generation)
    with pytest.raises(CheckCondition):
        out(r, A, PREEMPT, 0xA, 0, WE)
    assert (r.registrations, r.reservation, r.generation) == before


# --- ALL_TG_PT, SPEC_I_PT, REGISTER AND MOVE, READ FULL STATUS -------------------


def test_all_tg_pt_registration_covers_every_target_port(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA, all_tg_pt=True)
    out(r, A2, RESERVE, 0xA, 0, EA)  # through the other port, same registration
    assert not r.conflict(A, WRITE10) and not r.conflict(A2, WRITE10)
    data = prin(r, B, 3)
    assert data[8 + 12] & 0x03 == 0x03  # ALL_TG_PT and R_HOLDER


def test_per_port_registration_is_per_i_t_nexus(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    with pytest.raises(ReservationConflict):
        out(r, A2, RESERVE, 0xA, 0, WE)  # A2 is a different, unregistered I_T nexus
    out(r, A2, REGISTER, 0, 0xA2)
    assert read_keys(r)[1] == [0xA, 0xA2]


def test_spec_i_pt_registers_transport_ids(r: Reservations) -> None:
    tids = build_transport_id(B.initiator_name, B.isid) + build_transport_id(C.initiator_name, None)
    data = params(0, 0x77, spec_i_pt=True) + len(tids).to_bytes(4, "big") + tids
    r.reserve_out(A, prout_cdb(REGISTER, plen=len(data)), data)
    assert read_keys(r)[1] == [0x77, 0x77, 0x77]
    out(r, B, RESERVE, 0x77, 0, EA)  # B is registered through the TransportID
    assert read_reservation(r) == (0x77, EA)
    # C is named by node name only: any of its ports is registered.
    c_other = Nexus.create(C.initiator_name, 0x99, TGT)
    assert r.conflict(c_other, READ10)  # EA: registration alone grants nothing
    with pytest.raises(ReservationConflict):
        out(r, c_other, REGISTER, 0, 1)  # already registered: key must match


def test_spec_i_pt_errors(r: Reservations) -> None:
    tid = build_transport_id(B.initiator_name, B.isid)
    # Wrong TransportID length field.
    data = params(0, 0x77, spec_i_pt=True) + (len(tid) + 4).to_bytes(4, "big") + tid
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(REGISTER, plen=len(data)), data)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    # Not iSCSI (protocol id 0 = Fibre Channel).
    bad = bytes([0x00]) + tid[1:]
    data = params(0, 0x77, spec_i_pt=True) + len(bad).to_bytes(4, "big") + bad
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(REGISTER, plen=len(data)), data)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    assert exc.value.sense.field_pointer == 28
    # SPEC_I_PT from a registered nexus: INVALID FIELD IN CDB.
    out(r, A, REGISTER, 0, 0x1)
    data = params(0x1, 0x2, spec_i_pt=True) + len(tid).to_bytes(4, "big") + tid
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(REGISTER, plen=len(data)), data)
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    assert read_keys(r)[1] == [0x1]


def move_params(key: int, sa_key: int, rel_port: int, tid: bytes, unreg: bool = False) -> bytes:
    return struct.pack(">QQxBHI", key, sa_key, 2 if unreg else 0, rel_port, len(tid)) + tid


def test_register_and_move(r: Reservations) -> None:
    r.note_nexus(A2)  # learn relative port 2
    out(r, A, REGISTER, 0, 0xA)
    out(r, A, RESERVE, 0xA, 0, WE)
    data = move_params(0xA, 0xB, 1, build_transport_id(B.initiator_name, B.isid), unreg=True)
    gen = r.generation
    assert r.reserve_out(A, prout_cdb(REG_MOVE, WE, len(data)), data) == []
    assert read_reservation(r) == (0xB, WE)
    assert read_keys(r) == (gen + 1, [0xB])
    assert r.conflict(A, WRITE10) and not r.conflict(B, WRITE10)


def test_register_and_move_errors(r: Reservations) -> None:
    tid_b = build_transport_id(B.initiator_name, B.isid)
    out(r, A, REGISTER, 0, 0xA)
    data = move_params(0xA, 0xB, 1, tid_b)
    with pytest.raises(ReservationConflict):  # A holds nothing
        r.reserve_out(A, prout_cdb(REG_MOVE, WE, len(data)), data)
    out(r, A, RESERVE, 0xA, 0, WE)
    cases = [
        (move_params(0xA, 0, 1, tid_b), 0x26, 8),  # SA key 0
        (move_params(0xA, 0xB, 9, tid_b), 0x26, 18),  # unknown relative port
        (move_params(0xA, 0xB, 1, build_transport_id(A.initiator_name, A.isid)), 0x26, 24),  # to itself
        (move_params(0xA, 0xB, 1, build_transport_id(B.initiator_name, None)), 0x26, 24),  # node, not port
    ]
    for data, asc, ptr in cases:
        with pytest.raises(CheckCondition) as exc:
            r.reserve_out(A, prout_cdb(REG_MOVE, WE, len(data)), data)
        assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, asc, 0), data.hex()
        assert exc.value.sense.field_pointer == ptr
    data = move_params(0xA, 0xB, 1, tid_b)
    with pytest.raises(CheckCondition) as exc:
        r.reserve_out(A, prout_cdb(REG_MOVE, WE, len(data) - 4), data[:-4])
    assert sense_of(exc) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
    assert read_reservation(r) == (0xA, WE)


def test_read_full_status_layout(r: Reservations) -> None:
    out(r, A, REGISTER, 0, 0xA)
    out(r, B, REGISTER, 0, 0xB)
    out(r, B, RESERVE, 0xB, 0, EA_RO)
    data = prin(r, A, 3)
    gen, length = struct.unpack_from(">II", data)
    assert gen == r.generation and length == len(data) - 8
    pos, seen = 8, []
    while pos < len(data):
        key, flags, scope_type, rel, dlen = struct.unpack_from(">Q4xBB4xHI", data, pos)
        name, isid, used = parse_transport_id(data, pos + 24)
        assert used == dlen
        seen.append((key, flags & 1, scope_type, rel, name, isid))
        pos += 24 + dlen
    assert seen == [
        (0xA, 0, 0, 1, A.initiator_name, A.isid),
        (0xB, 1, EA_RO, 1, B.initiator_name, B.isid),
    ]


def test_report_capabilities(r: Reservations, tmp_path: Path) -> None:
    data = prin(r, A, 2)
    length, b2, b3, mask = struct.unpack(">HBBH2x", data)
    assert length == 8 and len(data) == 8
    assert b2 & 0x10 and b2 & 0x08 and b2 & 0x04  # CRH, SIP_C, ATP_C
    assert not b2 & 0x01 and not b3 & 0x01  # no PTPL without a state path
    assert b3 & 0x80 and (b3 >> 4) & 7 <= 5  # TMV, ALLOW COMMANDS
    assert mask == 0xEA01
    r2 = Reservations(str(tmp_path / "pr.json"))
    assert prin(r2, A, 2)[2] & 0x01  # PTPL_C


# --- TransportIDs ---------------------------------------------------------------


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.:-", min_size=1, max_size=80),
    st.none() | st.integers(min_value=0, max_value=(1 << 48) - 1),
)
def test_transport_id_round_trip(name: str, isid: int | None) -> None:
    tid = build_transport_id(name, isid)
    assert len(tid) % 4 == 0 and len(tid) >= 24
    assert tid[0] & 0x0F == 5 and tid[0] >> 6 == (0 if isid is None else 1)
    assert parse_transport_id(tid) == (name, isid, len(tid))


@given(st.binary(max_size=64))
def test_transport_id_parser_never_crashes(blob: bytes) -> None:
    try:
        parse_transport_id(blob)
    except TransportIDError as exc:
        assert 0 <= exc.offset <= len(blob) + 4


# --- APTPL persistence ---------------------------------------------------------------


def test_aptpl_survives_a_new_object(tmp_path: Path) -> None:
    path = tmp_path / "lun0.pr.json"
    r = Reservations(str(path))
    out(r, A, REGISTER, 0, 0xA, aptpl=True)
    out(r, B, REGISTER, 0, 0xB, all_tg_pt=True, aptpl=True)
    out(r, A, RESERVE, 0xA, 0, WE_RO)
    assert path.exists() and not list(tmp_path.glob("*.tmp.*"))
    r2 = Reservations(str(path))
    assert r2.aptpl
    assert read_keys(r2) == (0, [0xA, 0xB])  # PRgeneration restarts at zero
    assert read_reservation(r2) == (0xA, WE_RO)
    assert not r2.conflict(A2, READ10) and r2.conflict(C, WRITE10)
    assert not r2.conflict(B, WRITE10) and not Reservations(str(path)).conflict(
        Nexus.create(B.initiator_name, B.isid, TGT, 7), WRITE10
    )


def test_aptpl_off_removes_state(tmp_path: Path) -> None:
    path = tmp_path / "pr.json"
    r = Reservations(str(path))
    out(r, A, REGISTER, 0, 0xA, aptpl=True)
    assert path.exists()
    out(r, A, REGISTER, 0xA, 0xA1)  # APTPL=0 in the latest REGISTER
    assert not path.exists() and not r.aptpl
    assert Reservations(str(path)).registrations == []


def test_without_aptpl_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "pr.json"
    r = Reservations(str(path))
    out(r, A, REGISTER, 0, 0xA)
    out(r, A, RESERVE, 0xA, 0, EA)
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        json.dumps({"format": "other"}).encode(),
        json.dumps(
            {
                "format": "aioiscsi-persistent-reservations",
                "version": 1,
                "aptpl": True,
                "registrations": [
                    {"initiator": "iqn.x", "isid": 1, "target_port": None, "relative_port_id": 0, "key": 0}
                ],
                "reservation": None,
            }
        ).encode(),
        json.dumps(
            {
                "format": "aioiscsi-persistent-reservations",
                "version": 1,
                "aptpl": True,
                "registrations": [],
                "reservation": {"type": 1, "holder": 3},
            }
        ).encode(),
        b"\xff\xfe",
    ],
)
def test_damaged_state_file_is_one_line_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pr.json"
    path.write_bytes(content)
    with pytest.raises(ReservationStateError) as exc:
        Reservations(str(path))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_write_failure_rolls_back(tmp_path: Path) -> None:
    missing_dir = tmp_path / "gone"
    missing_dir.mkdir()
    path = missing_dir / "pr.json"
    r = Reservations(str(path))
    missing_dir.rmdir()
    with pytest.raises(CheckCondition) as exc:
        out(r, A, REGISTER, 0, 0xA, aptpl=True)
    assert exc.value.sense.key == SenseKey.HARDWARE_ERROR
    assert r.registrations == [] and not r.aptpl


# --- target port groups (alua.py): REPORT TARGET PORT GROUPS decoding ------------

def rtpg_raw(fmt: int = 0, alloc: int = 4096) -> bytes:
    return bytes([0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0]) + alloc.to_bytes(4, "big") + bytes(2)


def rtpg_cdb(fmt: int = 0, alloc: int = 4096) -> ReportTargetPortGroups:
    """The parsed REPORT TARGET PORT GROUPS CDB (an invalid one raises here)."""
    return parse_report_target_port_groups(rtpg_raw(fmt, alloc))


def decode_rtpg(data: bytes, extended: bool = False) -> list[tuple[int, bool, int, int, int, list[int]]]:
    """(group, pref, state, supported bits, status, ports) per descriptor,
    the way libiscsi and scsi_dh_alua walk the list."""
    total = struct.unpack_from(">I", data)[0] + 4
    assert total == len(data)
    pos = 8 if extended else 4
    groups = []
    while pos < total:
        b0, sup, gid, status, count = struct.unpack_from(">BBHxBxB", data, pos)
        ports = [struct.unpack_from(">H", data, pos + 8 + 4 * i + 2)[0] for i in range(count)]
        groups.append((gid, bool(b0 & 0x80), b0 & 0x0F, sup, status, ports))
        pos += 8 + 4 * count
    assert pos == total
    return groups


def test_rtpg_default_single_group() -> None:
    alua = Alua()
    data = alua.report_target_port_groups(A, rtpg_cdb())
    assert decode_rtpg(data) == [(1, False, 0, 0xCF, 0, [1])]


def test_rtpg_several_groups_both_formats() -> None:
    alua = Alua(
        [
            (1, [1, 2], 0),
            (2, [3], AccessState.STANDBY),
            TargetPortGroup(7, (4, 5, 6), AccessState.ACTIVE_NON_OPTIMIZED, preferred=True),
        ],
        implicit_transition_time=30,
    )
    expected = [
        (1, False, 0, 0xCF, 0, [1, 2]),
        (2, False, 2, 0xCF, 0, [3]),
        (7, True, 1, 0xCF, 0, [4, 5, 6]),
    ]
    plain = alua.report_target_port_groups(A, rtpg_cdb(0))
    assert decode_rtpg(plain) == expected
    ext = alua.report_target_port_groups(A, rtpg_cdb(1))
    assert ext[4] == 0x10 and ext[5] == 30
    assert decode_rtpg(ext, extended=True) == expected
    assert ext[8:] == plain[4:]
    # ALLOCATION LENGTH cuts, RETURN DATA LENGTH still tells the whole size.
    short = alua.report_target_port_groups(A, rtpg_cdb(0, alloc=4))
    assert short == plain[:4]
    with pytest.raises(CheckCondition) as exc:
        alua.report_target_port_groups(A, rtpg_cdb(2))
    assert exc.value.sense.asc_ascq == (0x24, 0x00) and exc.value.sense.field_pointer == 1


def test_alua_state_change_and_access_checks() -> None:
    alua = Alua([(1, [1], 0), (2, [2], 0)])
    assert alua.set_state(2, AccessState.STANDBY) == (0x2A, 0x06)
    groups = decode_rtpg(alua.report_target_port_groups(A, rtpg_cdb()))
    assert groups[1][2] == AccessState.STANDBY and groups[1][4] == 0x02  # implicit change
    alua.check_access(A, READ10)  # port 1: active/optimized
    with pytest.raises(CheckCondition) as exc:
        alua.check_access(A2, READ10)  # port 2: standby
    assert (exc.value.sense.key, exc.value.sense.asc_ascq) == (SenseKey.NOT_READY, (0x04, 0x0B))
    alua.check_access(A2, INQUIRY)
    alua.check_access(A2, rtpg_raw())
    alua.set_state(2, AccessState.UNAVAILABLE)
    with pytest.raises(CheckCondition) as exc:
        alua.check_access(A2, MODE_SENSE6)
    assert exc.value.sense.asc_ascq == (0x04, 0x0C)
    alua.set_state(2, AccessState.TRANSITIONING)
    with pytest.raises(CheckCondition) as exc:
        alua.check_access(A2, TUR)
    assert exc.value.sense.asc_ascq == (0x04, 0x0A)


@pytest.mark.parametrize(
    "groups",
    [
        [(1, [1], 0), (1, [2], 0)],  # group twice
        [(1, [1], 0), (2, [1], 0)],  # port in two groups
        [(1, [0], 0)],  # relative port 0 is reserved
        [(1, [1], 9)],  # no such state
        [(70000, [1], 0)],
        [],
    ],
)
def test_alua_bad_configuration(groups: list[tuple[int, list[int], int]]) -> None:
    with pytest.raises(ValueError):
        Alua(groups)
