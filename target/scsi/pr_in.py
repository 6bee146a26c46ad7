"""PERSISTENT RESERVE IN parameter data (SPC-4 §6.15): READ KEYS, READ
RESERVATION, REPORT CAPABILITIES and READ FULL STATUS, as functions of a
logical unit's reservation state, in a table by service action."""

from __future__ import annotations

import struct
from collections.abc import Callable

from iscsi.scsi.constants import PRInAction

from .pr_model import LU_SCOPE, Registration, _PRState, _Reservation


def is_holder(s: _PRState, reg: Registration | None) -> bool:
    """Whether ``reg`` holds the reservation (every registrant does for the
    all-registrants types, SPC-4 §5.9.10)."""
    res = s.reservation
    if res is None or reg is None:
        return False
    return res.holder is None or res.holder == reg.ident


def reservation_key(s: _PRState, res: _Reservation) -> int:
    """The key READ RESERVATION reports: zero for an all-registrants
    reservation (SPC-4 §6.15.3), else the holder's."""
    if res.holder is None:
        return 0
    holder = s.regs.get(res.holder)
    return holder.key if holder is not None else 0


def read_keys(s: _PRState, persistence: bool) -> bytes:
    """READ KEYS (SPC-4 §6.15.2): PRgeneration and every registered key."""
    keys = b"".join(reg.key.to_bytes(8, "big") for reg in s.regs.values())
    return struct.pack(">II", s.generation, len(keys)) + keys


def read_reservation(s: _PRState, persistence: bool) -> bytes:
    """READ RESERVATION (SPC-4 §6.15.3 table 217)."""
    res = s.reservation
    if res is None:
        return struct.pack(">II", s.generation, 0)
    # key, obsolete (4), reserved, SCOPE|TYPE, obsolete (2)
    body = struct.pack(">Q4xxB2x", reservation_key(s, res), (LU_SCOPE << 4) | res.type)
    return struct.pack(">II", s.generation, len(body)) + body


def report_capabilities(s: _PRState, persistence: bool) -> bytes:
    """REPORT CAPABILITIES (SPC-4 §6.15.4 table 218); ``persistence``: an
    APTPL state file exists, so PTPL_C is set."""
    # CRH (compatible reservation handling, §5.9.3), SIP_C, ATP_C, PTPL_C.
    b2 = 0x10 | 0x08 | 0x04 | (0x01 if persistence else 0)
    # TMV=1; ALLOW COMMANDS=001b: TEST UNIT READY passes WE/EA
    # reservations (and nothing more than the tables say); PTPL_A.
    b3 = 0x80 | (0x1 << 4) | (0x01 if s.aptpl else 0)
    # Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
    mask = (0x80 | 0x40 | 0x20 | 0x08 | 0x02) << 8 | 0x01
    return struct.pack(">HBBH2x", 8, b2, b3, mask)


def read_full_status(s: _PRState, persistence: bool) -> bytes:
    """READ FULL STATUS (SPC-4 §6.15.5 tables 220/221): one descriptor per
    registration, with its TransportID."""
    res = s.reservation
    parts: list[bytes] = []
    for reg in s.regs.values():
        tid = reg.transport_id()
        holder = is_holder(s, reg)
        flags = (0x02 if reg.target_port is None else 0) | (0x01 if holder else 0)
        scope_type = (LU_SCOPE << 4 | res.type) if holder and res is not None else 0
        parts.append(
            struct.pack(">Q4xBB4xHI", reg.key, flags, scope_type, reg.relative_port_id, len(tid)) + tid
        )
    body = b"".join(parts)
    return struct.pack(">II", s.generation, len(body)) + body


#: PERSISTENT RESERVE IN service action -> its parameter data.
PR_IN_REPORTS: dict[PRInAction, Callable[[_PRState, bool], bytes]] = {
    PRInAction.READ_KEYS: read_keys,
    PRInAction.READ_RESERVATION: read_reservation,
    PRInAction.REPORT_CAPABILITIES: report_capabilities,
    PRInAction.READ_FULL_STATUS: read_full_status,
}
