"""The SAM-5 LUN field (§4.7) and REPORT LUNS returned data.

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .cdb_common import (
    Buffer,
    SCSIDataError,
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


