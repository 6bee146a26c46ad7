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

from collections.abc import Iterable, Mapping

from iscsi.scsi.constants import Opcode, PRInAction, PROutAction, PRType, SenseKey
from iscsi.scsi.pr import parse_persistent_reserve_in, parse_persistent_reserve_out, parse_reserve_release
from iscsi.scsi.sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_CDB,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    CheckCondition,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

from .pr_model import (
    _ALL_REGISTRANTS,
    _ALL_TG_PT,
    _APTPL,
    _BASIC_LEN,
    _MOVE_PARAMS,
    _PROUT_PARAMS,
    _READ_SHARED,
    _REGISTRANTS_ONLY,
    _SPEC_I_PT,
    _UNREG,
    _VALID_TYPES,
    LU_SCOPE,
    MAX_REGISTRATIONS,
    PROutResult,
    RegId,
    Registration,
    ReservationConflict,
    ReservationStateError,
    TransportIDError,
    UnitAttentionPost,
    _Access,
    _classify,
    _PRState,
    _Reservation,
    _spc2_allowed,
    build_transport_id,
    parse_transport_id,
)
from .pr_in import PR_IN_REPORTS, is_holder, reservation_key
from .pr_store import load_state, remove_state, write_state
from .types import Buffer, Nexus

__all__ = [
    "Reservations",
    "ReservationConflict",
    "ReservationStateError",
    "UnitAttentionPost",
    "PROutResult",
    "Registration",
    "TransportIDError",
    "parse_transport_id",
    "build_transport_id",
]


