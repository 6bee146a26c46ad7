"""Reservations of one logical unit: SPC-2 RESERVE/RELEASE and SPC-4
persistent reservations (SPC-4 §5.9, PERSISTENT RESERVE IN §6.15 and
PERSISTENT RESERVE OUT §6.16).

The object keeps the registrations (reservation key per I_T nexus), the
persistent reservation (type and holder), the SPC-2 reservation (one I_T
nexus) and the PRgeneration counter. The logical unit asks it three things:

* ``conflict(nexus, cdb)`` before running any command: the command-conflict
  tables of SPC-4 §5.9.1 (SPC commands) and SBC-3 §4.17.x (block commands),
  plus the SPC-2 reservation rules (SPC-2 §5.5.1);
* ``reserve_in`` / ``reserve_out`` to run PERSISTENT RESERVE IN / OUT;
* ``reserve6`` / ``release6`` for RESERVE(6/10) / RELEASE(6/10), and the
  task-management hooks ``lu_reset`` and ``nexus_lost``.

The parts live in their own modules: the data and the conflict tables in
:mod:`.pr_model`, the PERSISTENT RESERVE IN parameter data in :mod:`.pr_in`,
the PERSISTENT RESERVE OUT service actions in :mod:`.pr_out` and the APTPL
file in :mod:`.pr_store`; this class holds the state, checks commands
against it and runs PR IN/OUT with rollback on error.

RESERVATION CONFLICT is a status without sense data (SAM-5 §5.3.1), so it is
raised as :class:`ReservationConflict`; errors with sense data raise
``CheckCondition``. Unit attentions the standard asks for are returned as
:class:`UnitAttentionPost` records for the logical unit to post.

A registration names an initiator port by iSCSI name and ISID (or by name
only, when it came from a TransportID of format 00b) and a target port (or
every target port, ALL_TG_PT=1). Persist-through-power-loss state (APTPL,
SPC-4 §5.9.5) is written as JSON, atomically (temporary file, fsync,
rename), and read back when the object is built.
"""

from __future__ import annotations

from iscsi.scsi.constants import Opcode, PRInAction, PRType, SenseKey
from iscsi.scsi.pr import parse_persistent_reserve_in, parse_persistent_reserve_out, parse_reserve_release
from iscsi.scsi.sense import (
    INTERNAL_TARGET_FAILURE,
    PARAMETER_LIST_LENGTH_ERROR,
    CheckCondition,
    illegal_request,
    invalid_field_in_cdb,
)

from .pr_in import PR_IN_REPORTS, is_holder, reservation_key
from .pr_model import (
    _ALL_REGISTRANTS,
    _READ_SHARED,
    _REGISTRANTS_ONLY,
    MAX_REGISTRATIONS,
    PROutResult,
    Registration,
    ReservationConflict,
    ReservationStateError,
    UnitAttentionPost,
    _Access,
    _classify,
    _PRState,
    _spc2_allowed,
)
from .pr_out import PROutCommand, registration_of
from .pr_store import load_state, remove_state, write_state
from .types import Buffer, Nexus

# The class and what its methods raise and return.
__all__ = [
    "Reservations",
    "ReservationConflict",
    "ReservationStateError",
    "UnitAttentionPost",
    "PROutResult",
    "Registration",
]


