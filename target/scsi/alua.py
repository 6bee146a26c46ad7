"""Asymmetric logical unit access (SPC-4 §5.15): target port groups, their
asymmetric access states, REPORT TARGET PORT GROUPS (MAINTENANCE IN 0Ah,
SPC-4 §6.37) and the access check each state implies (§5.15.2.4).

The INQUIRY TPGS field of a unit served with this object is 01b (implicit
ALUA only: states change by configuration, there is no SET TARGET PORT
GROUPS).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from iscsi.scsi.constants import MaintenanceIn, Opcode
from iscsi.scsi.spc import ReportTargetPortGroups
from iscsi.scsi.sense import (
    LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION,
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE,
    LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE,
    invalid_field_in_cdb,
    not_ready,
)

from .types import Nexus

__all__ = [
    "AccessState",
    "TargetPortGroup",
    "Alua",
    "ASYMMETRIC_ACCESS_STATE_CHANGED",
    "FORMAT_LENGTH",
    "FORMAT_EXTENDED",
]


class AccessState(IntEnum):
    """Asymmetric access states (SPC-4 §6.37 table 283)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    LOGICAL_BLOCK_DEPENDENT = 0x4
    OFFLINE = 0xE
    TRANSITIONING = 0xF


#: States in which every command is allowed (SPC-4 §5.15.2.4.2, .3).
_ACTIVE = frozenset({AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED})


#: Unit attention established for every I_T nexus when a state changes.
ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)
#: LOGICAL UNIT NOT READY, OFFLINE (SPC-4 Annex D 04h/12h) for an offline port.
TARGET_PORT_IN_OFFLINE_STATE = (0x04, 0x12)

#: PARAMETER DATA FORMAT values of the CDB (SPC-4 §6.37 table 281).
FORMAT_LENGTH = 0
FORMAT_EXTENDED = 1

# Supported-state bits of byte 1 (T_SUP, O_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP):
# every state but logical block dependent may be configured.
_SUPPORTED = 0x80 | 0x40 | 0x08 | 0x04 | 0x02 | 0x01

_GROUP_HDR = struct.Struct(">BBHxBxB")
_PORT_DESC = struct.Struct(">2xH")

# SPC-4 §5.15.2.4.4-6: what still works through a port in each state.
_STANDBY_OK = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.LOG_SELECT,
        Opcode.LOG_SENSE,
        Opcode.MODE_SELECT_6,
        Opcode.MODE_SELECT_10,
        Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10,
        Opcode.REPORT_LUNS,
        Opcode.RECEIVE_DIAGNOSTIC_RESULTS,
        Opcode.SEND_DIAGNOSTIC,
        Opcode.REQUEST_SENSE,
        Opcode.PERSISTENT_RESERVE_IN,
        Opcode.PERSISTENT_RESERVE_OUT,
        Opcode.READ_BUFFER,
        Opcode.WRITE_BUFFER,
        Opcode.MAINTENANCE_IN,
        Opcode.MAINTENANCE_OUT,
    }
)
_UNAVAILABLE_OK = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.REPORT_LUNS,
        Opcode.REQUEST_SENSE,
        Opcode.READ_BUFFER,
        Opcode.WRITE_BUFFER,
        Opcode.MAINTENANCE_IN,
        Opcode.MAINTENANCE_OUT,
        Opcode.RECEIVE_DIAGNOSTIC_RESULTS,
        Opcode.SEND_DIAGNOSTIC,
    }
)
_TRANSITIONING_OK = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})


@dataclass(frozen=True, slots=True)
class TargetPortGroup:
    """One target port group: its id, the relative target port identifiers
    it contains and its asymmetric access state.

    ``preferred`` sets the PREF bit; ``status_code`` is the STATUS CODE of
    the descriptor (0: none, 2: altered by implicit asymmetric access
    behavior).
    """

    group_id: int
    relative_port_ids: tuple[int, ...]
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    preferred: bool = False
    status_code: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.group_id <= 0xFFFF:
            raise ValueError(f"target port group id {self.group_id} is not 0..65535")
        if len(self.relative_port_ids) > 0xFF:
            raise ValueError(f"target port group {self.group_id} has more than 255 ports")
        for port in self.relative_port_ids:
            if not 1 <= port <= 0xFFFF:
                raise ValueError(f"relative target port id {port} in group {self.group_id} is not 1..65535")
        if self.state == AccessState.LOGICAL_BLOCK_DEPENDENT:
            raise ValueError(f"target port group {self.group_id}: logical block dependent state is not supported")

    def encode(self) -> bytes:
        """The target port group descriptor (SPC-4 §6.37 table 282)."""
        head = _GROUP_HDR.pack(
            (0x80 if self.preferred else 0) | self.state,
            _SUPPORTED,
            self.group_id,
            self.status_code,
            len(self.relative_port_ids),
        )
        return head + b"".join(_PORT_DESC.pack(p) for p in self.relative_port_ids)


GroupSpec = TargetPortGroup | tuple[int, Sequence[int], int]


def _as_group(spec: GroupSpec) -> TargetPortGroup:
    if isinstance(spec, TargetPortGroup):
        return spec
    try:
        gid, ports, state = spec
        return TargetPortGroup(int(gid), tuple(int(p) for p in ports), AccessState(state))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad target port group {spec!r}: {exc}") from None


