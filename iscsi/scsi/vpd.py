"""Returned data of INQUIRY: the standard data (SPC-4 §6.4.2) and VPD
pages (SPC-4 §7.8, SBC-3 §6.5).

Part of the one SCSI codec both roles share (see :mod:`iscsi.scsi`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .cdb_common import (
    Association,
    Buffer,
    CodeSet,
    SCSIDataError,
    _bit,
    _u,
)
from .constants import (
    VPDPage,
)

# --- returned data: standard INQUIRY (SPC-4 §6.4.2) -------------------------------------

_SINQHDR = struct.Struct(">BBBBBBBB")


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data (SPC-4 §6.4.2). Text fields are stripped of
    trailing spaces. ``version_descriptors`` are bytes 58..73 (non-zero ones)."""

    peripheral_type: int = 0
    qualifier: int = 0
    rmb: bool = False
    version: int = 6
    normaca: bool = False
    hisup: bool = True
    response_data_format: int = 2
    sccs: bool = False
    acc: bool = False
    tpgs: int = 0
    three_pc: bool = False
    protect: bool = False
    encserv: bool = False
    multip: bool = False
    cmdque: bool = True
    vendor: str = ""
    product: str = ""
    revision: str = ""
    version_descriptors: tuple[int, ...] = ()


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


def _pad(text: str, n: int, name: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name} {text!r} is not ASCII") from None
    if len(raw) > n:
        raise ValueError(f"{name} {text!r} longer than {n} characters")
    return raw.ljust(n, b" ")


def build_standard_inquiry(inq: StandardInquiry, *, length: int = 0) -> bytes:
    """Encode standard INQUIRY data: 36 bytes, or 74 with version descriptors;
    ``length`` pads with zeros (reserved bytes) to that total, ADDITIONAL
    LENGTH included (SPC-4 §6.4.2: the data may be longer than 36 bytes)."""
    b0 = (_u(inq.qualifier, 3, "qualifier") << 5) | _u(
        inq.peripheral_type, 5, "peripheral_type"
    )
    b1 = _bit(inq.rmb, 7)
    b3 = (
        _bit(inq.normaca, 5)
        | _bit(inq.hisup, 4)
        | _u(inq.response_data_format, 4, "response_data_format")
    )
    b5 = (
        _bit(inq.sccs, 7)
        | _bit(inq.acc, 6)
        | (_u(inq.tpgs, 2, "tpgs") << 4)
        | _bit(inq.three_pc, 3)
        | _bit(inq.protect, 0)
    )
    b6 = _bit(inq.encserv, 6) | _bit(inq.multip, 4)
    b7 = _bit(inq.cmdque, 1)
    if len(inq.version_descriptors) > 8:
        raise ValueError("at most 8 version descriptors")
    total = max(74 if inq.version_descriptors else 36, length)
    if total > 255 + 5:
        raise ValueError(f"standard INQUIRY data of {total} bytes is longer than 260")
    head = _SINQHDR.pack(
        b0, b1, _u(inq.version, 8, "version"), b3, total - 5, b5, b6, b7
    )
    body = (
        _pad(inq.vendor, 8, "vendor")
        + _pad(inq.product, 16, "product")
        + _pad(inq.revision, 4, "revision")
    )
    if inq.version_descriptors:
        vd = b"".join(
            _u(v, 16, "version descriptor").to_bytes(2, "big")
            for v in inq.version_descriptors
        )
        body += bytes(22) + vd.ljust(16, b"\0")
    return (head + body).ljust(total, b"\0")


