"""REPORT TARGET PORT GROUPS from the initiator's side (SPC-4 §6.37): the
CDB and the parameter data, for multipath initiators choosing a path by
its asymmetric access state (§5.15)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .cdb_common import Buffer
from .constants import MaintenanceIn, Opcode

#: Asymmetric access states (SPC-4 §6.37 table 283).
ACTIVE_OPTIMIZED = 0x0
ACTIVE_NON_OPTIMIZED = 0x1
STANDBY = 0x2
UNAVAILABLE = 0x3
OFFLINE = 0xE
TRANSITIONING = 0xF

STATE_NAMES = {ACTIVE_OPTIMIZED: "active/optimized", ACTIVE_NON_OPTIMIZED: "active/non-optimized",
               STANDBY: "standby", UNAVAILABLE: "unavailable", 0x4: "lba-dependent",
               OFFLINE: "offline", TRANSITIONING: "transitioning"}

#: The sense codes (ASC 04h) of a logical unit not accessible through this
#: port because of its ALUA state (SPC-4 Annex D): a multipath initiator
#: tries another path.
NOT_ACCESSIBLE_ASCQS = frozenset({0x0A, 0x0B, 0x0C, 0x12})
#: ASYMMETRIC ACCESS STATE CHANGED (a unit attention, 2Ah/06h).
STATE_CHANGED = (0x2A, 0x06)

_HDR = struct.Struct(">BBHBBBB")


@dataclass(frozen=True, slots=True)
class PortGroupState:
    """One target port group descriptor."""

    group_id: int
    state: int
    preferred: bool
    relative_ports: tuple[int, ...]

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"state {self.state:#x}")


def build_report_target_port_groups(allocation_length: int = 1024, *,
                                    extended: bool = False) -> bytes:
    """MAINTENANCE IN / REPORT TARGET PORT GROUPS (12-byte CDB)."""
    return struct.pack(">BBxxxxIxB", Opcode.MAINTENANCE_IN,
                       (0x20 if extended else 0) | MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
                       allocation_length, 0)


def parse_target_port_groups(data: Buffer) -> list[PortGroupState]:
    """The descriptors of REPORT TARGET PORT GROUPS parameter data (length
    or extended format); a truncated last descriptor is left out."""
    mv = memoryview(data).cast("B")
    if mv.nbytes < 4:
        raise ValueError(f"REPORT TARGET PORT GROUPS data is {mv.nbytes} bytes, under 4")
    length = int.from_bytes(mv[:4], "big")
    pos = 4
    if mv.nbytes >= 8 and mv[4] & 0x70 == 0x10:  # extended header (FORMAT TYPE 1)
        pos = 8
    end = min(mv.nbytes, 4 + length)
    out = []
    while pos + 8 <= end:
        b0, _b1, gid, _res, _status, _vendor, count = _HDR.unpack_from(mv, pos)
        ports_end = pos + 8 + 4 * count
        if ports_end > end:
            break
        ports = tuple(int.from_bytes(mv[p + 2 : p + 4], "big")
                      for p in range(pos + 8, ports_end, 4))
        out.append(PortGroupState(gid, b0 & 0x0F, bool(b0 & 0x80), ports))
        pos = ports_end
    return out
