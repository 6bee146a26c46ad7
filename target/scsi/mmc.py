"""A CD/DVD-ROM logical unit (peripheral device type 05h) for ISO images:
the MMC-6 commands an operating system needs to mount a read-only optical
medium — READ(10/12), READ CAPACITY, READ TOC/PMA/ATIP (formats 0 and 1),
GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, MECHANISM STATUS, plus
the SPC commands inherited from :class:`LogicalUnit`.

The medium can be changed while the unit is in use (:meth:`change_medium`):
every nexus then sees NOT READY TO READY CHANGE (28/00) and GET EVENT STATUS
NOTIFICATION reports NEW MEDIA once.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable

from iscsi.scsi.constants import Opcode, PeripheralType
from iscsi.scsi.mmc import (
    parse_get_configuration,
    parse_get_event_status_notification,
    parse_mechanism_status,
    parse_read_toc,
)
from iscsi.scsi.sense import (
    NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED,
    invalid_field_in_cdb,
)
from target.backends.base import Backend, BackendError

from .lu import LogicalUnit
from .modes import ModePages, cdrom_pages
from .opcodes import CDROM_OPS, RESERVATION_OPS, XCOPY_OPS, OpInfo
from .types import Buffer, LUConfig, Nexus, ScsiResult

HandlerResult = ScsiResult | Awaitable[ScsiResult]

CD_BLOCK = 2048
#: MMC-6 §5.3.1 profiles.
PROFILE_CD_ROM = 0x0008
PROFILE_DVD_ROM = 0x0010
#: Largest CD-ROM (80 minutes of 2048-byte Mode 1 sectors); bigger is a DVD.
CD_MAX_BLOCKS = 80 * 60 * 75

# GET EVENT STATUS NOTIFICATION media event codes (MMC-6 §6.6.2.5).
MEDIA_NO_CHANGE = 0
MEDIA_EJECT_REQUEST = 1
MEDIA_NEW = 2
MEDIA_REMOVAL = 3

_CDROM_OPCODES = frozenset(op.opcode for op in CDROM_OPS)


def _msf(lba: int) -> bytes:
    """LBA to the 4-byte 0/M/S/F address form (MMC-6 §4.2.3.3: LBA 0 is
    00:02:00, 75 frames a second)."""
    f = lba + 150
    return bytes((0, f // (60 * 75), (f // 75) % 60, f % 75))


def _feature(code: int, version: int, current: bool, data: bytes, persistent: bool = False) -> bytes:
    flags = (version << 2) | (0x02 if persistent else 0) | (0x01 if current else 0)
    return struct.pack(">HBB", code, flags, len(data)) + data


class CdromUnit(LogicalUnit):
    """A read-only, removable MMC logical unit over a backend holding an
    ISO 9660 / UDF image (2048-byte blocks)."""

    # MMC-6 §4.1.6.1 / §6.7: GET CONFIGURATION and GET EVENT STATUS
    # NOTIFICATION report media state themselves and do not consume unit
    # attentions, so a host polling for media events still sees 28/00.
    ua_exempt = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE,
                           Opcode.GET_CONFIGURATION, Opcode.GET_EVENT_STATUS_NOTIFICATION})

    BASE_OPS: tuple[OpInfo, ...] = CDROM_OPS

    def __init__(self, backend: Backend | None, config: LUConfig | None = None) -> None:
        cfg = config if config is not None else LUConfig(product="VIRTUAL-CDROM")
        cfg.device_type = PeripheralType.CDROM
        cfg.block_size = CD_BLOCK
        cfg.read_only = True
        cfg.removable = True
        cfg.thin = False
        self._media_event = MEDIA_NO_CHANGE
        super().__init__(backend if backend is not None else _NoMedium(), cfg)
        if backend is None:
            self.medium_present = False

    def _make_modes(self) -> ModePages:
        return ModePages(cdrom_pages())

    def _install_handlers(self) -> None:
        super()._install_handlers()
        # The optional command sets (reservations, copy manager) stay; what
        # the unit lists is still decided by supported_ops().
        keep = _CDROM_OPCODES | {op.opcode for op in RESERVATION_OPS + XCOPY_OPS}
        for op in list(self._handlers):
            if op not in keep:
                del self._handlers[op]
        h = self._handlers
        h[Opcode.READ_TOC_PMA_ATIP] = self._read_toc
        h[Opcode.GET_CONFIGURATION] = self._get_configuration
        h[Opcode.GET_EVENT_STATUS_NOTIFICATION] = self._get_event_status
        h[Opcode.MECHANISM_STATUS] = self._mechanism_status

    # ----- medium changes ----------------------------------------------------

    def change_medium(self, backend: Backend | None) -> None:
        """Insert a new image (or remove it with None). Every nexus gets
        NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (SPC-4 / MMC-6
        §4.1.6) and the next media event is NEW MEDIA (or MEDIA REMOVAL)."""
        if backend is None:
            self.eject_medium()
            return
        old = self.backend
        self.backend = backend
        self.num_blocks = backend.size >> self._shift
        if old is not backend:
            old.close()
            # Another disc: as if the tray opened and closed, so every
            # nexus is told (28/00) and the next media event is NEW MEDIA.
            self.medium_present = False
        self.load_medium()

    def load_medium(self) -> None:
        """Close the tray with the current image inside."""
        was = self.medium_present
        super().load_medium()
        if isinstance(self.backend, _NoMedium):
            self.medium_present = False
            return
        if not was or self._media_event == MEDIA_REMOVAL:
            self._media_event = MEDIA_NEW
            self.post_unit_attention(NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED)

    def eject_medium(self) -> None:
        """Open the tray."""
        super().eject_medium()
        self._media_event = MEDIA_REMOVAL

    # ----- MMC commands --------------------------------------------------------

    def _profile(self) -> int:
        if not self.medium_present:
            return 0
        return PROFILE_DVD_ROM if self.num_blocks > CD_MAX_BLOCKS else PROFILE_CD_ROM

    def _read_toc(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """READ TOC/PMA/ATIP (MMC-6 §6.33): one data track and the lead-out
        (format 0000b), or the session summary (0001b)."""
        cmd = parse_read_toc(cdb)
        msf, fmt, track = cmd.msf, cmd.toc_format, cmd.track_session_number
        self._ready()

        def addr(lba: int) -> bytes:
            return _msf(lba) if msf else lba.to_bytes(4, "big")

        if fmt == 0:
            descs = []
            if track <= 1:
                descs.append(bytes((0, 0x14, 1, 0)) + addr(0))  # ADR 1, data track
            elif track != 0xAA:
                raise invalid_field_in_cdb(6)
            descs.append(bytes((0, 0x14, 0xAA, 0)) + addr(self.num_blocks))  # lead-out
            body = bytes((1, 1)) + b"".join(descs)
        elif fmt == 1:
            body = bytes((1, 1)) + bytes((0, 0x14, 1, 0)) + addr(0)
        else:
            raise invalid_field_in_cdb(2, 3)
        out = len(body).to_bytes(2, "big") + body
        return ScsiResult(0, b"", out[: cmd.allocation_length])

    def _features(self) -> list[tuple[int, bytes, bool]]:
        """(feature code, descriptor, current) for GET CONFIGURATION."""
        present = self.medium_present
        profile = self._profile()
        profiles = b"".join(
            struct.pack(">HBx", p, 0x01 if p == profile else 0) for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM)
        )
        blocking = 16 if profile == PROFILE_DVD_ROM else 1
        return [
            (0x0000, _feature(0x0000, 0, True, profiles, persistent=True), True),
            # Core: physical interface 0 (unspecified), DBE
            (0x0001, _feature(0x0001, 2, True, struct.pack(">IB3x", 0, 0x01), persistent=True), True),
            # Morphing: OCEvent — media changes are reported through GESN
            (0x0002, _feature(0x0002, 1, True, bytes((0x02, 0, 0, 0)), persistent=True), True),
            # Removable medium: tray loading, Eject, Lock
            (0x0003, _feature(0x0003, 0, True, bytes((0x29, 0, 0, 0)), persistent=True), True),
            # Random readable: 2048-byte blocks
            (0x0010, _feature(0x0010, 0, present, struct.pack(">IHBx", CD_BLOCK, blocking, 0)), present),
        ]

    def _get_configuration(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """GET CONFIGURATION (MMC-6 §6.6): RT 00b all features from the
        starting one, 01b only current ones, 10b just the starting one."""
        cmd = parse_get_configuration(cdb)  # RT 11b is refused there
        rt, start, alloc = cmd.rt, cmd.starting_feature, cmd.allocation_length
        feats = self._features()
        if rt == 2:
            chosen = [d for c, d, _ in feats if c == start]
        else:
            chosen = [d for c, d, cur in feats if c >= start and (rt == 0 or cur)]
        body = b"".join(chosen)
        out = struct.pack(">I2xH", 4 + len(body), self._profile()) + body
        return ScsiResult(0, b"", out[:alloc])

    def _get_event_status(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """GET EVENT STATUS NOTIFICATION (MMC-6 §6.7), polled mode only;
        only the media class (bit 4) is supported."""
        cmd = parse_get_event_status_notification(cdb)
        if not cmd.polled:
            raise invalid_field_in_cdb(1, 0)  # asynchronous mode unsupported
        classes, alloc = cmd.notification_class_request, cmd.allocation_length
        supported = 0x10
        if not classes & supported:
            out = struct.pack(">HBB", 2, 0x80, supported)  # NEA: no event available
            return ScsiResult(0, b"", out[:alloc])
        event = self._media_event
        self._media_event = MEDIA_NO_CHANGE
        status = (0x02 if self.medium_present else 0) | (0x01 if self.tray_open else 0)
        out = struct.pack(">HBB", 6, 0x04, supported) + bytes((event, status, 0, 0))
        return ScsiResult(0, b"", out[:alloc])

    def _mechanism_status(self, nexus: Nexus, cdb: bytes, data: Buffer | None, el: int | None) -> HandlerResult:
        """MECHANISM STATUS (MMC-6 §6.9): no changer, tray state only."""
        alloc = parse_mechanism_status(cdb).allocation_length
        out = bytes((0, 0x10 if self.tray_open else 0, 0, 0, 0, 0, 0, 0))
        return ScsiResult(0, b"", out[:alloc])


class _NoMedium(Backend):
    """The backend of an empty drive: zero bytes, never read."""

    @property
    def size(self) -> int:
        return 0

    @property
    def read_only(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> Buffer:
        return bytes(length)

    def write(self, offset: int, data: Buffer) -> None:
        raise BackendError("CD-ROM drive: no medium to write to")