def parse_standard_inquiry(data: Buffer) -> StandardInquiry:
    """Decode standard INQUIRY data (at least the 5-byte header; fields
    beyond what was returned read as zero/empty)."""
    if len(data) < 5:
        raise SCSIDataError(f"INQUIRY data is {len(data)} bytes, needs at least 5")
    raw = bytes(data[: 5 + data[4]])  # additional length bounds the real data
    b0, b1, ver, b3, _, b5, b6, b7 = _SINQHDR.unpack(raw[:8].ljust(8, b"\0"))
    vds: tuple[int, ...] = ()
    if len(raw) > 58:
        vdraw = raw[58:74]
        vdraw = vdraw[: len(vdraw) // 2 * 2]
        vds = tuple(v for (v,) in struct.iter_unpack(">H", vdraw) if v)
    return StandardInquiry(
        peripheral_type=b0 & 0x1F,
        qualifier=b0 >> 5,
        rmb=bool(b1 & 0x80),
        version=ver,
        normaca=bool(b3 & 0x20),
        hisup=bool(b3 & 0x10),
        response_data_format=b3 & 0x0F,
        sccs=bool(b5 & 0x80),
        acc=bool(b5 & 0x40),
        tpgs=(b5 >> 4) & 3,
        three_pc=bool(b5 & 8),
        protect=bool(b5 & 1),
        encserv=bool(b6 & 0x40),
        multip=bool(b6 & 0x10),
        cmdque=bool(b7 & 2),
        vendor=_text(raw[8:16]),
        product=_text(raw[16:32]),
        revision=_text(raw[32:36]),
        version_descriptors=vds,
    )


# --- returned data: VPD pages (SPC-4 §7.8, SBC-3 §6.5) -----------------------------------

_SVPDHDR = struct.Struct(">BBH")


@dataclass(frozen=True, slots=True)
class VPDPageData:
    """A VPD page split into header fields and payload (bytes after byte 3,
    bounded by PAGE LENGTH and by what was received)."""

    page_code: int
    payload: bytes
    peripheral_type: int = 0
    qualifier: int = 0
    page_length: int = 0

    @property
    def truncated(self) -> bool:
        """True when PAGE LENGTH announces more than was received."""
        return self.page_length > len(self.payload)


def build_vpd_page(
    page_code: int, payload: bytes, *, peripheral_type: int = 0, qualifier: int = 0
) -> bytes:
    """Wrap ``payload`` in the 4-byte VPD page header."""
    b0 = (_u(qualifier, 3, "qualifier") << 5) | _u(
        peripheral_type, 5, "peripheral_type"
    )
    return (
        _SVPDHDR.pack(
            b0, _u(page_code, 8, "page_code"), _u(len(payload), 16, "page length")
        )
        + payload
    )


def parse_vpd_page(data: Buffer, page_code: int | None = None) -> VPDPageData:
    """Split a VPD page; with ``page_code`` check it is the page asked for."""
    if len(data) < 4:
        raise SCSIDataError(f"VPD page is {len(data)} bytes, needs at least 4")
    b0, pc, plen = _SVPDHDR.unpack_from(data)
    if page_code is not None and pc != page_code:
        raise SCSIDataError(f"VPD page code is {pc:#04x}, expected {page_code:#04x}")
    return VPDPageData(pc, bytes(data[4 : 4 + plen]), b0 & 0x1F, b0 >> 5, plen)


def build_vpd_supported_pages(
    pages: Sequence[int], *, peripheral_type: int = 0
) -> bytes:
    """VPD page 00h: the list of supported page codes (ascending, SPC-4 §7.8.13)."""
    return build_vpd_page(
        VPDPage.SUPPORTED_PAGES,
        bytes(sorted(_u(p, 8, "page") for p in pages)),
        peripheral_type=peripheral_type,
    )


def parse_vpd_supported_pages(data: Buffer) -> tuple[int, ...]:
    """Decode VPD page 00h."""
    return tuple(parse_vpd_page(data, VPDPage.SUPPORTED_PAGES).payload)


def build_vpd_unit_serial(serial: str, *, peripheral_type: int = 0) -> bytes:
    """VPD page 80h: PRODUCT SERIAL NUMBER (ASCII, SPC-4 §7.8.15)."""
    try:
        raw = serial.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"serial {serial!r} is not ASCII") from None
    return build_vpd_page(
        VPDPage.UNIT_SERIAL_NUMBER, raw, peripheral_type=peripheral_type
    )


def parse_vpd_unit_serial(data: Buffer) -> str:
    """Decode VPD page 80h (surrounding spaces removed)."""
    return (
        parse_vpd_page(data, VPDPage.UNIT_SERIAL_NUMBER)
        .payload.decode("ascii", "replace")
        .strip(" \0")
    )


_SDESIG = struct.Struct(">BBxB")


@dataclass(frozen=True, slots=True)
class Designator:
    """A designation descriptor of VPD page 83h (SPC-4 §7.8.6.1)."""

    designator_type: int
    value: bytes
    code_set: int = CodeSet.BINARY
    association: int = Association.LOGICAL_UNIT
    protocol_identifier: int = 0
    piv: bool = False

    @property
    def text(self) -> str:
        """The value as text for ASCII/UTF-8 code sets (trailing NULs removed)."""
        return self.value.rstrip(b"\0").decode("utf-8", "replace")