class Reservations:
    """SPC-2 and SPC-4 reservations of one logical unit.

    ``state_path``: where APTPL state lives (None: persistence unsupported,
    PTPL_C=0 and APTPL=1 is refused). ``max_registrations``: beyond it,
    REGISTER fails with INSUFFICIENT REGISTRATION RESOURCES.
    """

    def __init__(self, state_path: str | None, *, max_registrations: int = MAX_REGISTRATIONS) -> None:
        self.state_path = state_path
        self.max_registrations = max_registrations
        #: relative target port identifier -> target port name, learnt from
        #: the nexuses that send commands: the ports REGISTER AND MOVE may name.
        self._ports: dict[int, str] = {}
        #: initiator name (lowercase) -> initiator ports seen, to address unit
        #: attentions to registrations made by name only.
        self._seen: dict[str, set[str]] = {}
        self._s = _PRState()
        #: SPC-2 RESERVE(6/10) holder: the I_T nexus key.
        self._spc2: str | None = None
        if state_path is not None:
            self._s = load_state(state_path) or self._s

    # --- introspection -------------------------------------------------------

    @property
    def generation(self) -> int:
        """The PRgeneration counter (SPC-4 §6.15.2)."""
        return self._s.generation

    @property
    def aptpl(self) -> bool:
        """PTPL_A: whether registrations persist through power loss."""
        return self._s.aptpl

    @property
    def registrations(self) -> list[Registration]:
        """The current registrations, in the order they were made."""
        return list(self._s.regs.values())

    @property
    def reservation(self) -> tuple[PRType, int] | None:
        """(type, key) of the persistent reservation (key 0 for
        all-registrants types), or None."""
        res = self._s.reservation
        if res is None:
            return None
        return res.type, reservation_key(self._s, res)

    @property
    def spc2_holder(self) -> str | None:
        """The I_T nexus key holding an SPC-2 reservation, if any."""
        return self._spc2

    def note_nexus(self, nexus: Nexus) -> None:
        """Remember a nexus's initiator and target port (for name-only
        registrations' unit attentions and REGISTER AND MOVE)."""
        self._seen.setdefault(nexus.initiator_name.lower(), set()).add(nexus.initiator_port)
        self._ports.setdefault(nexus.relative_port_id, nexus.target_port)

    # --- command conflicts (SPC-4 §5.9.1, SPC-2 §5.5.1) -----------------------

    def conflict(self, nexus: Nexus, cdb: bytes) -> bool:
        """True when ``cdb`` from ``nexus`` must end in RESERVATION CONFLICT."""
        s = self._s
        if self._spc2 is None and s.reservation is None and not s.regs:
            return False
        if not cdb:
            return False
        if self._spc2 is not None:
            op = cdb[0]
            # SPC-3 §6.11/§6.12: while RESERVE(6/10) holds, PERSISTENT RESERVE
            # IN and OUT conflict regardless of initiator.
            if op in (Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT):
                return True
            if self._spc2 == nexus.key:
                return False
            return not _spc2_allowed(cdb)
        access = _classify(cdb)
        reg = registration_of(self._s, nexus)
        if access is _Access.RESERVE:
            # SPC-2 §5.5.1 with the SPC-4 §5.9.3 exceptions: while anything
            # is registered, RESERVE/RELEASE conflict unless sent by the
            # holder or by a registrant of an RO/AR reservation (which then
            # complete GOOD without effect).
            return not self._spc2_exempt(reg)
        res = s.reservation
        if res is None or access is _Access.ALLOWED or is_holder(s, reg):
            return False
        if reg is not None and (res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS):
            return False
        if access is _Access.READ:
            return res.type not in _READ_SHARED
        return True

    def _spc2_exempt(self, reg: Registration | None) -> bool:
        res = self._s.reservation
        if reg is None or res is None:
            return False
        return is_holder(self._s, reg) or res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS

    # --- SPC-2 RESERVE / RELEASE --------------------------------------------

    def reserve6(self, nexus: Nexus, cdb: bytes | None = None) -> None:
        """RESERVE(6) / RESERVE(10) (SPC-2 §7.21, §7.22).

        Raises ReservationConflict when another I_T nexus holds the LU or
        when persistent reservations forbid it; completes without effect for
        a PR holder (SPC-4 §5.9.3).
        """
        if cdb is not None:
            _check_reserve_cdb(cdb)
        if self._s.regs:
            if self._spc2_exempt(registration_of(self._s, nexus)):
                return
            raise ReservationConflict("RESERVE while persistent reservations are registered")
        if self._spc2 is not None and self._spc2 != nexus.key:
            raise ReservationConflict("logical unit is reserved by another I_T nexus")
        self._spc2 = nexus.key

    def release6(self, nexus: Nexus, cdb: bytes | None = None) -> None:
        """RELEASE(6) / RELEASE(10): releases only the caller's own SPC-2
        reservation; from anyone else it is a GOOD no-op (SPC-2 §7.17)."""
        if cdb is not None:
            _check_reserve_cdb(cdb)
        if self._spc2 is None and self._s.regs:
            if self._spc2_exempt(registration_of(self._s, nexus)):
                return
            raise ReservationConflict("RELEASE while persistent reservations are registered")
        if self._spc2 == nexus.key:
            self._spc2 = None

    def lu_reset(self) -> None:
        """LOGICAL UNIT RESET / hard reset: the SPC-2 reservation goes,
        persistent reservations stay (SAM-5 §6.3.x, SPC-4 §5.9.1)."""
        self._spc2 = None

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss releases that nexus's SPC-2 reservation."""
        if self._spc2 == nexus.key:
            self._spc2 = None

    # --- PERSISTENT RESERVE IN (SPC-4 §6.15) --------------------------------

    def reserve_in(self, nexus: Nexus, cdb: bytes) -> bytes:
        """Run PERSISTENT RESERVE IN; returns the parameter data, cut to the
        ALLOCATION LENGTH. Raises CheckCondition / ReservationConflict."""
        cmd = parse_persistent_reserve_in(cdb)  # unknown service actions refused there
        if self._spc2 is not None:
            raise ReservationConflict("PERSISTENT RESERVE IN while reserved with RESERVE(6/10)")
        self.note_nexus(nexus)
        data = PR_IN_REPORTS[PRInAction(cmd.service_action)](self._s, self.state_path is not None)
        return data[: cmd.allocation_length]

    # --- PERSISTENT RESERVE OUT (SPC-4 §6.16) -------------------------------

    def reserve_out(self, nexus: Nexus, cdb: bytes, data: Buffer | None) -> PROutResult:
        """Run PERSISTENT RESERVE OUT with its parameter list ``data``.

        Returns the unit attentions to post (a list; ``.abort`` carries the
        initiator ports whose tasks PREEMPT AND ABORT aborts). Raises
        CheckCondition or ReservationConflict; state is unchanged then.
        """
        cmd = parse_persistent_reserve_out(cdb)  # SA, and SCOPE/TYPE where they apply
        sa = cmd.service_action
        if self._spc2 is not None:
            raise ReservationConflict("PERSISTENT RESERVE OUT while reserved with RESERVE(6/10)")
        self.note_nexus(nexus)
        plen = cmd.parameter_list_length
        params = memoryview(data if data is not None else b"")
        if len(params) < plen:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        params = params[:plen]
        scope, ptype = cmd.scope, cmd.pr_type
        before = self._s.copy()
        command = PROutCommand(
            self._s,
            nexus,
            persistence=self.state_path is not None,
            max_registrations=self.max_registrations,
            ports=self._ports,
            seen=self._seen,
        )
        try:
            result = command.run(sa, scope, ptype, params)
            self._save_if_needed(before)
        except BaseException:
            self._s = before
            raise
        return result

    # --- APTPL persistence (SPC-4 §5.9.5) -----------------------------------

    def _save_if_needed(self, before: _PRState) -> None:
        if self.state_path is None:
            return
        s = self._s
        unchanged = (
            s.regs == before.regs and s.reservation == before.reservation and s.aptpl == before.aptpl
        )
        if unchanged:
            return
        try:
            if s.aptpl:
                write_state(self.state_path, self._s)
            elif before.aptpl:
                # APTPL switched off: nothing may survive a power loss.
                remove_state(self.state_path)
        except OSError as exc:
            raise CheckCondition(SenseKey.HARDWARE_ERROR, *INTERNAL_TARGET_FAILURE) from exc


def _check_reserve_cdb(cdb: bytes) -> None:
    """Third-party and extent reservations are not supported (SPC-2 §7.21:
    3RDPTY / LONGID of RESERVE(10); the codec refuses the extent bit)."""
    cmd = parse_reserve_release(cdb)
    if cmd.third_party or cmd.longid:
        raise invalid_field_in_cdb(1, 4 if cmd.third_party else 1)
