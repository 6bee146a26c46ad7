"""Mode parameter data codec (iscsi/scsi/modes.py): headers, block
descriptors and page framing, as both roles use them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi.scsi.cdb_common import ParameterListError, ParameterListLengthError
from iscsi.scsi.modes import (
    DPOFUA,
    WP,
    ModeParameterHeader,
    build_block_descriptor,
    build_mode_header,
    build_mode_page,
    parse_block_descriptors,
    parse_mode_header,
    split_mode_pages,
)


def test_header_vectors() -> None:
    # MODE SENSE(6): 4-byte header, MODE DATA LENGTH counts the bytes after it.
    six = build_mode_header(ten=False, data_length=8 + 20, device_specific=WP | DPOFUA,
                            block_descriptor_length=8)
    assert six == bytes((31, 0, 0x90, 8))
    ten = build_mode_header(ten=True, data_length=16, longlba=True, block_descriptor_length=16)
    assert ten == bytes.fromhex("0016 00 00 01 00 0010")
    assert parse_mode_header(ten, ten=True) == ModeParameterHeader(22, 0, 0, True, 16, 8)
    with pytest.raises(ValueError):
        build_mode_header(ten=False, data_length=0, longlba=True)


@given(st.booleans(), st.integers(0, 200), st.integers(0, 255), st.booleans())
def test_header_round_trip(ten: bool, length: int, dsp: int, longlba: bool) -> None:
    longlba = longlba and ten
    raw = build_mode_header(ten=ten, data_length=length, device_specific=dsp,
                            longlba=longlba, block_descriptor_length=16 if longlba else 8)
    h = parse_mode_header(raw, ten=ten)
    assert (h.device_specific, h.longlba, h.size) == (dsp, longlba, 8 if ten else 4)
    assert h.mode_data_length == (length + (6 if ten else 3)) & (0xFFFF if ten else 0xFF)


def test_block_descriptors() -> None:
    short = build_block_descriptor(1 << 40, 4096, long=False)
    assert short == bytes.fromhex("ffffffff 00 001000")  # saturates (SBC-3 §6.4.2)
    long = build_block_descriptor(1 << 40, 512, long=True)
    assert len(long) == 16
    data = build_mode_header(ten=True, data_length=16, longlba=True,
                             block_descriptor_length=16) + long
    assert parse_block_descriptors(data, parse_mode_header(data, ten=True)) == [(8, 1 << 40, 512)]
    bad = build_mode_header(ten=False, data_length=4, block_descriptor_length=4) + bytes(4)
    with pytest.raises(ParameterListError) as e:
        parse_block_descriptors(bad, parse_mode_header(bad, ten=False))
    assert e.value.field_offset == 3
    cut = build_mode_header(ten=False, data_length=8, block_descriptor_length=8) + bytes(4)
    with pytest.raises(ParameterListLengthError):
        parse_block_descriptors(cut, parse_mode_header(cut, ten=False))
    with pytest.raises(ParameterListLengthError):
        parse_mode_header(b"\x00\x00", ten=False)


def test_page_framing() -> None:
    caching = build_mode_page(0x08, bytes(0x12))
    sub = build_mode_page(0x0A, bytes(0x1C), subpage=0x01)
    assert caching[:2] == b"\x08\x12" and sub[:4] == bytes.fromhex("4a 01 001c")
    spans = list(split_mode_pages(caching + sub))
    assert [(s.offset, s.code, s.subpage, s.header, s.length) for s in spans] == [
        (0, 0x08, 0, 2, 20), (20, 0x0A, 0x01, 4, 32)]
    with pytest.raises(ParameterListLengthError):
        list(split_mode_pages(caching + b"\x4a\x01"))