def build_vpd_device_identification(
    designators: Sequence[Designator], *, peripheral_type: int = 0
) -> bytes:
    """VPD page 83h from designators."""
    parts = []
    for d in designators:
        if len(d.value) > 255:
            raise ValueError(f"designator of {len(d.value)} bytes is longer than 255")
        b0 = (_u(d.protocol_identifier, 4, "protocol_identifier") << 4) | _u(
            d.code_set, 4, "code_set"
        )
        b1 = (
            _bit(d.piv, 7)
            | (_u(d.association, 2, "association") << 4)
            | _u(d.designator_type, 4, "designator_type")
        )
        parts.append(_SDESIG.pack(b0, b1, len(d.value)) + d.value)
    return build_vpd_page(
        VPDPage.DEVICE_IDENTIFICATION, b"".join(parts), peripheral_type=peripheral_type
    )


def parse_vpd_device_identification(data: Buffer) -> tuple[Designator, ...]:
    """Decode VPD page 83h into designators; a descriptor cut short by the
    allocation length is dropped."""
    payload = parse_vpd_page(data, VPDPage.DEVICE_IDENTIFICATION).payload
    out: list[Designator] = []
    pos = 0
    while pos + 4 <= len(payload):  # one iteration per descriptor, not per byte
        b0, b1, n = _SDESIG.unpack_from(payload, pos)
        if pos + 4 + n > len(payload):
            break
        out.append(
            Designator(
                designator_type=b1 & 0x0F,
                value=payload[pos + 4 : pos + 4 + n],
                code_set=b0 & 0x0F,
                association=(b1 >> 4) & 3,
                protocol_identifier=b0 >> 4,
                piv=bool(b1 & 0x80),
            )
        )
        pos += 4 + n
    return tuple(out)


