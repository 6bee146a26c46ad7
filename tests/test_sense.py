"""Sense data codec (SPC-4 §4.5): fixed and descriptor formats, field
pointers, INFORMATION handling, and robustness against arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi.scsi.constants import SenseKey
from iscsi.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    CheckCondition,
    SenseData,
    SenseDecodeError,
    asc_name,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
    miscompare,
)


def test_fixed_layout_of_invalid_field_in_cdb() -> None:
    raw = invalid_field_in_cdb(2, 5).sense.encode_fixed()
    assert len(raw) == 18
    assert raw[0] == 0x70  # current, VALID=0 (no information)
    assert raw[2] == SenseKey.ILLEGAL_REQUEST
    assert raw[7] == 10  # additional sense length
    assert (raw[12], raw[13]) == INVALID_FIELD_IN_CDB
    # SKSV | C/D | BPV | bit 5, field pointer 2
    assert raw[15:18] == bytes((0x80 | 0x40 | 0x08 | 5, 0, 2))


def test_fixed_information_valid_bit() -> None:
    raw = miscompare(27).sense.encode_fixed()
    assert raw[0] == 0xF0
    assert int.from_bytes(raw[3:7], "big") == 27
    assert raw[2] == SenseKey.MISCOMPARE


def test_fixed_information_too_large_clears_valid() -> None:
    raw = SenseData(SenseKey.MEDIUM_ERROR, 0x11, 0, information=1 << 40).encode_fixed()
    assert raw[0] & 0x80 == 0


def test_descriptor_layout_and_round_trip() -> None:
    s = SenseData(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00, information=1 << 40, field_pointer=9, cd=False)
    raw = s.encode_descriptor()
    assert raw[0] == 0x72 and raw[1] == 5 and raw[2:4] == b"\x26\x00"
    assert raw[7] == len(raw) - 8
    back = SenseData.decode(raw)
    assert back.descriptor and back.information == 1 << 40
    assert back.field_pointer == 9 and back.cd is False and back.bit_pointer is None


@pytest.mark.parametrize("desc", [False, True])
def test_round_trip_both_formats(desc: bool) -> None:
    s = SenseData(SenseKey.NOT_READY, 0x04, 0x02, progress=0x1234, descriptor=desc)
    back = SenseData.decode(s.encode())
    assert (back.key, back.asc, back.ascq, back.progress) == (SenseKey.NOT_READY, 4, 2, 0x1234)
    assert back.descriptor is desc


def test_check_condition_carries_sense() -> None:
    exc = CheckCondition(SenseKey.ILLEGAL_REQUEST, *LBA_OUT_OF_RANGE)
    assert exc.sense.asc_ascq == LBA_OUT_OF_RANGE
    assert "out of range" in str(exc)
    p = invalid_field_in_parameter_list(4)
    assert p.sense.cd is False and p.sense.field_pointer == 4


def test_asc_name() -> None:
    assert asc_name(0x24, 0x00) == "invalid field in CDB"
    assert asc_name(0x7E, 0x7E) == "asc 0x7e ascq 0x7e"


@pytest.mark.parametrize("raw", [b"", b"\x70", b"\x00" * 18, b"\x72\x00\x00\x00\x00\x00\x00\x10\x00\x20"])
def test_decode_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(SenseDecodeError):
        SenseData.decode(raw)


@given(st.binary(max_size=64))
def test_decode_never_leaks_other_exceptions(raw: bytes) -> None:
    try:
        SenseData.decode(raw)
    except SenseDecodeError:
        pass
