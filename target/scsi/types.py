"""Plain data shared by the SCSI emulation and the transport that drives it:
the I_T nexus, the result of a command, and the configuration of a logical
unit. Nothing here knows iSCSI beyond the port-name strings the transport
builds (SPC-4 §7.6.4.6 iSCSI TransportID names)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from iscsi.scsi.constants import PeripheralType, Status

Buffer = bytes | bytearray | memoryview

#: Task attributes of SAM-5 §8.8 in the encoding iSCSI uses (RFC 7143 §11.3.1).
UNTAGGED = 0
SIMPLE = 1
ORDERED = 2
HEAD_OF_QUEUE = 3
ACA = 4

#: IEEE company ID AC-DE-48h is set aside by the IEEE for private use; a
#: generated NAA designator uses it unless the configuration names a real one.
DEFAULT_IEEE_COMPANY_ID = 0xACDE48


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus as SPC-4 sees it (SAM-5 §4.7).

    ``initiator_port`` is "<iqn>,i,0x<isid: 12 hex digits>" and
    ``target_port`` is "<iqn>,t,0x<tpgt: 4 hex digits>" (RFC 7143 §13.5 /
    SPC-4 §7.6.4.6). They are the identity used for unit attentions and
    reservations; equality of two Nexus objects is equality of all fields.
    """

    initiator_name: str
    isid: int
    initiator_port: str
    target_name: str
    target_port: str
    relative_port_id: int = 1
    target_port_group: int = 1

    @classmethod
    def create(
        cls,
        initiator_name: str,
        isid: int,
        target_name: str,
        tpgt: int = 1,
        *,
        relative_port_id: int = 1,
        target_port_group: int = 1,
    ) -> Nexus:
        """Build a nexus, deriving both port names from the iSCSI names."""
        return cls(
            initiator_name=initiator_name,
            isid=isid,
            initiator_port=f"{initiator_name},i,0x{isid:012x}",
            target_name=target_name,
            target_port=f"{target_name},t,0x{tpgt:04x}",
            relative_port_id=relative_port_id,
            target_port_group=target_port_group,
        )

    @property
    def key(self) -> str:
        """Identity of the I_T nexus (initiator port + target port)."""
        return f"{self.initiator_port}|{self.target_port}"


@dataclass(slots=True)
class ScsiResult:
    """What a command ended with.

    ``sense`` is encoded sense data (empty when there is none); ``data`` is
    the Data-In payload, possibly a view of the backend's mmap: the transport
    sends it before the next write to that range and trims it to the
    expected transfer length (computing residuals itself).
    """

    status: int = Status.GOOD
    sense: bytes = b""
    data: Buffer | None = None


def _digest(*parts: str) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.digest()


def derive_naa(target_name: str, lun: int, company_id: int = DEFAULT_IEEE_COMPANY_ID) -> bytes:
    """A stable 16-byte NAA IEEE Registered Extended designator (NAA 6,
    SPC-4 §7.8.6.6.4) from a hash of target name and LUN."""
    d = int.from_bytes(_digest("naa", target_name, str(lun))[:13], "big")
    vendor_id = d >> 68  # 36 bits
    extension = d & ((1 << 64) - 1)
    value = (6 << 124) | ((company_id & 0xFFFFFF) << 100) | ((vendor_id & ((1 << 36) - 1)) << 64) | extension
    return value.to_bytes(16, "big")


def derive_serial(target_name: str, lun: int) -> str:
    """A stable unit serial number (VPD 80h) from target name and LUN."""
    return _digest("serial", target_name, str(lun)).hex()[:16]


@dataclass(slots=True)
class LUConfig:
    """Configuration of one logical unit.

    Limits are in logical blocks; 0 means "no limit reported". ``thin``
    None follows the backend. ``naa_wwn``/``serial`` None are derived from
    target name and LUN by :meth:`resolve`.
    """

    vendor: str = "AIOISCSI"
    product: str = "VIRTUAL-DISK"
    revision: str = "0001"
    serial: str | None = None
    naa_wwn: bytes | None = None
    block_size: int = 512
    read_only: bool = False
    write_through: bool = False
    device_type: PeripheralType = PeripheralType.DISK
    removable: bool = False
    state_dir: str | None = None
    thin: bool | None = None
    #: 0: derived from ``max_transfer_bytes`` by :meth:`resolve`.
    max_transfer_blocks: int = 0
    max_transfer_bytes: int = 32 << 20
    optimal_transfer_granularity: int = 8
    optimal_transfer_blocks: int = 0x800
    max_unmap_blocks: int = 0x40000
    max_unmap_descriptors: int = 64
    unmap_granularity: int = 8
    max_write_same_blocks: int = 0x40000
    max_compare_write_blocks: int = 255
    physical_block_exponent: int = 0
    rotation_rate: int = 1
    #: SANITIZE OVERWRITE speed limit in bytes per second (0: none).
    sanitize_rate: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def resolve(self, target_name: str, lun: int) -> LUConfig:
        """Fill in derived identifiers and normalise string widths."""
        if self.serial is None:
            self.serial = derive_serial(target_name, lun)
        if self.naa_wwn is None:
            self.naa_wwn = derive_naa(target_name, lun)
        if len(self.naa_wwn) != 16 or self.naa_wwn[0] >> 4 != 6:
            raise ValueError(f"naa_wwn {self.naa_wwn.hex()} is not a 16-byte NAA 6 designator")
        if self.block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"block_size {self.block_size} is not 512, 1024, 2048 or 4096")
        if self.max_transfer_blocks <= 0:
            self.max_transfer_blocks = max(1, self.max_transfer_bytes // self.block_size)
        return self