_SBLKLIM = struct.Struct(">BBHIIIIIIIQIIIII")


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block Limits VPD page B0h (SBC-3 §6.5.3). Lengths are in logical blocks."""

    wsnz: bool = False
    max_compare_and_write_length: int = 0
    optimal_transfer_length_granularity: int = 0
    max_transfer_length: int = 0
    optimal_transfer_length: int = 0
    max_prefetch_length: int = 0
    max_unmap_lba_count: int = 0
    max_unmap_block_descriptor_count: int = 0
    optimal_unmap_granularity: int = 0
    ugavalid: bool = False
    unmap_granularity_alignment: int = 0
    max_write_same_length: int = 0
    #: SBC-4 §6.6.4: WRITE ATOMIC limits (0: not supported / no requirement).
    max_atomic_transfer_length: int = 0
    atomic_alignment: int = 0
    atomic_transfer_length_granularity: int = 0
    max_atomic_transfer_length_with_boundary: int = 0
    max_atomic_boundary_size: int = 0


def build_vpd_block_limits(bl: BlockLimits, *, peripheral_type: int = 0) -> bytes:
    """Encode VPD page B0h (page length 3Ch)."""
    body = _SBLKLIM.pack(
        _bit(bl.wsnz, 0),
        _u(bl.max_compare_and_write_length, 8, "max_compare_and_write_length"),
        _u(
            bl.optimal_transfer_length_granularity,
            16,
            "optimal_transfer_length_granularity",
        ),
        _u(bl.max_transfer_length, 32, "max_transfer_length"),
        _u(bl.optimal_transfer_length, 32, "optimal_transfer_length"),
        _u(bl.max_prefetch_length, 32, "max_prefetch_length"),
        _u(bl.max_unmap_lba_count, 32, "max_unmap_lba_count"),
        _u(bl.max_unmap_block_descriptor_count, 32, "max_unmap_block_descriptor_count"),
        _u(bl.optimal_unmap_granularity, 32, "optimal_unmap_granularity"),
        _bit(bl.ugavalid, 31)
        | _u(bl.unmap_granularity_alignment, 31, "unmap_granularity_alignment"),
        _u(bl.max_write_same_length, 64, "max_write_same_length"),
        _u(bl.max_atomic_transfer_length, 32, "max_atomic_transfer_length"),
        _u(bl.atomic_alignment, 32, "atomic_alignment"),
        _u(bl.atomic_transfer_length_granularity, 32, "atomic_transfer_length_granularity"),
        _u(bl.max_atomic_transfer_length_with_boundary, 32,
           "max_atomic_transfer_length_with_boundary"),
        _u(bl.max_atomic_boundary_size, 32, "max_atomic_boundary_size"),
    )
    return build_vpd_page(
        VPDPage.BLOCK_LIMITS, body.ljust(0x3C, b"\0"), peripheral_type=peripheral_type
    )


def parse_vpd_block_limits(data: Buffer) -> BlockLimits:
    """Decode VPD page B0h; fields absent from a short (older) page read as 0."""
    payload = parse_vpd_page(data, VPDPage.BLOCK_LIMITS).payload
    f = _SBLKLIM.unpack(payload[: _SBLKLIM.size].ljust(_SBLKLIM.size, b"\0"))
    return BlockLimits(
        bool(f[0] & 1),
        f[1],
        f[2],
        f[3],
        f[4],
        f[5],
        f[6],
        f[7],
        f[8],
        bool(f[9] >> 31),
        f[9] & 0x7FFFFFFF,
        f[10],
        *f[11:16],
    )


_SBDC = struct.Struct(">HBBB")


@dataclass(frozen=True, slots=True)
class BlockDeviceCharacteristics:
    """Block Device Characteristics VPD page B1h (SBC-3 §6.5.2). A rotation
    rate of 1 means non-rotating (solid state)."""

    medium_rotation_rate: int = 0
    product_type: int = 0
    wabereq: int = 0
    wacereq: int = 0
    nominal_form_factor: int = 0
    fuab: bool = False
    vbuls: bool = False


def build_vpd_block_device_characteristics(
    bdc: BlockDeviceCharacteristics, *, peripheral_type: int = 0
) -> bytes:
    """Encode VPD page B1h (page length 3Ch)."""
    body = _SBDC.pack(
        _u(bdc.medium_rotation_rate, 16, "medium_rotation_rate"),
        _u(bdc.product_type, 8, "product_type"),
        (_u(bdc.wabereq, 2, "wabereq") << 6)
        | (_u(bdc.wacereq, 2, "wacereq") << 4)
        | _u(bdc.nominal_form_factor, 4, "nominal_form_factor"),
        _bit(bdc.fuab, 1) | _bit(bdc.vbuls, 0),
    )
    return build_vpd_page(
        VPDPage.BLOCK_DEVICE_CHARACTERISTICS,
        body.ljust(0x3C, b"\0"),
        peripheral_type=peripheral_type,
    )


_SLBP = struct.Struct(">BBBB")


@dataclass(frozen=True, slots=True)
class LogicalBlockProvisioning:
    """Logical Block Provisioning VPD page B2h (SBC-3 §6.5.4; LBPRZ as the
    3-bit SBC-4 field, whose low bit is SBC-3's LBPRZ bit)."""

    threshold_exponent: int = 0
    lbpu: bool = False
    lbpws: bool = False
    lbpws10: bool = False
    lbprz: int = 0
    anc_sup: bool = False
    dp: bool = False
    minimum_percentage: int = 0
    provisioning_type: int = 0
    threshold_percentage: int = 0


def build_vpd_logical_block_provisioning(
    lbp: LogicalBlockProvisioning, *, peripheral_type: int = 0
) -> bytes:
    """Encode VPD page B2h (no provisioning group descriptor)."""
    if lbp.dp:
        raise ValueError(
            "dp=True needs a provisioning group descriptor, not supported here"
        )
    body = _SLBP.pack(
        _u(lbp.threshold_exponent, 8, "threshold_exponent"),
        _bit(lbp.lbpu, 7)
        | _bit(lbp.lbpws, 6)
        | _bit(lbp.lbpws10, 5)
        | (_u(lbp.lbprz, 3, "lbprz") << 2)
        | _bit(lbp.anc_sup, 1),
        (_u(lbp.minimum_percentage, 5, "minimum_percentage") << 3)
        | _u(lbp.provisioning_type, 3, "provisioning_type"),
        _u(lbp.threshold_percentage, 8, "threshold_percentage"),
    )
    return build_vpd_page(
        VPDPage.LOGICAL_BLOCK_PROVISIONING, body, peripheral_type=peripheral_type
    )


def parse_vpd_logical_block_provisioning(data: Buffer) -> LogicalBlockProvisioning:
    """Decode VPD page B2h (any provisioning group descriptor is ignored)."""
    payload = parse_vpd_page(data, VPDPage.LOGICAL_BLOCK_PROVISIONING).payload
    te, b5, b6, tp = _SLBP.unpack(payload[:4].ljust(4, b"\0"))
    return LogicalBlockProvisioning(
        te,
        bool(b5 & 0x80),
        bool(b5 & 0x40),
        bool(b5 & 0x20),
        (b5 >> 2) & 7,
        bool(b5 & 2),
        bool(b5 & 1),
        b6 >> 3,
        b6 & 7,
        tp,
    )

