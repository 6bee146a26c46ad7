"""INQUIRY data this target reports: the standard data (SPC-4 §6.4.2) and
the vital product data pages (SPC-4 §7.8, SBC-3 §6.6), encoded with the
codec's builders (:mod:`iscsi.scsi.vpd`).

The functions are pure functions of an :class:`InquiryInfo` snapshot so the
logical unit decides what is true about itself (thin, ALUA, copy manager)
in one place and the pages can be unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass

from iscsi.scsi.cdb_common import PROTOCOL_ID_ISCSI, Association, CodeSet, DesignatorType
from iscsi.scsi.constants import PeripheralType, VPDPage
from iscsi.scsi.vpd import (
    BlockDeviceCharacteristics,
    BlockLimits,
    Designator,
    LogicalBlockProvisioning,
    StandardInquiry,
    build_standard_inquiry,
    build_vpd_block_device_characteristics,
    build_vpd_block_limits,
    build_vpd_device_identification,
    build_vpd_logical_block_provisioning,
    build_vpd_supported_pages,
    build_vpd_unit_serial,
)

from .types import LUConfig, Nexus

# SPC-4 §6.4.2 table 142: version descriptors (SPC-4 Annex E).
VERSION_SAM5 = 0x00A0
VERSION_ISCSI = 0x0960
VERSION_SPC4 = 0x0460
VERSION_SBC3 = 0x04C0

#: SPC-4 §7.8.17 Third-party Copy VPD page.
THIRD_PARTY_COPY = 0x8F

#: Standard INQUIRY data length we return (SPC-4 §6.4.2 defines up to byte
#: 95; bytes 74..95 are reserved).
STANDARD_INQUIRY_LENGTH = 96


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


def _ascii(text: str, width: int) -> str:
    """Printable ASCII cut to ``width`` (SPC-4 §4.4.1): configured strings
    are sanitised here rather than refused on the wire."""
    raw = text.encode("ascii", "replace")[:width]
    return bytes(c if 0x20 <= c <= 0x7E else 0x3F for c in raw).decode("ascii")


def standard_inquiry(info: InquiryInfo) -> bytes:
    """Standard INQUIRY data for a connected logical unit."""
    cfg = info.config
    versions = [VERSION_SAM5, VERSION_ISCSI, VERSION_SPC4]
    if cfg.device_type == PeripheralType.DISK:
        versions.append(VERSION_SBC3)
    inq = StandardInquiry(
        peripheral_type=int(cfg.device_type) & 0x1F,
        rmb=cfg.removable or cfg.device_type == PeripheralType.CDROM,
        version=0x06,  # SPC-4
        hisup=True,
        response_data_format=2,
        tpgs=1 if info.tpgs else 0,  # implicit ALUA only
        three_pc=info.copy_manager,
        cmdque=True,  # full task management model (SAM-5 §8)
        vendor=_ascii(cfg.vendor, 8),
        product=_ascii(cfg.product, 16),
        revision=_ascii(cfg.revision, 4),
        version_descriptors=tuple(versions),
    )
    return build_standard_inquiry(inq, length=STANDARD_INQUIRY_LENGTH)


def missing_lun_inquiry() -> bytes:
    """Standard INQUIRY data for a LUN with no logical unit: peripheral
    qualifier 011b, device type 1Fh (SPC-4 §6.4.2)."""
    return build_standard_inquiry(StandardInquiry(peripheral_type=0x1F, qualifier=3))


def supported_pages(info: InquiryInfo) -> list[int]:
    """VPD page codes reported in page 00h, ascending (SPC-4 §7.8.14)."""
    pages: list[int] = [VPDPage.SUPPORTED_PAGES, VPDPage.UNIT_SERIAL_NUMBER, VPDPage.DEVICE_IDENTIFICATION]
    if info.third_party_copy is not None:
        pages.append(THIRD_PARTY_COPY)
    if info.config.device_type == PeripheralType.DISK:
        pages += [VPDPage.BLOCK_LIMITS, VPDPage.BLOCK_DEVICE_CHARACTERISTICS, VPDPage.LOGICAL_BLOCK_PROVISIONING]
    return [int(p) for p in pages]


def _name_string(name: str) -> bytes:
    """SCSI name string: UTF-8, NUL terminated, padded to a multiple of 4
    (SPC-4 §7.8.6.10)."""
    raw = name.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


def _port(designator_type: int, value: bytes, code_set: int = CodeSet.BINARY,
          association: int = Association.TARGET_PORT) -> Designator:
    """A designator of the port (or device) seen through iSCSI: PIV set, so
    the protocol identifier applies (SPC-4 §7.8.6.1)."""
    return Designator(designator_type, value, code_set, association, PROTOCOL_ID_ISCSI, piv=True)


def device_identification(info: InquiryInfo, nexus: Nexus | None) -> list[Designator]:
    """Designators for page 83h. The logical unit ones are stable; the
    target port ones describe the port the command came through."""
    cfg = info.config
    assert cfg.naa_wwn is not None and cfg.serial is not None
    out = [
        # NAA IEEE Registered Extended, association: logical unit
        Designator(DesignatorType.NAA, cfg.naa_wwn),
        # T10 vendor ID: vendor + unit serial number
        Designator(
            DesignatorType.T10_VENDOR_ID,
            _ascii(cfg.vendor, 8).ljust(8).encode() + cfg.serial.encode("ascii", "replace"),
            CodeSet.ASCII,
        ),
    ]
    if nexus is not None:
        out += [
            _port(DesignatorType.RELATIVE_TARGET_PORT, nexus.relative_port_id.to_bytes(4, "big")),
            _port(DesignatorType.TARGET_PORT_GROUP, nexus.target_port_group.to_bytes(4, "big")),
            _port(DesignatorType.SCSI_NAME_STRING, _name_string(nexus.target_port), CodeSet.UTF8),
            _port(DesignatorType.SCSI_NAME_STRING, _name_string(nexus.target_name), CodeSet.UTF8,
                  Association.TARGET_DEVICE),
        ]
    return out


def block_limits(info: InquiryInfo) -> BlockLimits:
    """The Block Limits page B0h (SBC-3 §6.6.3) of this unit."""
    cfg = info.config
    return BlockLimits(
        wsnz=False,  # WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is honoured
        max_compare_and_write_length=min(cfg.max_compare_write_blocks, 255),
        optimal_transfer_length_granularity=cfg.optimal_transfer_granularity,
        max_transfer_length=cfg.max_transfer_blocks,
        optimal_transfer_length=cfg.optimal_transfer_blocks,
        max_prefetch_length=cfg.max_transfer_blocks,
        max_unmap_lba_count=cfg.max_unmap_blocks if info.thin else 0,
        max_unmap_block_descriptor_count=cfg.max_unmap_descriptors if info.thin else 0,
        optimal_unmap_granularity=max(1, cfg.unmap_granularity) if info.thin else 0,
        ugavalid=info.thin,
        max_write_same_length=cfg.max_write_same_blocks,
        # WRITE ATOMIC(16) (lu_block.py): any aligned length up to the
        # transfer limit, no atomic boundaries.
        max_atomic_transfer_length=min(cfg.max_transfer_blocks, 0xFFFF),
    )


def vpd_page(code: int, info: InquiryInfo, nexus: Nexus | None) -> bytes | None:
    """The full VPD page ``code`` (header included), or None when the page
    is not supported (the caller answers INVALID FIELD IN CDB)."""
    if code not in supported_pages(info):
        return None
    cfg = info.config
    dtype = int(cfg.device_type) & 0x1F
    if code == VPDPage.SUPPORTED_PAGES:
        return build_vpd_supported_pages(supported_pages(info), peripheral_type=dtype)
    if code == VPDPage.UNIT_SERIAL_NUMBER:
        assert cfg.serial is not None
        serial = cfg.serial.encode("ascii", "replace").decode("ascii")
        return build_vpd_unit_serial(serial, peripheral_type=dtype)
    if code == VPDPage.DEVICE_IDENTIFICATION:
        return build_vpd_device_identification(device_identification(info, nexus), peripheral_type=dtype)
    if code == THIRD_PARTY_COPY and info.third_party_copy is not None:
        return info.third_party_copy
    if code == VPDPage.BLOCK_LIMITS:
        return build_vpd_block_limits(block_limits(info), peripheral_type=dtype)
    if code == VPDPage.BLOCK_DEVICE_CHARACTERISTICS:
        # MEDIUM ROTATION RATE 1 = non-rotating medium (SBC-3 §6.6.2)
        # WABEREQ/WACEREQ 01b: after a SANITIZE BLOCK/CRYPTO ERASE (thin
        # units only, sanitize.py) reads complete GOOD (zeroes).
        erase = 1 if info.thin else 0
        bdc = BlockDeviceCharacteristics(medium_rotation_rate=cfg.rotation_rate,
                                         wabereq=erase, wacereq=erase)
        return build_vpd_block_device_characteristics(bdc, peripheral_type=dtype)
    if code == VPDPage.LOGICAL_BLOCK_PROVISIONING:
        # Thin: LBPU (UNMAP), LBPWS, LBPWS10, provisioning type 010b (SBC-3 §6.6.4).
        thin = info.thin
        lbp = LogicalBlockProvisioning(lbpu=thin, lbpws=thin, lbpws10=thin, lbprz=int(info.lbprz),
                                       provisioning_type=0x02 if thin else 0x00)
        return build_vpd_logical_block_provisioning(lbp, peripheral_type=dtype)
    return None
