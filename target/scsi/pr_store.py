"""Persist-through-power-loss state of persistent reservations (APTPL,
SPC-4 §5.9.5): the registrations and the reservation of a logical unit as a
JSON document, written atomically (temporary file, fsync, rename, directory
fsync) and checked field by field when read back.
"""

from __future__ import annotations

import json
import os

from iscsi.scsi.constants import PRType

from .pr_model import (
    _ALL_REGISTRANTS,
    _STATE_FORMAT,
    _STATE_VERSION,
    RegId,
    Registration,
    ReservationStateError,
    _PRState,
    _Reservation,
)


def state_json(s: _PRState) -> dict[str, object]:
    """The JSON document of ``s``; the holder is an index into the list of
    registrations."""
    idents = list(s.regs)
    res = s.reservation
    return {
        "format": _STATE_FORMAT,
        "version": _STATE_VERSION,
        "aptpl": s.aptpl,
        "registrations": [
            {
                "initiator": r.initiator_name,
                "isid": r.isid,
                "target_port": r.target_port,
                "relative_port_id": r.relative_port_id,
                "key": r.key,
            }
            for r in s.regs.values()
        ],
        "reservation": None
        if res is None
        else {
            "type": int(res.type),
            "holder": None if res.holder is None else idents.index(res.holder),
        },
    }


def write_state(path: str, s: _PRState) -> None:
    """Write ``s`` to ``path`` so that a crash leaves the old or the new state."""
    blob = json.dumps(state_json(s), indent=1, sort_keys=True).encode()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # The rename itself must reach the disk too.
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(path: str) -> _PRState | None:
    """The state stored at ``path`` (None when there is none); a state that
    cannot be read or trusted raises :class:`ReservationStateError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReservationStateError(f"{path}: cannot read persistent reservation state: {exc.strerror}") from None
    try:
        return decode_state(raw)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ReservationStateError(
            f"{path}: damaged persistent reservation state ({exc}); remove or repair it"
        ) from None


def remove_state(path: str) -> None:
    """Forget the stored state (APTPL switched off)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def decode_state(raw: bytes) -> _PRState:
    """Parse the JSON APTPL state; raise ValueError (one line) when damaged."""
    doc = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != _STATE_FORMAT:
        raise ValueError("not an aioiscsi persistent reservation state file")
    if doc.get("version") != _STATE_VERSION:
        raise ValueError(f"unsupported version {doc.get('version')!r}")
    if doc.get("aptpl") is not True:
        # Written only while APTPL is on; anything else is not ours to trust.
        raise ValueError("aptpl flag is not set")
    state = _PRState(aptpl=True)
    idents: list[RegId] = []
    regs = doc["registrations"]
    if not isinstance(regs, list):
        raise ValueError("registrations is not a list")
    for item in regs:
        if not isinstance(item, dict):
            raise ValueError("a registration is not an object")
        name, isid, tport = item["initiator"], item["isid"], item["target_port"]
        rel, key = item["relative_port_id"], item["key"]
        if not isinstance(name, str) or not name:
            raise ValueError("registration without an initiator name")
        if isid is not None and (not isinstance(isid, int) or not 0 <= isid < 1 << 48):
            raise ValueError(f"bad ISID {isid!r}")
        if tport is not None and not isinstance(tport, str):
            raise ValueError(f"bad target port {tport!r}")
        if not isinstance(rel, int) or not 0 <= rel <= 0xFFFF:
            raise ValueError(f"bad relative port id {rel!r}")
        if not isinstance(key, int) or not 0 < key < 1 << 64:
            raise ValueError(f"bad reservation key {key!r}")
        reg = Registration(name, isid, tport, rel, key)
        if reg.ident in state.regs:
            raise ValueError(f"duplicate registration for {name}")
        state.regs[reg.ident] = reg
        idents.append(reg.ident)
    res = doc["reservation"]
    if res is not None:
        if not isinstance(res, dict):
            raise ValueError("reservation is not an object")
        ptype = PRType(res["type"])
        holder = res["holder"]
        if ptype in _ALL_REGISTRANTS:
            if holder is not None:
                raise ValueError("all-registrants reservation names a holder")
            if not idents:
                raise ValueError("all-registrants reservation without registrations")
            state.reservation = _Reservation(ptype, None)
        else:
            if not isinstance(holder, int) or not 0 <= holder < len(idents):
                raise ValueError(f"reservation holder {holder!r} is not a registration index")
            state.reservation = _Reservation(ptype, idents[holder])
    return state