class Alua:
    """The target port groups of a SCSI target device.

    ``groups``: TargetPortGroup objects or (group id, [relative port ids],
    state) tuples; None gives one active/optimized group 1 holding relative
    port 1. ``implicit_transition_time`` (seconds) is reported in the
    extended header.
    """

    def __init__(self, groups: Iterable[GroupSpec] | None = None, *, implicit_transition_time: int = 0) -> None:
        specs = list(groups) if groups is not None else [TargetPortGroup(1, (1,))]
        self._groups: dict[int, TargetPortGroup] = {}
        self._port_group: dict[int, int] = {}
        for spec in specs:
            g = _as_group(spec)
            if g.group_id in self._groups:
                raise ValueError(f"target port group {g.group_id} is configured twice")
            for port in g.relative_port_ids:
                if port in self._port_group:
                    raise ValueError(
                        f"relative target port {port} is in groups {self._port_group[port]} and {g.group_id}"
                    )
                self._port_group[port] = g.group_id
            self._groups[g.group_id] = g
        if not self._groups:
            raise ValueError("at least one target port group is needed")
        if not 0 <= implicit_transition_time <= 0xFF:
            raise ValueError(f"implicit transition time {implicit_transition_time} is not 0..255 seconds")
        self.implicit_transition_time = implicit_transition_time
        self._all_active = self._every_group_active()

    def _every_group_active(self) -> bool:
        return all(g.state in _ACTIVE for g in self._groups.values())

    @property
    def groups(self) -> list[TargetPortGroup]:
        """The groups, in the order they are reported."""
        return list(self._groups.values())

    def group_of_port(self, relative_port_id: int) -> TargetPortGroup | None:
        """The group holding a relative target port, if any."""
        gid = self._port_group.get(relative_port_id)
        return None if gid is None else self._groups[gid]

    def state_for(self, nexus: Nexus) -> AccessState:
        """The access state of the port the nexus came through (a port in no
        group, or an unknown one, is active/optimized)."""
        g = self.group_of_port(nexus.relative_port_id) or self._groups.get(nexus.target_port_group)
        return g.state if g is not None else AccessState.ACTIVE_OPTIMIZED

    def set_state(self, group_id: int, state: AccessState) -> tuple[int, int]:
        """Change a group's state (implicit ALUA). Returns the unit attention
        (ASYMMETRIC ACCESS STATE CHANGED) the units must post to every I_T
        nexus (SPC-4 §5.15.2.5)."""
        g = self._groups.get(group_id)
        if g is None:
            raise ValueError(f"no target port group {group_id}")
        self._groups[group_id] = TargetPortGroup(
            g.group_id, g.relative_port_ids, AccessState(state), g.preferred, status_code=0x02
        )
        self._all_active = self._every_group_active()
        return ASYMMETRIC_ACCESS_STATE_CHANGED

    def report_target_port_groups(self, nexus: Nexus | None, cmd: ReportTargetPortGroups) -> bytes:
        """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.37), length or
        extended format, cut to the ALLOCATION LENGTH."""
        fmt = cmd.parameter_data_format
        body = b"".join(g.encode() for g in self._groups.values())
        if fmt == FORMAT_LENGTH:
            out = struct.pack(">I", len(body)) + body
        elif fmt == FORMAT_EXTENDED:
            # RETURN DATA LENGTH counts the bytes after itself.
            out = struct.pack(">IBB2x", len(body) + 4, 0x10, self.implicit_transition_time) + body
        else:
            raise invalid_field_in_cdb(1, 7)
        return out[: cmd.allocation_length]

    def check_access(self, nexus: Nexus, cdb: bytes) -> None:
        """Raise NOT READY / LOGICAL UNIT NOT ACCESSIBLE when the nexus's
        target port is in a state that refuses this command (SPC-4
        §5.15.2.4.4 standby, .5 unavailable, .7 transitioning, .6 offline)."""
        if self._all_active:
            return  # the usual case: checked for every command, so kept cheap
        state = self.state_for(nexus)
        if state in _ACTIVE or not cdb:
            return
        op = cdb[0]
        if state == AccessState.STANDBY:
            if op not in _STANDBY_OK:
                raise not_ready(LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_STANDBY_STATE)
        elif state == AccessState.UNAVAILABLE:
            if op not in _UNAVAILABLE_OK:
                raise not_ready(LOGICAL_UNIT_NOT_ACCESSIBLE_TARGET_PORT_IN_UNAVAILABLE_STATE)
        elif state == AccessState.TRANSITIONING:
            if op not in _TRANSITIONING_OK and not _is_rtpg(cdb):
                raise not_ready(LOGICAL_UNIT_NOT_ACCESSIBLE_ASYMMETRIC_ACCESS_STATE_TRANSITION)
        elif state == AccessState.OFFLINE:
            if op not in _TRANSITIONING_OK and not _is_rtpg(cdb):
                raise not_ready(TARGET_PORT_IN_OFFLINE_STATE)


def _is_rtpg(cdb: bytes) -> bool:
    return len(cdb) > 1 and cdb[0] == Opcode.MAINTENANCE_IN and cdb[1] & 0x1F == MaintenanceIn.REPORT_TARGET_PORT_GROUPS