class Reservations:
    """SPC-2 and SPC-4 reservations of one logical unit.

    ``state_path``: where APTPL state lives (None: persistence unsupported,
    PTPL_C=0 and APTPL=1 is refused). ``target_ports``: relative target port
    identifier -> target port name, the ports REGISTER AND MOVE may name;
    ports are also learnt from the nexuses that send commands.
    """

    def __init__(
        self,
        state_path: str | None,
        *,
        target_ports: Mapping[int, str] | None = None,
        max_registrations: int = MAX_REGISTRATIONS,
    ) -> None:
        self.state_path = state_path
        self.max_registrations = max_registrations
        self._ports: dict[int, str] = dict(target_ports or {})
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

    # --- lookups ---------------------------------------------------------------

    def _reg_of(self, nexus: Nexus) -> Registration | None:
        best: Registration | None = None
        for reg in self._s.regs.values():
            if reg.matches(nexus) and (best is None or reg.specificity() > best.specificity()):
                best = reg
        return best

    def _is_holder(self, reg: Registration | None) -> bool:
        return is_holder(self._s, reg)

    def _ports_of(self, regs: Iterable[Registration], issuer: Nexus | None) -> frozenset[str]:
        out: set[str] = set()
        for reg in regs:
            port = reg.initiator_port
            if port is not None:
                out.add(port)
            else:
                out.update(self._seen.get(reg.initiator_name.lower(), ()))
        if issuer is not None:
            out.discard(issuer.initiator_port)
        return frozenset(out)

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
        reg = self._reg_of(nexus)
        if access is _Access.RESERVE:
            # SPC-2 §5.5.1 with the SPC-4 §5.9.3 exceptions: while anything
            # is registered, RESERVE/RELEASE conflict unless sent by the
            # holder or by a registrant of an RO/AR reservation (which then
            # complete GOOD without effect).
            return not self._spc2_exempt(reg)
        res = s.reservation
        if res is None or access is _Access.ALLOWED or self._is_holder(reg):
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
        return self._is_holder(reg) or res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS

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
            if self._spc2_exempt(self._reg_of(nexus)):
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
            if self._spc2_exempt(self._reg_of(nexus)):
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
        try:
            if sa == PROutAction.REGISTER_AND_MOVE:
                result = self._register_and_move(nexus, params)
            else:
                result = self._basic(nexus, PROutAction(sa), scope, ptype, params)
            self._save_if_needed(before)
        except BaseException:
            self._s = before
            raise
        return result

    def _basic(self, nexus: Nexus, sa: PROutAction, scope: int, ptype: int, params: memoryview) -> PROutResult:
        if len(params) < _BASIC_LEN:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags = _PROUT_PARAMS.unpack_from(params)
        spec_i_pt, all_tg_pt, aptpl = bool(flags & _SPEC_I_PT), bool(flags & _ALL_TG_PT), bool(flags & _APTPL)
        register = sa in (PROutAction.REGISTER, PROutAction.REGISTER_AND_IGNORE_EXISTING_KEY)
        # SPC-4 §6.16.3: SPEC_I_PT only for REGISTER, ALL_TG_PT only for the
        # two REGISTER service actions; the list is exactly 24 bytes unless
        # SPEC_I_PT adds TransportIDs.
        if spec_i_pt and sa != PROutAction.REGISTER:
            raise invalid_field_in_parameter_list(20, 3)
        if all_tg_pt and not register:
            raise invalid_field_in_parameter_list(20, 2)
        if not spec_i_pt and len(params) != _BASIC_LEN:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        if register and aptpl and self.state_path is None:
            raise invalid_field_in_parameter_list(20, 0)
        if sa in (PROutAction.RESERVE, PROutAction.PREEMPT, PROutAction.PREEMPT_AND_ABORT):
            if scope != LU_SCOPE:
                raise invalid_field_in_cdb(2, 7)
            if ptype not in _VALID_TYPES:
                raise invalid_field_in_cdb(2, 3)
        reg = self._reg_of(nexus)
        if register:
            return self._register(nexus, reg, sa, key, sa_key, spec_i_pt, all_tg_pt, aptpl, params)
        # Every other service action needs a registered I_T nexus presenting
        # its own key (SPC-4 §5.9.7.x / table 46 "RESERVATION CONFLICT").
        if reg is None:
            raise ReservationConflict("I_T nexus is not registered")
        if key != reg.key:
            raise ReservationConflict("reservation key does not match the registration")
        if sa == PROutAction.RESERVE:
            return self._reserve(reg, PRType(ptype))
        if sa == PROutAction.RELEASE:
            return self._release(nexus, reg, scope, ptype)
        if sa == PROutAction.CLEAR:
            return self._clear(nexus)
        return self._preempt(nexus, reg, sa_key, PRType(ptype), sa == PROutAction.PREEMPT_AND_ABORT)

    def _bump(self) -> None:
        self._s.generation = (self._s.generation + 1) & 0xFFFFFFFF

    def _add(self, reg: Registration) -> None:
        if reg.ident not in self._s.regs and len(self._s.regs) >= self.max_registrations:
            raise illegal_request(INSUFFICIENT_REGISTRATION_RESOURCES)
        self._s.regs[reg.ident] = reg

    def _register(
        self,
        nexus: Nexus,
        reg: Registration | None,
        sa: PROutAction,
        key: int,
        sa_key: int,
        spec_i_pt: bool,
        all_tg_pt: bool,
        aptpl: bool,
        params: memoryview,
    ) -> PROutResult:
        """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.9.7,
        tables 41 and 42)."""
        ignore = sa == PROutAction.REGISTER_AND_IGNORE_EXISTING_KEY
        posts: list[UnitAttentionPost] = []
        if reg is None:
            if not ignore and key != 0:
                raise ReservationConflict("unregistered I_T nexus presented a non-zero reservation key")
            if sa_key == 0:
                # "Do nothing except return GOOD status" (and still count).
                self._finish_register(aptpl)
                return PROutResult()
            new = Registration(
                nexus.initiator_name,
                nexus.isid,
                None if all_tg_pt else nexus.target_port,
                0 if all_tg_pt else nexus.relative_port_id,
                sa_key,
            )
            extra = self._spec_i_pt_regs(nexus, new, params) if spec_i_pt else []
            self._add(new)
            for r in extra:
                self._add(r)
        else:
            if spec_i_pt:
                # SPC-4 §5.9.7 table 42: SPEC_I_PT=1 from a registered I_T
                # nexus is answered with INVALID FIELD IN CDB.
                raise illegal_request(INVALID_FIELD_IN_CDB)
            if not ignore and key != reg.key:
                raise ReservationConflict("reservation key does not match the registration")
            if sa_key == 0:
                posts = self._unregister(nexus, reg)
            else:
                self._s.regs[reg.ident] = Registration(
                    reg.initiator_name, reg.isid, reg.target_port, reg.relative_port_id, sa_key
                )
        self._finish_register(aptpl)
        return PROutResult(posts)

    def _finish_register(self, aptpl: bool) -> None:
        self._s.aptpl = aptpl
        self._bump()

    def _spec_i_pt_regs(self, nexus: Nexus, own: Registration, params: memoryview) -> list[Registration]:
        """Registrations named by the TransportIDs of a SPEC_I_PT=1 list
        (SPC-4 §6.16.3: TRANSPORTID PARAMETER DATA LENGTH at byte 24)."""
        if len(params) < _BASIC_LEN + 4:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        tid_len = int.from_bytes(params[24:28], "big")
        if _BASIC_LEN + 4 + tid_len != len(params):
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        out: dict[RegId, Registration] = {}
        pos, end = 28, 28 + tid_len
        while pos < end:
            try:
                name, isid, used = parse_transport_id(params[:end], pos)
            except TransportIDError as exc:
                raise invalid_field_in_parameter_list(exc.offset) from None
            cand = Registration(name, isid, own.target_port, own.relative_port_id, own.key)
            if cand.ident != own.ident and cand.ident not in out:
                if cand.ident in self._s.regs:
                    # An I_T nexus named by a TransportID is already
                    # registered: refuse the whole list (no partial state).
                    raise invalid_field_in_parameter_list(pos)
                out[cand.ident] = cand
            pos += used
        return list(out.values())

    def _unregister(self, nexus: Nexus, reg: Registration) -> list[UnitAttentionPost]:
        """Remove a registration; a holder's reservation goes with it
        (SPC-4 §5.9.11.2), except all-registrants ones while others remain."""
        del self._s.regs[reg.ident]
        res = self._s.reservation
        if res is None:
            return []
        if res.holder is None:
            if not self._s.regs:
                self._s.reservation = None
            return []
        if res.holder != reg.ident:
            return []
        self._s.reservation = None
        if res.type in _REGISTRANTS_ONLY:
            # The registrants lose their access without a RELEASE: tell them.
            ports = self._ports_of(self._s.regs.values(), nexus)
            return [UnitAttentionPost(RESERVATIONS_RELEASED, ports)] if ports else []
        return []

    def _reserve(self, reg: Registration, ptype: PRType) -> PROutResult:
        """RESERVE (SPC-4 §5.9.10): PRgeneration is not incremented."""
        res = self._s.reservation
        if res is not None:
            if self._is_holder(reg) and res.type == ptype:
                return PROutResult()
            raise ReservationConflict("a persistent reservation is already held")
        holder = None if ptype in _ALL_REGISTRANTS else reg.ident
        self._s.reservation = _Reservation(ptype, holder)
        return PROutResult()

    def _release(self, nexus: Nexus, reg: Registration, scope: int, ptype: int) -> PROutResult:
        """RELEASE (SPC-4 §5.9.11.2)."""
        res = self._s.reservation
        if res is None or not self._is_holder(reg):
            return PROutResult()
        if scope != LU_SCOPE or ptype != res.type:
            raise illegal_request(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self._s.reservation = None
        if res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS:
            ports = self._ports_of(self._s.regs.values(), nexus)
            if ports:
                return PROutResult([UnitAttentionPost(RESERVATIONS_RELEASED, ports)])
        return PROutResult()

    def _clear(self, nexus: Nexus) -> PROutResult:
        """CLEAR (SPC-4 §5.9.11.6): every registration and the reservation go."""
        ports = self._ports_of(self._s.regs.values(), nexus)
        self._s.regs.clear()
        self._s.reservation = None
        self._bump()
        return PROutResult([UnitAttentionPost(RESERVATIONS_PREEMPTED, ports)] if ports else [])

    def _preempt(self, nexus: Nexus, reg: Registration, sa_key: int, ptype: PRType, abort: bool) -> PROutResult:
        """PREEMPT / PREEMPT AND ABORT (SPC-4 §5.9.11.4, §5.9.11.5)."""
        s = self._s
        res = s.reservation
        removed: list[Registration]
        posts: list[UnitAttentionPost] = []
        if res is None:
            # No reservation: remove the registrations holding SA key.
            if sa_key == 0:
                raise invalid_field_in_parameter_list(8)
            removed = [r for r in s.regs.values() if r.key == sa_key]
            if not removed:
                raise ReservationConflict("no registration holds the service action reservation key")
        elif res.holder is None:
            if sa_key == 0:
                # All-registrants type, key 0: everyone but the preemptor
                # goes and the preemptor takes a new reservation.
                removed = [r for r in s.regs.values() if r.ident != reg.ident]
                s.reservation = _Reservation(ptype, None if ptype in _ALL_REGISTRANTS else reg.ident)
            else:
                removed = [r for r in s.regs.values() if r.key == sa_key]
                if not removed:
                    raise ReservationConflict("no registration holds the service action reservation key")
        else:
            holder = s.regs.get(res.holder)
            holder_key = holder.key if holder is not None else None
            if sa_key == holder_key:
                removed = [r for r in s.regs.values() if r.key == sa_key and r.ident != reg.ident]
                new = _Reservation(ptype, None if ptype in _ALL_REGISTRANTS else reg.ident)
                if new.type != res.type:
                    # Survivors that were not preempted see the type change.
                    gone = {r.ident for r in removed}
                    keep = [r for r in s.regs.values() if r.ident not in gone]
                    ports = self._ports_of(keep, nexus)
                    if ports:
                        posts.append(UnitAttentionPost(RESERVATIONS_RELEASED, ports))
                s.reservation = new
            else:
                if sa_key == 0:
                    raise invalid_field_in_parameter_list(8)
                removed = [r for r in s.regs.values() if r.key == sa_key]
                if not removed:
                    raise ReservationConflict("no registration holds the service action reservation key")
        for r in removed:
            del s.regs[r.ident]
        cur = s.reservation
        if cur is not None and cur.holder is not None and cur.holder not in s.regs:
            s.reservation = None
        if cur is not None and cur.holder is None and not s.regs:
            s.reservation = None
        ports = self._ports_of(removed, nexus)
        if ports:
            posts.insert(0, UnitAttentionPost(REGISTRATIONS_PREEMPTED, ports))
        self._bump()
        aborted = self._ports_of(removed, None) if abort else frozenset()
        return PROutResult(posts, aborted)

    def _register_and_move(self, nexus: Nexus, params: memoryview) -> PROutResult:
        """REGISTER AND MOVE (SPC-4 §5.9.8, parameter list table 231)."""
        if len(params) < _BASIC_LEN:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags, rel_port, tid_len = _MOVE_PARAMS.unpack_from(params)
        if _BASIC_LEN + tid_len > len(params):
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        aptpl, unreg = bool(flags & _APTPL), bool(flags & _UNREG)
        if aptpl and self.state_path is None:
            raise invalid_field_in_parameter_list(17, 0)
        reg = self._reg_of(nexus)
        if reg is None:
            raise ReservationConflict("I_T nexus is not registered")
        if key != reg.key:
            raise ReservationConflict("reservation key does not match the registration")
        res = self._s.reservation
        if res is None or res.holder is None or res.holder != reg.ident:
            # Only the holder of a non-all-registrants reservation can move it.
            raise ReservationConflict("I_T nexus does not hold a movable reservation")
        if sa_key == 0:
            raise invalid_field_in_parameter_list(8)
        try:
            name, isid, _ = parse_transport_id(params[: _BASIC_LEN + tid_len], _BASIC_LEN)
        except TransportIDError as exc:
            raise invalid_field_in_parameter_list(exc.offset) from None
        if isid is None:
            # Moving needs one initiator port, not a node name.
            raise invalid_field_in_parameter_list(_BASIC_LEN)
        tport = self._ports.get(rel_port)
        if tport is None:
            raise invalid_field_in_parameter_list(18)
        dest = Registration(name, isid, tport, rel_port, sa_key)
        if dest.ident == reg.ident or (
            name.lower() == nexus.initiator_name.lower() and isid == nexus.isid and tport == nexus.target_port
        ):
            raise invalid_field_in_parameter_list(_BASIC_LEN)
        existing = self._s.regs.get(dest.ident)
        if existing is not None:
            dest = Registration(existing.initiator_name, isid, tport, rel_port, sa_key)
        self._add(dest)
        self._s.reservation = _Reservation(res.type, dest.ident)
        if unreg:
            del self._s.regs[reg.ident]
        self._s.aptpl = aptpl
        self._bump()
        return PROutResult()

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
