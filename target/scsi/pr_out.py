"""PERSISTENT RESERVE OUT service actions (SPC-4 §6.16): REGISTER, REGISTER
AND IGNORE EXISTING KEY (§5.9.7), RESERVE (§5.9.10), RELEASE (§5.9.11.2),
CLEAR (§5.9.11.6), PREEMPT / PREEMPT AND ABORT (§5.9.11.4, §5.9.11.5) and
REGISTER AND MOVE (§5.9.8).

:class:`PROutCommand` runs one command against a logical unit's reservation
state and changes that state in place; the caller
(:meth:`target.scsi.reservations.Reservations.reserve_out`) has already
checked the CDB, keeps a copy to roll back to when the command fails, and
writes the APTPL state afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from iscsi.scsi.constants import PROutAction, PRType
from iscsi.scsi.sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_FIELD_IN_CDB,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    illegal_request,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

from .pr_in import is_holder
from .pr_model import (
    _ALL_REGISTRANTS,
    _ALL_TG_PT,
    _APTPL,
    _BASIC_LEN,
    _MOVE_PARAMS,
    _PROUT_PARAMS,
    _REGISTRANTS_ONLY,
    _SPEC_I_PT,
    _UNREG,
    _VALID_TYPES,
    LU_SCOPE,
    PROutResult,
    RegId,
    Registration,
    ReservationConflict,
    TransportIDError,
    UnitAttentionPost,
    _PRState,
    _Reservation,
    parse_transport_id,
)
from .types import Nexus

__all__ = ["PROutCommand", "registration_of"]


def registration_of(s: _PRState, nexus: Nexus) -> Registration | None:
    """The registration ``nexus`` acts under: the narrowest of those that
    cover it (a port registration beats a name-only or ALL_TG_PT one)."""
    best: Registration | None = None
    for reg in s.regs.values():
        if reg.matches(nexus) and (best is None or reg.specificity() > best.specificity()):
            best = reg
    return best


class PROutCommand:
    """One PERSISTENT RESERVE OUT command from ``nexus`` against ``state``.

    ``persistence``: an APTPL state file is configured (APTPL=1 is refused
    without one). ``ports``: relative target port identifier -> target port
    name, the ports REGISTER AND MOVE may name. ``seen``: initiator name
    (lowercase) -> initiator ports seen, to address unit attentions to
    registrations made by name only.
    """

    def __init__(
        self,
        state: _PRState,
        nexus: Nexus,
        *,
        persistence: bool,
        max_registrations: int,
        ports: Mapping[int, str],
        seen: Mapping[str, set[str]],
    ) -> None:
        self.s = state
        self.nexus = nexus
        self.persistence = persistence
        self.max_registrations = max_registrations
        self.ports = ports
        self.seen = seen

    def run(self, sa: int, scope: int, ptype: int, params: memoryview) -> PROutResult:
        """Run service action ``sa`` with its parameter list ``params`` (cut
        to the PARAMETER LIST LENGTH). Raises CheckCondition or
        ReservationConflict, possibly after changing the state."""
        if sa == PROutAction.REGISTER_AND_MOVE:
            return self._register_and_move(params)
        return self._basic(PROutAction(sa), scope, ptype, params)

    # --- helpers ---------------------------------------------------------------

    def _ports_of(self, regs: Iterable[Registration], issuer: Nexus | None) -> frozenset[str]:
        """The initiator ports of ``regs`` (name-only ones: every port of
        that name seen so far), less the issuer's own."""
        out: set[str] = set()
        for reg in regs:
            port = reg.initiator_port
            if port is not None:
                out.add(port)
            else:
                out.update(self.seen.get(reg.initiator_name.lower(), ()))
        if issuer is not None:
            out.discard(issuer.initiator_port)
        return frozenset(out)

    def _bump(self) -> None:
        self.s.generation = (self.s.generation + 1) & 0xFFFFFFFF

    def _add(self, reg: Registration) -> None:
        if reg.ident not in self.s.regs and len(self.s.regs) >= self.max_registrations:
            raise illegal_request(INSUFFICIENT_REGISTRATION_RESOURCES)
        self.s.regs[reg.ident] = reg

    # --- the basic parameter list (SPC-4 §6.16.3) ------------------------------

    def _basic(self, sa: PROutAction, scope: int, ptype: int, params: memoryview) -> PROutResult:
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
        if register and aptpl and not self.persistence:
            raise invalid_field_in_parameter_list(20, 0)
        if sa in (PROutAction.RESERVE, PROutAction.PREEMPT, PROutAction.PREEMPT_AND_ABORT):
            if scope != LU_SCOPE:
                raise invalid_field_in_cdb(2, 7)
            if ptype not in _VALID_TYPES:
                raise invalid_field_in_cdb(2, 3)
        reg = registration_of(self.s, self.nexus)
        if register:
            return self._register(reg, sa, key, sa_key, spec_i_pt, all_tg_pt, aptpl, params)
        # Every other service action needs a registered I_T nexus presenting
        # its own key (SPC-4 §5.9.7.x / table 46 "RESERVATION CONFLICT").
        if reg is None:
            raise ReservationConflict("I_T nexus is not registered")
        if key != reg.key:
            raise ReservationConflict("reservation key does not match the registration")
        if sa == PROutAction.RESERVE:
            return self._reserve(reg, PRType(ptype))
        if sa == PROutAction.RELEASE:
            return self._release(reg, scope, ptype)
        if sa == PROutAction.CLEAR:
            return self._clear()
        return self._preempt(reg, sa_key, PRType(ptype), sa == PROutAction.PREEMPT_AND_ABORT)

    # --- REGISTER (SPC-4 §5.9.7) -------------------------------------------

    def _register(
        self,
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
        nexus = self.nexus
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
            extra = self._spec_i_pt_regs(new, params) if spec_i_pt else []
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
                posts = self._unregister(reg)
            else:
                self.s.regs[reg.ident] = Registration(
                    reg.initiator_name, reg.isid, reg.target_port, reg.relative_port_id, sa_key
                )
        self._finish_register(aptpl)
        return PROutResult(posts)

    def _finish_register(self, aptpl: bool) -> None:
        self.s.aptpl = aptpl
        self._bump()

    def _spec_i_pt_regs(self, own: Registration, params: memoryview) -> list[Registration]:
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
                if cand.ident in self.s.regs:
                    # An I_T nexus named by a TransportID is already
                    # registered: refuse the whole list (no partial state).
                    raise invalid_field_in_parameter_list(pos)
                out[cand.ident] = cand
            pos += used
        return list(out.values())

    def _unregister(self, reg: Registration) -> list[UnitAttentionPost]:
        """Remove a registration; a holder's reservation goes with it
        (SPC-4 §5.9.11.2), except all-registrants ones while others remain."""
        del self.s.regs[reg.ident]
        res = self.s.reservation
        if res is None:
            return []
        if res.holder is None:
            if not self.s.regs:
                self.s.reservation = None
            return []
        if res.holder != reg.ident:
            return []
        self.s.reservation = None
        if res.type in _REGISTRANTS_ONLY:
            # The registrants lose their access without a RELEASE: tell them.
            ports = self._ports_of(self.s.regs.values(), self.nexus)
            return [UnitAttentionPost(RESERVATIONS_RELEASED, ports)] if ports else []
        return []

    # --- RESERVE, RELEASE, CLEAR, PREEMPT (SPC-4 §5.9.10, §5.9.11) -----------

    def _reserve(self, reg: Registration, ptype: PRType) -> PROutResult:
        """RESERVE (SPC-4 §5.9.10): PRgeneration is not incremented."""
        res = self.s.reservation
        if res is not None:
            if is_holder(self.s, reg) and res.type == ptype:
                return PROutResult()
            raise ReservationConflict("a persistent reservation is already held")
        holder = None if ptype in _ALL_REGISTRANTS else reg.ident
        self.s.reservation = _Reservation(ptype, holder)
        return PROutResult()

    def _release(self, reg: Registration, scope: int, ptype: int) -> PROutResult:
        """RELEASE (SPC-4 §5.9.11.2)."""
        res = self.s.reservation
        if res is None or not is_holder(self.s, reg):
            return PROutResult()
        if scope != LU_SCOPE or ptype != res.type:
            raise illegal_request(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self.s.reservation = None
        if res.type in _REGISTRANTS_ONLY or res.type in _ALL_REGISTRANTS:
            ports = self._ports_of(self.s.regs.values(), self.nexus)
            if ports:
                return PROutResult([UnitAttentionPost(RESERVATIONS_RELEASED, ports)])
        return PROutResult()

    def _clear(self) -> PROutResult:
        """CLEAR (SPC-4 §5.9.11.6): every registration and the reservation go."""
        ports = self._ports_of(self.s.regs.values(), self.nexus)
        self.s.regs.clear()
        self.s.reservation = None
        self._bump()
        return PROutResult([UnitAttentionPost(RESERVATIONS_PREEMPTED, ports)] if ports else [])

    def _preempt(self, reg: Registration, sa_key: int, ptype: PRType, abort: bool) -> PROutResult:
        """PREEMPT / PREEMPT AND ABORT (SPC-4 §5.9.11.4, §5.9.11.5)."""
        s = self.s
        nexus = self.nexus
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

    # --- REGISTER AND MOVE (SPC-4 §5.9.8) ------------------------------------

    def _register_and_move(self, params: memoryview) -> PROutResult:
        """REGISTER AND MOVE (SPC-4 §5.9.8, parameter list table 231)."""
        nexus = self.nexus
        if len(params) < _BASIC_LEN:
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags, rel_port, tid_len = _MOVE_PARAMS.unpack_from(params)
        if _BASIC_LEN + tid_len > len(params):
            raise illegal_request(PARAMETER_LIST_LENGTH_ERROR)
        aptpl, unreg = bool(flags & _APTPL), bool(flags & _UNREG)
        if aptpl and not self.persistence:
            raise invalid_field_in_parameter_list(17, 0)
        reg = registration_of(self.s, nexus)
        if reg is None:
            raise ReservationConflict("I_T nexus is not registered")
        if key != reg.key:
            raise ReservationConflict("reservation key does not match the registration")
        res = self.s.reservation
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
        tport = self.ports.get(rel_port)
        if tport is None:
            raise invalid_field_in_parameter_list(18)
        dest = Registration(name, isid, tport, rel_port, sa_key)
        if dest.ident == reg.ident or (
            name.lower() == nexus.initiator_name.lower() and isid == nexus.isid and tport == nexus.target_port
        ):
            raise invalid_field_in_parameter_list(_BASIC_LEN)
        existing = self.s.regs.get(dest.ident)
        if existing is not None:
            dest = Registration(existing.initiator_name, isid, tport, rel_port, sa_key)
        self._add(dest)
        self.s.reservation = _Reservation(res.type, dest.ident)
        if unreg:
            del self.s.regs[reg.ident]
        self.s.aptpl = aptpl
        self._bump()
        return PROutResult()
