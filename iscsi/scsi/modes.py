"""Mode parameter data (SPC-4 §7.5): the mode parameter header of MODE
SENSE/SELECT(6) and (10), block descriptors (SBC-3 §6.4.2) and the framing
of mode pages (page_0 and sub_page formats, SPC-4 §7.5.7).

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`): the
target assembles MODE SENSE data and checks MODE SELECT parameter lists
with it, the initiator reads the device-specific parameter (WP, DPOFUA).
Truncated data raises :class:`ParameterListLengthError`, a malformed field
:class:`ParameterListError` (both carry the SPC-4 sense a target answers).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .cdb_common import Buffer, ParameterListError, ParameterListLengthError

_HDR6 = struct.Struct(">BBBB")
_HDR10 = struct.Struct(">HBBBxH")
_SHORT_BD = struct.Struct(">IBBH")  # blocks, reserved, block length (24 bits)
_LONG_BD = struct.Struct(">Q4xI")  # blocks, reserved, block length

#: Device-specific parameter bits of a direct-access device (SBC-3 §6.4.1).
WP = 0x80
DPOFUA = 0x10


@dataclass(frozen=True, slots=True)
class ModeParameterHeader:
    """The mode parameter header (SPC-4 §7.5.5 tables 453, 454).

    ``mode_data_length`` counts the bytes after itself (undefined, 0, in a
    MODE SELECT list); ``size`` is 4 for the (6) commands, 8 for (10).
    """

    mode_data_length: int
    medium_type: int = 0
    device_specific: int = 0
    longlba: bool = False
    block_descriptor_length: int = 0
    size: int = 4


def build_mode_header(*, ten: bool, data_length: int, device_specific: int = 0,
                      medium_type: int = 0, longlba: bool = False,
                      block_descriptor_length: int = 0) -> bytes:
    """The header for ``data_length`` bytes of block descriptors and pages
    that follow it; MODE DATA LENGTH counts everything after its own field
    (and wraps in the one-byte field of MODE SENSE(6), which the caller
    keeps small by the allocation length)."""
    if ten:
        return _HDR10.pack(data_length + 6, medium_type, device_specific, 0x01 if longlba else 0,
                           block_descriptor_length)
    if longlba:
        raise ValueError("LONGLBA exists only in the 10-byte header")
    return _HDR6.pack((data_length + 3) & 0xFF, medium_type, device_specific,
                      block_descriptor_length)


def parse_mode_header(data: Buffer, *, ten: bool) -> ModeParameterHeader:
    """Decode the header at the start of ``data``."""
    size = 8 if ten else 4
    if len(data) < size:
        raise ParameterListLengthError(
            f"mode parameter header needs {size} bytes, got {len(data)}")
    if ten:
        length, medium, dsp, flags, bdl = _HDR10.unpack_from(data)
        return ModeParameterHeader(length, medium, dsp, bool(flags & 0x01), bdl, 8)
    length, medium, dsp, bdl = _HDR6.unpack_from(data)
    return ModeParameterHeader(length, medium, dsp, False, bdl, 4)


def build_block_descriptor(num_blocks: int, block_length: int, *, long: bool) -> bytes:
    """One block descriptor: long LBA (16 bytes) or short (8 bytes), where
    NUMBER OF LOGICAL BLOCKS saturates at FFFFFFFFh (SBC-3 §6.4.2)."""
    if long:
        return _LONG_BD.pack(num_blocks, block_length)
    return _SHORT_BD.pack(min(num_blocks, 0xFFFFFFFF), 0, block_length >> 16,
                          block_length & 0xFFFF)


def parse_block_descriptors(data: Buffer, header: ModeParameterHeader
                            ) -> list[tuple[int, int, int]]:
    """(offset in ``data``, number of blocks, block length) of each block
    descriptor after ``header``; a BLOCK DESCRIPTOR LENGTH that is not a
    whole number of descriptors is an invalid field (pointing at it)."""
    bdl = header.block_descriptor_length
    start = header.size
    if start + bdl > len(data):
        raise ParameterListLengthError(
            f"block descriptors end at {start + bdl}, the list has {len(data)} bytes")
    dlen = 16 if header.longlba else 8
    if bdl % dlen:
        raise ParameterListError(f"BLOCK DESCRIPTOR LENGTH {bdl} is not a multiple of {dlen}",
                                 field_offset=6 if header.size == 8 else 3)
    out = []
    for pos in range(start, start + bdl, dlen):
        if header.longlba:
            blocks, length = _LONG_BD.unpack_from(data, pos)
        else:
            blocks, _, hi, lo = _SHORT_BD.unpack_from(data, pos)
            length = (hi << 16) | lo
        out.append((pos, blocks, length))
    return out


def build_mode_page(code: int, body: bytes, *, subpage: int | None = None) -> bytes:
    """A mode page with its header: page_0 format (2 bytes), or sub_page
    format (4 bytes, SPF set) when ``subpage`` is given (SPC-4 §7.5.7)."""
    if subpage is None:
        return bytes((code & 0x3F, len(body))) + body
    return bytes((0x40 | (code & 0x3F), subpage)) + len(body).to_bytes(2, "big") + body


@dataclass(frozen=True, slots=True)
class ModePageSpan:
    """Where one mode page sits in a list: ``offset`` of its header,
    ``length`` with the header, whose size is ``header``."""

    offset: int
    code: int
    subpage: int
    header: int
    length: int


def split_mode_pages(data: Buffer) -> Iterator[ModePageSpan]:
    """The pages of a list of mode pages, in order. A header cut short is a
    PARAMETER LIST LENGTH ERROR; whether a page's body fits is the caller's
    to check, after it has checked the page's code and length."""
    pos, total = 0, len(data)
    while pos < total:
        if total - pos < 2:
            raise ParameterListLengthError(f"mode page header cut at byte {pos}")
        b0 = data[pos]
        if b0 & 0x40:  # SPF: sub_page format
            if total - pos < 4:
                raise ParameterListLengthError(f"sub_page header cut at byte {pos}")
            span = ModePageSpan(pos, b0 & 0x3F, data[pos + 1], 4,
                                4 + int.from_bytes(bytes(data[pos + 2 : pos + 4]), "big"))
        else:
            span = ModePageSpan(pos, b0 & 0x3F, 0, 2, 2 + data[pos + 1])
        yield span
        pos += span.length
