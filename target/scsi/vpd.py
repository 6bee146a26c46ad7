"""INQUIRY data builders: the standard data (SPC-4 §6.4.2) and the vital
product data pages (SPC-4 §7.8, SBC-3 §6.6) this target reports.

The builders are pure functions of an :class:`InquiryInfo` snapshot so that
they can be unit-tested and so the logical unit decides what is true about
itself (thin, ALUA, copy manager) in one place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iscsi.scsi.constants import PeripheralType, VPDPage

from .types import LUConfig, Nexus

# SPC-4 §6.4.2 table 142: version descriptors (SPC-4 Annex E).
VERSION_SAM5 = 0x00A0
VERSION_ISCSI = 0x0960
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0

#: SPC-4 §7.6.4.6 / §7.8.6.1: protocol identifier of iSCSI.
PROTOCOL_ISCSI = 0x5

#: SPC-4 §7.8.17 Third-party Copy VPD page.
THIRD_PARTY_COPY = 0x8F

_STD_HEAD = struct.Struct(">BBBBBBBB8s16s4s")
_BLOCK_LIMITS = struct.Struct(">BBHIIIIIIIQIIIII")  # bytes 4..63


@dataclass(frozen=True, slots=True)
class InquiryInfo:
    """Facts about a logical unit that INQUIRY reports."""

    config: LUConfig
    num_blocks: int
    thin: bool
    lbprz: bool
    tpgs: bool
    copy_manager: bool
    #: Third-party Copy VPD page 8Fh (from xcopy.py) when a copy manager exists.
    third_party_copy: bytes | None = None


def _ascii(text: str, width: int) -> bytes:
    """Left-aligned, space-padded ASCII (SPC-4 §4.4.1), printable only."""
    raw = text.encode("ascii", "replace")[:width]
    raw = bytes(c if 0x20 <= c <= 0x7E else 0x3F for c in raw)  # short config strings only
    return raw.ljust(width, b" ")


def standard_inquiry(info: InquiryInfo) -> bytes:
    """96 bytes of standard INQUIRY data for a connected logical unit."""
    cfg = info.config
    dtype = int(cfg.device_type)
    byte5 = (0x10 if info.tpgs else 0) | (0x08 if info.copy_manager else 0)
    head = _STD_HEAD.pack(
        dtype & 0x1F,
        0x80 if cfg.removable or cfg.device_type == PeripheralType.CDROM else 0,
        0x06,  # VERSION: SPC-4
        0x10 | 0x02,  # HISUP, RESPONSE DATA FORMAT 2
        96 - 5,
        byte5,
        0x00,
        0x02,  # CMDQUE: full task management model (SAM-5 §8)
        _ascii(cfg.vendor, 8),
        _ascii(cfg.product, 16),
        _ascii(cfg.revision, 4),
    )
    versions = [VERSION_SAM5, VERSION_ISCSI, VERSION_SPC4]
    if cfg.device_type == PeripheralType.DISK:
        versions.append(VERSION_SBC3)
    vd = b"".join(v.to_bytes(2, "big") for v in versions).ljust(16, b"\0")
    # bytes 36..57 vendor specific / reserved, 58..73 version descriptors
    return head + bytes(22) + vd + bytes(22)


def missing_lun_inquiry() -> bytes:
    """Standard INQUIRY data for a LUN with no logical unit: peripheral
    qualifier 011b, device type 1Fh (SPC-4 §6.4.2)."""
    return bytes((0x7F, 0, 0x06, 0x12, 31, 0, 0, 0x02)) + b" " * 28


def supported_pages(info: InquiryInfo) -> list[int]:
    """VPD page codes reported in page 00h, ascending (SPC-4 §7.8.14)."""
    pages: list[int] = [VPDPage.SUPPORTED_PAGES, VPDPage.UNIT_SERIAL_NUMBER, VPDPage.DEVICE_IDENTIFICATION]
    if info.third_party_copy is not None:
        pages.append(THIRD_PARTY_COPY)
    if info.config.device_type == PeripheralType.DISK:
        pages += [VPDPage.BLOCK_LIMITS, VPDPage.BLOCK_DEVICE_CHARACTERISTICS, VPDPage.LOGICAL_BLOCK_PROVISIONING]
    return [int(p) for p in pages]


def _page(dtype: int, code: int, body: bytes) -> bytes:
    return struct.pack(">BBH", dtype & 0x1F, code, len(body)) + body


def _designator(code_set: int, piv_assoc_type: int, value: bytes, protocol: int = 0) -> bytes:
    """One designation descriptor (SPC-4 §7.8.6.1)."""
    return bytes(((protocol << 4) | code_set, piv_assoc_type, 0, len(value))) + value


def _name_string(name: str) -> bytes:
    """SCSI name string: UTF-8, NUL terminated, padded to a multiple of 4
    (SPC-4 §7.8.6.10)."""
    raw = name.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


def device_identification(info: InquiryInfo, nexus: Nexus | None) -> list[bytes]:
    """Designators for page 83h. The logical unit ones are stable; the
    target port ones describe the port the command came through."""
    cfg = info.config
    assert cfg.naa_wwn is not None and cfg.serial is not None
    out = [
        # NAA IEEE Registered Extended, association: logical unit
        _designator(0x1, 0x03, cfg.naa_wwn),
        # T10 vendor ID: vendor + unit serial number
        _designator(0x2, 0x01, _ascii(cfg.vendor, 8) + cfg.serial.encode("ascii", "replace")),
    ]
    if nexus is not None:
        out += [
            # relative target port identifier, association: target port
            _designator(0x1, 0x80 | 0x10 | 0x4, struct.pack(">HH", 0, nexus.relative_port_id), PROTOCOL_ISCSI),
            # target port group
            _designator(0x1, 0x80 | 0x10 | 0x5, struct.pack(">HH", 0, nexus.target_port_group), PROTOCOL_ISCSI),
            # SCSI name string of the target port
            _designator(0x3, 0x80 | 0x10 | 0x8, _name_string(nexus.target_port), PROTOCOL_ISCSI),
            # SCSI name string of the target device
            _designator(0x3, 0x80 | 0x20 | 0x8, _name_string(nexus.target_name), PROTOCOL_ISCSI),
        ]
    return out


def block_limits(info: InquiryInfo) -> bytes:
    """Body of the Block Limits page B0h (SBC-3 §6.6.3), 0x3C bytes."""
    cfg = info.config
    unmap_lbas = cfg.max_unmap_blocks if info.thin else 0
    unmap_descs = cfg.max_unmap_descriptors if info.thin else 0
    gran = max(1, cfg.unmap_granularity) if info.thin else 0
    return _BLOCK_LIMITS.pack(
        0x00,  # WSNZ=0: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is honoured
        min(cfg.max_compare_write_blocks, 255),
        cfg.optimal_transfer_granularity,
        cfg.max_transfer_blocks,
        cfg.optimal_transfer_blocks,
        cfg.max_transfer_blocks,  # MAXIMUM PREFETCH LENGTH
        unmap_lbas,
        unmap_descs,
        gran,
        0x80000000 if info.thin else 0,  # UGAVALID, alignment 0
        cfg.max_write_same_blocks,
        0,  # maximum atomic transfer length
        0,  # atomic alignment
        0,  # atomic transfer length granularity
        0,  # maximum atomic transfer length with atomic boundary
        0,  # maximum atomic boundary size
    )


def vpd_page(code: int, info: InquiryInfo, nexus: Nexus | None) -> bytes | None:
    """The full VPD page ``code`` (header included), or None when the page
    is not supported (the caller answers INVALID FIELD IN CDB)."""
    if code not in supported_pages(info):
        return None
    cfg = info.config
    dtype = int(cfg.device_type)
    if code == VPDPage.SUPPORTED_PAGES:
        return _page(dtype, code, bytes(supported_pages(info)))
    if code == VPDPage.UNIT_SERIAL_NUMBER:
        assert cfg.serial is not None
        return _page(dtype, code, cfg.serial.encode("ascii", "replace"))
    if code == VPDPage.DEVICE_IDENTIFICATION:
        return _page(dtype, code, b"".join(device_identification(info, nexus)))
    if code == THIRD_PARTY_COPY and info.third_party_copy is not None:
        return info.third_party_copy
    if code == VPDPage.BLOCK_LIMITS:
        return _page(dtype, code, block_limits(info))
    if code == VPDPage.BLOCK_DEVICE_CHARACTERISTICS:
        # MEDIUM ROTATION RATE 1 = non-rotating medium (SBC-3 §6.6.2)
        body = struct.pack(">HBB", cfg.rotation_rate, 0, 0) + bytes(56)
        return _page(dtype, code, body)
    if code == VPDPage.LOGICAL_BLOCK_PROVISIONING:
        if info.thin:
            flags = 0x80 | 0x40 | 0x20 | (0x04 if info.lbprz else 0)
            ptype = 0x02  # thin provisioned
        else:
            flags, ptype = (0x04 if info.lbprz else 0), 0x00
        return _page(dtype, code, bytes((0, flags, ptype, 0)))
    return None
